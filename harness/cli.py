"""`harness`: the command line. Data -> splits -> train -> eval -> registry -> report.

Every command prints a one-line `error: ...` and exits non-zero on bad input: the top-level
group (`HarnessGroup`) is the one place that turns a `HarnessError` (and the OS and database
errors a user can act on) into that line; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import click
import numpy as np
import typer
from typer.core import TyperCommand, TyperGroup

from harness import data as data_mod
from harness import splits as splits_mod
from harness.errors import HarnessError, mask_secrets, user_message
from harness.export import export_app
from harness.registry import ENV_VAR as REGISTRY_ENV, Registry, to_json
from harness.signals import stop_exit_code


class HarnessGroup(TyperGroup):
    """Runs every subcommand inside one handler for user-fixable errors (see harness/errors.py)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            msg = user_message(e)
            if msg is None:
                raise
            click.echo(f"error: {msg}", err=True)
            ctx.exit(getattr(e, "exit_code", 1))


class MethodListHelp(TyperCommand):
    """A command whose help names the registered methods: "{methods}" (all) and "{paper_methods}" (the
    paper's four) in its texts are filled in when the help is shown, not when the CLI loads (the method
    modules load torch, which `harness --help` must not pay for)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.help = fill_method_lists(self.help)
        for p in self.params:
            if getattr(p, "help", None):
                p.help = fill_method_lists(p.help)
        return super().format_help(ctx, formatter)


def fill_method_lists(text: str | None) -> str | None:
    if not text or "{methods}" not in text and "{paper_methods}" not in text:
        return text
    from methods import registry
    try:
        every, paper = ", ".join(registry.names()), ",".join(registry.paper_names())
    except HarnessError as e:  # a broken method plugin: the help still shows, and says why
        every = paper = f"(the method registry could not load: {e})"
    return text.replace("{methods}", every).replace("{paper_methods}", paper)


app = typer.Typer(cls=HarnessGroup,
    help="Benchmark harness for self-supervised learning on long-tailed data: SimCLR, SDCLR, "
         "BCL-I, BCL-D and any registered method on CIFAR-100-LT (or any dataset), linear probes, a result "
         "registry and the paper's tables.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Obtain, import, validate and inspect datasets (CIFAR-100, CIFAR-10, image folders).",
                       no_args_is_help=True)
splits_app = typer.Typer(help="The paper's index splits: fetch, import, verify, show; make new ones.",
                         no_args_is_help=True)
runs_app = typer.Typer(help="Browse the result registry: list, show and delete runs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(splits_app, name="splits")
app.add_typer(runs_app, name="runs")
app.add_typer(export_app, name="export")

RegistryOpt = Annotated[Optional[str], typer.Option(
    "--registry", help=f"SQLAlchemy URL of the result registry (default: ${REGISTRY_ENV} or "
                       "sqlite:///results/registry.db).")]
DataRootOpt = Annotated[Path, typer.Option("--root", help="Folder of the datasets: cifar-100-python/ and NAME/ "
                                                  "for the others.")]
SplitsRootOpt = Annotated[Optional[Path], typer.Option(
    "--splits-root", help=f"Folder of the paper's split files (default: ${splits_mod.ENV_VAR} or splits/paper).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.")]
DataFolderOpt = Annotated[Path, typer.Option("--data-root", help="Folder of the datasets (cifar-100-python/, NAME/).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the network (forward and backward).")]
CompileModeOpt = Annotated[str, typer.Option(help="torch.compile mode with --compile: default, reduce-overhead "
                                             "(CUDA graphs), max-autotune, max-autotune-no-cudagraphs.")]



def run_id_in_range(value: Optional[int]) -> Optional[int]:
    if value is not None and not 1 <= value < 2**63:
        raise typer.BadParameter(f"{value} is not a run id (they are positive integers; see `harness runs list`)")
    return value


RunIdArg = Annotated[int, typer.Argument(callback=run_id_in_range, help="Run id (see `harness runs list`).")]
WidthOpt = Annotated[Optional[int], typer.Option(help="ResNet-18 width, the stem's channels "
                                                 "(paper: 64); e.g. 16 for a quick CPU try (recorded, marked "
                                                 "in reports).")]


def fail(message: str) -> None:
    """Stop the command with a one-line error (printed by HarnessGroup)."""
    raise HarnessError(message)


# -- data ----------------------------------------------------------------------------------

@data_app.command("prepare")
def data_prepare(
    root: DataRootOpt = data_mod.DEFAULT_ROOT,
    download: Annotated[bool, typer.Option("--download", help="Download the official CIFAR-100 archive "
                                           "(md5-checked).")] = False,
    from_: Annotated[Optional[Path], typer.Option("--from", help="Import a local dataset, validated by content: "
                                                  "CIFAR-100 pickles (e.g. ../shared/data), CIFAR-10 pickles "
                                                  "(cifar-10-batches-py) or image folders (train/<class>/*.png|jpg, "
                                                  "test/<class>/...); whole or a subset.")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Write a small synthetic dataset, for smoke "
                                            "tests (CIFAR-100's layout unless --classes, --image-size or "
                                            "--name say otherwise).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="--from: auto (detect), cifar100, cifar10 or images.")]
    = "auto",
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the dataset (its folder under ROOT; "
                                                "what splits and runs record). Default: cifar100 / cifar10 for "
                                                "the pickles, the source folder's name for images.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Images / synthetic: side S of the square images "
                                                      "(default 32). Each image's shorter side is resized to S "
                                                      "with --resize-filter, then its centre S x S is kept.")]
    = None,
    resize_filter: Annotated[str, typer.Option(help="Images: resampling filter: nearest, box, bilinear, "
                                               "hamming, bicubic or lanczos (Pillow's).")] = "bicubic",
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", help="Images: skip (and list) files "
                                                  "that cannot be decoded instead of stopping.")] = False,
    classes: Annotated[Optional[int], typer.Option(help="Synthetic: number of classes (default 100).")] = None,
    per_class: Annotated[int, typer.Option(help="Synthetic: train images per class.")] = 10,
    test_per_class: Annotated[Optional[int], typer.Option(help="Synthetic: test images per class "
                                                          "(default: as many as --per-class).")] = None,
    seed: Annotated[int, typer.Option(help="Synthetic: random seed.")] = 0,
) -> None:
    """Put a dataset under ROOT (NAME/, or cifar-100-python/), from exactly one source, atomically."""
    from harness import importers

    if sum([download, from_ is not None, synthetic]) != 1:
        fail("choose exactly one source: --download, --from PATH or --synthetic")
    log = lambda m: typer.echo(m, err=True)
    if from_ is not None:
        d = importers.prepare_from(from_, root, fmt, name, image_size or 32, resize_filter, skip_bad_images, log=log)
    elif synthetic:
        if per_class < 1:
            fail("--per-class must be at least 1")
        if classes is None and image_size is None and name in (None, data_mod.PAPER_DATASET):
            d = data_mod.make_synthetic(root, per_class=per_class, test_per_class=test_per_class, seed=seed, log=log)
        else:
            c, size = classes or data_mod.CIFAR100_CLASSES, image_size or 32
            d = data_mod.make_synthetic_dataset(root, name or f"synthetic{c}" + (f"-{size}px" if size != 32 else ""),
                                                c, size, per_class, test_per_class, seed, log=log)
    else:
        d = data_mod.download(root, log=log)
    s = data_mod.summary(d)
    typer.echo(f"prepared dataset {s['name']!r} in {dataset_location(root, d)}: {s['train_images']} train / "
               f"{s['test_images']} test images, {s['classes']} classes, {s['image_size']}x{s['image_size']} px; "
               f"{known_text(s)}")


def dataset_location(root: Path, d) -> Path:
    return data_mod.dataset_dir(root) if d.name == data_mod.PAPER_DATASET else data_mod.dataset_folder(root, d.name)


def known_text(s: dict) -> str:
    if s["known"] == data_mod.PAPER_DATASET:
        return "the real CIFAR-100"
    if s["known"] == "cifar10":
        return "the real CIFAR-10 (its official pickles, recognised by their published md5)"
    if s["name"] == data_mod.PAPER_DATASET:
        return "not the official CIFAR-100 (digests differ)"
    return "not a known dataset"


DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="Dataset name under the data root "
                                                   "(default: cifar100, or the dataset the folder is).")]


@data_app.command("info")
def data_info(root: DataRootOpt = data_mod.DEFAULT_ROOT,
              dataset: DatasetOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Counts, image size, content digests, and which known dataset (if any) ROOT holds."""
    if dataset is None and not (Path(root) / data_mod.DATASET_FILE).is_file() \
            and not data_mod.dataset_dir(root).is_dir():
        have = data_mod.available_datasets(root)
        if len(have) == 1:
            dataset = have[0]
        elif have:
            fail(f"{root} holds several datasets ({', '.join(have)}): choose one with --dataset")
    d = data_mod.load_dataset(root, dataset)
    s = data_mod.summary(d)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    counts = lambda y: data_mod.per_class_text(np.bincount(y, minlength=d.num_classes))
    names = ", ".join(d.class_names[:5]) + (", ..." if d.num_classes > 5 else "")
    typer.echo(f"dataset:      {s['name']} ({s['label']})")
    typer.echo(f"folder:       {dataset_location(root, d)}")
    typer.echo(f"train images: {s['train_images']} ({counts(d.train_labels)})")
    typer.echo(f"test images:  {s['test_images']} ({counts(d.test_labels)})")
    typer.echo(f"classes:      {s['classes']} ({names})")
    typer.echo(f"image size:   {s['image_size']} x {s['image_size']} px")
    if d.source.get("resize"):
        typer.echo(f"made by:      {d.source['format']} import of {d.source.get('path')}, {d.source['resize']}")
    for k, v in s["digests"].items():
        mark = (" (ok)" if data_mod.REAL_DIGESTS[k] == v else " (differs from CIFAR-100)") \
            if d.name == data_mod.PAPER_DATASET else ""
        typer.echo(f"sha256 {k:<13} {v}{mark}")
    typer.echo(f"recognised:   {known_text(s)}")
    if d.name == data_mod.PAPER_DATASET:
        typer.echo(f"real CIFAR-100: {'yes' if s['real_cifar100'] else 'no'}")
    others = [n for n in data_mod.available_datasets(root) if n != d.name]
    if others:
        typer.echo(f"other datasets in {root}: {', '.join(others)}")


# -- splits ----------------------------------------------------------------------------------

@splits_app.command("import")
def splits_import(src: Annotated[Path, typer.Argument(help="Folder holding the paper's .npy files "
                                                      "(any layout), e.g. ../shared/splits.")],
                  root: SplitsRootOpt = None) -> None:
    """Copy the paper's split files from a local folder, verifying every sha256."""
    missing = splits_mod.import_dir(src, root)
    n = len(splits_mod.paper_entries()) - len(missing)
    typer.echo(f"imported {n} split files into {splits_mod.resolve_root(root)}")
    if missing:
        typer.echo(f"not found in {src}: {', '.join(missing)}")


@splits_app.command("fetch")
def splits_fetch(root: SplitsRootOpt = None) -> None:
    """Download the paper's split files (URLs in splits/manifest.json) and verify them."""
    splits_mod.fetch(root)
    typer.echo(f"all {len(splits_mod.paper_entries())} split files verified in {splits_mod.resolve_root(root)}")


@splits_app.command("verify")
def splits_verify(root: SplitsRootOpt = None) -> None:
    """Check every paper split file against the manifest; exit 1 if any is missing or corrupt."""
    status = splits_mod.verify(root)
    for name, st in status:
        typer.echo(f"{name:<18} {st}")
    bad = [n for n, st in status if st not in ("ok", "missing")]
    missing = [n for n, st in status if st == "missing"]
    present = sum(st == "ok" for _, st in status)
    typer.echo(f"{present} ok, {len(missing)} missing, {len(bad)} corrupt")
    if bad:
        fail(f"digest mismatch: {', '.join(bad)}; import or fetch them again")
    if missing:
        fail(f"{len(missing)} of {len(status)} split files missing from {splits_mod.resolve_root(root)}: run "
             "`harness splits import DIR` (e.g. ../shared/splits) or `harness splits fetch`")


def split_data(name: str, data_root: Path, dataset: str | None):
    """The dataset a split's indices point into: the one it records (paper splits: CIFAR-100), or
    --dataset for a bare .npy file; a split of another dataset is refused."""
    owner = splits_mod.split_dataset(name)
    if dataset is not None and owner is not None and dataset != owner:
        fail(f"split {name!r} belongs to dataset {owner!r}, not {dataset!r}")
    d = data_mod.load_dataset(data_root, dataset or owner)
    splits_mod.check_belongs(name, d)
    return d


@splits_app.command("show")
def splits_show(name: Annotated[str, typer.Argument(help="Split: 1-5 (the paper's), a name from "
                                                "splits/manifest.json or a generated one, or a .npy path.")],
                data_root: Annotated[Path, typer.Option("--data-root", help="Folder of the datasets, for the "
                                                        "labels.")] = data_mod.DEFAULT_ROOT,
                dataset: Annotated[Optional[str], typer.Option(help="Dataset of a .npy split (named splits "
                                                               "record their own).")] = None,
                root: SplitsRootOpt = None,
                plot: Annotated[Optional[Path], typer.Option(help="Write a per-class histogram PNG here.")] = None
                ) -> None:
    """Length, per-class histogram against the dataset's labels, imbalance ratio."""
    name = f"split{name}" if name.isdigit() else name  # as `harness train --split 1` reads it
    d = split_data(name, data_root, dataset)
    idx = splits_mod.load_split(name, root, num_images=len(d.train_labels))
    counts = splits_mod.class_counts(idx, d.train_labels, d.num_classes)
    typer.echo(f"{name}: {len(idx)} indices of dataset {d.name!r}, {int((counts > 0).sum())} of "
               f"{d.num_classes} classes present")
    typer.echo(f"per class: max {counts.max()}, min {counts.min()}, "
               f"imbalance ratio {splits_mod.imbalance_ratio(counts):.1f}")
    order = counts.argsort(kind="stable")[::-1]
    width = 40 / max(counts.max(), 1)
    shown = order if len(order) <= 120 else np.concatenate([order[:50], order[-50:]])
    for i, c in enumerate(shown):
        if len(shown) < len(order) and i == 50:
            typer.echo(f"  ... {len(order) - 100} classes ...")
        typer.echo(f"  {d.class_names[c]:<22} {counts[c]:>5} {'#' * max(int(counts[c] * width), 0)}")
    if plot:
        splits_mod.plot_histogram(counts, f"{name} ({d.name})", plot)
        typer.echo(f"wrote {plot}")


@splits_app.command("make")
def splits_make(
    name: Annotated[str, typer.Argument(help="Name of the new pretraining split; its probe lists are "
                                        "NAME_full and NAME_<k>shot_<1..subsets>.")],
    dataset: Annotated[str, typer.Option(help="Dataset to draw from (its own train set): cifar100, or a name "
                                         "given to `harness data prepare`.")] = data_mod.PAPER_DATASET,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder of the datasets.")] = data_mod.DEFAULT_ROOT,
    max_per_class: Annotated[int, typer.Option(help="Images in the largest class.")] = 450,
    ratio: Annotated[float, typer.Option(help="Imbalance ratio: largest / smallest class.")] = 100.0,
    seed: Annotated[int, typer.Option(help="Seed for the class order and the draws.")] = 0,
    shots: Annotated[str, typer.Option(help="Comma-separated k of the k-shot probe lists (empty: none).")] = "100,50",
    subsets: Annotated[int, typer.Option(help="Lists per k (the paper uses five).")] = 5,
    full_per_class: Annotated[int, typer.Option(help="Images per class in the full-shot probe list "
                                                "(0: as many as every class has).")] = 0,
    exclude: Annotated[Optional[str], typer.Option(help="Split name or .npy whose indices no list may use; a named "
                                                   "split must belong to --dataset (the paper keeps CIFAR-100's "
                                                   "'val' out).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help=f"Folder for the generated files and their manifest (default: ${splits_mod.GENERATED_ENV_VAR} "
             "or splits/generated).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing split family of this name.")] = False,
) -> None:
    """Generate a long-tailed pretraining split and its probe family.

    The split follows an exponential profile drawn from --dataset's train set.
    Its probe family, drawn from it as the paper's are, is a full-shot list and
    --subsets k-shot lists per k. The files record the dataset they belong to;
    `harness train --split NAME` and `harness eval` find it from there.
    """
    splits_mod.check_split_name(name)
    try:
        ks = [int(x) for x in shots.split(",") if x.strip()]
    except ValueError:
        fail(f"--shots {shots!r}: give comma-separated whole numbers, e.g. 100,50 (or '' for none)")
    if any(k < 1 for k in ks) or subsets < 1:
        fail("--shots must be positive and --subsets at least 1")
    out = out or splits_mod.generated_dir()
    names = [name, f"{name}_full"] + [f"{name}_{k}shot_{j}" for k in ks for j in range(1, subsets + 1)]
    existing = sorted({e.name for e in splits_mod.generated_entries(out)} & set(names))
    if existing and not force:
        fail(f"split {name!r} already exists in {out} ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}): "
             "runs may depend on it; choose another name or pass --force to replace it")
    d = data_mod.load_dataset(data_root, dataset)
    labels, C = d.train_labels, d.num_classes
    if exclude:
        owner = splits_mod.split_dataset(exclude)
        if owner is not None and owner != d.name:
            fail(f"--exclude {exclude}: that split belongs to dataset {owner!r}, not {d.name!r}; exclude only index "
                 f"lists of {d.name!r} (a split made from it, or a .npy of positions in its train set)")
        splits_mod.check_belongs(exclude, d)
    ex = splits_mod.load_split(exclude, num_images=len(labels)) if exclude else None
    pool = np.setdiff1d(np.arange(len(labels)), ex) if ex is not None else np.arange(len(labels))
    available = int(np.bincount(labels[pool], minlength=C).min())
    per_class = full_per_class or available
    same = [k for k in ks if k >= per_class]
    if same:  # every such list would be the full-shot list itself: same images, scores differing only by seed
        fail(f"{same[0]}-shot lists need fewer than the {per_class} images per class of the full-shot list, or "
             f"they are that list itself; raise --full-per-class (the data allows {available}) or lower --shots")
    # draw every list first, write them after: a draw that fails leaves no half family behind
    idx = splits_mod.make_long_tailed(labels, max_per_class, ratio, seed, ex, num_classes=C)
    full = splits_mod.make_k_shot(labels, per_class, seed + 1, pool, num_classes=C)
    family = [(name, idx, "pretrain", f"{d.name}: long tail max {max_per_class} ratio {ratio} seed {seed}"),
              (f"{name}_full", full, "probe-full", f"{d.name}: {per_class} per class")]
    family += [(f"{name}_{k}shot_{j}", splits_mod.make_k_shot(labels, k, seed + 1000 * k + j, full, num_classes=C),
                f"probe-{k}", f"{d.name}: {k} per class from {name}_full, list {j}")
               for k in ks for j in range(1, subsets + 1)]
    digest = d.digest()
    made = [splits_mod.save_generated(n, i, role, desc, out, dataset=d.name, dataset_digest=digest)
            for n, i, role, desc in family]
    for e in made:
        typer.echo(f"{e.name:<24} {e.length:>6} indices  {e.role:<10} sha256 {e.sha256[:12]}…")
    typer.echo(f"wrote {len(made)} files and their manifest to {out} (dataset {d.name!r}, {C} classes)")


# -- runs ------------------------------------------------------------------------------------

def open_registry(url: str | None) -> Registry:
    return Registry(url)


RUN_COLUMNS = ["id", "method", "split", "seed", "epochs_done", "epochs", "status", "tags", "device", "wall_time_s"]


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    from harness.report import visible  # names and tags stay on their line, no terminal escapes

    if v is None:
        return "-"
    if isinstance(v, float):  # 4 significant digits: an lr of 0.0025 or a loss of -0.93 stays readable
        text = f"{v:.4g}"
        return "0" if text == "-0" else text  # a negative zero is no negative loss
    if isinstance(v, list):
        return visible(",".join(map(str, v)))
    return visible(str(v))


@runs_app.command("list")
def runs_list(
    method: Annotated[Optional[str], typer.Option(help="Only this method.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Only this pretraining split.")] = None,
    status: Annotated[Optional[str], typer.Option(help="pending, running, done, failed or interrupted.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Only runs with this tag.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """List runs, newest last."""
    from harness.registry import RUN_STATUSES
    if status is not None and status not in RUN_STATUSES:
        fail(f"unknown --status {status!r}; one of {', '.join(RUN_STATUSES)}")
    if method is not None:
        method = method.lower()
    runs = open_registry(registry).list_runs(method=method, split=split, status=status, tag=tag)
    if as_json:
        typer.echo(to_json(runs))
    elif not runs:
        typer.echo("no runs")
    else:
        typer.echo(format_table(runs, RUN_COLUMNS))


@runs_app.command("show")
def runs_show(run_id: RunIdArg,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
              registry: RegistryOpt = None) -> None:
    """A run's configuration, epochs, probe scores and artifacts."""
    reg = open_registry(registry)
    run = reg.get_run(run_id)
    full = {"run": run, "epochs": reg.epochs(run_id), "probes": reg.probes(run_id),
            "artifacts": reg.artifacts(run_id)}
    if as_json:
        typer.echo(to_json(full))
        return
    for k, v in run.items():
        if k != "config":
            typer.echo(f"{k:<12} {_cell(v)}")
    typer.echo("config       " + json.dumps(run["config"], sort_keys=True))
    if full["epochs"]:
        typer.echo(f"\nepochs logged: {len(full['epochs'])}")
        typer.echo(format_table(full["epochs"][-5:], ["epoch", "loss", "lr", "images_per_s", "weight_mean"]))
    if full["probes"]:
        typer.echo("\nprobes:")
        typer.echo(format_table(full["probes"], ["kind", "subset", "top1", "top5", "many", "medium", "few", "std"]))
    if full["artifacts"]:
        typer.echo("\nartifacts:")
        typer.echo(format_table(full["artifacts"], ["kind", "epoch", "path", "sha256"]))


@runs_app.command("delete")
def runs_delete(run_id: RunIdArg,
                yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
                registry: RegistryOpt = None) -> None:
    """Delete a run and its metrics from the registry (checkpoint files stay on disk)."""
    reg = open_registry(registry)
    run = reg.get_run(run_id)
    if not yes and not typer.confirm(f"delete run {run_id} ({run['method']} {run['split']}, {run['status']})?"):
        raise typer.Exit(1)
    reg.delete_run(run_id)
    typer.echo(f"deleted run {run_id}")


# -- train -----------------------------------------------------------------------------------

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="NAME=VALUE", help="A method's own option (repeatable), typed and checked against its "
    "config, e.g. --set temperature=0.5; recorded with the run and marked in reports as a departure from "
    "the paper's recipe. `harness methods` lists each method's options.")]


@app.command("train", cls=MethodListHelp)
def train_command(
    method: Annotated[str, typer.Argument(help="Method: {methods}.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Pretraining split: 1-5 (the paper's), a "
                                                 "generated split name, or a .npy file (default: 1).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (paper: 2000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (paper: 512).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (paper: 0.5).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (paper: 5e-4 SimCLR/BCL-I, "
                                                          "1e-4 SDCLR/BCL-D).")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help="Linear warm-up epochs "
                                                         "(paper: 10).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for init, data order and augmentation (paper: 10).")]
    = None,
    width: WidthOpt = None,
    subset: Annotated[Optional[int], typer.Option(help="Train on N images of the split (a "
                                                  "seeded draw), for a quick try; recorded and marked in "
                                                  "reports.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N steps (checkpointed, "
                                                     "status interrupted; --resume continues).")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N epochs "
                                                  "(and at the end).")] = 50,
    monitor_every: Annotated[int, typer.Option(help="kNN accuracy monitor every N epochs "
                                               "(0: off).")] = 0,
    resume: Annotated[Optional[int], typer.Option(callback=run_id_in_range, help="Continue run ID exactly where "
                                                  "its checkpoint stopped, with its own recipe, data and "
                                                  "split folders.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="Tag the run (repeatable).")] = None,
    set_: SetOpt = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset of a .npy split (named splits record their "
                                                   "own: the paper's are cifar100's).")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Folder of the datasets (default: "
                                                      "data; a resumed run reuses its own).")] = None,
    splits_root: SplitsRootOpt = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints go, run<ID>/last.pt "
                                                           "(default: checkpoints; a resumed run reuses "
                                                           "its own).")] = None,
    registry: RegistryOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (steps, images/s, ETA).")] = True,
) -> None:
    """Pretrain one method on one split with the paper's recipe.

    Every knob of the recipe can be overridden. The run, its per-epoch metrics
    and checkpoints go to the registry. Ctrl-C, SIGTERM or SIGUSR1 save a
    checkpoint and mark the run interrupted; --resume ID continues it exactly.
    """
    from harness.train import make_config, normalise_split_name, train
    from methods import registry as methods_registry

    paths = dict(data_root=str(data_root) if data_root else None,
                 splits_root=str(splits_root) if splits_root else None,
                 checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  warmup_epochs=warmup_epochs, seed=seed, width=width, subset=subset, dataset=dataset)
    runtime = dict(device=device, compile=compile, compile_mode=compile_mode, checkpoint_every=checkpoint_every,
                   monitor_every=monitor_every, max_steps=max_steps, **paths)
    reg = open_registry(registry)
    if resume is None:
        cfg = make_config(method, split or "1", options=set_, precision=precision, tags=tag or [], **recipe,
                          **runtime)
        result = train(cfg, reg, progress=progress)
    else:  # only what was given on the command line is compared with (or changes) the run's settings
        options = methods_registry.parse_options(method, set_ or ()) if set_ else {}
        asked = {k: v for k, v in {**recipe, "name": method.lower(), "precision": None if precision == "auto"
                                   else precision, "split": normalise_split_name(split) if split else None,
                                   **options, **runtime}.items() if v is not None}
        result = train(None, reg, resume=resume, progress=progress, asked=asked)
    typer.echo(f"run {result['run_id']}: {result['status']} after {result['epochs_done']} epochs; "
               f"checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        how = (f"stopped by {result['signal']}" if result.get("signal")
               else f"stopped after {result['steps']} steps (--max-steps)")
        hint = f"harness train {method} --resume {result['run_id']}"
        if registry and mask_secrets(registry) == registry:  # a URL with a password stays out of the hint
            hint += f" --registry {registry}"
        typer.echo(f"{how}; continue with: {hint}")
        raise typer.Exit(stop_exit_code(result.get("signal")))


# -- eval and report ----------------------------------------------------------------------------

# The command functions live beside their logic; both modules defer torch and pandas to the
# functions that need them, so importing them here keeps `harness --help` fast.
from harness.evaluate import eval_command  # noqa: E402
from harness.report import report_command  # noqa: E402

app.command("eval", cls=MethodListHelp)(eval_command)
app.command("report", cls=MethodListHelp)(report_command)


@app.command("methods")
def methods_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered methods: name, report name, base, options and where each comes from.

    Methods come from methods/*.py and from the `harness.methods` entry points of installed
    packages. An option is set with `harness train NAME --set OPTION=VALUE`; the values shown
    are the paper's recipe.
    """
    from methods import registry

    rows = [{"method": e.name, "report name": e.display_name, "BCL of": e.base, "paper": "yes" if e.paper else "",
             "options (paper values)": ", ".join(f"{k}={v}" for k, v in e.options().items()), "from": e.source}
            for e in registry.ordered()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(format_table(rows, list(rows[0]) if rows else ["method"]))


# -- the run matrix ----------------------------------------------------------------------------

@app.command("run", cls=MethodListHelp)
def run_command(
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods, of {methods} (default: the "
                                                   "paper's {paper_methods}).")] = None,
    splits: Annotated[str, typer.Option(help="Pretraining splits: '1-5', '1,3', or generated split names.")] = "1-5",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (paper: 10).")] = "10",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per run (paper: 2000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (paper: 512).")] = None,
    width: WidthOpt = None,
    evaluate: Annotated[bool, typer.Option(help="Linear-probe every finished run.")] = True,
    shots: Annotated[str, typer.Option(help="Probes to run: full,100,50.")] = "full,100,50",
    probe_epochs: Annotated[int, typer.Option(help="Probe epochs (protocol: 500).")] = 500,
    probe_family: Annotated[Optional[str], typer.Option(help="Generated probe lists instead of the paper's.")]
    = None,
    devices: Annotated[Optional[str], typer.Option(help="Comma-separated devices, one cell each at a time "
                                                   "(default: every visible GPU, else cpu); list a GPU twice "
                                                   "to run two cells on it.")] = None,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N epochs.")] = 50,
    tag: Annotated[Optional[list[str]], typer.Option(help="Tag every run (repeatable).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="NAME=VALUE", help="A method option (repeatable), given to every listed method that "
        "has it (an error if none has); recorded with each run and marked in reports.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would run, and do nothing.")] = False,
    data_root: DataFolderOpt = data_mod.DEFAULT_ROOT,
    splits_root: SplitsRootOpt = None,
    checkpoint_dir: Annotated[Path, typer.Option(help="Where checkpoints go.")] = Path("checkpoints"),
    registry: RegistryOpt = None,
    progress: Annotated[bool, typer.Option(help="Show the overview bar.")] = True,
    executor: Annotated[str, typer.Option(help="Where cells run: local (processes on this machine, one per "
                                          "device) or slurm (one job per cell in a Slurm job array, one GPU "
                                          "each).", callback=_executor_name)] = "local",
    slurm_logs: Annotated[Path, typer.Option(help="Slurm: folder for the jobs' logs and records (shared).")]
    = Path("slurm-logs"),
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm: partition.")] = None,
    slurm_account: Annotated[Optional[str], typer.Option(help="Slurm: account.")] = None,
    slurm_qos: Annotated[Optional[str], typer.Option(help="Slurm: quality of service.")] = None,
    slurm_time: Annotated[int, typer.Option(help="Slurm: time limit per job in minutes; a job reaching it "
                                            "checkpoints and is requeued.")] = 24 * 60,
    slurm_constraint: Annotated[Optional[str], typer.Option(help="Slurm: node constraint (features).")] = None,
    slurm_cpus: Annotated[int, typer.Option(help="Slurm: CPUs per job.")] = 8,
    slurm_mem_gb: Annotated[Optional[float], typer.Option(help="Slurm: memory per job in GB "
                                                          "(default: the partition's).")] = None,
    slurm_array_parallelism: Annotated[int, typer.Option(help="Slurm: at most this many jobs at once.")] = 32,
    slurm_signal_s: Annotated[int, typer.Option(help="Slurm: SIGUSR1 this many seconds before the time limit "
                                                "(the job checkpoints and requeues itself).")] = 300,
    slurm_extra: Annotated[Optional[list[str]], typer.Option(help="Slurm: another sbatch option as KEY=VALUE "
                                                             "(repeatable), e.g. mail-type=END.")] = None,
    wait: Annotated[bool, typer.Option(help="Slurm: wait for the jobs, showing each cell's state; "
                                       "--no-wait submits and returns.")] = True,
    allow_sqlite_on_cluster: Annotated[bool, typer.Option(
        "--allow-sqlite-on-cluster", help="Slurm: accept an SQLite registry. Risky: SQLite needs file locks, "
        "which network file systems (NFS) do not provide reliably, so jobs on several nodes can corrupt it "
        "or train a cell twice; only for jobs that all see a local file.")] = False,
) -> None:
    """Train and evaluate every (method, split, seed) cell of a run matrix.

    Cells already done in the registry are skipped and interrupted ones resumed;
    one cell runs per GPU at a time; a failed cell is recorded and the others go
    on. Ends with a summary table. With --executor slurm every cell left to do
    is one job of a Slurm job array; the registry still decides what runs.
    """
    from harness import matrix
    from harness.evaluate import parse_shots
    from methods import registry as methods_registry

    names = methods_registry.paper_names() if methods is None else [m for m in methods.split(",") if m.strip()]
    s = matrix.MatrixSettings(
        methods=tuple(m.strip().lower() for m in names), splits=matrix.parse_splits(splits),
        seeds=matrix.parse_ints(seeds, "seeds"), epochs=epochs, batch_size=batch_size, width=width,
        evaluate=evaluate,
        shots=parse_shots(shots), probe_epochs=probe_epochs, probe_family=probe_family,
        data_root=str(data_root), splits_root=str(splits_root) if splits_root else None,
        checkpoint_dir=str(checkpoint_dir), checkpoint_every=checkpoint_every, precision=precision,
        compile=compile, compile_mode=compile_mode, registry=registry, tags=tag or [],
        devices=tuple(d.strip() for d in devices.split(",")) if devices else (), options=tuple(set_ or ()))
    matrix.check_settings(s)  # every setting once, before any cell starts
    if executor == "local" and (not wait or allow_sqlite_on_cluster):
        fail(f"{'--no-wait' if not wait else '--allow-sqlite-on-cluster'} is for --executor slurm")
    if executor == "slurm":
        from harness import slurm
        ss = slurm.SlurmSettings(
            logs=str(slurm_logs), partition=slurm_partition, account=slurm_account, qos=slurm_qos,
            time_min=slurm_time, constraint=slurm_constraint, cpus_per_job=slurm_cpus, mem_gb=slurm_mem_gb,
            array_parallelism=slurm_array_parallelism, signal_s=slurm_signal_s,
            extra=slurm.parse_extra(slurm_extra))
        slurm.check_cluster_settings(s, ss, allow_sqlite=allow_sqlite_on_cluster)
        _run_on_slurm(s, ss, dry_run=dry_run, wait=wait)
        return
    reg = open_registry(registry)
    if dry_run:
        rows = [{"cell": c.label(), "action": action, "run": run_id,
                 "epochs to train": matrix.epochs_to_train(reg, action, run_id, s.target_epochs(c.method))}
                for c in matrix.cells_of(s) for action, run_id in [matrix.plan_cell(reg, c, s)]]
        typer.echo(format_table(rows, ["cell", "action", "run", "epochs to train"]))
        return
    stopped = None
    try:
        results = matrix.run_matrix(s, log=lambda m: typer.echo(m, err=True), progress=progress)
    except matrix.MatrixStopped as e:  # the workers checkpointed: say what each cell reached, then stop
        stopped, results = e, e.results
    rows = matrix.summary_rows(reg, results, s)
    typer.echo(format_table(rows, ["cell", "action", "run", "status", "full", "100-shot", "50-shot", "minutes",
                                   "s/epoch", "error"]))
    if stopped is not None:
        raise stopped
    failed = [r for r in results if r.exit_code not in (0, None)]
    if failed:
        fail(f"{len(failed)} of {len(results)} cells failed: {', '.join(r.cell.label() for r in failed)}")


def _executor_name(value: str) -> str:
    if value not in ("local", "slurm"):
        raise typer.BadParameter(f"{value!r}: choose local or slurm")
    return value


def _run_on_slurm(s, ss, dry_run: bool, wait: bool) -> None:
    from harness import matrix, slurm

    reg = open_registry(s.registry)
    if dry_run:
        rows = [{"cell": c.label(), "action": action, "run": run_id,
                 "epochs to train": matrix.epochs_to_train(reg, action, run_id, s.target_epochs(c.method)),
                 "submitted": "no" if action in ("skip", matrix.ELSEWHERE) else "yes"}
                for c in matrix.cells_of(s) for action, run_id in [matrix.plan_cell(reg, c, s)]]
        typer.echo(format_table(rows, ["cell", "action", "run", "epochs to train", "submitted"]))
        n = sum(1 for r in rows if r["submitted"] == "yes")
        typer.echo(f"\nSlurm parameters (submitit SlurmExecutor.update_parameters), one array of {n} job(s):")
        typer.echo(json.dumps(slurm.executor_parameters(ss), indent=2, sort_keys=True))
        typer.echo("\nsbatch header:")
        typer.echo(slurm.sbatch_header(ss, n))
        return
    submitted = slurm.submit(s, ss, log=lambda m: typer.echo(m, err=True))
    if not any(t.job_id for t in submitted):
        return
    if not wait:
        typer.echo("submitted; `harness runs list` shows progress, and the same command again (with --dry-run "
                   "to look only) resumes or skips each cell")
        return
    rows = slurm.wait(s, ss, submitted, log=lambda m: typer.echo(m, err=True), poll_s=slurm.poll_seconds())
    typer.echo(format_table(rows, ["cell", "job", "state", "run status", "node", "gpu", "attempts", "error"]))
    bad = [r["cell"] for r in rows if r["state"] in ("failed", "lost", "interrupted")]
    if bad:
        fail(f"{len(bad)} of {len(rows)} cells did not finish: {', '.join(bad)} (their logs: {ss.logs})")


# -- bench -----------------------------------------------------------------------------------

@app.command("bench", cls=MethodListHelp)
def bench_command(
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods to time, of {methods} "
                                                   "(default: the paper's {paper_methods}).")] = None,
    split: Annotated[str, typer.Option(help="Pretraining split to time on.")] = "1",
    data_root: DataFolderOpt = data_mod.DEFAULT_ROOT,
    splits_root: SplitsRootOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    batch_size: Annotated[int, typer.Option(help="Pretraining batch size (paper: 512).")] = 512,
    timed_epochs: Annotated[int, typer.Option(help="Epochs timed per method after 2 warm-up epochs.")] = 3,
    probe_epochs: Annotated[int, typer.Option(help="Probe epochs to time (paper: 500).")] = 500,
    profile: Annotated[bool, typer.Option("--profile", help="Also profile one more epoch per method: host and "
                                          "device ms per step for each phase (augment, forward+loss, "
                                          "backward, optimizer, prune, ...).")] = False,
    overlap: Annotated[bool, typer.Option(help="Augment the next batch while this one trains (on CUDA on a "
                                          "side stream); --no-overlap measures what that gains.")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON here "
                                                     "(device, versions, date and command included).")] = None,
) -> None:
    """Benchmark training and probe throughput and memory per method.

    Reports training images/s, s/epoch, the projected 2,000-epoch time and peak
    memory per method; the probe set's time; the backbone's compute limit,
    measured in the same process; and the authors' figures. Without a CUDA
    device it runs tiny settings and says so.
    """
    from harness.bench import BenchSettings, format_bench, run_bench, write_json
    from methods import registry as methods_registry

    names = tuple(methods_registry.paper_names() if methods is None else
                  [m.strip().lower() for m in methods.split(",") if m.strip()])
    for name in names:
        methods_registry.get(name)  # an unknown name: one line listing the registered ones
    s = BenchSettings(methods=names, split=split, data_root=str(data_root),
                      splits_root=str(splits_root) if splits_root else None, device=device,
                      precision=precision, compile=compile, compile_mode=compile_mode, batch_size=batch_size,
                      timed_epochs=timed_epochs, profile=profile, overlap_augment=overlap,
                      probe_epochs=probe_epochs)
    result = run_bench(s, log=lambda m: typer.echo(m, err=True))
    typer.echo(format_bench(result))
    if json_out:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

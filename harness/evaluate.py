"""Evaluate a checkpoint with the linear-probe protocol and log the scores to the registry.

`harness eval RUN_ID` probes a registry run's latest checkpoint; `harness eval --checkpoint
FILE` probes a bare file (ours, or the authors' with --format reference --method M) and
records it as an "external" run. Features are extracted once for every image any probe
needs; all probes (1 full-shot + 5 x 100-shot + 5 x 50-shot) then train as one batch.

torch, the probe code and the networks are imported inside the functions that use them, so
that `harness.cli` (which registers `eval_command` from here) starts without loading torch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, Sequence

import numpy as np
import typer

from harness.errors import HarnessError
from harness import data as data_mod
from harness import splits as splits_mod
from harness.groups import GroupRule
from harness.registry import Registry

if TYPE_CHECKING:  # annotations only; the real imports are deferred (see the module docstring)
    import torch

    from harness.probe import ProbeConfig

SHOT_KINDS = ("full", "100", "50")
FEW_SHOT_SUBSETS = (1, 2, 3, 4, 5)
FORMATS = ("ours", "reference")
REFERENCE_METHODS = ("simclr", "sdclr", "bcl-i", "bcl-d")  # the methods of the authors' code (their layouts)
SEED_OFFSET = {"full": 0, "100": 100, "50": 200}  # distinct probe seeds per (kind, subset)


class EvalError(HarnessError):
    """A checkpoint or request that cannot be evaluated; the message says why."""


# -- small pure helpers ----------------------------------------------------------------------

def parse_shots(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in items if s not in SHOT_KINDS]
    if bad or not items:
        raise EvalError(f"unknown shots {bad or items}; choose from {','.join(SHOT_KINDS)}")
    return tuple(s for s in SHOT_KINDS if s in items)  # canonical order, no duplicates


def probe_lists(shots: Sequence[str], family: str | None = None) -> list[tuple[str, int, str]]:
    """(kind, subset, split name) of every probe; the five few-shot lists whatever the pretraining split.

    `family` names a generated set (made by `harness splits make NAME`): NAME_full,
    NAME_100shot_1..5 and NAME_50shot_1..5, for datasets other than the paper's CIFAR-100."""
    out = []
    for kind in shots:
        if kind == "full":
            out.append(("full", 0, f"{family}_full" if family else "full_shot"))
        else:
            out += [(kind, k, f"{family}_{kind}shot_{k}" if family else f"split{k}_{kind}shot")
                    for k in FEW_SHOT_SUBSETS]
    return out


def probe_seed(kind: str, subset: int, base: int = 0) -> int:
    return 1000 * base + SEED_OFFSET[kind] + subset


def pick_device(device: str | None) -> torch.device:
    import torch

    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available on this machine")
    return dev


def summarize(results: list[dict]) -> dict[str, float]:
    """Full-shot top-1 and the mean top-1 of the k-shot subsets present."""
    out = {}
    for kind in SHOT_KINDS:
        vals = [r["top1"] for r in results if r["kind"] == kind]
        if vals:
            out[kind] = float(np.mean(vals))
    return out


# -- loading -----------------------------------------------------------------------------------

def _torch_load(path: Path) -> object:
    """weights_only=True: a checkpoint to evaluate may come from anywhere (see harness.safeio)."""
    from harness.safeio import load_torch

    return load_torch(path, EvalError)


def probed_network(method: str, config: dict, num_samples: int = 1) -> torch.nn.Module:
    """The network that `method` (from the method registry) probes, built from a checkpoint's recorded
    config (missing fields: the method's paper values), on the CPU."""
    from methods.base import build_method
    from methods.registry import MethodError, get

    try:
        entry = get(method)
    except MethodError as e:
        raise EvalError(f"the checkpoint's method is not registered here: {e} (install the package that "
                        "provides it)") from None
    width = config.get("width", 64)
    config = {**config, "width": width if isinstance(width, int) and not isinstance(width, bool) and width > 0
              else 64}
    try:
        cfg = entry.config_from_dict(config)
    except (TypeError, ValueError) as e:
        raise EvalError(f"the checkpoint's {method} config cannot be read: {e}") from None
    return build_method(entry.name, cfg, num_samples=max(int(num_samples or 1), 1), device="cpu").probed_network()


def load_model(path: Path, fmt: str = "ours", method: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The probed network and what the file says about itself (method, split, epoch, config)."""
    import torch

    from harness.reference import ReferenceFormatError, reference_network
    from harness.train import state_mismatch

    path = Path(path)
    if fmt not in FORMATS:
        raise EvalError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "reference":
        if method is None:
            raise EvalError("--format reference needs --method (one of " + ", ".join(REFERENCE_METHODS) + ")")
        if method not in REFERENCE_METHODS:
            raise EvalError(f"--format reference reads the authors' checkpoints of "
                            f"{', '.join(REFERENCE_METHODS)}, not {method!r}")
        obj = _torch_load(path)
        if isinstance(obj, dict) and "model" in obj and "method" in obj:
            raise EvalError(f"{path} is a harness checkpoint; use --format ours")
        try:
            net = reference_network(obj, method)
        except ReferenceFormatError as e:
            raise EvalError(f"{path}: {e}") from None
        epoch = obj.get("epoch") if isinstance(obj, dict) else None
        return net, {"method": method, "split": None, "epoch": epoch if isinstance(epoch, int) else None,
                     "config": {}, "dataset": None}
    obj = _torch_load(path)
    if not (isinstance(obj, dict) and "model" in obj and "method" in obj):
        hint = " (it looks like the authors' layout: add --format reference --method M)" \
            if isinstance(obj, dict) and ("state_dict" in obj or any(isinstance(v, torch.Tensor) for v in obj.values())) else ""
        raise EvalError(f"{path} is not a harness checkpoint: no 'model'/'method' entries{hint}")
    if method is not None and method != obj["method"]:
        raise EvalError(f"{path} holds a {obj['method']!r} model, not {method!r}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    num_samples = obj.get("num_samples") if isinstance(obj.get("num_samples"), int) else 1
    net = probed_network(str(obj["method"]), config, num_samples)
    problem = state_mismatch(net, obj["model"])
    if problem:
        raise EvalError(f"{path}: the weights under 'model' do not fit the network {obj['method']} probes: {problem}")
    net.load_state_dict(obj["model"])
    dataset = (obj.get("train_config") or {}).get("dataset") if isinstance(obj.get("train_config"), dict) else None
    return net, {"method": obj["method"], "split": obj.get("split"), "epoch": obj.get("epoch"),
                 "config": obj.get("config") or {}, "dataset": dataset if isinstance(dataset, str) else None}


# -- evaluation --------------------------------------------------------------------------------

def class_counts_for(split: str | None, data: data_mod.Dataset, splits_root: Path | None) -> np.ndarray | None:
    """Per-class counts of the pretraining split in `data` (None when the split is unknown)."""
    if not split:
        return None
    splits_mod.check_belongs(split, data)
    idx = splits_mod.load_split(split, splits_root, num_images=len(data.train_labels))
    return np.bincount(data.train_labels[idx], minlength=data.num_classes)


def balanced_test_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Positions of `limit` test images spread evenly over the classes (a seeded draw, round-robin
    over the classes in a shuffled order within each), sorted; every image when `limit` is None."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    rank = np.empty(n, dtype=np.int64)  # position of each image within its class, in a seeded order
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((labels, rank))  # all first images of each class, then all second ones, ...
    return np.sort(order[:limit])


@dataclass
class EvalPlan:
    """Everything an evaluation needs, loaded and checked before any feature is extracted."""
    data: data_mod.Dataset
    lists: list[tuple[str, int, str]]   # (kind, subset, split name) per probe
    indices: list[np.ndarray]           # each probe's training positions in the train set
    counts: np.ndarray | None           # the pretraining split's class counts (None: no groups)
    groups: GroupRule
    sizes: dict | None                  # classes per group
    test_idx: np.ndarray                # the test images scored (all, or --test-limit of them)
    family: str | None


def default_family(split: str | None, data: data_mod.Dataset) -> str | None:
    """The paper's lists for CIFAR-100; for another dataset the family its pretraining split came with."""
    if data.name == data_mod.PAPER_DATASET:
        return None
    names = {e.name for e in splits_mod.generated_entries()}
    if split and f"{split}_full" in names:
        return split
    raise EvalError(f"dataset {data.name!r} has no probe lists given: the paper's lists index CIFAR-100; pass "
                    f"--probe-family NAME (made by `harness splits make NAME --dataset {data.name}`)")


def plan_evaluation(split: str | None, data_root: Path, splits_root: Path | None, shots: Sequence[str],
                    dataset: str | None = None, probe_family: str | None = None,
                    groups: GroupRule | None = None, test_limit: int | None = None,
                    seed: int = 0) -> EvalPlan:
    """Load and check the data, the pretraining split, every probe list, the groups and the test
    subset: a probe that cannot run fails here, before the slow part."""
    from harness.groups import THIRDS, group_sizes

    if test_limit is not None and test_limit < 1:
        raise EvalError(f"--test-limit {test_limit}: must be at least 1 (omit it to score every test image)")
    name = dataset or (splits_mod.split_dataset(split) if split else None) or data_mod.PAPER_DATASET
    data = data_mod.load_dataset(data_root, name)
    counts = class_counts_for(split, data, splits_root)
    family = probe_family or default_family(split, data)
    lists = probe_lists(shots, family)
    n_train = len(data.train_labels)
    indices = []
    for kind, _, list_name in lists:
        try:
            splits_mod.check_belongs(list_name, data)
            idx = splits_mod.load_split(list_name, splits_root, num_images=n_train)
        except splits_mod.SplitError as e:
            if not str(e).startswith("unknown split"):
                raise
            what = "full-shot" if kind == "full" else f"{kind}-shot"
            raise EvalError(f"the {what} probes need the list {list_name!r}, which does not exist: leave "
                            f"{kind} out of --shots (e.g. --shots full), or make the lists (`harness splits "
                            f"make {family or 'NAME'} --shots {kind if kind != 'full' else '100,50'} ...`)") from None
        if len(idx) == 0:
            raise EvalError(f"probe list {list_name!r} is empty: nothing to train that probe on")
        indices.append(idx)
    rule = groups or THIRDS
    if rule.kind == "thirds" and data.num_classes < 3:
        rule = GroupRule("none")  # two classes make no three groups
    sizes = None
    if counts is not None and rule.kind != "none":
        sizes = group_sizes(counts, rule)
        empty = [g for g in ("many", "medium", "few") if sizes[g] == 0]
        if empty:
            raise EvalError(f"class groups ({rule.describe()}) leave {', '.join(empty)} empty for split {split!r} "
                            f"(many {sizes['many']}, medium {sizes['medium']}, few {sizes['few']} classes); "
                            "choose other thresholds with --groups counts:MANY,FEW, or --groups none")
    test_idx = balanced_test_subset(data.test_labels, test_limit, seed)
    return EvalPlan(data, lists, indices, counts, rule, sizes, test_idx, family)


def evaluate_network(net: torch.nn.Module, plan: EvalPlan, device: torch.device, cfg: ProbeConfig,
                     seed: int = 0, bf16: bool = False, progress: bool = True) -> list[dict]:
    """Extract features (once per needed image) and train/score every probe as one batch."""
    import torch
    from tqdm import tqdm

    from harness.probe import ProbeSpec, extract_features, run_probes

    data = plan.data
    needed = np.unique(np.concatenate(plan.indices))
    net = net.to(device)
    with tqdm(total=len(needed) + len(plan.test_idx), desc="features", unit="img", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        train_feats = extract_features(net, data.train_images[needed], device, bf16=bf16, on_batch=bar.update)
        test_feats = extract_features(net, data.test_images[plan.test_idx], device, bf16=bf16, on_batch=bar.update)
    train_labels = torch.as_tensor(data.train_labels[needed], device=device)
    test_labels = torch.as_tensor(data.test_labels[plan.test_idx], device=device)
    specs = [ProbeSpec(kind, subset, torch.as_tensor(np.searchsorted(needed, idx), device=device),
                       probe_seed(kind, subset, seed), {"list": name})
             for (kind, subset, name), idx in zip(plan.lists, plan.indices)]
    with tqdm(total=cfg.epochs, desc=f"{len(specs)} probes", unit="epoch", disable=not progress,
              file=sys.stderr) as bar:
        results = run_probes(specs, train_feats, train_labels, test_feats, test_labels, plan.counts, cfg,
                             on_epoch=lambda _: bar.update(1), num_classes=data.num_classes, groups=plan.groups)
    for r, s in zip(results, specs):
        r.update(list=s.extra["list"], seed=s.seed)
    return results


def probe_rows(results: list[dict], config: dict) -> list[dict]:
    return [{"kind": r["kind"], "subset": r["subset"], "top1": r["top1"], "top5": r["top5"], "many": r["many"],
             "medium": r["medium"], "few": r["few"], "std": r["std"], "per_class": r["per_class"],
             "config": {**config, "list": r["list"], "seed": r["seed"], "train_size": r["train_size"]}}
            for r in results]


def _evaluate(net: torch.nn.Module, plan: EvalPlan, split: str | None, checkpoint: Path, sha256: str, fmt: str,
              epochs: int, device: str | None, seed: int, bf16: bool, progress: bool, ck_epoch,
              test_limit: int | None) -> dict:
    """Compute every score of `plan` (nothing is written): the rows to log and the summary."""
    from harness.probe import ProbeConfig

    dev = pick_device(device)
    cfg = ProbeConfig(epochs=epochs)
    t0 = time.perf_counter()
    results = evaluate_network(net, plan, dev, cfg, seed, bf16, progress)
    d = plan.data
    config = {"epochs": cfg.epochs, "lr": cfg.lr, "final_lr": cfg.final_lr, "weight_decay": cfg.weight_decay,
              "batch_size": cfg.batch_size, "checkpoint": str(checkpoint), "checkpoint_sha256": sha256,
              "checkpoint_epoch": ck_epoch, "format": fmt, "device": str(dev), "bf16": bf16,
              "pretrain_split": split, "probe_family": plan.family or "paper",
              "dataset": d.name, "dataset_digest": d.digest(), "classes": d.num_classes,
              "groups": {**plan.groups.to_dict(), "sizes": plan.sizes},
              "test_limit": test_limit if len(plan.test_idx) < len(d.test_labels) else None,
              "test_images": int(len(plan.test_idx)), "test_images_total": int(len(d.test_labels))}
    return {"split": split, "checkpoint": str(checkpoint), "results": results, "rows": probe_rows(results, config),
            "summary": summarize(results), "time_s": time.perf_counter() - t0, "dataset": d.name,
            "test_images": config["test_images"], "test_images_total": config["test_images_total"],
            "groups": plan.groups, "sizes": plan.sizes}


EVAL_FAILED = "evaluation failed: "


def evaluate_run(registry: Registry, run_id: int, data_root: Path, splits_root: Path | None,
                 shots: Sequence[str] = SHOT_KINDS, epochs: int = 500, device: str | None = None,
                 seed: int = 0, bf16: bool = False, progress: bool = True,
                 probe_family: str | None = None, groups: GroupRule | None = None,
                 test_limit: int | None = None) -> dict:
    """Probe the latest checkpoint of registry run `run_id` and log the scores to that run (all in
    one transaction). Everything is checked before the compute; a failure after it is recorded in
    the run's error field, so a run without scores says why."""
    run = registry.get_run(run_id)
    ck = registry.latest_checkpoint(run_id)
    if ck is None:
        raise EvalError(f"run {run_id} has no checkpoint in the registry")
    path = Path(ck["path"])
    if not path.is_file():
        raise EvalError(f"checkpoint {path} of run {run_id} not found")
    sha = data_mod.sha256_file(path)
    if ck.get("sha256") and ck["sha256"] != sha:
        raise EvalError(f"checkpoint {path} of run {run_id} has sha256 {sha[:12]}…, the registry "
                        f"recorded {ck['sha256'][:12]}…; the file changed since it was written")
    net, info = load_model(path, "ours", run["method"])
    recorded = (run.get("config") or {}).get("dataset")
    plan = plan_evaluation(run["split"], data_root, splits_root, parse_shots(shots),
                           recorded if isinstance(recorded, str) else None, probe_family, groups, test_limit, seed)
    pick_device(device)
    try:
        out = _evaluate(net, plan, run["split"], path, sha, "ours", epochs, device, seed, bf16, progress,
                        info["epoch"] if info["epoch"] is not None else ck.get("epoch"), test_limit)
        cleared = {"error": None} if (run.get("error") or "").startswith(EVAL_FAILED) else {}
        registry.log_probes(run_id, out["rows"], **cleared)
    except Exception as e:
        try:
            registry.update_run(run_id, error=f"{EVAL_FAILED}{e.__class__.__name__}: {e}")
        except Exception:  # the registry itself failed: the original error says more
            pass
        raise
    return {**out, "run_id": run_id, "method": run["method"]}


def find_external_run(registry: Registry, sha256: str) -> int | None:
    """Re-evaluating the same file reuses its run row instead of adding a duplicate to the tables."""
    for r in registry.list_runs(tag="external"):
        if (r["config"] or {}).get("checkpoint_sha256") == sha256:
            return r["id"]
    return None


def evaluate_checkpoint(registry: Registry, checkpoint: Path, data_root: Path, splits_root: Path | None,
                        fmt: str = "ours", method: str | None = None, split: str | None = None,
                        shots: Sequence[str] = SHOT_KINDS, epochs: int = 500, device: str | None = None,
                        seed: int = 0, bf16: bool = False, progress: bool = True,
                        probe_family: str | None = None, dataset: str | None = None,
                        groups: GroupRule | None = None, test_limit: int | None = None) -> dict:
    """Probe a bare checkpoint file and log it as a run tagged "external". The scores are computed
    first; the run row is written with them, so a failed evaluation leaves no row behind."""
    checkpoint = Path(checkpoint)
    parse_shots(shots)  # fail before the slow part
    pick_device(device)
    net, info = load_model(checkpoint, fmt, method)
    method = info["method"]
    cfg = info["config"]
    dataset = dataset or info["dataset"]
    # the published reference models were pretrained on split 1 (of CIFAR-100)
    if not split and not info["split"] and dataset in (None, data_mod.PAPER_DATASET):
        split = "split1"
    split = split or info["split"]
    plan = plan_evaluation(split, data_root, splits_root, parse_shots(shots), dataset, probe_family, groups,
                           test_limit, seed)
    sha = data_mod.sha256_file(checkpoint)
    out = _evaluate(net, plan, split, checkpoint, sha, fmt, epochs, device, seed, bf16, progress, info["epoch"],
                    test_limit)
    run_id = find_external_run(registry, sha)
    if run_id is None:
        seed_ = cfg.get("seed")  # -1: unknown (the authors' files do not say)
        run_id = registry.create_run(method, split or "", seed=seed_ if isinstance(seed_, int) else -1,
                                     epochs=int(cfg.get("epochs") or info["epoch"] or 0),
                                     config={"checkpoint": str(checkpoint), "checkpoint_sha256": sha,
                                             "format": fmt, "source_config": cfg, "dataset": plan.data.name,
                                             "dataset_info": plan.data.identity()},
                                     tags=["external"], status="pending")
    registry.log_probes(run_id, out["rows"], status="done", epochs_done=int(info["epoch"] or 0))
    return {**out, "run_id": run_id, "method": method}


# -- command -----------------------------------------------------------------------------------

def format_results(out: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.2f}"
    lines = [f"run {out['run_id']} ({out['method']}, dataset {out['dataset']}, pretrain split {out['split']}): "
             f"{out['checkpoint']}"]
    if out["test_images"] < out["test_images_total"]:
        lines.append(f"scored on {out['test_images']} of {out['test_images_total']} test images (--test-limit): "
                     "a quick look, marked as such in reports")
    if out.get("sizes"):
        z = out["sizes"]
        lines.append(f"class groups ({out['groups'].describe()}): many {z['many']}, medium {z['medium']}, "
                     f"few {z['few']} classes")
    lines += [f"{'probe':<10}{'top1':>8}{'top5':>8}{'many':>8}{'medium':>8}{'few':>8}{'std':>8}"]
    for r in out["results"]:
        name = "full" if r["kind"] == "full" else f"{r['kind']}/{r['subset']}"
        lines.append(f"{name:<10}" + "".join(f"{f(r[k]):>8}" for k in ("top1", "top5", "many", "medium", "few", "std")))
    lines.append("top-1: " + ", ".join(f"{k}-shot {v:.2f}" if k != "full" else f"full-shot {v:.2f}"
                                      for k, v in out["summary"].items()) + f"  ({out['time_s']:.1f} s)")
    return "\n".join(lines)


def eval_command(
    run_id: Annotated[Optional[int], typer.Argument(
        help="Registry run to evaluate (its latest checkpoint). Omit when using --checkpoint.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Evaluate this checkpoint file instead; it is recorded as a run tagged 'external'.")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="Checkpoint layout: 'ours' (harness training loop) or 'reference' "
                         "(the authors' MediaBrain-SJTU/BCL files; needs --method).")] = "ours",
    method: Annotated[Optional[str], typer.Option(
        "--method", help="The checkpoint's method, one of {methods} (required with --format reference, "
                         "which reads the authors' simclr, sdclr, bcl-i and bcl-d files).")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Pretraining split of a --checkpoint model, for the Many/Medium/Few groups "
                        "(default: from the checkpoint, else split1 for CIFAR-100).")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Dataset of a --checkpoint model (default: the one its split records, else "
                          "cifar100); a registry run uses its own.")] = None,
    groups: Annotated[str, typer.Option(
        "--groups", help="Many/Medium/Few: thirds (the paper's: classes sorted by their count in the "
                         "pretraining split, smallest third Few, next Medium, rest Many), counts:MANY,FEW "
                         "(Many: more than MANY images, Few: fewer than FEW, e.g. counts:100,20), or none.")]
    = "thirds",
    test_limit: Annotated[Optional[int], typer.Option(
        "--test-limit", help="Score on N test images only (spread evenly over the classes), for a quick "
                             "look; recorded with the scores and marked in reports.")] = None,
    shots: Annotated[str, typer.Option(
        "--shots", help="Comma-separated probes: full (40,000 images), 100 and 50 (five lists each).")] = "full,100,50",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Probe training epochs (the protocol: 500).")] = 500,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Torch device, e.g. cuda, cuda:1, cpu (default: cuda when available).")] = None,
    data_root: Annotated[Path, typer.Option(
        "--data-root", help="Folder of the datasets (cifar-100-python/, NAME/).")] = data_mod.DEFAULT_ROOT,
    splits_root: Annotated[Optional[Path], typer.Option(
        "--splits-root", help=f"Folder of the paper's split files (default: ${splits_mod.ENV_VAR} or splits/paper).")] = None,
    registry: Annotated[Optional[str], typer.Option(
        "--registry", help="SQLAlchemy URL of the result registry (default: $HARNESS_REGISTRY or "
                           "sqlite:///results/registry.db).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed of the probes' init and batch order.")] = 0,
    bf16: Annotated[bool, typer.Option("--bf16", help="Extract features under bf16 autocast (CUDA only).")] = False,
    probe_family: Annotated[Optional[str], typer.Option(
        "--probe-family", help="Probe lists of a generated family NAME (made by `harness splits make NAME`) "
                               "instead of the paper's; for other datasets and smoke runs.")] = None,
) -> None:
    """Linear-probe a model and log its scores to the registry.

    The protocol: frozen features; 1 full-shot, 5 x 100-shot and
    5 x 50-shot probes trained together; scores are top-1/5, per class and
    Many/Medium/Few. RUN_ID probes a registry run's latest checkpoint;
    --checkpoint FILE probes a bare file and records it as a run tagged
    'external'.
    """
    from harness.reference import ReferenceFormatError

    if run_id is None and checkpoint is None:
        raise EvalError("say what to evaluate: a RUN_ID (see `harness runs list`) or --checkpoint FILE")
    if run_id is not None and checkpoint is not None:
        raise EvalError("give a RUN_ID or --checkpoint FILE, not both")
    if fmt not in FORMATS:
        raise EvalError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
    if method is not None:
        from methods.registry import MethodError, get
        try:
            method = get(method).name
        except MethodError as e:
            raise EvalError(f"--method: {e}") from None
    from harness.groups import parse_groups

    try:
        rule = parse_groups(groups)
    except ValueError as e:
        raise EvalError(f"--{e}") from None
    if run_id is not None and dataset is not None:
        raise EvalError("--dataset is for --checkpoint files; a registry run is evaluated on its own dataset")
    try:
        reg = Registry(registry)
        if run_id is not None:
            out = evaluate_run(reg, run_id, data_root, splits_root, parse_shots(shots), epochs, device, seed, bf16,
                               probe_family=probe_family, groups=rule, test_limit=test_limit)
        else:
            out = evaluate_checkpoint(reg, checkpoint, data_root, splits_root, fmt, method, split,
                                      parse_shots(shots), epochs, device, seed, bf16, probe_family=probe_family,
                                      dataset=dataset, groups=rule, test_limit=test_limit)
    except ReferenceFormatError as e:
        raise EvalError(str(e)) from None
    typer.echo(format_results(out))

"""`harness export`: copies of the registry's runs in the tools researchers already use.

The registry stays the source of truth; an export is plain and can be repeated:

- `harness export tensorboard DIR`: one folder per run (`run<id>_<method>_<split>_seed<seed>`) of
  TensorBoard event files: per-epoch training metrics (loss, lr, images/s, epoch time, the BCL
  weight quantiles, the kNN monitor) at the epoch's original wall time, the probe scores as
  scalars, and the run's settings with its probe scores as hparams. Exporting again rewrites the
  folders it wrote (each carries a marker file) and refuses to touch any other.
- `harness export mlflow --tracking-uri URI`: one MLflow run per registry run, found again by its
  tags `harness.registry` + `harness.run_id`, so exporting twice adds nothing twice: params (the
  config, flattened), per-epoch metrics with their original timestamps, probe scores, the
  environment and the checkpoint as tags (a reference to the file and its sha256; the file is not
  copied). MLflow's telemetry is switched off before it is imported.

torch, tensorboard, mlflow and pandas are imported inside the functions that use them.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from harness.errors import HarnessError, mask_secrets

if TYPE_CHECKING:
    from harness.registry import Registry


class ExportError(HarnessError):
    """An export that cannot be done; the message says what to do."""


MARKER = ".harness-export"  # in every folder `export tensorboard` wrote: it may rewrite those only
EPOCH_METRICS = {"loss": "train/loss", "lr": "train/lr", "images_per_s": "train/images_per_s",
                 "epoch_time_s": "train/epoch_time_s", "weight_mean": "bcl/weight_mean",
                 **{f"weight_q{q}": f"bcl/weight_q{q}" for q in (10, 25, 50, 75, 90)}}
EXTRA_PREFIX = {"knn_top1": "monitor/knn_top1"}  # other numeric extras: extra/<name>
PROBE_FIELDS = ("top1", "top5", "many", "medium", "few", "std")
MLFLOW_STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "running": "RUNNING",
                 "pending": "SCHEDULED"}
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call


# -- selecting runs ----------------------------------------------------------------------------

def parse_run_ids(text: str | None) -> list[int] | None:
    """'1,3,5-7' -> [1, 3, 5, 6, 7]; None or empty: every run."""
    if not text or not text.strip():
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ExportError(f"--runs {text!r}: {part!r} is not a run id or a range like 3-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi - lo > 1_000_000:
            raise ExportError(f"--runs {text!r}: the range {part} is too long")
        ids += range(lo, hi + 1)
    return sorted(set(ids))


def select_runs(reg: Registry, ids: list[int] | None) -> list[dict]:
    runs = reg.list_runs()
    if ids is None:
        return runs
    have = {r["id"] for r in runs}
    missing = [i for i in ids if i not in have]
    if missing:
        raise ExportError(f"no run with id {', '.join(map(str, missing[:10]))}; `harness runs list` shows the runs")
    return [r for r in runs if r["id"] in set(ids)]


# -- what a run exports (pure) -----------------------------------------------------------------

def safe_name(s: Any) -> str:
    """A user string (method, split) as a file-name part: letters, digits, '-', '.', '_' only."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("._")[:60]
    return out or "_"


def run_folder(run: dict) -> str:
    return f"run{int(run['id'])}_{safe_name(run['method'])}_{safe_name(run['split'])}_seed{int(run['seed'])}"


def utc_seconds(dt: datetime) -> float:
    """The registry's naive UTC datetimes as POSIX seconds."""
    return dt.replace(tzinfo=timezone.utc).timestamp() if dt.tzinfo is None else dt.timestamp()


def epoch_times(run: dict, epochs: list[dict]) -> list[float]:
    """Each epoch row's wall time (POSIX seconds): when it was logged (schema 4), else, for older rows,
    the run's start plus the epochs' summed durations (a stop's pause is then not seen)."""
    start = run.get("started_at") or run.get("created_at") or datetime(1970, 1, 1)
    t, out = utc_seconds(start), []
    for e in epochs:
        t += float(e.get("epoch_time_s") or 0.0)
        out.append(utc_seconds(e["logged_at"]) if e.get("logged_at") else t)
    return out


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def epoch_series(run: dict, epochs: list[dict]) -> list[tuple[str, int, float, float]]:
    """(metric key, epoch, value, wall time s) of every finite per-epoch value."""
    out = []
    for e, t in zip(epochs, epoch_times(run, epochs)):
        for col, key in EPOCH_METRICS.items():
            if finite(e.get(col)):
                out.append((key, int(e["epoch"]), float(e[col]), t))
        for k, v in (e.get("extra") or {}).items():
            if finite(v):
                out.append((EXTRA_PREFIX.get(k, f"extra/{safe_name(k)}"), int(e["epoch"]), float(v), t))
    return out


def probe_scores(probes: list[dict]) -> dict[str, tuple[float, float]]:
    """{'probe/<kind>/<field>': (value, wall time s)}: each kind's scores averaged over its subsets
    (as the tables do), at the time of its latest score; `probe/<kind>/subsets` counts them."""
    out: dict[str, tuple[float, float]] = {}
    kinds: dict[str, list[dict]] = {}
    for p in probes:
        kinds.setdefault(p["kind"], []).append(p)
    for kind, ps in kinds.items():
        t = max(utc_seconds(p["created_at"]) for p in ps if p.get("created_at")) if any(
            p.get("created_at") for p in ps) else 0.0
        for f in PROBE_FIELDS:
            vals = [float(p[f]) for p in ps if finite(p.get(f))]
            if vals:
                out[f"probe/{kind}/{f}"] = (sum(vals) / len(vals), t)
        out[f"probe/{kind}/subsets"] = (float(len(ps)), t)
    return out


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (method.lr, ...)."""
    out: dict[str, Any] = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def hparams_of(run: dict) -> dict[str, Any]:
    """The run's identity and scalar settings, as TensorBoard's hparams take them."""
    hp: dict[str, Any] = {"method": str(run["method"]), "split": str(run["split"]), "seed": int(run["seed"]),
                          "status": str(run["status"]), "epochs": int(run["epochs"])}
    for k, v in flat_config(run.get("config")).items():
        if isinstance(v, bool) or isinstance(v, str) or finite(v):
            hp[k] = v
    return hp


def param_value(v: Any) -> str | None:
    """A config value as an MLflow param (a string of at most 6,000 characters); None to leave it out."""
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 6000 else None


# -- TensorBoard -------------------------------------------------------------------------------

def export_tensorboard(reg: Registry, folder: Path, ids: list[int] | None = None) -> list[Path]:
    """Write one event-file folder per selected run under `folder`; returns the folders."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as e:
        raise ExportError(f"TensorBoard export needs the tensorboard package ({e}); pip install tensorboard") from None
    runs = select_runs(reg, ids)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        target = folder / run_folder(run)
        if target.exists() and not (target / MARKER).is_file():
            raise ExportError(f"{target} exists and was not written by `harness export`: remove it or choose "
                              "another folder")
        tmp = folder / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        epochs = reg.epochs(run["id"])
        probes = reg.probes(run["id"])
        writer = SummaryWriter(log_dir=str(tmp))
        try:
            for key, step, value, t in epoch_series(run, epochs):
                writer.add_scalar(key, value, global_step=step, walltime=t)
            scores = probe_scores(probes)
            step = int(run.get("epochs_done") or 0)
            for key, (value, t) in scores.items():
                writer.add_scalar(key, value, global_step=step, walltime=t or None)
            # hparams in this run's own folder (SummaryWriter.add_hparams would open a sub-run)
            exp, ssi, sei = hparams(hparams_of(run), {k: v for k, (v, _) in scores.items()})
            fw = writer._get_file_writer()
            for summary in (exp, ssi, sei):
                fw.add_summary(summary)
        finally:
            writer.close()
        (tmp / MARKER).write_text(json.dumps({"run_id": run["id"], "registry": registry_identity(reg.url)}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        written.append(target)
    return written


# -- MLflow ------------------------------------------------------------------------------------

def registry_identity(url: str) -> str:
    """How exports name the registry a run came from: the SQLite file's absolute path, else the URL
    without its password (the same registry reached twice gets the same name)."""
    from sqlalchemy.engine import make_url

    from harness.registry import _safe

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - a URL the registry accepted parses; be safe anyway
        return _safe(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return f"sqlite:///{Path(u.database).resolve()}"
    return u.render_as_string(hide_password=True)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def import_mlflow():
    """(MlflowClient, Metric, Param, RunTag), with MLflow's telemetry switched off before the import."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # nothing leaves the machine
    os.environ["DO_NOT_TRACK"] = "true"
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ExportError(f"MLflow export needs the optional extra ({e}): pip install '.[mlflow]'") from None
    return MlflowClient, Metric, Param, RunTag


def run_tags(run: dict, registry: str, checkpoint: dict | None) -> dict[str, str]:
    tags = {"harness.registry": registry, "harness.run_id": str(run["id"]), "harness.method": str(run["method"]),
            "harness.split": str(run["split"]), "harness.seed": str(run["seed"]), "harness.status": str(run["status"]),
            "harness.epochs_done": str(run.get("epochs_done") or 0), "harness.wall_time_s": str(run.get("wall_time_s") or 0),
            "mlflow.runName": f"{run['method']} {run['split']} seed {run['seed']} (#{run['id']})"}
    if run.get("device"):
        tags["harness.device"] = str(run["device"])
    if run.get("git_rev"):
        tags["mlflow.source.git.commit"] = str(run["git_rev"])
    if run.get("tags"):
        tags["harness.tags"] = ",".join(run["tags"])
    if run.get("error"):
        tags["harness.error"] = str(run["error"])[:5000]
    for k, v in (run.get("versions") or {}).items():
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            tags[f"harness.env.{safe_name(k)}"] = str(v)
    resumes = (run.get("versions") or {}).get("resumes") or []
    if resumes:
        tags["harness.resumes"] = str(len(resumes))
    if checkpoint:  # a reference: the file stays where training wrote it
        path = Path(checkpoint["path"])
        tags["harness.checkpoint.path"] = str(path)
        tags["harness.checkpoint.uri"] = path.resolve().as_uri() if path.is_absolute() else str(path)
        if checkpoint.get("sha256"):
            tags["harness.checkpoint.sha256"] = str(checkpoint["sha256"])
        if checkpoint.get("epoch") is not None:
            tags["harness.checkpoint.epoch"] = str(checkpoint["epoch"])
    return tags


def find_mlflow_run(client, experiment_id: str, registry: str, run_id: int):
    """The MLflow run exported from this registry's run before, if any (the registry is compared here,
    not in the filter string, so no path needs quoting)."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`harness.run_id` = '{int(run_id)}'",
                               max_results=1000)
    mine = [r for r in found if r.data.tags.get("harness.registry") == registry]
    return mine[0] if mine else None


def export_mlflow(reg: Registry, tracking_uri: str, experiment: str = "bcl-harness",
                  ids: list[int] | None = None) -> list[tuple[int, str, str, int]]:
    """Create or bring up to date one MLflow run per selected registry run; returns
    (registry run id, MLflow run id, 'created' or 'updated', metric values added) per run."""
    MlflowClient, Metric, Param, RunTag = import_mlflow()
    from mlflow.exceptions import MlflowException

    runs = select_runs(reg, ids)
    try:
        return _export_mlflow(reg, MlflowClient(tracking_uri=tracking_uri), experiment, runs, Metric, Param, RunTag)
    except MlflowException as e:
        lines = str(e).strip().splitlines() or [e.__class__.__name__]
        raise ExportError(f"MLflow tracking store {mask_secrets(tracking_uri)}: {mask_secrets(lines[0])[:300]}") from None


def _export_mlflow(reg: Registry, client, experiment: str, runs: list[dict], Metric, Param, RunTag):
    """export_mlflow's work; a metric value already there (same key, step, time and value) is not sent again."""
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    registry = registry_identity(reg.url)
    out = []
    for run in runs:
        epochs, probes = reg.epochs(run["id"]), reg.probes(run["id"])
        existing = find_mlflow_run(client, experiment_id, registry, run["id"])
        start = run.get("started_at") or run.get("created_at")
        if existing is None:
            mr = client.create_run(experiment_id, start_time=_ms(utc_seconds(start)) if start else None)
            mlflow_id, action, have_params, logged = mr.info.run_id, "created", {}, {}
        else:
            mlflow_id, action, have_params = existing.info.run_id, "updated", dict(existing.data.params)
            logged = {k: {(m.step, m.timestamp, m.value) for m in client.get_metric_history(mlflow_id, k)}
                      for k in existing.data.metrics}
        metrics = [Metric(k, v, _ms(t), step) for k, step, v, t in epoch_series(run, epochs)]
        step = int(run.get("epochs_done") or 0)
        metrics += [Metric(k, v, _ms(t), step) for k, (v, t) in probe_scores(probes).items()]
        new = [m for m in metrics if (m.step, m.timestamp, m.value) not in logged.get(m.key, ())]
        # MLflow refuses to change a logged param: only settings not there yet are sent
        params = [Param(k, pv) for k, v in flat_config(run.get("config")).items()
                  if k not in have_params and (pv := param_value(v)) is not None]
        tags = [RunTag(k, v) for k, v in run_tags(run, registry, reg.latest_checkpoint(run["id"])).items()]
        client.log_batch(mlflow_id, tags=tags)
        for i in range(0, len(params), 100):  # MLflow's limits per call: 100 params, 1,000 metrics
            client.log_batch(mlflow_id, params=params[i:i + 100])
        for i in range(0, len(new), MLFLOW_BATCH):
            client.log_batch(mlflow_id, metrics=new[i:i + MLFLOW_BATCH])
        status = MLFLOW_STATUS.get(run["status"], "RUNNING")
        if status in ("FINISHED", "FAILED", "KILLED"):
            end = run.get("finished_at") or (start + timedelta(seconds=float(run.get("wall_time_s") or 0))
                                             if start else None)
            client.set_terminated(mlflow_id, status, end_time=_ms(utc_seconds(end)) if end else None)
        else:
            client.update_run(mlflow_id, status=status)
        out.append((run["id"], mlflow_id, action, len(new)))
    return out


# -- command -----------------------------------------------------------------------------------

export_app = typer.Typer(help="Copy registry runs to TensorBoard event files or an MLflow tracking store.",
                         no_args_is_help=True)
RunsOpt = Annotated[Optional[str], typer.Option("--runs", help="Run ids, e.g. 1,3,5-7 (default: every run).")]
RegistryOpt = Annotated[Optional[str], typer.Option(
    "--registry", help="SQLAlchemy URL of the result registry (default: $HARNESS_REGISTRY or "
                       "sqlite:///results/registry.db).")]


@export_app.command("tensorboard")
def tensorboard_command(
    folder: Annotated[Path, typer.Argument(help="Folder for the event files: one sub-folder per run.")],
    runs: RunsOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Write TensorBoard event files: per-epoch metrics, BCL weight quantiles, probe scores as hparams.

    View them with `tensorboard --logdir FOLDER`. Exporting again rewrites the runs' folders.
    """
    from harness.registry import Registry

    ids = parse_run_ids(runs)
    for path in export_tensorboard(Registry(registry), folder, ids):
        typer.echo(f"wrote {path}")


@export_app.command("mlflow")
def mlflow_command(
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking URI, e.g. "
                                              "sqlite:///mlflow.db or http://host:5000.")],
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment to export into.")] = "bcl-harness",
    runs: RunsOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Export runs to MLflow: params, per-epoch metrics at their times, probe scores, checkpoint refs.

    Needs the optional extra: pip install '.[mlflow]'. A run exported before is updated, never
    duplicated. MLflow's telemetry is switched off.
    """
    from harness.registry import Registry

    ids = parse_run_ids(runs)
    for rid, mlflow_id, action, n in export_mlflow(Registry(registry), tracking_uri, experiment, ids):
        typer.echo(f"run {rid}: {action} MLflow run {mlflow_id} ({n} metric values added)")

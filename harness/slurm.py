"""`harness run --executor slurm`: the run matrix as one Slurm job array (submitit), one GPU per job.

The executor only decides *where* a cell runs: every job runs `matrix.run_cell`, so the registry
decides *what* runs exactly as locally (done cells skipped, interrupted ones resumed, a cell
claimed by a live process elsewhere left alone). Cells that plan_cell already calls skip or
"running elsewhere" are not submitted at all.

Pre-emption and time limits: jobs are submitted with `--signal=USR1@<signal_s>`. The trainer turns
SIGUSR1 (and SIGTERM) into a checkpoint and status interrupted; the job body then hands the signal
to submitit's handler, which calls `CellJob.checkpoint()` (a DelayedSubmission of the same job:
the registry knows where the cell stopped) and requeues the job with `scontrol requeue`. A job
requeued or cancelled by Slurm itself gets SIGTERM: the trainer checkpoints, the cell is left
interrupted, and a requeued job resumes it when it starts again.

Each job writes what it did (job id, node, CUDA_VISIBLE_DEVICES, log paths, start and end, outcome)
to `<logs>/cells/<cell>.json` and, once the cell has a run, to the run's `versions["slurm"]` list
and an artifact row of kind "slurm-log" (the job's stdout log). Waiting reads those files, the
registry and squeue; it never blocks on `job.result()` (without accounting that hangs on a
cancelled job).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError, mask_secrets
from harness.matrix import ELSEWHERE, Cell, MatrixSettings, cell_runs, cell_status, cells_of, plan_cell, run_cell
from harness.registry import Registry, RegistryError, resolve_url

SQLITE_RISK = ("SQLite on a cluster relies on file locking over the shared file system, which NFS and "
               "similar file systems do not provide reliably: concurrent jobs can corrupt the registry "
               "or train a cell twice. Use a PostgreSQL registry (--registry postgresql://...)")


class SlurmError(HarnessError, ValueError):
    """Bad Slurm settings or shared paths; the message says what to fix."""


@dataclass
class SlurmSettings:
    logs: str = "slurm-logs"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 24 * 60
    constraint: str | None = None
    cpus_per_job: int = 8
    mem_gb: float | None = None
    array_parallelism: int = 32
    signal_s: int = 300           # SIGUSR1 this many seconds before the time limit
    max_requeues: int = 20        # time-outs a cell may be requeued after (submitit's max_num_timeout)
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options (slurm_additional_parameters)
    job_name: str = "harness"


def parse_extra(items: list[str] | None) -> dict[str, str]:
    """--slurm-extra KEY=VALUE (repeatable; a leading -- is dropped) -> {key: value}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise SlurmError(f"--slurm-extra {item!r}: write an sbatch option as KEY=VALUE, e.g. "
                             "--slurm-extra mail-type=END")
        out[key] = value
    return out


def _submitit():
    try:
        import submitit
    except ImportError:
        raise SlurmError("--executor slurm needs submitit: pip install 'bcl-harness[slurm]'") from None
    return submitit


def check_cluster_settings(s: MatrixSettings, ss: SlurmSettings, allow_sqlite: bool = False) -> None:
    """Refuse what cannot work on a cluster, before anything is submitted."""
    _submitit()
    url = resolve_url(s.registry)
    if url.startswith("sqlite") and not allow_sqlite:
        raise SlurmError(f"--executor slurm with an SQLite registry: {SQLITE_RISK}; or pass "
                         "--allow-sqlite-on-cluster if every job runs where the file's locks work")
    if s.devices:
        raise SlurmError("--devices is for --executor local; a Slurm job uses the GPU Slurm gives it")
    for name, value in (("--slurm-time", ss.time_min), ("--slurm-cpus", ss.cpus_per_job),
                        ("--slurm-array-parallelism", ss.array_parallelism)):
        if value < 1:
            raise SlurmError(f"{name} {value}: must be at least 1")
    if ss.mem_gb is not None and ss.mem_gb <= 0:
        raise SlurmError(f"--slurm-mem-gb {ss.mem_gb}: must be positive")
    if not 0 < ss.signal_s < ss.time_min * 60:
        raise SlurmError(f"--slurm-signal-s {ss.signal_s}: must be positive and shorter than the time limit "
                         f"({ss.time_min * 60} s)")
    problems = shared_path_problems(s, ss)
    if problems:
        raise SlurmError("shared paths: " + "; ".join(problems))


def shared_path_problems(s: MatrixSettings, ss: SlurmSettings) -> list[str]:
    """What is wrong with the folders every job needs (checked from the submitting host: a path
    the compute nodes do not mount cannot be seen from here)."""
    out: list[str] = []
    for what, p in (("data root", s.data_root), ("splits root", s.splits_root)):
        if p is None:
            continue
        path = Path(p)
        if not path.is_dir():
            out.append(f"{what} {path} does not exist (or is not a folder)")
        elif not os.access(path, os.R_OK | os.X_OK):
            out.append(f"{what} {path} is not readable")
    for what, p in (("checkpoint dir", s.checkpoint_dir), ("log folder (--slurm-logs)", ss.logs)):
        path = Path(p)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            out.append(f"{what} {path} cannot be created: {e.strerror or e}")
            continue
        if not os.access(path, os.W_OK | os.X_OK):
            out.append(f"{what} {path} is not writable")
    return out


def absolute_settings(s: MatrixSettings) -> MatrixSettings:
    """The settings with every path absolute: a job may start in another working directory."""
    from dataclasses import replace
    url = resolve_url(s.registry)
    m = re.match(r"^(sqlite[^:]*:///)(?!/)(.+)$", url)
    if m and m.group(2) != ":memory:":
        url = m.group(1) + str(Path(m.group(2)).resolve())
    return replace(s, registry=url, data_root=str(Path(s.data_root).resolve()),
                   splits_root=str(Path(s.splits_root).resolve()) if s.splits_root else None,
                   checkpoint_dir=str(Path(s.checkpoint_dir).resolve()))


def executor_parameters(ss: SlurmSettings) -> dict[str, Any]:
    """What is passed to submitit's SlurmExecutor.update_parameters (one GPU, one task per job)."""
    params: dict[str, Any] = {
        "job_name": ss.job_name, "time": ss.time_min, "nodes": 1, "ntasks_per_node": 1, "gpus_per_node": 1,
        "cpus_per_task": ss.cpus_per_job, "array_parallelism": ss.array_parallelism,
        "signal_delay_s": ss.signal_s, "stderr_to_stdout": False,
        # the job's submitit handles USR1 (its default is USR2): the trainer's stop signal
        "setup": ["export SUBMITIT_PREEMPT_SIGNAL=USR1"],
        "additional_parameters": {"signal": f"USR1@{ss.signal_s}", **ss.extra},
    }
    for key, value in (("partition", ss.partition), ("account", ss.account), ("qos", ss.qos),
                       ("constraint", ss.constraint)):
        if value:
            params[key] = value
    if ss.mem_gb is not None:
        params["mem"] = f"{int(ss.mem_gb * 1024)}MB"
    return params


def sbatch_header(ss: SlurmSettings, n_jobs: int) -> str:
    """The #SBATCH lines submitit will write for this array (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string
    text = _make_sbatch_string(command="<python -m submitit.core._submit ...>",
                               folder=str(Path(ss.logs).resolve()), map_count=n_jobs,
                               **executor_parameters(ss))
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH") or line.startswith("export"))


# -- the job ---------------------------------------------------------------------------------------

def cell_file(logs: str | Path, cell: Cell) -> Path:
    return Path(logs) / "cells" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", cell.label()) + ".json")


def read_attempts(logs: str | Path, cell: Cell) -> list[dict]:
    try:
        return json.loads(cell_file(logs, cell).read_text())
    except (OSError, ValueError):
        return []


def _write_attempts(logs: str | Path, cell: Cell, attempts: list[dict]) -> None:
    path = cell_file(logs, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(attempts, indent=1))
    os.replace(tmp, path)


try:  # the job class must subclass Checkpointable; without submitit the local executor still works
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object  # type: ignore[misc,assignment]


class CellJob(_Checkpointable):
    """The body of every job of the array, called with its cell (map_array). Checkpointable: on
    SIGUSR1 submitit calls `checkpoint(cell)`, which resubmits the same call (the registry says
    where the cell stopped), and requeues the job."""

    def __init__(self, s: MatrixSettings, logs: str):
        self.s, self.logs = s, logs

    def __call__(self, cell: Cell) -> str:
        self.cell = cell
        import torch
        env = _job_env()
        attempt = {"job_id": env.get("job_id"), "node": socket.gethostname(),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "stdout": env.get("stdout"), "stderr": env.get("stderr"), "started": time.time(),
                   "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Slurm chose the GPU already
        try:
            action = run_cell(self.cell, self.s, device)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            self._record(attempt, "interrupted" if code > 128 else "failed", f"exit {code}")
            if code == 128 + signal.SIGUSR1:  # the trainer checkpointed: now submitit requeues this job
                handler = signal.getsignal(signal.SIGUSR1)
                if callable(handler):
                    handler(signal.SIGUSR1, None)
            raise
        except BaseException as e:
            self._record(attempt, "failed", mask_secrets(f"{e.__class__.__name__}: {e}"))
            raise
        self._record(attempt, action, None)
        return action

    def _record(self, attempt: dict, outcome: str, error: str | None) -> None:
        attempt.update(ended=time.time(), outcome=outcome, error=error)
        try:
            _write_attempts(self.logs, self.cell, read_attempts(self.logs, self.cell) + [attempt])
        except OSError as e:
            print(f"harness: could not write the cell's job record: {e}", file=sys.stderr)
        if outcome == ELSEWHERE:  # the cell's run belongs to another process
            return
        try:  # link the job from the cell's run in the registry
            reg = Registry(self.s.registry)
            c = self.cell
            runs = cell_runs(reg, c, self.s)
            if not runs:
                return
            run = runs[-1]
            versions = dict(run.get("versions") or {})
            versions["slurm"] = list(versions.get("slurm") or []) + [attempt]
            reg.update_run(run["id"], versions=versions)
            if attempt.get("stdout"):
                reg.add_artifact(run["id"], "slurm-log", attempt["stdout"])
        except (RegistryError, OSError) as e:
            print(f"harness: could not link the job from the registry: {e}", file=sys.stderr)

    def checkpoint(self, cell: Cell):
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(CellJob(self.s, self.logs), cell)


def _job_env() -> dict:
    try:
        import submitit
        env = submitit.JobEnvironment()
        paths = env.paths
        return {"job_id": env.job_id, "stdout": str(paths.stdout).replace("%t", "0"),
                "stderr": str(paths.stderr).replace("%t", "0")}
    except Exception:  # noqa: BLE001 - not inside a submitit job (tests call the job directly)
        return {"job_id": os.environ.get("SLURM_JOB_ID")}


# -- submitting and watching ----------------------------------------------------------------------

@dataclass
class Submitted:
    cell: Cell
    action: str                  # what plan_cell said at submission
    job_id: str | None = None    # None: not submitted (skip / running elsewhere)


def plan(s: MatrixSettings) -> list[Submitted]:
    reg = Registry(s.registry)
    return [Submitted(c, plan_cell(reg, c, s)[0]) for c in cells_of(s)]


def submit(s: MatrixSettings, ss: SlurmSettings, log: Callable[[str], None] = print) -> list[Submitted]:
    """Submit one array job for every cell that is not done or running elsewhere."""
    submitit = _submitit()
    s = absolute_settings(s)
    logs = str(Path(ss.logs).resolve())
    todo = plan(s)
    work = [t for t in todo if t.action not in ("skip", ELSEWHERE)]
    log(f"{len(todo)} cells: {len(todo) - len(work)} done or running elsewhere, {len(work)} to submit")
    if not work:
        return todo
    ex = submitit.SlurmExecutor(folder=logs, max_num_timeout=ss.max_requeues)
    ex.update_parameters(**executor_parameters(ss))
    try:
        jobs = ex.map_array(CellJob(s, logs), [t.cell for t in work])
    except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError with sbatch's stderr, or OSError
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "sbatch: error" in ln), lines[-1] if lines else e.__class__.__name__)
        raise SlurmError(f"sbatch failed: {mask_secrets(why)} (check --slurm-partition, --slurm-account, "
                         "--slurm-qos, --slurm-extra; `harness run ... --dry-run` shows the #SBATCH lines)") from None
    for t, job in zip(work, jobs):
        t.job_id = job.job_id
    log(f"submitted array job {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks, at most "
        f"{ss.array_parallelism} at once); logs in {logs}")
    return todo


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id (array_task form, e.g. 12_3) -> (Slurm state, node), for the jobs squeue still knows."""
    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays:
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i %T %N"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def cell_states(s: MatrixSettings, ss: SlurmSettings, submitted: list[Submitted], reg: Registry) -> list[dict]:
    """One row per cell: pending / running / requeued / done / failed / interrupted / skipped."""
    states = squeue_states([t.job_id for t in submitted if t.job_id])
    rows = []
    for t in submitted:
        attempts = read_attempts(ss.logs, t.cell)
        q, q_node = states.get(t.job_id or "", (None, ""))
        status = cell_status(reg, t.cell, s)
        last = attempts[-1] if attempts else None
        if t.job_id is None:
            state = "skipped" if t.action == "skip" else ELSEWHERE
        elif q in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
            state = "requeued" if attempts or q.startswith("REQUEUE") else "pending"
        elif q is not None:
            state = "running"
            last = {**(last or {}), "node": q_node or "-", "cuda_visible_devices": "-"}
        elif last is None:
            state = "lost"  # gone from squeue without a record: killed hard; see the log
        elif last["outcome"] in ("failed", "interrupted"):
            state = last["outcome"]
        elif last["outcome"] == ELSEWHERE:
            state = ELSEWHERE
        else:
            state = "done" if status == "done" else (status or "done")
        rows.append({"cell": t.cell.label(), "job": t.job_id or "-", "state": state,
                     "run status": status or "-", "node": last["node"] if last else "-",
                     "gpu": last.get("cuda_visible_devices") if last else "-",
                     "attempts": len(attempts), "error": ((last or {}).get("error") or "")[:80],
                     "log": (last or {}).get("stdout") or ""})
    return rows


POLL_ENV_VAR = "HARNESS_SLURM_POLL_S"


def poll_seconds() -> float:
    """How often waiting polls squeue and the registry (${POLL_ENV_VAR}, default 10 s)."""
    try:
        return max(0.2, float(os.environ.get(POLL_ENV_VAR) or 10))
    except ValueError:
        raise SlurmError(f"${POLL_ENV_VAR}={os.environ[POLL_ENV_VAR]!r}: must be a number of seconds") from None


FINAL = ("done", "failed", "interrupted", "lost", "skipped", ELSEWHERE)


def wait(s: MatrixSettings, ss: SlurmSettings, submitted: list[Submitted], log: Callable[[str], None] = print,
         poll_s: float = 10.0, timeout_s: float | None = None) -> list[dict]:
    """Poll squeue and the registry until no submitted job is pending or running; log changes."""
    reg = Registry(s.registry)
    seen: dict[str, str] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        rows = cell_states(s, ss, submitted, reg)
        for r in rows:
            if seen.get(r["cell"]) != r["state"]:
                seen[r["cell"]] = r["state"]
                where = f" on {r['node']}" if r["state"] == "running" and r["node"] != "-" else ""
                log(f"cell {r['cell']} (job {r['job']}): {r['state']}{where}")
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        if all(r["state"] in FINAL for r in rows):
            log("all jobs ended: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
            return rows
        if deadline is not None and time.monotonic() > deadline:
            raise SlurmError(f"jobs still running after {timeout_s:.0f} s; `harness run ... --dry-run` "
                             "or `harness runs list` shows their progress")
        time.sleep(poll_s)

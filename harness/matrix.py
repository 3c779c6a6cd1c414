"""`harness run`: the run matrix (methods x splits x seeds), trained and evaluated.

Each cell runs in its own process pinned to one device (one cell per GPU at a time);
all processes share the registry, which is what decides what is left to do: a cell
whose run is done and evaluated is skipped, a done run without probe scores is only
evaluated, an interrupted (or failed, or stale running) run with a checkpoint is resumed,
and anything else starts fresh. A failing cell is recorded and the others go on.

However many matrices run at once, a cell is worked on by one process: the cell's process
claims it in the registry first (atomic; see Registry.claim_cell) and renews the claim from a
heartbeat thread while it trains and evaluates; a cell claimed by a live process elsewhere, or
whose run is leased to one, is reported as "running elsewhere" and skipped. Only when that
process is gone (its lease ran out) is the cell taken over and its run resumed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from harness.errors import HarnessError, mask_secrets, user_message
from harness.registry import Heartbeat, Registry, RegistryError, new_owner, utcnow
from harness.signals import STOP_SIGNALS, stop_exit_code

RESUMABLE = ("interrupted", "failed", "running")
ELSEWHERE = "running elsewhere"  # the action of a cell a live process elsewhere works on
ELSEWHERE_EXIT = 75  # a cell process's exit code for it (EX_TEMPFAIL)


class MatrixError(HarnessError, ValueError):
    """Bad matrix settings (splits, seeds, methods); the message says what to write instead."""


@dataclass(frozen=True)
class Cell:
    method: str
    split: str
    seed: int

    def label(self) -> str:
        return f"{self.method}/{self.split}/seed{self.seed}"


@dataclass
class MatrixSettings:
    methods: tuple[str, ...] = ("simclr", "sdclr", "bcl-i", "bcl-d")
    splits: tuple[str, ...] = ("split1", "split2", "split3", "split4", "split5")
    seeds: tuple[int, ...] = (10,)
    epochs: int | None = None           # None: the paper's 2,000
    batch_size: int | None = None
    width: int | None = None            # None: the paper's ResNet-18 (64)
    evaluate: bool = True
    shots: tuple[str, ...] = ("full", "100", "50")
    probe_epochs: int = 500
    probe_family: str | None = None     # None: the paper's probe lists
    data_root: str = "data"
    splits_root: str | None = None
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 50
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    registry: str | None = None
    tags: list[str] = field(default_factory=list)
    devices: tuple[str, ...] = ()       # empty: every visible GPU, else the CPU
    options: tuple[str, ...] = ()       # `--set NAME=VALUE`: each method takes those it has

    def target_epochs(self, method: str) -> int:
        from methods.base import default_config
        return self.epochs or default_config(method).epochs

    def options_for(self, method: str) -> dict:
        """The --set options that `method` has, typed by its config."""
        from methods.registry import parse_options
        return parse_options(method, self.options, only_known=True)


def parse_splits(text: str) -> tuple[str, ...]:
    """'1-5' -> split1..split5; '1,3' -> split1, split3; other names pass through."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "-" in part and all(x.isdigit() for x in part.split("-", 1)):
            lo, hi = (int(x) for x in part.split("-", 1))
            if lo > hi:
                raise MatrixError(f"split range {part!r} is empty")
            out += [f"split{k}" for k in range(lo, hi + 1)]
        else:
            out.append(f"split{part}" if part.isdigit() else part)
    if not out:
        raise MatrixError("no splits given")
    return tuple(out)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MatrixError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise MatrixError(f"no {what} given")
    return vals


def check_settings(s: MatrixSettings) -> None:
    """Refuse a bad matrix before any cell starts: methods, every cell's recipe, devices, probes."""
    from methods import registry
    from harness.train import TrainError, resolve_device

    known = registry.names()
    unknown = [m for m in s.methods if m not in known]
    if unknown:
        raise MatrixError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for name, _ in registry.split_assignments(s.options):
        if not any(name in registry.get(m).config_cls.own_fields() for m in s.methods):
            raise MatrixError(f"--set {name}=...: none of the methods {', '.join(s.methods)} has an option "
                              f"{name!r} (`harness methods` lists each method's options)")
    for m in s.methods:  # the same validation `harness train` applies, with this matrix's settings
        cell_config(Cell(m, s.splits[0], s.seeds[0]), s, precision=s.precision, compile_mode=s.compile_mode,
                    checkpoint_every=s.checkpoint_every)
    for d in s.devices:
        try:
            resolve_device(d)  # a name torch knows, of a device this machine has
        except TrainError as e:
            raise MatrixError(f"--devices: {e}") from None
    if s.evaluate and s.probe_epochs < 1:
        raise MatrixError(f"--probe-epochs {s.probe_epochs}: must be at least 1 (or --no-evaluate)")


def epochs_to_train(reg: Registry, action: str, run_id: int | None, target: int) -> int:
    """What a planned cell would really train: all epochs, the rest of a resumed run, or none."""
    if action == "train":
        return target
    if action == "resume" and run_id is not None:
        return target - (reg.get_run(run_id)["epochs_done"] or 0)
    return 0


def visible_devices() -> tuple[str, ...]:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)


def cells_of(s: MatrixSettings) -> list[Cell]:
    return [Cell(m, sp, seed) for sp in s.splits for m in s.methods for seed in s.seeds]


def cell_config(cell: Cell, s: MatrixSettings, **runtime):
    """The TrainConfig `cell` trains with: the method's paper recipe with this matrix's --epochs,
    --batch-size, --width and --set changes; `runtime` adds device, folders and the like."""
    from harness.train import make_config

    return make_config(cell.method, cell.split, options=s.options_for(cell.method), epochs=s.epochs,
                       batch_size=s.batch_size, width=s.width, seed=cell.seed, **runtime)


def cell_recipe(cell: Cell, s: MatrixSettings) -> dict:
    """The method recipe this matrix trains `cell` with: a run of the cell counts only if it
    followed this recipe."""
    return {k: v for k, v in cell_config(cell, s).method.to_dict().items() if k != "name"}


def same_recipe(run: dict, recipe: dict) -> bool:
    """Whether `run` trained with `recipe`. A field its config lacks (runs from before the field
    existed) had the default then, which is what the recipe has unless this matrix changes it."""
    recorded = (run.get("config") or {}).get("method")
    if not isinstance(recorded, dict):
        return True  # nothing recorded to compare: the registry's own key (method, split, seed, epochs)
    return all(recorded.get(k, v) == v for k, v in recipe.items())


def cell_runs(reg: Registry, cell: Cell, s: MatrixSettings) -> list[dict]:
    """The cell's runs that follow this matrix's recipe, oldest first: another --set or --width is
    another experiment, never this cell's "done"."""
    runs = reg.list_runs(method=cell.method, split=cell.split, seed=cell.seed, epochs=s.target_epochs(cell.method))
    recipe = cell_recipe(cell, s)
    return [r for r in runs if same_recipe(r, recipe)]


def _leased(run: dict) -> bool:
    return bool(run.get("owner")) and run.get("lease_until") is not None and run["lease_until"] >= utcnow()


def plan_cell(reg: Registry, cell: Cell, s: MatrixSettings, owner: str | None = None) -> tuple[str, int | None]:
    """(action, run id): skip, eval (done, scores missing), resume, train (new run), or
    "running elsewhere" (claimed by, or its run leased to, a live process other than `owner`)."""
    runs = cell_runs(reg, cell, s)
    holder = reg.cell_holder(cell.method, cell.split, cell.seed, s.target_epochs(cell.method))
    busy = [r for r in runs if r["status"] != "done" and _leased(r) and r["owner"] != owner]
    if (holder is not None and holder["owner"] != owner) or busy:
        return ELSEWHERE, (busy[-1]["id"] if busy else runs[-1]["id"] if runs else None)
    done = [r for r in runs if r["status"] == "done"]
    if done:
        run = done[-1]
        if not s.evaluate:
            return "skip", run["id"]
        have = {p["kind"] for p in reg.probes(run["id"])}
        return ("skip" if set(s.shots) <= have else "eval"), run["id"]
    for run in reversed(runs):
        if run["status"] in RESUMABLE and reg.latest_checkpoint(run["id"]):
            return "resume", run["id"]
    return "train", None


def run_cell(cell: Cell, s: MatrixSettings, device: str) -> str:
    """Body of one cell's process: pin the device, claim the cell, train or resume, then evaluate.
    Returns the action taken ("running elsewhere" when another live process has the cell)."""
    if device.startswith("cuda:"):  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    reg = Registry(s.registry)
    owner, key = new_owner(), (cell.method, cell.split, cell.seed, s.target_epochs(cell.method))
    if not reg.claim_cell(*key, owner):
        return ELSEWHERE
    beat = Heartbeat(lambda: reg.renew_cell(*key, owner), reg.lease_s, name=f"claim-{cell.label()}").start()
    try:
        return _run_claimed_cell(reg, cell, s, device, owner)
    finally:
        beat.stop()
        try:
            reg.release_cell(*key, owner)
        except RegistryError:  # unreachable: the claim runs out by itself
            pass


def _run_claimed_cell(reg: Registry, cell: Cell, s: MatrixSettings, device: str, owner: str) -> str:
    from harness.evaluate import evaluate_run, parse_shots, plan_evaluation
    from harness.train import RunBusy, normalise_split_name, train

    action, run_id = plan_cell(reg, cell, s, owner=owner)  # again: the registry may have moved on
    if action in ("skip", ELSEWHERE):
        return action
    try:
        if s.evaluate and action in ("train", "resume"):  # probes that cannot run fail before the training
            plan_evaluation(normalise_split_name(cell.split), Path(s.data_root),
                            Path(s.splits_root) if s.splits_root else None, parse_shots(s.shots),
                            probe_family=s.probe_family)
        if action in ("train", "resume"):
            cfg = cell_config(cell, s, device=device, precision=s.precision, compile=s.compile,
                              compile_mode=s.compile_mode, checkpoint_every=s.checkpoint_every,
                              tags=list(s.tags) + ["matrix"], data_root=s.data_root, splits_root=s.splits_root,
                              checkpoint_dir=s.checkpoint_dir)
            try:
                out = train(cfg, reg, resume=run_id if action == "resume" else None, progress=False)
            except RunBusy:  # a `harness train --resume` elsewhere took the run first
                return ELSEWHERE
            run_id = out["run_id"]
            if out["status"] != "done":  # stopped by a signal: checkpointed, the next matrix resumes it
                raise SystemExit(stop_exit_code(out.get("signal")))
        if s.evaluate and action != "skip":
            evaluate_run(reg, run_id, Path(s.data_root), Path(s.splits_root) if s.splits_root else None,
                         shots=s.shots, epochs=s.probe_epochs, device=device, progress=False,
                         probe_family=s.probe_family)
    except Exception as e:
        if run_id is not None:
            reg.update_run(run_id, error=f"{e.__class__.__name__}: {e}\n{traceback.format_exc()[-2000:]}")
        raise
    return action


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel send this worker SIGTERM when the matrix process dies (the trainer
    then checkpoints and stops), so a worker never trains on as an orphan."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _cell_process(cell: Cell, s: MatrixSettings, device: str, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        die_with_parent(parent_pid)
    try:
        if run_cell(cell, s, device) == ELSEWHERE:
            raise SystemExit(ELSEWHERE_EXIT)
    except SystemExit:
        raise
    except HarnessError as e:  # the user's to fix (a missing probe list, bad data): one line, no traceback
        print(f"cell {cell.label()}: error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(1)
    except BaseException:
        print(mask_secrets(traceback.format_exc()), end="", file=sys.stderr)
        raise SystemExit(1)


@dataclass
class CellResult:
    cell: Cell
    action: str
    device: str = ""
    exit_code: int | None = None
    seconds: float = 0.0


def epochs_trained(reg: Registry, cells: list[Cell], s: MatrixSettings) -> int:
    """Epochs done so far by the latest run of each cell (the registry is what the workers update)."""
    total = 0
    for c in cells:
        runs = cell_runs(reg, c, s)
        total += (runs[-1]["epochs_done"] or 0) if runs else 0
    return total


@contextmanager
def forwarded_stop_signals(running: dict) -> Iterator[dict]:
    """A stop signal to the matrix (Ctrl-C, SIGTERM, SIGUSR1) stops launching cells and is passed on
    to every worker as SIGTERM (a terminal's Ctrl-C reaches them already; a second SIGINT would abort
    their step), so each checkpoints and stops; the matrix then waits for them."""
    flag = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = flag["signal"] or signal.Signals(signum).name
        for p in list(running):
            if p.pid is not None and p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


class MatrixStopped(HarnessError):
    """The matrix was stopped by a signal after its workers checkpointed."""

    def __init__(self, sig: str, results: list):
        self.signal, self.results = sig, results
        self.exit_code = stop_exit_code(sig)
        stopped = sum(1 for r in results if r.exit_code not in (0, None))
        super().__init__(f"stopped by {sig}: {stopped} running cell(s) checkpointed and marked interrupted; "
                         "run the same command again to resume them")


def run_matrix(s: MatrixSettings, log=print, progress: bool = True, poll_s: float = 0.5,
               registry_poll_s: float = 5.0) -> list[CellResult]:
    """Run every cell that is not done; the overview bar counts epochs over all cells (so its
    ETA moves within a cell) and shows cells done / running / evaluating / left / failed. A stop
    signal is forwarded to the workers; once they have checkpointed, MatrixStopped is raised."""
    reg = Registry(s.registry)  # creates or migrates the schema once, before the workers start
    devices = list(s.devices or visible_devices())
    todo = [CellResult(c, plan_cell(reg, c, s)[0]) for c in cells_of(s)]
    work = [r for r in todo if r.action not in ("skip", ELSEWHERE)]
    log(f"{len(todo)} cells: {len(todo) - len(work)} already done, {len(work)} to run on "
        f"{len(devices)} device(s) ({', '.join(devices)})")
    ctx = mp.get_context("spawn")
    free, running, queue = list(devices), {}, list(work)
    training = [r.cell for r in work if r.action in ("train", "resume")]
    epochs_at_start = epochs_trained(reg, training, s)
    bar, polled = None, 0.0
    if progress and work:
        from tqdm import tqdm
        total = sum(s.target_epochs(c.method) for c in training) - epochs_at_start
        bar = tqdm(total=total, unit="epoch", dynamic_ncols=True, desc="matrix")
    try:
        with forwarded_stop_signals(running) as stop:
            while queue or running:
                finished = [p for p in running if not p.is_alive()]
                for p in finished:
                    r, t0 = running.pop(p)
                    p.join()
                    r.exit_code, r.seconds = p.exitcode, time.perf_counter() - t0
                    free.append(r.device)
                    if r.exit_code == ELSEWHERE_EXIT:  # claimed by another matrix meanwhile
                        r.action, r.exit_code = ELSEWHERE, 0
                        log(f"cell {r.cell.label()} is running elsewhere; skipped")
                    if r.exit_code != 0 and stop["signal"] is None:
                        log(f"cell {r.cell.label()} failed (exit {r.exit_code}); the others go on")
                while queue and free and stop["signal"] is None:  # after the finished: the overview adds up
                    r = queue.pop(0)
                    r.device = free.pop(0)
                    p = ctx.Process(target=_cell_process, args=(r.cell, s, r.device, os.getpid()),
                                    name=r.cell.label())
                    p.start()
                    running[p] = (r, time.perf_counter())
                    if stop["signal"] is not None:  # the signal came while it started: pass it on too
                        os.kill(p.pid, signal.SIGTERM)
                if stop["signal"] is not None:
                    queue.clear()
                if bar is not None and (finished or time.perf_counter() - polled >= registry_poll_s):
                    polled = time.perf_counter()
                    bar.n = min(bar.total, epochs_trained(reg, training, s) - epochs_at_start)
                    ended = [x for x in work if x.exit_code is not None]
                    evaluating = sum(1 for r, _ in running.values() if cell_status(reg, r.cell, s) == "done")
                    bar.set_postfix(cells=f"{len(ended)}/{len(work)}", running=len(running) - evaluating,
                                    evaluating=evaluating, left=len(queue),
                                    failed=sum(1 for x in ended if x.exit_code != 0))
                    bar.refresh()
                time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()
    if stop["signal"] is not None:
        raise MatrixStopped(stop["signal"], todo)
    return todo


def cell_status(reg: Registry, cell: Cell, s: MatrixSettings) -> str | None:
    runs = cell_runs(reg, cell, s)
    return runs[-1]["status"] if runs else None


def summary_rows(reg: Registry, results: list[CellResult], s: MatrixSettings) -> list[dict]:
    rows = []
    for r in results:
        runs = cell_runs(reg, r.cell, s)
        run = runs[-1] if runs else None
        probes = {(p["kind"], p["subset"]): p["top1"] for p in reg.probes(run["id"])} if run else {}
        few = lambda k: [v for (kind, _), v in probes.items() if kind == k]
        mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None
        rows.append({"cell": r.cell.label(), "action": r.action, "run": run["id"] if run else None,
                     "status": run["status"] if run else "-", "full": probes.get(("full", 0)),
                     "100-shot": mean(few("100")), "50-shot": mean(few("50")),
                     "minutes": round(r.seconds / 60, 1) if r.seconds else None,
                     # training only: the run's wall time counts epochs, never evaluation
                     "s/epoch": round(run["wall_time_s"] / run["epochs_done"], 2)
                     if run and run.get("epochs_done") else None,
                     "error": (run.get("error") or "").splitlines()[0][:60] if run and run.get("error")
                     and r.exit_code not in (0, None) else ""})
    return rows

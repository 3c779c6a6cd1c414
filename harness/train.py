"""The training loop: one readable function over a device-resident uint8 split.

Per epoch: method.on_epoch_start, a seeded permutation, steps of (augment -> forward ->
loss -> SGD) with the per-iteration schedule, method.on_epoch_end, one registry row. Each
step's batch is augmented during the previous step (on CUDA on a side stream, so the small
augmentation kernels overlap the network's), in the same generator order as one by one.
A checkpoint holds everything needed to continue bit-for-bit, even mid-epoch: model,
optimizer, method state (BCL memory and weights; SDCLR masks live in the model), the
epoch's permutation and position, and every RNG state. Ctrl-C is caught between steps:
the loop saves a checkpoint, marks the run interrupted and exits.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import platform
import signal
import subprocess
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.profiler import record_function

from harness.errors import HarnessError, describe_os_error
from harness.data import PAPER_DATASET, load_dataset, sha256_array, sha256_file
from harness.registry import (Heartbeat, Registry, RegistryError, RegistryUnreachable, check_tags, new_owner,
                              utcnow)
from harness.safeio import check_readable, load_torch
from harness.signals import STOP_SIGNALS
from harness.splits import check_belongs, load_split, split_dataset
from methods import registry as methods_registry
from methods.base import BIG, MethodConfig, build_method, stray_parameters, trained_parameters
from methods.registry import MethodError
from methods.schedule import lr_at

CHECKPOINT_FORMAT = 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TrainError(HarnessError):
    """A run that cannot start or resume; the message says what to do."""


class RunBusy(TrainError):
    """The run is held by another live process (its lease is being renewed)."""


class LeaseLost(TrainError):
    """Another process took this run over (our lease had run out): stop, write nothing."""


@dataclass
class TrainConfig:
    """Loop settings; the method's hyper-parameters live in `method` (paper defaults)."""
    method: MethodConfig
    split: str = "split1"
    dataset: str | None = None        # the split's own dataset when None (paper splits: cifar100); set at start
    data_root: str = "data"
    splits_root: str | None = None
    subset: int | None = None         # train on this many images of the split (a seeded draw): quick tries
    device: str = "auto"
    precision: str = "auto"           # bf16 on CUDA, fp32 on CPU
    compile: bool = False
    compile_mode: str = "default"     # torch.compile mode (COMPILE_MODES) when compile is on
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 50        # epochs; the last epoch is always saved
    monitor_every: int = 0            # kNN monitor every N epochs (0: off)
    monitor_size: int = 2000          # test images the kNN monitor classifies
    tags: list[str] = field(default_factory=list)
    max_steps: int | None = None      # stop after this many steps in this call (quick tries, benchmarks, tests)
    overlap_augment: bool = True      # augment the next batch early (on CUDA: on a side stream)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        """A recorded config (a checkpoint's or the registry's) back into the method's own config class;
        configs recorded before methods had their own (one flat MethodConfig) are read too."""
        d = dict(d)
        name = (d.get("method") or {}).get("name")
        try:
            d["method"] = methods_registry.get(name).config_from_dict(d["method"], strict=True)
        except MethodError as e:
            raise TrainError(f"cannot continue this {name} run: {e}") from None
        return TrainConfig(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(check_device_name(name))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return check_precision(precision)


def check_precision(precision: str) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"--precision {precision!r}: choose auto, bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


IMAGE_ENV_VAR = "HARNESS_CONTAINER_IMAGE"  # set by the Dockerfile: which image a run ran in
GIT_REV_ENV_VAR = "HARNESS_GIT_REV"          # the commit, where the tree has no .git (the container)


def environment(device: torch.device, precision: str | None = None) -> tuple[str, dict, str | None]:
    """(device name, versions, git commit) as a run records them at its start (and at each resume).
    `versions` holds what a reader needs to judge a number: library versions, CUDA, cuDNN, the GPU
    driver, the precision actually used, the container image; a value that cannot be read is left out
    (reports show it as "not recorded")."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "os": platform.platform()}
    try:
        import torchvision
        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if precision:
        versions["precision"] = precision
    if device.type == "cuda":
        versions.update(cuda_versions(device))
    versions["container_image"] = os.environ.get(IMAGE_ENV_VAR) or None  # None: not in the harness's image
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return name, versions, rev or os.environ.get(GIT_REV_ENV_VAR) or None


def cuda_versions(device: torch.device) -> dict:
    """CUDA (of the torch build), cuDNN and the GPU driver; nvidia-smi answers for the driver."""
    out: dict = {}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if torch.backends.cudnn.is_available() and torch.backends.cudnn.version():
        out["cudnn"] = cudnn_text(torch.backends.cudnn.version())
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"-i={index}"],
                             capture_output=True, text=True, timeout=10)
        driver = smi.stdout.strip().splitlines()[0].strip() if smi.returncode == 0 and smi.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        driver = ""
    if driver:
        out["driver"] = driver
    return out


def cudnn_text(v: int) -> str:
    """cuDNN's version number in words: 91002 -> 9.10.2 (cuDNN 9 counts major x 10000), 8902 -> 8.9.2."""
    if v >= 10000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def resume_record(device_name: str, versions: dict, rev: str | None, epoch: int) -> dict:
    """One entry of versions["resumes"]: when, where and with what a run was continued."""
    return {"at": utcnow().isoformat(timespec="seconds"), "epoch": epoch, "device": device_name,
            "git_rev": rev, **{k: v for k, v in versions.items() if k != "slurm"}}


# -- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> str:
    """Write atomically (temp file, then rename) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop mid-write: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    sha = sha256_file(path)
    # the file's own sha256 beside it: a checkpoint saved while the registry was unreachable (so
    # not in it) is still known intact when the run resumes
    _sidecar(path).write_text(sha + "\n")
    return sha


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict:
    """A training checkpoint, loaded with weights_only=True (tensors, dicts, lists, plain values):
    a checkpoint file may come from anywhere, and loading it never runs code."""
    path = Path(path)
    check_readable(path, TrainError, hints={errno.ENOENT: "; it may have been moved or deleted "
                                            "(start a new run instead of --resume)"})
    if expected_sha256 and sha256_file(path) not in (expected_sha256, _sidecar_sha(path)):
        raise TrainError(f"checkpoint {path} does not match the sha256 in the registry: "
                         "the file was changed or is corrupt")
    ckpt = load_torch(path, TrainError, "training checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {path} is not a harness training checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else '?'}, expected {CHECKPOINT_FORMAT})")
    return ckpt


def _sidecar_sha(path: Path) -> str | None:
    try:
        return _sidecar(path).read_text().strip() or None
    except OSError:
        return None


# -- data -------------------------------------------------------------------------------------

def normalise_split_name(split: str) -> str:
    return f"split{split}" if split.isdigit() else split


def subset_of(idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """`n` of the split's indices, drawn with `seed` and kept in split order (all when n is None)."""
    if n is None or n >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


def dataset_of(cfg: TrainConfig) -> str:
    """The dataset a run trains on: the one asked for, else the one its split records."""
    if cfg.dataset:
        return cfg.dataset
    try:
        return split_dataset(cfg.split) or PAPER_DATASET
    except HarnessError:  # an unknown split: said when it is loaded, after the data
        return PAPER_DATASET


def load_pretraining_images(cfg: TrainConfig, device: torch.device):
    """The split's uint8 images on the device (9,754 images are 30 MB), their labels, the dataset
    and the indices (after --subset)."""
    data = load_dataset(Path(cfg.data_root), dataset_of(cfg))
    check_belongs(cfg.split, data)
    idx = load_split(cfg.split, Path(cfg.splits_root) if cfg.splits_root else None,
                     num_images=len(data.train_labels))
    idx = subset_of(idx, cfg.subset, cfg.method.seed)
    images = torch.from_numpy(data.train_images[idx]).to(device)
    return images, data.train_labels[idx], data, idx


# -- the cheap monitor ------------------------------------------------------------------------

@torch.no_grad()
def knn_monitor(net, bank_images, bank_labels, query_images, query_labels, precision, k: int = 20,
                batch: int = 1024, *, num_classes: int) -> float:
    """Weighted kNN top-1 (%) of test images against the pretraining split, dense branch.
    Cheap (one forward over ~12k images); never the 500-epoch probe."""
    was_training = net.training
    net.eval()
    device = bank_images.device

    def feats(x):
        out = []
        for i in range(0, len(x), batch):
            with autocast(device, precision):
                f = net.features(x[i:i + batch].float() / 255)
            out.append(torch.nn.functional.normalize(f.float(), dim=1))
        return torch.cat(out)

    fb, fq = feats(bank_images), feats(query_images)
    sim, nn_idx = (fq @ fb.T).topk(min(k, len(fb)), dim=1)
    votes = torch.zeros(len(fq), num_classes, device=device)
    votes.scatter_add_(1, bank_labels[nn_idx], (sim / 0.07).exp())
    acc = (votes.argmax(1) == query_labels).float().mean().item() * 100
    net.train(was_training)
    return acc


# -- the loop ---------------------------------------------------------------------------------

@contextmanager
def deferred_interrupt() -> Iterator[dict]:
    """Turn the first stop signal into a flag checked between steps (the loop then checkpoints and
    returns); a second Ctrl-C aborts at once. `flag["signal"]` names the signal that stopped it."""
    flag = {"stop": False, "signal": None}
    if threading_main():
        def handler(signum, frame):
            if flag["stop"] and signum == signal.SIGINT:
                raise KeyboardInterrupt
            flag["stop"], flag["signal"] = True, flag["signal"] or signal.Signals(signum).name
        old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
        try:
            yield flag
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
    else:  # signal handlers only work in the main thread
        yield flag


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


class DivergedError(TrainError):
    """A non-finite loss: the run stops as failed and keeps its last good checkpoint."""


class SaveError(TrainError):
    """A checkpoint that could not be written; the run is marked failed with the cause."""


# what a resumed run may change: where and how it runs, never what it computes
RUNTIME_FIELDS = ("device", "compile", "compile_mode", "overlap_augment", "data_root", "splits_root",
                  "checkpoint_dir", "max_steps", "monitor_every", "checkpoint_every")
NOT_COMPARED = ("tags", "monitor_size")


def flat_settings(cfg: TrainConfig) -> dict:
    """A config as one flat dict of loop and method settings (the method's name under "name")."""
    d = cfg.to_dict()
    return {**{k: v for k, v in d.items() if k != "method"}, **d["method"]}


def resume_config(saved: TrainConfig, asked: dict[str, Any]) -> TrainConfig:
    """The saved recipe with the runtime settings the caller asked for; a recipe setting that differs
    from the run's is refused (the run would silently continue with another recipe)."""
    current = flat_settings(saved)
    differ = [f"{k} (run: {current[k]!r}, asked: {v!r})" for k, v in asked.items()
              if v is not None and k in current and k not in RUNTIME_FIELDS + NOT_COMPARED and current[k] != v]
    if differ:
        raise TrainError("--resume continues the run's own recipe, and these settings differ: "
                         f"{'; '.join(differ)}. Drop them, or start a new run")
    runtime = {k: v for k, v in asked.items() if k in RUNTIME_FIELDS and v is not None}
    # a step limit belongs to the call that set it, not to the run
    return dataclasses.replace(saved, **{"max_steps": None, **runtime})


def check_writable(folder: Path) -> None:
    """Fail before any training when checkpoints could not be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"checkpoint folder {folder} is not writable: {describe_os_error(e) or e}; "
                         "choose another with --checkpoint-dir") from None


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def state_mismatch(module: torch.nn.Module, state: dict) -> str | None:
    """What keeps `state` from loading into `module` (missing, unexpected, reshaped weights, named);
    None when it fits."""
    if not isinstance(state, dict):
        return f"expected a state dict, found {type(state).__name__}"
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    parts = [f"missing {len(missing)} weight(s): {_few(missing)}" if missing else "",
             f"unexpected {len(unexpected)} weight(s): {_few(unexpected)}" if unexpected else "",
             f"{len(reshaped)} of another shape (file vs model): {_few(reshaped)}" if reshaped else ""]
    return "; ".join(p for p in parts if p) or None


def load_modules(method, ckpt: dict, error) -> None:
    """Every module of the method from a checkpoint: the probed one from "model", the others from
    "modules" (checkpoints written before methods had several modules have none: fine for a method
    with one). `error(message)` makes the exception to raise, naming the module and its weights."""
    saved = ckpt.get("modules") or {}
    mods = method.modules()
    extra = sorted(set(saved) - set(mods))
    if extra:
        raise error(f"it holds module(s) {', '.join(extra)} that the method does not have")
    for name, module in mods.items():
        state = ckpt["model"] if name == method.probed else saved.get(name)
        if state is None:
            raise error(f"it has no weights for module {name!r} (of {', '.join(mods)})")
        problem = state_mismatch(module, state)
        if problem:
            raise error(f"module {name!r}: {problem}")
        module.load_state_dict(state)


class Trainer:
    """Holds one run's state; `fit()` runs (or continues) it to the end or to max_steps.

    To resume, give `resume` (a run id) and either the settings asked for (`asked`, only those the
    user gave) or a full `cfg` (compared as a whole): see `resume_config`."""

    def __init__(self, cfg: TrainConfig | None, registry: Registry, resume: int | None = None,
                 progress: bool = True, asked: dict[str, Any] | None = None):
        # the run is leased to this process (see harness/registry.py): created leased, or resumed
        # only when no live process holds it; a heartbeat thread renews the lease during fit()
        self.owner, self.heartbeat, self._held = new_owner(), None, None
        self.unlogged: tuple[int, dict] | None = None  # an epoch row the registry did not take yet
        try:
            self._init(cfg, registry, resume, progress, asked)
        except BaseException:
            if self._held is not None:
                try:
                    registry.release(self._held, self.owner)
                except RegistryError:
                    pass
            raise

    def _acquire(self, registry: Registry, run_id: int) -> None:
        run = registry.get_run(run_id)
        if not registry.acquire_run(run_id, self.owner):
            holder = registry.lease_holder(run_id) or {"owner": run.get("owner"), "lease_until": run.get("lease_until")}
            until = holder["lease_until"]
            raise RunBusy(f"run {run_id} is being trained by {holder['owner']} (its lease runs until "
                             f"{until:%Y-%m-%d %H:%M:%S} UTC and is renewed while that process lives); "
                             "not resumed: wait for it, or resume after its lease expires")
        self._held = run_id

    def _init(self, cfg: TrainConfig | None, registry: Registry, resume: int | None, progress: bool,
              asked: dict[str, Any] | None) -> None:
        self.registry, self.progress = registry, progress
        ckpt = None
        if resume is not None:
            self._acquire(registry, resume)
            run = registry.get_run(resume)
            art = registry.latest_checkpoint(resume)
            ck_dir = ((asked or {}).get("checkpoint_dir") or (cfg.checkpoint_dir if cfg else None)
                      or (run["config"] or {}).get("checkpoint_dir") or "checkpoints")
            unregistered = Path(ck_dir) / f"run{resume}" / "last.pt"
            if art is None and _sidecar_sha(unregistered):  # saved while the registry was unreachable
                art = {"path": str(unregistered), "sha256": _sidecar_sha(unregistered)}
            if art is None:
                raise TrainError(f"run {resume} has no checkpoint to resume from (status {run['status']}); "
                                 "start a new run")
            ckpt = load_checkpoint(Path(art["path"]), art["sha256"])
            saved = TrainConfig.from_dict(ckpt["train_config"])
            if ckpt["run_id"] != resume or saved.method.name != run["method"]:
                raise TrainError(f"checkpoint {art['path']} belongs to run {ckpt['run_id']} "
                                 f"({saved.method.name}), not run {resume} ({run['method']})")
            cfg = resume_config(saved, asked if asked is not None else flat_settings(cfg))
        assert cfg is not None
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        mc = cfg.method

        self.images, labels, data, self.split_indices = load_pretraining_images(cfg, self.device)
        self.cfg = cfg = dataclasses.replace(cfg, dataset=data.name)  # recorded, and compared on resume
        self.num_classes = data.num_classes
        self.n = len(self.images)
        if self.n == 0:
            raise TrainError(f"split {cfg.split!r} has no images: nothing to train on")
        self.split_sha256 = sha256_array(self.split_indices)
        self.labels = torch.from_numpy(labels).to(self.device)
        # images per class of what this run trains on: the x axis of the report's per-class plots
        self.class_counts = np.bincount(labels, minlength=self.num_classes)
        self.test_images = torch.from_numpy(data.test_images[:cfg.monitor_size]).to(self.device)
        self.test_labels = torch.from_numpy(data.test_labels[:cfg.monitor_size]).to(self.device)
        self.steps_per_epoch = math.ceil(self.n / mc.batch_size)  # the last partial batch is kept
        self.total_steps = mc.epochs * self.steps_per_epoch
        self.warmup_steps = mc.warmup_epochs * self.steps_per_epoch
        self.checkpoint_dir = Path(cfg.checkpoint_dir)
        check_writable(self.checkpoint_dir)

        torch.manual_seed(mc.seed)  # model initialisation
        self.method = build_method(mc.name, mc, num_samples=self.n, device=self.device)
        stray = stray_parameters(self.method)
        if stray:  # they would never be trained nor saved, and the run would still end "done"
            raise TrainError(f"method {mc.name} has {len(stray)} parameter tensor(s) that no optimizer sees: "
                             f"{_few(stray)}; list the module that holds them in the method's modules() "
                             "(or set requires_grad=False on them if they are not to be trained)")
        if self.device.type == "cuda":
            for module in self.method.modules().values():
                module.to(memory_format=torch.channels_last)
        # exactly the parameters of the method's modules (for the paper's four: the network's, in order)
        self.optimizer = torch.optim.SGD(trained_parameters(self.method), lr=mc.lr, momentum=mc.momentum,
                                         weight_decay=mc.weight_decay)
        if cfg.compile:
            self.method.compile(mode=cfg.compile_mode)
        self.order_gen = torch.Generator().manual_seed(mc.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(mc.seed + 1)
        self.epoch, self.step_in_epoch, self.perm = 1, 0, None  # position of the next step
        self.loss_sum = torch.zeros((), device=self.device)   # this epoch's summed loss so far
        # this epoch's per-step losses (on the device: checked once per epoch, no sync per step)
        self.step_losses = torch.zeros(self.steps_per_epoch, device=self.device)
        self.wall_time = 0.0
        self.epoch_elapsed = 0.0   # seconds this epoch ran before the current call (a resumed epoch)
        self.last_lr: float | None = None
        self.steps_this_call = 0
        self.stop_signal: str | None = None
        # the next step's views, made while this step trains: (epoch, step, views, ready event),
        # and the augmentation generator's state from before they were drawn (what a checkpoint keeps)
        self.pending: tuple | None = None
        self.pending_aug_state: torch.Tensor | None = None
        self.aug_stream = (torch.cuda.Stream(self.device)
                           if cfg.overlap_augment and self.device.type == "cuda" else None)

        if ckpt is None:
            dev_name, versions, rev = environment(self.device, self.precision)
            self.run_id = registry.create_run(mc.name, cfg.split, mc.seed, mc.epochs,
                                              {**cfg.to_dict(), "split_sha256": self.split_sha256,
                                               "class_counts": self.class_counts.tolist(),
                                               "dataset_info": data.identity()},
                                              tags=cfg.tags, device=dev_name, versions=versions,
                                              git_rev=rev, status="running", owner=self.owner)
            self._held = self.run_id
            registry.update_run(self.run_id, started_at=utcnow())
        else:
            self.run_id = resume
            self._restore(ckpt)
            if ckpt.get("unlogged"):  # the epoch's row that the registry missed when it went away
                registry.log_epoch(self.run_id, ckpt["unlogged"][0], **ckpt["unlogged"][1])
            # a resume may run elsewhere (another GPU, driver, commit): the report shows every environment
            versions = dict(run.get("versions") or {})
            versions["resumes"] = list(versions.get("resumes") or []) + [
                resume_record(*environment(self.device, self.precision), epoch=self.epoch - 1)]
            registry.update_run(self.run_id, status="running", error=None, epochs_done=self.epoch - 1,
                                versions=versions)
        self.checkpoint_path = self.checkpoint_dir / f"run{self.run_id}" / "last.pt"

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "run_id": self.run_id, "method": self.cfg.method.name,
            "split": self.cfg.split, "split_sha256": self.split_sha256,
            "config": self.cfg.method.to_dict(), "train_config": self.cfg.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "epochs_done": self.epoch - 1, "perm": self.perm, "loss_sum": self.loss_sum.cpu(),
            "step_losses": self.step_losses.cpu(), "epoch_elapsed_s": self.epoch_elapsed,
            # the probed network under "model" (what `harness eval` reads), the method's other modules by name
            "model": self.method.probed_network().state_dict(),
            "modules": {name: m.state_dict() for name, m in self.method.modules().items()
                        if name != self.method.probed},
            "optimizer": self.optimizer.state_dict(), "method_state": self.method.state_dict(),
            "rng": {"order": self.order_gen.get_state(), "torch": torch.get_rng_state(),
                    # views made ahead of time are not saved: the resumed run draws them again
                    "aug": self.pending_aug_state if self.pending is not None else self.aug_gen.get_state()},
            "wall_time_s": self.wall_time, "num_samples": self.n, "unlogged": self.unlogged,
        }

    def _restore(self, ckpt: dict) -> None:
        if ckpt["num_samples"] != self.n:
            raise TrainError(f"checkpoint was trained on {ckpt['num_samples']} images, split "
                             f"{self.cfg.split!r} has {self.n}: wrong split or data")
        if ckpt.get("split_sha256") not in (None, self.split_sha256):
            raise TrainError(f"split {self.cfg.split!r} changed since run {self.run_id} "
                             f"started (its indices' sha256 was {ckpt['split_sha256'][:12]}…, now "
                             f"{self.split_sha256[:12]}…): resuming would train on other images; restore the "
                             "split file or start a new run")
        name = self.cfg.method.name
        load_modules(self.method, ckpt, lambda msg: TrainError(f"checkpoint does not fit method {name}: {msg}"))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.method.load_state_dict(ckpt["method_state"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainError(f"checkpoint is incompatible with method {name}: "
                             f"{' '.join(str(e).split())[:300]}") from None
        self.order_gen.set_state(ckpt["rng"]["order"])
        self.aug_gen.set_state(ckpt["rng"]["aug"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.epoch, self.step_in_epoch, self.perm = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["perm"]
        self.loss_sum = ckpt["loss_sum"].to(self.device)
        if "step_losses" in ckpt:
            self.step_losses = ckpt["step_losses"].to(self.device)
        self.epoch_elapsed = ckpt.get("epoch_elapsed_s", 0.0)
        self.wall_time = ckpt["wall_time_s"]

    def save(self) -> None:
        """Write the checkpoint and record it; any failure is a SaveError naming the cause in words."""
        self._hold_lease()  # never write over the files of a process that took the run over
        try:
            sha = save_checkpoint(self.checkpoint_path, self.state())
        except OSError as e:
            raise SaveError(f"checkpoint {self.checkpoint_path} could not be written: "
                            f"{describe_os_error(e) or e}") from None
        except RuntimeError as e:  # torch.save reports a failed write (e.g. a full disk) as RuntimeError
            raise SaveError(f"checkpoint {self.checkpoint_path} could not be written: "
                            f"{str(e).splitlines()[0]}") from None
        done = self.epoch - 1
        self.registry.add_artifact(self.run_id, "checkpoint", str(self.checkpoint_path), sha, epoch=done)

    # -- the lease --------------------------------------------------------------------------
    def _hold_lease(self) -> None:
        """Renew the lease now; LeaseLost if another process has taken the run over."""
        ok = self.heartbeat.beat() if self.heartbeat else self.registry.renew_lease(self.run_id, self.owner)
        if not ok:
            holder = self.registry.lease_holder(self.run_id)
            raise LeaseLost(f"run {self.run_id} was taken over by {holder['owner'] if holder else 'another process'} "
                            "(this process's lease had run out); stopped without saving, so the other "
                            "process's checkpoint is not overwritten")

    def _lease_lost(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.lost.is_set()

    def _save_offline(self) -> Path | None:
        """Checkpoint without the registry (it is unreachable), if the lease is surely still ours."""
        if self.heartbeat is not None and time.monotonic() >= self.heartbeat.valid_until:
            return None
        save_checkpoint(self.checkpoint_path, self.state())
        return self.checkpoint_path

    # -- training ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end (status done), or to a stop signal / max_steps (interrupted), with the
        run's lease renewed from a heartbeat thread and released however this ends. A diverged loss
        or a failed save ends the run as failed with the cause recorded (the last good checkpoint
        stays); an unreachable registry: checkpoint, one line saying how to resume, TrainError."""
        reg = self.registry
        self.heartbeat = Heartbeat(lambda: reg.renew_lease(self.run_id, self.owner), reg.lease_s,
                                   name=f"lease-run{self.run_id}").start()
        unreachable = False
        try:
            return self._fit()
        except RegistryUnreachable as e:
            unreachable = True
            path = self._save_offline()
            saved = (f"checkpoint saved at {path}" if path else
                     "checkpoint not saved (the lease ran out meanwhile; the last registered one stays)")
            raise TrainError(f"registry unreachable ({e}); {saved}; resume with "
                             f"`harness train {self.cfg.method.name} --resume {self.run_id}` when it is back") from None
        finally:
            self.heartbeat.stop()
            if not unreachable:
                try:
                    reg.release(self.run_id, self.owner)
                except RegistryError:
                    pass

    def _fit(self) -> dict:
        mc, reg = self.cfg.method, self.registry
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=(self.epoch - 1) * self.steps_per_epoch + self.step_in_epoch,
                       unit="step", dynamic_ncols=True, desc=f"{mc.name} {self.cfg.split} run {self.run_id}")
            self._set_bar_epoch(bar)
        self.steps_this_call = 0
        try:
            with deferred_interrupt() as interrupt:
                while self.epoch <= mc.epochs and self.run_epoch(interrupt, bar):
                    pass
                self.stop_signal = interrupt["signal"]
                status = "done" if self.epoch > mc.epochs else "interrupted"
                self._check_finite()  # a stop mid-epoch: never checkpoint a diverged state
                self.save()
        except KeyboardInterrupt:  # second Ctrl-C: the step may be half done, keep the last checkpoint
            reg.update_run(self.run_id, status="interrupted", wall_time_s=self.wall_time)
            raise
        except (LeaseLost, RegistryUnreachable):  # the row is not ours to write, or cannot be written
            raise
        except Exception as e:
            reg.update_run(self.run_id, status="failed", error=f"{e.__class__.__name__}: {e}",
                           wall_time_s=self.wall_time)
            raise
        finally:
            if bar is not None:
                bar.close()
        fields: dict[str, Any] = {"status": status, "wall_time_s": self.wall_time,
                                  "epochs_done": self.epoch - 1,
                                  "error": f"stopped by {self.stop_signal}" if self.stop_signal else None}
        if status == "done":
            fields["finished_at"] = utcnow()
        reg.update_run(self.run_id, **fields)
        stopped_by = self.stop_signal or ("max_steps" if status == "interrupted" else None)
        return {"run_id": self.run_id, "status": status, "epochs_done": self.epoch - 1,
                "checkpoint": str(self.checkpoint_path), "signal": self.stop_signal, "stopped_by": stopped_by,
                "steps": self.steps_this_call}

    def _set_bar_epoch(self, bar) -> None:
        bar.set_description(f"{self.cfg.method.name} {self.cfg.split} run {self.run_id} "
                            f"epoch {min(self.epoch, self.cfg.method.epochs)}/{self.cfg.method.epochs}")

    def run_epoch(self, interrupt: dict | None = None, bar=None) -> bool:
        """Run (the rest of) the current epoch; False if stopped early by a signal or max_steps."""
        t0 = time.perf_counter()
        if self.step_in_epoch == 0:
            if self._should_stop(interrupt):  # before this epoch's order is drawn: a resume draws it
                return False
            self.method.on_epoch_start(self.epoch)
            self.perm = torch.randperm(self.n, generator=self.order_gen)
            self.loss_sum = torch.zeros((), device=self.device)
            self.step_losses.zero_()
            self.epoch_elapsed = 0.0
        perm = self.perm.to(self.device)
        for module in self.method.modules().values():
            module.train()
        while self.step_in_epoch < self.steps_per_epoch:
            if self._should_stop(interrupt):
                spent = self._sync_time(t0)
                self.wall_time += spent
                self.epoch_elapsed += spent
                return False
            loss, batch_len = self._step(perm)
            self.loss_sum += loss.detach() * batch_len
            self.step_losses[self.step_in_epoch] = loss.detach()
            self.step_in_epoch += 1
            self.steps_this_call += 1
            if bar is not None:
                bar.update(1)
        self._end_epoch(t0, bar)
        return True

    def _should_stop(self, interrupt: dict | None) -> bool:
        return bool((interrupt and interrupt["stop"]) or self._lease_lost() or (
            self.cfg.max_steps is not None and self.steps_this_call >= self.cfg.max_steps))

    def _check_finite(self) -> None:
        """Raise DivergedError naming the first non-finite step loss of this epoch (one device sync)."""
        if bool(torch.isfinite(self.loss_sum)):
            return
        bad = (~torch.isfinite(self.step_losses[:self.step_in_epoch])).nonzero()
        step = int(bad[0]) if len(bad) else self.step_in_epoch - 1
        value = float(self.step_losses[step])
        last = self.registry.latest_checkpoint(self.run_id)
        kept = f"the last good checkpoint (epoch {last['epoch']}) is kept" if last else "no checkpoint was saved"
        raise DivergedError(f"training diverged: loss {value} at epoch {self.epoch}, step {step + 1} of "
                            f"{self.steps_per_epoch} (lr {self.last_lr:.4g}); {kept}. Lower --lr or check the data")

    def _batch(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        bs = self.cfg.method.batch_size
        return perm[step * bs:(step + 1) * bs]

    def _views(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        """This step's views: made ahead during the previous step, or now (first step of an epoch)."""
        if self.pending is not None:
            epoch, at, views, ready = self.pending
            self.pending = None
            if (epoch, at) == (self.epoch, step):
                if ready is not None:  # made on the side stream: wait for it, keep its memory alive
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(ready)
                    views.record_stream(main)
                return views
            self.aug_gen.set_state(self.pending_aug_state)  # made for another step: undo its draws
        return self._augment(self._batch(perm, step))

    def _augment(self, batch: torch.Tensor) -> torch.Tensor:
        return self.method.step_views(self.images[batch], batch, self.epoch, self.aug_gen)

    def _prefetch_views(self, perm: torch.Tensor, step: int) -> None:
        """Augment `step`'s batch now; on CUDA on a side stream, so it overlaps this step's training."""
        self.pending_aug_state = self.aug_gen.get_state()
        batch = self._batch(perm, step)
        if self.aug_stream is None:
            views, ready = self._augment(batch), None
        else:
            self.aug_stream.wait_stream(torch.cuda.current_stream(self.device))  # perm and w are written
            with torch.cuda.stream(self.aug_stream):
                views = self._augment(batch)
                ready = torch.cuda.Event()
                ready.record(self.aug_stream)
        self.pending = (self.epoch, step, views, ready)

    def _step(self, perm: torch.Tensor) -> tuple[torch.Tensor, int]:
        mc = self.cfg.method
        it = (self.epoch - 1) * self.steps_per_epoch + self.step_in_epoch + 1
        lr = lr_at(it, self.total_steps, self.warmup_steps, mc.lr, mc.final_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self._batch(perm, self.step_in_epoch)
        views = self._views(perm, self.step_in_epoch)
        # within an epoch the views depend only on the generator, the data order and BCL's
        # weights (fixed until the epoch ends), so the next batch can be augmented already
        if self.cfg.overlap_augment and self.step_in_epoch + 1 < self.steps_per_epoch:
            self._prefetch_views(perm, self.step_in_epoch + 1)
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten now
        with autocast(self.device, self.precision):
            loss, _ = self.method.step_loss(views, batch)
        with record_function("harness/backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("harness/optimizer"):
            self.optimizer.step()
        self.last_lr = lr
        return loss, len(batch)

    def _weight_by_class(self) -> list | None:
        """BCL: the mean sample weight of each class (None for a class without images); other methods: None."""
        w = getattr(self.method, "w", None)
        if not isinstance(w, torch.Tensor) or w.shape != self.labels.shape:
            return None
        k = len(self.class_counts)
        sums = torch.zeros(k, device=w.device, dtype=torch.float64).index_add_(0, self.labels.long(), w.double())
        counts = torch.as_tensor(self.class_counts, dtype=torch.float64)
        return [float(v) if n else None for v, n in zip((sums.cpu() / counts.clamp(min=1)).tolist(), self.class_counts)]

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _end_epoch(self, t0: float, bar) -> None:
        mc, epoch = self.cfg.method, self.epoch
        self._check_finite()  # before the epoch's hook, its row or a checkpoint
        stats = self.method.on_epoch_end(epoch)
        spent = self._sync_time(t0)  # one device sync per epoch
        self.wall_time += spent
        epoch_time = self.epoch_elapsed + spent  # a resumed epoch counts its time before the stop too
        metrics: dict[str, Any] = {"loss": (self.loss_sum / self.n).item(), "lr": self.last_lr,
                                   "epoch_time_s": epoch_time, "images_per_s": self.n / epoch_time}
        # BCL's w_* statistics are logged as weight_*; a method's other statistics keep their names
        metrics.update({f"weight_{k[2:]}" if k.startswith("w_") else k: v for k, v in stats.items()})
        if epoch % self.cfg.checkpoint_every == 0 or epoch == mc.epochs:
            by_class = self._weight_by_class()
            if by_class is not None:
                metrics["weight_by_class"] = by_class
        if self.cfg.monitor_every and (epoch % self.cfg.monitor_every == 0 or epoch == mc.epochs):
            metrics["knn_top1"] = knn_monitor(self.method.probed_network(), self.images, self.labels, self.test_images,
                                              self.test_labels, self.precision, num_classes=self.num_classes)
        # the epoch is over in the state first: a checkpoint taken if the registry is unreachable
        # resumes after it and keeps its row (`unlogged`) for the registry
        self.epoch, self.step_in_epoch, self.perm = epoch + 1, 0, None
        self.unlogged = (epoch, metrics)
        self._hold_lease()
        self.registry.log_epoch(self.run_id, epoch, **metrics)
        self.unlogged = None
        self.registry.update_run(self.run_id, epochs_done=epoch, wall_time_s=self.wall_time)
        if epoch % self.cfg.checkpoint_every == 0 and epoch < mc.epochs:
            self.save()
        if bar is not None:
            post = {"loss": f"{metrics['loss']:.3f}", "img/s": f"{metrics['images_per_s']:.0f}"}
            if "knn_top1" in metrics:
                post["knn"] = f"{metrics['knn_top1']:.1f}"
            bar.set_postfix(post)
            self._set_bar_epoch(bar)


def train(cfg: TrainConfig | None, registry: Registry, resume: int | None = None, progress: bool = True,
          asked: dict[str, Any] | None = None) -> dict:
    return Trainer(cfg, registry, resume=resume, progress=progress, asked=asked).fit()


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise TrainError(f"--compile-mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def _count(lo: int):
    return lambda v: isinstance(v, int) and lo <= v < BIG


# (field, test, what it must be): checked before any work, so a typo never trains to "done"; the
# method's recipe is checked by its config class (MethodConfig.CHECKS and its subclasses')
LOOP_CHECKS = (
    ("checkpoint_every", _count(1), "an integer from 1 to 2^31"),
    ("monitor_every", _count(0), "an integer from 0 to 2^31 (0: off)"),
    ("monitor_size", _count(1), "an integer from 1 to 2^31"),
    ("subset", lambda v: v is None or _count(1)(v), "an integer from 1 to 2^31"),
    ("max_steps", lambda v: v is None or _count(1)(v), "an integer from 1 to 2^31"),
)


def option_label(cfg: MethodConfig, name: str, value: Any) -> str:
    """How the user sets a field: `--lr 0.5` for the shared recipe, `--set temperature=0.5` for the rest."""
    if name in MethodConfig.shared_fields():
        return f"--{name.replace('_', '-')} {value!r}"
    return f"--set {name}={value!r}"


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Refuse settings that cannot train (non-finite or out-of-range), naming the option."""
    bad = [f"{option_label(cfg.method, name, value)} (must be {what})" for name, value, what in cfg.method.problems()]
    bad += [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} (must be {what})"
            for name, ok, what in LOOP_CHECKS if not ok(getattr(cfg, name))]
    if bad:
        raise TrainError("invalid settings: " + "; ".join(bad))
    check_precision(cfg.precision)
    check_device_name(cfg.device)
    check_compile_mode(cfg.compile_mode)
    return cfg


def check_device_name(name: str) -> str:
    """auto, cpu, cuda or cuda:N: a one-line error for anything else (before any work)."""
    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise TrainError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name!r}: only cpu and cuda devices are supported")
    return name


def make_config(method: str, split: str = "1", options: Iterable[str] | dict[str, Any] | None = None,
                **overrides: Any) -> TrainConfig:
    """Paper defaults for `method`, with loop and recipe overrides by name (None = keep) and the method's
    own options (`--set NAME=VALUE` strings, or a dict of typed values); validated."""
    try:
        entry = methods_registry.get(method)
    except MethodError as e:
        raise TrainError(str(e)) from None
    mc = entry.default_config()
    if isinstance(options, dict):
        options = [f"{k}={v}" for k, v in options.items()]
    own = methods_registry.parse_options(entry.name, options or ())
    method_fields = {f.name for f in dataclasses.fields(entry.config_cls)} - {"name"}
    m_over = {**{k: v for k, v in overrides.items() if k in method_fields and v is not None}, **own}
    t_over = {k: v for k, v in overrides.items() if k not in method_fields and v is not None}
    unknown = set(t_over) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TrainError(f"unknown settings: {', '.join(sorted(unknown))}")
    mc = dataclasses.replace(mc, **m_over)
    check_tags(t_over.get("tags", ()), TrainError)  # before any data is loaded
    return validate_config(TrainConfig(method=mc, split=normalise_split_name(split), **t_over))

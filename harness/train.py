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
from typing import Any, Iterator

import numpy as np
import torch
from torch.profiler import record_function

from harness.errors import HarnessError
from harness.data import load_cifar100, sha256_file
from harness.registry import Registry, check_tags, utcnow
from harness.safeio import check_readable, load_torch
from harness.splits import load_split
from methods.base import METHODS, MethodConfig, build_method, default_config
from methods.schedule import lr_at

CHECKPOINT_FORMAT = 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TrainError(HarnessError):
    """A run that cannot start or resume; the message says what to do."""


@dataclass
class TrainConfig:
    """Loop settings; the method's hyper-parameters live in `method` (paper defaults)."""
    method: MethodConfig
    split: str = "split1"
    data_root: str = "data"
    splits_root: str | None = None
    device: str = "auto"
    precision: str = "auto"           # bf16 on CUDA, fp32 on CPU
    compile: bool = False
    compile_mode: str = "default"     # torch.compile mode (COMPILE_MODES) when compile is on
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = 50        # epochs; the last epoch is always saved
    monitor_every: int = 0            # kNN monitor every N epochs (0: off)
    monitor_size: int = 2000          # test images the kNN monitor classifies
    tags: list[str] = field(default_factory=list)
    max_steps: int | None = None      # stop after this many steps in this call (benchmarks, tests)
    overlap_augment: bool = True      # augment the next batch early (on CUDA: on a side stream)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        d = dict(d)
        d["method"] = MethodConfig(**d["method"])
        return TrainConfig(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise TrainError(f"--precision {precision!r}: choose bf16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def environment(device: torch.device) -> tuple[str, dict, str | None]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import torchvision
        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return name, versions, rev


# -- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> str:
    """Write atomically (temp file, then rename) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> dict:
    """A training checkpoint, loaded with weights_only=True (tensors, dicts, lists, plain values):
    a checkpoint file may come from anywhere, and loading it never runs code."""
    path = Path(path)
    check_readable(path, TrainError, hints={errno.ENOENT: "; it may have been moved or deleted "
                                            "(start a new run instead of --resume)"})
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise TrainError(f"checkpoint {path} does not match the sha256 in the registry: "
                         "the file was changed or is corrupt")
    ckpt = load_torch(path, TrainError, "training checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {path} is not a harness training checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else '?'}, expected {CHECKPOINT_FORMAT})")
    return ckpt


# -- data -------------------------------------------------------------------------------------

def normalise_split_name(split: str) -> str:
    return f"split{split}" if split.isdigit() else split


def load_pretraining_images(cfg: TrainConfig, device: torch.device):
    """The split's uint8 images on the device (9,754 images are 30 MB), their labels, the dataset."""
    data = load_cifar100(Path(cfg.data_root))
    idx = load_split(cfg.split, Path(cfg.splits_root) if cfg.splits_root else None,
                     num_images=len(data.train_labels))
    images = torch.from_numpy(data.train_images[idx]).to(device)
    return images, data.train_labels[idx], data


# -- the cheap monitor ------------------------------------------------------------------------

@torch.no_grad()
def knn_monitor(net, bank_images, bank_labels, query_images, query_labels, precision, k: int = 20,
                batch: int = 1024) -> float:
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
    votes = torch.zeros(len(fq), 100, device=device)
    votes.scatter_add_(1, bank_labels[nn_idx], (sim / 0.07).exp())
    acc = (votes.argmax(1) == query_labels).float().mean().item() * 100
    net.train(was_training)
    return acc


# -- the loop ---------------------------------------------------------------------------------

@contextmanager
def deferred_interrupt() -> Iterator[dict]:
    """Turn the first Ctrl-C into a flag checked between steps; a second one aborts at once."""
    flag = {"stop": False}
    if threading_main():
        def handler(signum, frame):
            if flag["stop"]:
                raise KeyboardInterrupt
            flag["stop"] = True
        old = signal.signal(signal.SIGINT, handler)
        try:
            yield flag
        finally:
            signal.signal(signal.SIGINT, old)
    else:  # signal handlers only work in the main thread
        yield flag


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


class Trainer:
    """Holds one run's state; `fit()` runs (or continues) it to the end or to max_steps."""

    def __init__(self, cfg: TrainConfig, registry: Registry, resume: int | None = None,
                 progress: bool = True):
        self.registry, self.progress = registry, progress
        ckpt = None
        if resume is not None:
            run = registry.get_run(resume)
            art = registry.latest_checkpoint(resume)
            if art is None:
                raise TrainError(f"run {resume} has no checkpoint to resume from (status {run['status']}); "
                                 "start a new run")
            ckpt = load_checkpoint(Path(art["path"]), art["sha256"])
            saved = TrainConfig.from_dict(ckpt["train_config"])
            if ckpt["run_id"] != resume or saved.method.name != run["method"]:
                raise TrainError(f"checkpoint {art['path']} belongs to run {ckpt['run_id']} "
                                 f"({saved.method.name}), not run {resume} ({run['method']})")
            cfg = self._merge_resume(saved, cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        mc = cfg.method

        self.images, labels, data = load_pretraining_images(cfg, self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.test_images = torch.from_numpy(data.test_images[:cfg.monitor_size]).to(self.device)
        self.test_labels = torch.from_numpy(data.test_labels[:cfg.monitor_size]).to(self.device)
        self.n = len(self.images)
        self.steps_per_epoch = math.ceil(self.n / mc.batch_size)  # the last partial batch is kept
        self.total_steps = mc.epochs * self.steps_per_epoch
        self.warmup_steps = mc.warmup_epochs * self.steps_per_epoch

        torch.manual_seed(mc.seed)  # model initialisation
        self.method = build_method(mc.name, mc, num_samples=self.n, device=self.device)
        if self.device.type == "cuda":
            self.method.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.method.net.parameters(), lr=mc.lr, momentum=mc.momentum,
                                         weight_decay=mc.weight_decay)
        if cfg.compile:
            self.method.compile(mode=cfg.compile_mode)
        self.order_gen = torch.Generator().manual_seed(mc.seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(mc.seed + 1)
        self.epoch, self.step_in_epoch, self.perm = 1, 0, None  # position of the next step
        self.loss_sum = torch.zeros((), device=self.device)   # this epoch's summed loss so far
        self.wall_time = 0.0
        self.last_lr: float | None = None
        self.steps_this_call = 0
        # the next step's views, made while this step trains: (epoch, step, views, ready event),
        # and the augmentation generator's state from before they were drawn (what a checkpoint keeps)
        self.pending: tuple | None = None
        self.pending_aug_state: torch.Tensor | None = None
        self.aug_stream = (torch.cuda.Stream(self.device)
                           if cfg.overlap_augment and self.device.type == "cuda" else None)

        if ckpt is None:
            dev_name, versions, rev = environment(self.device)
            self.run_id = registry.create_run(mc.name, cfg.split, mc.seed, mc.epochs, cfg.to_dict(),
                                              tags=cfg.tags, device=dev_name, versions=versions,
                                              git_rev=rev, status="running")
            registry.update_run(self.run_id, started_at=utcnow())
        else:
            self.run_id = resume
            self._restore(ckpt)
            registry.update_run(self.run_id, status="running", error=None)
        self.checkpoint_path = Path(cfg.checkpoint_dir) / f"run{self.run_id}" / "last.pt"

    @staticmethod
    def _merge_resume(saved: TrainConfig, asked: TrainConfig) -> TrainConfig:
        """A resumed run keeps its recipe; only where/how it runs may change."""
        return dataclasses.replace(saved, device=asked.device, compile=asked.compile,
                                   compile_mode=asked.compile_mode, overlap_augment=asked.overlap_augment,
                                   data_root=asked.data_root, splits_root=asked.splits_root,
                                   checkpoint_dir=asked.checkpoint_dir, max_steps=asked.max_steps)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "run_id": self.run_id, "method": self.cfg.method.name,
            "split": self.cfg.split, "config": self.cfg.method.to_dict(), "train_config": self.cfg.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "epochs_done": self.epoch - 1, "perm": self.perm, "loss_sum": self.loss_sum.cpu(), "model": self.method.net.state_dict(),
            "optimizer": self.optimizer.state_dict(), "method_state": self.method.state_dict(),
            "rng": {"order": self.order_gen.get_state(), "torch": torch.get_rng_state(),
                    # views made ahead of time are not saved: the resumed run draws them again
                    "aug": self.pending_aug_state if self.pending is not None else self.aug_gen.get_state()},
            "wall_time_s": self.wall_time, "num_samples": self.n,
        }

    def _restore(self, ckpt: dict) -> None:
        if ckpt["num_samples"] != self.n:
            raise TrainError(f"checkpoint was trained on {ckpt['num_samples']} images, split "
                             f"{self.cfg.split!r} has {self.n}: wrong split or data")
        try:
            self.method.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.method.load_state_dict(ckpt["method_state"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainError(f"checkpoint is incompatible with method {self.cfg.method.name}: "
                             f"{str(e).splitlines()[0]}") from None
        self.order_gen.set_state(ckpt["rng"]["order"])
        self.aug_gen.set_state(ckpt["rng"]["aug"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.epoch, self.step_in_epoch, self.perm = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["perm"]
        self.loss_sum = ckpt["loss_sum"].to(self.device)
        self.wall_time = ckpt["wall_time_s"]

    def save(self) -> None:
        sha = save_checkpoint(self.checkpoint_path, self.state())
        done = self.epoch - 1
        self.registry.add_artifact(self.run_id, "checkpoint", str(self.checkpoint_path), sha, epoch=done)

    # -- training ---------------------------------------------------------------------------
    def fit(self) -> dict:
        mc, reg = self.cfg.method, self.registry
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=mc.epochs, initial=self.epoch - 1, unit="epoch", dynamic_ncols=True,
                       desc=f"{mc.name} {self.cfg.split} run {self.run_id}")
        self.steps_this_call = 0
        try:
            with deferred_interrupt() as interrupt:
                while self.epoch <= mc.epochs and self.run_epoch(interrupt, bar):
                    pass
            status = "done" if self.epoch > mc.epochs else "interrupted"
        except KeyboardInterrupt:  # second Ctrl-C: the step may be half done, keep the last checkpoint
            reg.update_run(self.run_id, status="interrupted", wall_time_s=self.wall_time)
            raise
        except Exception as e:
            reg.update_run(self.run_id, status="failed", error=f"{e.__class__.__name__}: {e}",
                           wall_time_s=self.wall_time)
            raise
        finally:
            if bar is not None:
                bar.close()
        self.save()
        fields: dict[str, Any] = {"status": status, "wall_time_s": self.wall_time,
                                  "epochs_done": self.epoch - 1}
        if status == "done":
            fields["finished_at"] = utcnow()
        reg.update_run(self.run_id, **fields)
        return {"run_id": self.run_id, "status": status, "epochs_done": self.epoch - 1,
                "checkpoint": str(self.checkpoint_path)}

    def run_epoch(self, interrupt: dict | None = None, bar=None) -> bool:
        """Run (the rest of) the current epoch; False if stopped early by Ctrl-C or max_steps."""
        t0 = time.perf_counter()
        if self.step_in_epoch == 0:
            self.method.on_epoch_start(self.epoch)
            self.perm = torch.randperm(self.n, generator=self.order_gen)
            self.loss_sum = torch.zeros((), device=self.device)
        perm = self.perm.to(self.device)
        self.method.net.train()
        while self.step_in_epoch < self.steps_per_epoch:
            if (interrupt and interrupt["stop"]) or (self.cfg.max_steps is not None
                                                     and self.steps_this_call >= self.cfg.max_steps):
                self.wall_time += self._sync_time(t0)
                return False
            loss, batch_len = self._step(perm)
            self.loss_sum += loss.detach() * batch_len
            self.step_in_epoch += 1
            self.steps_this_call += 1
        self._end_epoch(t0, bar)
        return True

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

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _end_epoch(self, t0: float, bar) -> None:
        mc, epoch = self.cfg.method, self.epoch
        stats = self.method.on_epoch_end(epoch)
        epoch_time = self._sync_time(t0)  # one device sync per epoch
        self.wall_time += epoch_time
        metrics: dict[str, Any] = {"loss": (self.loss_sum / self.n).item(), "lr": self.last_lr,
                                   "epoch_time_s": epoch_time, "images_per_s": self.n / epoch_time}
        metrics.update({k.replace("w_", "weight_"): v for k, v in stats.items()})
        if self.cfg.monitor_every and (epoch % self.cfg.monitor_every == 0 or epoch == mc.epochs):
            metrics["knn_top1"] = knn_monitor(self.method.net, self.images, self.labels, self.test_images,
                                              self.test_labels, self.precision)
        self.registry.log_epoch(self.run_id, epoch, **metrics)
        self.epoch, self.step_in_epoch, self.perm = epoch + 1, 0, None
        self.registry.update_run(self.run_id, epochs_done=epoch, wall_time_s=self.wall_time)
        if epoch % self.cfg.checkpoint_every == 0 and epoch < mc.epochs:
            self.save()
        if bar is not None:
            post = {"loss": f"{metrics['loss']:.3f}", "img/s": f"{metrics['images_per_s']:.0f}"}
            if "knn_top1" in metrics:
                post["knn"] = f"{metrics['knn_top1']:.1f}"
            bar.set_postfix(post)
            bar.update(1)


def train(cfg: TrainConfig, registry: Registry, resume: int | None = None, progress: bool = True) -> dict:
    return Trainer(cfg, registry, resume=resume, progress=progress).fit()


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise TrainError(f"--compile-mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def make_config(method: str, split: str = "1", **overrides: Any) -> TrainConfig:
    """Paper defaults for `method`, with loop and recipe overrides by name (None = keep)."""
    try:
        mc = default_config(method)
    except ValueError:
        raise TrainError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}") from None
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
    m_over = {k: v for k, v in overrides.items() if k in method_fields and v is not None}
    t_over = {k: v for k, v in overrides.items() if k not in method_fields and v is not None}
    unknown = set(t_over) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TrainError(f"unknown settings: {', '.join(sorted(unknown))}")
    mc = dataclasses.replace(mc, **m_over)
    if mc.epochs < 1 or mc.batch_size < 1:
        raise TrainError("--epochs and --batch-size must be at least 1")
    check_compile_mode(t_over.get("compile_mode", "default"))
    check_tags(t_over.get("tags", ()), TrainError)  # before any data is loaded
    return TrainConfig(method=mc, split=normalise_split_name(split), **t_over)

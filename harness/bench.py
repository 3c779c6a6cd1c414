"""`harness bench`: how fast the harness trains and probes, against the compute limit of
the backbone (measured in the same process) and the authors' code (SPEC 9).

Throughput is counted in image passes (forward + backward of one 32x32 view): every
method runs two views of each pretraining image per epoch.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from harness.registry import Registry
from harness.train import Trainer, autocast, check_compile_mode, make_config, resolve_device, resolve_precision

# The authors' code on one H200 with 16 CPU cores, 8 loader workers, split 1 (SPEC 9).
REFERENCE = {
    "device": "NVIDIA H200, the authors' code (16 CPU cores, 8 loader workers, split 1)",
    "seconds_per_epoch": {"simclr": 3.3, "bcl-i": 3.6, "sdclr": 3.65, "bcl-d": 4.0},
    "probe_seconds_one_full_shot": 30.0,
    "peak_memory_gb": 9.5,
    "compute_limit_img_s": {"fp32": 23_400, "bf16": 67_700, "bf16+compile": 92_100},
}
PAPER_EPOCHS = 2000
TINY_WIDTH = 16


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = ("simclr", "sdclr", "bcl-i", "bcl-d")
    split: str = "1"
    data_root: str = "data"
    splits_root: str | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    profile: bool = False        # one more epoch per method under torch.profiler: time per phase
    overlap_augment: bool = True  # False: augment each batch in turn (to measure what overlap gains)
    batch_size: int = 512
    warmup_epochs: int = 2       # untimed: compilation, cuDNN autotuning, BCL memory filled
    timed_epochs: int = 3
    probe_epochs: int = 500
    limit_steps: int = 30
    tiny: bool = False           # CPU: a small split, a narrow network, few steps; figures not comparable
    width: int = 64              # ResNet-18 width (paper: 64); tiny settings use TINY_WIDTH


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_limit(device: torch.device, precision: str, compile: bool, batch: int, steps: int,
                  compile_mode: str = "default", width: int = 64) -> float:
    """Image passes/s of plain ResNet-18 + head train steps on device-resident random batches."""
    from methods.models import build_network

    net = build_network("simclr", width).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fwd = torch.compile(net, mode=compile_mode, dynamic=False) if compile else net
    x = torch.rand(batch, 3, 32, 32, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        if compile and compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, precision):
            loss = fwd(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 5)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def bench_method(name: str, s: BenchSettings, data_root: str, split: str) -> dict:
    device = resolve_device(s.device)
    epochs = PAPER_EPOCHS if not s.tiny else 10
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(f"sqlite:///{tmp}/bench.db")
        cfg = make_config(name, split, epochs=epochs, batch_size=s.batch_size, width=s.width, device=s.device,
                          precision=s.precision, compile=s.compile, compile_mode=s.compile_mode,
                          overlap_augment=s.overlap_augment, data_root=data_root,
                          splits_root=s.splits_root, checkpoint_dir=tmp, checkpoint_every=10**9)
        tr = Trainer(cfg, reg, progress=False)
        for _ in range(s.warmup_epochs):
            tr.run_epoch()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(s.timed_epochs):
            tr.run_epoch()
        _sync(device)
        epoch_s = (time.perf_counter() - t0) / s.timed_epochs
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        profile = profile_epoch(tr) if s.profile else None
        losses = [e["loss"] for e in reg.epochs(tr.run_id)]
    r = {"method": name, "images": tr.n, "steps_per_epoch": tr.steps_per_epoch, "seconds_per_epoch": epoch_s,
         "images_per_s": tr.n / epoch_s, "image_passes_per_s": 2 * tr.n / epoch_s,
         # a 2,000-epoch projection of tiny CPU settings would mean nothing
         "projected_2000_epochs_min": None if s.tiny else epoch_s * PAPER_EPOCHS / 60, "peak_memory_gb": peak,
         "losses": losses}
    if profile is not None:
        r["profile"] = profile
    return r


PHASE_PREFIX = "harness/"  # the record_function ranges of methods/ and harness/train.py


def profile_epoch(tr: Trainer) -> dict:
    """One epoch under torch.profiler: host (CPU) and device (kernel) milliseconds per step for
    each ``harness/<phase>`` range, the epoch's total kernel time and its wall time.

    On CUDA the backward's kernels are launched from autograd's device thread, not inside the
    ``backward`` range: they are counted apart, as ``backward (autograd thread)``. Per-epoch
    phases (prune, bcl-weights) are divided by the steps too, so the rows add up to a step.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = tr.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(tr.device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        tr.run_epoch()
        _sync(tr.device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    steps = tr.steps_per_epoch
    phases: dict[str, dict] = {}
    top_device_us = autograd_device_us = 0.0
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if e.name.startswith(PHASE_PREFIX):
            p = phases.setdefault(e.name[len(PHASE_PREFIX):], {"calls": 0, "host_ms": 0.0, "device_ms": 0.0})
            p["calls"] += 1
            p["host_ms"] += e.cpu_time_total / 1e3
            p["device_ms"] += e.device_time_total / 1e3 if cuda else 0.0
        if cuda and e.cpu_parent is None:  # every kernel hangs under exactly one top-level host event
            top_device_us += e.device_time_total
            if e.name.startswith("autograd::engine"):
                autograd_device_us += e.device_time_total
    if cuda:
        phases["backward (autograd thread)"] = {"calls": 0, "host_ms": 0.0, "device_ms": autograd_device_us / 1e3}
    per_step = {k: {"calls_per_step": v["calls"] / steps, "host_ms": v["host_ms"] / steps,
                    "device_ms": v["device_ms"] / steps} for k, v in phases.items()}
    return {"steps": steps, "wall_ms_per_step": wall_ms / steps,
            "device_ms_per_step": top_device_us / 1e3 / steps if cuda else None, "phases": per_step}


def bench_probes(device: torch.device, probe_epochs: int, tiny: bool, width: int = 64) -> dict:
    """Feature extraction of 50k train + 10k test images and the 11 probes (1 full, 5x100, 5x50)
    on features of the real sizes; timing does not depend on the pixel values."""
    from harness.probe import ProbeConfig, ProbeSpec, extract_features, run_probes
    from methods.models import build_network

    g = torch.Generator().manual_seed(0)
    n_train, n_test = (600, 100) if tiny else (50_000, 10_000)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    net = build_network("bcl-d", width).to(device)
    _sync(device)
    t0 = time.perf_counter()
    feats = extract_features(net, images, device, bf16=device.type == "cuda")
    _sync(device)
    t_feat = time.perf_counter() - t0
    labels = torch.randint(0, 100, (n_train + n_test,), generator=g).to(device)
    sizes = [("full", 0, 40_000)] + [("100", k, 10_000) for k in range(1, 6)] + [("50", k, 5_000) for k in range(1, 6)]
    if tiny:
        sizes = [(k, s, n // 100) for k, s, n in sizes]
    specs = [ProbeSpec(kind, sub, torch.randperm(n_train, generator=g)[:n].to(device), 1000 + i)
             for i, (kind, sub, n) in enumerate(sizes)]
    _sync(device)
    t0 = time.perf_counter()
    run_probes(specs, feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:], None,
               ProbeConfig(epochs=probe_epochs))
    _sync(device)
    return {"feature_seconds": t_feat, "probe_seconds": time.perf_counter() - t0, "probes": len(specs),
            "probe_epochs": probe_epochs}


def tiny_split(data_root: str) -> tuple[str, str]:
    """A 128-image split of whatever data is there (synthetic if none): for CPU runs."""
    from harness import data as data_mod

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        labels = data_mod.load_cifar100(Path(data_root)).train_labels
        root = data_root
    except data_mod.DataError:
        root = str(tmp / "data")
        labels = data_mod.make_synthetic(Path(root), per_class=3).train_labels
    idx = np.sort(np.random.default_rng(0).choice(len(labels), min(128, len(labels)), replace=False))
    np.save(tmp / "tiny.npy", idx)
    return root, str(tmp / "tiny.npy")


def command_line() -> str:
    """The command as a user would type it (`harness ...` also when run as python -m harness.cli)."""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"harness {args}" if sys.argv[0].endswith(("harness", "cli.py")) else " ".join(sys.argv)


def run_bench(s: BenchSettings, log=print) -> dict:
    device = resolve_device(s.device)
    precision = resolve_precision(s.precision, device)
    check_compile_mode(s.compile_mode)
    if device.type != "cuda" and not s.tiny:
        log(f"no CUDA device: running with tiny settings (128-image split, width-{TINY_WIDTH} network, "
            "batch 64, 1+1 epochs, 10 probe epochs); the figures say nothing about GPU speed, so no "
            "comparison with the reference or the compute limit is printed")
        s.tiny = True
    if s.tiny:
        s.batch_size, s.warmup_epochs, s.timed_epochs = min(s.batch_size, 64), 1, 1
        s.width = min(s.width, TINY_WIDTH)
        s.probe_epochs, s.limit_steps = min(s.probe_epochs, 10), 3
        data_root, split = tiny_split(s.data_root)
    else:
        data_root, split = s.data_root, s.split
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
           "precision": precision, "overlap_augment": s.overlap_augment, "compile": s.compile, "compile_mode": s.compile_mode if s.compile else None,
           "batch_size": s.batch_size, "tiny": s.tiny, "width": s.width,
           "split": split if not s.tiny else "tiny (128 images)",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(),
           "versions": {"torch": torch.__version__, "python": platform.python_version(),
                        "cuda": torch.version.cuda}, "reference": REFERENCE, "methods": []}
    log(f"compute limit: ResNet-18 train steps, batch {2 * s.batch_size}, {precision}"
        f"{compile_label(s.compile, s.compile_mode)} ...")
    out["compute_limit_img_s"] = compute_limit(device, precision, s.compile, 2 * s.batch_size, s.limit_steps,
                                               s.compile_mode, s.width)
    for name in s.methods:
        log(f"{name}: {s.warmup_epochs} warm-up + {s.timed_epochs} timed epochs ...")
        r = bench_method(name, s, data_root, split)
        r["ratio_to_limit"] = r["image_passes_per_s"] / out["compute_limit_img_s"]
        ref = REFERENCE["seconds_per_epoch"].get(name)  # the authors' code has the paper's four methods
        if not s.tiny and ref is not None:  # their H200 figures compare only with full-size settings
            r["reference_seconds_per_epoch"] = ref
            r["speedup_vs_reference"] = ref / r["seconds_per_epoch"]
        out["methods"].append(r)
    log(f"probes: {s.probe_epochs} epochs ...")
    out["probes"] = bench_probes(device, s.probe_epochs, s.tiny, s.width)
    out["targets"] = [] if s.tiny else target_rows(out)
    return out


def target_rows(r: dict) -> list[dict]:
    """The speed targets of an H100/H200-class GPU, each with its measured value and verdict.
    SimCLR's share is of the compiled limit measured in this process when the bench ran with
    --compile, else of the reference compiled limit of an H200 (said in the row)."""
    by = {m["method"]: m for m in r["methods"]}
    rows = []
    if "simclr" in by:
        if r["compile"]:
            limit, source = r["compute_limit_img_s"], "measured here"
        else:
            limit, source = REFERENCE["compute_limit_img_s"]["bf16+compile"], "the reference H200 figure"
        share = by["simclr"]["image_passes_per_s"] / limit
        rows.append({"key": "simclr_share", "target": "SimCLR >= 50% of the compiled compute limit", "met": share >= 0.5,
                     "value": f"{share:.0%} of {limit:,.0f} img/s ({source})"})
    if "simclr" in by and "bcl-d" in by:
        ratio = by["bcl-d"]["seconds_per_epoch"] / by["simclr"]["seconds_per_epoch"]
        rows.append({"key": "bcld_ratio", "target": "BCL-D epoch <= 1.3x SimCLR's", "met": ratio <= 1.3, "value": f"{ratio:.2f}x"})
    p = r["probes"]
    probe_s = p["probe_seconds"] + p["feature_seconds"]
    if p["probe_epochs"] == 500:
        rows.append({"key": "probe_set", "target": "probe set (11 x 500 epochs, features included) < 30 s", "met": probe_s < 30,
                     "value": f"{probe_s:.1f} s"})
        if "bcl-d" in by:
            run_min = (by["bcl-d"]["seconds_per_epoch"] * PAPER_EPOCHS + probe_s) / 60
            rows.append({"key": "bcld_run", "target": "2,000 BCL-D epochs + evaluation < 15 min", "met": run_min < 15,
                         "value": f"{run_min:.1f} min (checkpoint writes not included)"})
    return rows


def compile_label(compile: bool, mode: str | None) -> str:
    if not compile:
        return ""
    return " + compile" + (f" ({mode})" if mode and mode != "default" else "")


def format_profile(r: dict) -> list[str]:
    """The per-phase table of every profiled method (host and device ms per step)."""
    rows = [m for m in r["methods"] if "profile" in m]
    if not rows:
        return []
    lines = ["", "profile (one extra epoch under torch.profiler; ms per step, per-epoch phases spread over "
             "the steps; host = CPU time in the range, device = its kernels' time):"]
    head = f"{'method':<8} {'phase':<28} {'calls':>6} {'host ms':>8} {'device ms':>10}"
    lines += [head, "-" * len(head)]
    for m in rows:
        p = m["profile"]
        for i, (phase, v) in enumerate(p["phases"].items()):
            dev = f"{v['device_ms']:.2f}" if p["device_ms_per_step"] is not None else "-"
            lines.append(f"{m['method'] if i == 0 else '':<8} {phase:<28} {v['calls_per_step']:>6.2f} "
                         f"{v['host_ms']:>8.2f} {dev:>10}")
        busy = p["device_ms_per_step"]
        tail = (f"kernels {busy:.2f} ms ({busy / p['wall_ms_per_step']:.0%} of wall; streams add up)"
                if busy is not None
                else "no device trace (CPU run)")
        lines.append(f"{'':<8} {'= step, wall':<28} {'':>6} {p['wall_ms_per_step']:>8.2f}   {tail}")
    return lines


def format_bench(r: dict) -> str:
    label = compile_label(r['compile'], r.get('compile_mode'))
    if not r.get("overlap_augment", True):
        label += ", augmentation not overlapped"
    tiny = r["tiny"]
    lines = [f"device {r['device']}, {r['precision']}{label}, batch {r['batch_size']}, split {r['split']}"
             + (f", width {r.get('width')}  [TINY CPU SETTINGS: not comparable to GPU figures]" if tiny else ""),
             f"compute limit (ResNet-18 train steps on resident random batches): "
             f"{r['compute_limit_img_s']:,.0f} image passes/s", ""]
    head = f"{'method':<8} {'img/s':>9} {'passes/s':>10} {'s/epoch':>8}"
    if not tiny:
        head += f" {'2000 ep':>9} {'peak GB':>8} {'of limit':>9} {'ref s/ep':>9} {'speed-up':>9}"
    lines += [head, "-" * len(head)]
    for m in r["methods"]:
        row = (f"{m['method']:<8} {m['images_per_s']:>9,.0f} {m['image_passes_per_s']:>10,.0f} "
               f"{m['seconds_per_epoch']:>8.3f}")
        if not tiny:
            peak = f"{m['peak_memory_gb']:.1f}" if m["peak_memory_gb"] is not None else "-"
            row += f" {m['projected_2000_epochs_min']:>7.1f} m {peak:>8} {m['ratio_to_limit']:>8.0%} "
            row += (f"{m['reference_seconds_per_epoch']:>9.2f} {m['speedup_vs_reference']:>8.1f}x"
                    if "reference_seconds_per_epoch" in m else f"{'-':>9} {'-':>9}")
        lines.append(row)
    by = {m["method"]: m for m in r["methods"]}
    if "simclr" in by and "bcl-d" in by:
        lines.append(f"\nBCL-D / SimCLR epoch time: {by['bcl-d']['seconds_per_epoch'] / by['simclr']['seconds_per_epoch']:.2f}x")
    p = r["probes"]
    probe = f"probe set: {p['probes']} probes x {p['probe_epochs']} epochs in {p['probe_seconds']:.1f} s " \
            f"+ features {p['feature_seconds']:.1f} s"
    if not tiny:
        probe += f" (reference: ~{REFERENCE['probe_seconds_one_full_shot']:.0f} s for one full-shot probe)"
    lines.append(probe)
    if not tiny:
        lines.append(f"reference figures: {REFERENCE['device']}")
    if r.get("targets"):
        lines += ["", "targets (H100/H200 class):"]
        lines += [f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']}" for t in r["targets"]]
    return "\n".join(lines + format_profile(r))


def write_json(r: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2) + "\n")

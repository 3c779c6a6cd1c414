"""Every registered method through the whole pipeline: train, a real interrupt, exact resume, eval,
report. Parametrized from the method registry, so a method added later (a file in methods/, or an
installed plugin) is covered without writing a test. Tiny settings: width 4, 24 images, 6 steps."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import data, splits
from harness.evaluate import evaluate_run
from harness.registry import Registry
from harness.report import render_report
from harness.train import Trainer, load_checkpoint, make_config, train
from methods import registry
from methods.base import stray_parameters, trained_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH, STOP_AFTER = 3, 4  # 24 images in batches of 8; the stop lands inside epoch 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data (1 image per class), a 24-image pretraining split and a full-shot probe list."""
    tmp = tmp_path_factory.mktemp("conformance")
    d = data.make_synthetic(tmp / "data", per_class=1, test_per_class=1)
    np.save(tmp / "split.npy", np.arange(24))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(splits.GENERATED_ENV_VAR, str(tmp / "generated"))
        splits.save_generated("conf_full", np.arange(len(d.train_labels)), "probe-full", "every image")
        yield SimpleNamespace(root=tmp / "data", split=str(tmp / "split.npy"), family="conf")


def tiny(world, name, folder, **kw):
    return make_config(name, world.split, epochs=2, batch_size=8, width=4, warmup_epochs=1, monitor_size=16,
                       data_root=str(world.root), checkpoint_dir=str(folder), **kw)


def interrupt_after(trainer: Trainer, steps: int) -> None:
    """Send this process a real SIGINT during step `steps` (the trainer's handler turns it into a stop
    between steps, as a Ctrl-C does)."""
    step_loss, done = trainer.method.step_loss, [0]

    def counting(views, indices):
        out = step_loss(views, indices)
        done[0] += 1
        if done[0] == steps:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer.method.step_loss = counting


def assert_equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", registry.names())
def test_method_conforms(world, tmp_path, name):
    entry = registry.get(name)
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    full = train(tiny(world, name, tmp_path / "a"), reg, progress=False)
    assert full["status"] == "done" and full["epochs_done"] == 2

    tr = Trainer(tiny(world, name, tmp_path / "b"), reg, progress=False)
    # what the method trains is what the optimizer sees and what the checkpoint holds
    modules = tr.method.modules()
    assert tr.method.probed in modules and tr.method.probed_network() is modules[tr.method.probed]
    assert stray_parameters(tr.method) == []
    optimized = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in optimized] == [id(p) for p in trained_parameters(tr.method)]
    assert len(optimized) == len({id(p) for m in modules.values() for p in m.parameters() if p.requires_grad})
    interrupt_after(tr, STOP_AFTER)
    part = tr.fit()
    assert (part["status"], part["signal"], part["epochs_done"]) == ("interrupted", "SIGINT", 1)
    ckpt = load_checkpoint(part["checkpoint"])
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (2, STOP_AFTER - STEPS_PER_EPOCH)
    rest = train(None, reg, resume=part["run_id"], progress=False, asked={})
    assert rest["status"] == "done" and rest["run_id"] == part["run_id"]

    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(rest["checkpoint"])
    assert set(a["modules"]) | {tr.method.probed} == set(modules)  # every module saved, by name
    for key in ("model", "modules", "method_state", "optimizer", "rng"):
        assert_equal(a[key], b[key], key)
    loss = lambda rid: [e["loss"] for e in reg.epochs(rid)]
    assert loss(full["run_id"]) == loss(rest["run_id"]) and all(np.isfinite(loss(rest["run_id"])))

    out = evaluate_run(reg, rest["run_id"], world.root, None, shots=("full",), epochs=2, device="cpu",
                       progress=False, probe_family=world.family)
    assert out["method"] == name and 0 <= out["summary"]["full"] <= 100

    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,))
    rows = [line for line in text.splitlines()[3:] if line and not line.startswith(("Excluded", "Runs", "Resumed", "Deviation"))]
    assert len(rows) == 1 and rows[0].startswith(entry.display_name + " ") and "(n=1)" in rows[0], text

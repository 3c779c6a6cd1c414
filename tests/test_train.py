"""The training loop end to end on CPU: every method, registry rows, checkpoints, exact resume."""
import os
import signal
import threading

import numpy as np
import pytest
import torch

from harness import data
from harness.registry import Registry
from harness.train import TrainError, Trainer, load_checkpoint, make_config, train
from tests.conftest import SHARED_CIFAR, has_real_cifar


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny split (48 images) of real CIFAR-100 when ../shared has it, else of synthetic data."""
    tmp = tmp_path_factory.mktemp("train")
    if has_real_cifar():
        root = SHARED_CIFAR
        labels = data.load_cifar100(root).train_labels
    else:
        root = tmp / "data"
        labels = data.make_synthetic(root, per_class=4).train_labels
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(labels), 48, replace=False))
    np.save(tmp / "tiny.npy", idx)
    return {"root": str(root), "split": str(tmp / "tiny.npy"), "tmp": tmp}


def config(tiny, method, tmp_path, **kw):
    """Tiny settings: a width-8 ResNet-18 catches every loop bug a full-width one does, ~20x faster."""
    kw = {"epochs": 2, "batch_size": 16, "warmup_epochs": 1, "monitor_size": 64, "width": 8, **kw}
    return make_config(method, tiny["split"], data_root=tiny["root"], checkpoint_dir=str(tmp_path / "ck"), **kw)


@pytest.mark.parametrize("method", ["simclr", "sdclr", "bcl-i", "bcl-d"])
def test_two_epochs_end_to_end(tiny, tmp_path, method):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    out = train(config(tiny, method, tmp_path, monitor_every=2), reg, progress=False)
    run = reg.get_run(out["run_id"])
    assert run["status"] == "done" and run["epochs_done"] == 2 and run["finished_at"] is not None
    assert run["config"]["method"]["name"] == method and run["versions"]["torch"] == torch.__version__
    epochs = reg.epochs(out["run_id"])
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(np.isfinite(e["loss"]) and e["images_per_s"] > 0 for e in epochs)
    assert "knn_top1" in epochs[-1]["extra"]
    # what the report's tables and plots read: class counts, the precision used, when each row was logged
    counts = np.asarray(run["config"]["class_counts"])
    assert counts.shape == (data.CIFAR100_CLASSES,) and counts.sum() == 48
    assert run["versions"]["precision"] == "fp32" and "container_image" in run["versions"]
    assert all(e["logged_at"] is not None for e in epochs) and epochs[0]["logged_at"] <= epochs[1]["logged_at"]
    if method.startswith("bcl"):
        assert 0 <= epochs[-1]["weight_q10"] <= epochs[-1]["weight_q90"] <= 1
        by_class = epochs[-1]["extra"]["weight_by_class"]  # logged at the last epoch
        assert [w is None for w in by_class] == list(counts == 0)
        weighted = sum(w * n for w, n in zip(by_class, counts) if n) / counts.sum()
        assert weighted == pytest.approx(epochs[-1]["weight_mean"], abs=1e-6)  # per-class means of the same w
    else:
        assert epochs[-1]["weight_mean"] is None and "weight_by_class" not in epochs[-1]["extra"]
    art = reg.latest_checkpoint(out["run_id"])
    ckpt = load_checkpoint(art["path"], art["sha256"])
    assert ckpt["epoch"] == 3 and ckpt["method"] == method
    if method in ("sdclr", "bcl-d"):  # masks travel with the model
        assert any(k.endswith("mask") for k in ckpt["model"])
    if method.startswith("bcl"):
        assert set(ckpt["method_state"]) >= {"s", "w"}


def final_state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["method_state"], ckpt["optimizer"]["state"]


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("width", [8, pytest.param(64, marks=pytest.mark.slow)])
def test_resume_mid_epoch_is_exact(tiny, tmp_path, width):
    """BCL-D carries the most state (masks, memory, weights, u): 4 epochs in one go equal
    2 epochs + a stop in the middle of epoch 3 + resume (also at the paper's width, marked slow)."""
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    full = train(config(tiny, "bcl-d", tmp_path / "a", epochs=4, width=width), reg, progress=False)
    part = train(config(tiny, "bcl-d", tmp_path / "b", epochs=4, max_steps=7, width=width), reg, progress=False)
    assert part["status"] == "interrupted" and part["epochs_done"] == 2
    assert reg.get_run(part["run_id"])["status"] == "interrupted"
    rest = train(config(tiny, "bcl-d", tmp_path / "b", epochs=4, width=width), reg, resume=part["run_id"],
                 progress=False)
    assert rest["status"] == "done" and rest["run_id"] == part["run_id"]
    assert_same(final_state(full["checkpoint"]), final_state(rest["checkpoint"]))
    losses = lambda rid: [e["loss"] for e in reg.epochs(rid)]
    assert losses(full["run_id"]) == losses(rest["run_id"])
    # the resume is recorded with its environment; the uninterrupted run has none
    resumes = reg.get_run(rest["run_id"])["versions"]["resumes"]
    assert len(resumes) == 1 and resumes[0]["epoch"] == 2 and resumes[0]["torch"] == torch.__version__
    assert "resumes" not in reg.get_run(full["run_id"])["versions"]


def test_environment_names_the_container_and_commit(monkeypatch):
    from harness import train as train_mod

    monkeypatch.setenv("HARNESS_CONTAINER_IMAGE", "bcl-harness (base pytorch:x)")
    monkeypatch.setenv("HARNESS_GIT_REV", "feedbeef")
    name, versions, rev = train_mod.environment(torch.device("cpu"), "fp32")
    assert name.startswith("cpu") and versions["container_image"] == "bcl-harness (base pytorch:x)"
    assert versions["precision"] == "fp32" and "cuda" not in versions and "driver" not in versions
    assert rev and rev != "feedbeef"  # this checkout's own commit wins
    def no_git(*a, **k):
        raise OSError("no git")
    monkeypatch.setattr(train_mod.subprocess, "run", no_git)  # the container: no .git, no git
    monkeypatch.delenv("HARNESS_CONTAINER_IMAGE")
    _, versions, rev = train_mod.environment(torch.device("cpu"))
    assert rev == "feedbeef" and versions["container_image"] is None


def test_stop_at_an_epoch_boundary_resumes_exactly(tiny, tmp_path):
    """A stop that lands between epochs (a signal, or max_steps = whole epochs: 48 images, 3 steps
    each) must not draw the next epoch's order before checkpointing: the resume draws it."""
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    full = train(config(tiny, "simclr", tmp_path / "a", epochs=3), reg, progress=False)
    part = train(config(tiny, "simclr", tmp_path / "b", epochs=3, max_steps=3), reg, progress=False)
    assert part["status"] == "interrupted" and part["epochs_done"] == 1
    rest = train(config(tiny, "simclr", tmp_path / "b", epochs=3), reg, resume=part["run_id"], progress=False)
    assert_same(final_state(full["checkpoint"]), final_state(rest["checkpoint"]))


def test_ctrl_c_saves_and_marks_interrupted(tiny, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    trainer = Trainer(config(tiny, "simclr", tmp_path, epochs=50), reg, progress=False)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    out = trainer.fit()
    timer.cancel()
    assert out["status"] == "interrupted"
    assert reg.get_run(out["run_id"])["status"] == "interrupted"
    ckpt = load_checkpoint(reg.latest_checkpoint(out["run_id"])["path"])
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (trainer.epoch, trainer.step_in_epoch)


def test_resume_errors(tiny, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    rid = reg.create_run("simclr", "split1", 10, 2, {})
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train(config(tiny, "simclr", tmp_path), reg, resume=rid, progress=False)
    out = train(config(tiny, "simclr", tmp_path, epochs=1), reg, progress=False)
    path = reg.latest_checkpoint(out["run_id"])["path"]
    with open(path, "r+b") as f:  # corrupt one byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(TrainError, match="does not match the sha256"):
        train(config(tiny, "simclr", tmp_path), reg, resume=out["run_id"], progress=False)
    os.remove(path)
    with pytest.raises(TrainError, match="not found"):
        train(config(tiny, "simclr", tmp_path), reg, resume=out["run_id"], progress=False)
    with pytest.raises(TrainError, match="not a harness training checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "x.pt")
        load_checkpoint(tmp_path / "x.pt")


def test_config_overrides_and_errors():
    cfg = make_config("bcl-d", "3", epochs=7, lr=0.1)
    assert cfg.split == "split3" and cfg.method.epochs == 7 and cfg.method.lr == 0.1
    assert cfg.method.weight_decay == 1e-4 and cfg.method.batch_size == 512
    with pytest.raises(TrainError, match="unknown method"):
        make_config("byol")
    with pytest.raises(TrainError, match="--epochs 0 .must be an integer from 1"):
        make_config("simclr", epochs=0)
    assert make_config("simclr", compile=True, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(TrainError, match="compile-mode 'fast'"):
        make_config("simclr", compile_mode="fast")


def test_profile_attributes_every_phase(tiny, tmp_path):
    """`harness bench --profile` sees each phase of a BCL-D step in its record_function range."""
    from harness.bench import profile_epoch

    tr = Trainer(config(tiny, "bcl-d", tmp_path, epochs=3), Registry(f"sqlite:///{tmp_path}/r.db"), progress=False)
    tr.run_epoch()  # epoch 1 has no boosted ops; profile epoch 2
    p = profile_epoch(tr)
    assert p["steps"] == tr.steps_per_epoch == 3 and p["device_ms_per_step"] is None  # CPU: no device trace
    phases = p["phases"]
    per_step = ("boosted-params", "augment", "boosted-augment", "forward+loss", "bcl-memory", "backward",
                "optimizer")
    assert set(phases) == set(per_step) | {"prune", "bcl-weights"}
    for name in per_step:
        assert phases[name]["calls_per_step"] == 1, name
    for name in ("prune", "bcl-weights"):  # once per epoch
        assert phases[name]["calls_per_step"] == pytest.approx(1 / 3), name
    assert all(v["host_ms"] > 0 for v in phases.values())
    assert sum(v["host_ms"] for v in phases.values()) <= p["wall_ms_per_step"]  # disjoint ranges within the epoch
    assert tr.epoch == 3  # the profiled epoch is a real epoch of the run


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_overlapped_augmentation_gives_the_same_views(tiny, tmp_path, device):
    """Augmenting the next batch ahead (on CUDA: on a side stream, while this batch trains)
    feeds every step exactly the views that augmenting it in turn gives, boosted epochs included."""
    def views_seen(overlap: bool) -> list[torch.Tensor]:
        cfg = config(tiny, "bcl-d", tmp_path / str(overlap), epochs=2, device=device, overlap_augment=overlap)
        tr = Trainer(cfg, Registry(f"sqlite:///{tmp_path}/{overlap}.db"), progress=False)
        seen, step_loss = [], tr.method.step_loss

        def record(views, indices):
            seen.append(views.clone())  # on the training stream, after the wait for the side stream
            return step_loss(views, indices)

        tr.method.step_loss = record
        tr.run_epoch()
        tr.run_epoch()
        return [v.cpu() for v in seen]

    ahead, in_turn = views_seen(True), views_seen(False)
    assert len(ahead) == len(in_turn) == 6
    assert all(torch.equal(a, b) for a, b in zip(ahead, in_turn))


def test_cuda_versions_read_cuda_cudnn_and_the_driver(monkeypatch):
    """The GPU side of the environment record, without a GPU: torch's CUDA and cuDNN numbers and
    nvidia-smi's answer, as the H200 reports them."""
    import subprocess

    from harness import train as train_mod

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    calls = []

    def smi(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="580.95.05\n", stderr="")
    monkeypatch.setattr(train_mod.subprocess, "run", smi)
    assert train_mod.cuda_versions(torch.device("cuda", 1)) == {"cuda": "13.0", "cudnn": "9.10.2",
                                                                 "driver": "580.95.05"}
    assert calls[0][0] == "nvidia-smi" and "-i=1" in calls[0]
    assert train_mod.cudnn_text(8902) == "8.9.2"
    monkeypatch.setattr(train_mod.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no smi")))
    assert "driver" not in train_mod.cuda_versions(torch.device("cuda", 0))

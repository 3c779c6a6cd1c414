"""The training loop under hostile or careless use: divergence, failed saves, stop signals, bad
settings and silent mix-ups on resume. Each test failed on the code before the hardening."""
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.registry import Registry
from harness.train import TrainError, Trainer, make_config, train
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    d = data.make_synthetic(tmp / "data", per_class=1)
    idx = np.arange(40)
    np.save(tmp / "split.npy", idx)
    np.save(tmp / "empty.npy", np.zeros(0, np.int64))
    return {"tmp": tmp, "root": str(tmp / "data"), "split": str(tmp / "split.npy"), "labels": d.train_labels}


def cfg(world, tmp_path, method="simclr", **kw):
    kw = {"epochs": 2, "batch_size": 16, "warmup_epochs": 1, "width": 4, "monitor_size": 8,
          "data_root": world["root"], "checkpoint_dir": str(tmp_path / "ck"), **kw}
    return make_config(method, kw.pop("split", world["split"]), **kw)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- 3. divergence is a failure, never "done" --------------------------------------------------

@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_non_finite_or_non_positive_lr_is_refused_before_work(world, tmp_path, lr):
    url = f"sqlite:///{tmp_path}/r.db"
    r = invoke("train", "simclr", "--split", world["split"], "--data-root", world["root"], "--lr", lr,
               "--registry", url, "--no-progress")
    assert r.exit_code == 1 and "--lr" in r.output and len(r.output.strip().splitlines()) == 1
    assert Registry(url).list_runs() == []  # refused before a run row exists


def test_weight_decay_nan_is_refused(world):
    with pytest.raises(TrainError, match="--weight-decay nan"):
        make_config("simclr", weight_decay=float("nan"))


def test_diverged_loss_fails_the_run_and_keeps_the_last_good_checkpoint(world, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    tr = Trainer(cfg(world, tmp_path, epochs=4, checkpoint_every=1), reg, progress=False)
    tr.run_epoch()  # epoch 1 is fine and checkpointed
    good = reg.latest_checkpoint(tr.run_id)
    assert good["epoch"] == 1
    with torch.no_grad():  # then the weights blow up, as --lr 1e6 makes them
        for p in tr.method.net.parameters():
            p.fill_(float("inf"))
    with pytest.raises(TrainError, match=r"diverged: loss nan at epoch 2, step 1 of 3.*epoch 1\) is kept"):
        tr.fit()
    run = reg.get_run(tr.run_id)
    assert run["status"] == "failed" and "diverged" in run["error"] and run["epochs_done"] == 1
    assert reg.latest_checkpoint(tr.run_id)["sha256"] == good["sha256"]  # not overwritten
    assert [e["epoch"] for e in reg.epochs(tr.run_id)] == [1]  # the diverged epoch is not logged


def test_huge_lr_ends_failed_not_done(world, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(TrainError, match="diverged"):
        train(cfg(world, tmp_path, lr=1e30, warmup_epochs=0), reg, progress=False)
    assert reg.list_runs()[0]["status"] == "failed"
    assert reg.list_runs(status="done") == []


# -- 4. saving can fail: say so, keep the run ---------------------------------------------------

def test_unwritable_checkpoint_folder_is_refused_before_training(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "ck").write_text("a file where the folder should be")
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(TrainError, match="not writable"):
        Trainer(cfg(world, tmp_path, checkpoint_dir=str(ro / "ck")), reg, progress=False)
    assert reg.list_runs() == []


def test_final_save_failure_marks_failed_with_the_cause(world, tmp_path, monkeypatch):
    import harness.train as train_mod

    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    tr = Trainer(cfg(world, tmp_path, epochs=1), reg, progress=False)

    def full_disk(path, state):
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"partial")
        tmp.unlink()  # what save_checkpoint's cleanup does
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(train_mod, "save_checkpoint", full_disk)
    with pytest.raises(TrainError, match="could not be written: .*disk is full"):
        tr.fit()
    run = reg.get_run(tr.run_id)
    assert run["status"] == "failed" and "disk is full" in run["error"]


def test_save_checkpoint_removes_its_temp_file_on_failure(tmp_path, monkeypatch):
    import harness.train as train_mod

    def boom(obj, f):
        open(f, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod.torch, "save", boom)
    with pytest.raises(OSError):
        train_mod.save_checkpoint(tmp_path / "last.pt", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# -- 5. signals: SIGTERM is how schedulers stop jobs -------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_scheduler_signals_checkpoint_like_ctrl_c(world, tmp_path, sig):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    tr = Trainer(cfg(world, tmp_path, epochs=10_000), reg, progress=False)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), sig))
    timer.start()
    out = tr.fit()
    timer.cancel()
    assert out["status"] == "interrupted" and out["signal"] == sig.name
    run = reg.get_run(out["run_id"])
    assert run["status"] == "interrupted" and sig.name in run["error"]
    assert reg.latest_checkpoint(out["run_id"]) is not None


def _harness(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _wait_for(pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_sigterm_to_train_command_checkpoints_and_exits_143(world, tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    p = _harness("train", "simclr", "--split", world["split"], "--data-root", world["root"], "--width", 4,
                 "--epochs", 100_000, "--batch-size", 16, "--checkpoint-dir", tmp_path / "ck",
                 "--registry", url, "--no-progress")
    reg = Registry(url)
    assert _wait_for(lambda: reg.list_runs() and reg.list_runs()[0]["epochs_done"] >= 1)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "stopped by SIGTERM; continue with: harness train simclr --resume 1" in out
    run = reg.list_runs()[0]
    assert run["status"] == "interrupted" and reg.latest_checkpoint(run["id"]) is not None


@pytest.fixture()
def matrix_world(tmp_path, monkeypatch):
    gen = tmp_path / "gen"
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(gen))
    d = data.make_synthetic(tmp_path / "data", per_class=1)
    splits.save_generated("mx", np.arange(64), "pretrain", "test")
    return {"tmp": tmp_path, "gen": gen, "data": tmp_path / "data", "labels": d.train_labels,
            "url": f"sqlite:///{tmp_path}/r.db"}


def _matrix_training(w):
    """A one-cell `harness run` process, once its cell has finished an epoch; and the registry."""
    p = _harness("run", "--methods", "simclr", "--splits", "mx", "--epochs", 100_000, "--batch-size", 16,
                 "--width", 4, "--no-evaluate", "--devices", "cpu", "--data-root", w["data"],
                 "--checkpoint-dir", w["tmp"] / "ck", "--registry", w["url"], "--no-progress",
                 env={splits.GENERATED_ENV_VAR: str(w["gen"])})
    reg = Registry(w["url"])
    assert _wait_for(lambda: reg.list_runs() and reg.list_runs()[0]["epochs_done"] >= 1)
    return p, reg


def test_sigterm_to_matrix_reaches_its_workers_and_none_outlives_it(matrix_world):
    p, reg = _matrix_training(matrix_world)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "stopped by SIGTERM: 1 running cell(s) checkpointed" in out
    run = reg.list_runs()[0]
    assert run["status"] == "interrupted" and reg.latest_checkpoint(run["id"]) is not None
    assert "interrupted" in out  # the summary table says what the cell reached
    epochs = run["epochs_done"]
    time.sleep(2)
    assert reg.get_run(run["id"])["epochs_done"] == epochs  # no orphan trains on


def test_killed_matrix_takes_its_workers_with_it(matrix_world):
    p, reg = _matrix_training(matrix_world)
    p.kill()  # SIGKILL: no chance to forward anything; the kernel tells the worker (PDEATHSIG)
    p.communicate(timeout=60)
    rid = reg.list_runs()[0]["id"]
    assert _wait_for(lambda: reg.get_run(rid)["status"] == "interrupted", timeout=60)
    epochs = reg.get_run(rid)["epochs_done"]
    time.sleep(2)
    assert reg.get_run(rid)["epochs_done"] == epochs


# -- 6. validate before work, refuse silent mix-ups ---------------------------------------------

def test_empty_split_is_refused(world, tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(TrainError, match="no images"):
        Trainer(cfg(world, tmp_path, split=str(world["tmp"] / "empty.npy")), reg, progress=False)
    assert reg.list_runs() == []


def test_resume_refuses_a_changed_split_file(world, tmp_path):
    split = tmp_path / "s.npy"
    np.save(split, np.arange(40))
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    part = train(cfg(world, tmp_path, split=str(split), max_steps=1), reg, progress=False)
    assert reg.get_run(part["run_id"])["config"]["split_sha256"]
    np.save(split, np.arange(1, 41))  # same length, other images
    with pytest.raises(TrainError, match="changed since"):
        train(None, reg, resume=part["run_id"], progress=False, asked={})


def test_resume_refuses_a_different_recipe_and_lists_the_fields(world, tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    part = train(cfg(world, tmp_path, max_steps=1), Registry(url), progress=False)
    r = invoke("train", "sdclr", "--resume", part["run_id"], "--lr", "0.1", "--epochs", "9", "--seed", "3",
               "--batch-size", "8", "--split", "4", "--registry", url, "--no-progress")
    assert r.exit_code == 1
    for field in ("name (run: 'simclr', asked: 'sdclr')", "lr (run: 0.5, asked: 0.1)", "epochs", "seed",
                  "batch_size", "split"):
        assert field in r.output


def test_resume_reuses_the_runs_own_folders(world, tmp_path, monkeypatch):
    """The hint printed after a stop is the exact working command: no --data-root needed."""
    url = f"sqlite:///{tmp_path}/r.db"
    r = invoke("train", "simclr", "--split", world["split"], "--data-root", world["root"], "--width", 4,
               "--epochs", 1, "--batch-size", 16, "--max-steps", 1, "--checkpoint-dir", tmp_path / "ck",
               "--registry", url, "--no-progress")
    assert r.exit_code == 130 and "continue with: harness train simclr --resume 1 --registry" in r.output
    monkeypatch.chdir(tmp_path)  # no data/ folder here
    r = invoke("train", "simclr", "--resume", 1, "--registry", url, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "done after 1 epochs" in r.output


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", "-3"], "--epochs -3"),
    (["--epochs", "99999999999999999999999"], "--epochs 99999999999999999999999"),
    (["--probe-epochs", "0"], "--probe-epochs 0"),
    (["--devices", "foo"], "--devices"),
    (["--devices", "cuda:0"] if not torch.cuda.is_available() else ["--devices", "tpu"], "--devices"),
    (["--shots", "bogus"], "unknown shots"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--methods", "byol"], "unknown method(s) byol"),
])
def test_matrix_checks_every_setting_before_any_cell(matrix_world, args, message):
    w = matrix_world
    r = invoke("run", "--methods", "simclr", "--splits", "mx", "--registry", w["url"], "--data-root", w["data"],
               *args)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert Registry(w["url"]).list_runs() == []


def test_dry_run_shows_the_epochs_that_would_really_run(matrix_world):
    w = matrix_world
    reg = Registry(w["url"])
    c = make_config("simclr", "mx", epochs=3, batch_size=16, width=4, data_root=str(w["data"]),
                    checkpoint_dir=str(w["tmp"] / "ck"), max_steps=4)  # one epoch and a bit
    part = train(c, reg, progress=False)
    assert part["epochs_done"] == 1
    r = invoke("run", "--methods", "simclr,sdclr", "--splits", "mx", "--epochs", 3, "--batch-size", 16, "--width", 4,
               "--registry", w["url"], "--dry-run")
    assert r.exit_code == 0
    lines = {ln.split()[0]: ln.split() for ln in r.output.splitlines()[2:]}
    assert lines["simclr/mx/seed10"][1:] == ["resume", "1", "2"]
    assert lines["sdclr/mx/seed10"][1:] == ["train", "-", "3"]


@pytest.mark.parametrize("value", ["foo", "", "cuda:x"])
def test_bad_device_is_one_line(world, tmp_path, value):
    r = invoke("train", "simclr", "--device", value, "--split", world["split"], "--data-root", world["root"],
               "--registry", f"sqlite:///{tmp_path}/r.db")
    assert r.exit_code == 1 and "--device" in r.output and len(r.output.strip().splitlines()) == 1


def test_huge_run_id_is_one_line(tmp_path):
    r = invoke("runs", "show", "9" * 30, "--registry", f"sqlite:///{tmp_path}/r.db")
    assert r.exit_code == 2 and "is not a run id" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("url, words", [
    ("sqlite:///{tmp}/q.db?foo=bar", "query parameters (foo) are not used by SQLite"),
    ("postgresql+pg8000://u:pw@127.0.0.1:1/x?bogus=1", "does not accept 'bogus'"),
])
def test_unknown_url_query_parameters_are_one_line(tmp_path, url, words):
    r = invoke("runs", "list", "--registry", url.format(tmp=tmp_path))
    assert r.exit_code == 1 and words in r.output and len(r.output.strip().splitlines()) == 1
    assert "pw@" not in r.output


def test_over_long_checkpoint_path_is_one_line(world, tmp_path):
    r = invoke("train", "simclr", "--split", world["split"], "--data-root", world["root"], "--width", 4,
               "--checkpoint-dir", tmp_path / ("a" * 300), "--registry", f"sqlite:///{tmp_path}/r.db")
    assert r.exit_code == 1 and "file name is too long" in r.output and len(r.output.strip().splitlines()) == 1

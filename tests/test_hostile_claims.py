"""A cell is trained once, however many matrices run: atomic claims, leases, heartbeats.

Each case runs on SQLite and on a real PostgreSQL server (tests/conftest.py's `pg_server`) where
the backend matters: several processes at once, behind a barrier, on the same registry.
"""
import multiprocessing as mp
import threading
import time
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.matrix import Cell, MatrixSettings, plan_cell, run_matrix
from harness.registry import Registry, new_owner, utcnow
from harness.train import TrainError, Trainer, make_config, train
from tests import race_workers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def world(tmp_path, monkeypatch, any_url):
    """A 40-image synthetic split; leases of 2 s (renewed every 0.5 s) so an expiry is quick to wait for."""
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    monkeypatch.setenv("HARNESS_LEASE_S", "2")
    d = data.make_synthetic(tmp_path / "data", per_class=4, test_per_class=2)
    idx = splits.make_long_tailed(d.train_labels, max_per_class=2, ratio=2, seed=0)[:40]
    splits.save_generated("tiny", idx, "pretrain", "test")
    return MatrixSettings(methods=("simclr", "bcl-d"), splits=("tiny",), epochs=2, batch_size=16, width=4,
                          evaluate=False, data_root=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ck"),
                          registry=any_url, devices=("cpu",))


# -- the claim race --------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cell", "run"])
def test_claim_race_has_exactly_one_winner(any_url, target):
    reg = Registry(any_url)
    rid = reg.create_run("simclr", "tiny", 10, 2, {}, status="interrupted")
    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Array("i", [-1] * n)
    fn, args = (race_workers.claim, (any_url,)) if target == "cell" else (race_workers.acquire, (any_url, rid))
    procs = [ctx.Process(target=fn, args=(*args, barrier, out, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(out) == [0] * (n - 1) + [1]
    if target == "cell":
        assert not reg.claim_cell("simclr", "tiny", 10, 2, new_owner())  # still held
        assert reg.cell_holder("simclr", "tiny", 10, 2) is not None
    else:
        assert reg.lease_holder(rid) is not None and not reg.acquire_run(rid, new_owner())


def test_expired_claim_can_be_taken_over_and_released(any_url):
    reg = Registry(any_url, lease_s=1)
    a, b = new_owner(), new_owner()
    assert reg.claim_cell("simclr", "s", 1, 5, a)
    assert not reg.claim_cell("simclr", "s", 1, 5, b)
    assert reg.renew_cell("simclr", "s", 1, 5, a) and not reg.renew_cell("simclr", "s", 1, 5, b)
    time.sleep(1.3)  # a's process is gone: its lease runs out
    assert reg.claim_cell("simclr", "s", 1, 5, b)
    assert not reg.renew_cell("simclr", "s", 1, 5, a)  # a learns it lost the cell
    reg.release_cell("simclr", "s", 1, 5, a)  # not a's to release: no effect
    assert reg.cell_holder("simclr", "s", 1, 5)["owner"] == b
    reg.release_cell("simclr", "s", 1, 5, b)
    assert reg.cell_holder("simclr", "s", 1, 5) is None and reg.claim_cell("simclr", "s", 1, 5, a)


# -- several matrices at once ------------------------------------------------------------------
def _matrix(s, barrier):
    barrier.wait()
    run_matrix(s, log=lambda m: None, progress=False, poll_s=0.1)


def test_three_matrices_at_once_train_each_cell_once(world):
    s = world
    Registry(s.registry)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_matrix, args=(s, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(400)
        assert p.exitcode == 0
    reg = Registry(s.registry)
    for method in s.methods:
        runs = reg.list_runs(method=method, split="tiny")
        assert len(runs) == 1, f"{method}: {len(runs)} runs for one cell"
        run = runs[0]
        assert run["status"] == "done" and run["epochs_done"] == 2
        assert [e["epoch"] for e in reg.epochs(run["id"])] == [1, 2]  # each epoch logged once
        assert run["owner"] is None  # released at the end
        assert reg.cell_holder(method, "tiny", 10, 2) is None


def _interrupted_run(s):
    reg = Registry(s.registry)
    cfg = make_config("simclr", "tiny", epochs=2, batch_size=16, width=4, data_root=s.data_root,
                      checkpoint_dir=s.checkpoint_dir, max_steps=1, seed=10)
    part = train(cfg, reg, progress=False)
    assert part["status"] == "interrupted"
    return reg, part["run_id"]


def test_live_run_is_not_resumed_dead_one_is(world):
    s = MatrixSettings(**{**world.__dict__, "methods": ("simclr",)})
    reg, rid = _interrupted_run(s)
    # another process (another host) is training it: its lease is live
    other = "otherhost:4242:feedbeef"
    reg.update_run(rid, status="running", owner=other, lease_until=utcnow() + timedelta(seconds=60))
    assert plan_cell(reg, Cell("simclr", "tiny", 10), s)[0] == "running elsewhere"
    results = run_matrix(s, log=lambda m: None, progress=False, poll_s=0.1)
    assert [r.action for r in results] == ["running elsewhere"]
    run = reg.get_run(rid)
    assert run["owner"] == other and run["epochs_done"] == 0 and reg.epochs(rid) == []
    assert len(reg.list_runs(method="simclr")) == 1  # no second run for the cell either
    # ... and that process died: its lease ran out
    reg.update_run(rid, lease_until=utcnow() - timedelta(seconds=1))
    assert plan_cell(reg, Cell("simclr", "tiny", 10), s) == ("resume", rid)
    results = run_matrix(s, log=lambda m: None, progress=False, poll_s=0.1)
    assert results[0].exit_code == 0
    run = reg.get_run(rid)
    assert run["status"] == "done" and run["owner"] is None
    assert [e["epoch"] for e in reg.epochs(rid)] == [1, 2] and len(reg.list_runs(method="simclr")) == 1


def test_cell_claimed_elsewhere_is_skipped(world):
    s = MatrixSettings(**{**world.__dict__, "methods": ("simclr",)})
    reg = Registry(s.registry)
    assert reg.claim_cell("simclr", "tiny", 10, 2, "otherhost:1:abc")
    assert plan_cell(reg, Cell("simclr", "tiny", 10), s)[0] == "running elsewhere"
    results = run_matrix(s, log=lambda m: None, progress=False, poll_s=0.1)
    assert results[0].action == "running elsewhere" and reg.list_runs() == []


# -- the trainer's lease ----------------------------------------------------------------------
def _tiny_cfg(s, epochs):
    return make_config("simclr", "tiny", epochs=epochs, batch_size=16, width=4, data_root=s.data_root,
                       checkpoint_dir=s.checkpoint_dir, seed=10, checkpoint_every=1000)


def test_heartbeat_keeps_a_live_run_and_releases_it(world, tmp_path):
    s = world
    reg = Registry(s.registry, lease_s=0.6)  # renewed every 0.15 s
    trainer = Trainer(_tiny_cfg(s, 12), reg, progress=False)
    out = {}
    t = threading.Thread(target=lambda: out.update(trainer.fit()))
    t.start()
    other = Registry(s.registry, lease_s=0.6)
    refused = 0
    while t.is_alive():
        assert not other.acquire_run(trainer.run_id, "thief:1:x"), "took a live run"
        refused += 1
        time.sleep(0.2)
    t.join()
    assert out["status"] == "done" and refused >= 3
    assert reg.lease_holder(trainer.run_id) is None  # released when it stopped
    assert other.acquire_run(trainer.run_id, "next:1:x")


def test_trainer_that_lost_its_lease_stops_without_writing(world):
    s = world
    reg = Registry(s.registry, lease_s=1)
    trainer = Trainer(_tiny_cfg(s, 200), reg, progress=False)
    rid, thief = trainer.run_id, "thief:99:cafe"
    errors = []

    def fit():
        try:
            trainer.fit()
        except TrainError as e:
            errors.append(str(e))

    t = threading.Thread(target=fit)
    t.start()
    deadline = time.monotonic() + 60
    while not reg.epochs(rid) and time.monotonic() < deadline:
        time.sleep(0.05)
    reg.update_run(rid, owner=thief, lease_until=utcnow() + timedelta(seconds=60))  # taken over
    logged = len(reg.epochs(rid))
    t.join(60)
    assert not t.is_alive() and errors and thief in errors[0] and "\n" not in errors[0]
    assert not trainer.checkpoint_path.exists()  # nothing written over the new owner's files
    assert reg.artifacts(rid) == []
    run = reg.get_run(rid)
    assert run["owner"] == thief and run["status"] == "running"  # the row is the new owner's
    assert len(reg.epochs(rid)) <= logged + 1


def test_train_resume_refuses_a_live_run(world):
    s = world
    reg, rid = _interrupted_run(s)
    holder = "gpu7:1234:0badf00d"
    reg.update_run(rid, owner=holder, lease_until=utcnow() + timedelta(seconds=60))
    res = CliRunner().invoke(app, ["train", "simclr", "--split", "tiny", "--resume", str(rid), "--registry",
                                   s.registry, "--data-root", s.data_root, "--checkpoint-dir", s.checkpoint_dir,
                                   "--no-progress"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and holder in lines[0] and "lease" in lines[0] and "UTC" in lines[0]
    assert reg.get_run(rid)["owner"] == holder and reg.epochs(rid) == []

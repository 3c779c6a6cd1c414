"""`harness run --executor slurm` on a real one-node Slurm (tests/slurm_cluster.py): munged, slurmctld
and slurmd on loopback with four fake GPUs (character devices), no accounting. The registry is the
real PostgreSQL server of tests/conftest.py when it can be started, else SQLite with
--allow-sqlite-on-cluster (one node: its file locks work).

Covered: a matrix through a job array (every cell done, a fake GPU per job, at most the array
parallelism at once), a failing cell next to a finishing one, the same matrix submitted twice
(each cell trained once), a job pre-empted by SIGUSR1 (submitit requeues it) and requeued by
`scontrol requeue` resuming to weights equal to an uninterrupted run, `scancel` leaving the cell
interrupted. Not covered: several nodes, real GPUs, jobs as an unprivileged user.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.matrix import Cell, MatrixSettings
from harness.registry import Registry
from harness.slurm import SlurmError, SlurmSettings, check_cluster_settings, read_attempts
from harness.train import make_config, train
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, missing_binaries

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _install_slurm() -> str | None:
    """apt-get the packages when they are missing (as root); the reason when that is not possible."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing_binaries())} missing) and apt-get cannot run here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], capture_output=True, text=True,
                           timeout=600, env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], capture_output=True, text=True,
                               timeout=600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install {' '.join(PACKAGES)} did not finish: {e}"
    if r.returncode != 0 or missing_binaries():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def cluster():
    reason = _install_slurm()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(cpus=4)  # 4 slots on 2 real cores: the array parallelism is what limits
    old = os.environ.get("SLURM_CONF")
    try:
        try:
            c.start()
        except (ClusterUnavailable, OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"one-node Slurm did not start: {e}")
        os.environ["SLURM_CONF"] = str(c.conf)  # sbatch, squeue, scontrol of the harness find it
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture()
def world(cluster, request, tmp_path, monkeypatch):
    """A 40-image synthetic split on a folder every job sees; width 4, no evaluation."""
    try:
        url = request.getfixturevalue("pg_url")
    except pytest.skip.Exception:
        url = f"sqlite:///{tmp_path}/r.db"
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HARNESS_SLURM_POLL_S", "0.5")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    d = data.make_synthetic(tmp_path / "data", per_class=4, test_per_class=2)
    idx = splits.make_long_tailed(d.train_labels, max_per_class=2, ratio=2, seed=0)[:40]
    splits.save_generated("tiny", idx, "pretrain", "test")
    cluster.cancel_all()
    return {"url": url, "tmp": tmp_path, "cluster": cluster,
            "args": ["--splits", "tiny", "--batch-size", "16", "--width", "4", "--no-evaluate",
                     "--data-root", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ck"),
                     "--registry", url, "--slurm-logs", str(tmp_path / "logs"), "--slurm-cpus", "1",
                     "--slurm-time", "30", "--slurm-signal-s", "60", "--no-progress"]
            + (["--allow-sqlite-on-cluster"] if url.startswith("sqlite") else [])}


def harness(*args: str):
    return CliRunner().invoke(app, ["run", "--executor", "slurm", *args])


def runs_of(reg: Registry, method: str) -> list[dict]:
    return reg.list_runs(method=method, split="tiny")


def wait_for(pred, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def release_requeued(c: SlurmCluster) -> None:
    """Slurm holds a requeued batch job for 121 s (BeginTime); let it start now (as an admin may)."""
    out = c.cmd("squeue", "-h", "-r", "-t", "PENDING", "-o", "%i %r").stdout.split("\n")
    for line in out:
        parts = line.split()
        if len(parts) == 2 and parts[1] == "BeginTime":
            c.cmd("scontrol", "update", f"JobId={parts[0]}", "StartTime=now")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    n = best = 0
    for _, d in events:
        n += d
        best = max(best, n)
    return best


# -- refusals (no jobs) -----------------------------------------------------------------------------
def test_refuses_sqlite_and_missing_paths(tmp_path):
    s = MatrixSettings(registry=f"sqlite:///{tmp_path}/r.db", data_root=str(tmp_path / "nodata"),
                       checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(SlurmError, match="allow-sqlite-on-cluster"):
        check_cluster_settings(s, SlurmSettings(logs=str(tmp_path / "logs")))
    with pytest.raises(SlurmError, match=r"data root .*nodata does not exist"):
        check_cluster_settings(s, SlurmSettings(logs=str(tmp_path / "logs")), allow_sqlite=True)
    res = CliRunner().invoke(app, ["run", "--executor", "slurm", "--dry-run", "--registry", s.registry])
    assert res.exit_code == 1 and "NFS" in res.output and "\n" not in res.output.strip()
    (tmp_path / "d").mkdir()
    res = CliRunner().invoke(app, ["run", "--executor", "slurm", "--dry-run", "--registry", s.registry,
                                   "--allow-sqlite-on-cluster", "--data-root", str(tmp_path / "d"),
                                   "--slurm-logs", str(tmp_path / "logs"), "--methods", "simclr", "--splits", "1,2",
                                   "--slurm-partition", "gpu", "--slurm-array-parallelism", "3",
                                   "--slurm-extra", "mail-type=END", "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    for line in ("simclr/split2/seed10", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --signal=USR1@300", "#SBATCH --array=0-1%2", "#SBATCH --mail-type=END"):
        assert line in res.output
    res = CliRunner().invoke(app, ["run", "--executor", "slurm", "--dry-run", "--slurm-extra", "nokey"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


# -- on the cluster ---------------------------------------------------------------------------------
def test_matrix_submitted_twice_trains_each_cell_once(world):
    """4 cells, 2 at a time, submitted twice at once: each cell trained once, one fake GPU per job."""
    methods = "simclr,sdclr,bcl-i,bcl-d"
    args = ["--methods", methods, "--epochs", "1", "--slurm-array-parallelism", "2", *world["args"]]
    t0 = time.monotonic()
    for _ in range(2):
        res = harness(*args, "--no-wait")
        assert res.exit_code == 0, res.output
        assert "4 to submit" in res.output and "submitted array job" in res.output
    assert world["cluster"].wait_idle(180), "the jobs did not end"
    took = time.monotonic() - t0
    reg = Registry(world["url"])
    attempts = []
    for m in methods.split(","):
        runs = runs_of(reg, m)
        assert [r["status"] for r in runs] == ["done"], (m, runs)  # one run per cell, trained once
        assert len(reg.epochs(runs[0]["id"])) == 1
        slurm = runs[0]["versions"]["slurm"]
        trained = [a for a in slurm if a["outcome"] == "train"]
        assert len(trained) == 1 and trained[0]["cuda_visible_devices"] in ("0", "1", "2", "3")
        logs = reg.artifacts(runs[0]["id"], kind="slurm-log")
        assert logs and Path(logs[0]["path"]).exists()
        cell_attempts = read_attempts(world["tmp"] / "logs", Cell(m, "tiny", 10))
        assert len(cell_attempts) == 2  # one job of each submission
        assert sorted(a["outcome"] for a in cell_attempts) in (["running elsewhere", "train"], ["skip", "train"])
        attempts += cell_attempts
    for array in {a["job_id"].split("_")[0] for a in attempts}:  # at most 2 at once per array
        mine = [a for a in attempts if a["job_id"].startswith(array + "_")]
        assert len(mine) == 4 and max_overlap([(a["started"], a["ended"]) for a in mine]) <= 2
    for a in attempts:  # jobs running at the same time had different GPUs
        for b in attempts:
            if a is not b and a["started"] < b["ended"] and b["started"] < a["ended"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"]
    res = harness(*args)  # a third time: nothing left to submit
    assert res.exit_code == 0 and "0 to submit" in res.output, res.output
    print(f"8 jobs in {took:.1f} s")


def test_failing_cell_is_reported_while_the_other_finishes(world):
    res = harness("--methods", "simclr", "--epochs", "1", *world["args"], "--slurm-partition", "nosuch")
    assert res.exit_code == 1 and "sbatch failed" in res.output and "partition" in res.output.lower(), res.output
    assert harness("--methods", "simclr", "--epochs", "1", *world["args"]).exit_code == 0
    res = harness("--methods", "simclr", "--epochs", "1",
                  *[a if a != "tiny" else "tiny,nosuchsplit" for a in world["args"]])
    assert res.exit_code == 1, res.output
    assert "1 of 2 cells did not finish: simclr/nosuchsplit/seed10" in res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines() if ln.startswith("simclr/")}
    assert "skipped" in lines["simclr/tiny/seed10"]  # done by the first call
    assert "failed" in lines["simclr/nosuchsplit/seed10"] and "nosuchsplit" in lines["simclr/nosuchsplit/seed10"]
    assert "cell simclr/nosuchsplit/seed10 (job " in res.output and ": failed" in res.output  # the live log
    rec = read_attempts(world["tmp"] / "logs", Cell("simclr", "nosuchsplit", 10))
    assert rec[-1]["outcome"] == "failed" and "nosuchsplit" in rec[-1]["error"]
    assert Path(rec[-1]["stderr"]).exists() and "nosuchsplit" in Path(rec[-1]["stderr"]).read_text()


def test_preempted_and_requeued_job_resumes_exactly_and_scancel_interrupts(world):
    """Two cells: simclr gets SIGUSR1 (submitit requeues it) and later `scontrol requeue`; bcl-d is
    cancelled. simclr ends with the weights of an uninterrupted run; bcl-d stays interrupted."""
    c, tmp, epochs = world["cluster"], world["tmp"], 40
    res = harness("--methods", "simclr,bcl-d", "--epochs", str(epochs), "--checkpoint-every", "1000",
                  *world["args"], "--no-wait")
    assert res.exit_code == 0, res.output
    reg = Registry(world["url"])
    for m in ("simclr", "bcl-d"):
        wait_for(lambda: [r for r in runs_of(reg, m) if (r["epochs_done"] or 0) >= 2 and r["status"] == "running"],
                 120, f"{m} to train 2 epochs")
    jobs = {}
    out = c.cmd("squeue", "-h", "-r", "-o", "%i %j %T").stdout.split("\n")
    ids = sorted(ln.split()[0] for ln in out if ln.strip())
    assert len(ids) == 2  # task 0: simclr, task 1: bcl-d (the order of the cells)
    jobs["simclr"], jobs["bcl-d"] = ids
    assert c.cmd("scancel", "--signal=USR1", jobs["simclr"]).returncode == 0
    assert c.cmd("scancel", jobs["bcl-d"]).returncode == 0
    # simclr: checkpointed, requeued by submitit, resumed; requeue it once more from outside
    first = runs_of(reg, "simclr")[0]
    wait_for(lambda: len(read_attempts(tmp / "logs", Cell("simclr", "tiny", 10))) >= 1, 60, "the USR1 attempt")

    def resumed():
        release_requeued(c)
        return [r for r in runs_of(reg, "simclr") if r["status"] == "running"
                and (r["epochs_done"] or 0) >= (first["epochs_done"] or 0) + 1
                and len(read_attempts(tmp / "logs", Cell("simclr", "tiny", 10))) == 1]
    wait_for(resumed, 120, "simclr to resume after SIGUSR1", poll=0.5)
    assert c.cmd("scontrol", "requeue", jobs["simclr"]).returncode == 0
    # meanwhile: the run the interruptions must reproduce
    cfg = make_config("simclr", "tiny", epochs=epochs, batch_size=16, width=4, seed=10, data_root=str(tmp / "data"),
                      checkpoint_dir=str(tmp / "ref"))
    ref_reg = Registry(f"sqlite:///{tmp}/ref.db")
    ref = train(cfg, ref_reg, progress=False)

    def ended():
        release_requeued(c)
        return c.wait_idle(0.5)
    wait_for(ended, 120, "the jobs to end", poll=0.5)
    runs = runs_of(reg, "simclr")
    assert len(runs) == 1 and runs[0]["status"] == "done" and runs[0]["epochs_done"] == epochs
    assert len(reg.epochs(runs[0]["id"])) == epochs
    outcomes = [a["outcome"] for a in read_attempts(tmp / "logs", Cell("simclr", "tiny", 10))]
    assert outcomes == ["interrupted", "interrupted", "resume"], outcomes
    mine = torch.load(reg.latest_checkpoint(runs[0]["id"])["path"], weights_only=False)
    theirs = torch.load(ref["checkpoint"], weights_only=False)
    for k, v in theirs["model"].items():
        assert torch.equal(v, mine["model"][k]), k
    # bcl-d: cancelled, so interrupted with its checkpoint, never done
    b = runs_of(reg, "bcl-d")
    assert [r["status"] for r in b] == ["interrupted"] and reg.latest_checkpoint(b[0]["id"])
    assert [a["outcome"] for a in read_attempts(tmp / "logs", Cell("bcl-d", "tiny", 10))] == ["interrupted"]


def test_cell_job_is_checkpointable_and_records_what_it_did(tmp_path, monkeypatch):
    """No cluster: the job body outside submitit, on a cell whose data is missing (fails, recorded),
    and its checkpoint() (a resubmission of the same call, which submitit requeues)."""
    import submitit
    from harness.slurm import CellJob
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    s = MatrixSettings(methods=("simclr",), splits=("nosuch",), epochs=1, width=4, evaluate=False,
                       data_root=str(tmp_path), checkpoint_dir=str(tmp_path / "ck"), registry=f"sqlite:///{tmp_path}/r.db")
    job = CellJob(s, str(tmp_path / "logs"))
    assert isinstance(job, submitit.helpers.Checkpointable)
    cell = Cell("simclr", "nosuch", 10)
    again = job.checkpoint(cell)
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, CellJob) and again.args == (cell,)
    with pytest.raises(Exception):
        job(cell)
    rec = read_attempts(tmp_path / "logs", cell)
    assert len(rec) == 1 and rec[0]["outcome"] == "failed" and "DataError" in rec[0]["error"]

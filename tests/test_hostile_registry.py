"""The registry under stress: schema creation races, long user strings, a server that goes away,
someone else's database, passwords in messages. SQLite and a real PostgreSQL server."""
import multiprocessing as mp
import sqlite3
import time

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from harness import data
from harness.cli import app
from harness.registry import SCHEMA_VERSION, Registry, RegistryError
from tests.conftest import backend

pytestmark = pytest.mark.usefixtures("one_thread")


# -- creating a registry from several processes at once -------------------------------------
def _open(url, barrier, out, i):
    barrier.wait()
    try:
        r = Registry(url)
        r.create_run("simclr", f"split{i}", i, 1, {})
        out[i] = 1
    except Exception as e:  # noqa: BLE001 - reported by the test
        print(f"worker {i}: {e.__class__.__name__}: {e}")
        out[i] = 0


def test_fresh_registry_created_by_four_processes_at_once(any_url):
    for _round in range(2):  # a race is a matter of luck: two fresh databases
        url = any_url if _round == 0 else _fresh(any_url)
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(4), ctx.Array("i", [-1] * 4)
        procs = [ctx.Process(target=_open, args=(url, barrier, out, i)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert list(out) == [1, 1, 1, 1]
        r = Registry(url)
        assert r.schema_version() == SCHEMA_VERSION and len(r.list_runs()) == 4
        with r.engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM schema_info")).scalar_one() == 1


_FRESH = []


def _fresh(url):
    if backend(url) == "sqlite":
        return url.replace("r.db", "r2.db")
    eng = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    name = url.rsplit("/", 1)[1] + "b"
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()
    return url + "b"


# -- user strings of any length ---------------------------------------------------------------
def test_long_user_strings_are_stored_whole(any_url):
    reg = Registry(any_url)
    split = "/data/" + "very-long-folder-name/" * 10 + "my_split.npy"  # > 64 characters
    tags = ["t" * 300, "x" * 50]
    rid = reg.create_run("m" * 80, split, 1, 2, {}, tags=tags, device="d" * 300, git_rev="g" * 100)
    reg.add_artifact(rid, "k" * 100, "/p/" + "q" * 2000, "s" * 100)
    run = reg.get_run(rid)
    assert run["split"] == split and run["tags"] == tags and run["method"] == "m" * 80
    assert run["device"] == "d" * 300 and run["git_rev"] == "g" * 100
    assert reg.artifacts(rid)[0]["path"] == "/p/" + "q" * 2000
    assert reg.list_runs(split=split)[0]["id"] == rid


def test_schema_2_database_is_migrated_to_unbounded_strings(any_url):
    """A registry written by schema 2 (VARCHAR(64) splits on PostgreSQL) takes long strings after
    the migration, and keeps its rows."""
    pg = backend(any_url) == "postgresql"
    serial, stamp = ("SERIAL PRIMARY KEY", "TIMESTAMP") if pg else ("INTEGER PRIMARY KEY", "DATETIME")
    engine = create_engine(any_url)
    with engine.begin() as c:
        for stmt in (
            "CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER)",
            "INSERT INTO schema_info VALUES (1, 2)",
            f"""CREATE TABLE runs (id {serial}, method VARCHAR(32), split VARCHAR(64), seed INTEGER,
                epochs INTEGER, epochs_done INTEGER, status VARCHAR(16), config JSON, tags VARCHAR(256),
                device VARCHAR(128), versions JSON, git_rev VARCHAR(64), created_at {stamp},
                started_at {stamp}, finished_at {stamp}, wall_time_s FLOAT, error TEXT)""",
            f"""CREATE TABLE artifacts (id {serial}, run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
                kind VARCHAR(32), path VARCHAR(1024), sha256 VARCHAR(64), epoch INTEGER, created_at {stamp})""",
            """INSERT INTO runs (method, split, seed, epochs, epochs_done, status, config, tags, device,
                versions, git_rev, created_at, wall_time_s) VALUES ('simclr', 'split1', 10, 2000, 2000,
                'done', '{}', 'paper', 'cuda', '{}', NULL, '2026-01-01 00:00:00', 3.0)""",
        ):
            c.exec_driver_sql(stmt)
    engine.dispose()
    reg = Registry(any_url)
    assert reg.schema_version() == SCHEMA_VERSION and reg.get_run(1)["tags"] == ["paper"]
    assert reg.get_run(1)["owner"] is None and reg.lease_holder(1) is None
    rid = reg.create_run("simclr", "s" * 200, 1, 2, {}, tags=["t" * 300])
    reg.add_artifact(rid, "checkpoint", "/" + "p" * 1500)
    assert reg.get_run(rid)["split"] == "s" * 200 and reg.artifacts(rid)[0]["path"] == "/" + "p" * 1500


# -- someone else's database --------------------------------------------------------------------
def test_foreign_sqlite_file_is_refused_untouched(tmp_path):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('mine')")
    con.commit()
    con.close()
    res = CliRunner().invoke(app, ["runs", "list", "--registry", f"sqlite:///{db}"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "not a harness registry" in lines[0]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]
    con.close()
    assert not (tmp_path / "other.db-wal").exists()


def test_foreign_postgresql_database_is_refused_untouched(pg_url):
    engine = create_engine(pg_url)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id SERIAL PRIMARY KEY, body TEXT)")
    with pytest.raises(RegistryError, match="not a harness registry"):
        Registry(pg_url)
    assert inspect(engine).get_table_names() == ["notes"]
    engine.dispose()


def test_new_sqlite_registry_is_in_wal_mode(tmp_path):
    Registry(f"sqlite:///{tmp_path}/r.db")
    con = sqlite3.connect(tmp_path / "r.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


# -- passwords ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "postgresql://alice:S3cretPW@db.example:5432/reg",             # default driver not installed
    "postgresql+pg8000://alice:S3cretPW@127.0.0.1:1/reg",          # server unreachable
    "mysql+nosuchdriver://alice:S3cretPW@127.0.0.1:1/reg",         # unknown driver
    "postgresql+pg8000://alice:S3cretPW@127.0.0.1:notaport/reg",   # malformed
])
def test_password_never_in_a_message(url):
    with pytest.raises(RegistryError) as e:
        Registry(url)
    assert "S3cretPW" not in str(e.value) and "alice" in str(e.value)
    res = CliRunner().invoke(app, ["runs", "list", "--registry", url])
    assert res.exit_code == 1 and "S3cretPW" not in res.output and len(res.output.strip().splitlines()) == 1


def test_password_never_stored(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    rid = reg.create_run("simclr", "s", 1, 1, {"registry": "postgresql://bob:Hunter2@h/db", "n": [1]})
    reg.update_run(rid, error="OperationalError: could not reach postgresql://bob:Hunter2@h/db\nline 2")
    run = reg.get_run(rid)
    assert "Hunter2" not in repr(run) and run["config"]["n"] == [1] and run["error"].endswith("line 2")


# -- the server goes away mid-run ----------------------------------------------------------------
@pytest.fixture()
def tiny_split(tmp_path):
    d = data.make_synthetic(tmp_path / "data", per_class=4, test_per_class=2)
    idx = np.sort(np.random.default_rng(0).choice(len(d.train_labels), 40, replace=False))
    np.save(tmp_path / "tiny.npy", idx)
    return str(tmp_path / "data"), str(tmp_path / "tiny.npy")


def test_server_stopped_mid_run_checkpoints_and_resumes(pg_server, pg_url, tiny_split, tmp_path, monkeypatch):
    root, split = tiny_split
    monkeypatch.setenv("HARNESS_REGISTRY_RETRY_S", "1")  # give up after ~1 s of retries
    monkeypatch.setenv("HARNESS_LEASE_S", "4")  # the dead trainer's lease runs out 4 s after its last renewal
    reg = Registry(pg_url)
    real_log_epoch = Registry.log_epoch

    def log_epoch(self, run_id, epoch, **metrics):
        if epoch == 2:  # the server goes down after epoch 1 was recorded
            pg_server.stop()
        return real_log_epoch(self, run_id, epoch, **metrics)

    args = ["train", "simclr", "--split", split, "--epochs", "3", "--batch-size", "16", "--data-root", root,
            "--checkpoint-dir", str(tmp_path / "ck"), "--registry", pg_url, "--no-progress"]
    monkeypatch.setattr(Registry, "log_epoch", log_epoch)
    try:
        res = CliRunner().invoke(app, args)
    finally:
        monkeypatch.setattr(Registry, "log_epoch", real_log_epoch)
        pg_server.start()
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    line = lines[0]
    assert "registry unreachable" in line and "checkpoint saved at" in line and "--resume" in line
    runs = reg.list_runs()
    assert len(runs) == 1
    rid = runs[0]["id"]
    ckpt = tmp_path / "ck" / f"run{rid}" / "last.pt"
    assert ckpt.is_file() and str(ckpt) in line and f"--resume {rid}" in line
    assert [e["epoch"] for e in reg.epochs(rid)] == [1]
    # the server is back; once the stopped trainer's lease has run out, the run continues where
    # the checkpoint stopped
    deadline = time.monotonic() + 15
    while reg.lease_holder(rid) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    res = CliRunner().invoke(app, args + ["--resume", str(rid)])
    assert res.exit_code == 0, res.output
    run = reg.get_run(rid)
    assert run["status"] == "done" and run["epochs_done"] == 3 and run["owner"] is None
    assert [e["epoch"] for e in reg.epochs(rid)] == [1, 2, 3]  # epoch 2's row, kept in the checkpoint


def test_server_gone_between_calls_is_one_line(pg_server, pg_url, monkeypatch):
    reg = Registry(pg_url, retry_s=1)
    rid = reg.create_run("simclr", "s", 1, 1, {})
    pg_server.stop()
    try:
        with pytest.raises(RegistryError, match="unreachable") as e:
            reg.update_run(rid, epochs_done=1)
        assert "\n" not in str(e.value)
    finally:
        pg_server.start()
    reg.update_run(rid, epochs_done=1)  # the same registry object works again
    assert reg.get_run(rid)["epochs_done"] == 1

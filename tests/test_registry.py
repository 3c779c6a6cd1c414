"""Result registry: round trip, concurrent writers, bad URLs, schema migration.

Backend-independent tests run on SQLite and on a real PostgreSQL server (through the pg8000
driver). The server is a throwaway cluster that the `pg_server` fixture creates with the local
PostgreSQL binaries (initdb, pg_ctl, postgres) and stops after this module; each test gets its own
database. Without the binaries (or, as root, without `runuser` and a `postgres` user to run them
as) or the pg8000 driver, the PostgreSQL cases skip and say what is missing.
"""
import json
import math
import multiprocessing as mp
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from harness.registry import SCHEMA_VERSION, Registry, RegistryError, utcnow

# the `pg_server` and `pg_url` fixtures (a throwaway PostgreSQL cluster) live in tests/conftest.py


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """The URL of a new, empty registry on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture()
def reg(url):
    return Registry(url)


from tests.conftest import backend as _backend  # noqa: E402


# -- backend-independent behaviour: SQLite and PostgreSQL ----------------------------------
def test_round_trip(reg):
    rid = reg.create_run("bcl-d", "split1", 10, 2000, {"lr": 0.5, "batch_size": 512}, tags=["paper"],
                         device="cpu", versions={"torch": "x"}, git_rev="abc")
    reg.update_run(rid, status="running", epochs_done=3)
    reg.log_epoch(rid, 1, loss=5.5, lr=0.01, images_per_s=100.0, weight_mean=0.5, knn_top1=12.0)
    reg.log_probe(rid, "full", 0, 55.0, top5=80.0, many=60.0, medium=55.0, few=50.0, std=4.1,
                  per_class=[0.5] * 100)
    reg.log_probe(rid, "full", 0, 56.0)  # re-evaluation replaces
    reg.add_artifact(rid, "checkpoint", "/tmp/x.pt", "ff" * 32, epoch=3)
    run = reg.get_run(rid)
    assert run["config"] == {"lr": 0.5, "batch_size": 512} and run["tags"] == ["paper"]
    assert run["status"] == "running" and run["epochs_done"] == 3 and run["git_rev"] == "abc"
    ep = reg.epochs(rid)
    assert ep[0]["loss"] == 5.5 and ep[0]["extra"] == {"knn_top1": 12.0}
    probes = reg.probes(rid)
    assert len(probes) == 1 and probes[0]["top1"] == 56.0
    assert reg.latest_checkpoint(rid)["epoch"] == 3
    frame = reg.probe_frame(method="bcl-d")
    assert frame.loc[0, "top1"] == 56.0 and frame.loc[0, "split"] == "split1"
    assert reg.list_runs(tag="paper")[0]["id"] == rid and reg.list_runs(tag="nope") == []
    reg.delete_run(rid)
    assert reg.list_runs() == [] and reg.epochs(rid) == []


# floats that a lossy text or single-precision round trip would change
EXACT_FLOATS = [0.1 + 0.2, 1 / 3, math.pi, 1e-300, 5e-324, 1.7976931348623157e308, -2.5,
                123456789.12345678, 0.0, 1e100]


def test_values_read_back_exactly(reg):
    config = {"lr": 0.1 + 0.2, "nested": {"list": [1, 2.5, None, True, False, "x"], "empty": {}},
              "text": "α→β ✓ \"q\" 'a' \\ /", "big": 2**53 + 1, "tiny": -1e-7, "none": None}
    before = utcnow()
    rid = reg.create_run("simclr", "split1", 7, 300, config, tags=["t1", "t2"], device="cuda:0",
                         versions={"torch": "2.5.1", "python": "3.12"}, git_rev="0123abcd")
    after = utcnow()
    started = datetime(2026, 3, 4, 5, 6, 7, 123456)
    finished = started + timedelta(hours=5, microseconds=876543)
    reg.update_run(rid, status="done", epochs_done=300, started_at=started, finished_at=finished,
                   wall_time_s=EXACT_FLOATS[0], error="line 1\nline 2")
    run = reg.get_run(rid)
    assert run["config"] == config and run["versions"] == {"torch": "2.5.1", "python": "3.12"}
    assert run["tags"] == ["t1", "t2"] and run["device"] == "cuda:0" and run["git_rev"] == "0123abcd"
    assert (run["method"], run["split"], run["seed"], run["epochs"]) == ("simclr", "split1", 7, 300)
    assert run["status"] == "done" and run["epochs_done"] == 300 and run["error"] == "line 1\nline 2"
    assert run["started_at"] == started and run["finished_at"] == finished
    assert run["started_at"].tzinfo is None and run["finished_at"].microsecond == 999999
    assert isinstance(run["created_at"], datetime) and before <= run["created_at"] <= after
    assert run["wall_time_s"] == EXACT_FLOATS[0]

    cols = ["loss", "lr", "images_per_s", "epoch_time_s", "weight_mean", "weight_q10", "weight_q25",
            "weight_q50", "weight_q75", "weight_q90"]
    for epoch in (2, 1):  # logged out of order, read back by epoch
        reg.log_epoch(rid, epoch, **dict(zip(cols, EXACT_FLOATS)), knn_top1=epoch / 3,
                      knn={"k": 200, "top5": [0.1 + 0.2]})
    eps = reg.epochs(rid)
    assert [e["epoch"] for e in eps] == [1, 2]
    for e in eps:
        assert {c: e[c] for c in cols} == dict(zip(cols, EXACT_FLOATS))
        assert e["extra"] == {"knn_top1": e["epoch"] / 3, "knn": {"k": 200, "top5": [0.1 + 0.2]}}
    reg.log_epoch(rid, 3)  # every metric is optional
    assert {c: reg.epochs(rid)[-1][c] for c in cols} == dict.fromkeys(cols)
    assert reg.epoch_frame([rid])["loss"].tolist()[:2] == [EXACT_FLOATS[0]] * 2

    per_class = [i / 7 for i in range(100)]
    reg.log_probe(rid, "full", 0, 1 / 3, top5=math.pi, many=1e-300, medium=0.0, few=-2.5, std=0.1 + 0.2,
                  per_class=per_class, config={"probe_epochs": 100, "lr": 0.1})
    for subset in (2, 1):
        reg.log_probe(rid, "50", subset, 40.0 + subset)
    reg.log_probe(rid, "100", 1, 45.0)
    probes = reg.probes(rid)
    assert [(p["kind"], p["subset"], p["top1"]) for p in probes] == [
        ("100", 1, 45.0), ("50", 1, 41.0), ("50", 2, 42.0), ("full", 0, 1 / 3)]
    full = probes[-1]
    assert (full["top5"], full["many"], full["medium"], full["few"], full["std"]) == (
        math.pi, 1e-300, 0.0, -2.5, 0.1 + 0.2)
    assert full["per_class"] == per_class and full["config"] == {"probe_epochs": 100, "lr": 0.1}
    assert isinstance(full["created_at"], datetime)
    assert probes[0]["per_class"] == [] and probes[0]["top5"] is None

    reg.add_artifact(rid, "checkpoint", "/ckpt/e1.pt", "ab" * 32, epoch=1)
    reg.add_artifact(rid, "plot", Path("/plots/loss.png"))
    reg.add_artifact(rid, "checkpoint", "/ckpt/e2.pt", "cd" * 32, epoch=2)
    arts = reg.artifacts(rid)
    assert [(a["kind"], a["path"], a["sha256"], a["epoch"]) for a in arts] == [
        ("checkpoint", "/ckpt/e1.pt", "ab" * 32, 1), ("plot", "/plots/loss.png", None, None),
        ("checkpoint", "/ckpt/e2.pt", "cd" * 32, 2)]
    assert all(isinstance(a["created_at"], datetime) and a["run_id"] == rid for a in arts)
    assert [a["path"] for a in reg.artifacts(rid, "checkpoint")] == ["/ckpt/e1.pt", "/ckpt/e2.pt"]
    assert reg.latest_checkpoint(rid)["path"] == "/ckpt/e2.pt"
    assert reg.artifacts(rid, "nothing") == [] and reg.latest_checkpoint(rid + 1) is None


def test_non_finite_values_in_json_are_stored_as_null(reg):
    """A per-class accuracy is NaN for a class the test labels lack: stored as null on every
    backend (PostgreSQL's json rejects NaN), the finite values untouched."""
    rid = reg.create_run("simclr", "split1", 10, 1, {"lr": float("inf"), "ok": [1.5, float("-inf")]})
    per_class = [0.5, float("nan"), 1 / 3]
    reg.log_probe(rid, "full", 0, 50.0, per_class=per_class, config={"note": float("nan")})
    reg.log_epoch(rid, 1, loss=1.0, knn={"top1": float("nan")})
    assert reg.get_run(rid)["config"] == {"lr": None, "ok": [1.5, None]}
    probe = reg.probes(rid)[0]
    assert probe["per_class"] == [0.5, None, 1 / 3] and probe["config"] == {"note": None}
    assert reg.epochs(rid)[0]["extra"] == {"knn": {"top1": None}}


def test_json_output_is_strict():
    from harness.registry import to_json

    out = to_json({"loss": float("nan"), "at": datetime(2026, 1, 2, 3, 4, 5), "per_class": [1.0, float("inf")]})
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}")) == {
        "loss": None, "at": "2026-01-02T03:04:05", "per_class": [1.0, None]}


def test_list_and_filter(reg):
    a = reg.create_run("simclr", "split1", 1, 100, {}, tags=["paper", "a"], status="done")
    b = reg.create_run("simclr", "split2", 2, 200, {}, tags=["b"])
    c = reg.create_run("bcl-d", "split1", 1, 200, {}, tags=["paper"], status="failed")

    def ids(**filters):
        return [r["id"] for r in reg.list_runs(**filters)]

    assert a < b < c and ids() == [a, b, c]
    assert ids(method="simclr") == [a, b] and ids(method="bcl-d") == [c] and ids(method="byol") == []
    assert ids(split="split1") == [a, c] and ids(seed=1) == [a, c] and ids(epochs=200) == [b, c]
    assert ids(status="done") == [a] and ids(status="pending") == [b] and ids(status="running") == []
    assert ids(tag="paper") == [a, c] and ids(tag="pap") == [] and ids(tag="b") == [b]
    assert ids(method="simclr", split="split1") == [a] and ids(method="simclr", tag="paper") == [a]
    assert ids(split="split1", seed=1, epochs=200, status="failed") == [c]
    reg.update_run(b, status="running")
    assert ids(status="running") == [b]
    frame = reg.runs_frame(split="split1")
    assert frame["id"].tolist() == [a, c] and frame["method"].tolist() == ["simclr", "bcl-d"]
    reg.log_probe(a, "full", 0, 50.0)
    reg.log_probe(c, "full", 0, 60.0)
    assert reg.probe_frame(tag="paper")["top1"].tolist() == [50.0, 60.0]
    assert reg.probe_frame(method="byol").empty


def test_delete_run_removes_its_rows(reg):
    rids = [reg.create_run("simclr", "split1", s, 10, {"seed": s}) for s in (1, 2)]
    for rid in rids:
        for e in (1, 2, 3):
            reg.log_epoch(rid, e, loss=1.0 / e, knn_top1=float(e))
        reg.log_probe(rid, "full", 0, 50.0)
        reg.log_probe(rid, "50", 1, 40.0)
        reg.add_artifact(rid, "checkpoint", f"/ckpt/{rid}.pt", epoch=3)
    gone, kept = rids
    reg.delete_run(gone)
    assert [r["id"] for r in reg.list_runs()] == [kept]
    assert reg.epochs(gone) == [] and reg.probes(gone) == [] and reg.artifacts(gone) == []
    with reg.engine.connect() as c:  # no orphans left behind in any table
        for table in ("epoch_metrics", "probe_metrics", "artifacts"):
            n = c.execute(text(f"SELECT count(*) FROM {table} WHERE run_id = :r"), {"r": gone}).scalar_one()
            assert n == 0, table
    assert len(reg.epochs(kept)) == 3 and len(reg.probes(kept)) == 2 and len(reg.artifacts(kept)) == 1
    assert reg.get_run(kept)["config"] == {"seed": 2}
    with pytest.raises(RegistryError, match=f"no run with id {gone}"):
        reg.delete_run(gone)


def test_two_registries_see_each_other(url):
    a = Registry(url)
    b = Registry(url)  # opens the schema that `a` created
    assert b.schema_version() == SCHEMA_VERSION
    rid = a.create_run("simclr", "split1", 1, 10, {"lr": 0.3}, tags=["x"])
    assert b.get_run(rid)["config"] == {"lr": 0.3} and b.list_runs(tag="x")[0]["id"] == rid
    b.log_epoch(rid, 1, loss=2.25)
    b.update_run(rid, status="running", epochs_done=1)
    assert a.epochs(rid)[0]["loss"] == 2.25
    assert a.get_run(rid)["status"] == "running" and a.get_run(rid)["epochs_done"] == 1
    a.log_probe(rid, "full", 0, 51.0)
    b.log_probe(rid, "full", 0, 52.0)  # replaces a's score
    assert [p["top1"] for p in a.probes(rid)] == [52.0]
    b.add_artifact(rid, "checkpoint", "/ckpt/1.pt", epoch=1)
    assert a.latest_checkpoint(rid)["path"] == "/ckpt/1.pt"
    rid2 = b.create_run("bcl-d", "split2", 2, 10, {})
    assert [r["id"] for r in a.list_runs()] == [rid, rid2]
    a.delete_run(rid)
    assert [r["id"] for r in b.list_runs()] == [rid2] and b.epochs(rid) == []
    with pytest.raises(RegistryError, match=f"no run with id {rid}"):
        b.get_run(rid)


def test_bad_status_and_unknown_run(reg):
    rid = reg.create_run("simclr", "split1", 10, 1, {})
    with pytest.raises(ValueError, match="unknown run status"):
        reg.update_run(rid, status="exploded")
    with pytest.raises(RegistryError, match="no run with id 99"):
        reg.get_run(99)


def _writer(url, worker, n):
    r = Registry(url)
    rid = r.create_run("simclr", f"split{worker}", worker, n, {})
    for e in range(1, n + 1):
        r.log_epoch(rid, e, loss=float(e))
        r.update_run(rid, epochs_done=e)


def test_two_processes_write_at_once(url):
    Registry(url)  # create the schema first, as the run matrix does
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, w, 40)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    r = Registry(url)
    runs = r.list_runs()
    assert len(runs) == 2 and all(x["epochs_done"] == 40 for x in runs)
    assert all(len(r.epochs(x["id"])) == 40 for x in runs)


def test_foreign_database_is_refused(url):
    engine = create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    engine.dispose()
    with pytest.raises(RegistryError, match="not a harness registry"):
        Registry(url)


def test_migrates_schema_version_1(url):
    """A database written by schema 1 (runs had no `error` column) is upgraded in place."""
    pg = _backend(url) == "postgresql"
    serial, stamp = ("SERIAL PRIMARY KEY", "TIMESTAMP") if pg else ("INTEGER PRIMARY KEY", "DATETIME")
    engine = create_engine(url)
    with engine.begin() as c:
        for stmt in (
            "CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER)",
            "INSERT INTO schema_info VALUES (1, 1)",
            f"""CREATE TABLE runs (id {serial}, method VARCHAR(32), split VARCHAR(64), seed INTEGER,
                epochs INTEGER, epochs_done INTEGER, status VARCHAR(16), config JSON, tags VARCHAR(256),
                device VARCHAR(128), versions JSON, git_rev VARCHAR(64), created_at {stamp},
                started_at {stamp}, finished_at {stamp}, wall_time_s FLOAT)""",
            """INSERT INTO runs (method, split, seed, epochs, epochs_done, status, config, tags, device,
                versions, git_rev, created_at, started_at, finished_at, wall_time_s)
                VALUES ('simclr', 'split1', 10, 2000, 2000, 'done', '{"lr": 0.5}', 'paper', 'cuda',
                '{}', NULL, '2026-01-01 00:00:00', NULL, NULL, 3.0)""",
        ):
            c.exec_driver_sql(stmt)
    engine.dispose()
    r = Registry(url)
    assert r.schema_version() == SCHEMA_VERSION
    run = r.get_run(1)
    assert run["method"] == "simclr" and run["error"] is None and run["config"] == {"lr": 0.5}
    assert run["created_at"] == datetime(2026, 1, 1) and run["tags"] == ["paper"]
    r.update_run(1, error="boom")
    assert r.get_run(1)["error"] == "boom"
    r.log_probe(1, "full", 0, 50.0)  # tables of later versions exist too
    assert r.create_run("simclr", "split2", 1, 10, {}) == 2  # ids continue after the old rows
    assert Registry(url).schema_version() == SCHEMA_VERSION  # opening again migrates nothing


def test_migrates_schema_version_3(url):
    """Schema 4 added epoch_metrics.logged_at: a schema-3 file keeps its epoch rows (their time is not
    known: NULL) and new rows get one."""
    r = Registry(url)
    rid = r.create_run("simclr", "split1", 10, 2, {})
    r.log_epoch(rid, 1, loss=5.0)
    with r.engine.begin() as c:  # back to what schema 3 wrote
        c.exec_driver_sql("ALTER TABLE epoch_metrics DROP COLUMN logged_at")
        c.exec_driver_sql("UPDATE schema_info SET version = 3")
    r.engine.dispose()
    r = Registry(url)
    assert r.schema_version() == SCHEMA_VERSION
    r.log_epoch(rid, 2, loss=4.0)
    old, new = r.epochs(rid)
    assert old["loss"] == 5.0 and old["logged_at"] is None
    assert new["logged_at"] is not None and abs((utcnow() - new["logged_at"]).total_seconds()) < 60


def test_newer_schema_is_refused(url):
    r = Registry(url)
    with r.engine.begin() as c:
        c.exec_driver_sql("UPDATE schema_info SET version = 99")
    with pytest.raises(RegistryError, match="newer than this harness"):
        Registry(url)


def test_env_var_selects_registry(url, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_REGISTRY", url)
    r = Registry()
    assert r.url == url and r.schema_version() == SCHEMA_VERSION
    if _backend(url) == "sqlite":
        assert (tmp_path / "r.db").exists()


# -- URLs and files ------------------------------------------------------------------------
def test_malformed_url():
    with pytest.raises(RegistryError, match="malformed registry URL"):
        Registry("not a url")


def test_unreachable_server():
    # a real PostgreSQL driver (pg8000, pure Python) against a closed port on loopback
    with pytest.raises(RegistryError, match="is unreachable or unusable.*127.0.0.1.*server is up"):
        Registry("postgresql+pg8000://nobody@127.0.0.1:1/none")


def test_missing_database_driver():
    with pytest.raises(RegistryError, match="cannot use registry URL"):
        Registry("mysql+nosuchdriver://nobody@127.0.0.1:1/none")


def test_unwritable_sqlite_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RegistryError):
        Registry(f"sqlite:///{blocker}/sub/r.db")

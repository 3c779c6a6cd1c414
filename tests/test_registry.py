"""Result registry: round trip, concurrent writers, bad URLs, schema migration."""
import multiprocessing as mp
import sqlite3

import pytest

from harness.registry import SCHEMA_VERSION, Registry, RegistryError


@pytest.fixture()
def reg(tmp_path):
    return Registry(f"sqlite:///{tmp_path}/r.db")


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


def test_two_processes_write_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
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


def test_foreign_database_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="not a harness registry"):
        Registry(f"sqlite:///{tmp_path}/other.db")


def test_migrates_schema_version_1(tmp_path):
    """A file written by schema 1 (runs had no `error` column) is upgraded in place."""
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE schema_info (id INTEGER PRIMARY KEY, version INTEGER);
        INSERT INTO schema_info VALUES (1, 1);
        CREATE TABLE runs (id INTEGER PRIMARY KEY, method VARCHAR(32), split VARCHAR(64), seed INTEGER,
            epochs INTEGER, epochs_done INTEGER, status VARCHAR(16), config JSON, tags VARCHAR(256),
            device VARCHAR(128), versions JSON, git_rev VARCHAR(64), created_at DATETIME,
            started_at DATETIME, finished_at DATETIME, wall_time_s FLOAT);
        INSERT INTO runs VALUES (1, 'simclr', 'split1', 10, 2000, 2000, 'done', '{}', '', 'cuda', '{}',
            NULL, '2026-01-01 00:00:00', NULL, NULL, 3.0);
    """)
    con.commit()
    con.close()
    r = Registry(f"sqlite:///{path}")
    assert r.schema_version() == SCHEMA_VERSION
    run = r.get_run(1)
    assert run["method"] == "simclr" and run["error"] is None
    r.update_run(1, error="boom")
    assert r.get_run(1)["error"] == "boom"
    r.log_probe(1, "full", 0, 50.0)  # tables of later versions exist too


def test_newer_schema_is_refused(tmp_path):
    r = Registry(f"sqlite:///{tmp_path}/r.db")
    with r.engine.begin() as c:
        c.exec_driver_sql("UPDATE schema_info SET version = 99")
    with pytest.raises(RegistryError, match="newer than this harness"):
        Registry(f"sqlite:///{tmp_path}/r.db")


def test_env_var_selects_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_REGISTRY", f"sqlite:///{tmp_path}/env.db")
    assert Registry().url.endswith("env.db") and (tmp_path / "env.db").exists()

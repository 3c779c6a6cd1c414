"""Shared fixtures: real CIFAR-100 from ../shared when present, else synthetic data; a throwaway
PostgreSQL server (from the local binaries) for the registry tests."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CIFAR = SHARED / "data" / "cifar-100-python"
SHARED_SPLITS = SHARED / "splits"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend on a busy 2-core box (10x slower).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def has_real_cifar() -> bool:
    return (SHARED_CIFAR / "train").is_file()


@pytest.fixture(scope="session")
def cifar_images() -> np.ndarray:
    """256 uint8 images (N, 3, 32, 32): real CIFAR-100 test images when available."""
    if has_real_cifar():
        from harness.data import DataError
        from harness.safeio import load_pickle
        d = load_pickle(SHARED_CIFAR / "test", DataError)  # the harness's restricted loader
        return np.asarray(d["data"][:256], dtype=np.uint8).reshape(-1, 3, 32, 32)
    rng = np.random.default_rng(0)
    # smooth random images: closer to natural statistics than white noise
    base = rng.integers(0, 256, size=(256, 3, 8, 8)).astype(np.float32)
    img = np.kron(base, np.ones((1, 1, 4, 4), np.float32))
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# -- a throwaway PostgreSQL server (module scope: each test module that uses it gets its own) --
PG_USER = "harness"  # superuser of the throwaway cluster (trust auth on loopback)
PG_START_TIMEOUT_S = 20


# -- a throwaway PostgreSQL server ----------------------------------------------------------
@dataclass
class PgServer:
    port: int
    admin: "Engine"  # AUTOCOMMIT engine on the `postgres` database, for CREATE/DROP DATABASE
    ctl: Callable[..., subprocess.CompletedProcess]  # ctl("stop") / ctl("start"): pg_ctl on this cluster

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut), as a crash or restart would."""
        r = self.ctl("-m", "fast", "stop")
        assert r.returncode == 0, r.stderr

    def start(self) -> None:
        if self.ctl("status").returncode == 0:  # still (or already) running
            return
        r = self.ctl("-o", f"-p {self.port}", "start")
        assert r.returncode == 0, r.stderr

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+pg8000://{PG_USER}@127.0.0.1:{self.port}/{database}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """Start a PostgreSQL cluster for this module; skip (saying what is missing) when it cannot be
    set up. Only setup skips: registry failures in the tests that use it fail as usual.
    `stop()` and `start()` on it stop and restart the server on the same port."""
    from sqlalchemy import create_engine, text

    bins = {b: shutil.which(b) for b in ("initdb", "pg_ctl", "postgres")}
    missing = [b for b, p in bins.items() if p is None]
    if missing:
        pytest.skip(f"PostgreSQL server binaries not on PATH: {', '.join(missing)}")
    if importlib.util.find_spec("pg8000") is None:
        pytest.skip("PostgreSQL driver pg8000 is not installed (pip install pg8000)")
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres system user
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root (initdb refuses root) and `runuser` is not on PATH "
                        "to run PostgreSQL as another user")
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root (initdb refuses root) and there is no `postgres` system user")
        prefix = [runuser, "-u", "postgres", "--"]
        # pytest's basetemp is private to root (mode 0700), so the postgres user could not reach a
        # cluster under tmp_path: use a fresh private folder owned by postgres, removed afterwards.
        base = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        os.chown(base, pw.pw_uid, pw.pw_gid)
        remove_base = True
    else:
        prefix, pw = [], None
        base = tmp_path_factory.mktemp("pg")
        remove_base = False
    data, sock, log = base / "data", base / "sock", base / "postgres.log"

    def pg(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], cwd=base, capture_output=True, text=True, timeout=timeout)

    started = False
    try:
        sock.mkdir()
        if pw is not None:
            os.chown(sock, pw.pw_uid, pw.pw_gid)
        try:
            r = pg(bins["initdb"], "-D", str(data), "-U", PG_USER, "--auth=trust", "--no-locale",
                   "-E", "UTF8", "--no-sync", timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"initdb could not run: {e}")
        if r.returncode != 0:
            pytest.skip(f"initdb failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        with open(data / "postgresql.conf", "a") as f:  # appending keeps the owner (postgres)
            f.write(f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        up, reason = False, ""
        for _attempt in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            started = True  # from here on, stop the server on the way out whatever happens
            try:
                r = pg(bins["pg_ctl"], "-D", str(data), "-l", str(log), "-o", f"-p {port}", "-w",
                       "-t", str(PG_START_TIMEOUT_S), "start", timeout=PG_START_TIMEOUT_S + 10)
            except (OSError, subprocess.TimeoutExpired) as e:
                reason = f"pg_ctl start did not finish: {e}; server log: {_tail(log)}"
                break
            if r.returncode == 0:
                up = True
                break
            reason = f"pg_ctl start failed (exit {r.returncode}); server log: {_tail(log)}"
            if "already in use" not in _tail(log, 20):
                break
        if not up:
            pytest.skip(f"PostgreSQL server did not start (waited up to {PG_START_TIMEOUT_S} s): {reason}")
        admin = create_engine(f"postgresql+pg8000://{PG_USER}@127.0.0.1:{port}/postgres",
                              isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # survives restarts
        deadline = time.monotonic() + PG_START_TIMEOUT_S
        while True:
            try:
                with admin.connect() as c:
                    c.execute(text("SELECT 1"))
                break
            except Exception as e:  # noqa: BLE001 - any connection failure is a setup problem
                if time.monotonic() > deadline:
                    admin.dispose()
                    pytest.skip(f"PostgreSQL server on 127.0.0.1:{port} does not accept TCP "
                                f"connections: {e}")
                time.sleep(0.2)
        def ctl(*args: str) -> subprocess.CompletedProcess:
            return pg(bins["pg_ctl"], "-D", str(data), "-l", str(log), "-w", "-t", str(PG_START_TIMEOUT_S),
                      *args, timeout=PG_START_TIMEOUT_S + 10)

        try:
            yield PgServer(port, admin, ctl)
        finally:
            admin.dispose()
    finally:
        if started:
            for mode in ("fast", "immediate"):
                try:
                    if pg(bins["pg_ctl"], "-D", str(data), "-m", mode, "-w", "-t", "20", "stop",
                          timeout=30).returncode == 0:
                        break
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if remove_base:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server):
    """A fresh, empty database on the throwaway server for one test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with pg_server.admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield pg_server.url(name)
    with pg_server.admin.connect() as c:  # FORCE: registries of the test may still hold connections
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path):
    """The URL of a new, empty registry on each backend (SQLite file, fresh PostgreSQL database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/r.db"
    return request.getfixturevalue("pg_url")


def backend(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0]

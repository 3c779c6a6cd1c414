"""Result registry: every run, its per-epoch training metrics, probe scores and artifacts.

SQLAlchemy 2 ORM over any database URL. The default is a SQLite file in WAL mode with a
busy timeout, so several processes (the run matrix, one per GPU) can write at once.
The schema carries a version number; `migrate` brings older files up to date.

Who trains what is arbitrated here, atomically on every backend: a matrix cell is claimed
(`claim_cell`: one INSERT on a unique key, or a conditional UPDATE of an expired claim; exactly
one process wins a race) and a run is held by one process at a time (`acquire_run`). Both are
leases: the holder renews them from a heartbeat thread (`Heartbeat`) every lease/4 seconds, and
only a lease that has run out (its process is gone) may be taken over. Transient disconnects are
retried with backoff for `retry_s` seconds before a call gives up with `RegistryUnreachable`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sqlalchemy import (
    JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
    event, inspect, or_, select, text, update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import (
    ArgumentError, DBAPIError, IntegrityError, InterfaceError, OperationalError, ProgrammingError, SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from harness.errors import HarnessError, mask_secrets

if TYPE_CHECKING:  # the *_frame methods import pandas when called: the CLI starts faster without it
    import pandas as pd

SCHEMA_VERSION = 4
DEFAULT_URL = "sqlite:///results/registry.db"
ENV_VAR = "HARNESS_REGISTRY"
LEASE_ENV_VAR = "HARNESS_LEASE_S"        # seconds a claim or run lease lasts unless renewed
RETRY_ENV_VAR = "HARNESS_REGISTRY_RETRY_S"  # seconds of retries on a lost connection
DEFAULT_LEASE_S = 60.0
DEFAULT_RETRY_S = 20.0
RUN_STATUSES = ("pending", "running", "done", "failed", "interrupted")
PROBE_KINDS = ("full", "100", "50")


class RegistryError(HarnessError):
    """A registry that cannot be opened or used; the message says what to do."""


class RegistryUnreachable(RegistryError):
    """The database server went away and did not come back within the retry window."""


def new_owner() -> str:
    """Who holds a lease: host:pid:random (unique even when a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RegistryError(f"${name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise RegistryError(f"${name} must be positive, got {raw!r}")
    return value


TAG_SEPARATOR = ","  # runs.tags holds the tags joined by it


def check_tags(tags, error: type[HarnessError] = RegistryError) -> list[str]:
    """Tags are stored comma-joined: refuse one that would not come back as itself."""
    tags = list(tags)
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise error(f"tag {t!r}: a tag cannot be empty")
        if TAG_SEPARATOR in t:
            raise error(f"tag {t!r}: a tag cannot contain a comma (tags are stored comma-separated); "
                        "give each tag on its own (--tag a --tag b)")
    return tags


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    # user strings are unbounded (Text): a long split path or tag must never overflow a column
    method: Mapped[str] = mapped_column(Text, index=True)
    split: Mapped[str] = mapped_column(Text, index=True)
    seed: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)  # target number of epochs
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[str] = mapped_column(Text, default="")  # comma-separated
    device: Mapped[str | None] = mapped_column(Text, nullable=True)
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    git_rev: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    wall_time_s: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # added in schema 2
    # the process training the run (host:pid:uuid) and until when its lease holds (schema 3)
    owner: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    epochs_log: Mapped[list["EpochMetric"]] = relationship(cascade="all, delete-orphan")
    probes: Mapped[list["ProbeMetric"]] = relationship(cascade="all, delete-orphan")
    artifacts: Mapped[list["Artifact"]] = relationship(cascade="all, delete-orphan")


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    epoch_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_q10: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_q25: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_q50: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_q75: Mapped[float | None] = mapped_column(Float, nullable=True)
    weight_q90: Mapped[float | None] = mapped_column(Float, nullable=True)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)  # e.g. kNN monitor accuracy
    # when the epoch's row was written (schema 4; exports give metrics their original times)
    logged_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=utcnow)


class ProbeMetric(Base):
    __tablename__ = "probe_metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "full", "100", "50"
    subset: Mapped[int] = mapped_column(Integer, default=0)  # 0 for full, 1..5 for k-shot lists
    top1: Mapped[float] = mapped_column(Float)
    top5: Mapped[float | None] = mapped_column(Float, nullable=True)
    many: Mapped[float | None] = mapped_column(Float, nullable=True)
    medium: Mapped[float | None] = mapped_column(Float, nullable=True)
    few: Mapped[float | None] = mapped_column(Float, nullable=True)
    std: Mapped[float | None] = mapped_column(Float, nullable=True)
    per_class: Mapped[list] = mapped_column(JSON, default=list)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(Text)  # "checkpoint", "plot", ...
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text, nullable=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CellClaim(Base):
    """Who works on a matrix cell now: one row per (method, split, seed, epochs), ever (schema 3).
    The unique key makes the first claim one atomic INSERT; a later one is a conditional UPDATE."""
    __tablename__ = "cell_claims"
    __table_args__ = (UniqueConstraint("method", "split", "seed", "epochs", name="uq_cell_claims_cell"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    method: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


# Each entry upgrades a database from version v to v + 1: portable SQL, or (dialect, SQL) for a
# statement only one backend needs. Tables new in a version are made by create_all afterwards.
_TO_TEXT = [("runs", c) for c in ("method", "split", "tags", "device", "git_rev")] + \
           [("artifacts", c) for c in ("kind", "path", "sha256")]
MIGRATIONS: dict[int, list[str | tuple[str, str]]] = {
    1: ["ALTER TABLE runs ADD COLUMN error TEXT"],
    2: ["ALTER TABLE runs ADD COLUMN owner TEXT",
        ("sqlite", "ALTER TABLE runs ADD COLUMN lease_until DATETIME"),
        ("sqlite", "ALTER TABLE runs ADD COLUMN heartbeat_at DATETIME"),
        ("postgresql", "ALTER TABLE runs ADD COLUMN lease_until TIMESTAMP WITHOUT TIME ZONE"),
        ("postgresql", "ALTER TABLE runs ADD COLUMN heartbeat_at TIMESTAMP WITHOUT TIME ZONE"),
        # SQLite does not enforce VARCHAR lengths; PostgreSQL does
        *[("postgresql", f"ALTER TABLE {t} ALTER COLUMN {c} TYPE TEXT") for t, c in _TO_TEXT]],
    3: [("sqlite", "ALTER TABLE epoch_metrics ADD COLUMN logged_at DATETIME"),
        ("postgresql", "ALTER TABLE epoch_metrics ADD COLUMN logged_at TIMESTAMP WITHOUT TIME ZONE")],
}
_PG_SCHEMA_LOCK = 0x68_61_72_6E_65_73_73  # pg_advisory_xact_lock key: "harness"


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def _masked(obj: Any) -> Any:
    """Passwords out of every string in a JSON value (configs, error texts) before it is stored."""
    if isinstance(obj, str):
        return mask_secrets(obj)
    if isinstance(obj, dict):
        return {k: _masked(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_masked(v) for v in obj]
    return obj


def _safe(url: str) -> str:
    """The URL as messages show it: password hidden, even when the URL does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL: mask what we can
        return mask_secrets(url)


def _is_transient(e: BaseException) -> bool:
    """A lost or refused connection (the server is down or restarting), not a bad statement."""
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, InterfaceError):
        return True
    if isinstance(e, OperationalError):
        msg = str(getattr(e, "orig", e)).lower()
        return any(k in msg for k in ("connect", "connection", "network", "server closed", "terminating",
                                      "shutting down", "timeout", "timed out", "broken pipe", "reset by peer",
                                      "starting up", "eof"))
    return False


def _retrying(fn: Callable) -> Callable:
    """Run a registry call again, with backoff, while its server is unreachable (retry_s in all)."""
    @functools.wraps(fn)
    def wrapper(self: "Registry", *args: Any, **kwargs: Any) -> Any:
        deadline, pause = time.monotonic() + self.retry_s, 0.25
        while True:
            try:
                return fn(self, *args, **kwargs)
            except RegistryUnreachable:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
    return wrapper


def _finite_json(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no token for them and PostgreSQL rejects Python's
    NaN (a per-class accuracy is NaN for a class the test labels lack)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def json_dumps(obj: Any) -> str:
    """How the JSON columns are written, on every backend (SQLite would keep NaN, PostgreSQL not)."""
    return json.dumps(_finite_json(obj), allow_nan=False)


def _make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:  # ValueError: e.g. a port that is not a number
        raise RegistryError(f"malformed registry URL {_safe(url)!r}: {mask_secrets(str(e))}. "
                            f"Use e.g. sqlite:///results/registry.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.query:  # the driver would ignore them silently: say so instead
            raise RegistryError(f"registry URL {_safe(url)!r}: query parameters "
                                f"({', '.join(sorted(parsed.query))}) are not used by SQLite; remove them")
        db = parsed.database
        if db and db != ":memory:":
            folder = Path(db).parent
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise RegistryError(f"cannot create the folder for registry {_safe(url)!r}: {e}") from None
        engine = create_engine(url, connect_args={"timeout": 60}, json_serializer=json_dumps)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # per connection; WAL is set once the file is ours
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, json_serializer=json_dumps)
    except Exception as e:  # a missing DB driver, bad options
        raise RegistryError(f"cannot use registry URL {_safe(url)!r}: {mask_secrets(str(e))}") from None


class Registry:
    """Open (and create or migrate) the registry at `url`; see `resolve_url` for the default."""

    def __init__(self, url: str | None = None, lease_s: float | None = None, retry_s: float | None = None):
        """lease_s: how long a claim or run lease lasts unless renewed (${LEASE_ENV_VAR}, 60 s);
        retry_s: how long a call retries a lost connection before it gives up (${RETRY_ENV_VAR}, 20 s)."""
        self.url = resolve_url(url)
        self.lease_s = float(lease_s) if lease_s else _env_seconds(LEASE_ENV_VAR, DEFAULT_LEASE_S)
        self.retry_s = float(retry_s) if retry_s else _env_seconds(RETRY_ENV_VAR, DEFAULT_RETRY_S)
        self.engine = _make_engine(self.url)
        try:
            self._ensure_schema()
        except RegistryError:
            raise
        except TypeError as e:  # the driver's connect() got a URL query parameter it does not know
            if "unexpected keyword argument" not in str(e):
                raise
            raise RegistryError(f"registry URL {self._safe_url()!r}: the database driver does not accept "
                                f"{str(e).split('argument', 1)[1].strip()} (a query parameter of the URL); "
                                "remove it") from None
        except SQLAlchemyError as e:
            raise RegistryError(f"registry {self._safe_url()} is unreachable or unusable: "
                                f"{e.__class__.__name__}: {mask_secrets(str(e).splitlines()[0])}. "
                                f"Check the URL (--registry or ${ENV_VAR}) and that the server is up.") from None

    def _safe_url(self) -> str:
        return _safe(self.url)

    # -- schema -------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        """Create, check or migrate the schema in one transaction that other processes doing the
        same wait for: BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL. Elsewhere a
        creation race ("already exists") is retried and the schema read again."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    self._schema_steps(conn, dialect)
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
                # WAL lets readers and one writer overlap; set only on a file known to be a registry
                # (switching needs the file to itself, and SQLite does not wait for that: retry)
                deadline = time.monotonic() + 60
                while conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                    try:
                        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    except OperationalError as e:
                        if "locked" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            return
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    if dialect == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
                    self._schema_steps(conn, dialect)
                return
            except (IntegrityError, ProgrammingError, OperationalError) as e:
                if attempt == 4 or not any(k in str(e).lower() for k in ("already exists", "duplicate")):
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _schema_steps(self, conn, dialect: str) -> None:
        names = set(inspect(conn).get_table_names())
        if names and "schema_info" not in names:
            raise RegistryError(f"{self._safe_url()} holds tables ({', '.join(sorted(names)[:5])}) but no "
                                "schema_info: not a harness registry; left untouched, choose another URL")
        if "schema_info" not in names:
            Base.metadata.create_all(conn)
            conn.execute(SchemaInfo.__table__.insert().values(id=1, version=SCHEMA_VERSION))
            return
        version = conn.execute(select(SchemaInfo.version)).scalar_one()
        if version > SCHEMA_VERSION:
            raise RegistryError(f"registry {self._safe_url()} has schema {version}, newer than this "
                                f"harness ({SCHEMA_VERSION}): upgrade the harness")
        while version < SCHEMA_VERSION:
            for stmt in MIGRATIONS[version]:
                if isinstance(stmt, tuple):
                    only, stmt = stmt
                    if only != dialect:
                        continue
                words = stmt.split()
                if words[:2] == ["ALTER", "TABLE"] and words[2] not in names:
                    continue  # a table this database never had: create_all makes it as it is now
                conn.execute(text(stmt))
            version += 1
            conn.execute(SchemaInfo.__table__.update().values(version=version))
        Base.metadata.create_all(conn)  # tables added in later versions

    @_retrying
    def schema_version(self) -> int:
        with self.session() as s:
            return s.execute(select(SchemaInfo.version)).scalar_one()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction. A lost connection becomes RegistryUnreachable (the public methods retry
        it for retry_s seconds); other database errors a RegistryError; both one masked line."""
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except (OperationalError, InterfaceError, DBAPIError) as e:
                _rollback_quietly(s)
                lines = str(getattr(e, "orig", e)).strip().splitlines()
                first = mask_secrets(lines[0] if lines else e.__class__.__name__)
                if _is_transient(e):
                    raise RegistryUnreachable(f"registry unreachable: {self._safe_url()} ({first[:200]}); "
                                              "check that the database server is up") from None
                if not isinstance(e, OperationalError):
                    raise
                raise RegistryError(f"registry {self._safe_url()}: {first}") from None
            except BaseException:
                _rollback_quietly(s)
                raise

    # -- leases: cells and runs ---------------------------------------------------------
    def _until(self, lease_s: float | None = None) -> tuple[datetime, datetime]:
        now = utcnow()
        return now, now + timedelta(seconds=lease_s or self.lease_s)

    @_retrying
    def claim_cell(self, method: str, split: str, seed: int, epochs: int, owner: str) -> bool:
        """Claim a matrix cell for `owner`; True for exactly one of any number of racing callers.
        A cell whose claim is live (renewed by another process) is not taken; an expired one is."""
        now, until = self._until()
        key = dict(method=method, split=split, seed=seed, epochs=epochs)
        try:
            with self.session() as s:  # the first claim ever: the unique key lets one INSERT win
                s.execute(CellClaim.__table__.insert().values(**key, owner=owner, lease_until=until,
                                                              heartbeat_at=now))
            return True
        except IntegrityError:
            pass
        c = CellClaim.__table__.c
        with self.session() as s:  # one conditional UPDATE: rowcount says who won
            res = s.execute(update(CellClaim).where(
                c.method == method, c.split == split, c.seed == seed, c.epochs == epochs,
                or_(c.owner.is_(None), c.owner == owner, c.lease_until < now))
                .values(owner=owner, lease_until=until, heartbeat_at=now)
                .execution_options(synchronize_session=False))
            return res.rowcount == 1

    @_retrying
    def renew_cell(self, method: str, split: str, seed: int, epochs: int, owner: str) -> bool:
        """Extend `owner`'s claim; False if the cell is no longer `owner`'s."""
        now, until = self._until()
        c = CellClaim.__table__.c
        with self.session() as s:
            res = s.execute(update(CellClaim).where(
                c.method == method, c.split == split, c.seed == seed, c.epochs == epochs, c.owner == owner)
                .values(lease_until=until, heartbeat_at=now).execution_options(synchronize_session=False))
            return res.rowcount == 1

    @_retrying
    def release_cell(self, method: str, split: str, seed: int, epochs: int, owner: str) -> None:
        c = CellClaim.__table__.c
        with self.session() as s:
            s.execute(update(CellClaim).where(
                c.method == method, c.split == split, c.seed == seed, c.epochs == epochs, c.owner == owner)
                .values(owner=None, lease_until=None).execution_options(synchronize_session=False))

    @_retrying
    def cell_holder(self, method: str, split: str, seed: int, epochs: int) -> dict | None:
        """{'owner', 'lease_until'} of a live claim on the cell, else None."""
        c = CellClaim.__table__.c
        with self.session() as s:
            row = s.execute(select(c.owner, c.lease_until).where(
                c.method == method, c.split == split, c.seed == seed, c.epochs == epochs,
                c.owner.is_not(None), c.lease_until >= utcnow())).first()
        return {"owner": row.owner, "lease_until": row.lease_until} if row else None

    @_retrying
    def acquire_run(self, run_id: int, owner: str) -> bool:
        """Take run `run_id` for `owner` unless another process holds a live lease on it."""
        now, until = self._until()
        with self.session() as s:
            res = s.execute(update(Run).where(
                Run.id == run_id, or_(Run.owner.is_(None), Run.owner == owner, Run.lease_until.is_(None),
                                      Run.lease_until < now))
                .values(owner=owner, lease_until=until, heartbeat_at=now)
                .execution_options(synchronize_session=False))
            return res.rowcount == 1

    @_retrying
    def renew_lease(self, run_id: int, owner: str) -> bool:
        """Extend `owner`'s lease on the run; False if another process has taken it."""
        now, until = self._until()
        with self.session() as s:
            res = s.execute(update(Run).where(Run.id == run_id, Run.owner == owner)
                            .values(lease_until=until, heartbeat_at=now)
                            .execution_options(synchronize_session=False))
            return res.rowcount == 1

    @_retrying
    def release(self, run_id: int, owner: str) -> None:
        """Give the run up (training stopped); a no-op if `owner` no longer holds it."""
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.owner == owner)
                      .values(owner=None, lease_until=None).execution_options(synchronize_session=False))

    @_retrying
    def lease_holder(self, run_id: int) -> dict | None:
        """{'owner', 'lease_until'} of a live lease on the run, else None."""
        with self.session() as s:
            row = s.execute(select(Run.owner, Run.lease_until).where(
                Run.id == run_id, Run.owner.is_not(None), Run.lease_until >= utcnow())).first()
        return {"owner": row.owner, "lease_until": row.lease_until} if row else None

    # -- writes -------------------------------------------------------------------------
    @_retrying
    def create_run(self, method: str, split: str, seed: int, epochs: int, config: dict[str, Any],
                   tags: list[str] | tuple[str, ...] = (), device: str | None = None,
                   versions: dict | None = None, git_rev: str | None = None,
                   status: str = "pending", owner: str | None = None) -> int:
        """A new run; with `owner`, created already leased to it (one INSERT)."""
        now, until = self._until()
        run = Run(method=method, split=split, seed=seed, epochs=epochs, config=_masked(config),
                  tags=TAG_SEPARATOR.join(check_tags(tags)), device=device, versions=versions or {}, git_rev=git_rev,
                  status=status, owner=owner, lease_until=until if owner else None,
                  heartbeat_at=now if owner else None)
        with self.session() as s:
            s.add(run)
            s.flush()
            return run.id

    @_retrying
    def update_run(self, run_id: int, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}; one of {RUN_STATUSES}")
        fields = {k: _masked(v) if k in ("error", "config") else v for k, v in fields.items()}
        with self.session() as s:
            run = self._get(s, run_id)
            for k, v in fields.items():
                if not hasattr(Run, k):
                    raise ValueError(f"runs has no column {k!r}")
                setattr(run, k, v)

    @_retrying
    def log_epoch(self, run_id: int, epoch: int, **metrics: Any) -> None:
        known = {c.name for c in EpochMetric.__table__.columns} - {"id", "run_id", "epoch", "extra"}
        extra = {k: v for k, v in metrics.items() if k not in known}
        cols = {k: v for k, v in metrics.items() if k in known}
        with self.session() as s:
            s.add(EpochMetric(run_id=run_id, epoch=epoch, extra=extra, **cols))

    @_retrying
    def log_probe(self, run_id: int, kind: str, subset: int, top1: float, **metrics: Any) -> None:
        if kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {kind!r}; one of {PROBE_KINDS}")
        with self.session() as s:
            # re-evaluating a run replaces its earlier score for the same probe
            s.query(ProbeMetric).filter_by(run_id=run_id, kind=kind, subset=subset).delete()
            s.add(ProbeMetric(run_id=run_id, kind=kind, subset=subset, top1=top1, **metrics))

    @_retrying
    def log_probes(self, run_id: int, probes: list[dict[str, Any]], **run_fields: Any) -> None:
        """Every probe score of one evaluation, and any run fields (e.g. status "done"), in one
        transaction: an evaluation is recorded whole or not at all."""
        for p in probes:
            if p["kind"] not in PROBE_KINDS:
                raise ValueError(f"unknown probe kind {p['kind']!r}; one of {PROBE_KINDS}")
        if "status" in run_fields and run_fields["status"] not in RUN_STATUSES:
            raise ValueError(f"unknown run status {run_fields['status']!r}; one of {RUN_STATUSES}")
        run_fields = {k: _masked(v) if k in ("error", "config") else v for k, v in run_fields.items()}
        with self.session() as s:
            for p in probes:
                s.query(ProbeMetric).filter_by(run_id=run_id, kind=p["kind"], subset=p["subset"]).delete()
                s.add(ProbeMetric(run_id=run_id, **p))
            if run_fields:
                run = self._get(s, run_id)
                for k, v in run_fields.items():
                    setattr(run, k, v)

    @_retrying
    def add_artifact(self, run_id: int, kind: str, path: str, sha256: str | None = None,
                     epoch: int | None = None) -> None:
        with self.session() as s:
            # a file rewritten in place (last.pt) is one artifact: the old row's digest is stale
            s.query(Artifact).filter_by(run_id=run_id, kind=kind, path=str(path)).delete()
            s.add(Artifact(run_id=run_id, kind=kind, path=str(path), sha256=sha256, epoch=epoch))

    @_retrying
    def delete_run(self, run_id: int) -> None:
        with self.session() as s:
            s.delete(self._get(s, run_id))

    # -- reads --------------------------------------------------------------------------
    @staticmethod
    def _get(s: Session, run_id: int) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise RegistryError(f"no run with id {run_id}; `harness runs list` shows the runs")
        return run

    @_retrying
    def get_run(self, run_id: int) -> dict:
        with self.session() as s:
            return _run_dict(self._get(s, run_id))

    @_retrying
    def list_runs(self, method: str | None = None, split: str | None = None, status: str | None = None,
                  tag: str | None = None, seed: int | None = None, epochs: int | None = None) -> list[dict]:
        q = select(Run).order_by(Run.id)
        for col, val in ((Run.method, method), (Run.split, split), (Run.status, status),
                         (Run.seed, seed), (Run.epochs, epochs)):
            if val is not None:
                q = q.where(col == val)
        with self.session() as s:
            runs = [_run_dict(r) for r in s.scalars(q)]
        if tag:
            runs = [r for r in runs if tag in r["tags"]]
        return runs

    @_retrying
    def epochs(self, run_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(EpochMetric).where(EpochMetric.run_id == run_id)
                             .order_by(EpochMetric.epoch)).all()
            return [_row_dict(r) for r in rows]

    @_retrying
    def probes(self, run_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(ProbeMetric).where(ProbeMetric.run_id == run_id)
                             .order_by(ProbeMetric.kind, ProbeMetric.subset)).all()
            return [_row_dict(r) for r in rows]

    @_retrying
    def artifacts(self, run_id: int, kind: str | None = None) -> list[dict]:
        q = select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.id)
        if kind:
            q = q.where(Artifact.kind == kind)
        with self.session() as s:
            return [_row_dict(r) for r in s.scalars(q)]

    def latest_checkpoint(self, run_id: int) -> dict | None:
        cks = self.artifacts(run_id, "checkpoint")
        return cks[-1] if cks else None

    def runs_frame(self, **filters: Any) -> pd.DataFrame:
        import pandas as pd

        cols = ["id", "method", "split", "seed", "epochs", "epochs_done", "status", "tags",
                "device", "wall_time_s", "created_at", "finished_at", "config", "versions", "git_rev",
                "started_at", "error"]
        runs = self.list_runs(**filters)
        return pd.DataFrame([{c: r[c] for c in cols} for r in runs], columns=cols)

    @_retrying
    def probe_frame(self, **filters: Any) -> pd.DataFrame:
        """One row per probe score, joined with its run's method/split/seed/epochs/status/tags."""
        import pandas as pd

        runs = {r["id"]: r for r in self.list_runs(**filters)}
        cols = ["run_id", "method", "split", "seed", "epochs", "status", "tags", "kind", "subset",
                "top1", "top5", "many", "medium", "few", "std", "per_class", "config", "created_at"]
        if not runs:
            return pd.DataFrame(columns=cols)
        with self.session() as s:
            rows = s.scalars(select(ProbeMetric).where(ProbeMetric.run_id.in_(list(runs)))
                             .order_by(ProbeMetric.run_id, ProbeMetric.kind, ProbeMetric.subset)).all()
            out = []
            for p in rows:
                r = runs[p.run_id]
                out.append({"run_id": p.run_id, "method": r["method"], "split": r["split"],
                            "seed": r["seed"], "epochs": r["epochs"], "status": r["status"],
                            "tags": r["tags"], "kind": p.kind, "subset": p.subset, "top1": p.top1,
                            "top5": p.top5, "many": p.many, "medium": p.medium, "few": p.few,
                            "std": p.std, "per_class": p.per_class, "config": p.config or {},
                            "created_at": p.created_at})
        return pd.DataFrame(out, columns=cols)

    @_retrying
    def epoch_frame(self, run_ids: list[int]) -> pd.DataFrame:
        import pandas as pd

        with self.session() as s:
            rows = s.scalars(select(EpochMetric).where(EpochMetric.run_id.in_(run_ids))
                             .order_by(EpochMetric.run_id, EpochMetric.epoch)).all()
            recs = [_row_dict(r) for r in rows]
        return pd.DataFrame(recs)


def _rollback_quietly(s: Session) -> None:
    try:
        s.rollback()
    except SQLAlchemyError:  # the connection is gone: nothing to roll back
        pass


class Heartbeat:
    """A daemon thread that renews a lease every `every_s` seconds while the holder works.

    `renew()` returns False when someone else took the lease: `lost` is set (the holder must stop
    without writing), and the thread ends. `valid_until` (time.monotonic) is how long the lease is
    known to hold; a registry that cannot be reached is retried at the next beat."""

    def __init__(self, renew: Callable[[], bool], lease_s: float, name: str = "lease-heartbeat"):
        self._renew, self.lease_s = renew, lease_s
        self.every_s = lease_s / 4
        self.lost = threading.Event()
        self._stop = threading.Event()
        self.valid_until = time.monotonic() + lease_s
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def beat(self) -> bool:
        """Renew now (the holder calls this before it writes); False if the lease is lost."""
        if self.lost.is_set():
            return False
        t = time.monotonic()
        if self._renew():
            self.valid_until = t + self.lease_s
            return True
        self.lost.set()
        return False

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.beat():
                    return
            except RegistryError:  # unreachable for now: the holder finds out at its next write
                continue

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.every_s + self.lease_s)


def _row_dict(row: Base) -> dict:
    return {c.name: getattr(row, c.name) for c in row.__table__.columns}


def _run_dict(run: Run) -> dict:
    d = _row_dict(run)
    d["tags"] = [t for t in (run.tags or "").split(TAG_SEPARATOR) if t]
    return d


def to_json(obj: Any) -> str:
    """Strict JSON for `--json` output: datetimes in ISO form, NaN (a diverged loss) as null."""
    return json.dumps(_finite_json(obj), indent=2, allow_nan=False,
                      default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o))

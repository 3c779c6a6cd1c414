"""Result registry: every run, its per-epoch training metrics, probe scores and artifacts.

SQLAlchemy 2 ORM over any database URL. The default is a SQLite file in WAL mode with a
busy timeout, so several processes (the run matrix, one per GPU) can write at once.
The schema carries a version number; `migrate` brings older files up to date.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import (
    JSON, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, inspect,
    select, text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from harness.errors import HarnessError

if TYPE_CHECKING:  # the *_frame methods import pandas when called: the CLI starts faster without it
    import pandas as pd

SCHEMA_VERSION = 2
DEFAULT_URL = "sqlite:///results/registry.db"
ENV_VAR = "HARNESS_REGISTRY"
RUN_STATUSES = ("pending", "running", "done", "failed", "interrupted")
PROBE_KINDS = ("full", "100", "50")


class RegistryError(HarnessError):
    """A registry that cannot be opened or used; the message says what to do."""


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
    method: Mapped[str] = mapped_column(String(32), index=True)
    split: Mapped[str] = mapped_column(String(64), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)  # target number of epochs
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[str] = mapped_column(String(256), default="")  # comma-separated
    device: Mapped[str | None] = mapped_column(String(128), nullable=True)
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    git_rev: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    wall_time_s: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # added in schema 2

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
    kind: Mapped[str] = mapped_column(String(32))  # "checkpoint", "plot", ...
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# Each entry upgrades a database from version v to v + 1; statements must be portable SQL.
MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE runs ADD COLUMN error TEXT"],
}


def resolve_url(url: str | None = None) -> str:
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


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
    except ArgumentError as e:
        raise RegistryError(f"malformed registry URL {url!r}: {e}. "
                            f"Use e.g. sqlite:///results/registry.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            folder = Path(db).parent
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise RegistryError(f"cannot create the folder for registry {url!r}: {e}") from None
        engine = create_engine(url, connect_args={"timeout": 60}, json_serializer=json_dumps)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL lets readers and one writer overlap
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, json_serializer=json_dumps)
    except Exception as e:  # a missing DB driver, bad options
        raise RegistryError(f"cannot use registry URL {url!r}: {e}") from None


class Registry:
    """Open (and create or migrate) the registry at `url`; see `resolve_url` for the default."""

    def __init__(self, url: str | None = None):
        self.url = resolve_url(url)
        self.engine = _make_engine(self.url)
        try:
            self._ensure_schema()
        except RegistryError:
            raise
        except SQLAlchemyError as e:
            raise RegistryError(f"registry {self._safe_url()} is unreachable or unusable: "
                                f"{e.__class__.__name__}: {str(e).splitlines()[0]}. "
                                f"Check the URL (--registry or ${ENV_VAR}) and that the server is up.") from None

    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    # -- schema -------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        with self.engine.begin() as conn:
            names = set(inspect(conn).get_table_names())
            if "runs" in names and "schema_info" not in names:
                raise RegistryError(f"{self._safe_url()} has a 'runs' table but no schema_info: "
                                    "not a harness registry; choose another URL")
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
                    conn.execute(text(stmt))
                version += 1
                conn.execute(SchemaInfo.__table__.update().values(version=version))
            Base.metadata.create_all(conn)  # tables added in later versions

    def schema_version(self) -> int:
        with self.session() as s:
            return s.execute(select(SchemaInfo.version)).scalar_one()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except OperationalError as e:
                s.rollback()
                raise RegistryError(f"registry {self._safe_url()}: {str(e).splitlines()[0]}") from None
            except BaseException:
                s.rollback()
                raise

    # -- writes -------------------------------------------------------------------------
    def create_run(self, method: str, split: str, seed: int, epochs: int, config: dict[str, Any],
                   tags: list[str] | tuple[str, ...] = (), device: str | None = None,
                   versions: dict | None = None, git_rev: str | None = None,
                   status: str = "pending") -> int:
        run = Run(method=method, split=split, seed=seed, epochs=epochs, config=config,
                  tags=TAG_SEPARATOR.join(check_tags(tags)), device=device, versions=versions or {}, git_rev=git_rev,
                  status=status)
        with self.session() as s:
            s.add(run)
            s.flush()
            return run.id

    def update_run(self, run_id: int, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}; one of {RUN_STATUSES}")
        with self.session() as s:
            run = self._get(s, run_id)
            for k, v in fields.items():
                if not hasattr(Run, k):
                    raise ValueError(f"runs has no column {k!r}")
                setattr(run, k, v)

    def log_epoch(self, run_id: int, epoch: int, **metrics: Any) -> None:
        known = {c.name for c in EpochMetric.__table__.columns} - {"id", "run_id", "epoch", "extra"}
        extra = {k: v for k, v in metrics.items() if k not in known}
        cols = {k: v for k, v in metrics.items() if k in known}
        with self.session() as s:
            s.add(EpochMetric(run_id=run_id, epoch=epoch, extra=extra, **cols))

    def log_probe(self, run_id: int, kind: str, subset: int, top1: float, **metrics: Any) -> None:
        if kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {kind!r}; one of {PROBE_KINDS}")
        with self.session() as s:
            # re-evaluating a run replaces its earlier score for the same probe
            s.query(ProbeMetric).filter_by(run_id=run_id, kind=kind, subset=subset).delete()
            s.add(ProbeMetric(run_id=run_id, kind=kind, subset=subset, top1=top1, **metrics))

    def add_artifact(self, run_id: int, kind: str, path: str, sha256: str | None = None,
                     epoch: int | None = None) -> None:
        with self.session() as s:
            s.add(Artifact(run_id=run_id, kind=kind, path=str(path), sha256=sha256, epoch=epoch))

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

    def get_run(self, run_id: int) -> dict:
        with self.session() as s:
            return _run_dict(self._get(s, run_id))

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

    def epochs(self, run_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(EpochMetric).where(EpochMetric.run_id == run_id)
                             .order_by(EpochMetric.epoch)).all()
            return [_row_dict(r) for r in rows]

    def probes(self, run_id: int) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(ProbeMetric).where(ProbeMetric.run_id == run_id)
                             .order_by(ProbeMetric.kind, ProbeMetric.subset)).all()
            return [_row_dict(r) for r in rows]

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
                "device", "wall_time_s", "created_at", "finished_at"]
        runs = self.list_runs(**filters)
        return pd.DataFrame([{c: r[c] for c in cols} for r in runs], columns=cols)

    def probe_frame(self, **filters: Any) -> pd.DataFrame:
        """One row per probe score, joined with its run's method/split/seed/epochs/status/tags."""
        import pandas as pd

        runs = {r["id"]: r for r in self.list_runs(**filters)}
        cols = ["run_id", "method", "split", "seed", "epochs", "status", "tags", "kind", "subset",
                "top1", "top5", "many", "medium", "few", "std", "per_class"]
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
                            "std": p.std, "per_class": p.per_class})
        return pd.DataFrame(out, columns=cols)

    def epoch_frame(self, run_ids: list[int]) -> pd.DataFrame:
        import pandas as pd

        with self.session() as s:
            rows = s.scalars(select(EpochMetric).where(EpochMetric.run_id.in_(run_ids))
                             .order_by(EpochMetric.run_id, EpochMetric.epoch)).all()
            recs = [_row_dict(r) for r in rows]
        return pd.DataFrame(recs)


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

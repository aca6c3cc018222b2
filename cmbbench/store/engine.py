"""Where the store lives and how to connect to it.

The store URL is, in order: an explicit ``db`` argument (``--db``), the ``CMBBENCH_DB``
environment variable, else the embedded default ``sqlite:///$CMBBENCH_HOME/store.sqlite``
(:func:`cmbbench.registry.data_home`). A value without ``://`` is a path to a SQLite file.

SQLite runs in WAL mode (readers never block the writer, nor the writer the readers) with a
busy timeout, and every write is one ``BEGIN IMMEDIATE`` transaction, so concurrent writers
queue instead of failing. PostgreSQL writers serialise on a transaction-level advisory lock.
Only the coordinating process writes (never cluster workers: SQLite locking over NFS is
unreliable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from ..errors import StoreError
from ..registry import data_home
from . import schema

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "display_url",
    "ensure_schema",
    "now_iso",
    "open_store",
    "resolve_url",
    "store_revision",
    "write_transaction",
    "writer_engine",
]

log = logging.getLogger(__name__)

#: Seconds a writer waits for another writer's transaction before giving up.
DEFAULT_BUSY_TIMEOUT_S = 120.0
#: An arbitrary constant: the PostgreSQL advisory lock that serialises cmbbench writers.
_PG_LOCK_KEY = 0x636D6262  # "cmbb"
#: Test aid: seconds to hold the write lock before committing (concurrency tests only).
_HOLD_ENV = "CMBBENCH_STORE_HOLD_S"


def now_iso() -> str:
    """The current UTC time as ISO-8601 (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_url(db: str | os.PathLike | None = None) -> str:
    """The store URL: ``db``, else ``$CMBBENCH_DB``, else ``$CMBBENCH_HOME/store.sqlite``.

    A value without ``://`` is a SQLite file path (made absolute).
    """
    value = str(db) if db not in (None, "") else os.environ.get("CMBBENCH_DB") or ""
    if not value:
        return f"sqlite:///{(data_home() / 'store.sqlite').resolve()}"
    if "://" in value:
        return value
    return f"sqlite:///{Path(value).expanduser().resolve()}"


def display_url(url: str) -> str:
    """``url`` with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is shown as given
        return str(url)


def _sqlite_path(url: sa.URL) -> Path | None:
    db = url.database
    return None if not db or db == ":memory:" else Path(db)


def _parse(url: str) -> sa.URL:
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise StoreError(f"not a database URL: {display_url(url)!r} (expected e.g. "
                         "sqlite:///path/store.sqlite or postgresql+psycopg://user@host/db)"
                         ) from None


def writer_engine(db: str | None = None, *,
                  busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """An engine for writing (creates a missing SQLite file and its folder).

    Raises
    ------
    StoreError
        Malformed URL, missing driver, or a SQLite folder that cannot be created.
    """
    url = _parse(resolve_url(db))
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            path = _sqlite_path(url)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create the store folder ({exc.strerror})",
                                     path.parent) from None
            engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s})
            _sqlite_writer_events(engine, busy_timeout_s)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        raise StoreError(f"no database driver for {backend} ({exc}); for PostgreSQL install "
                         "psycopg: pip install 'psycopg[binary]'") from None
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"invalid database URL {display_url(str(url))}: {exc}") from None
    return engine


def _sqlite_writer_events(engine: Engine, busy_timeout_s: float) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # Transactions are begun explicitly (BEGIN IMMEDIATE below), not by the driver.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Take the write lock at the start: a deferred transaction that reads and then writes
        # can fail with "database is locked" without waiting for the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_store(db: str | None = None, *, read_only: bool = True,
               busy_timeout_s: float = 30.0) -> Engine:
    """An engine on an existing store (the app's and the exporters' entry point).

    Parameters
    ----------
    db
        URL or SQLite path (see :func:`resolve_url`).
    read_only
        SQLite: connections run ``PRAGMA query_only``; PostgreSQL: sessions are READ ONLY.

    Raises
    ------
    StoreError
        The SQLite file does not exist (it is never created here) or the URL is malformed.
    """
    url = _parse(resolve_url(db))
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(url)
        if path is None or not path.is_file():
            raise StoreError("no results store here: create one with `cmbbench db init` (or "
                             "`cmbbench db demo`), or point --db / CMBBENCH_DB at one",
                             path if path is not None else None)
        engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s,
                                                     "check_same_thread": False})
    else:
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except ImportError as exc:
            raise StoreError(f"no database driver for {backend} ({exc})") from None
    if read_only:
        @sa.event.listens_for(engine, "connect")
        def _ro(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            if backend == "sqlite":
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                cur.execute("PRAGMA query_only = ON")
            elif backend == "postgresql":
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                cur.close()
                dbapi_conn.commit()  # SET is transactional: a rollback would undo it
                return
            cur.close()
    return engine


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction holding the store's single-writer lock; commits on success,
    rolls back on any exception.

    Raises
    ------
    StoreError
        The database cannot be reached, or the lock was not obtained within the timeout.
    """
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            yield conn
            hold = float(os.environ.get(_HOLD_ENV) or 0)
            if hold > 0:
                time.sleep(hold)
    except sa.exc.OperationalError as exc:
        raise StoreError(f"cannot write the results store {display_url(str(engine.url))}: "
                         f"{' '.join(str(exc.orig).split())}") from None


def ensure_schema(conn: Connection) -> None:
    """Create the missing tables and indexes (inside the caller's write transaction) and
    record the schema version.

    Raises
    ------
    StoreError
        The database holds a store of another schema version.
    """
    schema.metadata.create_all(conn, checkfirst=True)
    row = conn.execute(sa.select(schema.meta.c.value)
                       .where(schema.meta.c.key == "schema_version")).first()
    if row is None:
        conn.execute(schema.meta.insert().values(key="schema_version",
                                                 value=schema.SCHEMA_VERSION))
    elif row[0] != schema.SCHEMA_VERSION:
        raise StoreError(f"the store has schema version {row[0]}, this cmbbench writes "
                         f"version {schema.SCHEMA_VERSION}; export it and start a new store")


def set_meta(conn: Connection, key: str, value: str) -> None:
    """Insert or replace one ``meta`` row."""
    conn.execute(schema.meta.delete().where(schema.meta.c.key == key))
    conn.execute(schema.meta.insert().values(key=key, value=value))


def store_revision(engine: Engine) -> str:
    """A token that changes with every write: ``<number of runs>:<last write time>``.

    Cache keys of readers (the app) should include it.
    """
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(schema.runs)).scalar_one()
        last = conn.execute(sa.select(schema.meta.c.value)
                            .where(schema.meta.c.key == "updated_at")).scalar()
    return f"{n}:{last}"

"""Writing run bundles: one transaction per import, a run's rows replaced as a whole.

Re-importing a run (same ``run_id``) deletes its previous rows and inserts the new ones in the
same transaction, so readers see either the old run or the new one, never a mix. The dataset's
``scans``/``lesions`` rows are replaced when the bundle carries them; ``methods`` and
``datasets`` rows are upserted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import schema
from .bundle import RunBundle
from .engine import ensure_schema, now_iso, set_meta, write_transaction

__all__ = ["delete_run", "init_schema", "write_bundle", "write_bundles"]

log = logging.getLogger(__name__)

#: Rows per INSERT batch (bounded memory and statement size on every backend).
_BATCH = 5000


def _insert(conn: Connection, table: sa.Table, rows: list[dict]) -> None:
    for start in range(0, len(rows), _BATCH):
        conn.execute(table.insert(), rows[start:start + _BATCH])


def delete_run(conn: Connection, run_id: str) -> int:
    """Delete one run and every row that belongs to it; returns the number of runs deleted."""
    for table in schema.RUN_CHILD_TABLES:
        conn.execute(table.delete().where(table.c.run_id == run_id))
    return conn.execute(schema.runs.delete().where(schema.runs.c.run_id == run_id)).rowcount


def _upsert(conn: Connection, table: sa.Table, row: dict, key: str, *,
            keep_existing: bool = False) -> None:
    exists = conn.execute(sa.select(table.c[key]).where(table.c[key] == row[key])).first()
    if exists is not None:
        if keep_existing:
            return
        conn.execute(table.delete().where(table.c[key] == row[key]))
    conn.execute(table.insert().values(**row))


def write_bundle(conn: Connection, bundle: RunBundle) -> None:
    """Write one bundle inside the caller's write transaction."""
    stamp = now_iso()
    _upsert(conn, schema.methods, {**bundle.method, "updated_at": stamp}, "method_id")
    carries_scans = bundle.scans is not None
    _upsert(conn, schema.datasets, {**bundle.dataset, "updated_at": stamp}, "dataset_id",
            keep_existing=not carries_scans)
    if carries_scans:
        did = bundle.dataset["dataset_id"]
        conn.execute(schema.scans.delete().where(schema.scans.c.dataset_id == did))
        conn.execute(schema.lesions.delete().where(schema.lesions.c.dataset_id == did))
        _insert(conn, schema.scans, bundle.scans or [])
        _insert(conn, schema.lesions, bundle.lesions or [])
    delete_run(conn, bundle.run_id)
    conn.execute(schema.runs.insert().values(**{**bundle.run, "imported_at": stamp}))
    _insert(conn, schema.scan_metrics, bundle.scan_metrics)
    _insert(conn, schema.matches, bundle.matches)
    _insert(conn, schema.aggregates, bundle.aggregates)
    _insert(conn, schema.curves, bundle.curves)
    if bundle.reported is not None:
        conn.execute(schema.reported.insert().values(**bundle.reported))
    set_meta(conn, "updated_at", stamp)


def init_schema(conn: Connection, *, seed_reported: bool = True) -> int:
    """Create missing tables and (re)seed the literature rows when their seed version changed;
    returns the number of reported rows written (0 when they were current)."""
    ensure_schema(conn)
    if not seed_reported:
        return 0
    from .reported import SEED_VERSION, reported_bundles

    current = conn.execute(sa.select(schema.meta.c.value)
                           .where(schema.meta.c.key == "reported_seed")).scalar()
    if current == SEED_VERSION:
        return 0
    old = conn.execute(sa.select(schema.runs.c.run_id)
                       .where(schema.runs.c.tier == "reported")).scalars().all()
    for run_id in old:
        delete_run(conn, run_id)
    bundles = reported_bundles()
    for b in bundles:
        write_bundle(conn, b)
    set_meta(conn, "reported_seed", SEED_VERSION)
    return len(bundles)


def write_bundles(engine: Engine, bundles: Iterable[RunBundle], *,
                  seed_reported: bool = True) -> list[str]:
    """Write bundles in one transaction (creating the schema first if needed); returns their
    run ids.

    Raises
    ------
    StoreError
        The store cannot be written (see :func:`cmbbench.store.engine.write_transaction`).
    """
    ids = []
    with write_transaction(engine) as conn:
        init_schema(conn, seed_reported=seed_reported)
        for b in bundles:
            write_bundle(conn, b)
            ids.append(b.run_id)
    return ids

"""The store's library entry points behind ``cmbbench db ...``, ``submit`` and ``evaluate``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import StoreError
from . import schema
from .bundle import RunBundle
from .engine import display_url, open_store, resolve_url, write_transaction, writer_engine
from .importer import ImportReport, bundle_from_run_dir
from .writer import init_schema, write_bundle, write_bundles

__all__ = [
    "auto_import",
    "export_store",
    "import_bundles",
    "import_failure_message",
    "import_run",
    "init_store",
    "table_counts",
]

log = logging.getLogger(__name__)


def init_store(db: str | None = None, *, seed_reported: bool = True) -> tuple[str, int]:
    """Create the store (tables, indexes) if needed and seed the ``reported`` rows.

    Returns
    -------
    tuple
        The store URL and the number of reported rows (re)written (0 when already current).
    """
    engine = writer_engine(db)
    try:
        with write_transaction(engine) as conn:
            n = init_schema(conn, seed_reported=seed_reported)
    finally:
        engine.dispose()
    return resolve_url(db), n


def _report(bundle: RunBundle, seconds: float) -> ImportReport:
    return ImportReport(
        run_id=bundle.run_id, tier=bundle.run["tier"], status=bundle.run["status"],
        method_id=bundle.run["method_id"], dataset_id=bundle.run["dataset_id"],
        rule_id=bundle.run["rule_id"], run_dir=bundle.run.get("run_dir"),
        counts={"scans": len(bundle.scans or []), "lesions": len(bundle.lesions or []),
                "scan_metrics": len(bundle.scan_metrics), "matches": len(bundle.matches),
                "aggregates": len(bundle.aggregates), "curves": len(bundle.curves)},
        warnings=list(bundle.warnings), seconds=round(seconds, 3))


def import_bundles(bundles: Iterable[RunBundle], *, db: str | None = None,
                   engine: Engine | None = None) -> list[str]:
    """Write prepared bundles in one transaction; returns their run ids."""
    own = engine is None
    engine = engine or writer_engine(db)
    try:
        return write_bundles(engine, bundles)
    finally:
        if own:
            engine.dispose()


def import_run(run_dir: str | Path, *, db: str | None = None, engine: Engine | None = None,
               tier: str | None = None) -> ImportReport:
    """Import one finished run directory (``evaluate`` -> ``reproduced``, ``submit`` ->
    ``scored``) in one transaction; re-importing the same run replaces its rows.

    Raises
    ------
    MissingInputError, UnreadableInputError
        Not a run directory, no scores, malformed results.
    StoreError
        The store cannot be written.
    """
    t0 = time.perf_counter()
    bundle = bundle_from_run_dir(run_dir, tier=tier)
    for w in bundle.warnings:
        log.warning("%s: %s", run_dir, w)
    own = engine is None
    engine = engine or writer_engine(db)
    try:
        with write_transaction(engine) as conn:
            init_schema(conn)
            write_bundle(conn, bundle)
    finally:
        if own:
            engine.dispose()
    return _report(bundle, time.perf_counter() - t0)


def auto_import(run_dir: str | Path, *, db: str | None = None) -> ImportReport | None:
    """Import a run that just finished, never raising: a failure is logged as a warning (the
    run directory, the source of truth, is untouched and can be imported later with
    ``cmbbench db import``)."""
    try:
        return import_run(run_dir, db=db)
    except Exception as exc:  # noqa: BLE001 - the run must never be lost to a store problem
        log.warning("%s", import_failure_message(run_dir, db, exc))
        return None


def import_failure_message(run_dir: str | Path, db: str | None, exc: BaseException) -> str:
    """One line: the run was not stored, why, and the command that stores it later."""
    try:
        where = display_url(resolve_url(db))
    except Exception:  # noqa: BLE001 - an unusable URL is part of the problem reported
        where = str(db)
    return (f"the run was not added to the results store {where} "
            f"({' '.join(str(exc).split())}); it is kept in {run_dir}: import it later with "
            f"`cmbbench db import {run_dir}`")


def table_counts(engine: Engine) -> dict[str, int]:
    """Rows per table."""
    with engine.connect() as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for t in schema.TABLE_ORDER}


def export_store(out_dir: str | Path, *, db: str | None = None) -> dict[str, Path]:
    """Write one CSV per table (``<table>.csv``, header included, NULL as an empty field) into
    ``out_dir``; returns the files by table.

    Raises
    ------
    StoreError
        The store does not exist or cannot be read.
    """
    engine = open_store(db, read_only=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    try:
        with engine.connect() as conn:
            for t in schema.TABLE_ORDER:
                order = [c for c in t.primary_key.columns]
                frame = pd.read_sql(sa.select(t).order_by(*order), conn)
                for col in t.columns:  # NULLs must not turn integer columns into floats
                    if isinstance(col.type, sa.Integer):
                        frame[col.name] = frame[col.name].astype("Int64")
                path = out / f"{t.name}.csv"
                frame.to_csv(path, index=False)
                files[t.name] = path
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot read the results store {display_url(str(engine.url))}: "
                         f"{' '.join(str(getattr(exc, 'orig', exc)).split())}") from None
    finally:
        engine.dispose()
    return files

"""The results store's tables as DataFrames, read through a read-only engine.

Everything here is plain SQL against the table and column names of the schema contract
(``docs/store.md``); nothing writes. URL resolution, the read-only engine and the store
revision come from :mod:`cmbbench.store.engine`: SQLite connections run
``PRAGMA query_only = ON``, PostgreSQL sessions are ``READ ONLY``.

Metric names are normalised on read: a store that writes the keys of
:func:`cmbbench.metrics.aggregate` (``precision_pooled``, ``average_precision``, ...) is read
with the store names of :mod:`cmbbench.metric_definitions` (``precision``, ``ap``, ...).
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import StoreError
from ..metric_definitions import DEFINITIONS
from ..store.engine import display_url as _display_url
from ..store.engine import open_store, resolve_url, store_revision
from ..store.schema import RANKED_TIERS, TIERS

__all__ = [
    "METRIC_ALIASES",
    "RANKED_TIERS",
    "TIERS",
    "StoreUnavailable",
    "connect",
    "content_digest",
    "display_url",
    "load_aggregates",
    "load_curves",
    "load_datasets",
    "load_matches",
    "load_methods",
    "load_runs",
    "load_scan_metrics",
    "load_scans",
    "revision",
    "store_url",
]

log = logging.getLogger(__name__)


# store name <- any accepted spelling (the aggregate() keys and a few short forms)
METRIC_ALIASES: dict[str, str] = {d.aggregate_key: d.key for d in DEFINITIONS
                                  if d.aggregate_key != d.key}
METRIC_ALIASES.update({"average_precision": "ap", "precision_pooled": "precision",
                       "recall_pooled": "recall", "f1_pooled": "f1"})


class StoreUnavailable(RuntimeError):
    """The store does not exist or lacks the contract's tables (the message says which)."""


def store_url(db: str | None = None) -> str:
    """The store URL: ``db``, else ``$CMBBENCH_DB``, else ``$CMBBENCH_HOME/store.sqlite``
    (:func:`cmbbench.store.engine.resolve_url`, so the CLI, the store and the app agree)."""
    return resolve_url(db)


def display_url(url: str) -> str:
    """``url`` as text with any password hidden."""
    return _display_url(url)


def connect(url: str) -> Engine:
    """A read-only engine on the existing store at ``url``
    (:func:`cmbbench.store.engine.open_store` with ``read_only=True``: SQLite connections run
    ``PRAGMA query_only``, PostgreSQL sessions are ``READ ONLY``; a missing SQLite file is
    never created).

    Raises
    ------
    StoreUnavailable
        The store does not exist, the URL is malformed or its driver is missing.
    """
    try:
        return open_store(url, read_only=True)
    except StoreError as exc:
        raise StoreUnavailable(str(exc)) from None


def _frame(engine: Engine, sql: str, **params: object) -> pd.DataFrame:
    stmt = sa.text(sql)
    for name, value in params.items():
        if isinstance(value, (list, tuple)):
            stmt = stmt.bindparams(sa.bindparam(name, expanding=True))
    try:
        with engine.connect() as conn:
            return pd.read_sql(stmt, conn, params=params)
    except sa.exc.OperationalError as exc:
        raise StoreUnavailable(f"cannot read the results store: {exc.orig}") from None
    except sa.exc.ProgrammingError as exc:
        raise StoreUnavailable(f"the results store lacks a table or column: {exc.orig}") from None


def revision(engine: Engine) -> str:
    """A token that changes with every write to the store
    (:func:`cmbbench.store.engine.store_revision`: number of runs and last write time).

    The app keys its caches with (store URL, revision), so an import shows up on the next
    page load without restarting the app.
    """
    try:
        return store_revision(engine)
    except sa.exc.OperationalError as exc:
        raise StoreUnavailable(f"cannot read the results store: {exc.orig}") from None
    except sa.exc.ProgrammingError as exc:
        raise StoreUnavailable(f"not a cmbbench results store: {exc.orig}") from None


def load_runs(engine: Engine) -> pd.DataFrame:
    """Every run with its method, dataset and (for reported rows) citation columns, and
    ``data_sha256``: the content digest of the dataset copy the run used (``run.json``'s
    ``dataset.content_sha256``, kept in ``config_json``; None where the run recorded none)."""
    frame = _frame(engine, """
        SELECT r.run_id, r.method_id, r.dataset_id, r.split, r.rule_id, r.tier, r.status,
               r.operating_threshold, r.n_scans, r.run_dir, r.cmbbench_version, r.created_at,
               r.imported_at, r.config_json,
               m.name AS method_name, m.version AS method_version, m.citation AS method_citation,
               m.paper_url, m.code_url, m.training_data, m.test_overlap,
               d.name AS dataset_name, d.synthetic AS dataset_synthetic,
               p.citation AS reported_citation, p.url AS reported_url, p.table_page,
               p.paper_rule, p.paper_split, p.note AS reported_note
        FROM runs r
        LEFT JOIN methods m ON m.method_id = r.method_id
        LEFT JOIN datasets d ON d.dataset_id = r.dataset_id
        LEFT JOIN reported p ON p.run_id = r.run_id
        ORDER BY r.dataset_id, r.rule_id, r.method_id, r.imported_at""")
    frame["data_sha256"] = [content_digest(c) for c in frame["config_json"]]
    return frame.drop(columns="config_json")


def content_digest(config_json: object) -> str | None:
    """``dataset.content_sha256`` of a run's stored ``config_json`` (None when absent or the
    text is not a JSON object)."""
    try:
        cfg = json.loads(config_json) if isinstance(config_json, str) else None
    except ValueError:
        return None
    dataset = cfg.get("dataset") if isinstance(cfg, dict) else None
    digest = dataset.get("content_sha256") if isinstance(dataset, dict) else None
    return str(digest) if digest else None


def load_methods(engine: Engine) -> pd.DataFrame:
    """The ``methods`` table."""
    return _frame(engine, "SELECT * FROM methods ORDER BY name, version")


def load_datasets(engine: Engine) -> pd.DataFrame:
    """The ``datasets`` table."""
    return _frame(engine, "SELECT * FROM datasets ORDER BY name, version")


def load_aggregates(engine: Engine, run_ids: list[str],
                    strata: list[str] | None = None) -> pd.DataFrame:
    """Aggregates of ``run_ids`` (optionally only the given ``stratum`` kinds).

    Metric names are normalised to the store names (see :data:`METRIC_ALIASES`).
    """
    cols = ("run_id, stratum, stratum_value, metric, value, ci_lower, ci_upper, n_scans, "
            "n_lesions, n_boot, seed")
    if not run_ids:
        return pd.DataFrame(columns=[c.strip() for c in cols.split(",")])
    sql = f"SELECT {cols} FROM aggregates WHERE run_id IN :run_ids"
    params: dict[str, object] = {"run_ids": list(run_ids)}
    if strata is not None:
        sql += " AND stratum IN :strata"
        params["strata"] = list(strata)
    frame = _frame(engine, sql, **params)
    frame["metric"] = frame["metric"].replace(METRIC_ALIASES)
    for c in ("value", "ci_lower", "ci_upper"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def load_curves(engine: Engine, run_ids: list[str], curve: str) -> pd.DataFrame:
    """Curve points (``froc`` or ``pr``) of ``run_ids``, in point order."""
    if not run_ids:
        return pd.DataFrame(columns=["run_id", "point", "threshold", "x", "y"])
    return _frame(engine, """
        SELECT run_id, point, threshold, x, y FROM curves
        WHERE curve = :curve AND run_id IN :run_ids ORDER BY run_id, point""",
                  curve=curve, run_ids=list(run_ids))


def load_scan_metrics(engine: Engine, run_id: str) -> pd.DataFrame:
    """Per-scan metrics of one run, worst scans (most errors) first."""
    frame = _frame(engine, """
        SELECT scan_id, tp, fp, fn, n_ref, n_pred, precision, recall, f1, dice_scan
        FROM scan_metrics WHERE run_id = :run_id""", run_id=run_id)
    frame["errors"] = frame["fp"].fillna(0) + frame["fn"].fillna(0)
    return frame.sort_values(["errors", "scan_id"], ascending=[False, True],
                             ignore_index=True)


def load_matches(engine: Engine, run_id: str, scan_id: str) -> pd.DataFrame:
    """The match table of one scan of one run (TP/FP/FN rows)."""
    return _frame(engine, """
        SELECT kind, lesion_id, candidate_id, score, distance_mm, x_mm, y_mm, z_mm, i, j, k,
               mimic_class
        FROM matches WHERE run_id = :run_id AND scan_id = :scan_id ORDER BY "row" """,
                  run_id=run_id, scan_id=scan_id)


def load_scans(engine: Engine, dataset_id: str) -> pd.DataFrame:
    """The ``scans`` rows of one dataset."""
    return _frame(engine, "SELECT * FROM scans WHERE dataset_id = :dataset_id ORDER BY scan_id",
                  dataset_id=dataset_id)

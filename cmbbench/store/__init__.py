"""The results store: an index over run directories that the CLI and the leaderboard query.

Run directories stay the source of truth; the store (SQLite by default, any SQLAlchemy URL as
an opt-in) indexes them in the tables of ``docs/store.md``. Only the coordinating process
writes, one transaction per import.

Reading (the leaderboard app)::

    from cmbbench.store import open_store, resolve_url, store_revision
    engine = open_store()                 # read-only; --db / CMBBENCH_DB / $CMBBENCH_HOME
    token = store_revision(engine)        # changes with every write (cache key)

Writing::

    from cmbbench.store import init_store, import_run
    init_store()                          # tables + the reported (literature) rows
    import_run("runs/log__SYNTH-demo__cmbbench")
"""

from __future__ import annotations

from .api import auto_import, export_store, import_bundles, import_run, init_store, table_counts
from .engine import (
    display_url,
    open_store,
    resolve_url,
    store_revision,
    write_transaction,
    writer_engine,
)
from .importer import ImportReport, bundle_from_result_tables, bundle_from_run_dir
from .schema import RANKED_TIERS, SCHEMA_VERSION, TIERS

__all__ = [
    "RANKED_TIERS",
    "SCHEMA_VERSION",
    "TIERS",
    "ImportReport",
    "auto_import",
    "bundle_from_result_tables",
    "bundle_from_run_dir",
    "display_url",
    "export_store",
    "import_bundles",
    "import_run",
    "init_store",
    "open_store",
    "resolve_url",
    "store_revision",
    "table_counts",
    "write_transaction",
    "writer_engine",
]

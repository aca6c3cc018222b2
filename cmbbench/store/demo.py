"""The demo store: the shipped methods evaluated on SYNTH-demo, plus the reported rows.

``cmbbench db demo`` runs ``cmbbench evaluate`` for ``log``, ``bian2013`` and ``ours`` on
``SYNTH-demo`` (generated on first use; each run resumes if it exists) and imports every
finished run, so ``cmbbench leaderboard`` has something to show on a fresh install. A method
that cannot run here (``ours`` without torch) is skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..errors import CmbbenchError
from ..registry import data_home
from .api import import_run, init_store
from .importer import ImportReport

__all__ = ["DEMO_DATASET", "DEMO_METHODS", "build_demo", "demo_runs_dir"]

log = logging.getLogger(__name__)

DEMO_METHODS: tuple[str, ...] = ("log", "bian2013", "ours")
DEMO_DATASET = "SYNTH-demo"


def demo_runs_dir() -> Path:
    """Where the demo's run directories go: ``$CMBBENCH_HOME/demo/runs``."""
    return data_home() / "demo" / "runs"


def build_demo(db: str | None = None, *, methods: tuple[str, ...] = DEMO_METHODS,
               dataset: str = DEMO_DATASET, runs_dir: str | Path | None = None,
               rule: str = "cmbbench", n_boot: int = 1000, quiet: bool = True,
               say: Callable[[str], None] | None = None
               ) -> tuple[list[ImportReport], dict[str, str]]:
    """Evaluate ``methods`` on ``dataset`` and import the runs (plus the reported rows).

    Returns
    -------
    tuple
        The import reports, and the methods skipped with the reason.
    """
    from ..evaluation import evaluate
    from ..progress import ProgressReporter

    say = say or (lambda m: log.info("%s", m))
    init_store(db)
    root = Path(runs_dir) if runs_dir is not None else demo_runs_dir()
    reports: list[ImportReport] = []
    skipped: dict[str, str] = {}
    for name in methods:
        out = root / f"{name}__{dataset}__{rule}"
        say(f"evaluating {name} on {dataset} -> {out}")
        try:
            report = evaluate(name, dataset, out=out, rule=rule, n_boot=n_boot, quiet=quiet,
                              progress=ProgressReporter(f"evaluate {name}", quiet=quiet))
        except CmbbenchError as exc:
            skipped[name] = str(exc)
            log.warning("skipped %s: %s", name, exc)
            continue
        if report.results_dir is None:
            skipped[name] = "the run did not finish (no scores)"
            continue
        reports.append(import_run(report.run_dir, db=db))
        say(f"stored {name}: run {reports[-1].run_id}")
    return reports, skipped

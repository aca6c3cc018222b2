"""``cmbbench leaderboard export``: a static snapshot of the leaderboard (CSV, JSON, PNG).

Layout of ``OUT``::

    snapshot.json                      store (password hidden), revision, time, versions,
                                       ranking policy, and every file written
    <dataset>/reported.csv|.json       reported rows of the dataset (never ranked)
    <dataset>/<rule>/<split>/
        leaderboard.csv|.json          ranked rows: values, CI bounds, rank and rank interval
        froc.csv, froc.png, pr.png     the curves of the ranked runs
        strata.csv                     every stratum value of the ranked runs, with CIs
        strata_<stratum>_<metric>.png  recall and FP/scan figures per stratum

Folder names are the ids with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``.
PNGs are drawn with matplotlib (no browser needed). Nothing is written to the store.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .. import __version__
from ..metric_definitions import by_key
from . import queries
from .figures import save_curve_png, save_strata_png
from .tables import STRATA, Board, leaderboard_frame, reported_frame, run_label, strata_frame

__all__ = ["export_snapshot", "slug"]

log = logging.getLogger(__name__)

#: Strata metrics drawn as PNG (strata.csv holds every metric).
PNG_STRATA_METRICS: tuple[str, ...] = ("recall", "fp_per_scan")

RANKING_POLICY = (
    "Ranked: reproduced and scored runs of one dataset, rule and split, by the rank metric; "
    "ties share the best rank. Rank interval from the 95% bootstrap CIs: best = 1 + rows whose "
    "whole CI is better, worst = rows - rows whose whole CI is worse. Reported rows are never "
    "ranked.")


def slug(text: object) -> str:
    """``text`` as a safe file or folder name."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).strip("._")
    return s or "_"


def _records(frame: pd.DataFrame) -> list[dict]:
    out = []
    for rec in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in rec.items()})
    return out


def _write(frame: pd.DataFrame, folder: Path, stem: str, files: list[str], root: Path,
           *, json_too: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / f"{stem}.csv", index=False)
    files.append(str((folder / f"{stem}.csv").relative_to(root)))
    if json_too:
        (folder / f"{stem}.json").write_text(json.dumps(_records(frame), indent=1,
                                                        default=str))
        files.append(str((folder / f"{stem}.json").relative_to(root)))


def _boards(runs: pd.DataFrame) -> list[Board]:
    ranked = runs[runs["tier"].isin(queries.RANKED_TIERS)]
    keys = ranked[["dataset_id", "rule_id", "split"]].drop_duplicates()
    return [Board(r.dataset_id, r.rule_id, r.split)
            for r in keys.sort_values(["dataset_id", "rule_id", "split"]).itertuples()]


def export_snapshot(out: str | Path, *, db: str | None = None, rank_metric: str = "f1",
                    datasets: list[str] | None = None) -> dict:
    """Write the snapshot of the store ``db`` into ``out`` (see the module docstring).

    Parameters
    ----------
    out
        Output folder (created; existing files of the same names are replaced).
    db
        Store URL or SQLite path (default: ``$CMBBENCH_DB`` or ``$CMBBENCH_HOME``'s store).
    rank_metric
        Store key of the ranking metric (see :mod:`cmbbench.metric_definitions`).
    datasets
        Only these dataset ids (default: all).

    Returns
    -------
    The ``snapshot.json`` content.

    Raises
    ------
    queries.StoreUnavailable
        The store cannot be read.
    """
    if rank_metric not in by_key():
        raise ValueError(f"unknown rank metric {rank_metric!r}; known: {', '.join(by_key())}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    url = queries.store_url(db)
    engine = queries.connect(url)
    try:
        rev = queries.revision(engine)
        runs = queries.load_runs(engine)
        if datasets is not None:
            runs = runs[runs["dataset_id"].isin(datasets)]
        aggregates = queries.load_aggregates(engine, list(runs["run_id"]))
        files: list[str] = []
        boards = []
        for dataset_id in sorted(runs["dataset_id"].unique()):
            rep = reported_frame(runs, aggregates, dataset_id)
            if len(rep):
                _write(rep, root / slug(dataset_id), "reported", files, root)
        for board in _boards(runs):
            folder = root / slug(board.dataset_id) / slug(board.rule_id) / slug(board.split)
            frame = leaderboard_frame(runs, aggregates, board, rank_metric=rank_metric)
            _write(frame, folder, "leaderboard", files, root)
            labels = {r["run_id"]: run_label(r) for _, r in frame.iterrows()}
            ids = list(labels)
            title = f"{board.dataset_id} · {board.rule_id} · {board.split}"
            froc = queries.load_curves(engine, ids, "froc")
            _write(froc.assign(method=froc["run_id"].map(labels)), folder, "froc", files, root,
                   json_too=False)
            for kind, curve in (("froc", froc), ("pr", queries.load_curves(engine, ids, "pr"))):
                save_curve_png(folder / f"{kind}.png", curve, labels, kind, title=title)
                files.append(str((folder / f"{kind}.png").relative_to(root)))
            strata = aggregates[aggregates["run_id"].isin(ids)
                                & (aggregates["stratum"] != "all")]
            _write(strata.assign(method=strata["run_id"].map(labels)), folder, "strata",
                   files, root, json_too=False)
            for stratum, (label, metrics) in STRATA.items():
                for metric in (m for m in metrics if m in PNG_STRATA_METRICS):
                    sf = strata_frame(aggregates, labels, stratum, metric)
                    if sf.empty:
                        continue
                    png = folder / f"strata_{stratum}_{metric}.png"
                    save_strata_png(png, sf, by_key()[metric].label,
                                    title=f"{label} · {title}")
                    files.append(str(png.relative_to(root)))
            boards.append({"dataset_id": board.dataset_id, "rule_id": board.rule_id,
                           "split": board.split, "folder": str(folder.relative_to(root)),
                           "n_ranked": len(frame)})
    finally:
        engine.dispose()
    index = {"store": queries.display_url(url), "revision": rev,
             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "cmbbench_version": __version__, "rank_metric": rank_metric,
             "ranking": RANKING_POLICY, "boards": boards, "files": files}
    (root / "snapshot.json").write_text(json.dumps(index, indent=1))
    log.info("wrote %d files for %d boards to %s", len(files) + 1, len(boards), root)
    return index

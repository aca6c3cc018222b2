"""The leaderboard table, its rank intervals, and the frames behind the strata and curves.

Pure functions of DataFrames read by :mod:`.queries`; no store access, no Streamlit.

Ranking (documented in ``docs/leaderboard.md``):

- Only ``reproduced`` and ``scored`` rows are ranked, within one dataset, rule and split.
  ``reported`` rows (numbers copied from papers, under the paper's own rule) are returned in a
  separate table and never get a rank.
- The point rank orders the rank metric (default pooled F1; "higher is better" or "lower is
  better" from :mod:`cmbbench.metric_definitions`), ties share the best rank (1, 2, 2, 4).
- The rank interval comes from the bootstrap 95% CIs: a row's best possible rank is 1 + the
  number of rows whose whole CI is better than its whole CI; its worst possible rank is the
  number of ranked rows minus the number of rows whose whole CI is worse. Rows whose CIs
  overlap can swap places, so the interval says which ranks the data support. A row without a
  CI (``--n-boot 0``) uses its point value as a zero-width interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from ..metric_definitions import by_key
from .queries import RANKED_TIERS

__all__ = [
    "DIGEST_SHOWN",
    "MEAN_SD",
    "SIZE_BIN_ORDER",
    "STRATA",
    "TABLE_METRICS",
    "Board",
    "board_runs",
    "copies_warning",
    "data_copies",
    "dataset_strata_frame",
    "display_frame",
    "format_ci",
    "leaderboard_frame",
    "rank_intervals",
    "reported_frame",
    "run_label",
    "safe_url",
    "strata_frame",
]

# Pooled metrics with bootstrap CIs, in column order.
TABLE_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "fp_per_scan", "fp_per_cmb",
                                  "cpm", "ap")
# Per-scan mean +- SD columns: (mean key, sd key).
MEAN_SD: tuple[tuple[str, str], ...] = (("precision_scan_mean", "precision_scan_sd"),
                                        ("recall_scan_mean", "recall_scan_sd"),
                                        ("f1_scan_mean", "f1_scan_sd"))
# Stratum kind -> (label, metrics it carries), as in docs/store.md.
STRATA: dict[str, tuple[str, tuple[str, ...]]] = {
    "size_bin": ("Lesion size", ("recall",)),
    "location": ("Lesion location", ("recall",)),
    "sequence": ("Sequence", ("recall", "fp_per_scan", "precision", "f1")),
    "field_strength_t": ("Field strength (T)", ("recall", "fp_per_scan", "precision", "f1")),
    "slice_thickness_bin": ("Slice thickness", ("recall", "fp_per_scan", "precision", "f1")),
    "dataset": ("Dataset", ("recall", "fp_per_scan", "precision", "f1")),
    "mimic_class": ("Mimic class (synthetic)", ("fp_per_scan",)),
}
SIZE_BIN_ORDER: tuple[str, ...] = ("[0, 2) mm", "[2, 3) mm", "[3, 5) mm", "[5, 10) mm",
                                   ">=10 mm")
_THICKNESS_ORDER: tuple[str, ...] = ("<=1.5 mm", "(1.5, 3] mm", ">3 mm")
_LOCATION_ORDER: tuple[str, ...] = ("lobar", "deep", "infratentorial", "unknown")


@dataclass(frozen=True)
class Board:
    """One leaderboard: a dataset, a matching rule and a split (``None``: any split)."""

    dataset_id: str
    rule_id: str
    split: str | None = None


def safe_url(url: object) -> str | None:
    """``url`` if it is an http(s) URL, else ``None`` (no ``javascript:`` or other schemes)."""
    if not isinstance(url, str) or not url.strip():
        return None
    parsed = urlparse(url.strip())
    return url.strip() if parsed.scheme in ("http", "https") and parsed.netloc else None


def run_label(run: pd.Series | dict) -> str:
    """A run's label in legends and selectors: ``method_id`` plus its tier."""
    method = run.get("method_id") or run.get("method_name") or run.get("run_id")
    return f"{method} ({run.get('tier')})"


def _num(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return v


def rank_intervals(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, *,
                   higher_is_better: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point rank and the rank interval from CI overlap (see the module docstring).

    Parameters
    ----------
    values, lower, upper
        Metric value and its CI bounds per row (NaN bounds: the value is used).
    higher_is_better
        Direction of the metric.

    Returns
    -------
    rank, best, worst
        Float arrays (NaN for rows without a value, which are not ranked). ``best <= rank <=
        worst`` for every ranked row.
    """
    v = np.asarray(values, dtype=np.float64)
    lo = np.where(np.isnan(np.asarray(lower, dtype=np.float64)), v, lower)
    hi = np.where(np.isnan(np.asarray(upper, dtype=np.float64)), v, upper)
    if not higher_is_better:  # turn "lower is better" into "higher is better"
        v, lo, hi = -v, -hi, -lo
    ok = ~np.isnan(v)
    n = int(ok.sum())
    rank = np.full(v.shape, np.nan)
    best = np.full(v.shape, np.nan)
    worst = np.full(v.shape, np.nan)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        rank[i] = 1 + int((v[others] > v[i]).sum())
        best[i] = 1 + int((lo[others] > hi[i]).sum())
        worst[i] = n - int((hi[others] < lo[i]).sum())
    return rank, best, worst


def board_runs(runs: pd.DataFrame, board: Board) -> pd.DataFrame:
    """The runs of one board (all tiers but ``reported``), latest import per method and tier."""
    sel = runs[(runs["dataset_id"] == board.dataset_id) & (runs["rule_id"] == board.rule_id)
               & runs["tier"].isin(RANKED_TIERS)]
    if board.split is not None:
        sel = sel[sel["split"] == board.split]
    sel = sel.sort_values("imported_at").drop_duplicates(["method_id", "tier", "split"],
                                                         keep="last")
    return sel.reset_index(drop=True)


def _wide(aggregates: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """One row per run: ``<metric>``, ``<metric>_ci_lower``, ``<metric>_ci_upper``."""
    agg = aggregates[(aggregates["stratum"] == "all") & aggregates["run_id"].isin(run_ids)]
    agg = agg.drop_duplicates(["run_id", "metric"], keep="last")
    parts = [agg.pivot(index="run_id", columns="metric", values=c).add_suffix(s)
             for c, s in (("value", ""), ("ci_lower", "_ci_lower"), ("ci_upper", "_ci_upper"))]
    wide = pd.concat(parts, axis=1) if len(agg) else pd.DataFrame(index=pd.Index([], name="run_id"))
    return wide.reindex(run_ids)


_RUN_COLUMNS = ["run_id", "method_id", "method_name", "method_version", "tier", "status",
                "split", "n_scans", "paper_url", "code_url", "method_citation", "data_sha256"]

#: hex digits of a dataset copy's content digest shown in the table
DIGEST_SHOWN = 12


def data_copies(frame: pd.DataFrame) -> dict[str, list[str]]:
    """The dataset copies a board's rows were computed on: content digest (``data_sha256``)
    -> method ids, for the rows that recorded one. More than one key means the ranked
    numbers come from different images of the "same" dataset (regenerated synthetic data can
    differ between machines; docs/synthetic.md, Limits)."""
    if "data_sha256" not in frame.columns:
        return {}
    out: dict[str, list[str]] = {}
    for digest, method in zip(frame["data_sha256"], frame["method_id"]):
        if isinstance(digest, str) and digest:
            out.setdefault(digest, []).append(str(method))
    return out


def copies_warning(frame: pd.DataFrame) -> str | None:
    """One line saying which rows of a board were computed on which dataset copy, when they
    were computed on more than one; None otherwise (rows without a digest are not counted)."""
    copies = data_copies(frame)
    if len(copies) < 2:
        return None
    parts = [f"{d[:DIGEST_SHOWN]} ({', '.join(sorted(m))})" for d, m in sorted(copies.items())]
    return (f"These rows were computed on {len(copies)} different copies of the dataset "
            f"(content sha256 {'; '.join(parts)}): their numbers come from different images "
            "and are not strictly comparable.")


def leaderboard_frame(runs: pd.DataFrame, aggregates: pd.DataFrame, board: Board, *,
                      tiers: list[str] | tuple[str, ...] = RANKED_TIERS,
                      rank_metric: str = "f1") -> pd.DataFrame:
    """The ranked rows of ``board``: numbers with CIs, point rank and rank interval.

    Parameters
    ----------
    runs
        :func:`.queries.load_runs`.
    aggregates
        :func:`.queries.load_aggregates` of (at least) the board's runs, stratum ``all``.
    tiers
        Tiers to keep (a subset of ``reproduced``/``scored``; ``reported`` is never ranked).
    rank_metric
        Store key of the metric that orders the table.

    Returns
    -------
    One row per run, best first: the run columns, ``rank``, ``rank_best``, ``rank_worst``, and
    for each metric ``<m>``, ``<m>_ci_lower``, ``<m>_ci_upper`` (plus the per-scan SDs).
    """
    tiers = [t for t in tiers if t in RANKED_TIERS]
    sel = board_runs(runs, board)
    sel = sel[sel["tier"].isin(tiers)].reset_index(drop=True)
    cols = [c for c in _RUN_COLUMNS if c in sel.columns]
    out = sel[cols].copy()
    wide = _wide(aggregates, list(out["run_id"]))
    metrics = list(TABLE_METRICS) + [k for pair in MEAN_SD for k in pair]
    for m in metrics:
        for suffix in ("", "_ci_lower", "_ci_upper"):
            col = m + suffix
            out[col] = wide[col].to_numpy(np.float64) if col in wide.columns else np.nan
    definition = by_key()[rank_metric]
    rank, best, worst = rank_intervals(out[rank_metric].to_numpy(np.float64),
                                       out[f"{rank_metric}_ci_lower"].to_numpy(np.float64),
                                       out[f"{rank_metric}_ci_upper"].to_numpy(np.float64),
                                       higher_is_better=bool(definition.higher_is_better))
    out.insert(0, "rank", rank)
    out.insert(1, "rank_best", best)
    out.insert(2, "rank_worst", worst)
    out["rank_metric"] = rank_metric
    return out.sort_values(["rank", "method_id"], na_position="last", ignore_index=True)


def reported_frame(runs: pd.DataFrame, aggregates: pd.DataFrame,
                   dataset_id: str) -> pd.DataFrame:
    """The ``reported`` rows of a dataset (any rule: each is under its paper's own rule).

    Never ranked; carries citation, table/page, the paper's rule and split, and any note.
    """
    sel = runs[(runs["dataset_id"] == dataset_id) & (runs["tier"] == "reported")]
    sel = sel.reset_index(drop=True)
    wide = _wide(aggregates, list(sel["run_id"]))
    out = sel[[c for c in ("run_id", "method_id", "method_name", "method_version", "rule_id",
                           "reported_citation", "reported_url", "table_page", "paper_rule",
                           "paper_split", "reported_note", "paper_url", "code_url")
               if c in sel.columns]].copy()
    for m in TABLE_METRICS:
        out[m] = wide[m].to_numpy(np.float64) if m in wide.columns else np.nan
    return out


def format_ci(value: object, lower: object = None, upper: object = None,
              digits: int = 3) -> str:
    """``value [lower, upper]``; ``—`` for a missing value; no brackets without a CI."""
    v, lo, hi = _num(value), _num(lower), _num(upper)
    if math.isnan(v):
        return "—"
    text = f"{v:.{digits}f}"
    if not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def _mean_sd(mean: object, sd: object, digits: int = 3) -> str:
    m, s = _num(mean), _num(sd)
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def _rank_text(rank: float, best: float, worst: float) -> tuple[str, str]:
    if math.isnan(rank):
        return "—", "—"
    interval = f"{int(best)}" if best == worst else f"{int(best)}–{int(worst)}"
    return f"{int(rank)}", interval


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells (``value [CI]``, ``mean ± SD``), links checked.

    Text stays text: the app shows this frame with ``st.dataframe``, which never interprets
    HTML or Markdown; links are kept only for http(s) URLs.
    """
    defs = by_key()
    rows = []
    for _, r in frame.iterrows():
        rank, interval = _rank_text(_num(r.get("rank")), _num(r.get("rank_best")),
                                    _num(r.get("rank_worst")))
        row = {"Rank": rank, "Rank interval": interval, "Method": str(r.get("method_name")),
               "Version": str(r.get("method_version")), "Tier": str(r.get("tier"))}
        for m in TABLE_METRICS:
            row[defs[m].label] = format_ci(r.get(m), r.get(f"{m}_ci_lower"),
                                           r.get(f"{m}_ci_upper"))
        for mean, sd in MEAN_SD:
            row[defs[mean].label.replace(" (mean)", " (mean ± SD)")] = _mean_sd(r.get(mean),
                                                                                r.get(sd))
        n = _num(r.get("n_scans"))
        row["Scans"] = "—" if math.isnan(n) else str(int(n))
        digest = r.get("data_sha256")
        row["Data copy"] = digest[:DIGEST_SHOWN] if isinstance(digest, str) and digest else "—"
        row["Paper"] = safe_url(r.get("paper_url"))
        row["Code"] = safe_url(r.get("code_url"))
        row["Run"] = str(r.get("run_id"))
        rows.append(row)
    return pd.DataFrame(rows)


def _value_order(kind: str, values: list[str]) -> list[str]:
    order = {"size_bin": SIZE_BIN_ORDER, "slice_thickness_bin": _THICKNESS_ORDER,
             "location": _LOCATION_ORDER}.get(kind, ())
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in known)


def strata_frame(aggregates: pd.DataFrame, labels: dict[str, str], stratum: str,
                 metric: str) -> pd.DataFrame:
    """One stratum's values of ``metric`` per run, ordered by stratum value.

    Returns columns ``run_id``, ``method`` (label), ``stratum_value``, ``value``, ``ci_lower``,
    ``ci_upper``, ``n_scans``, ``n_lesions``.
    """
    sel = aggregates[(aggregates["stratum"] == stratum) & (aggregates["metric"] == metric)
                     & aggregates["run_id"].isin(list(labels))].copy()
    sel["stratum_value"] = sel["stratum_value"].astype(str)
    sel["method"] = sel["run_id"].map(labels)
    order = _value_order(stratum, list(sel["stratum_value"].unique()))
    sel["stratum_value"] = pd.Categorical(sel["stratum_value"], categories=order, ordered=True)
    methods = list(dict.fromkeys(labels.values()))  # keep the caller's (rank) order
    sel["method"] = pd.Categorical(sel["method"], categories=methods, ordered=True)
    sel = sel.sort_values(["stratum_value", "method"])
    sel["stratum_value"] = sel["stratum_value"].astype(str)
    sel["method"] = sel["method"].astype(str)
    return sel[["run_id", "method", "stratum_value", "value", "ci_lower", "ci_upper",
                "n_scans", "n_lesions"]].reset_index(drop=True)


def dataset_strata_frame(runs: pd.DataFrame, aggregates: pd.DataFrame, rule_id: str,
                         metric: str, method_ids: list[str] | None = None) -> pd.DataFrame:
    """``metric`` by dataset: the overall value of every ranked-tier run under ``rule_id``.

    The "dataset" stratum compares one method across datasets, so it is built from each
    dataset's own runs (latest per method and tier) rather than from one run. Same columns as
    :func:`strata_frame`.
    """
    sel = runs[(runs["rule_id"] == rule_id) & runs["tier"].isin(RANKED_TIERS)]
    if method_ids is not None:
        sel = sel[sel["method_id"].isin(method_ids)]
    sel = sel.sort_values("imported_at").drop_duplicates(
        ["method_id", "tier", "dataset_id", "split"], keep="last")
    labels = {r["run_id"]: run_label(r) for _, r in sel.iterrows()}
    agg = aggregates[(aggregates["stratum"] == "all") & (aggregates["metric"] == metric)
                     & aggregates["run_id"].isin(list(labels))].copy()
    agg["method"] = agg["run_id"].map(labels)
    agg["stratum_value"] = agg["run_id"].map(sel.set_index("run_id")["dataset_id"])
    agg = agg.sort_values(["stratum_value", "method"])
    return agg[["run_id", "method", "stratum_value", "value", "ci_lower", "ci_upper",
                "n_scans", "n_lesions"]].reset_index(drop=True)

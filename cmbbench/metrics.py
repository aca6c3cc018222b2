"""Detection, scan-level and segmentation metrics, as pure functions of the match table.

Inputs are the per-lesion/per-candidate table of :func:`cmbbench.matching.match_scan` (all
scans concatenated) and the scan table (one row per scored scan, ``scan_id`` plus optional
``dice_scan``/``volume_ref_mm3``/``volume_pred_mm3`` and strata attributes). Nothing here reads
images, so any aggregate or stratum can be recomputed from the tables alone.

Every aggregate accepts per-scan ``weights`` (non-negative integers: how many times a scan is
counted). Weights make the bootstrap (:mod:`cmbbench.statistics`) a re-weighting of prepared
arrays instead of a re-scoring.

The edge-case policy (empty reference, empty prediction, both empty) is documented, cell by cell,
in ``docs/metrics.md``; undefined values are NaN and are skipped by per-scan averages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "COUNT_CATEGORIES",
    "FROC_FP_RATES",
    "SIZE_BINS_MM",
    "PreparedTables",
    "aggregate",
    "auroc",
    "average_precision",
    "f1_from_counts",
    "froc_curve",
    "prepare",
    "safe_div",
    "scan_table",
    "sensitivity_at",
    "stratified",
]

#: False positives per scan at which the FROC sensitivity is read (LUNA16 points).
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: Scan-level count categories: "the scan has >= k CMBs".
COUNT_CATEGORIES: tuple[int, ...] = (1, 3, 5, 11)

#: Lesion diameter bin edges (mm) for stratified recall: [0,2), [2,3), [3,5), [5,10), [10,inf).
SIZE_BINS_MM: tuple[float, ...] = (0.0, 2.0, 3.0, 5.0, 10.0, np.inf)


def safe_div(num: float, den: float) -> float:
    """``num / den``, or NaN when ``den == 0``."""
    return float(num) / float(den) if den else float("nan")


def f1_from_counts(tp_ref: float, n_ref: float, tp_pred: float, n_pred: float) -> float:
    """F1 = harmonic mean of precision ``tp_pred/n_pred`` and recall ``tp_ref/n_ref``.

    For one-to-one rules (``tp_ref == tp_pred``) this is ``2TP / (2TP + FP + FN)``.
    Policy: both empty -> NaN; exactly one side empty -> 0; P = R = 0 -> 0.
    """
    if n_ref == 0 and n_pred == 0:
        return float("nan")
    if n_ref == 0 or n_pred == 0:
        return 0.0
    p, r = tp_pred / n_pred, tp_ref / n_ref
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def scan_table(table: pd.DataFrame, scan_ids: list[str] | pd.Series,
               extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-scan counts and metrics at the operating point.

    Columns: ``n_ref``, ``n_pred`` (TP + FP + ignored candidates), ``tp`` (detected lesions),
    ``tp_pred`` (correct candidates; equals ``tp`` for one-to-one rules), ``fp``, ``fn``,
    ``ignored``, ``merged``, ``precision``, ``recall``, ``f1``, ``count_diff`` (n_pred - n_ref),
    ``abs_count_diff``, ``max_score`` (highest candidate score, 0 without candidates), plus the
    columns of ``extra`` (joined on ``scan_id``).
    """
    ids = pd.Index([str(s) for s in scan_ids], name="scan_id")
    ref = table[table["kind"] == "reference"]
    cand = table[table["kind"] == "candidate"]

    def count(frame: pd.DataFrame, mask: pd.Series) -> pd.Series:
        return frame[mask].groupby("scan_id").size().reindex(ids, fill_value=0)

    out = pd.DataFrame(index=ids)
    out["n_ref"] = ref.groupby("scan_id").size().reindex(ids, fill_value=0)
    out["tp"] = count(ref, ref["outcome"] == "TP")
    out["fn"] = count(ref, ref["outcome"] == "FN")
    out["tp_pred"] = count(cand, cand["outcome"] == "TP")
    out["fp"] = count(cand, cand["outcome"] == "FP")
    out["ignored"] = count(cand, cand["outcome"] == "ignored")
    out["merged"] = count(cand, cand["outcome"] == "merged")
    out["n_pred"] = out["tp_pred"] + out["fp"] + out["ignored"]
    counted = out["tp_pred"] + out["fp"]
    out["precision"] = [safe_div(a, b) for a, b in zip(out["tp_pred"], counted)]
    out["recall"] = [safe_div(a, b) for a, b in zip(out["tp"], out["n_ref"])]
    out["f1"] = [f1_from_counts(a, b, c, d) for a, b, c, d in
                 zip(out["tp"], out["n_ref"], out["tp_pred"], counted)]
    out["count_diff"] = out["n_pred"] - out["n_ref"]
    out["abs_count_diff"] = out["count_diff"].abs()
    live = cand[cand["outcome"] != "merged"]
    out["max_score"] = (live.groupby("scan_id")["score"].max().reindex(ids)
                        .astype(np.float64).fillna(0.0))
    out = out.reset_index()
    if extra is not None and len(extra):
        extra = extra.copy()
        extra["scan_id"] = extra["scan_id"].astype(str)
        dup = [c for c in extra.columns if c in out.columns and c != "scan_id"]
        out = out.merge(extra.drop(columns=dup), on="scan_id", how="left")
    return out


@dataclass
class PreparedTables:
    """Arrays extracted once from the tables, for fast (re-weighted) aggregation.

    Event arrays hold, for the threshold sweep, the score at which each event starts to count
    and the position of its scan in ``scans``.
    """

    scans: pd.DataFrame
    hit_score: np.ndarray       # per reference lesion (NaN if never detected)
    hit_scan: np.ndarray
    tp_pred_score: np.ndarray   # per sweep-TP candidate
    tp_pred_scan: np.ndarray
    fp_score: np.ndarray        # per sweep-FP candidate
    fp_scan: np.ndarray
    cand_scores: list[np.ndarray]  # per scan: live candidate scores, descending
    pair_dice: np.ndarray       # per operating-point TP lesion with rater masks on both sides
    pair_dice_scan: np.ndarray


def prepare(table: pd.DataFrame, scans: pd.DataFrame) -> PreparedTables:
    """Extract the arrays that :func:`aggregate` needs from the match and scan tables."""
    pos = {s: n for n, s in enumerate(scans["scan_id"].astype(str))}
    ref = table[table["kind"] == "reference"]
    cand = table[table["kind"] == "candidate"]
    tp_pred = cand[cand["sweep_status"] == "TP"]
    fp = cand[cand["sweep_status"] == "FP"]
    live = cand[cand["sweep_status"] != "merged"]
    per_scan = {s: np.sort(g["score"].to_numpy(np.float64))[::-1]
                for s, g in live.groupby("scan_id")}
    dice_rows = ref[(ref["outcome"] == "TP") & (ref["mask_source"] == "rater")
                    & ref["dice"].notna()]

    def scan_pos(frame: pd.DataFrame) -> np.ndarray:
        return frame["scan_id"].astype(str).map(pos).to_numpy(np.int64)

    return PreparedTables(
        scans=scans.reset_index(drop=True),
        hit_score=ref["hit_score"].to_numpy(np.float64), hit_scan=scan_pos(ref),
        tp_pred_score=tp_pred["score"].to_numpy(np.float64), tp_pred_scan=scan_pos(tp_pred),
        fp_score=fp["score"].to_numpy(np.float64), fp_scan=scan_pos(fp),
        cand_scores=[per_scan.get(s, np.zeros(0)) for s in scans["scan_id"].astype(str)],
        pair_dice=dice_rows["dice"].to_numpy(np.float64), pair_dice_scan=scan_pos(dice_rows),
    )


def _froc_arrays(prep: PreparedTables, w: np.ndarray) -> dict[str, np.ndarray | float]:
    """Operating points as arrays (see :func:`froc_curve`); the fast path of the bootstrap."""
    n_ref = float(w[prep.hit_scan].sum()) if prep.hit_scan.size else 0.0
    n_scans = float(w.sum())
    detected = ~np.isnan(prep.hit_score)
    n_det = int(detected.sum())
    n_tpp, n_fp = prep.tp_pred_score.size, prep.fp_score.size
    ev_score = np.concatenate([prep.hit_score[detected], prep.tp_pred_score, prep.fp_score])
    thr = np.unique(ev_score)[::-1]
    idx = np.searchsorted(-thr, -ev_score)  # position of each event's threshold
    zeros = np.zeros

    def cum(weights: np.ndarray) -> np.ndarray:
        return np.r_[0.0, np.cumsum(np.bincount(idx, weights=weights, minlength=thr.size))]

    tp = cum(np.concatenate([w[prep.hit_scan[detected]], zeros(n_tpp), zeros(n_fp)]))
    tpp = cum(np.concatenate([zeros(n_det), w[prep.tp_pred_scan], zeros(n_fp)]))
    fp = cum(np.concatenate([zeros(n_det), zeros(n_tpp), w[prep.fp_scan]]))
    counted = tpp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(counted > 0, tpp / np.where(counted > 0, counted, 1.0), np.nan)
    return {
        "threshold": np.r_[np.inf, thr], "tp": tp, "tp_pred": tpp, "fp": fp,
        "sensitivity": tp / n_ref if n_ref else np.full(tp.shape, np.nan),
        "fp_per_scan": fp / n_scans if n_scans else np.full(fp.shape, np.nan),
        "precision": precision,
    }


def froc_curve(prep: PreparedTables, weights: np.ndarray | None = None) -> pd.DataFrame:
    """Every operating point of the free-response ROC, pooled over scans.

    One row per distinct candidate score (descending), plus a first row at threshold +inf
    (nothing detected). Columns: ``threshold`` (candidates with score >= threshold count),
    ``tp`` (detected lesions), ``tp_pred``, ``fp``, ``sensitivity`` (tp / #lesions; NaN without
    lesions), ``fp_per_scan`` (fp / #scans, all scans counted, negatives included),
    ``precision`` (tp_pred / (tp_pred + fp); NaN with no counted candidate).
    No point is dropped or replaced.
    """
    w = np.ones(len(prep.scans)) if weights is None else np.asarray(weights, dtype=np.float64)
    return pd.DataFrame(_froc_arrays(prep, w))


def sensitivity_at(curve: pd.DataFrame | dict, fp_rate: float) -> float:
    """FROC sensitivity at ``fp_rate`` false positives per scan (step rule, no interpolation).

    The highest sensitivity among operating points with ``fp_per_scan <= fp_rate``. When the
    whole curve stays below ``fp_rate`` this is the sensitivity at the lowest threshold (more
    false positives cannot be had). NaN without reference lesions.
    """
    sens = np.asarray(curve["sensitivity"], dtype=np.float64)
    fpr = np.asarray(curve["fp_per_scan"], dtype=np.float64)
    if np.isnan(sens).all():
        return float("nan")
    ok = fpr <= fp_rate + 1e-12
    return float(sens[ok].max()) if ok.any() else float("nan")


def average_precision(curve: pd.DataFrame | dict) -> float:
    """Area under the lesion precision-recall step curve: ``sum (R_n - R_{n-1}) P_n``.

    Computed over the FROC operating points (recall = sensitivity). NaN without reference
    lesions; 0 when lesions exist but nothing is ever detected.
    """
    rec = np.asarray(curve["sensitivity"], dtype=np.float64)
    if np.isnan(rec).all():
        return float("nan")
    prec = np.nan_to_num(np.asarray(curve["precision"], dtype=np.float64), nan=0.0)
    return float(np.sum(np.diff(rec) * prec[1:]))


def auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count 1/2); NaN if a class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    w = np.ones(s.size) if weights is None else np.asarray(weights, dtype=np.float64)
    wp, wn = w[y], w[~y]
    if wp.sum() == 0 or wn.sum() == 0:
        return float("nan")
    sp, sn = s[y], s[~y]
    gt = (sp[:, None] > sn[None, :]).astype(np.float64)
    eq = (sp[:, None] == sn[None, :]).astype(np.float64)
    return float((wp[:, None] * wn[None, :] * (gt + 0.5 * eq)).sum() / (wp.sum() * wn.sum()))


def _wmean_sd(x: np.ndarray, w: np.ndarray) -> tuple[float, float, int]:
    """Weighted mean, SD (frequency weights, ddof=1) and count, skipping NaN."""
    ok = ~np.isnan(x) & (w > 0)
    n = float(w[ok].sum())
    if n == 0:
        return float("nan"), float("nan"), 0
    m = float((w[ok] * x[ok]).sum() / n)
    sd = float(np.sqrt((w[ok] * (x[ok] - m) ** 2).sum() / (n - 1))) if n > 1 else float("nan")
    return m, sd, int(round(n))


def _kth_score(cand_scores: list[np.ndarray], k: int) -> np.ndarray:
    """Per scan, the k-th highest candidate score (0 if fewer than k candidates)."""
    return np.array([s[k - 1] if s.size >= k else 0.0 for s in cand_scores])


def aggregate(prep: PreparedTables, *, operating_threshold: float,
              weights: np.ndarray | None = None) -> dict[str, float]:
    """All dataset-level metrics (see ``docs/metrics.md`` for definitions and edge cases).

    Parameters
    ----------
    prep
        From :func:`prepare`.
    operating_threshold
        The rule's operating threshold (used for scan-level decisions).
    weights
        Per-scan multiplicities (bootstrap); default 1 for every scan.
    """
    sc = prep.scans
    w = np.ones(len(sc)) if weights is None else np.asarray(weights, dtype=np.float64)
    tot = {c: float((w * sc[c].to_numpy(np.float64)).sum())
           for c in ("n_ref", "n_pred", "tp", "tp_pred", "fp", "fn", "ignored", "merged")}
    n_scans = float(w.sum())
    out: dict[str, float] = {
        "n_scans": n_scans, "n_ref": tot["n_ref"], "n_pred": tot["n_pred"],
        "tp": tot["tp"], "tp_pred": tot["tp_pred"], "fp": tot["fp"], "fn": tot["fn"],
        "ignored": tot["ignored"], "merged": tot["merged"],
        "n_scans_positive": float(w[sc["n_ref"].to_numpy() > 0].sum()),
    }
    counted = tot["tp_pred"] + tot["fp"]
    out["precision_pooled"] = safe_div(tot["tp_pred"], counted)
    out["recall_pooled"] = safe_div(tot["tp"], tot["n_ref"])
    out["f1_pooled"] = f1_from_counts(tot["tp"], tot["n_ref"], tot["tp_pred"], counted)
    out["fp_per_scan"] = safe_div(tot["fp"], n_scans)
    out["fp_per_cmb"] = safe_div(tot["fp"], tot["n_ref"])
    for m in ("precision", "recall", "f1"):
        mean, sd, n = _wmean_sd(sc[m].to_numpy(np.float64), w)
        out[f"{m}_mean"], out[f"{m}_sd"], out[f"{m}_n"] = mean, sd, float(n)

    curve = _froc_arrays(prep, w)
    sens = [sensitivity_at(curve, f) for f in FROC_FP_RATES]
    for f, s in zip(FROC_FP_RATES, sens):
        out[f"sens_at_{f:g}_fp"] = s
    out["cpm"] = float(np.mean(sens)) if not np.isnan(sens).any() else float("nan")
    out["average_precision"] = average_precision(curve)

    n_ref_scan = sc["n_ref"].to_numpy()
    n_pred_scan = sc["n_pred"].to_numpy()
    for k in COUNT_CATEGORIES:
        truth = n_ref_scan >= k
        decision = n_pred_scan >= k
        pos, neg = float(w[truth].sum()), float(w[~truth].sum())
        out[f"scan_ge{k}_sensitivity"] = safe_div(float(w[truth & decision].sum()), pos)
        out[f"scan_ge{k}_specificity"] = safe_div(float(w[~truth & ~decision].sum()), neg)
        out[f"scan_ge{k}_auroc"] = auroc(_kth_score(prep.cand_scores, k), truth, w)
    diff = sc["count_diff"].to_numpy(np.float64)
    out["count_mae"] = safe_div(float((w * np.abs(diff)).sum()), n_scans)
    out["count_bias"] = safe_div(float((w * diff).sum()), n_scans)
    out["abs_count_diff_median"] = _wmedian(np.abs(diff), w)

    pd_w = w[prep.pair_dice_scan] if prep.pair_dice.size else np.zeros(0)
    out["dice_pairs_mean"] = safe_div(float((pd_w * prep.pair_dice).sum()), float(pd_w.sum()))
    if "dice_scan" in sc.columns:
        out["dice_scan_mean"], out["dice_scan_sd"], n = _wmean_sd(
            sc["dice_scan"].to_numpy(np.float64), w)
        out["dice_scan_n"] = float(n)
    return out


def _wmedian(x: np.ndarray, w: np.ndarray) -> float:
    """Weighted median with frequency weights: ``np.median`` of the sample in which each value
    is repeated ``w`` times (the two middle values are averaged when the cumulative weight
    reaches exactly half); NaN if empty."""
    ok = w > 0
    if not ok.any():
        return float("nan")
    order = np.argsort(x[ok], kind="stable")
    xs, cw = x[ok][order], np.cumsum(w[ok][order])
    i = int(np.searchsorted(cw, cw[-1] / 2.0))
    if cw[i] == cw[-1] / 2.0 and i + 1 < xs.size:
        return float((xs[i] + xs[i + 1]) / 2.0)
    return float(xs[i])


def _bin_labels(edges: tuple[float, ...], unit: str) -> list[str]:
    labels = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        labels.append(f">={lo:g} {unit}" if np.isinf(hi) else f"[{lo:g}, {hi:g}) {unit}")
    return labels


def stratified(table: pd.DataFrame, scans: pd.DataFrame) -> pd.DataFrame:
    """Recall by lesion size bin and location; pooled P/R/F1 and FP/scan by scan attribute.

    Returns a long table with columns ``stratum_kind``, ``stratum``, ``n_scans``, ``n_ref``,
    ``tp``, ``recall``, ``fp``, ``fp_per_scan``, ``precision``, ``f1``. Lesion strata
    (``diameter_mm``, ``location``) carry recall only; scan strata (``sequence``,
    ``field_strength_t``, ``slice_thickness_mm`` binned, ``dataset``, ``site`` where present)
    carry every column.
    """
    rows: list[dict] = []
    ref = table[table["kind"] == "reference"].copy()
    if len(ref):
        ref["size_bin"] = pd.cut(ref["diameter_mm"], bins=list(SIZE_BINS_MM), right=False,
                                 labels=_bin_labels(SIZE_BINS_MM, "mm"))
        for kind, col in (("diameter_mm", "size_bin"), ("location", "location")):
            for value, g in ref.groupby(col, observed=True, dropna=False):
                n = len(g)
                tp = int((g["outcome"] == "TP").sum())
                rows.append({"stratum_kind": kind, "stratum": str(value), "n_ref": n, "tp": tp,
                             "recall": safe_div(tp, n)})
    sc = scans.copy()
    if "slice_thickness_mm" in sc.columns:
        sc["slice_thickness_bin"] = pd.cut(sc["slice_thickness_mm"], bins=[0, 1.5, 3.0, np.inf],
                                           labels=["<=1.5 mm", "(1.5, 3] mm", ">3 mm"])
    for kind in ("sequence", "field_strength_t", "slice_thickness_bin", "dataset", "site"):
        if kind not in sc.columns:
            continue
        for value, g in sc.groupby(kind, observed=True, dropna=False):
            n_ref, tp, tpp, fp = (float(g[c].sum()) for c in ("n_ref", "tp", "tp_pred", "fp"))
            rows.append({
                "stratum_kind": kind, "stratum": str(value), "n_scans": len(g),
                "n_ref": n_ref, "tp": tp, "recall": safe_div(tp, n_ref), "fp": fp,
                "fp_per_scan": safe_div(fp, len(g)), "precision": safe_div(tpp, tpp + fp),
                "f1": f1_from_counts(tp, n_ref, tpp, tpp + fp),
            })
    cols = ["stratum_kind", "stratum", "n_scans", "n_ref", "tp", "recall", "fp", "fp_per_scan",
            "precision", "f1"]
    return pd.DataFrame(rows, columns=cols)

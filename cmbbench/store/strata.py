"""Stratified aggregates with bootstrap CIs over scans, from the match and scan tables.

Point values are the formulas of :func:`cmbbench.metrics.stratified` (pooled counts inside the
stratum; :func:`cmbbench.metrics.safe_div` and :func:`cmbbench.metrics.f1_from_counts`), so
they equal ``strata.csv``. Intervals resample **scans** of the whole run with the replicates of
:func:`cmbbench.statistics.bootstrap_weights` (the very replicates of the overall CIs for the
same seed); a stratum's metric in a replicate is the ratio of its weighted sums, and
:func:`cmbbench.statistics.percentile_interval` turns the replicates into an interval (NaN
when more than half are undefined).

Strata (``aggregates.stratum``):

- lesion strata ``size_bin`` (``[0, 2) mm`` ... ``>=10 mm``, the bins of
  :data:`cmbbench.metrics.SIZE_BINS_MM`) and ``location``: ``recall``;
- scan strata ``sequence``, ``field_strength_t``, ``slice_thickness_bin`` (``<=1.5 mm``,
  ``(1.5, 3] mm``, ``>3 mm``), ``dataset`` and ``site``: ``recall``, ``fp_per_scan``,
  ``precision``, ``f1``;
- ``mimic_class`` (synthetic datasets): ``fp_per_scan`` per class of the mimic an FP sits on,
  ``none`` for the others; over all scans, so the classes add up to the overall FP/scan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics import SIZE_BINS_MM, f1_from_counts, safe_div
from ..statistics import bootstrap_weights, percentile_interval

__all__ = [
    "SCAN_STRATA",
    "SIZE_BIN_LABELS",
    "THICKNESS_BIN_LABELS",
    "StratumValue",
    "size_bin",
    "stratum_aggregates",
    "thickness_bin",
]


def _bin_labels(edges: tuple[float, ...], unit: str) -> list[str]:
    out = []
    for lo, hi in itertools.pairwise(edges):
        out.append(f">={lo:g} {unit}" if np.isinf(hi) else f"[{lo:g}, {hi:g}) {unit}")
    return out


SIZE_BIN_LABELS: tuple[str, ...] = tuple(_bin_labels(SIZE_BINS_MM, "mm"))
THICKNESS_BIN_LABELS: tuple[str, ...] = ("<=1.5 mm", "(1.5, 3] mm", ">3 mm")
#: Scan attributes stratified (when the scan table has them).
SCAN_STRATA: tuple[str, ...] = ("sequence", "field_strength_t", "slice_thickness_bin",
                                "dataset", "site")


def size_bin(diameter_mm: pd.Series | np.ndarray) -> pd.Series:
    """Size-bin label of each diameter (mm); ``nan`` for an unknown diameter."""
    cut = pd.cut(pd.Series(np.asarray(diameter_mm, dtype=np.float64)),
                 bins=list(SIZE_BINS_MM), right=False, labels=list(SIZE_BIN_LABELS))
    return cut.astype(object).where(cut.notna(), "nan").astype(str)


def thickness_bin(thickness_mm: pd.Series | np.ndarray) -> pd.Series:
    """Slice-thickness bin label of each thickness (mm); ``nan`` when unknown."""
    cut = pd.cut(pd.Series(np.asarray(thickness_mm, dtype=np.float64)),
                 bins=[0, 1.5, 3.0, np.inf], labels=list(THICKNESS_BIN_LABELS))
    return cut.astype(object).where(cut.notna(), "nan").astype(str)


@dataclass
class StratumValue:
    """One ``aggregates`` row."""

    stratum: str
    stratum_value: str
    metric: str
    value: float
    ci_lower: float
    ci_upper: float
    n_scans: int
    n_lesions: int


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _f1(tp: np.ndarray, n_ref: np.ndarray, tpp: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Vectorised :func:`cmbbench.metrics.f1_from_counts` (same edge-case policy)."""
    p, r = _ratio(tpp, counted), _ratio(tp, n_ref)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2.0 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    f1 = np.where((n_ref == 0) | (counted == 0), 0.0, f1)
    return np.where((n_ref == 0) & (counted == 0), np.nan, f1)


def _per_scan(keys: pd.Series, scan_pos: np.ndarray, n_scans: int,
              weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per value of ``keys``: the per-scan count (or sum of ``weights``) of its rows."""
    out: dict[str, np.ndarray] = {}
    w = np.ones(len(keys)) if weights is None else np.asarray(weights, dtype=np.float64)
    for value in sorted(set(keys)):
        sel = (keys == value).to_numpy()
        out[value] = np.bincount(scan_pos[sel], weights=w[sel], minlength=n_scans)
    return out


def stratum_aggregates(table: pd.DataFrame, scans: pd.DataFrame, *, n_boot: int = 1000,
                       seed: int = 0, confidence: float = 0.95,
                       fp_mimic_class: pd.Series | None = None) -> list[StratumValue]:
    """Every stratum's metrics with bootstrap CIs over scans.

    Parameters
    ----------
    table
        Per-lesion/per-candidate table (:data:`cmbbench.matching.MATCH_COLUMNS`).
    scans
        Per-scan table (:func:`cmbbench.metrics.scan_table` plus strata attributes).
    n_boot, seed, confidence
        Bootstrap recipe (0 replicates: values only, NULL intervals).
    fp_mimic_class
        For synthetic datasets: the mimic class of each operating-point FP candidate row of
        ``table`` (indexed like ``table``; ``none`` when it sits on no mimic). None: no
        ``mimic_class`` stratum.
    """
    scan_ids = scans["scan_id"].astype(str).tolist()
    n = len(scan_ids)
    pos = {s: k for k, s in enumerate(scan_ids)}
    W = bootstrap_weights(n, n_boot, seed) if n_boot > 0 else np.zeros((0, n))
    rows: list[StratumValue] = []

    def add(stratum: str, value: str, metric: str, point: float, boot: np.ndarray,
            n_sc: int, n_les: int) -> None:
        lo, hi = percentile_interval(boot, confidence) if boot.size else (np.nan, np.nan)
        rows.append(StratumValue(stratum, value, metric, float(point), lo, hi, int(n_sc),
                                 int(n_les)))

    # lesion strata: recall
    ref = table[table["kind"] == "reference"]
    if len(ref):
        ref_pos = ref["scan_id"].astype(str).map(pos).to_numpy(np.int64)
        hit = (ref["outcome"] == "TP").to_numpy(np.float64)
        for stratum, keys in (("size_bin", size_bin(ref["diameter_mm"])),
                              ("location", ref["location"].fillna("unknown").astype(str))):
            keys = pd.Series(np.asarray(keys), index=ref.index)
            counts = _per_scan(keys, ref_pos, n)
            tps = _per_scan(keys, ref_pos, n, weights=hit)
            for value in counts:
                nv, tv = counts[value], tps[value]
                add(stratum, value, "recall", safe_div(tv.sum(), nv.sum()),
                    _ratio(W @ tv, W @ nv), int((nv > 0).sum()), int(nv.sum()))

    # scan strata: recall, FP per scan, precision, F1
    sc = scans.copy()
    if "slice_thickness_mm" in sc.columns and "slice_thickness_bin" not in sc.columns:
        sc["slice_thickness_bin"] = thickness_bin(sc["slice_thickness_mm"]).to_numpy()
    cnt = {c: sc[c].to_numpy(np.float64) for c in ("n_ref", "tp", "tp_pred", "fp")}
    for stratum in SCAN_STRATA:
        if stratum not in sc.columns:
            continue
        keys = sc[stratum].astype(object).where(sc[stratum].notna(), "nan").astype(str)
        if stratum == "site" and set(keys) <= {"nan", ""}:
            continue
        for value in sorted(set(keys)):
            m = (keys == value).to_numpy(np.float64)
            n_ref, tp, tpp, fp = (cnt[c] * m for c in ("n_ref", "tp", "tp_pred", "fp"))
            s = {c: float(v.sum()) for c, v in (("n_ref", n_ref), ("tp", tp), ("tpp", tpp),
                                                ("fp", fp))}
            n_sc, n_les = int(m.sum()), int(s["n_ref"])
            b = {c: W @ v for c, v in (("n_ref", n_ref), ("tp", tp), ("tpp", tpp), ("fp", fp),
                                       ("m", m))}
            add(stratum, value, "recall", safe_div(s["tp"], s["n_ref"]),
                _ratio(b["tp"], b["n_ref"]), n_sc, n_les)
            add(stratum, value, "fp_per_scan", safe_div(s["fp"], n_sc),
                _ratio(b["fp"], b["m"]), n_sc, n_les)
            add(stratum, value, "precision", safe_div(s["tpp"], s["tpp"] + s["fp"]),
                _ratio(b["tpp"], b["tpp"] + b["fp"]), n_sc, n_les)
            add(stratum, value, "f1",
                f1_from_counts(s["tp"], s["n_ref"], s["tpp"], s["tpp"] + s["fp"]),
                _f1(b["tp"], b["n_ref"], b["tpp"], b["tpp"] + b["fp"]), n_sc, n_les)

    # FP by mimic class (over all scans)
    if fp_mimic_class is not None:
        fp_rows = table[(table["kind"] == "candidate") & (table["outcome"] == "FP")]
        classes = fp_mimic_class.reindex(fp_rows.index).fillna("none").astype(str)
        fp_pos = fp_rows["scan_id"].astype(str).map(pos).to_numpy(np.int64)
        per = _per_scan(classes, fp_pos, n) if len(fp_rows) else {}
        per.setdefault("none", np.zeros(n))
        n_les = int(cnt["n_ref"].sum())
        ones = W.sum(axis=1)
        for value, c in per.items():
            add("mimic_class", value, "fp_per_scan", safe_div(c.sum(), n), _ratio(W @ c, ones),
                n, n_les)
    return rows

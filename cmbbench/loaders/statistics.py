"""Dataset-level statistics (counts, lesion sizes and locations, voxel sizes) for the docs page
and the leaderboard: :func:`dataset_statistics` returns plain JSON-able data,
:func:`statistics_markdown` renders it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from ..dataset import HarmonizedDataset
from ..model import LOCATIONS

__all__ = ["DIAMETER_BINS_MM", "dataset_statistics", "statistics_markdown"]

#: Apparent-diameter bins (mm, left-closed) of the size distribution.
DIAMETER_BINS_MM: tuple[float, ...] = (0.0, 2.0, 3.0, 5.0, 10.0, math.inf)


def _f(v: object) -> float | None:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _summary(values: pd.Series) -> dict:
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "median": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()),
            "median": float(np.median(v)), "max": float(v.max())}


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(n) for k, n in values.fillna("").astype(str).value_counts().sort_index()
            .items()}


def dataset_statistics(ds: HarmonizedDataset) -> dict:
    """Statistics of a harmonized dataset.

    Returns
    -------
    dict
        ``name``, ``version``, ``n_scans``, ``n_scans_with_cmb``, ``n_cmb``,
        ``cmb_per_scan`` (summary), ``splits``/``sequences``/``field_strength_t``/``sites``
        (scan counts), ``voxel_mm`` (scan count per ``"x x y x z"`` voxel size, mm),
        ``slice_thickness_mm`` (summary), ``diameter_mm`` (summary of apparent diameters, mm),
        ``diameter_histogram`` (counts per :data:`DIAMETER_BINS_MM` bin), ``locations``
        (lesion counts per MARS class), ``location_reason``, ``location_sources`` (scan counts
        per ``scans.csv`` ``location_source``, reasons cut at the colon),
        ``registration_dice`` (summary over registered scans), ``mask_source`` (lesion counts).
    """
    scans, lesions = ds.scans, ds.lesions
    per_scan = lesions.groupby("scan_id").size().reindex(scans["scan_id"].astype(str),
                                                         fill_value=0)
    vox = scans.apply(lambda r: "x".join(f"{float(r[f'voxel_mm_{a}']):.3g}" for a in "xyz"),
                      axis=1) if len(scans) else pd.Series([], dtype=str)
    diam = pd.to_numeric(lesions.get("diameter_mm", pd.Series([], dtype=float)), errors="coerce")
    hist = {}
    for lo, hi in itertools.pairwise(DIAMETER_BINS_MM):
        label = f"[{lo:g}, {hi:g})" if math.isfinite(hi) else f">= {lo:g}"
        hist[label] = int(((diam >= lo) & (diam < hi)).sum())
    hist["unknown"] = int(diam.isna().sum())
    loc = lesions["location"].fillna("unknown").astype(str) if len(lesions) else pd.Series(
        [], dtype=str)
    return {
        "name": ds.name, "version": str(ds.card.get("version", "")),
        "n_scans": len(scans), "n_scans_with_cmb": int((per_scan > 0).sum()),
        "n_cmb": len(lesions), "cmb_per_scan": _summary(per_scan),
        "splits": _counts(scans["split"]) if "split" in scans else {},
        "sequences": _counts(scans["sequence"]) if "sequence" in scans else {},
        "field_strength_t": _counts(scans["field_strength_t"]) if "field_strength_t" in scans
        else {},
        "sites": _counts(scans["site"]) if "site" in scans else {},
        "voxel_mm": _counts(vox),
        "slice_thickness_mm": _summary(scans.get("slice_thickness_mm", pd.Series([]))),
        "diameter_mm": _summary(diam), "diameter_histogram": hist,
        "locations": {name: int((loc == name).sum()) for name in LOCATIONS},
        "location_reason": ds.card.get("location_reason"),
        "location_sources": _counts(scans["location_source"].fillna("").astype(str)
                                    .str.split(":").str[0]) if "location_source" in scans
        else {},
        "registration_dice": _summary(scans["registration_dice"]) if "registration_dice" in
        scans else _summary(pd.Series([], dtype=float)),
        "mask_source": _counts(lesions["mask_source"]) if len(lesions) else {},
    }


def statistics_markdown(stats: dict) -> str:
    """Markdown page of :func:`dataset_statistics` output."""
    def fmt(s: dict) -> str:
        if not s or not s.get("n"):
            return "n/a"
        return (f"mean {s['mean']:.2f} (SD {s['sd']:.2f}), median {s['median']:.2f}, "
                f"range {s['min']:.2f}-{s['max']:.2f} (n={s['n']})")

    def table(d: dict, head: str) -> list[str]:
        return [f"| {head} | n |", "|---|---|", *[f"| {k or '(empty)'} | {v} |"
                                                   for k, v in d.items()], ""]

    lines = [f"### {stats['name']} v{stats['version']}", "",
             f"- scans: {stats['n_scans']} ({stats['n_scans_with_cmb']} with CMBs)",
             f"- CMBs: {stats['n_cmb']}; per scan: {fmt(stats['cmb_per_scan'])}",
             f"- apparent diameter (mm): {fmt(stats['diameter_mm'])}",
             f"- slice thickness (mm): {fmt(stats['slice_thickness_mm'])}", ""]
    lines += table(stats["splits"], "split") + table(stats["voxel_mm"], "voxel size (mm)")
    lines += table(stats["diameter_histogram"], "diameter (mm)")
    lines += table(stats["locations"], "MARS location")
    if stats.get("location_sources"):
        lines += table(stats["location_sources"], "location source (scans)")
    if (stats.get("registration_dice") or {}).get("n"):
        lines += [f"- atlas registration Dice: {fmt(stats['registration_dice'])}", ""]
    if stats.get("location_reason"):
        lines += [f"Location `unknown` because: {stats['location_reason']}", ""]
    return "\n".join(lines)

"""The rows one run contributes to the store, built in memory before any write.

A :class:`RunBundle` holds the ``methods``/``datasets``/``scans``/``lesions`` rows the run
refers to and the run's own rows (``runs``, ``scan_metrics``, ``matches``, ``aggregates``,
``curves``, ``reported``). Everything slow (stratum bootstraps, header reads, mimic
attribution) happens here, so the write transaction (:func:`cmbbench.store.writer.write_bundle`)
stays short.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..dataset import HarmonizedDataset
from ..geometry import world_to_voxel
from ..nifti import read_header
from .strata import size_bin, stratum_aggregates, thickness_bin

__all__ = [
    "RunBundle",
    "clean_value",
    "curve_rows",
    "dataset_id",
    "dataset_rows",
    "first_url",
    "make_run_id",
    "match_rows",
    "method_id",
    "method_row",
    "overall_aggregate_rows",
    "records",
    "scan_metric_rows",
    "store_metric_name",
    "stratum_rows",
]

log = logging.getLogger(__name__)

# aggregate() key -> store name, where they differ (docs/store.md; the leaderboard's
# cmbbench.metric_definitions is the source when it is installed)
_FALLBACK_NAMES = {
    "precision_pooled": "precision", "recall_pooled": "recall", "f1_pooled": "f1",
    "average_precision": "ap",
    "precision_mean": "precision_scan_mean", "precision_sd": "precision_scan_sd",
    "recall_mean": "recall_scan_mean", "recall_sd": "recall_scan_sd",
    "f1_mean": "f1_scan_mean", "f1_sd": "f1_scan_sd",
}
_EXTRA_NAMES = {"precision_n": "precision_scan_n", "recall_n": "recall_scan_n",
                "f1_n": "f1_scan_n"}


def _metric_names() -> dict[str, str]:
    names = dict(_FALLBACK_NAMES)
    try:
        from ..metric_definitions import DEFINITIONS
    except ImportError:  # pragma: no cover - the leaderboard's definitions are optional
        return {**names, **_EXTRA_NAMES}
    for d in DEFINITIONS:
        if d.aggregate_key != d.key:
            names[d.aggregate_key] = d.key
    return {**names, **_EXTRA_NAMES}


_NAMES = _metric_names()


def store_metric_name(aggregate_key: str) -> str:
    """The ``aggregates.metric`` name of a :func:`cmbbench.metrics.aggregate` key
    (``precision_pooled`` -> ``precision``, ``average_precision`` -> ``ap``, ...; other keys
    unchanged)."""
    return _NAMES.get(aggregate_key, aggregate_key)


def clean_value(v: object) -> object:
    """A value the database accepts: NaN/inf -> None, numpy scalars -> Python scalars."""
    if v is None:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    """Rows of ``frame[columns]`` as dicts of database-ready values (NaN/inf -> None)."""
    if not len(frame):
        return []
    sub = frame.reindex(columns=columns)
    num = sub.select_dtypes(include=[np.number]).columns
    if len(num):
        sub[num] = sub[num].replace([np.inf, -np.inf], np.nan)
    obj = sub.astype(object).where(sub.notna(), None)
    return [{k: clean_value(v) for k, v in row.items()} for row in obj.to_dict("records")]


def make_run_id(method_id: str, dataset_id: str, rule_id: str, split: str, source: str) -> str:
    """Stable run id: sha1 of method, dataset, rule, split and the run's source (its run
    directory, the submission's checksum, or the paper's citation), 16 hex digits."""
    text = f"{method_id}\x1f{dataset_id}\x1f{rule_id}\x1f{split}\x1f{source}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def method_id(name: str, version: str) -> str:
    """``name@version``."""
    return f"{name}@{version}"


def dataset_id(name: str, version: str) -> str:
    """``NAME-vVERSION``."""
    return f"{name}-v{version}"


_URL_RE = re.compile(r"https?://[^\s)>\]]+")
_DOI_RE = re.compile(r"\b(10\.\d{4,9}/[^\s,;)]+)")


def first_url(*texts: object) -> str | None:
    """The first http(s) URL, or DOI (as a doi.org URL), found in ``texts``."""
    for t in texts:
        if not t:
            continue
        m = _URL_RE.search(str(t))
        if m:
            return m.group(0).rstrip(".")
        m = _DOI_RE.search(str(t))
        if m:
            return f"https://doi.org/{m.group(1).rstrip('.')}"
    return None


@dataclass
class RunBundle:
    """Rows of one run (see the module docstring). ``scans``/``lesions`` None: the bundle does
    not carry its dataset's scans (reported rows), the store keeps what it has."""

    run: dict
    method: dict
    dataset: dict
    scans: list[dict] | None = None
    lesions: list[dict] | None = None
    scan_metrics: list[dict] = field(default_factory=list)
    matches: list[dict] = field(default_factory=list)
    aggregates: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    reported: dict | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])


def _safe_json(obj: object) -> str | None:
    def fix(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x
    if obj is None:
        return None
    return json.dumps(fix(json.loads(json.dumps(obj, default=str))), sort_keys=True)


def method_row(*, name: str, version: str, citation: str | None = None,
               paper_url: str | None = None, code_url: str | None = None,
               description: str | None = None, trainable: bool | None = None,
               training_data: str | None = None, test_overlap: str | None = None,
               manifest: dict | None = None) -> dict:
    """A ``methods`` row."""
    return {"method_id": method_id(name, version), "name": name, "version": version,
            "citation": citation, "paper_url": paper_url, "code_url": code_url,
            "description": description, "trainable": trainable,
            "training_data": training_data, "test_overlap": test_overlap,
            "manifest_json": _safe_json(manifest)}


def dataset_rows(ds: HarmonizedDataset, *, path: str | None) -> tuple[dict, list[dict],
                                                                           list[dict]]:
    """The ``datasets`` row and the ``scans``/``lesions`` rows of a harmonized dataset.

    Image and label paths are recorded only when the files exist.
    """
    card = {k: v for k, v in ds.card.items() if k != "checksums"}
    version = str(ds.card.get("version", "0") or "0")
    did = dataset_id(ds.name, version)
    synthetic = ds.card.get("kind") == "synthetic" or ds.mimics is not None
    sc = ds.scans.copy()
    sc["scan_id"] = sc["scan_id"].astype(str)
    les = ds.lesions.copy()
    les["scan_id"] = les["scan_id"].astype(str)
    les["size_bin"] = size_bin(les["diameter_mm"]).to_numpy() if len(les) else []
    stats = {
        "n_scans_positive": int((les.groupby("scan_id").size() > 0).sum()) if len(les) else 0,
        "lesions_by_location": {str(k): int(v) for k, v in
                                les["location"].value_counts().items()} if len(les) else {},
        "lesions_by_size_bin": {str(k): int(v) for k, v in
                                les["size_bin"].value_counts().items()} if len(les) else {},
        "scans_by_sequence": ({str(k): int(v) for k, v in sc["sequence"].value_counts().items()}
                              if "sequence" in sc.columns else {}),
        "n_mimics": 0 if ds.mimics is None else len(ds.mimics),
    }
    drow = {"dataset_id": did, "name": ds.name, "version": version, "n_scans": len(sc),
            "n_cmb": len(les), "synthetic": bool(synthetic), "card_json": _safe_json(card),
            "stats_json": _safe_json(stats), "path": path}
    n_cmb = les.groupby("scan_id").size()
    out_scans = sc.reindex(columns=["scan_id", "subject_id", "split", "sequence",
                                    "field_strength_t", "slice_thickness_mm", "voxel_mm_x",
                                    "voxel_mm_y", "voxel_mm_z", "shape", "te_ms", "site",
                                    "vendor", "n_mimics"])
    out_scans["dataset_id"] = did
    out_scans["slice_thickness_bin"] = thickness_bin(out_scans["slice_thickness_mm"]).to_numpy()
    out_scans["n_cmb"] = out_scans["scan_id"].map(n_cmb).fillna(0).astype(int)
    has_root = path is not None and ds.root.is_dir()
    out_scans["image_path"] = [str(ds.image_path(s).resolve())
                               if has_root and ds.image_path(s).is_file() else None
                               for s in out_scans["scan_id"]]
    out_scans["label_path"] = [str(ds.label_path(s).resolve())  # type: ignore[union-attr]
                               if has_root and ds.label_path(s) is not None else None
                               for s in out_scans["scan_id"]]
    for c in ("subject_id", "split", "sequence", "shape", "site", "vendor"):
        out_scans[c] = out_scans[c].astype(object).where(out_scans[c].notna(), None)
        out_scans[c] = [None if v is None else str(v) for v in out_scans[c]]
    scan_cols = ["dataset_id", "scan_id", "subject_id", "split", "sequence", "field_strength_t",
                 "slice_thickness_mm", "slice_thickness_bin", "voxel_mm_x", "voxel_mm_y",
                 "voxel_mm_z", "n_cmb", "image_path", "label_path", "shape", "te_ms", "site",
                 "vendor", "n_mimics"]
    les["dataset_id"] = did
    les_cols = ["dataset_id", "scan_id", "lesion_id", "x_mm", "y_mm", "z_mm", "i", "j", "k",
                "diameter_mm", "size_bin", "location", "mask_source", "volume_mm3"]
    return drow, records(out_scans, scan_cols), records(les, les_cols)


def scan_metric_rows(run_id: str, scans: pd.DataFrame) -> list[dict]:
    """``scan_metrics`` rows from a per-scan table (:func:`cmbbench.metrics.scan_table`)."""
    frame = scans.copy()
    frame["run_id"] = run_id
    frame["scan_id"] = frame["scan_id"].astype(str)
    if "dice_scan" not in frame.columns:
        frame["dice_scan"] = np.nan
    cols = ["run_id", "scan_id", "tp", "fp", "fn", "n_ref", "n_pred", "precision", "recall",
            "f1", "dice_scan", "tp_pred", "ignored", "max_score", "prediction_kind"]
    return records(frame, cols)


def _voxels(points: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    if affine is None or not len(points):
        return np.full((len(points), 3), np.nan)
    return world_to_voxel(affine, points)


def scan_affines(ds: HarmonizedDataset | None, scan_ids: list[str]) -> dict[str, np.ndarray]:
    """Image affine of each scan whose image exists (header reads only)."""
    out: dict[str, np.ndarray] = {}
    if ds is None:
        return out
    for sid in scan_ids:
        path = ds.image_path(sid)
        if path.is_file():
            try:
                out[sid] = read_header(path)[1]
            except Exception as exc:  # noqa: BLE001 - voxel coordinates are optional
                log.warning("%s: cannot read the header (%s); no voxel coordinates", path, exc)
    return out


def match_rows(run_id: str, table: pd.DataFrame, *, affines: dict[str, np.ndarray],
               mimic_class: pd.Series | None = None) -> list[dict]:
    """``matches`` rows at the operating point: one ``tp`` per detected lesion (candidate
    position and score), one ``fn`` per missed lesion (lesion position), one ``fp`` per FP
    candidate (with its mimic class on synthetic data).

    Candidates that are ignored duplicates, merged or below the operating threshold are not
    rows here (they stay in the run directory's ``results/matches.csv``).
    """
    t = table.copy()
    t["scan_id"] = t["scan_id"].astype(str)
    ref = t[t["kind"] == "reference"]
    cand = t[t["kind"] == "candidate"]
    cand_pos = {(s, int(c)): (x, y, z) for s, c, x, y, z in
                zip(cand["scan_id"], cand["candidate_id"], cand["x_mm"], cand["y_mm"],
                    cand["z_mm"])}
    out = []
    fp = cand[cand["outcome"] == "FP"]
    mc = (mimic_class.reindex(fp.index) if mimic_class is not None
          else pd.Series(None, index=fp.index, dtype=object))
    parts = []
    if len(ref):
        tp = ref["outcome"] == "TP"
        pos = np.array([cand_pos.get((s, int(c)), (x, y, z)) if ok else (x, y, z)
                        for s, c, ok, x, y, z in zip(ref["scan_id"], ref["candidate_id"], tp,
                                                     ref["x_mm"], ref["y_mm"], ref["z_mm"])],
                       dtype=np.float64).reshape(-1, 3)
        parts.append(pd.DataFrame({
            "scan_id": ref["scan_id"].to_numpy(), "kind": np.where(tp, "tp", "fn"),
            "lesion_id": ref["lesion_id"].to_numpy(np.int64),
            "candidate_id": np.where(tp, ref["candidate_id"], np.nan),
            "score": np.where(tp, ref["score"], np.nan),
            "distance_mm": np.where(tp, ref["distance_mm"], np.nan),
            "x_mm": pos[:, 0], "y_mm": pos[:, 1], "z_mm": pos[:, 2],
            "mimic_class": None, "diameter_mm": ref["diameter_mm"].to_numpy(np.float64),
            "location": ref["location"].astype(str).to_numpy()}))
    if len(fp):
        parts.append(pd.DataFrame({
            "scan_id": fp["scan_id"].to_numpy(), "kind": "fp", "lesion_id": np.nan,
            "candidate_id": fp["candidate_id"].to_numpy(np.int64),
            "score": fp["score"].to_numpy(np.float64), "distance_mm": np.nan,
            "x_mm": fp["x_mm"].to_numpy(np.float64), "y_mm": fp["y_mm"].to_numpy(np.float64),
            "z_mm": fp["z_mm"].to_numpy(np.float64),
            "mimic_class": mc.to_numpy(dtype=object), "diameter_mm": np.nan,
            "location": None}))
    if not parts:
        return out
    m = pd.concat(parts, ignore_index=True)
    order = {"tp": 0, "fn": 1, "fp": 2}
    m["_o"] = m["kind"].map(order)
    m = m.sort_values(["scan_id", "_o", "lesion_id", "candidate_id"], kind="stable",
                      ignore_index=True)
    ijk = np.full((len(m), 3), np.nan)
    xyz = m[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
    if affines:
        for sid, idx in m.groupby("scan_id").indices.items():
            if sid in affines:
                ijk[idx] = _voxels(xyz[idx], affines[sid])
    m["i"], m["j"], m["k"] = ijk[:, 0], ijk[:, 1], ijk[:, 2]
    m["run_id"] = run_id
    m["row"] = np.arange(len(m))
    for c in ("lesion_id", "candidate_id"):
        m[c] = m[c].astype("Int64")
    cols = ["run_id", "row", "scan_id", "kind", "lesion_id", "candidate_id", "score",
            "distance_mm", "x_mm", "y_mm", "z_mm", "i", "j", "k", "mimic_class", "diameter_mm",
            "location"]
    return records(m, cols)


def overall_aggregate_rows(run_id: str, aggregates: dict, ci: dict | None) -> list[dict]:
    """``aggregates`` rows of stratum ``all`` from :func:`cmbbench.metrics.aggregate` values
    and the scoring's bootstrap intervals (``aggregates.json``'s ``ci`` block)."""
    lower = (ci or {}).get("lower") or {}
    upper = (ci or {}).get("upper") or {}
    n_boot = (ci or {}).get("n_boot")
    seed = (ci or {}).get("seed")
    n_scans = clean_value(aggregates.get("n_scans"))
    n_les = clean_value(aggregates.get("n_ref"))
    rows = []
    for key, value in aggregates.items():
        rows.append({"run_id": run_id, "stratum": "all", "stratum_value": "all",
                     "metric": store_metric_name(key), "value": clean_value(value),
                     "ci_lower": clean_value(lower.get(key)),
                     "ci_upper": clean_value(upper.get(key)),
                     "n_scans": None if n_scans is None else int(n_scans),
                     "n_lesions": None if n_les is None else int(n_les),
                     "n_boot": n_boot if ci else None, "seed": seed if ci else None})
    return rows


def stratum_rows(run_id: str, table: pd.DataFrame, scans: pd.DataFrame, *, n_boot: int,
                 seed: int, fp_mimic_class: pd.Series | None) -> list[dict]:
    """``aggregates`` rows of every stratum (:func:`cmbbench.store.strata.stratum_aggregates`)."""
    out = []
    for r in stratum_aggregates(table, scans, n_boot=n_boot, seed=seed,
                                fp_mimic_class=fp_mimic_class):
        out.append({"run_id": run_id, "stratum": r.stratum, "stratum_value": r.stratum_value,
                    "metric": r.metric, "value": clean_value(r.value),
                    "ci_lower": clean_value(r.ci_lower), "ci_upper": clean_value(r.ci_upper),
                    "n_scans": r.n_scans, "n_lesions": r.n_lesions,
                    "n_boot": n_boot if n_boot > 0 else None,
                    "seed": seed if n_boot > 0 else None})
    return out


def curve_rows(run_id: str, froc: pd.DataFrame) -> list[dict]:
    """``curves`` rows: every FROC operating point (x = FP/scan, y = sensitivity) and the
    precision-recall points where precision is defined (x = recall, y = precision).
    The first point's threshold (+inf: nothing detected) is NULL."""
    out = []
    th = froc["threshold"].to_numpy(np.float64)
    fpr = froc["fp_per_scan"].to_numpy(np.float64)
    sens = froc["sensitivity"].to_numpy(np.float64)
    prec = froc["precision"].to_numpy(np.float64)
    for n in range(len(froc)):
        out.append({"run_id": run_id, "curve": "froc", "point": n,
                    "threshold": clean_value(th[n]), "x": clean_value(fpr[n]),
                    "y": clean_value(sens[n])})
    point = 0
    for n in range(len(froc)):
        if not math.isfinite(prec[n]) or not math.isfinite(sens[n]):
            continue
        out.append({"run_id": run_id, "curve": "pr", "point": point,
                    "threshold": clean_value(th[n]), "x": float(sens[n]), "y": float(prec[n])})
        point += 1
    return out

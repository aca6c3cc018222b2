"""Scoring: one case, many cases, a folder (the layered API of picai_eval, on cmbbench rules).

- :func:`score_case` matches one scan's prediction (a map or points) to its reference and
  returns the per-lesion/per-candidate rows plus scan-level extras (voxel Dice, volumes).
- :func:`score_folder` scores a predictions folder against a harmonized dataset and returns a
  :class:`ScoreResult` (tables, aggregates, FROC, strata, bootstrap CIs) that saves to and loads
  from a results folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from . import __version__
from .dataset import HarmonizedDataset, read_dataset
from .errors import GeometryMismatchError, MissingInputError
from .geometry import affines_match, voxel_to_world, world_to_voxel
from .harmonize import candidates_from_labels, candidates_from_probability, label_instances
from .matching import MATCH_COLUMNS, MatchRule, get_rule, match_scan
from .metrics import aggregate, froc_curve, prepare, scan_table, stratified
from .model import CANDIDATE_COLUMNS
from .nifti import read_header, read_volume
from .predictions import PredictionsFolder, classify_map, read_predictions_folder
from .statistics import BootstrapResult, bootstrap_ci

__all__ = [
    "CaseResult",
    "ScoreResult",
    "candidates_from_map",
    "candidates_from_points",
    "score_case",
    "score_folder",
]

log = logging.getLogger(__name__)

MissingPolicy = Literal["error", "empty"]


@dataclass
class CaseResult:
    """One scored scan.

    Attributes
    ----------
    table
        Per-lesion/per-candidate rows (:data:`cmbbench.matching.MATCH_COLUMNS`).
    extras
        Scan-level values: ``prediction_kind``, ``dice_scan`` (voxel Dice of the binarised
        prediction vs the rater mask; NaN without a rater mask or when both are empty),
        ``volume_ref_mm3``, ``volume_pred_mm3``.
    """

    scan_id: str
    table: pd.DataFrame
    extras: dict


def candidates_from_map(data: np.ndarray, affine: np.ndarray, *, scan_id: str,
                        rule: MatchRule, path: object = None) -> tuple[np.ndarray, pd.DataFrame, str]:
    """Candidate label map and table from a prediction map (probability, binary or instance)."""
    kind = classify_map(data, path=path)
    if kind == "probability":
        labels, cands = candidates_from_probability(
            data, affine, scan_id=scan_id, floor=rule.candidate_floor,
            connectivity=rule.connectivity)
    elif kind == "binary":
        labels, _ = label_instances(data, connectivity=rule.connectivity)
        cands = candidates_from_labels(labels, affine, scan_id=scan_id)
    else:
        labels = np.asarray(data).astype(np.uint32, copy=False)
        cands = candidates_from_labels(labels, affine, scan_id=scan_id)
    return labels, cands, kind


def candidates_from_points(points: pd.DataFrame, affine: np.ndarray, *, scan_id: str,
                           rule: MatchRule) -> pd.DataFrame:
    """Candidate table from point predictions (world ``x_mm..`` or 0-based voxel ``i..``).

    Points scoring below the rule's candidate floor are dropped, as for maps.
    """
    if {"x_mm", "y_mm", "z_mm"} <= set(points.columns):
        world = points[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
        vox = world_to_voxel(affine, world)
    else:
        vox = points[["i", "j", "k"]].to_numpy(np.float64)
        world = voxel_to_world(affine, vox)
    scores = points["score"].to_numpy(np.float64)
    keep = scores >= rule.candidate_floor
    n = int(keep.sum())
    return pd.DataFrame({
        "scan_id": scan_id, "candidate_id": np.arange(1, n + 1, dtype=np.int64),
        "x_mm": world[keep, 0], "y_mm": world[keep, 1], "z_mm": world[keep, 2],
        "i": vox[keep, 0], "j": vox[keep, 1], "k": vox[keep, 2],
        "score": scores[keep], "volume_mm3": np.nan, "n_voxels": 0,
    }, columns=list(CANDIDATE_COLUMNS))


def score_case(*, scan_id: str, lesions: pd.DataFrame, image_shape: tuple[int, ...],
               image_affine: np.ndarray, rule: MatchRule,
               ref_labels: np.ndarray | None = None,
               prediction: np.ndarray | None = None,
               points: pd.DataFrame | None = None,
               prediction_path: object = None) -> CaseResult:
    """Score one scan.

    Parameters
    ----------
    lesions
        The scan's reference lesions (:data:`cmbbench.model.LESION_COLUMNS`).
    image_shape, image_affine
        The grid of the scan's image; a prediction map must have this shape.
    ref_labels
        Reference instance label map (values = ``lesion_id``), or None for point references.
    prediction
        Prediction map on the image grid; or ``points`` (point candidates); or neither (empty).
    """
    ref_has_masks = ref_labels is not None and (lesions["mask_source"] != "none").any()
    cand_labels = None
    kind = "points" if points is not None else "empty"
    if prediction is not None:
        if tuple(prediction.shape) != tuple(image_shape):
            raise GeometryMismatchError(
                f"prediction shape {tuple(prediction.shape)} differs from the image shape "
                f"{tuple(image_shape)}", prediction_path)
        cand_labels, cands, kind = candidates_from_map(prediction, image_affine, scan_id=scan_id,
                                                       rule=rule, path=prediction_path)
    elif points is not None:
        cands = candidates_from_points(points, image_affine, scan_id=scan_id, rule=rule)
    else:
        cands = pd.DataFrame(columns=list(CANDIDATE_COLUMNS))
    table = match_scan(lesions, cands, rule, scan_id=scan_id,
                       ref_labels=ref_labels if ref_has_masks else None, cand_labels=cand_labels)
    extras: dict = {"prediction_kind": kind, "dice_scan": np.nan,
                    "volume_ref_mm3": np.nan, "volume_pred_mm3": np.nan}
    rater = ref_labels is not None and len(lesions) and (lesions["mask_source"] == "rater").all()
    # A scan with no prediction at all (kind "empty", e.g. a missing file scored with
    # --missing=empty) predicts no voxel: its Dice is 0 against a non-empty rater mask, exactly
    # as an all-zero map, not NaN (which would drop it from dice_scan_mean).
    if (rater or (ref_labels is not None and len(lesions) == 0)) and (
            prediction is not None or kind == "empty"):
        voxel_mm3 = float(abs(np.linalg.det(image_affine[:3, :3])))
        ref_fg = ref_labels > 0
        if prediction is None:
            pred_fg = np.zeros(ref_fg.shape, dtype=bool)
        elif kind == "probability":
            pred_fg = prediction >= rule.operating_threshold
        else:
            pred_fg = prediction > 0
        a, b = int(np.count_nonzero(ref_fg)), int(np.count_nonzero(pred_fg))
        inter = int(np.count_nonzero(ref_fg & pred_fg)) if a and b else 0
        extras["dice_scan"] = 2.0 * inter / (a + b) if a + b else np.nan
        extras["volume_ref_mm3"] = a * voxel_mm3
        extras["volume_pred_mm3"] = b * voxel_mm3
    return CaseResult(scan_id=scan_id, table=table, extras=extras)


@dataclass
class ScoreResult:
    """Everything a scoring run produces.

    Attributes
    ----------
    rule
        The matching rule.
    table
        Per-lesion/per-candidate table, all scans (:data:`MATCH_COLUMNS`).
    scans
        Per-scan table (counts, P/R/F1, Dice, strata attributes).
    aggregates
        Dataset-level metrics (:func:`cmbbench.metrics.aggregate`).
    ci
        Bootstrap percentile intervals over scans (None when ``n_boot == 0``).
    froc
        Every FROC operating point.
    strata
        :func:`cmbbench.metrics.stratified` table.
    missing
        Scans without a prediction that were scored as empty (``--missing=empty``).
    meta
        Provenance: cmbbench version, rule, inputs, bootstrap recipe, timing.
    """

    rule: MatchRule
    table: pd.DataFrame
    scans: pd.DataFrame
    aggregates: dict[str, float]
    ci: BootstrapResult | None
    froc: pd.DataFrame
    strata: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_tables(cls, table: pd.DataFrame, scans: pd.DataFrame, rule: MatchRule, *,
                    n_boot: int = 1000, seed: int = 0, missing: list[str] | None = None,
                    meta: dict | None = None) -> ScoreResult:
        """Derive every aggregate from the match and scan tables (no images needed)."""
        prep = prepare(table, scans)
        agg = aggregate(prep, operating_threshold=rule.operating_threshold)
        ci = (bootstrap_ci(prep, operating_threshold=rule.operating_threshold, n_boot=n_boot,
                           seed=seed) if n_boot > 0 else None)
        return cls(rule=rule, table=table, scans=scans, aggregates=agg, ci=ci,
                   froc=froc_curve(prep), strata=stratified(table, scans),
                   missing=list(missing or []), meta=dict(meta or {}))

    def summary_frame(self) -> pd.DataFrame:
        """Aggregates as a two-column table with CI bounds."""
        rows = []
        for k, v in self.aggregates.items():
            lo = self.ci.lower.get(k, np.nan) if self.ci else np.nan
            hi = self.ci.upper.get(k, np.nan) if self.ci else np.nan
            rows.append({"metric": k, "value": v, "ci_lower": lo, "ci_upper": hi})
        return pd.DataFrame(rows)

    def to_json_dict(self) -> dict:
        def clean(x: object) -> object:
            if isinstance(x, float) and not np.isfinite(x):
                return None
            return x
        return {
            "rule": self.rule.to_dict(),
            "aggregates": {k: clean(float(v)) for k, v in self.aggregates.items()},
            "ci": None if self.ci is None else {
                "lower": {k: clean(v) for k, v in self.ci.lower.items()},
                "upper": {k: clean(v) for k, v in self.ci.upper.items()},
                "n_boot": self.ci.n_boot, "seed": self.ci.seed,
                "confidence": self.ci.confidence},
            "missing_scored_as_empty": self.missing,
            "meta": self.meta,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``matches.csv`` (per lesion/candidate), ``scans.csv``, ``aggregates.json``,
        ``aggregates.csv``, ``froc.csv`` and ``strata.csv`` (each written atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)

        def put_csv(frame: pd.DataFrame, name: str) -> None:
            frame.to_csv(out / f"{name}.partial", index=False)
            os.replace(out / f"{name}.partial", out / name)

        put_csv(self.table, "matches.csv")
        put_csv(self.scans, "scans.csv")
        put_csv(self.summary_frame(), "aggregates.csv")
        put_csv(self.froc, "froc.csv")
        put_csv(self.strata, "strata.csv")
        (out / "aggregates.json.partial").write_text(
            json.dumps(self.to_json_dict(), indent=2, allow_nan=False))
        os.replace(out / "aggregates.json.partial", out / "aggregates.json")
        return out

    @classmethod
    def load(cls, out_dir: str | Path, *, n_boot: int | None = None) -> ScoreResult:
        """Re-derive a result from a saved folder's tables (``matches.csv`` + ``scans.csv``)."""
        out = Path(out_dir)
        info = json.loads((out / "aggregates.json").read_text())
        rule_d = {k: v for k, v in info["rule"].items() if k != "rule_id"}
        rule = MatchRule(**rule_d).validate()
        # round_trip: pandas' default float parser is off by an ulp for about a third of values
        table = pd.read_csv(out / "matches.csv", dtype={"scan_id": str}, keep_default_na=False,
                            na_values=[""], float_precision="round_trip")
        table["sweep_status"] = table["sweep_status"].fillna("")
        scans = pd.read_csv(out / "scans.csv", dtype={"scan_id": str},
                            float_precision="round_trip")
        ci = info.get("ci") or {}
        return cls.from_tables(table, scans, rule,
                               n_boot=ci.get("n_boot", 0) if n_boot is None else n_boot,
                               seed=ci.get("seed", 0), missing=info.get("missing_scored_as_empty"),
                               meta=info.get("meta"))


def _load_prediction(folder: PredictionsFolder, scan_id: str, shape: tuple[int, ...],
                     affine: np.ndarray
                     ) -> tuple[np.ndarray | None, pd.DataFrame | None, Path | None]:
    if scan_id in folder.maps:
        path = folder.maps[scan_id]
        vol = read_volume(path)
        if tuple(vol.data.shape) != tuple(shape):
            raise GeometryMismatchError(
                f"prediction shape {tuple(vol.data.shape)} differs from the image shape "
                f"{tuple(shape)}", path)
        if not affines_match(vol.affine, affine):
            delta = float(np.abs(vol.affine[:3] - affine[:3]).max())
            raise GeometryMismatchError(
                f"prediction affine differs from the image affine (max difference {delta:.3g})",
                path)
        return vol.data, None, path
    if scan_id in folder.points:
        return None, folder.points[scan_id], folder.root / "predictions.csv"
    return None, None, None


def score_folder(predictions: str | Path, reference: str | Path | HarmonizedDataset, *,
                 rule: str | MatchRule = "cmbbench", missing: MissingPolicy = "error",
                 n_boot: int = 1000, seed: int = 0,
                 rule_overrides: dict | None = None) -> ScoreResult:
    """Score a predictions folder against a harmonized dataset.

    Parameters
    ----------
    predictions
        Predictions folder (see :mod:`cmbbench.predictions`).
    reference
        Harmonized dataset folder (or an opened dataset).
    rule
        Preset name (``cmbbench``, ``delpozo2024``, ``valdo2021``, ``dou2016``, ``wmh2017``) or
        a :class:`MatchRule`; ``rule_overrides`` replace fields (e.g. ``operating_threshold``).
    missing
        ``error``: a scan without prediction is an error; ``empty``: it is scored as a scan
        with no candidates and listed in :attr:`ScoreResult.missing`. When the folder holds only
        ``predictions.csv``, a scan without rows is a scan without candidates.
    n_boot, seed
        Bootstrap replicates over scans and RNG seed (0 replicates: no CIs).

    Raises
    ------
    MissingInputError, UnreadableInputError, GeometryMismatchError, InvalidValuesError,
    ConfigurationError
        With a one-line message naming the file.
    """
    t0 = time.perf_counter()
    rule_obj = get_rule(rule, **(rule_overrides or {}))
    ds = reference if isinstance(reference, HarmonizedDataset) else read_dataset(reference)
    scan_ids = ds.scan_ids
    if not scan_ids:
        raise MissingInputError("the reference dataset has no scans", ds.root / "scans.csv")
    folder = read_predictions_folder(predictions, scan_ids)
    points_only = not folder.maps
    absent = [s for s in scan_ids if not folder.has(s)]
    if absent and missing == "error" and not points_only:
        expected = folder.root / f"{absent[0]}.nii.gz"
        more = f" (and {len(absent) - 1} more scan(s))" if len(absent) > 1 else ""
        raise MissingInputError(f"missing prediction for scan {absent[0]}{more}; use "
                                "--missing=empty to score it as empty", expected)
    tables, extras = [], []
    for scan_id in scan_ids:
        shape, affine = read_header(ds.image_path(scan_id))  # the grid; voxels not needed
        labels_vol = ds.read_labels(scan_id)
        ref_labels = None
        if labels_vol is not None:
            if tuple(labels_vol.data.shape) != tuple(shape):
                raise GeometryMismatchError("label map shape differs from the image shape",
                                            labels_vol.path)
            ref_labels = np.asarray(labels_vol.data).astype(np.uint32, copy=False)
        pred, pts, path = _load_prediction(folder, scan_id, shape, affine)
        case = score_case(scan_id=scan_id, lesions=ds.lesions_of(scan_id),
                          image_shape=shape, image_affine=affine, rule=rule_obj,
                          ref_labels=ref_labels, prediction=pred, points=pts,
                          prediction_path=path)
        tables.append(case.table)
        extras.append({"scan_id": scan_id, **case.extras})
        # DEBUG, not INFO: a failing run must print exactly one line on stderr (the error),
        # so per-scan chatter must not precede it by default.
        log.debug("scored %s: %d lesion row(s), %d candidate row(s)", scan_id,
                  int((case.table["kind"] == "reference").sum()),
                  int((case.table["kind"] == "candidate").sum()))
    non_empty = [t for t in tables if len(t)]
    table = (pd.concat(non_empty, ignore_index=True) if non_empty
             else pd.DataFrame(columns=list(MATCH_COLUMNS)))
    attrs = ds.scans.drop(columns=[c for c in ("n_cmb",) if c in ds.scans.columns]).copy()
    attrs["dataset"] = ds.name
    scans = scan_table(table, scan_ids, extra=pd.DataFrame(extras).merge(attrs, on="scan_id"))
    meta = {
        "cmbbench_version": __version__, "python": platform.python_version(),
        "rule_id": rule_obj.rule_id, "reference": str(ds.root), "dataset": ds.name,
        "dataset_version": str(ds.card.get("version", "")), "predictions": str(folder.root),
        "manifest": folder.manifest, "n_scans": len(scan_ids),
        "unmatched_prediction_files": [str(p.name) for p in folder.unmatched_files],
        "seconds": None,
    }
    if folder.unmatched_files:
        log.warning("%d prediction file(s) match no reference scan and were not scored: %s",
                    len(folder.unmatched_files),
                    ", ".join(p.name for p in folder.unmatched_files[:5]))
    result = ScoreResult.from_tables(table, scans, rule_obj, n_boot=n_boot, seed=seed,
                                     missing=[] if points_only else absent, meta=meta)
    result.meta["seconds"] = round(time.perf_counter() - t0, 3)
    return result

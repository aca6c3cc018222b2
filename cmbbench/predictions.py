"""Reading predictions folders.

Accepted layouts (see ``docs/submission.md``):

- ``<scan_id>.nii.gz`` / ``<scan_id>.nii`` on the image grid: a probability map in [0, 1], a
  binary mask, or an instance label map (nnU-Net-style flat folders are this layout; extra
  ``*.json`` files are ignored);
- BIDS derivatives: ``<scan_id>[_...]_label-CMB_probseg.nii.gz`` or ``..._label-CMB_mask.nii.gz``
  (optionally under ``sub-*/[ses-*/]anat/``);
- ``predictions.csv`` with ``scan_id``, ``score`` and either world ``x_mm, y_mm, z_mm`` (RAS+ mm)
  or voxel ``i, j, k`` (0-based unless the manifest says ``"voxel_index_base": 1``);
- an optional ``cmbbench-submission.json`` manifest describing the method.

A map is classified by its values: integer-valued maps with values {0, 1} are binary masks
(split into components with the rule's connectivity), integer-valued maps with larger values are
instance maps (each value one candidate, never split), anything else is a probability map.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .errors import InvalidValuesError, MissingInputError, UnreadableInputError
from .harmonize import check_probability
from .nifti import strip_nifti_suffix

__all__ = [
    "MANIFEST_NAME",
    "MapKind",
    "PredictionsFolder",
    "classify_map",
    "read_predictions_folder",
]

MANIFEST_NAME = "cmbbench-submission.json"
MapKind = Literal["probability", "binary", "instance"]
_BIDS_RE = re.compile(r"^(?P<stem>.+?)_label-CMB_(?P<suffix>probseg|mask|dseg)$")


def classify_map(data: np.ndarray, *, path: object = None) -> MapKind:
    """Decide whether a prediction map is a probability map, a binary mask or an instance map.

    Raises
    ------
    InvalidValuesError
        NaN/inf values, negative values, or non-integer values outside [0, 1].
    """
    if data.dtype == bool:
        return "binary"
    if np.issubdtype(data.dtype, np.integer):
        lo, hi = int(data.min(initial=0)), int(data.max(initial=0))
        if lo < 0:
            raise InvalidValuesError(f"negative label values (min {lo})", path)
        return "binary" if hi <= 1 else "instance"
    check_probability_finite(data, path=path)
    lo, hi = float(data.min(initial=0.0)), float(data.max(initial=0.0))
    integral = bool(np.all(np.mod(data[data != 0], 1.0) == 0)) if hi > 1.0 or lo < 0 else None
    if lo < 0:
        raise InvalidValuesError(f"negative values (min {lo:g}) in the prediction map", path)
    if hi > 1.0:
        if integral:
            return "instance"
        raise InvalidValuesError(
            f"probabilities must be in [0, 1], found range [{lo:g}, {hi:g}]", path)
    nz = data[data != 0]
    if nz.size and np.all(nz == 1.0):
        return "binary"
    check_probability(data, path=path)
    return "probability"


def check_probability_finite(data: np.ndarray, *, path: object = None) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        raise InvalidValuesError(f"{int((~finite).sum())} NaN/inf voxel(s) in the prediction map",
                                 path)


@dataclass
class PredictionsFolder:
    """What a predictions folder holds, by scan.

    Attributes
    ----------
    root
        The folder.
    maps
        scan_id -> path of its NIfTI map.
    points
        scan_id -> table of point candidates (columns ``x_mm, y_mm, z_mm`` or ``i, j, k``,
        ``score``), from ``predictions.csv``.
    manifest
        Parsed ``cmbbench-submission.json`` (empty dict when absent).
    unmatched_files
        NIfTI files whose name matched no scan of the reference (reported, not scored).
    """

    root: Path
    maps: dict[str, Path] = field(default_factory=dict)
    points: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    unmatched_files: list[Path] = field(default_factory=list)
    voxel_index_base: int = 0

    def has(self, scan_id: str) -> bool:
        return scan_id in self.maps or scan_id in self.points


def _scan_for_stem(stem: str, scan_ids: set[str]) -> str | None:
    if stem in scan_ids:
        return stem
    m = _BIDS_RE.match(stem)
    if m:
        base = m.group("stem")
        if base in scan_ids:
            return base
        # drop trailing BIDS entities one at a time: sub-01_ses-1_space-T2S -> sub-01_ses-1 -> sub-01
        parts = base.split("_")
        for n in range(len(parts) - 1, 0, -1):
            cand = "_".join(parts[:n])
            if cand in scan_ids:
                return cand
    return None


def read_predictions_folder(root: str | Path, scan_ids: list[str]) -> PredictionsFolder:
    """Index a predictions folder against the reference's scan ids.

    Raises
    ------
    MissingInputError
        The folder does not exist, or it holds neither NIfTI maps nor ``predictions.csv``.
    UnreadableInputError
        ``predictions.csv`` or the manifest is malformed; two files claim the same scan.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError("predictions folder not found", root)
    folder = PredictionsFolder(root=root)
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            folder.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UnreadableInputError(f"invalid JSON ({exc.msg} at line {exc.lineno})",
                                       manifest_path) from None
        base = folder.manifest.get("voxel_index_base", 0)
        if base not in (0, 1):
            raise UnreadableInputError("voxel_index_base must be 0 or 1", manifest_path)
        folder.voxel_index_base = int(base)
    wanted = set(scan_ids)
    nifti = sorted(p for p in root.rglob("*") if p.is_file() and strip_nifti_suffix(p.name))
    for path in nifti:
        if ".partial." in path.name:
            continue
        sid = _scan_for_stem(strip_nifti_suffix(path.name) or "", wanted)
        if sid is None:
            folder.unmatched_files.append(path)
            continue
        if sid in folder.maps:
            raise UnreadableInputError(
                f"two prediction files for scan {sid}: {folder.maps[sid].name} and {path.name}",
                root)
        folder.maps[sid] = path
    csv_path = root / "predictions.csv"
    if csv_path.is_file():
        folder.points = _read_points_csv(csv_path, folder, wanted)
    if not folder.maps and not folder.points:
        if folder.unmatched_files:
            raise MissingInputError(
                f"no prediction file matches a reference scan id (e.g. "
                f"{folder.unmatched_files[0].name}; expected <scan_id>.nii.gz)", root)
        raise MissingInputError("empty predictions folder (no NIfTI maps, no predictions.csv)",
                                root)
    return folder


def _read_points_csv(path: Path, folder: PredictionsFolder, wanted: set[str]) -> dict[str, pd.DataFrame]:
    try:
        frame = pd.read_csv(path, dtype={"scan_id": str})
    except pd.errors.EmptyDataError:
        return {}
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise UnreadableInputError(f"malformed CSV ({' '.join(str(exc).split())})", path) from None
    if "scan_id" not in frame.columns:
        raise UnreadableInputError("missing column scan_id", path)
    world = {"x_mm", "y_mm", "z_mm"} <= set(frame.columns)
    voxel = {"i", "j", "k"} <= set(frame.columns)
    if not world and not voxel:
        raise UnreadableInputError("needs columns x_mm, y_mm, z_mm (world RAS+ mm) or i, j, k "
                                   "(voxel)", path)
    if "score" not in frame.columns:
        frame["score"] = 1.0
    cols = ["x_mm", "y_mm", "z_mm"] if world else ["i", "j", "k"]
    values = frame[cols + ["score"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(values), axis=1))[0]) + 2
        raise InvalidValuesError(f"non-numeric or NaN coordinate/score on line {bad}", path)
    if frame["score"].min() < 0 or frame["score"].max() > 1:
        raise InvalidValuesError("scores must be in [0, 1]", path)
    unknown = sorted(set(frame["scan_id"]) - wanted)
    if unknown:
        raise UnreadableInputError(f"unknown scan_id(s) {', '.join(unknown[:5])}", path)
    out: dict[str, pd.DataFrame] = {}
    for sid, g in frame.groupby("scan_id"):
        g = g.reset_index(drop=True)
        if voxel and not world and folder.voxel_index_base == 1:
            g[["i", "j", "k"]] = g[["i", "j", "k"]] - 1.0
        if sid in folder.maps:
            raise UnreadableInputError(f"scan {sid} has both a map and rows in predictions.csv",
                                       path)
        out[str(sid)] = g
    return out

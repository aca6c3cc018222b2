"""Which mimic (vein, calcification, iron, flow void) a false positive sits on.

Synthetic datasets record every inserted mimic in ``mimics.csv`` (``scan_id``, ``mimic_id``,
``mimic_class``, world centroid, ``size_mm``) and its extent in ``mimics/<scan_id>.nii.gz``
(value = ``mimic_id``). An FP candidate is attributed to the mimic with the nearest labelled
voxel within :data:`ATTRIBUTION_RADIUS_MM` of its centroid (world mm); without a mimic map, to
the mimic whose centroid is within that radius plus half its size. Otherwise its class is
``none``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..geometry import voxel_to_world, world_to_voxel
from ..nifti import read_volume

__all__ = ["ATTRIBUTION_RADIUS_MM", "fp_mimic_classes"]

log = logging.getLogger(__name__)

#: Largest distance (mm) between an FP centroid and a mimic voxel for the FP to count as the
#: mimic's.
ATTRIBUTION_RADIUS_MM = 3.0


def _from_map(labels: np.ndarray, affine: np.ndarray, points_mm: np.ndarray,
              radius_mm: float) -> np.ndarray:
    """Mimic id (0: none) of the nearest labelled voxel within ``radius_mm`` of each point."""
    out = np.zeros(len(points_mm), dtype=np.int64)
    if not len(points_mm):
        return out
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    half = np.ceil(radius_mm / np.maximum(spacing, 1e-6)).astype(int)
    vox = world_to_voxel(affine, points_mm)
    shape = np.asarray(labels.shape[:3])
    for n, v in enumerate(vox):
        c = np.rint(v).astype(int)
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, shape)
        if np.any(hi <= lo):
            continue
        block = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        idx = np.argwhere(block > 0)
        if not len(idx):
            continue
        world = voxel_to_world(affine, (idx + lo).astype(np.float64))
        d = np.linalg.norm(world - points_mm[n], axis=1)
        best = int(np.argmin(d))
        if d[best] <= radius_mm:
            out[n] = int(block[tuple(idx[best])])
    return out


def _from_centroids(mimics: pd.DataFrame, points_mm: np.ndarray,
                    radius_mm: float) -> np.ndarray:
    out = np.zeros(len(points_mm), dtype=np.int64)
    if not len(points_mm) or not len(mimics):
        return out
    centres = mimics[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
    size = (mimics["size_mm"].to_numpy(np.float64) if "size_mm" in mimics.columns
            else np.zeros(len(mimics)))
    reach = radius_mm + np.nan_to_num(size, nan=0.0) / 2.0
    for n, p in enumerate(points_mm):
        d = np.linalg.norm(centres - p, axis=1) - reach
        best = int(np.argmin(d))
        if d[best] <= 0:
            out[n] = int(mimics["mimic_id"].iloc[best])
    return out


def fp_mimic_classes(table: pd.DataFrame, mimics: pd.DataFrame, root: Path | None, *,
                     radius_mm: float = ATTRIBUTION_RADIUS_MM) -> pd.Series:
    """The mimic class of each operating-point FP candidate row of ``table``.

    Parameters
    ----------
    table
        Per-lesion/per-candidate table (:data:`cmbbench.matching.MATCH_COLUMNS`).
    mimics
        The dataset's ``mimics.csv``.
    root
        The dataset folder (for ``mimics/<scan_id>.nii.gz``), or None.

    Returns
    -------
    pandas.Series
        Indexed like the FP rows of ``table``: a class from ``mimics.csv`` or ``none``.
    """
    fp = table[(table["kind"] == "candidate") & (table["outcome"] == "FP")]
    out = pd.Series("none", index=fp.index, dtype=object)
    if not len(fp) or mimics is None or not len(mimics):
        return out
    mim = mimics.copy()
    mim["scan_id"] = mim["scan_id"].astype(str)
    for scan_id, rows in fp.groupby(fp["scan_id"].astype(str)):
        own = mim[mim["scan_id"] == scan_id]
        if not len(own):
            continue
        classes = dict(zip(own["mimic_id"].astype(int), own["mimic_class"].astype(str)))
        pts = rows[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
        path = None if root is None else Path(root) / "mimics" / f"{scan_id}.nii.gz"
        if path is not None and path.is_file():
            try:
                vol = read_volume(path)
                ids = _from_map(np.asarray(vol.data), vol.affine, pts, radius_mm)
            except Exception as exc:  # noqa: BLE001 - fall back to centroids
                log.warning("%s: cannot read the mimic map (%s); using mimic centroids", path,
                            exc)
                ids = _from_centroids(own, pts, radius_mm)
        else:
            ids = _from_centroids(own, pts, radius_mm)
        out.loc[rows.index] = [classes.get(int(i), "none") if i else "none" for i in ids]
    return out

"""The drill-down slice viewer: one axial slice of a scan with TP/FP/FN findings marked.

The volume is reoriented to the closest canonical (RAS+) orientation and shown axially in the
radiological convention (patient's right on the viewer's left, anterior up). Findings are
placed from their world position (``x_mm``, ``y_mm``, ``z_mm``) or, when that is missing, from
their voxel indices (``i``, ``j``, ``k``, 0-based on the image grid). Markers differ in shape as
well as colour: TP a circle (green), FP a square (orange), FN a cross (blue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

__all__ = ["MARKERS", "SliceView", "finding_voxels", "image_path", "load_view", "render_slice"]

# kind -> (RGB colour, shape); Okabe-Ito colours
MARKERS: dict[str, tuple[tuple[int, int, int], str]] = {
    "tp": ((0, 158, 115), "circle"),
    "fp": ((230, 159, 0), "square"),
    "fn": ((86, 180, 233), "cross"),
}


@dataclass
class SliceView:
    """A scan ready to slice.

    Attributes
    ----------
    data
        Canonical (RAS+) array, float32, indexed ``[i, j, k]``; ``k`` is the axial axis.
    affine
        Canonical voxel-to-world affine.
    original_affine
        Affine of the file's own grid (for findings given in its voxel indices).
    spacing
        Voxel sizes of ``data`` in mm.
    window
        Display window (low, high) from the 1st and 99th percentiles of non-zero voxels.
    """

    data: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    spacing: np.ndarray
    window: tuple[float, float]

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[2])


def image_path(scan: dict | pd.Series | None, dataset: dict | pd.Series | None,
               scan_id: str) -> Path | None:
    """Where the scan's image is: ``scans.image_path``, else ``<datasets.path>/images/<id>``.

    Returns ``None`` when neither names an existing file.
    """
    candidates: list[Path] = []
    if scan is not None and isinstance(scan.get("image_path"), str) and scan.get("image_path"):
        candidates.append(Path(scan["image_path"]))
    if dataset is not None and isinstance(dataset.get("path"), str) and dataset.get("path"):
        for suffix in (".nii.gz", ".nii"):
            candidates.append(Path(dataset["path"]) / "images" / f"{scan_id}{suffix}")
    return next((p for p in candidates if p.is_file()), None)


def load_view(path: str | Path) -> SliceView:
    """Read a NIfTI scan and prepare it for slicing (see :class:`SliceView`)."""
    img = nib.load(str(path))
    canon = nib.as_closest_canonical(img)
    data = np.asarray(canon.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    nonzero = data[data != 0]
    sample = nonzero if nonzero.size else data.ravel()
    lo, hi = (float(v) for v in np.percentile(sample, [1, 99])) if sample.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return SliceView(data=data, affine=canon.affine, original_affine=img.affine,
                     spacing=np.asarray(canon.header.get_zooms()[:3], dtype=np.float64),
                     window=(lo, hi))


def finding_voxels(matches: pd.DataFrame, view: SliceView) -> pd.DataFrame:
    """``matches`` with canonical voxel coordinates ``ci``, ``cj``, ``ck`` (floats, NaN when
    the row has neither a world nor a voxel position)."""
    out = matches.copy()
    n = len(out)
    world = np.full((n, 3), np.nan)
    if n:
        xyz = out[["x_mm", "y_mm", "z_mm"]].apply(pd.to_numeric, errors="coerce").to_numpy()
        ijk = out[["i", "j", "k"]].apply(pd.to_numeric, errors="coerce").to_numpy()
        from_ijk = (view.original_affine @ np.c_[ijk, np.ones(n)].T).T[:, :3]
        use_xyz = np.isfinite(xyz).all(axis=1)
        world = np.where(use_xyz[:, None], xyz, from_ijk)
    canon = (np.linalg.inv(view.affine) @ np.c_[world, np.ones(n)].T).T[:, :3] if n else world
    out["ci"], out["cj"], out["ck"] = canon[:, 0], canon[:, 1], canon[:, 2]
    return out


def _draw(rgb: np.ndarray, r: float, c: float, radius: int, colour: tuple[int, int, int],
          shape: str) -> None:
    h, w, _ = rgb.shape
    rr, cc = np.mgrid[-radius - 2:radius + 3, -radius - 2:radius + 3]
    if shape == "circle":
        d = np.hypot(rr, cc)
        mask = (d >= radius - 1) & (d <= radius + 1)
    elif shape == "square":
        m = np.maximum(np.abs(rr), np.abs(cc))
        mask = (m >= radius - 1) & (m <= radius + 1)
    else:  # cross (an X)
        mask = ((np.abs(rr - cc) <= 1) | (np.abs(rr + cc) <= 1)) & (np.abs(rr) <= radius)
    ys = np.round(r).astype(int) + rr[mask]
    xs = np.round(c).astype(int) + cc[mask]
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    rgb[ys[ok], xs[ok]] = colour


def render_slice(view: SliceView, k: int, findings: pd.DataFrame | None = None, *,
                 target_px: int = 512, marker_mm: float = 4.0,
                 near_mm: float = 3.0) -> np.ndarray:
    """Axial slice ``k`` as an RGB uint8 image with the findings near it marked.

    Parameters
    ----------
    k
        Canonical axial slice index (0-based).
    findings
        :func:`finding_voxels` output (``kind`` in tp/fp/fn); a finding is drawn when its
        centre is within ``near_mm`` mm (at least half a slice) of the slice.
    target_px
        The image is upscaled (nearest neighbour, integer factor) to at least this width.
    marker_mm
        Marker radius in mm.
    """
    k = int(np.clip(k, 0, view.n_slices - 1))
    plane = view.data[:, :, k]  # [i (R), j (A)]
    lo, hi = view.window
    grey = (np.clip((plane - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    # radiological display: rows = anterior (top) -> posterior, columns = right -> left
    img = grey.T[::-1, ::-1]
    scale = max(1, int(np.ceil(target_px / max(img.shape[1], 1))))
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    rgb = np.repeat(img[:, :, None], 3, axis=2).copy()
    if findings is None or findings.empty:
        return rgb
    ni, nj = plane.shape
    radius = max(4, round(marker_mm / float(view.spacing[0]) * scale))
    near = max(0.5, near_mm / float(view.spacing[2]))
    for _, f in findings.iterrows():
        if not np.isfinite([f["ci"], f["cj"], f["ck"]]).all() or abs(f["ck"] - k) > near:
            continue
        colour, shape = MARKERS.get(str(f["kind"]).lower(), ((255, 0, 255), "circle"))
        row = (nj - 1 - f["cj"]) * scale + (scale - 1) / 2
        col = (ni - 1 - f["ci"]) * scale + (scale - 1) / 2
        _draw(rgb, row, col, radius, colour, shape)
    return rgb

"""Preprocessing of "ours" (numpy/scipy only; no torch).

Steps (:func:`preprocess`):

1. **Validation** (:func:`check_input`): the image must be 3D (a 4D image whose trailing axes
   are all of length 1 is squeezed; any other 4D image is refused), finite voxel sizes in
   ``[MIN_SPACING_MM, MAX_SPACING_MM]``; non-finite voxels are replaced by the finite median
   (an image with no finite voxel is refused). Slice spacings above the training envelope
   (6.5 mm) or voxel sizes far from it are *handled* (resampled like any other) with a
   logged warning, never refused unless outside the hard limits.
2. **Reorientation to RAS** by axis permutation/flip only (``nibabel.orientations``), so it is
   exactly invertible.
3. **Resampling** to the isotropic working spacing (default 1.0 mm; linear for images,
   nearest for labels). The working grid has ``round(n * spacing / work)`` voxels per axis and
   voxel centres of the first and last voxels are aligned (``scipy.ndimage.zoom`` with
   ``grid_mode=False``); :func:`to_native` applies exactly the inverse correspondence.
4. **Brain mask** from the image alone (:func:`brain_mask`): smoothing, threshold
   ``min(Otsu, 0.25 P99)``, hole filling, largest component, light erosion.
5. **Robust normalisation**: ``(I - median) / (1.4826 MAD)`` over the mask, clipped to
   ``[-CLIP, CLIP]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from ...errors import InvalidValuesError

__all__ = [
    "MAX_SPACING_MM",
    "MIN_SPACING_MM",
    "Preprocessed",
    "brain_mask",
    "check_input",
    "normalisation_stats",
    "normalise",
    "preprocess",
    "resample_labels",
    "to_native",
    "work_to_native_index",
]

log = logging.getLogger(__name__)

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
TRAIN_MAX_SLICE_MM = 6.5
CLIP = 8.0


@dataclass
class Preprocessed:
    """A scan on the working grid, and what it takes to map back."""

    image: np.ndarray          # float32, RAS, working spacing, normalised
    mask: np.ndarray           # bool brain mask on the working grid
    native_shape: tuple        # shape of the (squeezed) input
    ras_shape: tuple           # shape after reorientation, before resampling
    ornt: np.ndarray           # native -> RAS orientation transform
    start_ornt: np.ndarray     # orientation of the native axes (nibabel io_orientation)
    spacing_ras: np.ndarray    # voxel sizes of the RAS array (mm)
    work_mm: float
    #: median / scale of the normalisation: ``image + intensity_offset`` is the signal in
    #: units of the scale (0 = no signal), what a multiplicative signal change acts on
    intensity_offset: float = 0.0

    @property
    def zoom(self) -> np.ndarray:
        return np.array([(w - 1) / max(r - 1, 1) for w, r in zip(self.image.shape,
                                                                   self.ras_shape)])


def check_input(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 3D image and its voxel sizes; raises InvalidValuesError (one line)."""
    img = np.asarray(image)
    if img.ndim == 4 and all(s == 1 for s in img.shape[3:]):
        img = img[..., 0]
    if img.ndim != 3:
        raise InvalidValuesError(f"ours needs a 3D image, got {img.ndim}D shape {img.shape}")
    if min(img.shape) < 2:
        raise InvalidValuesError(f"ours needs at least 2 voxels per axis, got shape {img.shape}")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InvalidValuesError("ours needs a finite 4x4 affine")
    sp = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if (sp < MIN_SPACING_MM).any() or (sp > MAX_SPACING_MM).any():
        raise InvalidValuesError(
            f"voxel size {np.round(sp, 3).tolist()} mm outside the supported range "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm")
    img = img.astype(np.float32, copy=False)
    finite = np.isfinite(img)
    if not finite.all():
        if not finite.any():
            raise InvalidValuesError("the image has no finite voxel")
        n_bad = int((~finite).sum())
        log.warning("ours: %d non-finite voxel(s) replaced by the finite median", n_bad)
        img = img.copy()
        img[~finite] = float(np.median(img[finite]))
    if sp.max() > TRAIN_MAX_SLICE_MM:
        log.warning("ours: voxel size %s mm beyond the training envelope (slices <= %.1f mm); "
                    "resampled anyway, expect lower sensitivity", np.round(sp, 2).tolist(),
                    TRAIN_MAX_SLICE_MM)
    if sp.min() > 1.5:
        log.warning("ours: coarse in-plane resolution %s mm (training: 0.5-1 mm)",
                    np.round(sp, 2).tolist())
    return img, sp


def _ras(img: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start = io_orientation(affine)
    ornt = ornt_transform(start, axcodes2ornt("RAS"))
    return apply_orientation(img, ornt), ornt, start


def _zoom_to(arr: np.ndarray, shape: tuple, order: int) -> np.ndarray:
    if tuple(arr.shape) == tuple(shape):
        return arr
    factors = [t / s for t, s in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=False, prefilter=False)
    if tuple(out.shape) != tuple(shape):  # rounding inside zoom (never seen, but be safe)
        pad = [(0, max(t - o, 0)) for t, o in zip(shape, out.shape)]
        out = np.pad(out, pad, mode="edge")[tuple(slice(0, t) for t in shape)]
    return out


def brain_mask(img: np.ndarray, spacing_mm: float, *, erode_mm: float = 2.0) -> np.ndarray:
    """Brain/foreground mask from the image alone (on an isotropic grid)."""
    from skimage.filters import threshold_otsu

    sm = ndimage.gaussian_filter(img, 1.5 / spacing_mm, mode="nearest")
    lo, hi = float(sm.min()), float(sm.max())
    if hi <= lo:
        return np.ones(img.shape, bool)
    flat = sm.ravel()[:: max(1, sm.size // 1_000_000)]
    thr = min(float(threshold_otsu(flat)), 0.25 * float(np.percentile(flat, 99)))
    m = ndimage.binary_fill_holes(sm > thr)
    for k in range(m.shape[2]):
        m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    r = int(round(erode_mm / spacing_mm))
    if r > 0:
        m = ndimage.binary_erosion(m, iterations=r, border_value=1) if m.sum() > 1000 else m
    return m


def normalisation_stats(img: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(median, scale)`` of the image in the mask: scale = 1.4826 MAD (the sd where MAD is
    degenerate, 1 if both are)."""
    vals = img[mask] if mask.sum() > 100 else img.ravel()
    med = float(np.median(vals))
    mad = 1.4826 * float(np.median(np.abs(vals - med)))
    if mad <= 1e-6 * max(abs(med), 1.0):
        mad = float(vals.std()) or 1.0
    return med, mad


def normalise(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(img - median) / scale`` (see :func:`normalisation_stats`), clipped to +-CLIP."""
    med, mad = normalisation_stats(img, mask)
    return np.clip((img - med) / mad, -CLIP, CLIP).astype(np.float32)


def preprocess(image: np.ndarray, affine: np.ndarray, *, work_mm: float = 1.0) -> Preprocessed:
    """Validate, reorient, resample, mask and normalise one scan (see module doc)."""
    img, _ = check_input(image, affine)
    native_shape = img.shape
    ras, ornt, start = _ras(img, affine)
    sp = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    sp_ras = np.empty(3)
    for ax in range(3):
        sp_ras[int(ornt[ax, 0])] = sp[ax]
    shape = tuple(max(int(round(n * s / work_mm)), 2) for n, s in zip(ras.shape, sp_ras))
    if max(shape) < 16:
        raise InvalidValuesError(f"the image covers only {np.round(np.array(ras.shape) * sp_ras, 1)}"
                                 " mm; ours needs a brain-sized field of view")
    if np.prod(shape) > 400 ** 3:
        raise InvalidValuesError(f"field of view {np.round(np.array(ras.shape) * sp_ras)} mm is "
                                 "too large for ours (more than 400 mm per axis)")
    work = _zoom_to(np.ascontiguousarray(ras), shape, order=1)
    mask = brain_mask(work, work_mm)
    med, scale = normalisation_stats(work, mask)
    image = np.clip((work - med) / scale, -CLIP, CLIP).astype(np.float32)
    return Preprocessed(image=image, mask=mask, native_shape=native_shape,
                        ras_shape=ras.shape, ornt=ornt, start_ornt=start, spacing_ras=sp_ras,
                        work_mm=work_mm, intensity_offset=med / scale)


def resample_labels(labels: np.ndarray, affine: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """A native label map on the working grid (nearest neighbour), every instance kept.

    Instances that nearest-neighbour sampling would lose (sub-voxel at the working spacing)
    are re-inserted at their centre of mass.
    """
    lab = np.asarray(labels)
    if lab.ndim == 4:
        lab = lab[..., 0]
    ras = np.ascontiguousarray(apply_orientation(lab, pre.ornt)).astype(np.int32)
    out = _zoom_to(ras, pre.image.shape, order=0).astype(np.int32)
    ids = np.unique(ras[ras > 0])
    kept = set(np.unique(out[out > 0]).tolist())
    for i in ids:
        if int(i) in kept:
            continue
        com = np.array(ndimage.center_of_mass(ras == i)) * pre.zoom
        idx = tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(com, out.shape))
        out[idx] = int(i)
    return out


def to_native(work_map: np.ndarray, pre: Preprocessed, order: int = 1) -> np.ndarray:
    """Map a working-grid array back to the scan's native grid (inverse of preprocess)."""
    ras = _zoom_to(np.asarray(work_map), pre.ras_shape, order=order)
    inv = ornt_transform(axcodes2ornt("RAS"), pre.start_ornt)
    out = apply_orientation(ras, inv)
    assert tuple(out.shape) == tuple(pre.native_shape), (out.shape, pre.native_shape)
    return np.ascontiguousarray(out)


def work_to_native_index(ijk_work: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """Working-grid voxel coordinates (N x 3) -> native voxel coordinates (N x 3)."""
    ijk = np.atleast_2d(np.asarray(ijk_work, float)) / np.where(pre.zoom > 0, pre.zoom, 1)
    out = np.empty_like(ijk)
    for ax in range(3):
        r_ax, flip = int(pre.ornt[ax, 0]), pre.ornt[ax, 1]
        v = ijk[:, r_ax]
        out[:, ax] = (pre.ras_shape[r_ax] - 1 - v) if flip < 0 else v
    return out

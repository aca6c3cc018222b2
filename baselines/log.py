"""Multi-scale 3D Laplacian-of-Gaussian (LoG) dark-blob detector, in physical units.

Our own baseline (no CMB-specific LoG parameters are published): every length is in
millimetres and is converted to voxels with the scan's spacing, so the detector behaves the same
at any, possibly anisotropic, resolution.

Pipeline (:meth:`LoGDetector.predict`)
--------------------------------------
1. **Foreground mask** (:func:`foreground_mask`): Gaussian smoothing (sigma 1 mm), a threshold
   ``min(Otsu, 0.25 x 99th percentile)`` (the cap keeps a field of view filled with tissue from
   being split between tissue classes by Otsu), hole filling (3D, then slice by slice), the
   largest connected component, erosion by a 3 mm ball. The volume's own faces do not erode
   (a field of view cut inside the head is not a brain edge).
2. **Robust normalisation** (:func:`robust_normalise`): ``(I - median) / (1.4826 MAD)`` over the
   mask, so the response is in units of the tissue's robust intensity spread.
3. **Scale space** (:func:`log_response`): for each blob diameter ``d`` (default 7 diameters
   log-spaced over 1-5 mm) ``sigma = d / (2 sqrt 3)`` mm (the 3D LoG's zero crossing is at
   ``sqrt(3) sigma = d / 2``), converted per axis to voxels; Gaussian smoothing then a
   second-difference Laplacian in mm^-2; the scale-normalised response ``sigma^2 * LoG`` is
   positive at dark blobs. The maximum over scales and its argmax (the scale) are kept.
4. **Local maxima** (:func:`local_maxima`) of the max-over-scales response within a ball of
   ``nms_radius_mm`` = 1.5 mm (a ~3 mm neighbourhood), inside the mask, response > 0.
5. **Score**: robust z-score of the peak response against the response's median and MAD over
   the mask, mapped by the logistic ``1 / (1 + exp(-(z - z_mid) / z_width))`` with
   ``z_mid = 8`` and ``z_width = 2`` (monotone; z = 8 gives 0.5, z = 4 gives 0.12).
6. **Output**: the ``max_candidates`` = 200 best maxima with score >= ``min_score`` = 0.05;
   probability map = a ball per candidate (radius = detected diameter / 2 in mm; the centre
   voxel is always painted) filled with the score, lower-ranked balls cut back so that no two
   touch (:func:`probability_from_labels`), so that cmbbench's probability-map scoring sees one
   component per candidate with peak = score; candidate table ``i, j, k, score`` (+ the
   detected ``diameter_mm`` and the raw ``response``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import threshold_otsu

from cmbbench.methods.api import Method, Prediction, Requirements, ScanInput

__all__ = [
    "DEFAULT_DIAMETERS_MM",
    "LoGDetector",
    "ball_labels",
    "candidate_table",
    "clean_image",
    "ellipsoid_footprint",
    "foreground_mask",
    "local_maxima",
    "log_response",
    "probability_from_labels",
    "robust_normalise",
]

log = logging.getLogger(__name__)

#: Seven blob diameters (mm), log-spaced from 1 to 5 mm.
DEFAULT_DIAMETERS_MM: tuple[float, ...] = tuple(float(d) for d in np.geomspace(1.0, 5.0, 7))


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the Bian 2013 baseline)
# ---------------------------------------------------------------------------------------------

def ellipsoid_footprint(radius_mm: float, spacing_mm: Sequence[float], *,
                        min_half: int = 0) -> np.ndarray:
    """Boolean ball of ``radius_mm`` (mm) on a grid of ``spacing_mm`` (an ellipsoid in voxels).

    Parameters
    ----------
    radius_mm
        Ball radius in mm.
    spacing_mm
        Voxel edge lengths (mm) along the array axes.
    min_half
        Minimum half-width in voxels along every axis (e.g. 1 for at least a 3x3x3 box).

    Returns
    -------
    numpy.ndarray
        Odd-sized boolean footprint centred on its middle voxel (which is always True).
    """
    sp = np.asarray(spacing_mm, dtype=np.float64)
    half = np.maximum(np.floor(radius_mm / sp + 1e-9).astype(int), min_half)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, sp)], indexing="ij")
    d2 = sum(g ** 2 for g in grids)
    fp = d2 <= radius_mm ** 2 + 1e-9
    if min_half > 0:
        # keep the min_half box's face neighbours even when radius < spacing
        core = sum((np.abs(g) / s) ** 2 for g, s in zip(grids, sp)) <= min_half ** 2 + 1e-9
        fp |= core
    return fp


def clean_image(image: np.ndarray) -> np.ndarray:
    """Float32 copy of ``image`` with non-finite values replaced by the finite median."""
    img = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(img)
    if finite.all():
        return img.copy()
    fill = float(np.median(img[finite])) if finite.any() else 0.0
    out = img.copy()
    out[~finite] = fill
    return out


def foreground_mask(image: np.ndarray, spacing_mm: Sequence[float], *, smooth_mm: float = 1.0,
                    cap_fraction: float = 0.25, erode_mm: float = 3.0) -> np.ndarray:
    """A simple brain/foreground mask derived from the image alone.

    Parameters
    ----------
    image
        3D magnitude/SWI image ``[i, j, k]``.
    spacing_mm
        Voxel edge lengths (mm).
    smooth_mm
        Gaussian sigma (mm) applied before thresholding.
    cap_fraction
        The threshold is ``min(Otsu(smoothed), cap_fraction * P99(smoothed))``: Otsu separates
        air from head on a full field of view; the cap stops it from cutting tissue classes
        apart when the field of view holds no air.
    erode_mm
        Erosion radius (mm), an ellipsoidal footprint in voxels; 0 disables it. The volume's
        faces do not erode (``border_value=1``).

    Returns
    -------
    numpy.ndarray
        Boolean mask of the image's shape (all False only when the image is constant).
    """
    img = clean_image(image)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    sm = ndimage.gaussian_filter(img, sigma=smooth_mm / sp, mode="nearest")
    lo, hi = float(sm.min()), float(sm.max())
    if hi <= lo:
        return np.ones(img.shape, dtype=bool)
    # Otsu on a subsample for speed (2M voxels are plenty for a 256-bin histogram)
    flat = sm.ravel()
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step]
    thr = min(float(threshold_otsu(sample)), cap_fraction * float(np.percentile(sample, 99)))
    mask = sm > thr
    mask = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    if erode_mm > 0 and mask.any():
        fp = ellipsoid_footprint(erode_mm, sp)
        eroded = ndimage.binary_erosion(mask, structure=fp, border_value=1)
        if eroded.any():
            mask = eroded
    return mask


def robust_normalise(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(I - median) / (1.4826 MAD)`` with median and MAD over ``mask`` (float32).

    Falls back to the standard deviation, then to 1, when the MAD is 0.
    """
    img = clean_image(image)
    vals = img[mask] if mask.any() else img.ravel()
    med = float(np.median(vals))
    mad = 1.4826 * float(np.median(np.abs(vals - med)))
    if not mad > 0:
        mad = float(vals.std()) or 1.0
    return (img - np.float32(med)) / np.float32(mad)


def _laplacian_mm(sm: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Second-difference Laplacian in mm^-2 (edge voxels replicate their neighbour)."""
    out = np.zeros_like(sm)
    for ax, h in enumerate(spacing_mm):
        if sm.shape[ax] < 3:
            continue
        d2 = np.diff(sm, n=2, axis=ax) / np.float32(h * h)
        pad = [(0, 0)] * sm.ndim
        pad[ax] = (1, 1)
        out += np.pad(d2, pad, mode="edge")
    return out


def log_response(image: np.ndarray, spacing_mm: Sequence[float],
                 diameters_mm: Sequence[float] = DEFAULT_DIAMETERS_MM
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Scale-normalised dark-blob LoG response, maximised over scales.

    Parameters
    ----------
    image
        3D image ``[i, j, k]`` (any intensity scale; the response is linear in it).
    spacing_mm
        Voxel edge lengths (mm).
    diameters_mm
        Blob diameters ``d`` (mm); each scale uses ``sigma = d / (2 sqrt 3)`` mm per axis,
        i.e. ``sigma / spacing`` voxels.

    Returns
    -------
    response, scale_index
        ``max_s sigma_s^2 * Laplacian(G_s * I)`` (float32, positive at dark blobs; mm units
        cancel) and the index into ``diameters_mm`` of the maximising scale (int8).
    """
    img = clean_image(image)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    best = np.full(img.shape, -np.inf, dtype=np.float32)
    arg = np.zeros(img.shape, dtype=np.int8)
    for n, d in enumerate(diameters_mm):
        sigma_mm = float(d) / (2.0 * np.sqrt(3.0))
        sm = ndimage.gaussian_filter(img, sigma=sigma_mm / sp, mode="nearest")
        resp = _laplacian_mm(sm, sp)
        resp *= np.float32(sigma_mm ** 2)
        better = resp > best
        best[better] = resp[better]
        arg[better] = n
    return best, arg


def local_maxima(response: np.ndarray, spacing_mm: Sequence[float], *, radius_mm: float = 1.5,
                 mask: np.ndarray | None = None, min_value: float = 0.0) -> np.ndarray:
    """Voxels that are the maximum of ``response`` within a ball of ``radius_mm``.

    The ball is at least the 3x3x3 neighbourhood. Plateaus keep one voxel per connected
    plateau (its first voxel in raster order).

    Returns
    -------
    numpy.ndarray
        ``(N, 3)`` int array of 0-based voxel indices, in raster order.
    """
    fp = ellipsoid_footprint(radius_mm, spacing_mm, min_half=1)
    mx = ndimage.maximum_filter(response, footprint=fp, mode="nearest")
    peak = (response >= mx) & (response > min_value)
    if mask is not None:
        peak &= mask
    labels, n = ndimage.label(peak, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    idx = np.argwhere(peak)
    lab = labels[tuple(idx.T)]
    _, first = np.unique(lab, return_index=True)
    return idx[np.sort(first)]


def ball_labels(shape: tuple[int, ...], spacing_mm: Sequence[float], centres_vox: np.ndarray,
                radii_mm: Sequence[float]) -> np.ndarray:
    """Label map with ball ``n + 1`` of ``radii_mm[n]`` (mm) around ``centres_vox[n]``.

    Balls are painted in order and never overwrite an earlier one (pass the best first). Every
    ball holds at least its centre voxel.
    """
    sp = np.asarray(spacing_mm, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.int32)
    for n, (c, r) in enumerate(zip(np.asarray(centres_vox, dtype=np.int64), radii_mm), start=1):
        half = np.floor(float(r) / sp + 1e-9).astype(int)
        lo = np.maximum(c - half, 0)
        hi = np.minimum(c + half + 1, shape)
        g = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in zip(lo, hi, c, sp)],
                        indexing="ij")
        ball = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= float(r) ** 2 + 1e-9
        box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box[ball & (box == 0)] = n
        if labels[tuple(c)] == 0:
            labels[tuple(c)] = n
    return labels


def probability_from_labels(labels: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """Probability map painting label ``n + 1`` with ``scores[n]``, components kept apart.

    Label values are priorities (1 = highest, e.g. the best candidate): a voxel of label ``b``
    that touches (26-neighbourhood) a voxel of a label ``a < b`` is cleared. Afterwards no two
    labels are 26-connected, so each label is its own connected component under cmbbench's
    probability-map scoring, with peak = its score. Label 1 is never cut; a lower-priority
    label lying entirely next to a better one disappears.

    Parameters
    ----------
    labels
        Integer label map (0 = background, values 1..N, lower = higher priority).
    scores
        Score in [0, 1] of each label (index ``label - 1``).

    Returns
    -------
    numpy.ndarray
        Float32 map in [0, 1] of ``labels.shape``.
    """
    lab = np.asarray(labels)
    prob = np.zeros(lab.shape, dtype=np.float32)
    if not lab.any():
        return prob
    sc = np.clip(np.asarray(scores, dtype=np.float32), 0.0, 1.0)
    nz = np.argwhere(lab > 0)
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = np.minimum(nz.max(axis=0) + 2, lab.shape)
    sub = lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.int32)
    big = int(sub.max()) + 1
    cube = np.ones((3, 3, 3), dtype=bool)
    lmin = ndimage.minimum_filter(np.where(sub > 0, sub, big), footprint=cube, mode="constant",
                                  cval=big)
    conflict = (sub > 0) & (lmin < sub)
    keep = (sub > 0) & ~conflict
    out = np.zeros(sub.shape, dtype=np.float32)
    out[keep] = sc[sub[keep] - 1]
    prob[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = out
    return prob


def candidate_table(ijk: np.ndarray, scores: np.ndarray, **extra: np.ndarray) -> pd.DataFrame:
    """Candidate table with columns ``i, j, k`` (0-based voxels), ``score`` and ``extra``."""
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    data = {"i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2],
            "score": np.asarray(scores, dtype=np.float64)}
    data.update({k: np.asarray(v) for k, v in extra.items()})
    return pd.DataFrame(data)


def _bbox(mask: np.ndarray, margin_vox: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin_vox, 0)
    hi = np.minimum(idx.max(axis=0) + margin_vox + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------

class LoGDetector(Method):
    """Multi-scale 3D LoG dark-blob detector (our baseline; all parameters in mm).

    Parameters (keyword arguments, all optional)
    --------------------------------------------
    diameters_mm : sequence of float
        Blob diameters of the scale space (default 7, log-spaced 1-5 mm).
    nms_radius_mm : float
        Radius of the local-maximum neighbourhood (default 1.5 mm).
    mask_erode_mm, mask_smooth_mm, mask_cap_fraction : float
        Foreground mask settings (defaults 3 mm, 1 mm, 0.25), see :func:`foreground_mask`.
    z_mid, z_width : float
        Logistic score map of the response's robust z-score (defaults 8, 2).
    max_candidates : int
        Most candidates returned per scan (default 200).
    min_score : float
        Candidates scoring below it are dropped (default 0.05).
    """

    name = "log"
    version = "1"
    citation = ("cmbbench baseline (ours): multi-scale scale-normalised Laplacian of Gaussian "
                "(Lindeberg 1998, Int. J. Comput. Vis. 30:79-116) for dark blobs")
    description = (
        "Multi-scale 3D Laplacian-of-Gaussian dark-blob detector with every parameter in mm. "
        "Image-derived foreground mask (Gaussian 1 mm, threshold min(Otsu, 0.25 x P99), hole "
        "filling, largest component, 3 mm erosion; the volume faces do not erode) and robust "
        "normalisation (median/1.4826 MAD over the mask). Scales: 7 blob diameters log-spaced "
        "over 1-5 mm, sigma = d/(2 sqrt 3) mm per axis (converted with the voxel spacing); "
        "response sigma^2 x Laplacian (mm^-2, second differences), positive for dark blobs, "
        "maximised over scales. Candidates are local maxima within 1.5 mm inside the mask; "
        "score = logistic((z - 8) / 2) of the response's robust z-score over the mask; at most "
        "200 per scan (score >= 0.05). The probability map paints a ball of the detected "
        "diameter with each candidate's score (balls kept one voxel apart).")
    limitations = (
        "Not CMB-specific: any dark blob-like structure responds (veins seen end-on or in "
        "cross-section, flow voids, calcifications, dark deep-grey-matter iron, sulcal/"
        "air-tissue edges); veins running through the neighbourhood respond at about 2/3 of a "
        "sphere of the same width. No phase information, no learned false-positive reduction. "
        "The 3 mm mask erosion misses CMBs within ~3 mm of the brain/air boundary, and the "
        "simple threshold mask can leak into the skull/scalp on full-head images. Scores are "
        "per-scan relative (robust z-score): a scan with many strong blobs shifts nothing, but "
        "a scan with unusual tissue contrast shifts all scores. On thick slices (> 3 mm) the "
        "through-plane blur of small CMBs lowers their response.")
    requirements = Requirements(sequences=("SWI", "T2S"), trainable=False, torch=False)

    def __init__(self, *, diameters_mm: Sequence[float] = DEFAULT_DIAMETERS_MM,
                 nms_radius_mm: float = 1.5, mask_erode_mm: float = 3.0,
                 mask_smooth_mm: float = 1.0, mask_cap_fraction: float = 0.25,
                 z_mid: float = 8.0, z_width: float = 2.0, max_candidates: int = 200,
                 min_score: float = 0.05) -> None:
        super().__init__(diameters_mm=tuple(float(d) for d in diameters_mm),
                         nms_radius_mm=nms_radius_mm, mask_erode_mm=mask_erode_mm,
                         mask_smooth_mm=mask_smooth_mm, mask_cap_fraction=mask_cap_fraction,
                         z_mid=z_mid, z_width=z_width, max_candidates=max_candidates,
                         min_score=min_score)
        if not diameters_mm or min(diameters_mm) <= 0:
            raise ValueError("diameters_mm must be positive")
        self.diameters_mm = tuple(float(d) for d in diameters_mm)
        self.nms_radius_mm = float(nms_radius_mm)
        self.mask_erode_mm = float(mask_erode_mm)
        self.mask_smooth_mm = float(mask_smooth_mm)
        self.mask_cap_fraction = float(mask_cap_fraction)
        self.z_mid = float(z_mid)
        self.z_width = float(z_width)
        self.max_candidates = int(max_candidates)
        self.min_score = float(min_score)

    def score_from_z(self, z: np.ndarray) -> np.ndarray:
        """Monotone map of robust z-scores to [0, 1]: ``1 / (1 + exp(-(z - z_mid) / z_width))``."""
        return 1.0 / (1.0 + np.exp(-(np.asarray(z, dtype=np.float64) - self.z_mid)
                                   / self.z_width))

    def predict(self, scan: ScanInput) -> Prediction:
        """Detect dark blobs on one scan (see the module docstring for the pipeline)."""
        img = clean_image(scan.image)
        if img.ndim != 3:
            raise ValueError(f"expected a 3D image, got shape {img.shape}")
        sp = np.asarray(scan.spacing_mm, dtype=np.float64)
        shape = img.shape
        empty = Prediction(probability=np.zeros(shape, dtype=np.float32),
                           candidates=candidate_table(np.zeros((0, 3)), np.zeros(0),
                                                      diameter_mm=np.zeros(0),
                                                      response=np.zeros(0)))
        mask = foreground_mask(img, sp, smooth_mm=self.mask_smooth_mm,
                               cap_fraction=self.mask_cap_fraction, erode_mm=self.mask_erode_mm)
        if not mask.any():
            return empty
        # crop to the mask (plus the largest kernel's reach) for speed
        sigma_max = max(self.diameters_mm) / (2.0 * np.sqrt(3.0))
        margin = np.ceil(4.0 * sigma_max / sp).astype(int) + 2
        box = _bbox(mask, margin)
        sub = img[box]
        sub_mask = mask[box]
        norm = robust_normalise(sub, sub_mask)
        resp, arg = log_response(norm, sp, self.diameters_mm)
        vals = resp[sub_mask]
        med = float(np.median(vals))
        mad = 1.4826 * float(np.median(np.abs(vals - med)))
        if not mad > 0:
            mad = float(vals.std()) or 1.0
        peaks = local_maxima(resp, sp, radius_mm=self.nms_radius_mm, mask=sub_mask)
        if len(peaks) == 0:
            return empty
        pv = resp[tuple(peaks.T)].astype(np.float64)
        z = (pv - med) / mad
        score = self.score_from_z(z)
        order = np.argsort(-pv, kind="stable")
        order = order[score[order] >= self.min_score][: self.max_candidates]
        peaks, pv, score = peaks[order], pv[order], score[order]
        diam = np.asarray(self.diameters_mm)[arg[tuple(peaks.T)]]
        offset = np.array([s.start for s in box])
        ijk = peaks + offset
        # ball radius = detected radius (the centre voxel is always painted)
        labels = ball_labels(shape, sp, ijk, diam / 2.0)
        prob = probability_from_labels(labels, score)
        log.debug("log: %s: %d candidates (z median %.2f, MAD %.3g)", scan.scan_id, len(ijk),
                  med, mad)
        return Prediction(probability=prob,
                          candidates=candidate_table(ijk, score, diameter_mm=diam, response=pv))

"""Where synthetic CMBs and mimics go, and how big they are (pure functions of an RNG).

All positions are drawn on the target grid of the scan (0-based voxels) from the subject's
tissue and MARS maps, then jittered inside the voxel and converted to world RAS+ mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry import voxel_sizes, voxel_to_world

__all__ = [
    "PlacedPoint",
    "VeinGuide",
    "coarse_distance",
    "pick_voxels",
    "sample_apparent_diameter",
    "sample_cmb_count",
    "sample_core_diameter",
]


def sample_cmb_count(rng: np.random.Generator, exponent: float, k_max: int) -> int:
    """CMB count of a positive scan: discrete power law ``P(k) ∝ k^-exponent``, k in 1..k_max."""
    k = np.arange(1, k_max + 1, dtype=np.float64)
    p = k ** -exponent
    return int(rng.choice(k, p=p / p.sum()))


def sample_apparent_diameter(rng: np.random.Generator, median_mm: float, log_sd: float,
                             lo_mm: float, hi_mm: float) -> float:
    """Target apparent diameter (mm) at the reference protocol: lognormal, clipped to [lo, hi]."""
    return float(np.clip(rng.lognormal(np.log(median_mm), log_sd), lo_mm, hi_mm))


def sample_core_diameter(rng: np.random.Generator, apparent_mm: float) -> float:
    """Physical core diameter (mm): log-uniform in [0.3, min(2, 0.6 * apparent)] mm."""
    hi = max(0.35, min(2.0, 0.6 * apparent_mm))
    return float(np.exp(rng.uniform(np.log(0.3), np.log(hi))))


def coarse_distance(mask: np.ndarray, spacing_mm: np.ndarray, *, target_mm: float = 2.0) -> np.ndarray:
    """Approximate distance (mm) to the nearest ``mask`` voxel, computed on a ~``target_mm`` grid.

    The mask is reduced by block-wise "any" to about ``target_mm`` voxels, the exact Euclidean
    distance transform is taken there and mapped back by nearest neighbour, so the result is
    accurate to about one coarse voxel: enough for placement margins and vein guidance, and
    10-50x cheaper than a full-resolution transform.
    """
    sp = np.asarray(spacing_mm, dtype=np.float64)
    f = np.maximum(1, np.floor(target_mm / sp)).astype(int)
    shape = np.array(mask.shape)
    padded = np.zeros(tuple(((shape + f - 1) // f) * f), dtype=bool)
    padded[: shape[0], : shape[1], : shape[2]] = mask
    c = padded.reshape(padded.shape[0] // f[0], f[0], padded.shape[1] // f[1], f[1],
                       padded.shape[2] // f[2], f[2]).any(axis=(1, 3, 5))
    if not c.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    d = ndimage.distance_transform_edt(~c, sampling=sp * f).astype(np.float32)
    idx = [np.minimum(np.arange(n) // k, d.shape[a] - 1) for a, (n, k) in enumerate(zip(shape, f))]
    return d[np.ix_(*idx)]


@dataclass
class PlacedPoint:
    """A drawn position: 0-based voxel (fractional) and world RAS+ mm."""

    vox: np.ndarray
    world: np.ndarray


def pick_voxels(rng: np.random.Generator, allowed: np.ndarray, affine: np.ndarray, n: int, *,
                avoid_world: list[np.ndarray] | None = None, min_distance_mm: float = 0.0,
                tries: int = 50) -> list[PlacedPoint]:
    """Draw up to ``n`` positions uniformly among ``allowed`` voxels, jittered within the voxel,
    at least ``min_distance_mm`` (world mm) from each other and from ``avoid_world``."""
    idx = np.flatnonzero(allowed)
    out: list[PlacedPoint] = []
    if idx.size == 0:
        return out
    taken = [np.asarray(p, dtype=np.float64) for p in (avoid_world or [])]
    for _ in range(n):
        for _ in range(tries):
            v = np.array(np.unravel_index(int(rng.choice(idx)), allowed.shape), dtype=np.float64)
            v = v + rng.uniform(-0.3, 0.3, 3)
            w = voxel_to_world(affine, v)
            if all(np.linalg.norm(w - t) >= min_distance_mm for t in taken):
                out.append(PlacedPoint(v, w))
                taken.append(w)
                break
    return out


class VeinGuide:
    """Precomputed fields that guide vein paths on one scan grid (computed once per scan).

    Medullary veins start in white matter 1-6 mm from the ventricles and climb the gradient of
    the distance to the ventricles (radially outwards) while in white matter. Cortical (pial)
    veins start on CSF voxels touching cortex and walk along that interface.
    """

    def __init__(self, wm: np.ndarray, ventricle: np.ndarray, cortex: np.ndarray,
                 csf: np.ndarray, affine: np.ndarray) -> None:
        self.affine = affine
        self.sp = voxel_sizes(affine)
        self.shape = np.array(wm.shape)
        self.wm = wm
        dist = coarse_distance(ventricle, self.sp)
        self.ventricle_grad = np.stack(np.gradient(dist, *self.sp), axis=-1)
        self.medullary_starts = np.flatnonzero(wm & (dist > 1.0) & (dist < 6.0))
        boundary = csf & ndimage.binary_dilation(cortex)
        self.pial_band = ndimage.binary_dilation(boundary) & (csf | cortex)
        self.pial_starts = np.flatnonzero(boundary)

    def _start(self, rng: np.random.Generator, starts: np.ndarray) -> np.ndarray:
        return np.array(np.unravel_index(int(rng.choice(starts)), tuple(self.shape)),
                        dtype=np.float64)

    def _inside(self, q: np.ndarray, mask: np.ndarray) -> bool:
        iq = np.rint(q).astype(int)
        return bool(np.all(iq >= 0) and np.all(iq < self.shape) and mask[tuple(iq)])

    def medullary(self, rng: np.random.Generator,
                  length_mm: tuple[float, float] = (12.0, 35.0)) -> np.ndarray | None:
        """``(M, 3)`` world points of a medullary vein (1 mm steps), or None."""
        if self.medullary_starts.size == 0:
            return None
        pts = [self._start(rng, self.medullary_starts)]
        direction = None
        for _ in range(int(rng.uniform(*length_mm))):
            p = pts[-1]
            g = self.ventricle_grad[tuple(np.clip(np.rint(p).astype(int), 0, self.shape - 1))]
            g = g.astype(np.float64)
            norm = np.linalg.norm(g)
            g = (g / norm if norm > 1e-6 else rng.standard_normal(3)) + 0.15 * rng.standard_normal(3)
            g /= np.linalg.norm(g)
            direction = g if direction is None else 0.6 * direction + 0.4 * g
            direction /= np.linalg.norm(direction)
            q = p + direction / self.sp
            if not self._inside(q, self.wm):
                break
            pts.append(q)
        return voxel_to_world(self.affine, np.array(pts)) if len(pts) >= 4 else None

    def cortical(self, rng: np.random.Generator,
                 length_mm: tuple[float, float] = (10.0, 30.0)) -> np.ndarray | None:
        """``(M, 3)`` world points of a pial vein along the cortex/CSF interface, or None."""
        if self.pial_starts.size == 0:
            return None
        pts = [self._start(rng, self.pial_starts)]
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        for _ in range(int(rng.uniform(*length_mm))):
            p = pts[-1]
            for _try in range(6):  # smooth random walk that stays on the cortex/CSF interface
                d = direction + 0.35 * rng.standard_normal(3)
                d /= np.linalg.norm(d)
                q = p + d / self.sp
                if self._inside(q, self.pial_band):
                    direction = d
                    break
            else:
                break
            pts.append(q)
        return voxel_to_world(self.affine, np.array(pts)) if len(pts) >= 4 else None

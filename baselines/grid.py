"""Working voxel grids of the deep baselines: keep the native grid when it is close to the
method's reference grid, resample otherwise.

Published CMB detectors work on the voxel grid of the data they were developed on (Dou et al.
2016: 0.45 x 0.45 x 1.0 mm SWI, 2 mm slices). cmbbench datasets mix resolutions, so the deep
baselines use one documented rule (:class:`GridRule`):

- each array axis is considered on its own: when its native spacing ``s`` lies within a factor
  ``tolerance`` of the reference spacing ``g`` of that axis (``g / tolerance <= s <= g *
  tolerance``) the axis is kept **native** (no interpolation, as in the originals);
- otherwise the axis is **resampled** to ``round(n s / g)`` voxels (at least 2), first and last
  voxel centres aligned (so the actual spacing is ``s (n - 1) / (n' - 1)``, within half a voxel
  of ``g`` over the field of view). Images are interpolated linearly; an axis that is
  downsampled is first smoothed with a Gaussian of ``0.5 sqrt(r^2 - 1)`` native voxels
  (``r = g / s``) against aliasing.

Conventions: arrays are indexed ``[i, j, k]`` as stored (never reoriented); the reference grid's
third entry applies to array axis 2, which cmbbench's baselines treat as the slice axis (as the
per-slice FRST does). Coordinates are 0-based voxel indices; a working-grid index ``w`` maps to
the native index ``w (n - 1) / (n' - 1)`` on a resampled axis and to itself on a native one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["GridRule", "WorkGrid"]


@dataclass(frozen=True)
class GridRule:
    """Reference grid of a method and the tolerance within which a scan stays native.

    Attributes
    ----------
    grid_mm
        Reference voxel spacing (mm) along array axes ``i, j, k`` (``k`` = slice axis).
    tolerance
        An axis whose spacing is within this factor of the reference stays native (>= 1;
        1 resamples every axis that is not exactly on the reference grid).
    """

    grid_mm: tuple[float, float, float] = (0.9, 0.9, 2.0)
    tolerance: float = 1.25

    def __post_init__(self) -> None:
        if len(self.grid_mm) != 3 or min(self.grid_mm) <= 0:
            raise ValueError(f"grid_mm must be 3 positive spacings (mm), got {self.grid_mm}")
        if self.tolerance < 1:
            raise ValueError(f"tolerance must be >= 1, got {self.tolerance}")

    def describe(self) -> str:
        g = " x ".join(f"{v:g}" for v in self.grid_mm)
        return (f"native grid on every axis whose spacing is within a factor {self.tolerance:g} "
                f"of {g} mm (i x j x k, k = slice axis), otherwise that axis is resampled to it")


@dataclass(frozen=True)
class WorkGrid:
    """The working grid of one scan and the mapping between it and the native grid.

    Attributes
    ----------
    native_shape, work_shape
        Array shapes (voxels).
    native_spacing
        Native voxel spacing (mm) along ``i, j, k``.
    resampled
        Per axis, whether it is resampled.
    """

    native_shape: tuple[int, int, int]
    work_shape: tuple[int, int, int]
    native_spacing: tuple[float, float, float]
    resampled: tuple[bool, bool, bool]

    @classmethod
    def for_scan(cls, shape: Sequence[int], spacing_mm: Sequence[float],
                 rule: GridRule) -> WorkGrid:
        """The working grid of a scan of ``shape`` voxels and ``spacing_mm`` (mm) under ``rule``."""
        shape = tuple(int(n) for n in shape)
        sp = np.asarray(spacing_mm, dtype=np.float64)
        if len(shape) != 3 or sp.shape != (3,):
            raise ValueError(f"expected a 3D shape and 3 spacings, got {shape}, {sp}")
        g = np.asarray(rule.grid_mm, dtype=np.float64)
        ratio = sp / g
        native = (ratio >= 1.0 / rule.tolerance - 1e-9) & (ratio <= rule.tolerance + 1e-9)
        work = tuple(n if nat or n < 2 else max(2, int(np.rint(n * s / gg)))
                     for n, s, gg, nat in zip(shape, sp, g, native))
        resampled = tuple(bool(w != n) for w, n in zip(work, shape))
        return cls(shape, work, tuple(float(v) for v in sp), resampled)

    @property
    def scale(self) -> np.ndarray:
        """Native voxels per working voxel along each axis (1 on native axes)."""
        return np.array([(n - 1) / (w - 1) if r else 1.0 for n, w, r in
                         zip(self.native_shape, self.work_shape, self.resampled)])

    @property
    def work_spacing(self) -> np.ndarray:
        """Voxel spacing (mm) of the working grid."""
        return np.asarray(self.native_spacing) * self.scale

    @property
    def is_native(self) -> bool:
        return not any(self.resampled)

    def to_work(self, image: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Native array -> working grid (float32; ``order`` 0 for labels, no smoothing then)."""
        arr = np.asarray(image)
        if tuple(arr.shape) != self.native_shape:
            raise ValueError(f"array shape {arr.shape} is not the native {self.native_shape}")
        if self.is_native:
            return arr.astype(np.float32, copy=False) if order else arr
        out = arr.astype(np.float32) if order else arr
        if order:
            r = 1.0 / self.scale  # working voxels per native voxel (< 1: downsampling)
            sigma = [0.5 * np.sqrt(max(1.0 / f ** 2 - 1.0, 0.0)) if f < 1 else 0.0 for f in r]
            if max(sigma) > 0:
                out = ndimage.gaussian_filter(out, sigma=sigma, mode="nearest")
        return _zoom_to(out, self.work_shape, order)

    def to_native(self, arr: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Working-grid array -> native grid (the inverse correspondence of :meth:`to_work`)."""
        arr = np.asarray(arr)
        if tuple(arr.shape) != self.work_shape:
            raise ValueError(f"array shape {arr.shape} is not the working {self.work_shape}")
        if self.is_native:
            return arr
        return _zoom_to(arr, self.native_shape, order)

    def work_to_native(self, ijk: np.ndarray) -> np.ndarray:
        """Working-grid voxel coordinates ``(N, 3)`` -> native voxel coordinates (float)."""
        return np.atleast_2d(np.asarray(ijk, dtype=np.float64)) * self.scale

    def native_to_work(self, ijk: np.ndarray) -> np.ndarray:
        """Native voxel coordinates ``(N, 3)`` -> working-grid voxel coordinates (float)."""
        return np.atleast_2d(np.asarray(ijk, dtype=np.float64)) / self.scale


def _zoom_to(arr: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample ``arr`` to ``shape`` with corner voxel centres aligned (``grid_mode=False``)."""
    if tuple(arr.shape) == tuple(shape):
        return arr
    factors = [t / s for t, s in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, factors, order=order, mode="nearest", grid_mode=False,
                       prefilter=False)
    if tuple(out.shape) != tuple(shape):  # scipy rounds the output shape itself
        pad = [(0, max(t - o, 0)) for t, o in zip(shape, out.shape)]
        out = np.pad(out, pad, mode="edge")[tuple(slice(0, t) for t in shape)]
    return out

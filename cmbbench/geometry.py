"""Coordinate conventions and conversions.

Conventions used throughout cmbbench
------------------------------------
- *Voxel* coordinates ``(i, j, k)`` are **0-based** array indices into the NIfTI data array as
  loaded by nibabel (``data[i, j, k]``); the centre of voxel ``(0, 0, 0)`` is at index 0.0.
- *World* coordinates ``(x, y, z)`` are in **millimetres, RAS+** (x grows to the subject's Right,
  y Anterior, z Superior), obtained through the image affine: ``world = A @ [i, j, k, 1]``.
  nibabel always returns the affine in RAS+, whatever the on-disk orientation (LPS, LAS, ...).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

__all__ = [
    "affines_match",
    "orientation_code",
    "voxel_sizes",
    "voxel_to_world",
    "world_to_voxel",
]


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map 0-based voxel coordinates to world coordinates.

    Parameters
    ----------
    affine
        4x4 voxel-to-world (RAS+ mm) matrix.
    ijk
        ``(N, 3)`` or ``(3,)`` array of 0-based voxel coordinates (may be fractional).

    Returns
    -------
    numpy.ndarray
        World coordinates in mm (RAS+), same leading shape as ``ijk``.
    """
    ijk = np.asarray(ijk, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map world coordinates (RAS+ mm) to fractional 0-based voxel coordinates.

    Parameters
    ----------
    affine
        4x4 voxel-to-world matrix.
    xyz
        ``(N, 3)`` or ``(3,)`` array of world coordinates in mm.

    Returns
    -------
    numpy.ndarray
        Fractional 0-based voxel coordinates; round to get the containing voxel.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm along the three array axes (column norms of the affine)."""
    a = np.asarray(affine, dtype=np.float64)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def orientation_code(affine: np.ndarray) -> str:
    """Three-letter axis code of the array axes, e.g. ``"RAS"`` or ``"LPS"``.

    The letter names the direction in which each array index *increases*.
    """
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def affines_match(a: np.ndarray, b: np.ndarray, *, atol_mm: float = 1e-3) -> bool:
    """Whether two affines describe the same grid within ``atol_mm`` (mm, per matrix entry).

    Rotation/scale entries are compared with a relative tolerance of ``atol_mm`` per mm of voxel
    size, the translation with ``atol_mm`` absolute: NIfTI headers stored as float32 differ from
    their float64 originals by about 1e-5 mm.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return bool(np.allclose(a[:3, :4], b[:3, :4], rtol=0.0, atol=atol_mm))

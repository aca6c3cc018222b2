"""The data model: scans, reference lesions and predicted candidates.

Records are dataclasses; collections of them travel as :class:`pandas.DataFrame` tables whose
columns are the dataclass fields (``LESION_COLUMNS``, ``SCAN_COLUMNS``, ``CANDIDATE_COLUMNS``).

Coordinates: every lesion and candidate carries both its world centroid ``x_mm, y_mm, z_mm``
(RAS+ mm through the image affine) and its 0-based voxel centroid ``i, j, k`` (fractional).
See :mod:`cmbbench.geometry`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np
import pandas as pd

Sequence = Literal["SWI", "T2S", "unknown"]
Location = Literal["lobar", "deep", "infratentorial", "unknown"]
MaskSource = Literal["rater", "derived", "none"]

LOCATIONS: tuple[str, ...] = ("lobar", "deep", "infratentorial", "unknown")
MASK_SOURCES: tuple[str, ...] = ("rater", "derived", "none")


@dataclass
class ScanInfo:
    """One scan of a harmonized dataset (a row of ``scans.csv``).

    Attributes
    ----------
    voxel_mm_x, voxel_mm_y, voxel_mm_z
        Voxel edge lengths in mm along the array axes i, j, k.
    slice_thickness_mm
        Acquired slice thickness in mm (may exceed ``voxel_mm_z`` for 2D acquisitions with gaps).
    shape
        Array shape as ``"NIxNJxNK"`` (voxels).
    """

    scan_id: str
    subject_id: str = ""
    split: str = "test"
    sequence: str = "unknown"
    field_strength_t: float = float("nan")
    te_ms: float = float("nan")
    voxel_mm_x: float = float("nan")
    voxel_mm_y: float = float("nan")
    voxel_mm_z: float = float("nan")
    slice_thickness_mm: float = float("nan")
    shape: str = ""
    n_cmb: int = 0
    site: str = ""
    vendor: str = ""


@dataclass
class Lesion:
    """One reference CMB (a row of ``lesions.csv``).

    Attributes
    ----------
    lesion_id
        Positive integer, unique within the scan; equals the value of the lesion in the instance
        label map ``labels/<scan_id>.nii.gz`` when a mask exists.
    x_mm, y_mm, z_mm
        Centroid in world coordinates (RAS+ mm).
    i, j, k
        Centroid in 0-based voxel coordinates (fractional).
    diameter_mm
        Apparent diameter in mm: the equivalent-sphere diameter of the mask when there is one.
    volume_mm3
        Mask volume in mm^3 (NaN without a mask).
    location
        MARS class: lobar, deep, infratentorial, or unknown.
    mask_source
        ``rater`` (drawn by a rater), ``derived`` (grown from a point by cmbbench) or ``none``.
    """

    scan_id: str
    lesion_id: int
    x_mm: float
    y_mm: float
    z_mm: float
    i: float
    j: float
    k: float
    diameter_mm: float = float("nan")
    volume_mm3: float = float("nan")
    n_voxels: int = 0
    location: str = "unknown"
    mask_source: str = "none"


@dataclass
class Candidate:
    """One predicted CMB candidate of a method, in the scan's grid.

    Attributes
    ----------
    candidate_id
        Positive integer, unique within the scan; equals the value of the candidate in the
        candidate label map when the candidate has voxels.
    score
        Confidence in [0, 1] (the peak probability of a probability-map component, 1.0 for a
        binary/instance mask component).
    n_voxels
        Number of voxels of the candidate (0 for a point candidate without extent).
    """

    scan_id: str
    candidate_id: int
    x_mm: float
    y_mm: float
    z_mm: float
    i: float
    j: float
    k: float
    score: float = 1.0
    volume_mm3: float = float("nan")
    n_voxels: int = 0


SCAN_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ScanInfo))
LESION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Lesion))
CANDIDATE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Candidate))


def records_to_frame(records: Iterable[object], columns: tuple[str, ...]) -> pd.DataFrame:
    """Turn dataclass records into a table with exactly ``columns`` (empty table when none)."""
    rows = [asdict(r) for r in records]  # type: ignore[call-overload]
    return pd.DataFrame(rows, columns=list(columns))


def equivalent_diameter_mm(volume_mm3: np.ndarray | float) -> np.ndarray | float:
    """Diameter (mm) of the sphere with the given volume (mm^3): ``(6 V / pi) ** (1/3)``."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)

"""MARS location (lobar / deep / infratentorial) of each lesion from the atlas registered to
its scan.

:func:`locate_lesions` registers the bundled atlas to the scan
(:func:`cmbbench.registration.register_atlas`), maps each lesion centroid (world RAS+ mm) into
the atlas and reads the MARS class of :func:`cmbbench.synth.anatomy.mars_map` there (the same
label-to-class mapping the synthetic generator uses). A centroid that lands on a voxel without
a class (CSF, ventricle, vessel, background: a registration error of a millimetre or two at the
cortex or a ventricle) takes the class of the nearest classified atlas voxel within
:data:`SNAP_MM`. A lesion gets ``unknown``, with the reason, when

- the registration is not accepted (Dice under the threshold, implausible scale, image without
  a usable foreground; :attr:`cmbbench.registration.AtlasRegistration.reason`), or
- its centroid maps outside the atlas grid, or farther than :data:`SNAP_MM` from any
  classified atlas voxel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..geometry import voxel_sizes
from ..registration import AtlasRegistration, RegistrationConfig, register_atlas
from ..synth import anatomy

__all__ = [
    "LOCATION_SOURCE_ATLAS",
    "SNAP_MM",
    "ScanLocations",
    "locate_lesions",
    "location_method",
    "mars_at",
]

log = logging.getLogger(__name__)

#: Largest distance (mm, atlas space) from a lesion centroid to the nearest atlas voxel with a
#: MARS class for that class to be taken.
SNAP_MM = 3.0

#: ``scans.csv`` ``location_source`` of scans whose lesions were located by registration.
LOCATION_SOURCE_ATLAS = "atlas-registration"


@dataclass
class ScanLocations:
    """Locations of one scan's lesions.

    Attributes
    ----------
    locations
        MARS class per lesion (``lobar``, ``deep``, ``infratentorial`` or ``unknown``), in the
        order of the lesion table given to :func:`locate_lesions`.
    reasons
        ``lesion_id -> reason`` for every ``unknown`` lesion.
    registration
        The registration (None when the scan has no lesions and was not registered).
    source
        :data:`LOCATION_SOURCE_ATLAS`, ``"no lesions"``, or ``"unknown: <reason>"`` when the
        registration was not accepted.
    """

    locations: list[str] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    registration: AtlasRegistration | None = None
    source: str = "no lesions"


def mars_at(atlas: anatomy.Atlas, atlas_vox: np.ndarray,
            snap_mm: float = SNAP_MM) -> tuple[list[str], list[str | None]]:
    """MARS class at fractional 0-based atlas voxel coordinates ``(N, 3)``.

    Returns
    -------
    classes, reasons
        Per point, ``lobar``/``deep``/``infratentorial`` or ``unknown``; the reason (None when
        known).
    """
    mars = np.asarray(atlas.mars)
    shape = np.asarray(mars.shape)
    sp = voxel_sizes(atlas.affine)
    r = np.ceil(snap_mm / sp).astype(int)
    classes: list[str] = []
    reasons: list[str | None] = []
    for v in np.atleast_2d(np.asarray(atlas_vox, dtype=np.float64)).reshape(-1, 3):
        c = np.rint(v).astype(int)
        if not np.all(np.isfinite(v)) or np.any(c < -r) or np.any(c >= shape + r):
            classes.append("unknown")
            reasons.append("centroid maps outside the registered atlas")
            continue
        if np.all((c >= 0) & (c < shape)) and mars[tuple(c)] > 0:
            classes.append(anatomy.MARS_CLASSES[int(mars[tuple(c)])])
            reasons.append(None)
            continue
        lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, shape)
        sub = mars[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        g = np.meshgrid(*[(np.arange(a, b) - x) * s for a, b, x, s in zip(lo, hi, v, sp)],
                        indexing="ij")
        d = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
        d = np.where((sub > 0) & (d <= snap_mm), d, np.inf)
        if not np.isfinite(d).any():
            classes.append("unknown")
            reasons.append(f"centroid is more than {snap_mm:g} mm from brain tissue with a MARS "
                           f"class in the registered atlas")
            continue
        classes.append(anatomy.MARS_CLASSES[int(sub.flat[int(np.argmin(d))])])
        reasons.append(None)
    return classes, reasons


def locate_lesions(image: np.ndarray, affine: np.ndarray, lesions: pd.DataFrame, *,
                   atlas: anatomy.Atlas | None = None,
                   config: RegistrationConfig | None = None,
                   snap_mm: float = SNAP_MM) -> ScanLocations:
    """MARS location of each lesion of one scan (see the module docstring).

    Parameters
    ----------
    image, affine
        The scan (indexed ``[i, j, k]``) and its 4x4 voxel-to-world matrix (RAS+ mm).
    lesions
        The scan's lesion table (``lesion_id``, ``x_mm``, ``y_mm``, ``z_mm``: world RAS+ mm).
    atlas, config
        Atlas and registration settings (defaults: the bundled atlas,
        :class:`~cmbbench.registration.RegistrationConfig`).
    snap_mm
        See :data:`SNAP_MM`.

    Returns
    -------
    ScanLocations
        Never raises for an image that cannot be registered: its lesions are ``unknown``.
    """
    out = ScanLocations()
    if not len(lesions):
        return out
    atlas = atlas or anatomy.load_atlas()
    reg = register_atlas(image, affine, atlas=atlas, config=config)
    out.registration = reg
    ids = [int(v) for v in lesions["lesion_id"]]
    if not reg.ok:
        out.source = f"unknown: {reg.reason}"
        out.locations = ["unknown"] * len(ids)
        out.reasons = {i: f"atlas registration not accepted: {reg.reason}" for i in ids}
        return out
    xyz = lesions[["x_mm", "y_mm", "z_mm"]].to_numpy(dtype=np.float64)
    classes, reasons = mars_at(atlas, reg.atlas_voxels(xyz), snap_mm)
    out.source = LOCATION_SOURCE_ATLAS
    out.locations = classes
    out.reasons = {i: r for i, r in zip(ids, reasons) if r is not None}
    return out


def location_method(config: RegistrationConfig | None = None,
                    atlas: anatomy.Atlas | None = None, snap_mm: float = SNAP_MM) -> dict:
    """JSON-able description of how locations are derived (recorded in ``dataset.json``)."""
    cfg = config or RegistrationConfig()
    atlas = atlas or anatomy.load_atlas()
    return {"method": "MARS class of the atlas registered to each scan",
            "registration": cfg.describe(), "atlas": atlas.source, "snap_mm": snap_mm,
            "mars_rule": "cmbbench.synth.anatomy.mars_map (deep: caudate, putamen, pallidum, "
                         "accumbens, thalamus, ventral DC, corpus callosum, optic chiasm, "
                         "cerebral WM > 10 mm from cortex or within 5 mm of the lateral "
                         "ventricles; infratentorial: brainstem, cerebellum; lobar: cortex, "
                         "hippocampus, amygdala, the remaining juxtacortical WM)"}

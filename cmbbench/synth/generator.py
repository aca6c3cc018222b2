"""Assemble synthetic scans: anatomy + acquisition + CMBs + mimics + noise, and write datasets.

One scan (:func:`generate_scan`) is a pure function of ``(recipe, index)``: the RNG is
``numpy.random.default_rng([recipe.seed, index])``, so on one machine the same recipe gives
byte-identical files and scans can be generated in any order, in parallel, or resumed. Across
machines, BLAS kernels chosen by processor (OpenBLAS SkylakeX vs Haswell) and numpy/scipy versions
change the last bits of the anatomy's coordinates, which can move a discrete draw and with it the
rest of a scan's random stream: label maps have come out identical, images not (docs/synthetic.md,
Limits). :meth:`cmbbench.dataset.HarmonizedDataset.content_sha256` names the copy a run used.

Pipeline of a scan
------------------
1. Acquisition drawn from the recipe's protocols (sequence, B0, TE/TR/flip, voxel size, slice
   thickness and gap, SNR, on-disk orientation, B0 tilt).
2. Anatomy: the bundled atlas deformed at random (affine + smooth non-linear) and resampled onto
   the target grid at sub-slice positions across the slice thickness (partial volume).
3. Background complex signal: spoiled-GRE magnitude from per-tissue PD/T1/R2* drawn per subject,
   real-anatomy texture from the MNI T1, a bias field, and a phase from the tissue susceptibility
   (dipole convolution) plus a smooth background field; averaged (complex) over the sub-slices.
4. CMBs: count (power law), MARS class, target apparent diameter at 3 T/20 ms -> core Δχ; each
   is a paramagnetic sphere whose voxel-averaged complex factor (intravoxel dephasing) is
   multiplied into the image. Its ground-truth mask is its apparent extent: the voxels where the
   factor's magnitude drops by >= 30 %.
5. Mimics with class labels: medullary and cortical veins (tubes, χ +0.35..0.6 ppm),
   calcifications (diamagnetic spheres) in the pallidum and choroid plexus, deep-nuclei iron
   (the pallidum's χ/R2*, recorded as regions), flow voids (2D T2* only).
6. Complex Gaussian noise (Rician magnitude), then T2* magnitude or SWI (phase mask), scaled so
   white matter is about 1000, stored as int16.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from threadpoolctl import threadpool_limits

from ..errors import ConfigurationError
from ..geometry import voxel_sizes
from ..harmonize import lesions_from_labels
from ..model import LESION_COLUMNS
from . import anatomy, physics, placement
from .recipe import PROTOCOLS, Protocol, SynthRecipe

__all__ = [
    "CALIBRATION_PHI_C",
    "DRAW_THRESHOLD",
    "GENERATOR_VERSION",
    "MIMIC_CLASSES",
    "REFERENCE_B0_T",
    "REFERENCE_TE_MS",
    "Acquisition",
    "GeneratedScan",
    "generate_scan",
    "label_from_factor",
    "sample_acquisition",
]

log = logging.getLogger(__name__)

#: Bumped whenever the same recipe would give different data.
GENERATOR_VERSION = "1"

#: Relative signal drop that defines the apparent (ground-truth) extent of a CMB or mimic.
DRAW_THRESHOLD = 0.3

MIMIC_CLASSES: tuple[str, ...] = ("medullary_vein", "cortical_vein", "calcification_pallidum",
                                  "calcification_choroid_plexus", "deep_iron", "flow_void")

#: Reference protocol (3 T, TE 20 ms) at which target apparent CMB diameters are drawn.
REFERENCE_B0_T = 3.0
REFERENCE_TE_MS = 20.0

#: Phase threshold (rad) of the blooming law used to turn a target apparent diameter into a core
#: susceptibility. The law's "dark" (|phase| > phi_c) is not the ground truth's "signal drop
#: >= 30 % after voxel averaging"; PHI_C is set so that CMBs drawn for a median of 2.7 mm at the
#: reference protocol measure about 2.7 mm on 3 T SWI (see docs/synthetic.md for the check).
CALIBRATION_PHI_C = 2.6


@dataclass(frozen=True)
class Acquisition:
    """Acquisition parameters of one synthetic scan.

    ``voxel_mm`` are the array-axis spacings (mm); axis 2 is the slice axis with spacing
    ``slice_thickness_mm + gap_mm``. ``affine`` maps 0-based voxels to RAS+ mm; ``b0_dir`` is
    the unit B0 direction in world coordinates.
    """

    protocol: str
    sequence: str
    b0_t: float
    te_ms: float
    tr_ms: float
    flip_deg: float
    voxel_mm: tuple[float, float, float]
    slice_thickness_mm: float
    gap_mm: float
    snr: float
    orientation: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    b0_dir: np.ndarray


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(lo if hi <= lo else rng.uniform(lo, hi))


def _orientation_matrix(code: str) -> np.ndarray:
    """3x3 matrix whose column n is the world unit vector of array axis n for ``code``."""
    vec = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
           "S": (0, 0, 1), "I": (0, 0, -1)}
    return np.array([vec[c] for c in code], dtype=np.float64).T


def _brain_box_world(atlas: anatomy.Atlas) -> tuple[np.ndarray, np.ndarray]:
    """World-space bounding box (min, max) of the atlas brain, mm."""
    idx = np.argwhere(atlas.labels > 0)
    corners = np.array([idx.min(axis=0), idx.max(axis=0)], dtype=np.float64)
    world = corners @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def sample_acquisition(rng: np.random.Generator, recipe: SynthRecipe, index: int,
                       atlas: anatomy.Atlas, *, overrides: dict | None = None) -> Acquisition:
    """Draw the acquisition of scan ``index`` (protocol round-robin if the recipe is balanced).

    Every random value is drawn first, in a fixed order, and ``overrides`` (``protocol``,
    ``te_ms``, ``inplane_mm``, ``slice_thickness_mm``, ``gap_mm``, ``snr``, ``orientation``) are
    applied afterwards, so overriding one parameter leaves the rest of the scan (anatomy, CMB
    positions) unchanged: this is how the documentation figures compare SWI with T2* or
    1 mm with 5 mm slices on the same subject.
    """
    names = sorted(recipe.protocols)
    weights = np.array([recipe.protocols[n] for n in names], dtype=np.float64)
    u = rng.random(12)  # every draw of the acquisition, in a fixed order

    def pick(lo_hi: tuple[float, float], x: float) -> float:
        return float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * x)

    if recipe.balanced_protocols:
        active = [n for n, w in zip(names, weights) if w > 0]
        name = active[index % len(active)]
    else:
        cdf = np.cumsum(weights / weights.sum())
        name = names[min(int(np.searchsorted(cdf, u[0], side="right")), len(names) - 1)]
    ov = dict(overrides or {})
    name = ov.get("protocol", name)
    if name not in PROTOCOLS:
        raise ConfigurationError(f"unknown protocol {name!r}")
    p: Protocol = PROTOCOLS[name]
    inplane = float(ov.get("inplane_mm", pick(recipe.inplane_mm, u[1])))
    thickness = float(ov.get("slice_thickness_mm", pick(p.slice_mm, u[2])))
    gap = float(ov.get("gap_mm", pick(p.gap_mm, u[3])))
    orientations = list(recipe.orientations)
    orientation = str(ov.get("orientation", orientations[min(int(u[4] * len(orientations)),
                                                             len(orientations) - 1)]))
    fov = pick(recipe.fov_mm, u[5])
    centre_shift = (u[6:9] * 2.0 - 1.0) * 4.0
    tilt = math.radians(u[9] * recipe.b0_tilt_deg)
    azimuth = u[10] * 2.0 * math.pi
    extra = rng.random(4)
    te = float(ov.get("te_ms", pick(p.te_ms, extra[0])))
    tr = pick(p.tr_ms, extra[1])
    flip = pick(p.flip_deg, extra[2])
    snr = float(ov.get("snr", pick(p.snr, extra[3])))

    spacing = (inplane, inplane, thickness + gap)
    n_inplane = int(round(fov / inplane))
    lo, hi = _brain_box_world(atlas)
    coverage = (hi[2] - lo[2] + 12.0) if recipe.slab_mm is None else recipe.slab_mm
    n_slices = max(1, int(math.ceil(coverage / spacing[2])))
    shape = (n_inplane, n_inplane, n_slices)
    affine = np.eye(4)
    affine[:3, :3] = _orientation_matrix(orientation) * np.array(spacing)[None, :]
    centre = (lo + hi) / 2.0 + centre_shift
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    b0_dir = np.array([math.sin(tilt) * math.cos(azimuth), math.sin(tilt) * math.sin(azimuth),
                       math.cos(tilt)])
    return Acquisition(
        protocol=name, sequence=p.sequence, b0_t=p.b0_t, te_ms=te, tr_ms=tr, flip_deg=flip,
        voxel_mm=spacing, slice_thickness_mm=thickness, gap_mm=gap, snr=snr,
        orientation=orientation, shape=shape, affine=affine, b0_dir=b0_dir)


@dataclass
class GeneratedScan:
    """One generated scan, ready to be written in the harmonized layout."""

    scan_id: str
    image: np.ndarray          # int16 magnitude (T2*) or SWI
    affine: np.ndarray
    labels: np.ndarray         # uint16 CMB instance map (apparent extent)
    mimic_labels: np.ndarray   # uint16 mimic instance map
    lesions: pd.DataFrame
    mimics: pd.DataFrame
    info: dict                 # scans.csv row


def _sub_slice_offsets(thickness_mm: float) -> tuple[float, ...]:
    """Positions (mm, along the slice axis) of ~1 mm sub-slices spanning the slice profile."""
    n = max(1, int(math.ceil(thickness_mm / 1.0)))
    return tuple(float(v) for v in ((np.arange(n) + 0.5) / n - 0.5) * thickness_mm)


def _background(rng: np.random.Generator, acq: Acquisition, subject: anatomy.SubjectGrid,
                props: dict[str, anatomy.TissueProperties]) -> tuple[np.ndarray, np.ndarray]:
    """Complex background image (sub-slice average) and the mean tissue map's WM mask."""
    tissue = np.asarray(subject.labels)
    t1img = np.asarray(subject.t1, dtype=np.float32)
    if tissue.ndim == 3:
        tissue, t1img = tissue[None], t1img[None]
    n_sub = tissue.shape[0]
    spacing = np.asarray(acq.voxel_mm)
    shape = acq.shape
    bias = np.exp(anatomy.smooth_random_field(rng, shape, spacing, correlation_mm=60.0,
                                              std=_uniform(rng, (0.1, 0.3))))
    # smooth background field (shim residuals, air-tissue), ppm
    bg_ppm = anatomy.smooth_random_field(rng, shape, spacing, correlation_mm=40.0,
                                         std=_uniform(rng, (0.02, 0.08)))
    chi_mean = np.zeros(shape, dtype=np.float32)
    signal = np.zeros(shape, dtype=np.complex64)
    inv = np.linalg.inv(acq.affine[:3, :3])
    b0_vox = inv @ acq.b0_dir
    b0_vox_mm = b0_vox * spacing
    b0_vox_mm /= np.linalg.norm(b0_vox_mm)
    names = anatomy.TISSUES
    n_t = len(names)
    m_lut = np.zeros(n_t, dtype=np.float32)
    chi_lut = np.zeros(n_t, dtype=np.float32)
    for t, name in enumerate(names):
        pr = props.get(name)
        if pr is None or name == "background":
            continue
        m_lut[t] = float(physics.gre_steady_state(pr.pd, pr.t1_ms, pr.r2s_per_s, acq.te_ms,
                                                  acq.tr_ms, acq.flip_deg))
        chi_lut[t] = pr.chi_ppm
    magnitudes = []
    for s in range(n_sub):
        tis = tissue[s]
        # real-anatomy texture: the MNI T1 relative to its mean within each tissue class
        sums = np.bincount(tis.ravel(), weights=t1img[s].ravel(), minlength=n_t)
        counts = np.bincount(tis.ravel(), minlength=n_t)
        mean_lut = (sums / np.maximum(counts, 1)).astype(np.float32)
        mean_lut[mean_lut <= 0] = 1.0
        texture = np.clip(t1img[s] / mean_lut[tis], 0.8, 1.2)
        texture[tis == 0] = 1.0
        magnitudes.append(m_lut[tis] * np.sqrt(texture))
        chi_mean += chi_lut[tis] / n_sub
    # tissue susceptibility field on a coarse (about 2 mm) grid, then back to the target grid
    factor = np.maximum(1, np.floor(3.0 / spacing)).astype(int)
    coarse = ndimage.zoom(chi_mean, 1.0 / factor, order=1)
    coarse_spacing = spacing * np.array(chi_mean.shape) / np.array(coarse.shape)
    db_coarse = physics.dipole_field_fft(coarse, coarse_spacing, b0_vox_mm, acq.b0_t,
                                         pad_factor=1.5)
    db = ndimage.zoom(db_coarse, np.array(shape) / np.array(db_coarse.shape), order=1)
    db = db[: shape[0], : shape[1], : shape[2]]
    if db.shape != shape:
        db = np.pad(db, [(0, shape[n] - db.shape[n]) for n in range(3)], mode="edge")
    phase = physics.PHASE_SIGN * physics.GAMMA * (db + bg_ppm * 1e-6 * acq.b0_t) * acq.te_ms * 1e-3
    rot = np.exp(1j * phase).astype(np.complex64)
    for mag in magnitudes:
        signal += (mag * bias).astype(np.complex64) * rot / n_sub
    return signal, tissue


def label_from_factor(factor: np.ndarray) -> np.ndarray:
    """Apparent extent: voxels whose signal drops by >= DRAW_THRESHOLD, connected to the minimum."""
    mag = np.abs(factor)
    dark = mag <= 1.0 - DRAW_THRESHOLD
    if not dark.any():
        return dark
    lab, _ = ndimage.label(dark, structure=np.ones((3, 3, 3), dtype=bool))
    return lab == lab[np.unravel_index(int(np.argmin(mag)), mag.shape)]


def generate_scan(recipe: SynthRecipe, index: int, *, atlas: anatomy.Atlas | None = None,
                  overrides: dict | None = None) -> GeneratedScan:
    """Generate scan ``index`` of ``recipe`` (deterministic in ``(recipe.seed, index)``).

    ``overrides`` replace acquisition parameters (see :func:`sample_acquisition`) without
    changing the subject; ``n_cmb`` in it forces the number of CMBs (benchmarks, figures).
    """
    # BLAS results depend in the last bits on the thread count, and nearest-neighbour label
    # sampling can flip on such bits: one thread makes scans byte-identical on one machine. The
    # kernels OpenBLAS picks per processor still differ in those bits (docs/synthetic.md, Limits).
    with threadpool_limits(limits=1):
        return _generate_scan(recipe, index, atlas=atlas, overrides=overrides)


def _generate_scan(recipe: SynthRecipe, index: int, *, atlas: anatomy.Atlas | None,
                   overrides: dict | None) -> GeneratedScan:
    atlas = atlas or anatomy.load_atlas()
    rng = np.random.default_rng([int(recipe.seed), int(index)])
    scan_id = f"{recipe.name}-{index:04d}"
    acq = sample_acquisition(rng, recipe, index, atlas, overrides=overrides)
    deformation = anatomy.random_deformation(rng, atlas)
    subject = anatomy.sample_subject(atlas, deformation, acq.affine, acq.shape,
                                     z_offsets_mm=_sub_slice_offsets(acq.slice_thickness_mm))
    props = anatomy.sample_tissue_properties(rng, acq.b0_t)
    signal, tissue_subs = _background(rng, acq, subject, props)
    centre_sub = tissue_subs.shape[0] // 2
    tissue = tissue_subs[centre_sub]
    mars = np.asarray(subject.mars)
    mars = mars[centre_sub] if mars.ndim == 4 else mars
    names = anatomy.TISSUES
    tid = {n: names.index(n) for n in names}
    spacing = voxel_sizes(acq.affine)
    brain = tissue > 0
    depth = placement.coarse_distance(~brain, spacing, target_mm=2.0)
    parenchyma = ~np.isin(tissue, [tid["background"], tid["csf"], tid["ventricle"],
                                   tid["choroid_plexus"], tid["vessel"]]) & (depth > 2.0)

    labels = np.zeros(acq.shape, dtype=np.uint16)
    mimic_labels = np.zeros(acq.shape, dtype=np.uint16)

    def insert(source: physics.SphereSource | physics.TubeSource, samples_per_mm: float = 5.0):
        sl, factor = physics.voxel_factor(source, acq.affine, acq.shape, acq.b0_dir, acq.b0_t,
                                          acq.te_ms, slice_thickness_mm=acq.slice_thickness_mm,
                                          samples_per_mm=samples_per_mm)
        return sl, factor

    # ---- CMBs -----------------------------------------------------------------------------
    positive = bool(rng.random() < recipe.positive_fraction)
    n_cmb = placement.sample_cmb_count(rng, recipe.count_exponent,
                                       recipe.max_cmbs_per_scan) if positive else 0
    if overrides and "n_cmb" in overrides:
        n_cmb = int(overrides["n_cmb"])
    loc_names = ["lobar", "deep", "infratentorial"]
    loc_w = np.array([recipe.location_weights.get(n, 0.0) for n in loc_names], dtype=np.float64)
    cmb_rows: list[dict] = []
    centres: list[np.ndarray] = []
    for _ in range(n_cmb):
        loc = str(rng.choice(loc_names, p=loc_w / loc_w.sum()))
        allowed = parenchyma & (mars == anatomy.MARS_CLASSES.index(loc))
        pts = placement.pick_voxels(rng, allowed, acq.affine, 1, avoid_world=centres,
                                    min_distance_mm=recipe.min_cmb_separation_mm)
        if not pts:
            continue
        for _attempt in range(4):
            target = placement.sample_apparent_diameter(
                rng, recipe.diameter_median_mm, recipe.diameter_log_sd, *recipe.diameter_range_mm)
            core = placement.sample_core_diameter(rng, target)
            dchi = physics.blooming_moment_for_diameter(target, REFERENCE_B0_T, REFERENCE_TE_MS,
                                                        core_diameter_mm=core,
                                                        phi_c=CALIBRATION_PHI_C)
            dchi = float(np.clip(dchi, 0.3, 40.0))
            src = physics.SphereSource(pts[0].world, core / 2.0, dchi,
                                       core_r2s_per_s=_uniform(rng, (200.0, 600.0)),
                                       core_pd_ratio=0.8)
            sl, factor = insert(src)
            mask = label_from_factor(factor)
            sub = labels[sl]
            mask &= sub == 0
            if mask.any():
                signal[sl] *= factor
                lid = len(cmb_rows) + 1
                sub[mask] = lid
                centres.append(pts[0].world)
                cmb_rows.append({"lesion_id": lid, "location": loc, "target_diameter_mm": target,
                                 "core_diameter_mm": core, "dchi_ppm": dchi,
                                 "moment_ppm_mm3": src.moment_ppm_mm3})
                break

    # ---- mimics ----------------------------------------------------------------------------
    mimic_rows: list[dict] = []

    def add_mimic(cls: str, parts: list[tuple[tuple[slice, ...] | None, np.ndarray]],
                  size_mm: float, **extra: float) -> None:
        """Record one mimic made of (box, mask) parts (box None = whole volume)."""
        mid = len(mimic_rows) + 1
        for sl, mask in parts:
            target = mimic_labels if sl is None else mimic_labels[sl]
            target[mask & (target == 0)] = mid
        mimic_rows.append({"mimic_id": mid, "mimic_class": cls, "size_mm": size_mm, **extra})

    for side_label in ("pallidum",):
        gp = tissue == tid[side_label]
        lab, n = ndimage.label(gp)
        for k in range(1, n + 1):
            region = lab == k
            if region.sum() * float(np.prod(spacing)) > 50.0:
                add_mimic("deep_iron", [(None, region)],
                          float(np.cbrt(region.sum() * np.prod(spacing))),
                          dchi_ppm=float(props["pallidum"].chi_ppm))

    for region_name, cls in (("pallidum", "calcification_pallidum"),
                             ("choroid_plexus", "calcification_choroid_plexus")):
        prob = float(recipe.calcification_probability.get(region_name, 0.0))
        if rng.random() >= prob:
            continue
        allowed = tissue == tid[region_name]
        for pt in placement.pick_voxels(rng, allowed, acq.affine, int(rng.integers(1, 3)),
                                        avoid_world=centres, min_distance_mm=4.0):
            radius = _uniform(rng, (0.5, 1.5))
            src = physics.SphereSource(pt.world, radius, -_uniform(rng, (0.3, 2.5)),
                                       core_r2s_per_s=300.0, core_pd_ratio=0.2)
            sl, factor = insert(src)
            mask = label_from_factor(factor)
            if mask.any():
                signal[sl] *= factor
                add_mimic(cls, [(sl, mask)], 2 * radius, dchi_ppm=src.dchi_ppm)

    wm = tissue == tid["wm"]
    csf = tissue == tid["csf"]
    guide = placement.VeinGuide(wm, tissue == tid["ventricle"], tissue == tid["cortex"], csf,
                                acq.affine)
    for _ in range(int(rng.integers(*recipe.medullary_veins, endpoint=True))):
        path = guide.medullary(rng)
        if path is not None:
            _insert_vein(rng, path, _uniform(rng, (0.1, 0.35)), "medullary_vein", acq, signal,
                         insert, add_mimic)
    for _ in range(int(rng.integers(*recipe.cortical_veins, endpoint=True))):
        path = guide.cortical(rng)
        if path is not None:
            _insert_vein(rng, path, _uniform(rng, (0.4, 1.0)), "cortical_vein", acq, signal,
                         insert, add_mimic)

    if PROTOCOLS[acq.protocol].two_d:
        allowed = csf & (depth > 1.0)
        n_void = int(rng.integers(*recipe.flow_voids_2d, endpoint=True))
        for pt in placement.pick_voxels(rng, allowed, acq.affine, n_void, avoid_world=centres,
                                        min_distance_mm=5.0):
            radius = _uniform(rng, (0.5, 1.5))
            src = physics.SphereSource(pt.world, radius, 0.0, core_r2s_per_s=0.0,
                                       core_pd_ratio=0.05)
            sl, factor = insert(src)
            mask = label_from_factor(factor)
            if mask.any():
                signal[sl] *= factor
                add_mimic("flow_void", [(sl, mask)], 2 * radius)

    # ---- noise, contrast, scaling ----------------------------------------------------------
    wm_signal = float(np.abs(signal[wm]).mean()) if wm.any() else float(np.abs(signal).max())
    sigma = physics.rician_sigma_for_snr(wm_signal, acq.snr)
    noisy = physics.add_complex_noise(rng, signal, sigma)
    if acq.sequence == "SWI":
        image, _ = physics.swi_from_complex(noisy, spacing, mip_slab_mm=recipe.swi_mip_mm)
    else:
        image = np.abs(noisy)
    image = np.asarray(image, dtype=np.float64) * (1000.0 / max(wm_signal, 1e-12))
    image = np.clip(np.rint(image), 0, 32767).astype(np.int16)

    lesions = lesions_from_labels(labels, acq.affine, scan_id=scan_id, mask_source="rater")
    extra = pd.DataFrame(cmb_rows)
    if len(lesions):
        lesions = lesions.drop(columns=["location"]).merge(extra, on="lesion_id", how="left")
        lesions = lesions[list(LESION_COLUMNS) + ["target_diameter_mm", "core_diameter_mm",
                                                  "dchi_ppm", "moment_ppm_mm3"]]
    mimics = _mimic_table(mimic_labels, mimic_rows, acq.affine, scan_id)
    info = {
        "scan_id": scan_id, "subject_id": scan_id, "split": recipe.split,
        "sequence": acq.sequence, "field_strength_t": acq.b0_t, "te_ms": round(acq.te_ms, 3),
        "voxel_mm_x": spacing[0], "voxel_mm_y": spacing[1], "voxel_mm_z": spacing[2],
        "slice_thickness_mm": round(acq.slice_thickness_mm, 4),
        "shape": "x".join(str(s) for s in acq.shape), "n_cmb": int(len(lesions)),
        "site": "synthetic", "vendor": "cmbbench",
        "protocol": acq.protocol, "tr_ms": round(acq.tr_ms, 3),
        "flip_deg": round(acq.flip_deg, 3), "gap_mm": round(acq.gap_mm, 4),
        "snr": round(acq.snr, 3), "orientation": acq.orientation,
        "b0_dir_x": acq.b0_dir[0], "b0_dir_y": acq.b0_dir[1], "b0_dir_z": acq.b0_dir[2],
        "n_mimics": int(len(mimics)), "positive": bool(len(lesions) > 0),
        "swi_mip_mm": (recipe.swi_mip_mm if acq.sequence == "SWI" and recipe.swi_mip_mm
                       else 0.0),
    }
    return GeneratedScan(scan_id, image, acq.affine, labels, mimic_labels, lesions, mimics, info)


def _insert_vein(rng: np.random.Generator, path: np.ndarray, radius: float, cls: str,
                 acq: Acquisition, signal: np.ndarray, insert: Callable, add_mimic: Callable) -> None:
    """Insert a vein as chunks of about 5 mm (tubes); record it as one mimic."""
    chi = _uniform(rng, (0.35, 0.6))
    r2s = 60.0 if acq.b0_t >= 3.0 else 30.0
    masks: list[tuple[tuple[slice, ...], np.ndarray]] = []
    step = 5
    for start in range(0, len(path) - 1, step):
        chunk = path[start:start + step + 1]
        if len(chunk) < 2:
            continue
        src = physics.TubeSource(chunk, radius, chi, r2s_per_s=r2s, pd_ratio=1.0)
        sl, factor = insert(src, samples_per_mm=3.0)
        signal[sl] *= factor
        masks.append((sl, np.abs(factor) <= 1.0 - DRAW_THRESHOLD))
    if not any(m.any() for _, m in masks):
        return
    length = float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
    add_mimic(cls, masks, length, radius_mm=radius, dchi_ppm=chi)


def _mimic_table(mimic_labels: np.ndarray, rows: list[dict], affine: np.ndarray,
                 scan_id: str) -> pd.DataFrame:
    cols = ["scan_id", "mimic_id", "mimic_class", "x_mm", "y_mm", "z_mm", "i", "j", "k",
            "n_voxels", "size_mm", "radius_mm", "dchi_ppm"]
    if not rows:
        return pd.DataFrame(columns=cols)
    stats = lesions_from_labels(mimic_labels, affine, scan_id=scan_id)
    stats = stats.rename(columns={"lesion_id": "mimic_id"})[
        ["mimic_id", "x_mm", "y_mm", "z_mm", "i", "j", "k", "n_voxels"]]
    table = pd.DataFrame(rows).merge(stats, on="mimic_id", how="inner")
    table["scan_id"] = scan_id
    return table.reindex(columns=cols)

"""Tests of the reimplemented baselines: the FRST, the LoG detector and Bian et al. 2013."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import cc3d
import numpy as np
import pandas as pd
import pytest
from cmbbench_baselines.bian2013 import Bian2013, frst_radii_px, region_features
from cmbbench_baselines.frst import (
    disc_reference,
    frst_2d,
    frst_radius,
    frst_slices,
    frst_stack,
    ideal_disc,
)
from cmbbench_baselines.log import LoGDetector, ellipsoid_footprint, probability_from_labels

from cmbbench.dataset import read_dataset
from cmbbench.examples import affine_for, make_example
from cmbbench.geometry import voxel_to_world
from cmbbench.matching import get_rule
from cmbbench.methods.api import Method, Prediction, ScanInput
from cmbbench.scoring import score_case

log = logging.getLogger(__name__)

FLOOR = get_rule("cmbbench").candidate_floor


# ---------------------------------------------------------------------------------------------
# Scene helpers
# ---------------------------------------------------------------------------------------------

def render(shape: tuple[int, int, int], spacing: tuple[float, float, float], affine: np.ndarray,
           spheres: list[tuple[tuple[float, float, float], float]] = (),
           tubes: list[tuple[tuple[float, float, float], tuple[float, float, float], float]] = (),
           *,
           background: float = 1000.0, dark: float = 300.0, noise: float = 20.0,
           seed: int = 0, supersample: int = 3) -> np.ndarray:
    """Partial-volume rendering of dark spheres ``(centre_world_mm, radius_mm)`` and infinite
    dark straight tubes ``(point_world_mm, direction_world, radius_mm)`` on a noisy background."""
    sp = np.asarray(spacing)
    frac = np.zeros(shape, dtype=np.float64)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    inv = np.linalg.inv(affine)
    for centre, r in spheres:
        c = inv[:3, :3] @ np.asarray(centre) + inv[:3, 3]
        half = np.ceil(r / sp).astype(int) + 2
        lo = np.maximum(np.floor(c).astype(int) - half, 0)
        hi = np.minimum(np.ceil(c).astype(int) + half + 1, shape)
        acc = np.zeros(tuple(hi - lo))
        for a in sub:
            for b in sub:
                for e in sub:
                    g = np.meshgrid(*[(np.arange(l, h) + o - cc) * s for l, h, o, cc, s in
                                      zip(lo, hi, (a, b, e), c, sp)], indexing="ij", sparse=True)
                    acc += (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= r * r
        box = frac[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(box, acc / supersample ** 3, out=box)
    if len(tubes):
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                    indexing="ij"), axis=-1)
        acc = np.zeros(shape)
        for a in sub:
            for b in sub:
                for e in sub:
                    world = (grid + np.array([a, b, e])) @ affine[:3, :3].T + affine[:3, 3]
                    inside = np.zeros(shape, dtype=bool)
                    for point, direction, r in tubes:
                        u = np.asarray(direction, dtype=np.float64)
                        u = u / np.linalg.norm(u)
                        rel = world - np.asarray(point)
                        perp = rel - (rel @ u)[..., None] * u
                        inside |= (perp ** 2).sum(axis=-1) <= r * r
                    acc += inside
        np.maximum(frac, acc / supersample ** 3, out=frac)
    rng = np.random.default_rng(seed)
    img = background + (dark - background) * frac + noise * rng.standard_normal(shape)
    return img.astype(np.float32)


def centred_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    return affine_for(spacing, "RAS", shape)


def world_of(pred: Prediction, affine: np.ndarray) -> np.ndarray:
    return voxel_to_world(affine, pred.candidates[["i", "j", "k"]].to_numpy(np.float64))


def check_contract(pred: Prediction, shape: tuple[int, ...]) -> None:
    """Map of the image's shape in [0, 1]; candidate table; one component per candidate."""
    assert isinstance(pred, Prediction)
    prob = pred.probability
    assert prob is not None and prob.shape == tuple(shape) and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    cands = pred.candidates
    assert isinstance(cands, pd.DataFrame)
    assert {"i", "j", "k", "score"} <= set(cands.columns)
    if len(cands):
        assert cands["score"].between(0.0, 1.0).all()
        for ax, n in zip("ijk", shape):
            assert cands[ax].between(0, n - 1).all()
    labels, n = cc3d.connected_components(prob >= FLOOR, connectivity=26, return_N=True)
    assert n <= int((cands["score"] >= FLOOR).sum()) if len(cands) else n == 0
    if n:
        peaks = np.array([prob[labels == lab].max() for lab in range(1, n + 1)])
        assert np.isin(np.round(peaks, 5), np.round(cands["score"].to_numpy(np.float32), 5)).all()


# ---------------------------------------------------------------------------------------------
# FRST
# ---------------------------------------------------------------------------------------------

def dark_disc_image(radius: float, half: int = 24, contrast: float = 0.6, noise: float = 0.01,
                    seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = 1.0 - contrast * (1.0 - ideal_disc(radius, half))
    return img + noise * rng.standard_normal(img.shape)


@pytest.mark.parametrize("radius", [3.0, 4.0, 5.0])
def test_frst_peaks_at_disc_centre_and_matching_radius(radius):
    img = dark_disc_image(radius)
    radii = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    per = frst_stack(img, radii)
    combined = frst_2d(img, radii)
    peak = np.unravel_index(int(np.argmax(combined)), combined.shape)
    assert max(abs(peak[0] - 24), abs(peak[1] - 24)) <= 1
    centre = per[:, 23:26, 23:26].max(axis=(1, 2))
    assert radii[int(np.argmax(centre))] == radius
    # disc-normalised: an ideal disc of contrast 0.6 reads ~0.6
    assert combined.max() == pytest.approx(0.6, abs=0.1)
    # raw responses peak at the matching radius too
    raw = frst_stack(img, radii, normalize="none")[:, 23:26, 23:26].max(axis=(1, 2))
    assert radii[int(np.argmax(raw))] == radius


@pytest.mark.parametrize("radius", [2.0, 3.0, 4.0])
def test_frst_line_much_weaker_than_disc(radius):
    half = 24
    line = np.ones((2 * half + 1, 2 * half + 1))
    ax = np.arange(-half, half + 1)
    # anti-aliased dark line of width 2 * radius along axis 0
    cover = np.clip(radius + 0.5 - np.abs(ax), 0.0, 1.0)
    line = line - 0.6 * cover[None, :]
    disc = dark_disc_image(radius, noise=0.0)
    r_line = frst_2d(line, [radius]).max()
    r_disc = frst_2d(disc, [radius]).max()
    assert r_disc > 0.4
    assert r_line < 0.1 * r_disc


def test_frst_dark_mode_ignores_bright_disc():
    img = 1.0 + 0.6 * ideal_disc(3.0, 24, bright=True)
    dark = frst_2d(img, [2.0, 3.0, 4.0], mode="dark")
    bright = frst_2d(img, [2.0, 3.0, 4.0], mode="bright")
    assert bright.max() == pytest.approx(0.6, abs=0.1)
    assert dark.max() < 0.05 * bright.max()
    both = frst_radius(dark_disc_image(3.0, noise=0.0), 3.0, mode="both")
    assert both.min() < 0 and abs(both.min()) > abs(both.max())


def test_frst_slices_equals_per_slice_and_max_normalisation():
    vol = np.stack([dark_disc_image(3.0, seed=0), dark_disc_image(4.0, contrast=0.3, seed=1),
                    np.ones((49, 49))], axis=2)
    radii = [2.0, 3.0, 4.0]
    out = frst_slices(vol, radii)
    for k in range(vol.shape[2]):
        np.testing.assert_allclose(out[:, :, k], frst_2d(vol[:, :, k], radii), atol=1e-5)
    assert np.all(out[:, :, 2] == 0)  # a flat slice has no gradient, hence no votes
    mx = frst_slices(vol, radii, normalize="max")
    assert mx[:, :, 0].max() == pytest.approx(1.0) and mx[:, :, 1].max() == pytest.approx(1.0)
    assert 0.0 < disc_reference(3.0) and disc_reference(3.0) == disc_reference(3.0)
    with pytest.raises(ValueError):
        frst_2d(vol, radii)
    with pytest.raises(ValueError):
        frst_2d(vol[:, :, 0], [0.0])


# ---------------------------------------------------------------------------------------------
# LoG
# ---------------------------------------------------------------------------------------------

def test_log_detects_small_spheres_on_anisotropic_grid():
    spacing = (0.5, 0.5, 2.0)
    shape = (96, 96, 20)
    aff = centred_affine(spacing, shape)
    centres = [(-8.3, -6.1, 3.4), (7.2, 9.6, -5.1)]
    img = render(shape, spacing, aff, [(centres[0], 1.0), (centres[1], 2.0)])
    pred = LoGDetector().predict(ScanInput("a", img, aff, sequence="SWI"))
    check_contract(pred, shape)
    world = world_of(pred, aff)
    scores = pred.candidates["score"].to_numpy()
    hit = []
    for c in centres:
        d = np.linalg.norm(world - np.asarray(c), axis=1)
        n = int(np.argmin(d))
        assert d[n] <= 1.0, (c, d[n])
        hit.append(n)
    others = np.delete(scores, hit)
    assert scores[hit].min() > 0.9
    assert len(others) == 0 or scores[hit].min() > others.max()
    # the detected scale follows the size
    diam = pred.candidates["diameter_mm"].to_numpy()[hit]
    assert diam[0] < diam[1]


def test_log_parameters_scale_with_voxel_size():
    centres = [(-10.2, 4.3, 2.1), (6.4, -7.7, -3.3), (9.1, 10.4, 6.2)]
    radii = [1.0, 1.5, 2.0]
    found = []
    for spacing, shape in (((0.5, 0.5, 1.0), (90, 90, 36)), ((1.0, 1.0, 2.0), (45, 45, 18))):
        aff = centred_affine(spacing, shape)
        img = render(shape, spacing, aff, list(zip(centres, radii)), noise=15.0, seed=1)
        pred = LoGDetector().predict(ScanInput("a", img, aff))
        check_contract(pred, shape)
        top = pred.candidates.nlargest(3, "score")
        assert (top["score"] > 0.9).all()
        found.append(voxel_to_world(aff, top[["i", "j", "k"]].to_numpy(np.float64)))
    for c in centres:
        d0 = np.linalg.norm(found[0] - np.asarray(c), axis=1).min()
        d1 = np.linalg.norm(found[1] - np.asarray(c), axis=1).min()
        assert d0 <= 1.0 and d1 <= 1.5, (c, d0, d1)
    # the same world positions at both resolutions (within one coarse voxel)
    dist = np.linalg.norm(found[0][:, None, :] - found[1][None, :, :], axis=2)
    assert (dist.min(axis=1) <= 2.0).all()


def test_log_on_blank_image_is_empty_and_valid():
    shape = (20, 20, 10)
    aff = centred_affine((1.0, 1.0, 1.0), shape)
    pred = LoGDetector().predict(ScanInput("z", np.full(shape, 5.0, dtype=np.float32), aff))
    check_contract(pred, shape)
    assert len(pred.candidates) == 0


def test_probability_from_labels_keeps_components_apart():
    lab = np.zeros((12, 12, 6), dtype=np.int32)
    lab[2:6, 2:6, 1:4] = 1
    lab[6:9, 2:6, 1:4] = 2  # touches label 1
    lab[10, 10, 3] = 3
    prob = probability_from_labels(lab, [0.9, 0.5, 0.3])
    _, n = cc3d.connected_components(prob > 0, connectivity=26, return_N=True)
    assert n == 3
    assert (prob[lab == 1] == np.float32(0.9)).all()  # the best label is never cut
    assert sorted(np.unique(prob[prob > 0]).tolist()) == pytest.approx([0.3, 0.5, 0.9])
    fp = ellipsoid_footprint(1.0, (0.5, 0.5, 2.0), min_half=1)
    assert fp.shape == (5, 5, 3) and fp[2, 2, 0] and fp[2, 2, 2]


# ---------------------------------------------------------------------------------------------
# Bian 2013
# ---------------------------------------------------------------------------------------------

def test_bian_detects_sphere_and_rejects_inplane_tube():
    spacing = (0.5, 0.5, 2.0)
    shape = (110, 110, 20)
    aff = centred_affine(spacing, shape)
    sphere_c = (-12.0, -10.0, 1.0)
    tube_point = (0.0, 12.0, -3.0)  # runs along x (in-plane), through the whole FOV
    img = render(shape, spacing, aff, [(sphere_c, 1.5)], [(tube_point, (1.0, 0.0, 0.0), 1.5)],
                 noise=15.0, seed=2)
    pred = Bian2013().predict(ScanInput("b", img, aff, sequence="SWI"))
    check_contract(pred, shape)
    world = world_of(pred, aff)
    d = np.linalg.norm(world - np.asarray(sphere_c), axis=1)
    assert d.min() <= 1.0
    assert pred.candidates["score"].to_numpy()[int(np.argmin(d))] > 0.5
    # nothing on the tube: distance from the tube's axis (y, z in world) > 3 mm
    tube_dist = np.hypot(world[:, 1] - tube_point[1], world[:, 2] - tube_point[2])
    assert (tube_dist > 3.0).all(), pred.candidates
    # and no probability mass on it
    tube_mask = render(shape, spacing, aff, [], [(tube_point, (1.0, 0.0, 0.0), 2.5)],
                       background=0.0,
                       dark=1.0, noise=0.0) > 0
    assert pred.probability[tube_mask].max() < FLOOR


def test_bian_rejects_vessels_that_the_frst_sees():
    """Through-plane and oblique veins look round in each slice (the FRST fires on them); the
    grown 3D region is long or elongated and is rejected."""
    spacing = (0.5, 0.5, 2.0)
    shape = (110, 110, 24)
    aff = centred_affine(spacing, shape)
    sphere_c = (-12.0, -12.0, 1.0)
    tubes = [((12.0, -12.0, 0.0), (0.0, 0.0, 1.0), 1.25),   # through-plane, whole slab
             ((0.0, 12.0, 0.0), (1.0, 1.0, 3.0), 1.25)]    # oblique, 25 deg off the normal
    img = render(shape, spacing, aff, [(sphere_c, 1.25)], tubes, noise=15.0, seed=3)
    method = Bian2013()
    scan = ScanInput("v", img, aff, sequence="SWI")
    # the FRST does respond on the tubes' cross-sections
    from cmbbench_baselines.bian2013 import relative_image
    from cmbbench_baselines.log import foreground_mask
    sp = scan.spacing_mm
    mask = foreground_mask(img, sp, erode_mm=method.mask_erode_mm)
    resp = method.frst_response(relative_image(img, mask, sp), sp)
    seeds_world = voxel_to_world(aff, method.seeds(resp, mask, sp).astype(float))
    near = [_tube_distance(seeds_world, p, u) <= 2.0 for p, u, _ in tubes]
    assert all(n.sum() >= 3 for n in near)
    pred = method.predict(scan)
    check_contract(pred, shape)
    world = world_of(pred, aff)
    assert np.linalg.norm(world - np.asarray(sphere_c), axis=1).min() <= 1.0
    for p, u, _ in tubes:
        assert (_tube_distance(world, p, u) > 3.0).all(), pred.candidates


def _tube_distance(points: np.ndarray, point, direction) -> np.ndarray:
    u = np.asarray(direction, dtype=np.float64)
    u = u / np.linalg.norm(u)
    rel = np.asarray(points) - np.asarray(point)
    return np.linalg.norm(rel - (rel @ u)[:, None] * u, axis=1)


def test_bian_region_features_and_radii():
    sp = (0.5, 0.5, 2.0)
    ball = np.argwhere(render((21, 21, 5), sp, centred_affine(sp, (21, 21, 5)),
                              [((0.0, 0.0, 0.0), 2.0)], background=0.0, dark=1.0,
                              noise=0.0) > 0.5)
    f = region_features(ball, sp)
    assert f.elongation < 1.3 and 3.0 < f.diameter_mm < 5.0
    rod = np.array([[i, 10, 2] for i in range(30)])
    g = region_features(rod, sp)
    assert g.elongation > 5 and g.major_mm == pytest.approx(15.0, rel=0.05)
    m = Bian2013()
    assert m.reject_reason(f, capped=False) == ""
    assert m.reject_reason(f, capped=True) == "reaches_growth_limit"
    assert m.reject_reason(g, capped=False) == "elongated"
    short = region_features(np.array([[5, 5, 2], [6, 5, 2]]), sp)  # 2 voxels: not a vessel
    assert m.reject_reason(short, capped=False) == ""
    column = region_features(np.array([[5, 5, k] for k in range(7)]), sp)  # 12 mm through-plane
    assert m.reject_reason(column, capped=False) == "too_long"
    big = region_features(np.argwhere(np.ones((24, 24, 6), dtype=bool)), sp)
    assert m.reject_reason(big, capped=False) == "too_large"
    assert m.reject_reason(region_features(np.array([[1, 1, 1]]), (0.4, 0.4, 0.8)),
                           capped=False) == "too_small"
    assert frst_radii_px((0.5, 1.0, 1.5, 2.0, 2.5), 1.0) == [1.0, 1.5, 2.0, 2.5]
    assert frst_radii_px((0.5, 1.0), 0.5) == [1.0, 2.0]


def test_methods_are_registered_and_describe_themselves():
    eps = {ep.name: ep for ep in entry_points(group="cmbbench.methods")}
    for cls in (LoGDetector, Bian2013):
        assert issubclass(cls, Method)
        assert cls.name in eps and eps[cls.name].load() is cls
        info = cls().info()
        for key in ("citation", "description", "limitations"):
            assert len(info[key]) > 40
        assert info["requirements"]["sequences"] == ("SWI", "T2S")


# ---------------------------------------------------------------------------------------------
# Through cmbbench scoring
# ---------------------------------------------------------------------------------------------

def _score_dataset(method: Method, root) -> tuple[int, int, int, int]:
    ds = read_dataset(root)
    rule = get_rule("cmbbench")
    tp = n_ref = fp = hits_floor = 0
    for scan_id in ds.scan_ids:
        vol = ds.read_image(scan_id)
        row = ds.scans[ds.scans["scan_id"] == scan_id].iloc[0]
        pred = method.predict(ScanInput(scan_id, vol.data, vol.affine,
                                        sequence=str(row["sequence"])))
        check_contract(pred, vol.data.shape)
        labels = ds.read_labels(scan_id)
        res = score_case(scan_id=scan_id, lesions=ds.lesions_of(scan_id),
                         image_shape=vol.data.shape, image_affine=vol.affine, rule=rule,
                         ref_labels=None if labels is None else labels.data,
                         prediction=pred.probability)
        ref = res.table[res.table["kind"] == "reference"]
        cand = res.table[res.table["kind"] == "candidate"]
        n_ref += len(ref)
        tp += int((ref["outcome"] == "TP").sum())
        hits_floor += int((ref["hit_score"].fillna(0) >= FLOOR).sum())
        fp += int((cand["outcome"] == "FP").sum())
    return n_ref, tp, hits_floor, fp


@pytest.fixture(scope="module")
def example_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    make_example(root)
    return root / "reference"


@pytest.mark.parametrize("method_cls", [LoGDetector, Bian2013])
def test_methods_find_example_spheres_through_scoring(method_cls, example_root):
    n_ref, tp, hits_floor, fp = _score_dataset(method_cls(), example_root)
    log.info("%s on the example: %d/%d TP at the operating point, %d at the floor, %d FP",
             method_cls.name, tp, n_ref, hits_floor, fp)
    assert n_ref == 8
    assert hits_floor == n_ref
    assert tp >= 7
    assert fp <= 6 * 2  # at most ~2 FP per scan at the operating point on pure noise


@pytest.fixture(scope="module")
def synthetic_scan():
    from cmbbench.synth.generator import generate_scan
    from cmbbench.synth.recipe import SynthRecipe
    recipe = SynthRecipe(name="t", seed=3, n_scans=1, fov_mm=(80.0, 80.0), slab_mm=36.0,
                         inplane_mm=(1.0, 1.0), positive_fraction=1.0, max_cmbs_per_scan=6)
    return generate_scan(recipe, 0)


@pytest.mark.parametrize("method_cls", [LoGDetector, Bian2013])
def test_methods_on_generated_scan(method_cls, synthetic_scan):
    scan = synthetic_scan
    pred = method_cls().predict(ScanInput(scan.scan_id, scan.image, scan.affine,
                                          sequence=str(scan.info.get("sequence", "unknown"))))
    check_contract(pred, scan.image.shape)
    res = score_case(scan_id=scan.scan_id, lesions=scan.lesions, image_shape=scan.image.shape,
                     image_affine=scan.affine, rule=get_rule("cmbbench"), ref_labels=scan.labels,
                     prediction=pred.probability)
    ref = res.table[res.table["kind"] == "reference"]
    cand = res.table[res.table["kind"] == "candidate"]
    n = len(ref)
    tp = int((ref["outcome"] == "TP").sum())
    found = int((ref["hit_score"].fillna(0) >= FLOOR).sum())
    fp = int((cand["outcome"] == "FP").sum())
    log.info("%s on %s (%s): %d CMBs, %d TP at the operating point, %d found at the floor, "
             "%d FP at the operating point, %d candidates", method_cls.name, scan.scan_id,
             scan.info.get("protocol"), n, tp, found, fp, len(cand))
    if n >= 3:
        assert found >= 1

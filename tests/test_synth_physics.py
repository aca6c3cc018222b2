"""Tests of the synthetic-CMB physics: analytic fields vs FFT, blooming, slice thickness, SWI, noise."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cmbbench.errors import ConfigurationError
from cmbbench.examples import affine_for
from cmbbench.synth.physics import (
    BLOOMING_CONSTANT,
    DEFAULT_PHASE_TOL_RAD,
    GAMMA,
    PHASE_SIGN,
    Source,
    SphereSource,
    TubeSource,
    add_complex_noise,
    apparent_diameter_mm,
    blooming_moment_for_diameter,
    cylinder_delta_b,
    dipole_field_fft,
    gre_steady_state,
    rician_sigma_for_snr,
    sphere_delta_b,
    swi_from_complex,
    voxel_factor,
)

Z = np.array([0.0, 0.0, 1.0])


def grid_points(shape, spacing, centre_vox):
    """(…, 3) positions (mm) of voxel centres relative to ``centre_vox`` on an axis-aligned grid."""
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre_vox, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def antialiased_ball(shape, spacing, centre_vox, radius, sub=4):
    """Volume fraction of a ball per voxel (sub^3 supersampling), so the moment is accurate."""
    frac = np.zeros(shape)
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    for ox in offs:
        for oy in offs:
            for oz in offs:
                p = grid_points(shape, spacing, np.asarray(centre_vox) - [ox, oy, oz])
                frac += (p ** 2).sum(-1) <= radius ** 2
    return frac / sub ** 3


def factor_on_grid(source, spacing, *, b0=3.0, te=20.0, shape=None, orientation="RAS",
                   b0_dir=Z, **kw):
    shape = shape or tuple(round(40 / s) | 1 for s in spacing)  # odd: a voxel centre at 0
    affine = affine_for(spacing, orientation, shape)
    sl, f = voxel_factor(source, affine, shape, b0_dir, b0, te, **kw)
    return affine, shape, sl, f


def full_volume(shape, sl, f):
    vol = np.ones(shape, dtype=np.complex64)
    vol[sl] = f
    return vol


# ----------------------------------------------------------------------------------- fields


def test_sphere_field_values():
    a, dchi, b0 = 1.0, 2.0, 3.0
    amp = dchi * 1e-6 * b0 / 3.0
    pts = np.array([[0, 0, 2.0], [2.0, 0, 0], [0, 0.5, 0.2], [0, 0, 0],
                    [math.sin(math.acos(1 / math.sqrt(3))) * 2, 0, 2 / math.sqrt(3)]])
    db = sphere_delta_b(pts, a, dchi, Z, b0)
    np.testing.assert_allclose(db[:4], [amp * 2 / 8, -amp / 8, 0.0, 0.0], rtol=1e-12, atol=1e-20)
    assert abs(db[4]) < 1e-12 * amp  # magic angle
    # B0 direction is normalised, and the field is even in the position
    np.testing.assert_allclose(sphere_delta_b(-pts, a, dchi, 5 * Z, b0), db, atol=1e-20)


def test_sphere_field_matches_fft_dipole():
    n, h, a = 80, 0.15, 1.2
    c = (n - 1) / 2.0
    chi = 3.0 * antialiased_ball((n, n, n), (h, h, h), (c, c, c), a)
    b = np.array([0.3, 0.2, 0.93])
    b /= np.linalg.norm(b)
    fft = dipole_field_fft(chi, (h, h, h), b, 3.0, pad_factor=2)
    pts = grid_points((n, n, n), (h, h, h), (c, c, c))
    ana = sphere_delta_b(pts, a, 3.0, b, 3.0)
    r = np.linalg.norm(pts, axis=-1)
    shell = (r > 2 * a) & (r < 4 * a)
    err = np.abs(fft - ana)[shell]
    assert np.max(err) / np.max(np.abs(ana[shell])) < 0.05
    # pointwise, relative to the largest |ΔB| at the same radius (2a-3a: no wrap-around images)
    near = (r > 2 * a) & (r < 3 * a)
    scale = 3e-6 * 3.0 / 3.0 * (a / r[near]) ** 3 * 2
    assert np.max(np.abs(fft - ana)[near] / scale) < 0.05
    # inside the sphere the Lorentz-corrected field vanishes (up to the FFT's edge ringing)
    inside = np.abs(fft[r < 0.5 * a])
    assert inside.mean() < 0.02 * 3e-6 and inside.max() < 0.1 * 3e-6


def test_dipole_fft_uniform_chi_gives_no_field():
    out = dipole_field_fft(np.full((8, 8, 8), 2.0), (1, 1, 1), Z, 3.0, pad_factor=1)
    assert np.max(np.abs(out)) < 1e-18


def test_cylinder_perpendicular_and_parallel():
    a, dchi, b0 = 0.5, 0.45, 3.0
    s = dchi * 1e-6 * b0
    p0, p1 = np.array([-10.0, 0, 0]), np.array([10.0, 0, 0])  # along x, B0 along z: θ = 90°
    pts = np.array([[0, 0, 0], [0, 0.1, 0.2], [0, 0, 2 * a], [0, 2 * a, 0], [1, 0, -2 * a],
                    [0, 2 * a / math.sqrt(2), 2 * a / math.sqrt(2)]])
    db = cylinder_delta_b(pts, p0, p1, a, dchi, Z, b0)
    np.testing.assert_allclose(db, [-s / 6, -s / 6, s / 8, -s / 8, s / 8, 0.0], atol=1e-12 * s)
    # parallel to B0: inside (3 - 1)/6 = 1/3, no field outside at all
    db_par = cylinder_delta_b(np.array([[0, 0, 0], [0.2, 0, 1], [2 * a, 0, 0], [0, 3, 5]]),
                              (0, 0, -10), (0, 0, 10), a, dchi, Z, b0)
    np.testing.assert_allclose(db_par, [s / 3, s / 3, 0.0, 0.0], atol=1e-12 * s)
    # 45°: inside (3/2 - 1)/6
    th = np.array([1.0, 0, 1.0]) / math.sqrt(2)
    db45 = cylinder_delta_b(np.zeros((1, 3)), -10 * th, 10 * th, a, dchi, Z, b0)
    np.testing.assert_allclose(db45, [s * 0.5 / 6], rtol=1e-12)


def test_cylinder_support_and_taper():
    a, s = 0.5, 1e-6 * 3.0
    p0, p1 = np.array([0.0, 0, 0]), np.array([4.0, 0, 0])
    x = np.array([-3 * a, -2 * a, 2.0, 4 + 2 * a, 4 + 2.6 * a])
    pts = np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)
    db = cylinder_delta_b(pts, p0, p1, a, 1.0, Z, 3.0)
    np.testing.assert_allclose(db, [0.0, -s / 12, -s / 6, -s / 12, 0.0], atol=1e-15)
    hard = cylinder_delta_b(pts, p0, p1, a, 1.0, Z, 3.0, taper_mm=0.0, extend_start_mm=0.0,
                            extend_end_mm=0.0)
    np.testing.assert_allclose(hard, [0.0, 0.0, -s / 6, 0.0, 0.0], atol=1e-15)


def test_cylinder_matches_fft_infinite_cylinder():
    # periodic along y without padding = an infinite cylinder along y
    n, ny, h, a = 256, 4, 0.1, 0.8
    c = (n - 1) / 2.0
    xi, zi = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")  # (x, z) indices
    frac = np.zeros((n, n))
    sub = 4
    for ox in (np.arange(sub) + 0.5) / sub - 0.5:
        for oz in (np.arange(sub) + 0.5) / sub - 0.5:
            frac += ((xi + ox) * h) ** 2 + ((zi + oz) * h) ** 2 <= a * a
    frac /= sub * sub
    chi = np.repeat(frac[:, None, :], ny, axis=1)  # axes (x, y, z)
    b = np.array([0.3, 0.5, 0.81])
    b /= np.linalg.norm(b)
    fft = dipole_field_fft(chi, (h, h, h), b, 3.0, pad_factor=1)[:, 1, :]
    pts = np.stack([xi * h, np.zeros((n, n)), zi * h], axis=-1)
    ana = cylinder_delta_b(pts, (0, -50, 0), (0, 50, 0), a, 1.0, b, 3.0)
    rho = np.hypot(pts[..., 0], pts[..., 2])
    ring = (rho > 2 * a) & (rho < 3 * a)
    sin2 = 1 - b[1] ** 2
    scale = 0.5e-6 * 3.0 * sin2 * (a / rho[ring]) ** 2
    assert np.max(np.abs(fft - ana)[ring] / scale) < 0.05
    inside = rho < 0.5 * a
    expected = 1e-6 * 3.0 * (3 * b[1] ** 2 - 1) / 6  # near the magic angle: small
    assert abs(fft[inside].mean() / expected - 1) < 0.03
    np.testing.assert_allclose(fft[inside], expected, atol=0.02 * 1e-6 * 3.0)  # edge ringing


@pytest.mark.parametrize("kind", ["sphere", "tube"])
def test_analytic_field_steps_match_finite_differences(kind):
    rng = np.random.default_rng(3)
    b = np.array([0.2, -0.3, 0.93])
    b /= np.linalg.norm(b)
    if kind == "sphere":
        src = SphereSource((1.0, 2.0, -1.0), 0.7, 3.0)
        pts = rng.uniform(-2, 2, size=(400, 3)) + src.origin_mm
    else:  # one long segment, points away from its tapered ends (the taper slope is neglected)
        src = TubeSource(np.array([[-10.0, 1.0, 0.0], [10.0, -1.0, 2.0]]), 0.6, 0.45)
        pts = rng.uniform(-2, 2, size=(400, 3)) + np.array([0.0, 0.0, 1.0])
    rel = pts - src.origin_mm
    edges = [np.array([1e-4, 0, 0]), np.array([0, 2e-4, 1e-4]), np.array([0, 0, -1e-4])]
    val, steps = src.delta_b_local(rel[:, 0], rel[:, 1], rel[:, 2], b, 3.0, edges)
    np.testing.assert_allclose(val, src.delta_b(pts, b, 3.0), rtol=1e-12, atol=1e-20)
    for e, st in zip(edges, steps):
        fd = src.delta_b(pts + e / 2, b, 3.0) - src.delta_b(pts - e / 2, b, 3.0)
        both_out = ((src.amplitude(pts + e / 2, 20.0) == 1.0)
                    & (src.amplitude(pts - e / 2, 20.0) == 1.0))
        both_in = ((src.amplitude(pts + e / 2, 20.0) < 1.0)
                   & (src.amplitude(pts - e / 2, 20.0) < 1.0))
        assert both_out.sum() > 250
        np.testing.assert_allclose(st[both_out], fd[both_out], rtol=1e-4,
                                   atol=1e-5 * np.max(np.abs(fd[both_out])))
        np.testing.assert_allclose(st[both_in], 0.0, atol=1e-30)


def test_tube_collinear_segments_sum_like_one_segment():
    pts = np.array([[1.5, 0.7, 0.3], [2.0, -0.6, 0.9], [2.5, 1.2, -1.1], [1.9, 0.1, 0.2]])
    one = TubeSource(np.array([[-5.0, 0, 0], [5.0, 0, 0]]), 0.5, 0.45)
    two = TubeSource(np.array([[-5.0, 0, 0], [2.0, 0, 0], [5.0, 0, 0]]), 0.5, 0.45)
    b = np.array([0.0, 0.6, 0.8])
    np.testing.assert_allclose(two.delta_b(pts, b, 3.0), one.delta_b(pts, b, 3.0), rtol=1e-12)


def test_gre_steady_state():
    # 90° with TR >> T1: PD · exp(-TE R2*)
    s = gre_steady_state(0.8, 1000.0, 25.0, 20.0, 1e6, 90.0)
    np.testing.assert_allclose(s, 0.8 * math.exp(-0.5), rtol=1e-12)
    # Ernst angle maximises the signal
    t1, tr = 1000.0, 30.0
    ernst = math.degrees(math.acos(math.exp(-tr / t1)))
    sig = gre_steady_state(1.0, t1, 0.0, 5.0, tr, np.array([ernst - 2, ernst, ernst + 2]))
    assert sig[1] > sig[0] and sig[1] > sig[2]
    # arrays broadcast; GM brighter than WM at short TR / low flip? just shape and positivity
    out = gre_steady_state(np.array([0.8, 0.7]), np.array([1350.0, 850.0]),
                           np.array([18.0, 22.0]), 20.0, 27.0, 15.0)
    assert out.shape == (2,) and np.all(out > 0)


# ----------------------------------------------------------------------------- voxel factor


def test_b0_te_product_invariance():
    # dephasing depends on B0·TE only (the core's own R2* decay depends on TE: switched off)
    src = SphereSource((0.3, -0.2, 0.4), 0.5, 4.0, core_r2s_per_s=0.0)
    _, _, sl_a, fa = factor_on_grid(src, (0.5, 0.5, 2.0), b0=3.0, te=20.0)
    _, _, sl_b, fb = factor_on_grid(src, (0.5, 0.5, 2.0), b0=1.5, te=40.0)
    assert sl_a == sl_b
    np.testing.assert_allclose(fa, fb, rtol=0, atol=2e-5)
    # but a different product differs
    _, _, _, fc = factor_on_grid(src, (0.5, 0.5, 2.0), b0=1.5, te=20.0, extent_mm=6.0)
    _, _, _, fd = factor_on_grid(src, (0.5, 0.5, 2.0), b0=3.0, te=20.0, extent_mm=6.0)
    assert np.abs(fc).min() > np.abs(fd).min() + 0.05


def test_blooming_grows_with_b0_te():
    spacing = (0.25, 0.25, 0.25)
    src = SphereSource(np.zeros(3), 0.5, 1.0)
    diam, mins = [], []
    for b0, te in [(1.5, 10.0), (1.5, 20.0), (3.0, 20.0), (3.0, 40.0)]:
        _, _, _, f = factor_on_grid(src, spacing, b0=b0, te=te)
        diam.append(apparent_diameter_mm(np.abs(f), spacing))
        mins.append(float(np.abs(f).min()))
    assert all(d2 > d1 for d1, d2 in itertools.pairwise(diam)), diam
    assert diam[0] >= 0.9 and diam[-1] > 1.4  # the dark region exceeds the 1 mm core
    assert all(m2 <= m1 + 1e-6 for m1, m2 in itertools.pairwise(mins)), mins


def test_contrast_falls_with_slice_thickness():
    # default CMB core (R2* 300 s^-1, PD 0.8): monotonic loss of contrast with thickness
    src = SphereSource(np.zeros(3), 0.5, 4.0)
    mins = [float(np.abs(factor_on_grid(src, (1.0, 1.0, t))[3]).min()) for t in (1.0, 3.0, 5.0)]
    assert mins[0] < mins[1] < mins[2], mins


@pytest.mark.parametrize("spacing, expected, tol", [
    ((0.5, 0.5, 2.0), 0.11, 0.05),
    ((1.0, 1.0, 3.0), 0.27, 0.10),  # very sensitive to the sub-voxel position (0.18-0.66)
    ((1.0, 1.0, 5.0), 0.45, 0.05),
])
def test_min_signal_matches_reference_table(spacing, expected, tol):
    # 1 mm core at 4 ppm, 3 T, TE 20 ms, no core R2* (the notes' table), centred in a voxel
    src = SphereSource(np.zeros(3), 0.5, 4.0, core_r2s_per_s=0.0, core_pd_ratio=1.0)
    _, _, _, f = factor_on_grid(src, spacing)
    assert abs(float(np.abs(f).min()) - expected) < tol


def test_default_sampling_is_converged():
    src = SphereSource(np.zeros(3), 0.5, 4.0, core_r2s_per_s=0.0, core_pd_ratio=1.0)
    _, _, sl, f = factor_on_grid(src, (0.5, 0.5, 2.0))
    _, _, sl2, g = factor_on_grid(src, (0.5, 0.5, 2.0), samples_per_mm=10.0,
                                  max_samples_per_voxel_axis=30)
    assert sl == sl2
    assert np.max(np.abs(f - g)) < 0.03


class _NoGradient:
    """A source without analytic field steps (voxel_factor then samples points only)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def origin_mm(self):
        return self.inner.origin_mm

    def delta_b_local(self, dx, dy, dz, b0_dir, b0_t, edges=None):
        if edges is not None:
            return NotImplemented
        return self.inner.delta_b_local(dx, dy, dz, b0_dir, b0_t)

    def amplitude_local(self, dx, dy, dz, te_ms):
        return self.inner.amplitude_local(dx, dy, dz, te_ms)

    def anchor_points_mm(self):
        return self.inner.anchor_points_mm()

    def default_extent_mm(self, b0_t, te_ms, phase_tol_rad=DEFAULT_PHASE_TOL_RAD):
        return self.inner.default_extent_mm(b0_t, te_ms, phase_tol_rad)


def test_source_without_gradient_gets_point_sampling():
    src = SphereSource(np.zeros(3), 0.5, 4.0)
    wrapped = _NoGradient(src)
    assert isinstance(wrapped, Source) and isinstance(src, Source)
    _, _, sl, f = factor_on_grid(src, (0.5, 0.5, 2.0), cell_average=False)
    _, _, sl_w, f_w = factor_on_grid(wrapped, (0.5, 0.5, 2.0))
    assert sl == sl_w
    np.testing.assert_array_equal(f_w, f)
    # the cell average is what makes the default sampling accurate
    _, _, _, f_ca = factor_on_grid(src, (0.5, 0.5, 2.0))
    _, _, _, ref = factor_on_grid(src, (0.5, 0.5, 2.0), samples_per_mm=16.0,
                                  max_samples_per_voxel_axis=40)
    err_ca, err_pt = np.max(np.abs(f_ca - ref)), np.max(np.abs(f - ref))
    assert err_ca < 0.04 and err_ca < 0.5 * err_pt


def test_slice_thickness_is_the_through_plane_footprint():
    # a 5 mm slice profile on a 1 mm slice grid (overlapping slices) sees the same slab as a
    # 1x1x5 mm voxel at the same centre
    src = SphereSource((0.2, -0.1, 0.3), 0.5, 4.0)
    _, shp1, sl1, f1 = factor_on_grid(src, (1.0, 1.0, 1.0), slice_thickness_mm=5.0,
                                         shape=(41, 41, 41))
    _, shp5, sl5, f5 = factor_on_grid(src, (1.0, 1.0, 5.0), shape=(41, 41, 9))
    v1 = full_volume(shp1, sl1, f1)[20, 20, 20]
    v5 = full_volume(shp5, sl5, f5)[20, 20, 4]
    np.testing.assert_allclose(v1, v5, atol=1e-5)
    # a thinner profile than the spacing (slice gap) gives more contrast at the centre
    _, shp, sl, fg = factor_on_grid(src, (1.0, 1.0, 5.0), shape=(41, 41, 9),
                                    slice_thickness_mm=3.0)
    assert abs(full_volume(shp, sl, fg)[20, 20, 4]) < abs(v5) - 0.05


def test_diamagnetic_phase_opposite_to_paramagnetic():
    spacing = (0.5, 0.5, 1.0)
    para = SphereSource(np.zeros(3), 0.6, 2.0)
    dia = SphereSource(np.zeros(3), 0.6, -2.0, core_r2s_per_s=300.0, core_pd_ratio=0.2)
    shape = (41, 41, 21)
    _, _, slp, fp = factor_on_grid(para, spacing, shape=shape, extent_mm=6.0)
    _, _, sld, fd = factor_on_grid(dia, spacing, shape=shape, extent_mm=6.0)
    vp, vd = full_volume(shape, slp, fp), full_volume(shape, sld, fd)
    pole = (20, 20, 12)  # 2 mm along B0 from the centre
    equator = (24, 20, 10)  # 2 mm perpendicular to B0
    assert PHASE_SIGN == -1
    assert np.angle(vp[pole]) < -0.05 and np.angle(vd[pole]) > 0.05
    assert np.angle(vp[equator]) > 0.02 and np.angle(vd[equator]) < -0.02
    # left-handed convention flips the sign
    _, _, sll, fl = factor_on_grid(para, spacing, shape=shape, extent_mm=6.0, phase_sign=+1)
    np.testing.assert_allclose(full_volume(shape, sll, fl), np.conj(vp), atol=1e-6)


def test_lps_affine_gives_mirrored_factor():
    spacing, shape = (0.5, 0.5, 2.0), (41, 41, 15)
    for centre in [(0.0, 0.0, 0.0), (1.3, -0.7, 0.4)]:
        src = SphereSource(centre, 0.5, 4.0)
        _, _, sl_r, fr = factor_on_grid(src, spacing, shape=shape, orientation="RAS")
        _, _, sl_l, fl = factor_on_grid(src, spacing, shape=shape, orientation="LPS")
        vr, vl = full_volume(shape, sl_r, fr), full_volume(shape, sl_l, fl)
        np.testing.assert_allclose(np.abs(vl[::-1, ::-1, :]), np.abs(vr), atol=1e-5)
        np.testing.assert_allclose(vl[::-1, ::-1, :], vr, atol=1e-5)
        if centre == (0.0, 0.0, 0.0):  # symmetric case: the LPS array itself equals RAS
            np.testing.assert_allclose(np.abs(vl), np.abs(vr), atol=1e-5)


def test_rotated_affine_and_b0_give_same_factor():
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))
    spacing, shape = (0.6, 0.6, 1.5), (31, 31, 13)
    aff = affine_for(spacing, "RAS", shape)
    aff_r = np.eye(4)
    aff_r[:3, :4] = rot @ aff[:3, :4]
    b0 = np.array([0.1, 0.2, 0.97])
    src = SphereSource((0.4, 0.3, -0.2), 0.6, 3.0)
    src_r = SphereSource(rot @ src.centre_mm, 0.6, 3.0)
    sl, f = voxel_factor(src, aff, shape, b0, 3.0, 20.0)
    sl_r, f_r = voxel_factor(src_r, aff_r, shape, rot @ b0, 3.0, 20.0)
    assert sl == sl_r
    np.testing.assert_allclose(f_r, f, atol=2e-4)


def test_box_is_clipped_and_far_voxels_are_unaffected():
    spacing, shape = (0.5, 0.5, 2.0), (41, 41, 15)
    aff = affine_for(spacing, "RAS", shape)
    src = SphereSource(aff[:3, :3] @ np.array([1.0, 20.0, 7.0]) + aff[:3, 3], 0.5, 4.0)
    sl, f = voxel_factor(src, aff, shape, Z, 3.0, 20.0)
    assert sl[0].start == 0 and sl[0].stop < 20 and f.shape == tuple(s.stop - s.start for s in sl)
    assert f.dtype == np.complex64 and np.all(np.isfinite(f))
    # voxels left out of the default box see less than the phase tolerance: |1 - F| <= max |φ|
    ext = src.default_extent_mm(3.0, 20.0) + 1.0
    sl_big, f_big = voxel_factor(src, aff, shape, Z, 3.0, 20.0, extent_mm=ext + 6.0)
    big = full_volume(shape, sl_big, f_big)
    outside = np.ones(shape, dtype=bool)
    outside[sl] = False
    assert outside[sl_big].any()
    assert np.max(np.abs(1 - big[outside])) < DEFAULT_PHASE_TOL_RAD
    far = SphereSource((500.0, 0, 0), 0.5, 4.0)
    _, f_far = voxel_factor(far, aff, shape, Z, 3.0, 20.0)
    assert f_far.size == 0


def test_tube_voxel_factor_darkens_along_the_vein():
    spacing, shape = (0.5, 0.5, 2.0), (41, 41, 11)
    aff = affine_for(spacing, "RAS", shape)
    vein = TubeSource(np.array([[-6.0, -3.0, 0.0], [0.0, 0.0, 0.0], [6.0, 2.0, 0.5]]), 0.4, 0.45,
                      r2s_per_s=40.0, pd_ratio=1.0)
    sl, f = voxel_factor(vein, aff, shape, Z, 3.0, 20.0)
    vol = full_volume(shape, sl, f)
    assert np.all(np.isfinite(vol))
    on_axis = abs(vol[20, 20, 5])  # the vein passes through the centre
    assert on_axis < 0.9 and on_axis < abs(vol[20, 35, 5])
    # parallel to B0, no core R2*: the outside is untouched, inside has a constant phase
    par = TubeSource(np.array([[0.0, 0, -8.0], [0.0, 0, 8.0]]), 0.4, 0.45, 0.0, 1.0)
    sl, f = voxel_factor(par, aff, shape, Z, 3.0, 20.0)
    vol = full_volume(shape, sl, f)
    assert abs(vol[22, 20, 5] - 1) < 1e-6
    inside_phase = -GAMMA * 20e-3 * 0.45e-6 * 3.0 * (3 - 1) / 6  # paramagnetic, right-handed
    assert np.angle(vol[20, 20, 5]) == pytest.approx(inside_phase, abs=1e-4)


# --------------------------------------------------------------------------------------- SWI


def test_swi_darker_than_magnitude_at_the_lesion():
    spacing, shape = (0.5, 0.5, 2.0), (64, 64, 16)
    aff = affine_for(spacing, "RAS", shape)
    img = np.full(shape, 0.8, dtype=np.complex64)
    sl, f = voxel_factor(SphereSource(np.zeros(3), 0.5, 4.0), aff, shape, Z, 3.0, 20.0)
    img[sl] *= f
    swi, hp = swi_from_complex(img, spacing)
    assert swi.dtype == np.float32 and hp.dtype == np.float32
    mag = np.abs(img)
    idx = np.unravel_index(np.argmin(mag), shape)
    assert hp[idx] < -0.3
    assert swi[idx] < 0.5 * mag[idx]
    assert np.all(swi <= mag + 1e-6)
    np.testing.assert_allclose(swi[:10, :10], mag[:10, :10], atol=1e-5)  # far away: untouched
    # mIP over 8 mm (4 slices) spreads the dark spot through-plane but never brightens
    mip, _ = swi_from_complex(img, spacing, mip_slab_mm=8.0)
    assert np.all(mip <= swi + 1e-7)
    assert (mip < 0.5).sum() > (swi < 0.5).sum()


# ------------------------------------------------------------------------------------- noise


def test_noise_only_magnitude_is_rayleigh():
    rng = np.random.default_rng(0)
    sigma = 2.0
    noisy = add_complex_noise(rng, np.zeros((64, 64, 64), dtype=np.complex64), sigma)
    assert noisy.dtype == np.complex64
    mean = float(np.abs(noisy).mean())
    assert abs(mean / (sigma * math.sqrt(math.pi / 2)) - 1) < 0.03
    assert abs(float(noisy.real.std()) / sigma - 1) < 0.03
    assert rician_sigma_for_snr(0.7, 35.0) == pytest.approx(0.02)
    with pytest.raises(ConfigurationError):
        rician_sigma_for_snr(1.0, 0.0)


# ------------------------------------------------------------------------------- calibration


def test_blooming_calibration_round_trip():
    dchi = blooming_moment_for_diameter(2.7, 3.0, 20.0, core_diameter_mm=1.0)
    v_ratio = 1 + BLOOMING_CONSTANT * GAMMA * dchi * 1e-6 * 3.0 * 20e-3
    assert v_ratio ** (1 / 3) == pytest.approx(2.7)
    assert BLOOMING_CONSTANT == pytest.approx(0.26, abs=0.005)
    # same target at half B0·TE needs twice the susceptibility
    assert blooming_moment_for_diameter(2.7, 1.5, 20.0, core_diameter_mm=1.0) == \
        pytest.approx(2 * dchi)
    assert blooming_moment_for_diameter(0.8, 3.0, 20.0, core_diameter_mm=1.0) == 0.0


def test_apparent_diameter():
    mag = np.ones((20, 20, 20))
    mag[5:9, 5:9, 5:9] = 0.2  # 64 voxels of 0.5 mm: 8 mm^3
    mag[15, 15, 15] = 0.1  # a separate, darker single voxel holds the minimum
    assert apparent_diameter_mm(mag, (0.5, 0.5, 0.5)) == pytest.approx(
        (6 * 0.125 / math.pi) ** (1 / 3))
    mag[15, 15, 15] = 1.0
    assert apparent_diameter_mm(mag, (0.5, 0.5, 0.5)) == pytest.approx((6 * 8 / math.pi) ** (1 / 3))
    assert apparent_diameter_mm(np.full((4, 4, 4), 0.9), (1, 1, 1)) == 0.0

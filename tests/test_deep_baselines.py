"""Tests of the deep baselines: Dou et al. 2016 (``dou2016``) and Sundaresan et al. 2023
(``sundaresan2023``) -- network shapes, the cascade's hard-negative mining, candidate merging,
the FRST with Sundaresan's settings, the Frangi filter and vessel inpainting, the clean-up, the
knowledge-distillation loss, the working-grid rule, checkpoint integrity and plugin geometry.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cmbbench_baselines.deep_common import (
    PointSampler,
    TrainScan,
    crop,
    load_bundle,
    load_recipe,
)
from cmbbench_baselines.dou2016 import (
    DEFAULT_CHECKPOINT as DOU_CHECKPOINT,
)
from cmbbench_baselines.dou2016 import (
    Dou2016,
    merge_close,
    mine_hard_negatives,
    screening_candidates,
    split_stage1,
)
from cmbbench_baselines.dou2016_nets import (
    DiscriminationCNN,
    ScreeningFCN,
    screen_volume,
    screening_output_shape,
)
from cmbbench_baselines.frst import frst_2d, frst_stack, ideal_disc
from cmbbench_baselines.grid import GridRule, WorkGrid
from cmbbench_baselines.sundaresan2023 import (
    DEFAULT_CHECKPOINT as SUN_CHECKPOINT,
)
from cmbbench_baselines.sundaresan2023 import (
    Sundaresan2023,
    candidate_components,
    labels_to_native,
)
from cmbbench_baselines.sundaresan2023_nets import (
    CDetNet,
    StudentNet,
    TeacherNet,
    kd_loss,
    seg_loss,
    voxel_weights,
)
from cmbbench_baselines.sundaresan2023_prep import (
    PrepConfig,
    cleanup_components,
    frangi_slices,
    suppress_vessels,
)

from cmbbench.errors import ConfigurationError
from cmbbench.examples import affine_for, sphere
from cmbbench.methods.api import ScanInput

torch.set_num_threads(2)

CHECKPOINTS = [DOU_CHECKPOINT, SUN_CHECKPOINT]


# ---------------------------------------------------------------------------------------------
# network shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 16, 10), (37, 41, 23), (51, 19, 13)])
def test_screening_fcn_is_fully_convolutional_on_odd_volumes(shape):
    torch.manual_seed(0)
    net = ScreeningFCN(c1=4, c2=4, fc=8).eval()
    x = torch.randn((1, 1) + shape)
    with torch.no_grad():
        out = net(x)
    expected = screening_output_shape(shape)
    assert tuple(out.shape) == (1, 2) + expected
    # formula by hand: conv 5 -> pool 2 -> conv 3 -> fc 4 (in-plane); conv 3/pool/conv 3/fc 2
    assert expected == tuple(((n - 4) // 2 - 5) for n in shape[:2]) + ((shape[2] - 2) // 2 - 3,)
    # the slab-tiled inference equals one pass, and every score-map voxel scores the
    # 16 x 16 x 10 patch centred (crop convention) on ScreeningFCN.centre_of(o)
    img = x[0, 0].numpy()
    prob = screen_volume(net, img, tile_out=3)
    full = torch.softmax(out, 1)[0, 1].numpy()
    np.testing.assert_allclose(prob, full, atol=1e-6)
    o = np.array(expected) - 1
    patch = crop(img, ScreeningFCN.centre_of(o)[0], (16, 16, 10))
    with torch.no_grad():
        p = torch.softmax(net(torch.from_numpy(patch)[None, None]), 1)[0, 1, 0, 0, 0]
    assert float(p) == pytest.approx(float(prob[tuple(o)]), abs=1e-6)


def test_discrimination_cnn_shape_and_patch_check():
    net = DiscriminationCNN(c1=4, c2=4, c3=4, f1=8, f2=4).eval()
    assert tuple(net(torch.randn(3, 1, 20, 20, 16)).shape) == (3, 2)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 21, 20, 16))


@pytest.mark.parametrize("shape", [(23, 31, 17), (48, 48, 48), (9, 13, 5)])
def test_cdetnet_keeps_odd_shapes(shape):
    net = CDetNet(2, (4, 8, 8)).eval()
    with torch.no_grad():
        out = net(torch.randn((2, 2) + shape))
    assert tuple(out.shape) == (2, 2) + shape


def test_teacher_and_student_outputs():
    teacher = TeacherNet(2, (4, 8, 8), head=(16, 8)).eval()
    student = StudentNet(2, (4, 8, 8), head=(16, 8)).eval()
    x = torch.randn(3, 2, 24, 24, 24)
    with torch.no_grad():
        seg, cls = teacher(x)
        s = student(x)
        seg_odd, _ = teacher(torch.randn(1, 2, 25, 23, 21))
    assert tuple(seg.shape) == (3, 2, 24, 24, 24) and tuple(cls.shape) == (3, 2)
    assert tuple(s.shape) == (3, 2)
    assert tuple(seg_odd.shape) == (1, 2, 25, 23, 21)


# ---------------------------------------------------------------------------------------------
# the cascade: candidates, hard negatives, merging
# ---------------------------------------------------------------------------------------------

def _score_map_with_peaks(shape, peaks):
    """A stride-2 score map with isolated peaks ``{(o_i, o_j, o_k): score}`` on 0.1."""
    s = np.full(shape, 0.1, dtype=np.float32)
    for o, v in peaks.items():
        s[o] = v
    return s


def test_screening_candidates_are_thresholded_local_maxima():
    s = _score_map_with_peaks((20, 20, 8), {(3, 3, 2): 0.9, (3, 4, 2): 0.8,  # one maximum
                                             (10, 10, 4): 0.7, (15, 5, 5): 0.6})
    s[12:14, 15, 6] = 0.95  # a plateau: one candidate
    centres, scores = screening_candidates(s, threshold=0.64)
    np.testing.assert_allclose(scores, [0.95, 0.9, 0.7])
    np.testing.assert_array_equal(centres, [[2 * 12 + 8, 2 * 15 + 8, 2 * 6 + 5],
                                            [2 * 3 + 8, 2 * 3 + 8, 2 * 2 + 5],
                                            [2 * 10 + 8, 2 * 10 + 8, 2 * 4 + 5]])
    top, _ = screening_candidates(s, threshold=0.64, max_candidates=1)
    assert len(top) == 1
    mask = np.ones((64, 64, 24), dtype=bool)
    mask[2 * 10 + 8, 2 * 10 + 8, 2 * 4 + 5] = False
    masked, _ = screening_candidates(s, threshold=0.64, mask=mask)
    assert len(masked) == 2


def test_hard_negative_mining_picks_exactly_the_stage1_false_positives():
    spacing = (0.9, 0.9, 2.0)
    # five stage-1 peaks; the references sit on two of them (one exactly, one 3.6 mm away)
    # and one reference is missed by stage 1; a sub-threshold peak is no candidate at all
    peaks = {(2, 2, 1): 0.99, (8, 3, 2): 0.9, (4, 12, 3): 0.8, (14, 14, 1): 0.75,
             (11, 6, 4): 0.7, (16, 2, 3): 0.5}
    s = _score_map_with_peaks((20, 18, 6), peaks)
    offset = np.array([4, 6, 2])
    centre = {o: ScreeningFCN.centre_of(np.array(o))[0] + offset for o in peaks}
    refs = np.array([centre[(8, 3, 2)],
                     centre[(14, 14, 1)] + np.array([4, 0, 0]),  # 3.6 mm: a hit
                     centre[(16, 2, 3)],  # under the threshold: missed by stage 1
                     [60.0, 40.0, 2.0]])  # far from every peak
    hard, hits = mine_hard_negatives(s, refs, spacing, offset=offset, threshold=0.64)
    as_set = lambda a: {tuple(int(v) for v in row) for row in a}
    assert as_set(hard) == {tuple(centre[o]) for o in [(2, 2, 1), (4, 12, 3), (11, 6, 4)]}
    assert as_set(hits) == {tuple(centre[o]) for o in [(8, 3, 2), (14, 14, 1)]}
    # the split itself: distance in mm, strictly beyond 5 mm is a false positive
    c = np.array([[0, 0, 0], [5, 0, 0], [6, 0, 0], [0, 0, 3]])
    np.testing.assert_array_equal(split_stage1(c, [[0, 0, 0]], (1.0, 1.0, 2.0)),
                                  [False, False, True, True])
    assert split_stage1(c, np.zeros((0, 3)), (1, 1, 1)).all()


def test_merge_close_uses_ten_voxels_of_the_dou_grid():
    sp = (0.9, 0.9, 2.0)
    # 4 voxels = 3.6 mm in-plane (8 DOU voxels): merged; 6 voxels = 5.4 mm (12): kept;
    # 4 slices = 8 mm through-plane (8 DOU voxels): merged
    c = np.array([[10, 10, 10], [14, 10, 10], [10, 16, 10], [10, 10, 14], [30, 30, 10]])
    s = np.array([0.9, 0.95, 0.5, 0.6, 0.1])
    kept = merge_close(c, s, sp)
    np.testing.assert_array_equal(kept, [1, 3, 2, 4])
    assert list(merge_close(c, s, sp, merge_vox=1.0)) == [1, 0, 3, 2, 4]


# ---------------------------------------------------------------------------------------------
# FRST (Sundaresan's settings), Frangi, vessel inpainting, clean-up
# ---------------------------------------------------------------------------------------------

def _dark_disc(radius, contrast=0.6, half=24):
    return 1.0 - contrast * (1.0 - ideal_disc(radius, half))


@pytest.mark.parametrize("radius", [2.0, 3.0])
def test_frst_with_sundaresan_settings_finds_disc_at_its_radius_not_a_line(radius):
    kw = {"alpha": 2.0, "sigma_factor": 0.1, "mode": "dark"}
    disc = _dark_disc(radius)
    per = frst_stack(disc, [2.0, 3.0], **kw)
    assert [2.0, 3.0][int(np.argmax(per[:, 23:26, 23:26].max(axis=(1, 2))))] == radius
    combined = frst_2d(disc, [2.0, 3.0], **kw)
    peak = np.unravel_index(int(np.argmax(combined)), combined.shape)
    assert max(abs(peak[0] - 24), abs(peak[1] - 24)) <= 1
    ax = np.arange(-24, 25)
    line = 1.0 - 0.6 * np.clip(radius + 0.5 - np.abs(ax), 0, 1)[None, :] * np.ones((49, 1))
    assert frst_2d(line, [2.0, 3.0], **kw).max() < 0.15 * combined.max()


def test_frangi_slices_equals_skimage_and_prefers_lines():
    from skimage.filters import frangi

    rng = np.random.default_rng(0)
    img = np.ones((64, 64)) + 0.02 * rng.standard_normal((64, 64))
    img[30:32, 5:60] = 0.4  # a dark line
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 12) ** 2 + (xx - 12) ** 2 < 9] = 0.4  # a dark disc
    sig = (0.5, 0.7, 0.9, 1.1)
    ours = frangi_slices(np.stack([img, img], axis=2), sig, gamma=0.2)
    ref = frangi(img, sigmas=sig, gamma=0.2, black_ridges=True)
    np.testing.assert_allclose(ours[:, :, 0], ref, atol=1e-4)
    np.testing.assert_allclose(ours[:, :, 1], ref, atol=1e-4)
    assert ours[31, 30, 0] > 10 * ours[12, 12, 0]


def test_vessel_inpainting_removes_a_line_and_keeps_a_cmb():
    shape, sp = (64, 64, 6), (0.9, 0.9, 2.0)
    rel = np.full(shape, 0.8, dtype=np.float32)
    rel[30:32, 4:60, :] = 0.3  # a vessel across the slices
    yy, xx = np.mgrid[:64, :64]
    rel[(yy - 12) ** 2 + (xx - 50) ** 2 < 5, 3] = 0.1  # a CMB
    mask = np.ones(shape, dtype=bool)
    out, vessels = suppress_vessels(rel, mask, sp, PrepConfig())
    assert vessels[30:32, 20:40, 3].mean() > 0.8
    assert not vessels[10:15, 48:53, 3].any()
    assert out[30:32, 20:40, 3].mean() > 0.7
    assert out[12, 50, 3] == pytest.approx(0.1)


def test_cleanup_components_rules():
    shape = (60, 60, 5)
    mask = np.zeros(shape, dtype=bool)
    mask[5:55, 5:55, :] = True
    lab = np.zeros(shape, dtype=np.int32)
    lab[29:32, 29:32, 2] = 1  # round and solid: kept
    lab[20, 20, 2] = 2  # one voxel: removed
    lab[8:11, 30:33, 2] = 3  # round but 3 voxels from the mask boundary: removed
    # a thin "L": eccentric and not solid
    lab[40:50, 40, 2] = 4
    lab[49, 40:50, 2] = 4
    out = cleanup_components(lab, mask)
    assert set(np.unique(out[out > 0])) == {1}
    out0 = cleanup_components(lab, mask, boundary_vox=0)
    assert set(np.unique(out0[out0 > 0])) == {1, 3}


def test_candidate_components_and_native_labels():
    prob = np.zeros((20, 20, 10), dtype=np.float32)
    prob[5:7, 5:7, 3] = [[0.3, 0.5], [0.25, 0.21]]
    prob[15, 15, 8] = 0.9
    prob[10, 10, 5] = 0.15  # below 0.2
    labels, cents, peaks = candidate_components(prob)
    assert labels.max() == 2
    np.testing.assert_allclose(peaks, [0.5, 0.9])
    np.testing.assert_allclose(cents[1], [15, 15, 8])
    # down-sampling to a coarser native grid loses nothing
    grid = WorkGrid((10, 10, 10), (20, 20, 10), (1.8, 1.8, 2.0), (True, True, False))
    native = labels_to_native(grid, labels, cents)
    assert set(np.unique(native[native > 0])) == {1, 2}


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0], [0.5, -0.5]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([1, 0])
    T, alpha = 4.0, 0.4

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kl = 0.0
    for sv, tv in zip(s.tolist(), t.tolist()):
        ps, pt = softmax([x / T for x in sv]), softmax([x / T for x in tv])
        kl += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    kl /= 2
    ce = 0.0
    for sv, label in zip(s.tolist(), y.tolist()):
        ce -= math.log(softmax(sv)[label])
    ce /= 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    # by hand: KL = (0.06872 + 0.00779) / 2 = 0.03826 (softened p_s = (0.4378, 0.5622),
    # (0.5622, 0.4378); p_t = (0.6225, 0.3775), (0.5, 0.5)); CE = -log 0.7311 = 0.31326 for
    # both samples; loss = 0.4 * 16 * 0.03826 + 0.6 * 0.31326 = 0.43275
    assert expected == pytest.approx(0.43275, abs=1e-4)
    assert float(kd_loss(s, t, y)) == pytest.approx(expected, rel=1e-6)
    # the teacher gets no gradient, the student does
    s2 = s.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    kd_loss(s2, t2, y).backward()
    assert t2.grad is None and s2.grad is not None
    assert float(kd_loss(s, s, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-5)


def test_voxel_weights_and_seg_loss():
    t = np.zeros((9, 9, 9), dtype=np.int64)
    t[4, 4, 4] = 1
    w = voxel_weights(t)
    assert w.max() == pytest.approx(6.0) and w[4, 4, 4] == w.max() and w.min() >= 1.0
    assert w[0, 0, 0] == pytest.approx(1.0, abs=1e-3)
    assert (voxel_weights(np.zeros((3, 3, 3))) == 1).all()
    tt = torch.from_numpy(t)[None]
    good = torch.stack([torch.from_numpy(20.0 * (1 - t)), torch.from_numpy(20.0 * t)])[None]
    bad = -good
    ww = torch.from_numpy(w)[None]
    assert float(seg_loss(good.float(), tt, ww)) < 0.01 < float(seg_loss(bad.float(), tt, ww))


# ---------------------------------------------------------------------------------------------
# working grid
# ---------------------------------------------------------------------------------------------

def test_work_grid_rule():
    rule = GridRule((0.9, 0.9, 2.0), 1.25)
    native = WorkGrid.for_scan((200, 210, 60), (0.8, 0.8, 2.4), rule)
    assert native.is_native and native.work_shape == (200, 210, 60)
    dou = WorkGrid.for_scan((512, 512, 150), (0.449, 0.449, 1.0), rule)
    assert dou.resampled == (True, True, True)
    assert dou.work_shape == (255, 255, 75)
    np.testing.assert_allclose(dou.work_spacing, [0.9, 0.9, 2.0], rtol=0.01)
    mixed = WorkGrid.for_scan((300, 300, 30), (0.6, 0.6, 5.0), rule)
    assert mixed.resampled == (True, True, True) and mixed.work_shape == (200, 200, 75)
    ijk = np.array([[0, 0, 0], [299, 299, 29], [150.5, 20, 7]])
    np.testing.assert_allclose(mixed.work_to_native(mixed.native_to_work(ijk)), ijk)
    img = np.random.default_rng(0).normal(size=(300, 300, 30)).astype(np.float32)
    w = mixed.to_work(img)
    assert w.shape == (200, 200, 75) and mixed.to_native(w).shape == img.shape
    with pytest.raises(ValueError):
        GridRule((0.9, 0.9), 1.25)
    with pytest.raises(ValueError):
        GridRule((0.9, 0.9, 2.0), 0.5)


# ---------------------------------------------------------------------------------------------
# checkpoints and plugins
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ck", CHECKPOINTS, ids=["dou2016", "sundaresan2023"])
def test_shipped_checkpoint_loads_weights_only(ck):
    meta = json.loads(ck.with_suffix(".json").read_text())
    state = torch.load(ck, map_location="cpu", weights_only=True)
    assert set(state) == {"nets", "config"}
    _, meta2 = load_bundle(ck)
    assert meta2["sha256"] == meta["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert ck.stat().st_size < 4 * 2 ** 20
    assert meta["datasets"]["train"]["name"] == "SYNTH-train"
    assert meta["datasets"]["val"]["name"] == "SYNTH-val"
    assert meta["datasets"]["train"]["version"] and meta["recipe"]["name"] == ck.stem
    assert "SYNTH-test" not in json.dumps(meta["datasets"])
    assert not set(meta["datasets"]["train"]["scan_ids"]) & set(
        meta["datasets"]["val"]["scan_ids"])
    assert meta["training_seconds"] > 0 and meta["hardware"]["torch"]


@pytest.mark.parametrize("ck", CHECKPOINTS, ids=["dou2016", "sundaresan2023"])
def test_tampered_checkpoint_is_refused(ck, tmp_path):
    copy = tmp_path / ck.name
    shutil.copy(ck, copy)
    shutil.copy(ck.with_suffix(".json"), copy.with_suffix(".json"))
    load_bundle(copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    cls = Dou2016 if "dou" in ck.name else Sundaresan2023
    with pytest.raises(ConfigurationError, match="sha256") as err:
        cls(checkpoint=str(copy)).load()
    assert "\n" not in str(err.value)
    copy.with_suffix(".json").unlink()
    with pytest.raises(ConfigurationError, match="JSON"):
        load_bundle(copy)


def test_pickled_code_is_refused_even_with_matching_sha(tmp_path):
    ck = tmp_path / "evil.pt"
    torch.save({"nets": {}, "config": {}, "payload": Path("/")}, ck)  # not a weight type
    ck.with_suffix(".json").write_text(json.dumps(
        {"sha256": hashlib.sha256(ck.read_bytes()).hexdigest()}))
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        load_bundle(ck)


def _phantom(shape, spacing, orientation="RAS", seed=0, radius_mm=1.6,
             cmbs=((0.4, 0.45, 0.5), (0.6, 0.6, 0.5))):
    """A brain-like ellipsoid (tissue ~1000, noise) with dark spheres; image, affine, labels."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)],
                        indexing="ij")
    ext = np.array(shape) * sp
    r = np.sqrt(sum((g / (0.45 * e)) ** 2 for g, e in zip(grids, ext)))
    img = np.where(r < 1, 1000.0, 5.0)
    labels = np.zeros(shape, np.int16)
    for n, c in enumerate(cmbs, start=1):
        ball = sphere(shape, np.array(c) * (np.array(shape) - 1), radius_mm, sp)
        img[ball] = 250.0
        labels[ball] = n
    img = img + rng.normal(0, 20, shape)
    return img.astype(np.float32), affine_for(tuple(sp), orientation, shape), labels


@pytest.fixture(scope="module")
def dou():
    m = Dou2016(threads=2)
    m.load()
    return m


@pytest.fixture(scope="module")
def sundaresan():
    m = Sundaresan2023(threads=2)
    m.load()
    return m


@pytest.mark.parametrize("geometry", [((90, 84, 24), (0.9, 0.9, 2.0), "RAS"),
                                      ((121, 117, 13), (0.55, 0.55, 4.0), "LPS")])
@pytest.mark.parametrize("which", ["dou", "sundaresan"])
def test_plugin_predict_geometry(which, geometry, request):
    method = request.getfixturevalue(which)
    shape, spacing, orientation = geometry
    img, aff, _ = _phantom(shape, spacing, orientation)
    pred = method.predict(ScanInput("p", img, aff, sequence="SWI", seed=1))
    assert pred.probability.shape == img.shape and pred.probability.dtype == np.float32
    assert np.isfinite(pred.probability).all()
    assert pred.probability.min() >= 0 and pred.probability.max() < 1
    cands = pred.candidates
    assert {"i", "j", "k", "score"} <= set(cands.columns)
    if len(cands):
        ijk = cands[["i", "j", "k"]].to_numpy()
        assert (ijk >= 0).all() and (ijk <= np.array(shape) - 1).all()
        assert cands["score"].between(0, 1).all()
        if which == "dou":  # each detection's ball is painted with its score
            for (i, j, k), s in zip(np.rint(ijk).astype(int), cands["score"]):
                assert pred.probability[i, j, k] == pytest.approx(s, abs=1e-6)


def test_plugins_are_registered_and_describe_themselves():
    from cmbbench.methods.registry import available_methods, method_info

    for name in ("dou2016", "sundaresan2023"):
        assert name in available_methods()
        info = method_info(name)
        assert info["requirements"]["torch"] and info["requirements"]["trainable"]
        for key in ("citation", "description", "limitations", "resolution_rule"):
            assert len(info[key]) > 60, key
    with pytest.raises(TypeError):
        Dou2016(nope=1)
    with pytest.raises(TypeError):
        Sundaresan2023(classifier="other")


def test_recipes_are_shipped_and_checked():
    for name, method in (("dou2016-synth-v1", "dou2016"),
                         ("sundaresan2023-synth-v1", "sundaresan2023")):
        rec = load_recipe(name, method=method)
        assert rec["train"]["dataset"] == "SYNTH-train" and rec["val"]["dataset"] == "SYNTH-val"
        assert rec["max_minutes"] > 0 and "seed" in rec
    with pytest.raises(ConfigurationError, match="available: dou2016-synth-v1"):
        load_recipe("nope", method="dou2016")
    with pytest.raises(ConfigurationError, match="is for method"):
        load_recipe("dou2016-synth-v1", method="sundaresan2023")


def test_training_refuses_synth_test_and_init():
    from cmbbench_baselines.dou2016_train import train as train_dou
    from cmbbench_baselines.sundaresan2023_train import train as train_sun

    rec = dict(load_recipe("dou2016-synth-v1", method="dou2016"))
    rec["val"] = {"dataset": "SYNTH-test", "version": "1"}
    with pytest.raises(ConfigurationError, match="SYNTH-test"):
        train_dou(rec)
    with pytest.raises(ConfigurationError, match="not supported"):
        train_sun("sundaresan2023-synth-v1", init="x.pt")


# ---------------------------------------------------------------------------------------------
# slow end-to-end checks
# ---------------------------------------------------------------------------------------------

TINY = {
    "dou2016": {"name": "dou-tiny", "method": "dou2016", "seed": 1, "max_minutes": 3,
                "screen": {"c1": 4, "c2": 4, "fc": 8},
                "discr": {"c1": 4, "c2": 4, "c3": 4, "f1": 8, "f2": 4},
                "stage1": {"minutes": 0.2, "batch": 8, "val_every_minutes": 0.1},
                "mining": {"scans": 2}, "stage2": {"minutes": 0.2, "batch": 8,
                                                   "val_every_minutes": 0.1},
                "train": {"dataset": "SYNTH-train", "version": "1", "max_scans": 3},
                "val": {"dataset": "SYNTH-val", "version": "1", "max_scans": 2}},
    "sundaresan2023": {"name": "sun-tiny", "method": "sundaresan2023", "seed": 1,
                       "max_minutes": 3, "cdet": {"widths": [4, 4, 8]},
                       "teacher": {"widths": [4, 4, 8], "head": [8]},
                       "student": {"widths": [4, 4, 8], "head": [8]}, "init_from_cdet": True,
                       "cdet_stage": {"minutes": 0.2, "batch": 2, "patch": 24,
                                      "val_every_minutes": 0.1},
                       "mining": {"scans": 2},
                       "teacher_stage": {"minutes": 0.1, "batch": 4, "val_every_minutes": 0.1},
                       "student_stage": {"minutes": 0.1, "batch": 4, "val_every_minutes": 0.1},
                       "train": {"dataset": "SYNTH-train", "version": "1", "max_scans": 2},
                       "val": {"dataset": "SYNTH-val", "version": "1", "max_scans": 1}},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dou2016", "sundaresan2023"])
def test_train_via_cli_resume_and_evaluate(method, tmp_path):
    """Train a tiny model with ``cmbbench train`` (needs SYNTH-train/-val), re-run it (every
    stage is resumed, nothing retrained), then evaluate it on SYNTH-demo."""
    import yaml
    from click.testing import CliRunner

    from cmbbench.cli import main
    from cmbbench.evaluation import evaluate

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY[method]))
    out = tmp_path / "train"
    args = ["train", "--method", method, "--recipe", str(recipe), "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    best = Path(res.output.strip().splitlines()[-1])
    _, meta = load_bundle(best)
    assert meta["command"].startswith(f"cmbbench train --method {method}")
    assert meta["datasets"]["train"]["version"] == "1"

    def n_val() -> int:
        lines = (out / "log.jsonl").read_text().splitlines()
        return sum(json.loads(x)["kind"] == "val" for x in lines)

    before = n_val()
    res = CliRunner().invoke(main, args)  # every stage finished: nothing is trained again
    assert res.exit_code == 0, res.output
    assert n_val() == before
    cls = Dou2016 if method == "dou2016" else Sundaresan2023
    report = evaluate(cls(checkpoint=str(best)), "SYNTH-demo", out=tmp_path / "run")
    assert not report.failed and np.isfinite(report.result.aggregates["fp_per_scan"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dou2016", "sundaresan2023"])
def test_shipped_checkpoint_on_synth_demo(method, tmp_path):
    """The shipped checkpoint through ``cmbbench evaluate`` on SYNTH-demo."""
    from click.testing import CliRunner

    from cmbbench.cli import main

    res = CliRunner().invoke(main, ["evaluate", "--method", method, "--dataset", "SYNTH-demo",
                                    "--out", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output


def _point_scans() -> list:
    pool = np.argwhere(np.ones((8, 8, 4), bool))
    def scan(sid: str, centres: list) -> TrainScan:
        return TrainScan(sid, None, np.zeros((8, 8, 4), np.float32), np.ones((8, 8, 4), bool),
                         np.array(centres, float).reshape(-1, 3), None, None, pool)
    return [scan("a", [[2.0, 3.0, 1.0]]), scan("b", []), scan("c", [[6.0, 5.0, 2.0]])]


def test_point_sampler_positives_jitter_within_bounds_and_negatives_from_their_sources() -> None:
    """The baselines' shared sampler: positives lie within the jitter box of a CMB centre
    (half the jitter through-plane), mined lists are used once filled, and a scan set without
    CMBs yields negatives only."""
    scans = _point_scans()
    ps = PointSampler(scans, np.random.default_rng(0))
    seen = set()
    for _ in range(200):
        s, c, y = ps.point(pos_fraction=1.0, jitter=2.0)
        assert y == 1 and s in (0, 2)
        d = np.abs(c - scans[s].centres[0])
        assert d[0] <= 2.0 and d[1] <= 2.0 and d[2] <= 1.0
        seen.add(s)
    assert seen == {0, 2}
    ps.hits = [(1, np.array([4.0, 4.0, 2.0]))]
    ps.hard = [(2, np.array([7.0, 7.0, 3.0]))]
    assert all(ps.point(pos_fraction=1.0, jitter=2.0, hit_fraction=1.0)[:2][0] == 1
               for _ in range(20))
    for _ in range(20):
        s, c, y = ps.point(pos_fraction=0.0, jitter=2.0, hard_fraction=1.0)
        assert (s, y) == (2, 0) and np.array_equal(c, [7.0, 7.0, 3.0])
    none = PointSampler([scans[1]], np.random.default_rng(1))
    draws = [none.point(pos_fraction=1.0, jitter=2.0) for _ in range(50)]
    assert all(y == 0 and s == 0 for s, _, y in draws)
    assert len({tuple(c) for _, c, _ in draws}) > 10  # random pool voxels, not one spot

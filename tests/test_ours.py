"""Tests of the reference method "ours" (3D U-Net): training that can fail, the shipped
checkpoint, checkpoint integrity, geometry round trips, bad input, fine-tuning and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cmbbench.errors import ConfigurationError, InvalidValuesError, MissingInputError  # noqa: E402
from cmbbench.examples import affine_for, sphere  # noqa: E402
from cmbbench.methods.api import ScanInput  # noqa: E402
from cmbbench.methods.ours import DEFAULT_CHECKPOINT  # noqa: E402
from cmbbench.methods.ours.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cmbbench.methods.ours.losses import combined_loss  # noqa: E402
from cmbbench.methods.ours.plugin import Ours  # noqa: E402
from cmbbench.methods.ours.preprocess import (  # noqa: E402
    preprocess,
    resample_labels,
    to_native,
    work_to_native_index,
)
from cmbbench.methods.ours.unet import UNet3D  # noqa: E402

torch.set_num_threads(2)


def phantom(shape=(96, 96, 40), spacing=(1.0, 1.0, 2.5), orientation="RAS", seed=0,
            cmbs=((0.35, 0.5, 0.5), (0.62, 0.4, 0.55), (0.5, 0.68, 0.45)), radius_mm=2.0):
    """A head-like ellipsoid (tissue ~1, ventricle-like bright CSF, noise) with dark spheres;
    returns image, affine, instance labels."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)],
                        indexing="ij")
    ext = np.array(shape) * sp
    r = np.sqrt(sum((g / (0.42 * e)) ** 2 for g, e in zip(grids, ext)))
    img = np.where(r < 1, 1.0, 0.03).astype(np.float32)
    vent = np.sqrt((grids[0] / 6) ** 2 + (grids[1] / 14) ** 2 + (grids[2] / 10) ** 2) < 1
    img[vent] = 1.6
    labels = np.zeros(shape, np.int16)
    for n, c in enumerate(cmbs, start=1):
        ball = sphere(shape, np.array(c) * (np.array(shape) - 1), radius_mm, sp)
        img[ball] = 0.15
        labels[ball] = n
    img = img + rng.normal(0, 0.04, shape).astype(np.float32)
    return img.astype(np.float32), affine_for(tuple(sp), orientation, shape), labels


# --------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS", "ASL"])
def test_preprocess_round_trip(orientation):
    img, aff, lab = phantom(orientation=orientation)
    pre = preprocess(img, aff)
    assert pre.image.dtype == np.float32 and pre.mask.any()
    wl = resample_labels(lab, aff, pre)
    assert set(np.unique(wl)) == set(np.unique(lab))
    back = to_native(wl, pre, order=0)
    assert back.shape == img.shape
    for n in range(1, 4):
        c_native = np.argwhere(lab == n).mean(0)
        c_back = np.argwhere(back == n).mean(0)
        c_idx = work_to_native_index(np.argwhere(wl == n).mean(0), pre)[0]
        sp = np.array([1.0, 1.0, 2.5])
        assert np.abs((c_back - c_native) * sp).max() < 1.5
        assert np.abs((c_idx - c_native) * sp).max() < 1.5


# --------------------------------------------------------------------------------------------
# training that can fail


def test_unet_overfits_tiny_set():
    torch.manual_seed(0)
    imgs, labs = [], []
    for s in range(2):
        img, _, lab = phantom(shape=(24, 24, 24), spacing=(1, 1, 1), seed=s,
                              cmbs=((0.3 + 0.2 * s, 0.5, 0.5), (0.7, 0.4 + 0.2 * s, 0.4)))
        img = (img - np.median(img)) / 0.2
        imgs.append(img)
        labs.append(lab > 0)
    x = torch.from_numpy(np.stack(imgs)[:, None])
    y = torch.from_numpy(np.stack(labs)).long()
    torch.set_flush_denormal(True)
    model = UNet3D((8, 16), deep_supervision=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(70):
        loss = combined_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    model.eval()
    with torch.no_grad():
        pred = torch.softmax(model(x), 1)[:, 1] > 0.5
    inter = (pred & y.bool()).sum().item()
    dice = 2 * inter / (pred.sum().item() + y.sum().item())
    assert float(loss.detach()) < 0.3 * first, (first, float(loss.detach()))
    assert dice > 0.7, dice


def test_dark_spots_and_hard_negative_sampling():
    from cmbbench.methods.ours.sampling import Case, PatchSampler, dark_spots

    rng = np.random.default_rng(0)
    img = rng.normal(0, 0.3, (40, 40, 40)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[4:36, 4:36, 4:36] = True
    lab = np.zeros(img.shape, np.uint8)
    img[9:12, 9:12, 9:12] = -6.0   # a 3-voxel CMB at (10,10,10) and a mimic at (30,30,30)
    img[29:32, 29:32, 29:32] = -6.0
    lab[9:12, 9:12, 9:12] = 1
    pts = dark_spots(img, mask, lab, z_max=-2.0)
    d_mimic = np.abs(pts - [30, 30, 30]).max(1)
    d_cmb = np.abs(pts - [10, 10, 10]).max(1)
    assert (d_mimic <= 1).any()                # the dark spot is found
    assert (d_cmb > 4).all()                   # nothing near the CMB is a negative
    case = Case("c", img, lab, mask, hard_voxels=np.array([[30, 30, 30]]))
    sampler = PatchSampler([case], 12, pos_fraction=0.0, hard_fraction=1.0, seed=1)
    for _ in range(20):
        patch, target = sampler.sample()
        assert patch.min() <= -6.0 and target.sum() == 0   # every crop holds the mimic
    sampler = PatchSampler([case], 12, pos_fraction=1.0, seed=1)
    assert all(sampler.sample()[1].sum() > 0 for _ in range(20))


def test_operating_remap_is_monotone_and_moves_the_threshold():
    from cmbbench.methods.ours.plugin import operating_remap

    p = np.linspace(0, 1, 1001)
    q = operating_remap(p, 0.8)
    assert np.all(np.diff(q) >= 0) and q[0] == 0 and abs(q[-1] - 1) < 1e-6
    assert abs(float(operating_remap(0.8, 0.8)) - 0.5) < 1e-6
    assert ((q >= 0.5) == (p >= 0.8 - 1e-9)).all()
    assert np.array_equal(operating_remap(p, None), p.astype(np.float32))
    # a saturated network's threshold near 1 is kept, not clipped to a lower one
    near = np.array([0.9999, 0.99991, 0.99993, 0.99999], np.float32)
    assert (operating_remap(near, 0.99992) >= 0.5).tolist() == [False, False, True, True]
    # probabilities a rounding error above 1 stay scores in [0, 1]
    over = operating_remap(np.array([1.0000001, 1.0], np.float32), 0.999994)
    assert over.max() <= 1.0 and over.min() >= 0.5


def test_deep_supervision_outputs():
    model = UNet3D((4, 8, 16), deep_supervision=True).train()
    outs = model(torch.zeros(1, 1, 16, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16, 16), (8, 8, 8)]
    y = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    y[0, 8, 8, 8] = 1
    assert torch.isfinite(combined_loss(outs, y))
    assert model.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


# --------------------------------------------------------------------------------------------
# checkpoint integrity


def test_shipped_checkpoint_loads_weights_only():
    meta = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    state = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert "state_dict" in state
    model, meta2 = load_checkpoint(DEFAULT_CHECKPOINT)
    assert meta2["sha256"] == meta["sha256"]
    assert DEFAULT_CHECKPOINT.stat().st_size < 8 * 2 ** 20
    # every stage's data are recorded, none of them SYNTH-test: the U-Net's (train/val) and,
    # for a two-stage checkpoint, the classifier's (its own train split, the calibration split)
    unet_data = meta.get("unet_datasets") or meta["datasets"]
    assert unet_data["train"]["scan_ids"] and unet_data["val"]["scan_ids"]
    if meta.get("stage") == "classifier":
        cls_ids = set(meta["datasets"]["classifier_train"]["scan_ids"])
        assert cls_ids and not cls_ids & set(unet_data["train"]["scan_ids"])
        assert meta["datasets"]["calibrate"]["scan_ids"]
    assert "SYNTH-test" not in json.dumps(meta["datasets"]) + json.dumps(unet_data)


def test_tampered_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "m.pt"
    shutil.copy(DEFAULT_CHECKPOINT, ck)
    shutil.copy(DEFAULT_CHECKPOINT.with_suffix(".json"), ck.with_suffix(".json"))
    load_checkpoint(ck)
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    with pytest.raises(ConfigurationError, match="sha256") as err:
        load_checkpoint(ck)
    assert "\n" not in str(err.value)
    ck.with_suffix(".json").unlink()
    with pytest.raises(ConfigurationError, match="JSON"):
        load_checkpoint(ck)


def test_pickled_code_is_refused_even_with_matching_sha(tmp_path):
    import hashlib

    ck = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "model": {}, "payload": Path("/")}, ck)  # not a weight type
    ck.with_suffix(".json").write_text(json.dumps(
        {"sha256": hashlib.sha256(ck.read_bytes()).hexdigest()}))
    with pytest.raises(ConfigurationError, match="cannot be loaded"):
        load_checkpoint(ck)


def test_save_load_round_trip(tmp_path):
    m = UNet3D((4, 8))
    meta = save_checkpoint(m, tmp_path / "x.pt", {"recipe": {"work_mm": 1.0}})
    m2, meta2 = load_checkpoint(tmp_path / "x.pt")
    assert meta2["sha256"] == meta["sha256"]
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# shipped checkpoint finds CMBs


@pytest.fixture(scope="module")
def ours():
    m = Ours()
    m.load()
    return m


def test_shipped_checkpoint_finds_cmbs_on_a_generated_scan(ours):
    """The whole shipped pipeline (U-Net, candidate classifier, location rule, operating
    threshold) on a scan made by the synthetic generator (3 T SWI, 1 x 1 x 2 mm, 8 CMBs,
    realistic anatomy and mimics): most CMBs are found above the operating point of 0.5, and
    few false positives are."""
    from cmbbench.matching import get_rule
    from cmbbench.scoring import score_case
    from cmbbench.synth.anatomy import load_atlas
    from cmbbench.synth.generator import generate_scan
    from cmbbench.synth.recipe import load_recipe

    g = generate_scan(load_recipe("SYNTH-val"), 0, atlas=load_atlas(),
                      overrides={"n_cmb": 8, "inplane_mm": 1.0, "slice_thickness_mm": 2.0,
                                 "gap_mm": 0.0, "protocol": "swi_3t_3d"})
    assert ours.use_classifier
    pred = ours.predict(ScanInput("g", g.image.astype(np.float32), g.affine, sequence="SWI"))
    table = score_case(scan_id="g", lesions=g.lesions, image_shape=g.image.shape,
                       image_affine=g.affine, rule=get_rule("cmbbench"), ref_labels=g.labels,
                       prediction=pred.probability).table
    ref = table[table["kind"] == "reference"]
    cand = table[table["kind"] == "candidate"]
    assert len(ref) == 8
    found = int((ref["score"].fillna(0) >= 0.5).sum())
    false_pos = int(((cand["lesion_id"] < 0) & (cand["score"] >= 0.5)).sum())
    assert found >= 6 and false_pos <= 2, (found, false_pos)


def test_shipped_unet_finds_cmbs_in_a_phantom():
    """The shipped U-Net alone (``classifier=False``) on a toy phantom: flat tissue, a bright
    ventricle and three very dark 5 mm spheres deep inside. (The candidate classifier rejects
    these toy CMBs: large, extremely dark blobs 25-29 mm below the brain surface look like the
    deep iron and calcifications it was trained to reject; see docs/methods.md.)"""
    ours = Ours(classifier=False)
    img, aff, lab = phantom(shape=(120, 120, 48), spacing=(0.9, 0.9, 2.0), radius_mm=2.5)
    pred = ours.predict(ScanInput("p", img, aff, sequence="T2S"))
    assert pred.probability.shape == img.shape
    assert 0 <= pred.probability.min() and pred.probability.max() <= 1
    from scipy import ndimage

    # every CMB is a clear candidate (peak well above the 0.1 candidate floor), and the three
    # CMBs are the three best-scoring things in the scan (FROC ranking): nothing away from
    # them scores as high as the weakest of them
    peaks = [float(pred.probability[lab == n].max()) for n in range(1, 4)]
    assert min(peaks) >= 0.3, peaks
    near = ndimage.binary_dilation(lab > 0, iterations=3)
    elsewhere = float(pred.probability[~near].max())
    assert elsewhere < min(peaks), (peaks, elsewhere)
    cands = pred.candidates
    assert len(cands[cands["score"] >= 0.5]) <= 3


def test_logit_scores_keep_the_ranking_where_probabilities_saturate(ours):
    """``score=logit``: one sliding-window pass gives both maps; thresholds select the same
    voxels under either score; the tempered map ranks what float32 probabilities tie at 1."""
    from cmbbench.methods.ours.infer import sliding_window, tempered, tempered_threshold
    from cmbbench.methods.ours.plugin import Ours

    img, aff, lab = phantom(shape=(120, 120, 48), spacing=(0.9, 0.9, 2.0), radius_mm=2.5)
    ours.load()
    pre = preprocess(img, aff, work_mm=ours.work_mm)
    prob, d = sliding_window(ours.model, pre.image, pre.mask, output="both")
    assert prob.shape == d.shape == pre.image.shape
    # one tile (no overlap to average over): p = sigmoid(d) to rounding
    p1, d1 = sliding_window(ours.model, pre.image[:64, :64, :64], None, output="both")
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-d1.astype(np.float64))), atol=1e-4)
    for p in (0.05, 0.1, 0.5, 0.9):
        t = tempered(d)
        assert np.array_equal(t > tempered_threshold(p), d > np.log(p / (1 - p)))
    # float32 sigmoid ties at exactly 1 from d ~ 17 on; tempered scores stay ordered
    big = np.array([18.0, 25.0, 40.0, 60.0], np.float32)
    assert len(set(tempered(big).tolist())) == 4
    assert len(set((1 / (1 + np.exp(-big))).astype(np.float32).tolist())) == 1

    logit = Ours(score="logit")
    logit.model, logit.meta = ours.model, ours.meta
    pred = logit.predict(ScanInput("p", img, aff, sequence="T2S"))
    peaks = [float(pred.probability[lab == n].max()) for n in range(1, 4)]
    from scipy import ndimage

    near = ndimage.binary_dilation(lab > 0, iterations=3)
    assert float(pred.probability[~near].max()) < min(peaks)
    with pytest.raises(ConfigurationError, match="score must be one of"):
        Ours(score="rank")


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_dimensions(ours):
    with pytest.raises(InvalidValuesError, match="3D"):
        ours.predict(ScanInput("x", np.zeros((64, 64), np.float32), np.eye(4)))
    with pytest.raises(InvalidValuesError, match="3D"):
        ours.predict(ScanInput("x", np.zeros((32, 32, 16, 3), np.float32), np.eye(4)))
    img, aff, _ = phantom(shape=(48, 48, 20))
    pred = ours.predict(ScanInput("x", img[..., None], aff))  # trailing singleton: squeezed
    assert pred.probability.shape == img.shape


def test_nans_are_replaced(ours):
    img, aff, _ = phantom(shape=(48, 48, 20))
    img[:5] = np.nan
    pred = ours.predict(ScanInput("x", img, aff))
    assert np.isfinite(pred.probability).all()
    with pytest.raises(InvalidValuesError, match="finite"):
        ours.predict(ScanInput("x", np.full((32, 32, 16), np.nan, np.float32), aff))


def test_extreme_anisotropy_and_far_resolution(ours, caplog):
    img, aff, _ = phantom(shape=(240, 240, 14), spacing=(0.4, 0.4, 7.0))
    with caplog.at_level("WARNING"):
        pred = ours.predict(ScanInput("x", img, aff))
    assert pred.probability.shape == img.shape
    assert "training envelope" in caplog.text
    img, aff, _ = phantom(shape=(50, 50, 40), spacing=(3.0, 3.0, 3.0))
    pred = ours.predict(ScanInput("x", img, aff))
    assert pred.probability.shape == img.shape
    with pytest.raises(InvalidValuesError, match="voxel size"):
        ours.predict(ScanInput("x", img, np.diag([0.01, 0.01, 0.01, 1.0])))
    with pytest.raises(InvalidValuesError, match="voxel size"):
        ours.predict(ScanInput("x", img, np.diag([1.0, 1.0, 20.0, 1.0])))


# --------------------------------------------------------------------------------------------
# fine-tuning, resume and the CLI


def _tiny_dataset(root: Path) -> Path:
    from cmbbench.dataset import DatasetWriter
    from cmbbench.harmonize import lesions_from_labels
    from cmbbench.model import ScanInfo

    w = DatasetWriter(root, name="TINY", version="1")
    for s in range(3):
        img, aff, lab = phantom(shape=(64, 64, 24), spacing=(1.0, 1.0, 2.5), seed=s)
        sid = f"tiny-{s}"
        w.add_scan(ScanInfo(sid, sequence="T2S"), img, aff, lab,
                   lesions_from_labels(lab, aff, scan_id=sid))
    w.close()
    return root


def test_finetune_and_resume_via_cli(tmp_path):
    from click.testing import CliRunner

    from cmbbench.cli import main

    ds = _tiny_dataset(tmp_path / "tiny")
    out = tmp_path / "ft"
    args = ["train", "--method", "ours", "--recipe", "ours-synth-v3", "--init",
            str(DEFAULT_CHECKPOINT), "--dataset", str(ds), "--out", str(out), "--steps", "2",
            "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    best = Path(res.output.strip().splitlines()[-1])
    meta = json.loads(best.with_suffix(".json").read_text())
    assert meta["init"]["sha256"] == json.loads(
        DEFAULT_CHECKPOINT.with_suffix(".json").read_text())["sha256"]
    tr, va = meta["datasets"]["train"]["scan_ids"], meta["datasets"]["val"]["scan_ids"]
    assert va and tr and not set(tr) & set(va)
    load_checkpoint(best)
    # resume continues from step 2
    args[args.index("--steps") + 1] = "3"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    vals = [e["step"] for e in log if e["kind"] == "val"]
    assert vals == [2, 3]


def test_recipe_init_and_synthetic_cmbs_in_training(tmp_path):
    """A recipe that names its starting checkpoint (``init``) and inserts synthetic CMBs:
    the run records the checkpoint it continued, and the sampler inserted CMBs."""
    import yaml

    from cmbbench.methods.ours.train import load_recipe, train

    ds = _tiny_dataset(tmp_path / "tiny")
    rec = load_recipe("ours-synth-v4")
    assert rec["init"] and float(rec["synthetic_cmbs"]["fraction"]) > 0
    rec = {k: v for k, v in rec.items() if not k.startswith("_")}
    rec["synthetic_cmbs"] = {**rec["synthetic_cmbs"], "per_protocol": 3, "fraction": 1.0}
    rec.pop("calibrate")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    lines: list[str] = []
    best = train(str(path), out=tmp_path / "run", dataset=str(ds), steps=2,
                 progress=lines.append)
    meta = json.loads(best.with_suffix(".json").read_text())
    shipped = DEFAULT_CHECKPOINT.parent / rec["init"]
    assert meta["init"]["sha256"] == json.loads(shipped.with_suffix(".json").read_text())[
        "sha256"]
    assert "--init" not in meta["command"]          # the recipe alone reproduces the run
    assert any(ln.startswith("rendered ") and "synthetic CMBs" in ln for ln in lines), lines
    assert meta["synthetic_cmbs_inserted"] >= 6    # 2 steps x batch 3 crops, 1-2 CMBs each


def test_train_refuses_synth_test_and_unknown_recipe():
    from cmbbench.methods.ours.train import load_recipe
    from cmbbench.methods.ours.training_data import open_split

    with pytest.raises(ConfigurationError, match="unknown training recipe"):
        load_recipe("nope")
    with pytest.raises(ConfigurationError, match="SYNTH-test"):
        open_split({"dataset": "SYNTH-test", "version": "1"})


def test_cmbbench_imports_without_torch():
    code = ("import sys, cmbbench, cmbbench.cli, cmbbench.evaluation, cmbbench.methods.registry;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_and_info():
    from cmbbench.methods.registry import available_methods, method_info

    assert "ours" in available_methods()
    info = method_info("ours")
    assert info["requirements"]["torch"] and info["requirements"]["trainable"]


def test_location_rule_subsets():
    from cmbbench.methods.ours.postprocess import (
        RULES,
        TissueMaps,
        keep_candidate,
        parse_rules,
    )

    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    surface = mask & ~np.pad(np.ones((12, 12, 12), bool), 4)
    csf = np.zeros_like(mask)
    csf[8:14, 8:14, 8:14] = True
    t = TissueMaps(mask, surface, csf, 1.0)
    outside, band, in_csf, tissue = (0, 0, 0), (3, 10, 10), (11, 11, 11), (6, 6, 15)
    assert keep_candidate(t, outside) == (False, "outside_brain")
    assert keep_candidate(t, band) == (False, "surface")
    assert keep_candidate(t, in_csf) == (False, "csf")
    assert keep_candidate(t, tissue) == (True, "parenchyma")
    only_mask = parse_rules("mask")
    assert keep_candidate(t, outside, rules=only_mask)[0] is False
    assert keep_candidate(t, band, rules=only_mask)[0] is True
    assert keep_candidate(t, in_csf, rules=only_mask)[0] is True
    assert keep_candidate(t, in_csf, rules=parse_rules("csf, mask")) == (False, "csf")
    assert parse_rules(None) == RULES and parse_rules("csf,mask") == ("mask", "csf")
    with pytest.raises(ValueError, match="unknown location rule"):
        parse_rules("mask,skull")
    with pytest.raises(ConfigurationError, match="unknown location rule"):
        Ours(rules="skull")
    assert Ours(rules="mask").rules == ("mask",)
    # without an explicit choice, the checkpoint's validated rules apply
    o = Ours()
    o.meta = {"operating": {"rules": ["mask", "csf"]}}
    assert o.rules == ("mask", "csf")


def test_inference_settings_default_to_the_checkpoints():
    """Candidate threshold, tile and overlap: explicit parameters, else the checkpoint's
    recorded ``recipe.infer`` (what its operating point was calibrated with), else 0.1/96/0.15."""
    bare = Ours()
    assert (bare.threshold, bare.patch, bare.overlap) == (0.1, 96, 0.15)
    o = Ours()
    o.meta = {"recipe": {"infer": {"threshold": 0.02, "patch": 64, "overlap": 0.5}}}
    assert (o.threshold, o.patch, o.overlap) == (0.02, 64, 0.5)
    given = Ours(threshold="0.3", patch="80", overlap=0.25)
    given.meta = o.meta
    assert (given.threshold, given.patch, given.overlap) == (0.3, 80, 0.25)


def test_training_record_names_data_home_portably(tmp_path, monkeypatch):
    """A training split under the data home is recorded as ``$CMBBENCH_HOME/...`` (shipped
    records name no machine's folders); a dataset elsewhere keeps its absolute path."""
    from cmbbench.methods.ours.training_data import DataRef

    home = tmp_path / "home"
    inside = home / "datasets" / "SYNTH-x-v1"
    inside.mkdir(parents=True)
    outside = tmp_path / "mine"
    outside.mkdir()
    monkeypatch.setenv("CMBBENCH_HOME", str(home))
    rec = DataRef("SYNTH-x", "1", inside, [("s1", None, None, "SWI", None)]).record()
    assert rec["path"] == "$CMBBENCH_HOME/datasets/SYNTH-x-v1"
    assert rec["scan_ids"] == ["s1"] and rec["version"] == "1"
    assert DataRef("mine", "0", outside, []).record()["path"] == str(outside.resolve())


def test_preprocessing_workers_do_not_change_the_cases(tmp_path):
    """Scans preprocessed by 2 processes give the same cases (arrays and random hard-negative
    centres) as in one process."""
    from cmbbench.dataset import read_dataset
    from cmbbench.methods.ours.training_data import DataRef, from_dataset, load_cases

    ds = read_dataset(_tiny_dataset(tmp_path / "tiny"))
    ref = DataRef(ds.name, "0", ds.root, from_dataset(ds, ds.scan_ids))
    hard = {"dark_z": -2.0, "mimic_voxels_per_instance": 5}
    one = load_cases(ref, 1.0, lambda m: None, margin=3, hard=hard, seed=7, workers=1)
    two = load_cases(ref, 1.0, lambda m: None, margin=3, hard=hard, seed=7, workers=2)
    assert len(one) == len(two) == len(ds.scan_ids)
    for a, b in zip(one, two):
        assert a.scan_id == b.scan_id
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.hard_voxels, b.hard_voxels)
        assert a.noise_sd == b.noise_sd and a.slice_mm == b.slice_mm
    assert any(len(c.hard_voxels) for c in one)


def test_batch_workers_stream_is_seeded_and_trains(tmp_path):
    """Batches made by DataLoader workers repeat for the same (seed, start step), differ for
    another start step, and a recipe with ``loader_workers`` trains and records its device."""
    import yaml

    from cmbbench.dataset import read_dataset
    from cmbbench.methods.ours.sampling import PatchSampler
    from cmbbench.methods.ours.train import _BatchStream, load_recipe, train
    from cmbbench.methods.ours.training_data import DataRef, from_dataset, load_cases

    root = _tiny_dataset(tmp_path / "tiny")
    ds = read_dataset(root)
    cases = load_cases(DataRef(ds.name, "0", ds.root, from_dataset(ds, ds.scan_ids)), 1.0,
                        lambda m: None, margin=3, workers=1)

    def make(s):
        return PatchSampler(cases, 21, pos_fraction=0.5, seed=s)

    def first(start, n=4):
        dl = torch.utils.data.DataLoader(_BatchStream(make, 2, 16, {}, 5, start),
                                         batch_size=None, num_workers=2)
        it = iter(dl)
        out = [next(it) for _ in range(n)]
        del it
        return out

    a, b, c = first(0), first(0), first(10)
    assert a[0][0].shape == (2, 1, 16, 16, 16) and a[0][1].shape == (2, 16, 16, 16)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # the two workers draw different batches

    rec = {k: v for k, v in load_recipe("ours-synth-v5").items() if not k.startswith("_")}
    assert rec["loader_workers"] > 0 and rec["init"]
    rec.update(loader_workers=2, batch=2, patch=24, val_every=2, val_every_minutes=1e6)
    rec.pop("synthetic_cmbs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    lines: list[str] = []
    best = train(str(path), out=tmp_path / "run", dataset=str(root), steps=3, device="cpu",
                 calibrate_after=False, progress=lines.append)
    meta = json.loads(best.with_suffix(".json").read_text())
    assert meta["total_steps"] == 3 and "--device cpu --no-calibrate" in meta["command"]
    assert meta["hardware"]["cuda"] in (True, False)
    assert "operating" not in meta  # calibration left for later
    assert any("2 batch worker(s)" in ln for ln in lines), lines
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "val"] == [2, 3]

    # a run trained elsewhere is calibrated here without training further (a larger step
    # budget would otherwise resume training)
    sha = meta["sha256"]
    best = train(str(path), out=tmp_path / "run", dataset=str(root), steps=50, device="cpu",
                 calibrate_only=True, progress=lines.append)
    meta = json.loads(best.with_suffix(".json").read_text())
    assert meta["sha256"] == sha and meta["total_steps"] == 3
    assert meta["operating"]["chosen"] in meta["operating"]["variants"]
    assert meta["last_command"].endswith("--calibrate-only")
    log2 = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log2) == len(log)  # no step, no validation
    with pytest.raises(MissingInputError, match="nothing to calibrate"):
        train(str(path), out=tmp_path / "empty", dataset=str(root), calibrate_only=True)


def test_unknown_device_is_refused():
    from cmbbench.methods.ours.train import _resolve_device

    with pytest.raises(ConfigurationError, match="unknown device"):
        _resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="no CUDA device"):
            _resolve_device("cuda")
    assert _resolve_device("cpu").type == "cpu"


def test_training_record_hashes_the_split_it_read(tmp_path):
    """``scans_sha256``: one digest over the split's image and label bytes, named as in
    ``dataset.json`` (so it can be checked against the card's checksums), and only theirs."""
    from cmbbench.dataset import digest_of_checksums, read_dataset
    from cmbbench.methods.ours.training_data import DataRef, from_dataset

    ds = read_dataset(_tiny_dataset(tmp_path / "tiny"))
    ids = ds.scan_ids[:2]
    rec = DataRef(ds.name, "0", ds.root, from_dataset(ds, ids)).record()
    mine = {k: v for k, v in ds.card["checksums"].items() if Path(k).stem.split(".")[0] in ids}
    assert len(mine) == 4  # two images, two label maps
    assert rec["scans_sha256"] == digest_of_checksums(mine)
    other = DataRef(ds.name, "0", ds.root, from_dataset(ds, ds.scan_ids[1:3])).record()
    assert other["scans_sha256"] != rec["scans_sha256"]
    (ds.root / "labels" / f"{ids[0]}.nii.gz").write_bytes(b"not the same bytes")
    again = DataRef(ds.name, "0", ds.root, from_dataset(ds, ids)).record()
    assert again["scans_sha256"] != rec["scans_sha256"]

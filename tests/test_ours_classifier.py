"""Tests of the second stage of "ours": candidate features (shape, contrast, symmetry), the
classifier, its training command (``stage: classifier`` recipes) and its use by the plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cmbbench.errors import ConfigurationError  # noqa: E402
from cmbbench.examples import affine_for, sphere  # noqa: E402
from cmbbench.methods.api import ScanInput  # noqa: E402
from cmbbench.methods.ours import DEFAULT_CHECKPOINT  # noqa: E402
from cmbbench.methods.ours.checkpoint import load_ours, save_checkpoint  # noqa: E402
from cmbbench.methods.ours.classifier import (  # noqa: E402
    FEATURES,
    candidate_features,
    fit_classifier,
    rescore_map,
)
from cmbbench.methods.ours.infer import extract_candidates  # noqa: E402
from cmbbench.methods.ours.plugin import Ours  # noqa: E402
from cmbbench.methods.ours.train_classifier import ScanCandidates  # noqa: E402

torch.set_num_threads(2)
F = {name: n for n, name in enumerate(FEATURES)}


def _head(shape=(80, 80, 60)):
    g = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt(sum((x / (0.45 * n)) ** 2 for x, n in zip(g, shape)))
    return (r < 1), g


def test_features_tell_blobs_from_tubes_and_bilateral_spots():
    """A dark sphere, a dark tube through the box, and a mirrored pair of spheres: the Hessian
    and dark-region features separate blob from tube; the mirror feature sees the pair."""
    shape = (80, 80, 60)
    mask, g = _head(shape)
    img = np.zeros(shape, np.float32)
    c_blob = (20, 40, 30)
    img[sphere(shape, c_blob, 2.0, (1, 1, 1))] = -4
    tube = (np.abs(g[0] - 15) <= 1) & (np.abs(g[2] - 10) <= 1)          # along j
    img[tube] = -4
    c_tube = (int(round((shape[0] - 1) / 2 + 15)), 40, int(round((shape[2] - 1) / 2 + 10)))
    c_left = (int(round((shape[0] - 1) / 2 - 12)), 55, 20)
    c_right = (int(round((shape[0] - 1) / 2 + 12)), 55, 20)
    for c in (c_left, c_right):
        img[sphere(shape, c, 1.5, (1, 1, 1))] = -4
    img[~mask] = 0
    prob = np.zeros(shape, np.float32)
    for c in (c_blob, c_tube, c_left):
        prob[tuple(slice(v - 1, v + 2) for v in c)] = 0.9
    logodds = np.where(prob > 0, 2.2, -10).astype(np.float32)
    lab, rows = extract_candidates(prob, threshold=0.1)
    rows = sorted(rows, key=lambda r: (r["i"], r["j"]))
    by = {}
    for r in rows:
        c = (r["i"], r["j"], r["k"])
        key = min([("blob", c_blob), ("tube", c_tube), ("left", c_left)],
                  key=lambda kv: np.abs(np.subtract(kv[1], c)).sum())[0]
        by[key] = r
    assert set(by) == {"blob", "tube", "left"}
    order = [by["blob"], by["tube"], by["left"]]
    x = candidate_features(img, mask, prob, logodds, lab, order, csf=np.zeros(shape, bool),
                           native_spacing_mm=(0.5, 0.5, 3.0))
    assert x.shape == (3, len(FEATURES)) and np.isfinite(x).all()
    blob, tub, left = x
    # a sphere curves in all three directions, a tube in two
    assert blob[F["hess1_blob"]] > 0.5 > tub[F["hess1_blob"]]
    assert blob[F["hess1_str"]] > 0 and tub[F["hess1_str"]] > 0          # dark: positive
    # the tube leaves the 15 mm box and is elongated; the sphere stays inside
    assert tub[F["dark_border"]] == 1.0 and blob[F["dark_border"]] == 0.0
    assert tub[F["dark_elong"]] > 3 * blob[F["dark_elong"]]
    # contrast of a -4 spot in a 0 background
    assert blob[F["contrast"]] < -3 and abs(blob[F["shell_med"]]) < 0.5
    # only the mirrored pair has a dark partner across the midline
    assert left[F["mirror_min"]] < -3 and blob[F["mirror_min"]] > -1
    assert left[F["x_abs"]] > 0 and blob[F["x_abs"]] > left[F["x_abs"]]
    # acquisition features: smallest and largest native voxel size
    assert left[F["inplane_mm"]] == 0.5 and left[F["slice_mm"]] == 3.0
    assert blob[F["logit"]] == pytest.approx(2.2)
    # depth below the mask surface, in mm: the blob is deeper than a spot near the edge
    assert 5 < blob[F["depth_mm"]] <= 40


def test_rescore_map_moves_each_peak_to_its_new_score():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[3:6, 3:6, 3:6] = 0.5
    prob[4, 4, 4] = 1.0
    prob[12:15, 12:15, 12:15] = 0.8
    prob[0, 19, 0] = 0.05                       # below the candidate threshold: dropped
    lab, rows = extract_candidates(prob, threshold=0.1)
    scores = np.array([0.2 if r["i"] < 10 else 0.9 for r in rows])
    out = rescore_map(prob, lab, rows, scores)
    assert out[4, 4, 4] == pytest.approx(0.2) and out[3, 3, 3] == pytest.approx(0.1)
    assert out[13, 13, 13] == pytest.approx(0.9)
    assert out[0, 19, 0] == 0 and out.dtype == np.float32


def test_classifier_learns_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, len(FEATURES))).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 3] * x[:, 4]) > 0.3).astype(np.int8)   # partly non-linear
    a = fit_classifier(x, y, hidden=(16,), epochs=400, seed=3)
    b = fit_classifier(x, y, hidden=(16,), epochs=400, seed=3)
    pa = a.predict(x)
    np.testing.assert_array_equal(pa, b.predict(x))
    assert ((pa > 0.5) == (y > 0)).mean() > 0.9
    lin = fit_classifier(x, y, hidden=(), epochs=400, seed=3)
    assert ((lin.predict(x) > 0.5) == (y > 0)).mean() > 0.75
    with pytest.raises(ValueError, match="both classes"):
        fit_classifier(x, np.zeros(300), epochs=2)


def test_scan_candidates_cache_round_trip(tmp_path):
    rows = __import__("pandas").DataFrame({"label": [1, 2], "i": [1, 5], "j": [1, 5],
                                           "k": [1, 5], "score": [0.9, 0.5],
                                           "kept": [True, False]})
    vox = (np.array([0, 7, 9]), np.array([0.9, 0.5, 0.45], np.float32),
           np.array([1, 2, 2], np.int32))
    sc = ScanCandidates("s", (4, 4, 4), rows, np.ones((2, len(FEATURES)), np.float32),
                        np.array([1, 0], np.int8), vox)
    p = tmp_path / "s.npz"
    sc.save(p, "key-a")
    assert ScanCandidates.load(p, "key-b") is None            # another U-Net or feature set
    got = ScanCandidates.load(p, "key-a")
    assert got is not None and got.rows.equals(sc.rows) and got.shape == (4, 4, 4)
    m = got.rebuild(np.array([0.45, 1.0]))
    assert m.ravel()[0] == pytest.approx(0.45) and m.ravel()[7] == pytest.approx(1.0)
    assert m.ravel()[9] == pytest.approx(0.9) and m.sum() == pytest.approx(0.45 + 1.0 + 0.9)


def _cls_dataset(root: Path, name: str = "TINYCLS", seeds: range = range(6)) -> Path:
    """Small scans (one per seed) in a head-like ellipsoid, each with three dark spheres
    (CMBs), two dark tubes (veins) and a bilateral pair of dark spheres (calcification-like),
    the last two unlabelled."""
    from cmbbench.dataset import DatasetWriter
    from cmbbench.harmonize import lesions_from_labels
    from cmbbench.model import ScanInfo

    w = DatasetWriter(root, name=name, version="1")
    shape, sp = (72, 72, 32), (1.0, 1.0, 2.0)
    for s in seeds:
        rng = np.random.default_rng(s)
        mask, g = _head(shape)
        img = np.where(mask, 1.0, 0.03).astype(np.float32)
        lab = np.zeros(shape, np.int16)
        for n in range(3):
            c = np.array([rng.uniform(22, 50), rng.uniform(22, 50), rng.uniform(10, 22)])
            ball = sphere(shape, c, 2.5, sp)
            img[ball] = 0.15
            lab[ball] = n + 1
        for off in (-14, 14):
            img[(np.abs(g[0] - off) <= 1) & (np.abs(g[2] - rng.integers(-4, 5)) <= 0.5)
                & mask] = 0.2
            # a bilateral pair of unlabelled dark spots (calcification-like mimics)
            img[sphere(shape, (35.5 + off, 58, 16), 2.0, sp)] = 0.15
        img += rng.normal(0, 0.04, shape).astype(np.float32)
        aff = affine_for(sp, "RAS", shape)
        sid = f"cls-{s}"
        w.add_scan(ScanInfo(sid, sequence="T2S"), img, aff, lab,
                   lesions_from_labels(lab, aff, scan_id=sid))
    w.close()
    return root


def test_classifier_stage_trains_calibrates_and_is_used(tmp_path):
    """``cmbbench train`` with a ``stage: classifier`` recipe: the U-Net of ``init`` is copied
    unchanged, the classifier is fitted on the train split and compared with the U-Net's
    scores on the held-out split, a re-run reuses the candidate cache, and the plugin loads
    and applies the classifier (weights_only)."""
    import yaml
    from click.testing import CliRunner

    from cmbbench.cli import main
    from cmbbench.methods.ours.train import load_recipe

    ds = _cls_dataset(tmp_path / "cls")
    rec = {k: v for k, v in load_recipe("ours-synth-v8").items() if not k.startswith("_")}
    assert rec["stage"] == "classifier"
    rec["classifier"] = {**rec["classifier"], "epochs": 100}
    rec["infer"] = {"threshold": 0.02}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    out = tmp_path / "run"
    args = ["train", "--method", "ours", "--recipe", str(recipe), "--init",
            str(DEFAULT_CHECKPOINT), "--dataset", str(ds), "--out", str(out), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    best = Path(res.output.strip().splitlines()[-1])
    meta = json.loads(best.with_suffix(".json").read_text())
    assert meta["stage"] == "classifier"
    tr = meta["datasets"]["classifier_train"]["scan_ids"]
    ca = meta["datasets"]["calibrate"]["scan_ids"]
    assert tr and ca and not set(tr) & set(ca) and len(tr) + len(ca) == 6
    assert meta["classifier"]["n_candidates"] > meta["classifier"]["n_cmb_candidates"] > 0
    assert set(meta["operating"]["variants"]) == {"unet", "classifier"}
    assert meta["operating"]["classifier"] == (meta["operating"]["chosen"] == "classifier")
    model, clf, _ = load_ours(best)
    shipped, _, _ = load_ours(DEFAULT_CHECKPOINT)
    for (k, a), b in zip(model.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a, b), k                      # the U-Net is init's, unchanged
    assert clf is not None
    caches = sorted((out / "candidates").glob("*.npz"))
    assert len(caches) == 6
    stamps = [p.stat().st_mtime_ns for p in caches]
    res = CliRunner().invoke(main, args)                 # re-run: from the cache
    assert res.exit_code == 0, res.output
    assert [p.stat().st_mtime_ns for p in caches] == stamps
    # the plugin re-scores with the classifier, or not when told so
    from cmbbench.nifti import read_volume

    vol = read_volume(ds / "images" / "cls-0.nii.gz")
    scan = ScanInput("cls-0", np.asarray(vol.data), vol.affine, sequence="T2S")
    on = Ours(checkpoint=str(best), classifier=True)
    off = Ours(checkpoint=str(best), classifier=False)
    p_on, p_off = on.predict(scan), off.predict(scan)
    assert on.use_classifier and not off.use_classifier
    # the candidate threshold the checkpoint was calibrated with (the recipe's), unless given
    assert on.threshold == off.threshold == 0.02
    assert Ours(checkpoint=str(best), threshold=0.3).threshold == 0.3
    assert off.operating_threshold == pytest.approx(
        meta["operating"]["variants"]["unet"]["threshold"])
    assert on.operating_threshold == pytest.approx(
        meta["operating"]["variants"]["classifier"]["threshold"])
    assert len(p_on.candidates) == len(p_off.candidates) > 0
    assert not np.allclose(np.sort(p_on.candidates["score"]), np.sort(p_off.candidates["score"]))


def test_classifier_stage_pools_several_train_splits(tmp_path, monkeypatch):
    """A recipe whose ``train`` is a list of registry splits pools their candidates, records
    each split, and refuses a scan shared with the calibration split."""
    import yaml

    from cmbbench.methods.ours.train import load_recipe
    from cmbbench.methods.ours.train_classifier import train_classifier

    reg, home = tmp_path / "registry", tmp_path / "home"
    reg.mkdir()
    monkeypatch.setenv("CMBBENCH_REGISTRY", str(reg))
    monkeypatch.setenv("CMBBENCH_HOME", str(home))
    for name, seeds in (("TINYA", range(2)), ("TINYB", range(2, 4)), ("TINYC", range(4, 6))):
        (reg / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "version": "1", "kind": "real"}))
        _cls_dataset(home / "datasets" / f"{name}-v1", name, seeds)
    rec = {k: v for k, v in load_recipe("ours-synth-v8").items() if not k.startswith("_")}
    assert isinstance(rec["train"], list) and len(rec["train"]) == 3
    rec["classifier"] = {**rec["classifier"], "epochs": 50, "members": 2}
    rec["infer"] = {"threshold": 0.02}
    rec["train"] = [{"dataset": "TINYA", "version": "1"}, {"dataset": "TINYB", "version": "1"}]
    rec["calibrate"] = {"dataset": "TINYC", "version": "1"}
    ck = train_classifier(rec, out=tmp_path / "run", init=DEFAULT_CHECKPOINT)
    meta = json.loads(ck.with_suffix(".json").read_text())
    got = meta["datasets"]["classifier_train"]
    assert got["name"] == "TINYA+TINYB" and [p["name"] for p in got["parts"]] == ["TINYA",
                                                                                  "TINYB"]
    assert got["scan_ids"] == ["cls-0", "cls-1", "cls-2", "cls-3"]
    assert meta["datasets"]["calibrate"]["scan_ids"] == ["cls-4", "cls-5"]
    assert meta["classifier"]["n_scans"] == 4
    assert len(list((tmp_path / "run" / "candidates").glob("*.npz"))) == 6
    # the same scans in a train and the calibration split: refused before any work
    rec["train"] = [{"dataset": "TINYA", "version": "1"}, {"dataset": "TINYC", "version": "1"}]
    with pytest.raises(ConfigurationError, match="in both the train and the calibrate"):
        train_classifier(rec, out=tmp_path / "run2", init=DEFAULT_CHECKPOINT)
    rec["train"] = "TINYA"
    with pytest.raises(ConfigurationError, match="or a list of them"):
        train_classifier(rec, out=tmp_path / "run3", init=DEFAULT_CHECKPOINT)


def test_classifier_checkpoint_integrity(tmp_path):
    from cmbbench.methods.ours.classifier import CandidateClassifier

    model, _, _ = load_ours(DEFAULT_CHECKPOINT)
    clf = CandidateClassifier(len(FEATURES), (4,))
    path = tmp_path / "c.pt"
    save_checkpoint(model, path, {"recipe": {}}, classifier=clf)
    _, got, _ = load_ours(path)
    assert got is not None and got.hidden == (4,)
    # a classifier built on other features is refused, in one line
    state = torch.load(path, weights_only=True)
    state["classifier"]["features"] = list(FEATURES[:-1]) + ["something_else"]
    torch.save(state, path)
    from cmbbench.dataset import sha256_file

    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = sha256_file(path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ConfigurationError, match="other features"):
        load_ours(path)
    # asking for a classifier the checkpoint does not have
    with pytest.raises(ConfigurationError, match="no second-stage classifier"):
        Ours(checkpoint=str(DEFAULT_CHECKPOINT.parent / "ours-synth-v4.pt"),
             classifier=True).load()
    # the U-Net's tempered log-odds as the score: only without the classifier
    with pytest.raises(ConfigurationError, match="add classifier=false"):
        Ours(score="logit").load()
    unet_only = Ours(score="logit", classifier=False)
    unet_only.load()
    assert unet_only.score == "logit" and not unet_only.use_classifier

"""The synthetic dataset generator: determinism, ground truth, resume, bad recipes.

Recipes here are tiny (80 mm field of view, 32-40 mm slab, 1 mm in-plane) so each scan takes
about a second; the anatomy and physics are the real ones.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmbbench.dataset import read_dataset
from cmbbench.errors import ConfigurationError
from cmbbench.nifti import read_volume
from cmbbench.synth.generator import DRAW_THRESHOLD, MIMIC_CLASSES, generate_scan
from cmbbench.synth.make import make_dataset, scan_ids
from cmbbench.synth.recipe import SynthRecipe, recipe_from_card

TINY = dict(fov_mm=(80.0, 80.0), slab_mm=36.0, inplane_mm=(1.0, 1.0), positive_fraction=1.0,
            max_cmbs_per_scan=6, medullary_veins=(2, 4), cortical_veins=(1, 3))


def tiny_recipe(name: str = "SYNTH-tiny", seed: int = 7, n_scans: int = 3, **kw) -> SynthRecipe:
    return SynthRecipe(name=name, seed=seed, n_scans=n_scans, **{**TINY, **kw}).validate()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_files_and_different_seeds_differ(tmp_path: Path) -> None:
    a = make_dataset(tiny_recipe(n_scans=2), tmp_path / "a")
    b = make_dataset(tiny_recipe(n_scans=2), tmp_path / "b")
    c = make_dataset(tiny_recipe(n_scans=2, seed=8), tmp_path / "c")
    for sid in a.scan_ids:
        for folder in ("images", "labels", "mimics"):
            assert digest(a.root / folder / f"{sid}.nii.gz") == digest(b.root / folder / f"{sid}.nii.gz")
            assert digest(a.root / folder / f"{sid}.nii.gz") != digest(c.root / folder / f"{sid}.nii.gz") \
                or folder == "mimics"
    for name in ("scans.csv", "lesions.csv", "mimics.csv"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()


def test_lesions_are_dark_local_minima_with_bloomed_masks(tmp_path: Path) -> None:
    ds = make_dataset(tiny_recipe(n_scans=4, seed=11), tmp_path / "d")
    assert len(ds.lesions) >= 4
    for sid in ds.scan_ids:
        img = read_volume(ds.image_path(sid)).data.astype(np.float64)
        labels = read_volume(ds.label_path(sid)).data
        les = ds.lesions_of(sid)
        assert sorted(les["lesion_id"]) == sorted(int(v) for v in np.unique(labels) if v)
        for _, row in les.iterrows():
            mask = labels == row.lesion_id
            # the darkest voxel of the lesion's apparent extent is a local minimum (3x3x3)
            vals = np.where(mask, img, np.inf)
            v = np.unravel_index(int(np.argmin(vals)), img.shape)
            lo = np.maximum(np.array(v) - 1, 0)
            hi = np.minimum(np.array(v) + 2, img.shape)
            assert img[v] <= img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].min()
            # ... within one voxel of the recorded centroid's voxel (or the centroid is inside)
            c = np.rint([row.i, row.j, row.k]).astype(int)
            assert mask[tuple(c)] or np.abs(c - np.array(v)).max() <= 1
            # ... and clearly darker than its surroundings
            ring = np.zeros_like(mask)
            ring[max(v[0] - 4, 0):v[0] + 5, max(v[1] - 4, 0):v[1] + 5, v[2]] = True
            ring &= ~mask & (labels == 0) & (img > 0)
            if ring.sum() > 10:
                assert img[v] < 0.8 * np.median(img[ring])
            assert row.location in ("lobar", "deep", "infratentorial")
            assert row.mask_source == "rater" and row.diameter_mm > 0


def test_mimics_have_classes_and_maps(tmp_path: Path) -> None:
    ds = make_dataset(tiny_recipe(n_scans=2, seed=3, calcification_probability={
        "pallidum": 1.0, "choroid_plexus": 1.0}), tmp_path / "m")
    assert ds.mimics is not None and len(ds.mimics)
    assert set(ds.mimics["mimic_class"]) <= set(MIMIC_CLASSES)
    for sid in ds.scan_ids:
        m = read_volume(ds.root / "mimics" / f"{sid}.nii.gz").data
        rows = ds.mimics[ds.mimics["scan_id"] == sid]
        assert sorted(rows["mimic_id"]) == sorted(int(v) for v in np.unique(m) if v)


def test_positive_fraction_zero_gives_cmb_free_scans(tmp_path: Path) -> None:
    ds = make_dataset(tiny_recipe(n_scans=2, positive_fraction=0.0), tmp_path / "n")
    assert len(ds.lesions) == 0
    assert (ds.scans["n_cmb"] == 0).all()


def test_acquisition_parameters_recorded(tmp_path: Path) -> None:
    ds = make_dataset(tiny_recipe(n_scans=4, balanced_protocols=True), tmp_path / "p")
    sc = ds.scans
    assert set(sc["protocol"]) == {"swi_3t_3d", "swi_15t_3d", "t2s_15t_2d", "t2s_3t_2d"}
    for _, row in sc.iterrows():
        img = read_volume(ds.image_path(row.scan_id))
        assert np.allclose(img.spacing_mm, [row.voxel_mm_x, row.voxel_mm_y, row.voxel_mm_z],
                           atol=1e-4)
        assert row.voxel_mm_z == pytest.approx(row.slice_thickness_mm + row.gap_mm, abs=1e-3)
        assert row.sequence in ("SWI", "T2S") and row.field_strength_t in (1.5, 3.0)
        assert "".join(__import__("nibabel").aff2axcodes(img.affine)) == row.orientation


def _registry(tmp_path: Path, **fields) -> Path:
    reg = tmp_path / "registry"
    reg.mkdir(exist_ok=True)
    card = {"name": "SYNTH-tiny", "version": "1", "kind": "synthetic", "seed": 5, "n_scans": 4,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}, **fields}
    (reg / "SYNTH-tiny.yaml").write_text(yaml.safe_dump(card))
    return reg


def _cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmbbench.cli", *args], env=env,
                          capture_output=True, text=True, **kw)


def test_interrupted_make_resumes_without_redoing_finished_scans(tmp_path: Path) -> None:
    env = {**os.environ, "CMBBENCH_REGISTRY": str(_registry(tmp_path))}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cmbbench.cli", "datasets", "make",
                             "SYNTH-tiny", "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    shards = out / ".shards"
    while time.monotonic() < deadline:
        if shards.is_dir() and len(list(shards.glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in shards.glob("*.json"))
    assert 1 <= len(done) < 4, "kill came too late to test resuming"
    assert not (out / "dataset.json").exists()
    # every finished scan is complete; nothing half-written looks complete
    for name in done:
        sid = name[:-5]
        assert (out / "images" / f"{sid}.nii.gz").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.json")}
    res = _cli(["datasets", "make", "SYNTH-tiny", "--out", str(out), "--quiet"], env)
    assert res.returncode == 0, res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.json")
            if p.name in stamps} == stamps  # finished scans were not redone
    ds = read_dataset(out)
    assert ds.scan_ids == scan_ids(recipe_from_card(yaml.safe_load(
        (tmp_path / "registry" / "SYNTH-tiny.yaml").read_text())))
    # identical to an uninterrupted run
    ref = make_dataset(replace(tiny_recipe(n_scans=4, seed=5), name="SYNTH-tiny"), tmp_path / "ref")
    for sid in ds.scan_ids:
        assert digest(out / "images" / f"{sid}.nii.gz") == digest(ref.root / "images" / f"{sid}.nii.gz")


@pytest.mark.parametrize("fields, needle", [
    ({"positive_fraction": 1.5}, "positive_fraction"),
    ({"diameter_range_mm": [5.0, 2.0]}, "diameter_range_mm"),
    ({"protocols": {"swi_7t": 1.0}}, "unknown protocol"),
    ({"inplane_mm": [0.01, 0.5]}, "inplane_mm"),
    ({"colour": "red"}, "unknown field"),
])
def test_bad_recipes_give_one_line_errors(tmp_path: Path, fields: dict, needle: str) -> None:
    env = {**os.environ, "CMBBENCH_REGISTRY": str(_registry(tmp_path, **fields))}
    res = _cli(["datasets", "make", "SYNTH-tiny", "--out", str(tmp_path / "o")], env)
    assert res.returncode == ConfigurationError.exit_code
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "SYNTH-tiny" in lines[0]


def test_unknown_dataset_and_unwritable_output(tmp_path: Path) -> None:
    env = {**os.environ, "CMBBENCH_REGISTRY": str(_registry(tmp_path))}
    res = _cli(["datasets", "make", "SYNTH-nope"], env)
    assert res.returncode == 7 and "unknown dataset" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli(["datasets", "make", "SYNTH-tiny", "--out", str(blocker / "sub")], env)
    assert res.returncode == 3 and "not writable" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_same_folder_other_recipe_is_refused(tmp_path: Path) -> None:
    make_dataset(tiny_recipe(n_scans=1), tmp_path / "x")
    with pytest.raises(ConfigurationError, match="different recipe"):
        make_dataset(tiny_recipe(n_scans=1, seed=99), tmp_path / "x")


def test_folder_made_before_an_optional_field_existed_is_resumed(tmp_path: Path) -> None:
    """A recipe.json without a later-added optional field (at its default) is the same recipe;
    the same field at another value is not."""
    import json

    out = tmp_path / "x"
    make_dataset(tiny_recipe(n_scans=1), out)
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["recipe"].pop("swi_mip_mm") is None
    (out / "recipe.json").write_text(json.dumps(rec))
    ds = make_dataset(tiny_recipe(n_scans=1), out)  # resumes: nothing left to generate
    assert len(ds.scan_ids) == 1
    with pytest.raises(ConfigurationError, match="different recipe"):
        make_dataset(tiny_recipe(n_scans=1, swi_mip_mm=8.0), out)


def test_ground_truth_is_the_bloomed_extent() -> None:
    # The label of each CMB covers exactly the connected voxels whose signal the CMB alone
    # lowers by >= 30 %: regenerate one scan and compare with the recorded diameters.
    scan = generate_scan(tiny_recipe(seed=21), 0)
    assert DRAW_THRESHOLD == 0.3
    for _, row in scan.lesions.iterrows():
        n = int((scan.labels == row.lesion_id).sum())
        assert n == row.n_voxels > 0
        assert row.diameter_mm == pytest.approx((6 * row.volume_mm3 / np.pi) ** (1 / 3))


def test_optional_swi_minimum_intensity_projection() -> None:
    plain = generate_scan(tiny_recipe(seed=4), 0, overrides={"protocol": "swi_3t_3d"})
    mip = generate_scan(tiny_recipe(seed=4, swi_mip_mm=8.0), 0, overrides={"protocol": "swi_3t_3d"})
    assert mip.info["swi_mip_mm"] == 8.0 and plain.info["swi_mip_mm"] == 0.0
    # a sliding minimum never brightens a voxel and darkens some
    assert (mip.image <= plain.image).all() and (mip.image < plain.image).any()
    with pytest.raises(ConfigurationError, match="swi_mip_mm"):
        tiny_recipe(swi_mip_mm=-1.0)

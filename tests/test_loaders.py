"""Loaders of the public CMB datasets: fixtures written by the tests in each raw format.

Every fixture is a tiny "brain" (a bright ellipsoid) with dark spheres at known 0-based voxel
centres, stored with non-RAS affines (LPS, LAS), then prepared and checked lesion by lesion,
including world coordinates computed independently from the affine.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import openpyxl
import pandas as pd
import pytest
import scipy.io
from click.testing import CliRunner

from cmbbench.cli import main
from cmbbench.dataset import read_dataset
from cmbbench.errors import (
    CmbbenchError,
    GeometryMismatchError,
    InvalidValuesError,
    MissingInputError,
    UnreadableInputError,
)
from cmbbench.examples import affine_for, sphere
from cmbbench.harmonize import GrowRule, lesions_from_labels
from cmbbench.loaders import (
    LOCATION_REASON,
    dataset_statistics,
    prepare,
    statistics_markdown,
    verify_dataset,
)
from cmbbench.loaders.base import merge_duplicate_points, patient_split
from cmbbench.registry import load_card, resolve_dataset

SHAPE = (40, 36, 20)


# ------------------------------------------------------------------ fixture builders

def brain(shape=SHAPE, spacing=(1.0, 1.0, 1.0), centres=(), seed=0, radius_mm=1.5):
    """Bright ellipsoid 'brain' (100 +- 2) with dark spheres (20) at 0-based ``centres``.

    Returns image (float32) and the truth instance map (lesion n = centres[n-1])."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2.3) for n in shape], indexing="ij")
    inside = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= 1.0
    img = np.where(inside, 100.0 + rng.normal(0, 2, shape), 0.0).astype(np.float32)
    truth = np.zeros(shape, dtype=np.uint16)
    for n, c in enumerate(centres, start=1):
        ball = sphere(shape, c, radius_mm, spacing)
        img[ball] = 20.0
        truth[ball] = n
    return img, truth


def save_nii(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def save_xlsx(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wb = openpyxl.Workbook()
    ws = wb.active
    for r in rows:
        ws.append(r)
    wb.save(str(path))
    return path


def world(affine: np.ndarray, ijk) -> np.ndarray:
    """Independent voxel->world: explicit matrix product with a homogeneous 1."""
    v = np.c_[np.asarray(ijk, dtype=float), np.ones(len(ijk))]
    return (affine @ v.T).T[:, :3]


def card(name: str, loader: str, **extra) -> dict:
    return {"name": name, "version": "t", "kind": "real", "loader": loader, "split": "test",
            **extra}


LPS = affine_for((1.0, 1.0, 1.0), "LPS", SHAPE)
LAS = affine_for((1.0, 1.0, 1.0), "LAS", SHAPE)
C1 = [(12, 10, 8), (26, 22, 12), (20, 15, 5)]
C2 = [(15, 20, 10)]


def check_points_table(les: pd.DataFrame, centres, affine):
    """Lesion by lesion: 0-based voxel = centre, world = affine @ centre, derived mask."""
    assert len(les) == len(centres)
    les = les.sort_values("lesion_id").reset_index(drop=True)
    np.testing.assert_allclose(les[["i", "j", "k"]].to_numpy(), np.asarray(centres, float),
                               atol=1e-9)
    np.testing.assert_allclose(les[["x_mm", "y_mm", "z_mm"]].to_numpy(),
                               world(affine, centres), atol=1e-4)
    assert (les["mask_source"] == "derived").all()
    assert (les["n_voxels"] > 0).all()
    assert (les["location"] == "unknown").all()


# ------------------------------------------------------------------ raw-format writers

def write_dou(root: Path, scans: dict[str, tuple], *, one_based: bool = True) -> Path:
    """scans: stem -> (image, affine, centres); ``.mat`` with 1-based ``cen``."""
    for stem, (img, aff, centres) in scans.items():
        save_nii(root / "cmb-3dcnn-data" / "nii" / f"{stem}.nii", img, aff)
        cen = np.asarray(centres, dtype=np.float64).reshape(-1, 3) + (1 if one_based else 0)
        (root / "cmb-3dcnn-data" / "ground_truth").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(root / "cmb-3dcnn-data" / "ground_truth" / f"{stem}.mat"),
                         {"cen": cen, "gt_num": np.array([[len(cen)]])})
    return root


def write_valdo(root: Path, scans: dict[str, tuple], dtypes=None) -> Path:
    """scans: 'sub-XXX' -> (image, affine, truth instance map); labels binary, dtype varies."""
    for n, (sub, (img, aff, truth)) in enumerate(scans.items()):
        dt = (dtypes or [np.float64, np.uint16, np.float32])[n % 3]
        d = root / "Task2" / sub
        save_nii(d / f"{sub}_space-T2S_desc-masked_T2S.nii.gz", img, aff)
        t1 = img.copy()
        t1[img == 0] = np.nan
        save_nii(d / f"{sub}_space-T2S_desc-masked_T1.nii.gz", t1, aff)
        save_nii(d / f"{sub}_space-T2S_CMB.nii.gz", (truth > 0).astype(dt), aff)
    return root


def write_momeni(root: Path, scans: dict[str, tuple], negatives: dict[str, tuple] | None = None,
                 duplicates: bool = False) -> Path:
    negatives = negatives or {}
    base = root / "PublicDataShare_2020"
    rows = [["NIfTI file", "x", "y", "z"]]
    for stem, (img, aff, centres) in scans.items():
        save_nii(base / "rCMB_DefiniteSubject" / f"{stem}.nii.gz", img, aff)
        trip = [v + 1 for c in centres for v in c]
        if duplicates:  # exact duplicate of the first point, and a 1-voxel near-duplicate
            c0 = centres[0]
            trip += [c0[0] + 1, c0[1] + 1, c0[2] + 1, c0[0] + 2, c0[1] + 1, c0[2] + 1]
        rows.append([f"{stem}.nii.gz", *trip])
    save_xlsx(base / "rCMBInformationInfo.xlsx", rows)
    (base / "NoCMBSubject").mkdir(parents=True, exist_ok=True)
    for stem, (img, aff) in negatives.items():
        save_nii(base / "NoCMBSubject" / f"{stem}.nii.gz", img, aff)
    return root


def write_yonsei(root: Path, scans: dict[str, tuple]) -> Path:
    for stem, (img, aff, centres) in scans.items():
        save_nii(root / "HR" / f"{stem}.nii.gz", img, aff)
        save_xlsx(root / "HR" / f"{stem}.xlsx",
                  [["Slice", "X", "Y"]] + [[k + 1, j + 1, i + 1] for i, j, k in centres])
    return root


def write_bids(root: Path, scans: dict[str, tuple], instance: bool = False) -> Path:
    for sub, (img, aff, truth) in scans.items():
        save_nii(root / sub / "ses-1" / "anat" / f"{sub}_ses-1_SWI.nii.gz", img, aff)
        save_nii(root / sub / "ses-1" / "anat" / f"{sub}_ses-1_T1w.nii.gz", img, aff)
        lab = truth.astype(np.int16) if instance else (truth > 0).astype(np.uint8)
        save_nii(root / "derivatives" / "raters" / sub / "ses-1" / "anat" /
                 f"{sub}_ses-1_label-CMB_mask.nii.gz", lab, aff)
    return root


def write_nnunet(root: Path, scans: dict[str, tuple], cmb_value: int = 1) -> Path:
    for case, (img, aff, truth) in scans.items():
        save_nii(root / "imagesTr" / f"{case}_0000.nii.gz", img, aff)
        save_nii(root / "labelsTr" / f"{case}.nii.gz",
                 ((truth > 0) * cmb_value).astype(np.uint8), aff)
    if cmb_value != 1:
        (root / "dataset.json").write_text(json.dumps(
            {"labels": {"background": 0, "other": 1, "CMB": cmb_value}}))
    return root


# ------------------------------------------------------------------ per-loader tests

def test_dou_one_based_cen_lps_las_and_nans(tmp_path):
    img1, _ = brain(centres=C1, seed=1)
    img1[:2, :2, :2] = np.nan  # DOU volumes hold NaNs
    img2, _ = brain(centres=C2, seed=2)
    src = write_dou(tmp_path / "raw", {"01": (img1, LPS, C1), "02": (img2, LAS, C2)})
    ds = prepare(card("DOU", "dou"), src, tmp_path / "out")
    assert ds.scan_ids == ["DOU-01", "DOU-02"]
    check_points_table(ds.lesions_of("DOU-01"), C1, LPS)
    check_points_table(ds.lesions_of("DOU-02"), C2, LAS)
    # LPS: i grows to the Left, so x decreases with i (independent of the affine helper)
    les = ds.lesions_of("DOU-01").sort_values("lesion_id")
    assert les["x_mm"].iloc[0] == pytest.approx(-(12 - (SHAPE[0] - 1) / 2))
    assert les["y_mm"].iloc[0] == pytest.approx(-(10 - (SHAPE[1] - 1) / 2))
    assert ds.card["mask_source"] == "derived"
    assert ds.card["grow_rule"] == json.loads(GrowRule().describe())
    # a 40 mm ellipsoid is no brain: atlas registration refuses it, with the reason
    assert ds.card["location_reason"].startswith("4 of 4 lesions unknown")
    assert ds.scans["location_source"].str.contains("too small for a brain").all()
    assert ds.card["location_method"]["registration"]["name"] == "cmbbench-atlas-affine@1"
    assert set(ds.card["scan_notes"]["DOU-01"]["location_unknown"]) == {"1", "2", "3"}
    assert ds.card["scan_notes"]["DOU-01"]["nonfinite_voxels_set_to_0"] == 8
    assert np.isfinite(ds.read_image("DOU-01").data).all()
    lab = ds.read_labels("DOU-01")
    np.testing.assert_allclose(lab.affine, LPS, atol=1e-5)
    for _, r in les.iterrows():  # each derived lesion contains its annotated voxel
        assert lab.data[int(r.i), int(r.j), int(r.k)] == r.lesion_id
    rep = verify_dataset(ds.root)
    assert rep.ok, rep.lines()


def test_valdo_names_float64_labels_and_cohorts(tmp_path):
    sp1 = (0.45, 0.45, 4.0)
    sh1 = (60, 60, 8)
    a1 = affine_for(sp1, "LAS", sh1)
    c1 = [(20, 30, 3), (40, 25, 5)]
    img1, t1 = brain(sh1, sp1, c1, seed=3)
    a2 = affine_for((0.49, 0.49, 0.8), "LAS", SHAPE)
    img2, t2 = brain(SHAPE, (0.49, 0.49, 0.8), [(18, 18, 10)], seed=4)
    img3, t3 = brain(seed=5)
    src = write_valdo(tmp_path / "raw", {"sub-101": (img1, a1, t1), "sub-201": (img2, a2, t2),
                                         "sub-301": (img3, LAS, t3)})
    assert nib.load(str(src / "Task2/sub-101/sub-101_space-T2S_CMB.nii.gz")).get_data_dtype() \
        == np.float64
    ds = prepare(card("VALDO", "valdo"), src, tmp_path / "out")
    scans = ds.scans.set_index("scan_id")
    assert scans.loc["VALDO-sub-101", "site"] == "SABRE"
    assert scans.loc["VALDO-sub-201", "field_strength_t"] == 1.5
    assert scans.loc["VALDO-sub-301", "n_cmb"] == 0
    assert scans.loc["VALDO-sub-101", "voxel_mm_z"] == pytest.approx(4.0)
    assert (scans["sequence"] == "T2S").all()
    for sid, truth, aff in (("VALDO-sub-101", t1, a1), ("VALDO-sub-201", t2, a2)):
        got = ds.lesions_of(sid).sort_values(["i", "j", "k"]).reset_index(drop=True)
        exp = lesions_from_labels(truth, aff, scan_id=sid).sort_values(["i", "j", "k"])
        exp = exp.reset_index(drop=True)
        assert len(got) == len(exp)
        for col in ("i", "j", "k", "x_mm", "y_mm", "z_mm", "volume_mm3", "n_voxels"):
            np.testing.assert_allclose(got[col].to_numpy(float), exp[col].to_numpy(float),
                                       atol=1e-4, err_msg=col)
        centres = c1 if sid.endswith("101") else [(18, 18, 10)]
        np.testing.assert_allclose(got[["x_mm", "y_mm", "z_mm"]].to_numpy(),
                                   world(aff, sorted(centres)), atol=1e-4)
        assert (got["mask_source"] == "rater").all()
    assert verify_dataset(ds.root).ok


def test_momeni_workbook_duplicates_and_patient_split(tmp_path):
    lps = affine_for((0.9375, 0.9375, 1.75), "LPS", SHAPE)
    scans = {}
    for n, stem in enumerate(["P001_v1_SWI", "P001_v2_SWI", "P002_v1_SWI"]):
        img, _ = brain(SHAPE, (0.9375, 0.9375, 1.75), C1[: n + 1], seed=10 + n)
        scans[stem] = (img, lps, C1[: n + 1])
    neg, _ = brain(SHAPE, (0.9375, 0.9375, 1.75), seed=20)
    src = write_momeni(tmp_path / "raw", scans, {"P003_v1_SWI": (neg, lps)}, duplicates=True)
    c = card("MOMENI", "momeni", loader_options={"variant": "real"},
             split={"train": 0.5, "val": 0.25, "test": 0.25})
    ds = prepare(c, src, tmp_path / "out")
    assert len(ds.scan_ids) == 4
    for stem, (_, aff, centres) in scans.items():
        les = ds.lesions_of(f"MOMENI-{stem}")
        # the exact duplicate merges away; the near-duplicate (1 voxel = 0.94 mm) merges into
        # the first point and moves the merged centroid by a third of a voxel in i
        exp = [list(c) for c in centres]
        exp[0] = [centres[0][0] + 1 / 3, centres[0][1], centres[0][2]]
        les = les.sort_values("lesion_id")
        np.testing.assert_allclose(les[["i", "j", "k"]].to_numpy(), np.asarray(exp, float),
                                   atol=1e-9)
        np.testing.assert_allclose(les[["x_mm", "y_mm", "z_mm"]].to_numpy(), world(aff, exp),
                                   atol=1e-4)
        assert ds.card["scan_notes"][f"MOMENI-{stem}"]["duplicate_points_merged"] == 2
    scans_t = ds.scans.set_index("scan_id")
    assert scans_t.loc["MOMENI-P003_v1_SWI", "n_cmb"] == 0
    assert scans_t.loc["MOMENI-P001_v1_SWI", "subject_id"] == "P001"
    assert scans_t.loc["MOMENI-P001_v1_SWI", "split"] == scans_t.loc["MOMENI-P001_v2_SWI",
                                                                      "split"]


def test_smomeni_variant_is_never_test(tmp_path):
    img, _ = brain(centres=C2, seed=30)
    base = tmp_path / "raw"
    save_nii(base / "sCMB_DefiniteSubject" / "P001_rsCMB_1.nii.gz", img, LPS)
    save_nii(base / "sCMB_NoCMBSubject" / "P002_sCMB_1.nii.gz", img, LPS)
    save_xlsx(base / "sCMBInformationInfo.xlsx", [["P001_rsCMB_1.nii.gz", 16, 21, 11]])
    save_xlsx(base / "sCMBLocationInformationInfoNocmb.xlsx", [["P002_sCMB_1.nii.gz", 16, 21,
                                                                11]])
    smom = load_card("sMOMENI")
    assert "MOMENI" in smom["never_test_with"]
    ds = prepare({**smom, "version": "t"}, base, tmp_path / "out")
    assert set(ds.scans["split"]) == {"pretrain"}
    check_points_table(ds.lesions_of("sMOMENI-P001_rsCMB_1"), C2, LPS)


def test_yonsei_slice_column_row_points(tmp_path):
    img, _ = brain(centres=C1, seed=40)
    src = write_yonsei(tmp_path / "raw", {"S01": (img, LAS, C1)})
    ds = prepare(card("YONSEI", "yonsei"), src, tmp_path / "out")
    check_points_table(ds.lesions_of("YONSEI-S01"), C1, LAS)


@pytest.mark.parametrize("instance", [False, True])
def test_bids_label_cmb(tmp_path, instance):
    # two touching spheres: one component as a binary mask, two lesions as an instance map
    cs = [(12, 10, 8), (12, 13, 8)]
    img, truth = brain(centres=cs, seed=50, radius_mm=1.2)
    src = write_bids(tmp_path / "raw", {"sub-01": (img, LPS, truth)}, instance=instance)
    ds = prepare(card("B", "bids"), src, tmp_path / "out")
    assert ds.scan_ids == ["sub-01_ses-1"]
    assert ds.scans["sequence"].iloc[0] == "SWI"
    les = ds.lesions_of("sub-01_ses-1").sort_values("j")
    if instance:
        np.testing.assert_allclose(les[["i", "j", "k"]].to_numpy(), np.asarray(cs, float))
        np.testing.assert_allclose(les[["x_mm", "y_mm", "z_mm"]].to_numpy(), world(LPS, cs),
                                   atol=1e-4)
    else:
        assert len(les) == 1
        np.testing.assert_allclose(les[["i", "j", "k"]].to_numpy()[0], [12, 11.5, 8])


def test_nnunet_label_value_from_dataset_json(tmp_path):
    img, truth = brain(centres=C1, seed=60)
    src = write_nnunet(tmp_path / "raw", {"case_001": (img, LAS, truth)}, cmb_value=2)
    lab = nib.load(str(src / "labelsTr/case_001.nii.gz"))
    data = np.asarray(lab.dataobj).copy()
    data[30:33, 5:8, 2:4] = 1  # "other" class: not a CMB
    save_nii(src / "labelsTr/case_001.nii.gz", data, LAS)
    ds = prepare(card("N", "nnunet"), src, tmp_path / "out")
    les = ds.lesions_of("case_001").sort_values(["i", "j", "k"])
    np.testing.assert_allclose(les[["x_mm", "y_mm", "z_mm"]].to_numpy(),
                               world(LAS, sorted(C1)), atol=1e-4)


# ------------------------------------------------------------------ round trip

ROUND_COLS = ["lesion_id", "x_mm", "y_mm", "z_mm", "i", "j", "k"]


def test_round_trip_every_raw_format(tmp_path):
    """One synthetic dataset written as each raw format and prepared back: identical lesion
    tables (mask formats among themselves and with the truth; point formats among themselves,
    with centroids = truth centres)."""
    data = {}
    for n, (aff, centres) in enumerate(((LPS, C1), (LAS, C2))):
        img, truth = brain(centres=centres, seed=70 + n)
        data[f"s{n}"] = (img, aff, truth, centres)
    sub = {k: f"sub-10{n}" for n, k in enumerate(data)}
    srcs = {
        "dou": write_dou(tmp_path / "dou", {k: (v[0], v[1], v[3]) for k, v in data.items()}),
        "yonsei": write_yonsei(tmp_path / "yon", {k: (v[0], v[1], v[3]) for k, v in data.items()}),
        "momeni": write_momeni(tmp_path / "mom", {k: (v[0], v[1], v[3])
                                                  for k, v in data.items()}),
        "valdo": write_valdo(tmp_path / "val", {sub[k]: (v[0], v[1], v[2])
                                                for k, v in data.items()}),
        "bids": write_bids(tmp_path / "bids", {sub[k]: (v[0], v[1], v[2])
                                               for k, v in data.items()}),
        "nnunet": write_nnunet(tmp_path / "nn", {k: (v[0], v[1], v[2]) for k, v in data.items()}),
    }
    tables = {}
    for loader, src in srcs.items():
        ds = prepare(card(loader.upper(), loader, loader_options={"variant": "real"}),
                     src, tmp_path / f"out-{loader}")
        t = ds.lesions.copy()
        t["scan"] = [sorted(ds.scan_ids).index(s) for s in t["scan_id"]]
        tables[loader] = t.sort_values(["scan", "lesion_id"]).reset_index(drop=True)
    truth = pd.concat([lesions_from_labels(v[2], v[1], scan_id=k).assign(scan=n)
                       for n, (k, v) in enumerate(data.items())], ignore_index=True)
    cols = ROUND_COLS + ["n_voxels", "volume_mm3", "diameter_mm", "mask_source", "location"]
    for loader in ("bids", "nnunet"):
        pd.testing.assert_frame_equal(tables[loader][["scan"] + cols],
                                      tables["valdo"][["scan"] + cols], check_dtype=False)
    for loader in ("yonsei", "momeni"):
        pd.testing.assert_frame_equal(tables[loader][["scan"] + cols],
                                      tables["dou"][["scan"] + cols], check_dtype=False)

    def by_position(t: pd.DataFrame) -> pd.DataFrame:
        # mask loaders number instances in raster order, the truth in placement order
        return t.sort_values(["scan", "i", "j", "k"]).reset_index(drop=True)

    geo = ["scan", "x_mm", "y_mm", "z_mm", "i", "j", "k"]
    size = ["n_voxels", "volume_mm3", "diameter_mm", "mask_source", "location"]
    pd.testing.assert_frame_equal(by_position(tables["valdo"])[geo + size],
                                  by_position(truth)[geo + size], check_dtype=False, atol=1e-6)
    pd.testing.assert_frame_equal(by_position(tables["dou"])[geo], by_position(truth)[geo],
                                  check_dtype=False, atol=1e-6)
    assert len(tables["dou"]) == len(truth) == 4


def test_round_trip_of_a_synth_scan_through_every_raw_format(synth_scan, tmp_path):
    """A generated SYNTH scan (real anatomy, 30 CMBs, LAS/LPS grid as drawn) written as each raw
    format and prepared back: the mask formats give SYNTH's own lesion table (instances,
    centroids, sizes), the point formats its centroids (as 1-based .mat/Excel values) and,
    among themselves, identical derived tables. Locations are switched off here (the same
    registration would run six times; see tests/test_location.py)."""
    g = synth_scan
    img, aff, lab = g.image.astype(np.float32), g.affine, g.labels
    centres = g.lesions.sort_values("lesion_id")[["i", "j", "k"]].to_numpy(float)
    pts = [tuple(c) for c in centres]
    srcs = {
        "dou": write_dou(tmp_path / "dou", {"01": (img, aff, pts)}),
        "momeni": write_momeni(tmp_path / "mom", {"P01_v1": (img, aff, pts)}),
        "yonsei": write_yonsei(tmp_path / "yon", {"S01": (img, aff, pts)}),
        "valdo": write_valdo(tmp_path / "val", {"sub-201": (img, aff, lab)}),
        "bids": write_bids(tmp_path / "bids", {"sub-01": (img, aff, lab)}, instance=True),
        "nnunet": write_nnunet(tmp_path / "nn", {"case_001": (img, aff, lab)}),
    }
    tables = {}
    for loader, src in srcs.items():
        ds = prepare(card(loader.upper(), loader, location="none",
                          loader_options={"variant": "real"}), src, tmp_path / f"o-{loader}")
        assert len(ds.scan_ids) == 1
        tables[loader] = ds.lesions.sort_values(["i", "j", "k"]).reset_index(drop=True)
    truth = g.lesions.sort_values(["i", "j", "k"]).reset_index(drop=True)
    assert len(truth) == 30
    geo = ["x_mm", "y_mm", "z_mm", "i", "j", "k"]
    size = ["n_voxels", "volume_mm3", "diameter_mm"]
    # world mm to 1e-4: a NIfTI header stores the affine in float32 (SYNTH's table is float64)
    for loader in ("valdo", "bids", "nnunet"):
        pd.testing.assert_frame_equal(tables[loader][geo + size], truth[geo + size],
                                      check_dtype=False, atol=1e-4, obj=loader)
        assert (tables[loader]["mask_source"] == "rater").all()
    for loader in ("dou", "momeni", "yonsei"):
        pd.testing.assert_frame_equal(tables[loader][geo], truth[geo], check_dtype=False,
                                      atol=1e-4, obj=loader)
        cols = geo + size + ["lesion_id", "mask_source", "location"]
        pd.testing.assert_frame_equal(tables[loader][cols], tables["dou"][cols],
                                      check_dtype=False, obj=loader)
        assert (tables[loader]["mask_source"] == "derived").all()


# ------------------------------------------------------------------ bad input

def _one_line(exc: CmbbenchError, name: str) -> None:
    assert "\n" not in str(exc) and name in str(exc)


def test_bad_input_errors_name_the_file(tmp_path):
    img, truth = brain(centres=C1, seed=80)
    # missing .mat
    src = write_dou(tmp_path / "a", {"01": (img, LPS, C1)})
    (src / "cmb-3dcnn-data/ground_truth/01.mat").unlink()
    with pytest.raises(MissingInputError) as e:
        prepare(card("DOU", "dou"), src, tmp_path / "oa")
    _one_line(e.value, "01.mat")
    # centroid outside the volume
    src = write_dou(tmp_path / "b", {"01": (img, LPS, [(12, 10, 8), (45, 10, 8)])})
    with pytest.raises(InvalidValuesError) as e:
        prepare(card("DOU", "dou"), src, tmp_path / "ob")
    _one_line(e.value, "01.mat")
    assert "outside the image" in str(e.value)
    # corrupt .mat
    src = write_dou(tmp_path / "c", {"01": (img, LPS, C1)})
    (src / "cmb-3dcnn-data/ground_truth/01.mat").write_bytes(b"MATLAB 5.0 garbage" * 3)
    with pytest.raises(UnreadableInputError) as e:
        prepare(card("DOU", "dou"), src, tmp_path / "oc")
    _one_line(e.value, "01.mat")
    # MATLAB v7.3 (HDF5) file: named as such, with the remedy
    src = write_dou(tmp_path / "c73", {"01": (img, LPS, C1)})
    (src / "cmb-3dcnn-data/ground_truth/01.mat").write_bytes(
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + bytes(200))
    with pytest.raises(UnreadableInputError) as e:
        prepare(card("DOU", "dou"), src, tmp_path / "oc73")
    _one_line(e.value, "01.mat")
    assert "v7.3" in str(e.value)
    # cen of the wrong shape
    src = write_dou(tmp_path / "d", {"01": (img, LPS, C1)})
    scipy.io.savemat(str(src / "cmb-3dcnn-data/ground_truth/01.mat"), {"cen": np.ones((2, 2))})
    with pytest.raises(UnreadableInputError, match="N x 3") as e:
        prepare(card("DOU", "dou"), src, tmp_path / "od")
    _one_line(e.value, "01.mat")
    # VALDO label of the wrong shape
    src = write_valdo(tmp_path / "e", {"sub-101": (img, LAS, truth)})
    save_nii(src / "Task2/sub-101/sub-101_space-T2S_CMB.nii.gz",
             np.zeros((10, 10, 10), np.float64), LAS)
    with pytest.raises(GeometryMismatchError) as e:
        prepare(card("VALDO", "valdo"), src, tmp_path / "oe")
    _one_line(e.value, "sub-101_space-T2S_CMB.nii.gz")
    # VALDO missing label
    (src / "Task2/sub-101/sub-101_space-T2S_CMB.nii.gz").unlink()
    with pytest.raises(MissingInputError) as e:
        prepare(card("VALDO", "valdo"), src, tmp_path / "oe2")
    _one_line(e.value, "sub-101_space-T2S_CMB.nii.gz")
    # corrupt workbook / non-numeric triplet
    src = write_momeni(tmp_path / "f", {"P1_a": (img, LPS, C1)})
    save_xlsx(src / "PublicDataShare_2020/rCMBInformationInfo.xlsx",
              [["P1_a.nii.gz", 1, 2, "x"]])
    with pytest.raises(UnreadableInputError) as e:
        prepare(card("MOMENI", "momeni"), src, tmp_path / "of")
    _one_line(e.value, "rCMBInformationInfo.xlsx")
    (src / "PublicDataShare_2020/rCMBInformationInfo.xlsx").write_bytes(b"not a zip")
    with pytest.raises(UnreadableInputError) as e:
        prepare(card("MOMENI", "momeni"), src, tmp_path / "of2")
    _one_line(e.value, "rCMBInformationInfo.xlsx")
    # unknown layout, for every loader
    empty = tmp_path / "empty"
    empty.mkdir()
    for loader in ("dou", "valdo", "momeni", "yonsei", "bids", "nnunet"):
        with pytest.raises(MissingInputError, match="unknown layout") as e:
            prepare(card("X", loader), empty, tmp_path / f"og-{loader}")
        _one_line(e.value, "empty")


_WRITERS = {
    "dou": (lambda r, img, truth: write_dou(r, {"01": (img, LPS, C1)}), "nii/01.nii"),
    "valdo": (lambda r, img, truth: write_valdo(r, {"sub-101": (img, LAS, truth)}),
              "sub-101_space-T2S_desc-masked_T2S.nii.gz"),
    "momeni": (lambda r, img, truth: write_momeni(r, {"P1_a": (img, LPS, C1)}),
               "rCMB_DefiniteSubject/P1_a.nii.gz"),
    "yonsei": (lambda r, img, truth: write_yonsei(r, {"S01": (img, LAS, C1)}), "HR/S01.nii.gz"),
    "bids": (lambda r, img, truth: write_bids(r, {"sub-01": (img, LPS, truth)}),
             "sub-01_ses-1_SWI.nii.gz"),
    "nnunet": (lambda r, img, truth: write_nnunet(r, {"case_001": (img, LAS, truth)}),
               "imagesTr/case_001_0000.nii.gz"),
}


@pytest.mark.parametrize("loader", list(_WRITERS))
def test_bad_image_files_name_the_file_for_every_loader(tmp_path, loader):
    img, truth = brain(centres=C1, seed=85)
    write, image_name = _WRITERS[loader]
    c = card(loader.upper(), loader, location="none", loader_options={"variant": "real"})

    def image_of(src: Path) -> Path:
        found = [p for p in src.rglob("*") if p.as_posix().endswith(image_name)]
        assert len(found) == 1
        return found[0]

    # corrupt NIfTI
    src = write(tmp_path / "a", img, truth)
    image_of(src).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UnreadableInputError, match="not a readable NIfTI") as e:
        prepare(c, src, tmp_path / "oa")
    _one_line(e.value, Path(image_name).name)
    # 4D image where a 3D scan is expected
    src = write(tmp_path / "b", img, truth)
    save_nii(image_of(src), np.stack([img, img], -1), LPS)
    with pytest.raises(InvalidValuesError, match="expected a 3D image") as e:
        prepare(c, src, tmp_path / "ob")
    _one_line(e.value, Path(image_name).name)
    # image missing next to its label (BIDS then falls back to the T1w: not a CMB sequence)
    src = write(tmp_path / "c", img, truth)
    image_of(src).unlink()
    if loader == "bids":
        ds = prepare(c, src, tmp_path / "oc")
        assert ds.scans["sequence"].iloc[0] == "unknown"
    else:
        with pytest.raises(MissingInputError) as e:
            prepare(c, src, tmp_path / "oc")
        _one_line(e.value, Path(image_name).stem.split(".")[0])
    for out in ("oa", "ob", "oc"):  # no failed prepare leaves a folder that looks complete
        assert loader == "bids" and out == "oc" or not (tmp_path / out / "dataset.json").exists()


def test_half_prepared_is_never_complete_and_resumes(tmp_path, monkeypatch):
    img1, _ = brain(centres=C1, seed=90)
    img2, _ = brain(centres=C2, seed=91)
    src = write_dou(tmp_path / "raw", {"01": (img1, LPS, C1), "02": (img2, LAS, C2)})
    (src / "cmb-3dcnn-data/ground_truth/02.mat").write_bytes(b"corrupt")
    home = tmp_path / "home"
    monkeypatch.setenv("CMBBENCH_HOME", str(home))
    c = load_card("DOU")
    out = home / "datasets" / "DOU-v1"
    with pytest.raises(UnreadableInputError):
        prepare(c, src, out)
    assert (out / ".shards" / "DOU-01.json").is_file()
    assert not (out / "dataset.json").exists() and not (out / "scans.csv").exists()
    with pytest.raises(MissingInputError, match="datasets prepare DOU --source"):
        resolve_dataset("DOU")
    with pytest.raises(MissingInputError, match="half-prepared"):
        verify_dataset(out)
    stamp = (out / "images/DOU-01.nii.gz").stat().st_mtime_ns
    write_dou(src, {"02": (img2, LAS, C2)})
    calls = []
    ds = prepare(c, src, out, progress=lambda d, t, s: calls.append((d, t, s)))
    assert calls[0] == (1, 2, "") and calls[-1] == (2, 2, "DOU-02")
    assert (out / "images/DOU-01.nii.gz").stat().st_mtime_ns == stamp  # not redone
    assert resolve_dataset("DOU") == out and len(ds.lesions) == 4
    # a different card/options into the same folder is refused
    with pytest.raises(CmbbenchError, match="another"):
        prepare({**c, "grow_rule": {"max_diameter_mm": 6.0}}, src, out)


def test_verify_catches_tampering_and_bright_points(tmp_path):
    img, _ = brain(centres=C1, seed=100)
    src = write_dou(tmp_path / "raw", {"01": (img, LPS, C1)})
    ds = prepare(card("DOU", "dou", counts={"scans": 20, "cmbs": 74}), src, tmp_path / "out")
    rep = verify_dataset(ds.root)
    assert rep.ok and any("expects 20 scans" in w for w in rep.warnings)
    assert rep.content_sha256 == ds.content_sha256() is not None
    assert f"content sha256: {rep.content_sha256}" in rep.lines()
    # a point dataset read without the 1-based correction (shifted by 3 voxels) is not dark
    shifted = [(c[0] + 3, c[1] + 3, c[2]) for c in C1]
    src2 = write_dou(tmp_path / "raw2", {"01": (img, LPS, shifted)})
    rep2 = verify_dataset(prepare(card("DOU", "dou"), src2, tmp_path / "out2").root)
    assert not rep2.ok and len(rep2.failures["lesions"]) == 3
    assert all("not dark" in f for f in rep2.failures["lesions"])
    # tampered label map
    lab = ds.root / "labels/DOU-01.nii.gz"
    lab.write_bytes(lab.read_bytes()[:-4] + b"abcd")
    rep3 = verify_dataset(ds.root)
    assert rep3.failures["checksums"] == [("labels/DOU-01.nii.gz: checksum differs from "
                                           "dataset.json")]
    assert rep3.content_sha256 is None and rep3.to_dict()["content_sha256"] is None
    assert any("DOU-01.nii.gz" in f for f in rep3.failures["affines"])


# ------------------------------------------------------------------ helpers, stats, CLI

def test_merge_and_split_helpers():
    pts = np.array([[1, 1, 1], [1, 1, 1], [2, 1, 1], [10, 10, 10]], float)
    m = merge_duplicate_points(pts, np.eye(4), 1.5)
    np.testing.assert_allclose(m, [[4 / 3, 1, 1], [10, 10, 10]])
    assert len(merge_duplicate_points(pts, np.eye(4), 0.0)) == 3
    f = {"train": 0.6, "val": 0.2, "test": 0.2}
    assert patient_split("P1", f) == patient_split("P1", f)
    assert {patient_split(f"P{n}", f) for n in range(50)} == {"train", "val", "test"}


def test_statistics_page(tmp_path):
    img, _ = brain(centres=C1, seed=110)
    src = write_dou(tmp_path / "raw", {"01": (img, LPS, C1)})
    ds = prepare(card("DOU", "dou"), src, tmp_path / "out")
    st = dataset_statistics(ds)
    assert st["n_scans"] == 1 and st["n_cmb"] == 3 and st["n_scans_with_cmb"] == 1
    assert st["locations"]["unknown"] == 3 and st["voxel_mm"] == {"1x1x1": 1}
    assert sum(st["diameter_histogram"].values()) == 3
    assert json.loads((ds.root / "statistics.json").read_text())["n_cmb"] == 3
    assert "MARS location" in statistics_markdown(st)


def test_cli_info_prepare_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    res = runner.invoke(main, ["datasets", "info", "VALDO"])
    assert res.exit_code == 0 and "cmbbench datasets prepare VALDO --source RAW_DIR" in res.output
    assert "valdo.grand-challenge.org" in res.output
    img, truth = brain(centres=C1, seed=120)
    src = write_valdo(tmp_path / "raw", {"sub-201": (img, LAS, truth)})
    res = runner.invoke(main, ["datasets", "prepare", "VALDO", "--source", str(src), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "1 scans, 3 CMBs" in res.output
    res = runner.invoke(main, ["datasets", "verify", "VALDO", "--json"])
    assert res.exit_code == 0, res.output
    verified = json.loads(res.output)
    assert verified["ok"] is True
    assert verified["content_sha256"] == read_dataset(resolve_dataset("VALDO")).content_sha256()
    res = runner.invoke(main, ["datasets", "verify", "VALDO"])
    assert res.exit_code == 0 and f"content sha256: {verified['content_sha256']}" in res.output
    res = runner.invoke(main, ["datasets", "stats", "VALDO"])  # the statistics page
    assert res.exit_code == 0 and "- CMBs: 3;" in res.output and "| MARS location | n |" in res.output
    res = runner.invoke(main, ["datasets", "stats", "VALDO", "--json"])
    st = json.loads(res.output)
    assert st["n_cmb"] == 3 and st["locations"]["unknown"] == 3
    assert st["location_sources"] == {"unknown": 1}
    res = runner.invoke(main, ["datasets", "stats", "DOU"])
    assert res.exit_code == 3 and "datasets prepare DOU --source RAW_DIR" in res.output
    res = runner.invoke(main, ["datasets", "verify", "DOU"])
    assert res.exit_code == 3 and "no dataset.json" in res.output
    res = runner.invoke(main, ["datasets", "prepare", "DOU", "--source", str(tmp_path / "nope")])
    assert res.exit_code == 3 and "raw dataset folder not found" in res.output


def test_location_switched_off_by_the_card(tmp_path):
    img, _ = brain(centres=C2, seed=130)
    src = write_dou(tmp_path / "raw", {"01": (img, LPS, C2)})
    ds = prepare(card("DOU", "dou", location="none"), src, tmp_path / "out")
    assert ds.card["location_reason"] == LOCATION_REASON and ds.card["location_method"] is None
    assert (ds.lesions["location"] == "unknown").all()
    assert ds.scans["registration_dice"].isna().all()
    with pytest.raises(CmbbenchError, match="location must be 'atlas' or 'none'"):
        prepare(card("DOU", "dou", location="mni"), src, tmp_path / "out2")


# ------------------------------------------------------------------ evaluate on DOU

def test_evaluate_ours_on_a_prepared_dou_fixture(tmp_path, monkeypatch):
    """`cmbbench evaluate --method ours --dataset DOU`: first without DOU (the error says how to
    obtain and prepare it), then on a DOU-format fixture prepared with the CLI."""
    home = tmp_path / "home"
    monkeypatch.setenv("CMBBENCH_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["evaluate", "--method", "ours", "--dataset", "DOU", "--no-store", "--n-boot", "20",
            "--quiet", "--json"]
    res = runner.invoke(main, args[:-1])  # as a user sees it: one line on stderr, exit code 3
    assert res.exit_code == 3, res.output
    err = res.output.strip()
    assert err.startswith("cmbbench: error: ") and "\n" not in err
    assert "dataset DOU is not prepared" in err
    assert load_card("DOU")["url"] in err and "cmb-3dcnn-data" in err
    assert "then run `cmbbench datasets prepare DOU --source RAW_DIR`" in err
    res = runner.invoke(main, args)
    assert res.exit_code == 3 and json.loads(res.output)["error"]["exit_code"] == 3
    # a DOU-format fixture: 64 x 64 x 40 SWI-like scans, LPS and RAS, NaNs, 1-based cen
    shape = (64, 64, 40)
    cs = {"01": (LPS64 := affine_for((1.0, 1.0, 1.0), "LPS", shape), [(20, 30, 20), (40, 25, 15),
                                                                     (32, 45, 25)]),
          "02": (affine_for((1.0, 1.0, 1.0), "RAS", shape), [(25, 20, 18)])}
    scans = {}
    for n, (stem, (aff, centres)) in enumerate(cs.items()):
        img, _ = brain(shape=shape, centres=centres, seed=200 + n)
        img[:2, :2, :2] = np.nan
        scans[stem] = (img, aff, centres)
    src = write_dou(tmp_path / "raw", scans)
    res = runner.invoke(main, ["datasets", "prepare", "DOU", "--source", str(src), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, args + ["--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["complete"] and report["dataset"]["name"] == "DOU"
    assert report["scans"]["predicted"] == ["DOU-01", "DOU-02"]
    agg = report["result"]["aggregates"]
    assert agg["n_ref"] == 4 and agg["tp"] + agg["fn"] == 4 and agg["n_scans"] == 2
    assert np.isfinite(agg["fp_per_scan"]) and 0.0 <= agg["recall_pooled"] <= 1.0
    # the per-lesion table carries the prepared reference, world coordinates through the affine
    table = pd.read_csv(tmp_path / "run" / "results" / "matches.csv")
    ref = table[table["kind"] == "reference"].sort_values(["scan_id", "lesion_id"])
    np.testing.assert_allclose(ref[["x_mm", "y_mm", "z_mm"]].to_numpy(),
                               np.r_[world(LPS64, cs["01"][1]), world(cs["02"][0], cs["02"][1])],
                               atol=1e-4)
    assert (ref["mask_source"] == "derived").all()

"""MARS lesion locations from the bundled atlas registered to each scan.

- the registration recovers a known affine applied to the atlas template itself;
- on a synthetic scan (generated from the same atlas under a random affine + non-linear warp,
  whose lesion table holds the true MARS class) written as a raw BIDS dataset and prepared,
  the derived locations agree with the truth for a large majority, and a half-empty copy of
  the scan gets ``unknown`` with the reason instead of a guess;
- noise, empty and tiny images give ``unknown`` with a reason, never a crash.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from cmbbench.loaders import prepare
from cmbbench.loaders.location import LOCATION_SOURCE_ATLAS, SNAP_MM, locate_lesions, mars_at
from cmbbench.registration import RegistrationConfig, foreground_mask, register_atlas
from cmbbench.synth.anatomy import MARS_CLASSES, load_atlas


@pytest.fixture(scope="module")
def atlas():
    return load_atlas()


def _rotation(deg):
    rx, ry, rz = np.deg2rad(deg)
    r_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    r_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    r_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def test_recovers_a_known_affine_of_the_template(atlas):
    # scan world = T @ atlas world, T: rotations (8, -5, 10) degrees, scales (1.08, 0.95, 1.02),
    # shift (6, -9, 4) mm; the "scan" is the atlas T1 resampled on a 2.5 mm LPS grid
    t = np.eye(4)
    t[:3, :3] = _rotation((8.0, -5.0, 10.0)) @ np.diag([1.08, 0.95, 1.02])
    t[:3, 3] = [6.0, -9.0, 4.0]
    shape = (80, 90, 72)
    aff = np.diag([-2.5, -2.5, 2.5, 1.0])  # LPS: i to the left, j to the posterior
    aff[:3, 3] = [99.0, 100.0, -80.0]
    m = np.linalg.inv(atlas.affine) @ np.linalg.inv(t) @ aff  # scan voxel -> atlas voxel
    img = ndi.affine_transform(np.asarray(atlas.t1, np.float32), m[:3, :3], offset=m[:3, 3],
                               output_shape=shape, order=1)
    assert img.max() > 0 and not img[0].any() and not img[:, :, -1].any()
    reg = register_atlas(img, aff, atlas=atlas)
    assert reg.ok, reg.reason
    assert reg.dice > 0.95
    # error of the recovered transform over the atlas brain (world mm)
    brain = np.stack(np.nonzero(np.asarray(atlas.labels) > 0), 1)[::50].astype(float)
    w = brain @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    err = np.linalg.norm((w @ reg.forward[:3, :3].T + reg.forward[:3, 3])
                         - (w @ t[:3, :3].T + t[:3, 3]), axis=1)
    assert np.median(err) < 1.5 and np.percentile(err, 95) < 3.0, (np.median(err), err.max())
    assert reg.seconds < 20


def _write_bids(root, name, image, labels, affine):
    anat = root / name / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), str(anat / f"{name}_SWI.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.int16), affine),
             str(anat / f"{name}_label-CMB_mask.nii.gz"))


def test_prepare_locates_synth_lesions(synth_scan, atlas, tmp_path):
    g = synth_scan
    # SYNTH scans sit near MNI space; a real scan's world frame is the scanner's. Move this
    # one (15 degrees about x, 20/-30/40 mm) so that "no registration" is visibly wrong.
    moved = np.eye(4)
    moved[:3, :3] = _rotation((15.0, 0.0, 0.0))
    moved[:3, 3] = [20.0, -30.0, 40.0]
    aff = moved @ g.affine
    _write_bids(tmp_path / "raw", "sub-01", g.image, g.labels, aff)
    ds = prepare({"name": "S", "version": "t", "loader": "bids", "split": "test"},
                 tmp_path / "raw", tmp_path / "out")
    scans = ds.scans.set_index("scan_id")
    assert scans.loc["sub-01", "location_source"] == LOCATION_SOURCE_ATLAS
    assert scans.loc["sub-01", "registration_dice"] > 0.93  # measured 0.960
    got = ds.lesions_of("sub-01")
    truth = g.lesions
    assert len(got) == len(truth) == 30
    d = np.linalg.norm(got[["i", "j", "k"]].to_numpy()[:, None, :]
                       - truth[["i", "j", "k"]].to_numpy()[None, :, :], axis=2)
    pairs = d.argmin(axis=1)
    assert len(set(pairs)) == 30 and d.min(axis=1).max() < 1e-6
    true_loc = truth["location"].to_numpy()[pairs]
    agree = float((got["location"].to_numpy() == true_loc).mean())
    assert agree >= 0.8, agree  # measured 27/30 = 0.90
    assert set(got["location"]) == {"lobar", "deep", "infratentorial"}
    # without registration (scan world taken as MNI) the same lookup is mostly wrong
    inv = np.linalg.inv(atlas.affine)
    unregistered, _ = mars_at(atlas, got[["x_mm", "y_mm", "z_mm"]].to_numpy() @ inv[:3, :3].T
                              + inv[:3, 3])
    assert float((np.array(unregistered) == true_loc).mean()) < 0.6  # measured 0.40
    card = json.loads((ds.root / "dataset.json").read_text())
    assert card["location_method"]["registration"]["min_dice"] == RegistrationConfig().min_dice
    n_unknown = int((got["location"] == "unknown").sum())
    assert (card["location_reason"] is None) == (n_unknown == 0)
    stats = json.loads((ds.root / "statistics.json").read_text())
    assert sum(stats["locations"].values()) == 30
    assert stats["location_sources"] == {LOCATION_SOURCE_ATLAS: 1}
    assert stats["registration_dice"]["n"] == 1


def test_half_empty_scan_is_unknown_with_the_reason(synth_scan, atlas):
    g = synth_scan
    half = g.image.copy()
    half[: half.shape[0] // 2] = 0  # half of the field of view is empty
    loc = locate_lesions(half, g.affine, g.lesions, atlas=atlas)
    assert not loc.registration.ok and loc.source.startswith("unknown: ")
    assert loc.locations == ["unknown"] * 30
    assert all("atlas registration not accepted" in r for r in loc.reasons.values())
    assert len(loc.reasons) == 30


def test_skull_and_scalp_around_the_brain(synth_scan, atlas):
    # a scan that is not skull-stripped, crudely: a dark 6 mm "skull" and a bright 6 mm "scalp"
    g = synth_scan
    img = g.image.astype(np.float32)
    sp = np.sqrt((g.affine[:3, :3] ** 2).sum(0))
    brain = ndi.binary_fill_holes(img > 0.1 * np.percentile(img[img > 0], 99))
    d = ndi.distance_transform_edt(~brain, sampling=sp)
    ref = float(np.percentile(img[brain], 75))
    rng = np.random.default_rng(1)
    skull, scalp = (d > 1) & (d <= 7), (d > 7) & (d <= 13)
    img[skull] = np.abs(rng.normal(0.05 * ref, 0.02 * ref, int(skull.sum())))
    img[scalp] = np.abs(rng.normal(0.9 * ref, 0.1 * ref, int(scalp.sum())))
    assert foreground_mask(img, g.affine)[scalp].mean() < 0.05  # the scalp is cut away
    loc = locate_lesions(img, g.affine, g.lesions, atlas=atlas)
    assert loc.registration.ok, loc.registration.reason
    assert loc.registration.dice > 0.93  # measured 0.956
    agree = float((np.array(loc.locations) == g.lesions["location"].to_numpy()).mean())
    assert agree >= 0.8, agree  # measured 28/30


@pytest.mark.parametrize("kind", ["noise", "empty", "tiny"])
def test_bad_images_give_unknown_with_a_reason(atlas, kind):
    rng = np.random.default_rng(0)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = -128.0  # a 256 mm field of view
    img = {"noise": rng.random((64, 64, 64)).astype(np.float32),
           "empty": np.zeros((64, 64, 64), np.float32),
           "tiny": np.pad(np.ones((12, 12, 12), np.float32), 26)}[kind]
    les = pd.DataFrame({"lesion_id": [1, 2], "x_mm": [0.0, 10.0], "y_mm": [0.0, -5.0],
                        "z_mm": [0.0, 20.0]})
    loc = locate_lesions(img, aff, les, atlas=atlas)
    assert loc.locations == ["unknown", "unknown"]
    assert not loc.registration.ok
    expected = {"noise": "registration Dice", "empty": "no foreground",
                "tiny": "too small for a brain"}[kind]
    assert expected in loc.registration.reason, loc.registration.reason
    assert loc.source == f"unknown: {loc.registration.reason}"
    assert set(loc.reasons) == {1, 2}


def test_mars_lookup_snaps_to_tissue_and_refuses_far_points(atlas):
    mars = np.asarray(atlas.mars)
    vox = []
    for cls in (1, 2, 3):  # one voxel of each class with a uniform 5x5x5 neighbourhood
        vox.append(next(c for c in np.argwhere(mars == cls)[::101]
                        if (mars[tuple(slice(v - 2, v + 3) for v in c)] == cls).all()))
    brain = np.asarray(atlas.labels) > 0
    dist = ndi.distance_transform_edt(~(mars > 0))
    near = np.argwhere((dist > 1.5) & (dist <= 2.0) & ~brain)[0]  # 2 mm outside the tissue
    far = np.argwhere((dist > 6.0) & (dist < 8.0))[0]
    pts = np.array([*vox, near, far, [-50.0, 10, 10]], dtype=float)
    classes, reasons = mars_at(atlas, pts)
    assert classes[:3] == list(MARS_CLASSES[1:])
    assert classes[3] in MARS_CLASSES[1:] and reasons[3] is None
    assert classes[4] == "unknown" and f"more than {SNAP_MM:g} mm" in reasons[4]
    assert classes[5] == "unknown" and "outside the registered atlas" in reasons[5]


def test_foreground_mask_fills_dark_ventricles_and_drops_a_detached_shell():
    shape = (60, 60, 60)
    g = np.meshgrid(*[np.arange(n) - 29.5 for n in shape], indexing="ij")
    r = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
    img = np.where(r < 20, 100.0, 0.0)
    img[r < 5] = 5.0          # dark "ventricle" inside: filled
    img[(r > 24) & (r < 27)] = 80.0  # bright "scalp" shell behind a dark "skull" gap
    mask = foreground_mask(img, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert mask[r < 19].all() and not mask[r > 21].any()

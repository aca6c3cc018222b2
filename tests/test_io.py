"""I/O at the edges: the harmonized dataset layout, NIfTI reading, predictions folder layouts.

Expected values come from the way each case is built (voxel positions placed on purpose,
affines written by hand, checksums from :mod:`hashlib`, world coordinates from the affine
nibabel reads back from the file), never from cmbbench's own output.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cmbbench.dataset import DatasetWriter, read_dataset
from cmbbench.errors import InvalidValuesError, MissingInputError, UnreadableInputError
from cmbbench.harmonize import lesions_from_labels
from cmbbench.matching import get_rule
from cmbbench.model import ScanInfo
from cmbbench.nifti import read_volume
from cmbbench.predictions import classify_map, read_predictions_folder
from cmbbench.scoring import ScoreResult, candidates_from_map, score_folder

# ---------------------------------------------------------------------------------------------
# hand-written affines (voxel -> RAS+ mm)
# ---------------------------------------------------------------------------------------------

RAS = np.array([[1.0, 0, 0, -16.0], [0, 1.0, 0, -20.0], [0, 0, 1.0, -9.0], [0, 0, 0, 1]])
# LPS: i grows to the Left (x decreases), j Posterior (y decreases), k Superior
LPS = np.array([[-0.5, 0, 0, 60.0], [0, -0.5, 0, 70.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
# LAS (radiological): i grows to the Left, j Anterior, k Superior
LAS = np.array([[-0.9, 0, 0, 40.0], [0, 0.9, 0, -50.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])


def _oblique() -> np.ndarray:
    """30 degrees about z then 10 degrees about x, voxels 0.8 x 0.8 x 2.5 mm."""
    cz, sz = math.cos(math.radians(30)), math.sin(math.radians(30))
    cx, sx = math.cos(math.radians(10)), math.sin(math.radians(10))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    a = np.eye(4)
    a[:3, :3] = rx @ rz @ np.diag([0.8, 0.8, 2.5])
    a[:3, 3] = (-20.0, 15.0, 5.0)
    return a


OBLIQUE = _oblique()


def ball(shape, centre, radius_mm, affine) -> np.ndarray:
    """Boolean ball of radius_mm (mm, measured through the affine) around a voxel centre."""
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    d_mm = (idx - np.asarray(centre, dtype=np.float64)) @ np.asarray(affine)[:3, :3].T
    return (np.sqrt((d_mm ** 2).sum(axis=1)) <= radius_mm + 1e-9).reshape(shape)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# dataset writer / reader round trip
# ---------------------------------------------------------------------------------------------

def test_dataset_round_trip(tmp_path):
    root = tmp_path / "DS"
    writer = DatasetWriter(root, name="ROUNDTRIP", version="2.1", card={"licence": "CC-BY-4.0"})
    rng = np.random.default_rng(1)
    written, tables = {}, []
    specs = [
        # scan_id (leading zeros must survive), shape, affine, lesion centres, locations, thickness
        ("001", (20, 22, 10), RAS, [(5, 6, 4), (14, 15, 6)], ["lobar", "deep"], float("nan")),
        ("002", (24, 24, 8), LPS, [(12, 8, 3)], ["infratentorial"], 3.0),
        ("003", (24, 24, 8), OBLIQUE, [(5, 5, 2), (12, 17, 4), (19, 8, 6)],
         ["lobar", "unknown", "deep"], float("nan")),
        ("004", (16, 16, 6), LAS, [], [], float("nan")),
    ]
    for sid, shape, affine, centres, locs, thick in specs:
        image = rng.normal(1000, 30, shape).astype(np.float32)
        labels = np.zeros(shape, dtype=np.uint16)
        for n, c in enumerate(centres, start=1):
            labels[ball(shape, c, 1.6, affine)] = n
        lesions = lesions_from_labels(labels, affine, scan_id=sid, mask_source="rater")
        lesions["location"] = locs
        info = ScanInfo(scan_id=sid, subject_id=f"subj{sid}", sequence="SWI",
                        field_strength_t=3.0, te_ms=20.0, slice_thickness_mm=thick,
                        site="siteA", vendor="Siemens")
        writer.add_scan(info, image, affine, labels if centres else None, lesions)
        written[sid] = (shape, affine, image, labels, centres, locs, thick)
        tables.append(lesions)
    returned = writer.close()

    ds = read_dataset(root)
    assert ds.name == "ROUNDTRIP" and returned.name == "ROUNDTRIP"
    assert ds.scan_ids == ["001", "002", "003", "004"]

    # scans.csv, read without cmbbench
    scans = pd.read_csv(root / "scans.csv", dtype={"scan_id": str, "subject_id": str})
    assert scans["scan_id"].tolist() == ["001", "002", "003", "004"]
    scans = scans.set_index("scan_id")
    for col in ("subject_id", "split", "sequence", "field_strength_t", "te_ms",
                "voxel_mm_x", "voxel_mm_y", "voxel_mm_z", "slice_thickness_mm", "shape", "n_cmb",
                "site", "vendor"):
        assert col in scans.columns, col
    for sid, (shape, affine, image, labels, centres, locs, thick) in written.items():
        row = scans.loc[sid]
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        assert (row.voxel_mm_x, row.voxel_mm_y, row.voxel_mm_z) == pytest.approx(tuple(spacing))
        assert row.slice_thickness_mm == pytest.approx(thick if np.isfinite(thick) else spacing[2])
        assert row["shape"] == "x".join(map(str, shape))
        assert row.n_cmb == len(centres)
        assert row.sequence == "SWI" and row.field_strength_t == 3.0 and row.te_ms == 20.0
        assert row.subject_id == f"subj{sid}" and row.site == "siteA"

    # lesions.csv: one row per lesion, 0-based voxel centroids, world through the affine
    lesions = pd.read_csv(root / "lesions.csv", dtype={"scan_id": str})
    assert len(lesions) == sum(len(w[4]) for w in written.values())
    assert len(ds.lesions) == len(lesions)
    # every value comes back bit for bit (floats included)
    expected = pd.concat([t for t in tables if len(t)], ignore_index=True)
    pd.testing.assert_frame_equal(ds.lesions.reset_index(drop=True),
                                  expected[list(ds.lesions.columns)], check_dtype=False,
                                  check_exact=True)
    for sid, (shape, affine, image, labels, centres, locs, thick) in written.items():
        rows = lesions[lesions["scan_id"] == sid].sort_values("lesion_id")
        assert rows["lesion_id"].tolist() == list(range(1, len(centres) + 1))
        assert rows["location"].tolist() == locs
        assert set(rows["mask_source"]) <= {"rater"}
        for (_, r), c in zip(rows.iterrows(), centres):
            assert (r.i, r.j, r.k) == pytest.approx(c, abs=1e-9)
            world = affine[:3, :3] @ np.asarray(c, float) + affine[:3, 3]
            assert (r.x_mm, r.y_mm, r.z_mm) == pytest.approx(tuple(world), abs=1e-6)
            n_vox = int((labels == r.lesion_id).sum())
            vol = n_vox * abs(np.linalg.det(affine[:3, :3]))
            assert r.n_voxels == n_vox
            assert r.volume_mm3 == pytest.approx(vol)
            assert r.diameter_mm == pytest.approx((6 * vol / math.pi) ** (1 / 3))

    # dataset.json: checksums are the sha256 of exactly the files written
    card = json.loads((root / "dataset.json").read_text())
    assert card["name"] == "ROUNDTRIP" and card["version"] == "2.1"
    assert card["licence"] == "CC-BY-4.0"
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.nii.gz")}
    assert set(card["checksums"]) == on_disk
    assert on_disk == {"images/001.nii.gz", "images/002.nii.gz", "images/003.nii.gz",
                       "images/004.nii.gz", "labels/001.nii.gz", "labels/002.nii.gz",
                       "labels/003.nii.gz"}
    for rel, digest in card["checksums"].items():
        assert digest == sha256(root / rel), rel

    # images and label maps: same voxels, same affine, orientation kept on disk
    for sid, (shape, affine, image, labels, centres, locs, thick) in written.items():
        img = nib.load(str(root / "images" / f"{sid}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), image)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        if centres:
            lab = nib.load(str(root / "labels" / f"{sid}.nii.gz"))
            np.testing.assert_array_equal(np.asarray(lab.dataobj), labels)
            np.testing.assert_allclose(lab.affine, affine, atol=1e-5)
            got = ds.read_labels(sid)
            np.testing.assert_array_equal(got.data, labels)
            for n, c in enumerate(centres, start=1):
                assert got.data[c] == n
        else:
            assert ds.label_path(sid) is None and ds.read_labels(sid) is None
    assert nib.aff2axcodes(nib.load(str(root / "images" / "002.nii.gz")).affine) == \
        ("L", "P", "S")


# ---------------------------------------------------------------------------------------------
# which copy of the data: content_sha256
# ---------------------------------------------------------------------------------------------

def _small_dataset(root: Path, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root, name="COPY", version="1")
    for sid, centre in (("a", (6, 6, 4)), ("b", (9, 5, 3))):
        image = rng.normal(1000, 30, (16, 14, 8)).astype(np.float32)
        labels = np.zeros(image.shape, dtype=np.uint16)
        labels[ball(image.shape, centre, 1.5, RAS)] = 1
        writer.add_scan(ScanInfo(scan_id=sid, sequence="SWI"), image, RAS, labels,
                        lesions_from_labels(labels, RAS, scan_id=sid, mask_source="rater"))
    writer.close()


def test_content_sha256_names_the_bytes_not_the_folder(tmp_path):
    _small_dataset(tmp_path / "one")
    _small_dataset(tmp_path / "two")  # same seed: the same bytes in another folder
    one, two = read_dataset(tmp_path / "one"), read_dataset(tmp_path / "two")
    digest = one.content_sha256()
    assert digest is not None and len(digest) == 64
    assert two.content_sha256() == digest
    # by hand: sorted "path  sha256" lines over the listed files and the tables
    listed = {**one.card["checksums"],
              **{t: sha256(tmp_path / "one" / t) for t in ("scans.csv", "lesions.csv")}}
    lines = "".join(f"{k}  {listed[k]}\n" for k in sorted(listed))
    assert digest == hashlib.sha256(lines.encode()).hexdigest()

    # one voxel of one image changed (checksums rewritten, as a regeneration would): another copy
    img = nib.load(tmp_path / "two" / "images" / "b.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[3, 3, 3] += 1.0
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "two" / "images" / "b.nii.gz")
    card = json.loads((tmp_path / "two" / "dataset.json").read_text())
    assert two.checksum_failures() == ["images/b.nii.gz: checksum differs from dataset.json"]
    assert two.content_sha256() is None  # a file that fails its checksum: no digest
    assert two.content_sha256(verify=False) == digest  # unverified: what the card says
    card["checksums"]["images/b.nii.gz"] = sha256(tmp_path / "two" / "images" / "b.nii.gz")
    (tmp_path / "two" / "dataset.json").write_text(json.dumps(card))
    changed = read_dataset(tmp_path / "two").content_sha256()
    assert changed is not None and changed != digest

    # one table cell changed: another copy too
    les = (tmp_path / "one" / "lesions.csv").read_text().replace("rater", "consensus", 1)
    (tmp_path / "one" / "lesions.csv").write_text(les)
    assert read_dataset(tmp_path / "one").content_sha256() not in (None, digest)


def test_content_sha256_is_none_without_checksums(tmp_path):
    _small_dataset(tmp_path / "ds")
    card = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    del card["checksums"]
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(card))
    assert read_dataset(tmp_path / "ds").content_sha256() is None
    (tmp_path / "ds" / "images" / "a.nii.gz").unlink()
    _small_dataset(tmp_path / "ds2")
    (tmp_path / "ds2" / "labels" / "a.nii.gz").unlink()
    ds2 = read_dataset(tmp_path / "ds2")
    assert ds2.checksum_failures() == ["labels/a.nii.gz: missing"]
    assert ds2.content_sha256() is None


# ---------------------------------------------------------------------------------------------
# world coordinates through non-RAS affines
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation, affine, voxel, expected_world", [
    # hand computed: world = diag * ijk + origin
    ("LPS", LPS, (7, 9, 4), (60 - 3.5, 70 - 4.5, -30 + 8.0)),
    ("LAS", LAS, (10, 12, 3), (40 - 9.0, -50 + 10.8, -20 + 9.0)),
    ("oblique", OBLIQUE, (9, 11, 3), None),
])
def test_world_centroid_through_affine(tmp_path, orientation, affine, voxel, expected_world):
    shape = (24, 26, 8)
    labels = np.zeros(shape, dtype=np.uint16)
    labels[ball(shape, voxel, 1.2, affine)] = 1  # symmetric: its centroid is the voxel centre
    labels[1, 2, 1] = 2                           # a single-voxel lesion
    lesions = lesions_from_labels(labels, affine, scan_id="s1", mask_source="rater")
    writer = DatasetWriter(tmp_path / "DS", name="GEOM")
    writer.add_scan(ScanInfo("s1"), np.zeros(shape, np.float32), affine, labels, lesions)
    ds = writer.close()

    # what any other tool reading the files would compute
    lab_img = nib.load(str(tmp_path / "DS" / "labels" / "s1.nii.gz"))
    on_disk = lab_img.affine
    assert nib.aff2axcodes(on_disk) == nib.aff2axcodes(affine)
    if expected_world is None:
        c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
        c10, s10 = math.cos(math.radians(10)), math.sin(math.radians(10))
        i, j, k = (0.8 * voxel[0], 0.8 * voxel[1], 2.5 * voxel[2])
        x0, y0 = c * i - s * j, s * i + c * j          # about z
        expected_world = (x0 - 20.0, c10 * y0 - s10 * k + 15.0, s10 * y0 + c10 * k + 5.0)
    np.testing.assert_allclose(nib.affines.apply_affine(on_disk, voxel), expected_world,
                               atol=1e-4)

    got = ds.lesions.set_index("lesion_id")
    assert (got.loc[1, "i"], got.loc[1, "j"], got.loc[1, "k"]) == pytest.approx(voxel)
    assert (got.loc[1, "x_mm"], got.loc[1, "y_mm"], got.loc[1, "z_mm"]) == pytest.approx(
        expected_world, abs=1e-4)
    assert (got.loc[2, "i"], got.loc[2, "j"], got.loc[2, "k"]) == pytest.approx((1, 2, 1))
    np.testing.assert_allclose(got.loc[2, ["x_mm", "y_mm", "z_mm"]].to_numpy(float),
                               nib.affines.apply_affine(on_disk, (1, 2, 1)), atol=1e-4)
    if orientation in ("LPS", "LAS"):
        # the left/right sense of the axes: moving +i moves the lesion to the Left (x smaller)
        assert got.loc[2, "x_mm"] > got.loc[1, "x_mm"]


# ---------------------------------------------------------------------------------------------
# read_volume errors
# ---------------------------------------------------------------------------------------------

def _save(path: Path, data: np.ndarray, affine: np.ndarray = RAS) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture
def good_gz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    data = rng.random((12, 10, 8)).astype(np.float32)
    return _save(tmp_path / "good.nii.gz", data)


def _one_line(exc: Exception, path: Path) -> None:
    text = str(exc)
    assert "\n" not in text
    assert str(path) in text


def test_read_volume_missing(tmp_path):
    with pytest.raises(MissingInputError) as info:
        read_volume(tmp_path / "absent.nii.gz")
    assert info.value.exit_code == 3
    _one_line(info.value, tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("name, payload", [
    ("garbage.nii.gz", b"not a nifti file\n" * 64),
    ("garbage.nii", bytes(range(256)) * 8),
    ("empty.nii.gz", b""),
])
def test_read_volume_garbage(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(UnreadableInputError) as info:
        read_volume(path)
    assert info.value.exit_code == 4
    _one_line(info.value, path)


@pytest.mark.parametrize("cut", ["half", "trailer", "one-byte"])
def test_read_volume_truncated_gz(good_gz, cut):
    raw = good_gz.read_bytes()
    keep = {"half": len(raw) // 2, "trailer": len(raw) - 8, "one-byte": len(raw) - 1}[cut]
    good_gz.write_bytes(raw[:keep])
    with pytest.raises(UnreadableInputError) as info:
        read_volume(good_gz)
    _one_line(info.value, good_gz)


def test_read_volume_truncated_nii(tmp_path):
    path = _save(tmp_path / "vol.nii", np.ones((12, 10, 8), np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnreadableInputError):
        read_volume(path)


def test_read_volume_corrupted_gz_never_silent(good_gz):
    """A flipped bit anywhere in a .nii.gz is an error or leaves the voxels unchanged."""
    reference = read_volume(good_gz).data.copy()
    raw = good_gz.read_bytes()
    n_err = 0
    positions = list(range(10, len(raw), max(1, len(raw) // 150))) + list(range(len(raw) - 8,
                                                                                len(raw)))
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 0x04
        good_gz.write_bytes(bytes(bad))
        try:
            vol = read_volume(good_gz)
        except UnreadableInputError:
            n_err += 1
        except InvalidValuesError:
            n_err += 1
        else:
            assert vol.data.shape == reference.shape, pos
            np.testing.assert_array_equal(vol.data, reference, err_msg=f"byte {pos}")
    # the CRC-32/length trailer is checked
    assert n_err >= 8


def test_read_volume_dimensions(tmp_path):
    vol = read_volume(_save(tmp_path / "a.nii.gz", np.zeros((6, 5, 4, 1), np.float32)))
    assert vol.data.shape == (6, 5, 4)
    with pytest.raises(InvalidValuesError) as info:
        read_volume(_save(tmp_path / "b.nii.gz", np.zeros((6, 5, 4, 2), np.float32)))
    assert info.value.exit_code == 6
    with pytest.raises(InvalidValuesError):
        read_volume(_save(tmp_path / "c.nii.gz", np.zeros((6, 5), np.float32)))


def test_read_volume_singular_affine(tmp_path):
    img = nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(UnreadableInputError) as info:
        read_volume(path)
    _one_line(info.value, path)


def test_read_volume_keeps_orientation(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    vol = read_volume(_save(tmp_path / "lps.nii.gz", data, LPS))
    np.testing.assert_array_equal(vol.data, data)   # not reoriented
    np.testing.assert_allclose(vol.affine, LPS, atol=1e-5)
    np.testing.assert_allclose(vol.spacing_mm, (0.5, 0.5, 2.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# predictions folder layouts, all scored to the same outcome
# ---------------------------------------------------------------------------------------------

@dataclass
class Blob:
    centre: tuple[int, int, int]
    peak: float
    kind: str  # "hit": on a lesion, peak >= 0.5; "low": on a lesion, peak < 0.5; "fp": far away


@dataclass
class LayoutScan:
    scan_id: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    lesions: list[tuple[int, int, int]]
    blobs: list[Blob] = field(default_factory=list)


RADIUS_MM = 2.5

LAYOUT_SCANS = [
    LayoutScan("sub-01_ses-1", (32, 32, 20), RAS, [(8, 8, 8), (20, 20, 10)],
               [Blob((8, 8, 8), 0.9, "hit"), Blob((26, 8, 15), 0.8, "fp")]),
    LayoutScan("sub-02_ses-1", (48, 48, 12), LPS, [(12, 12, 4), (30, 35, 8), (40, 12, 3)],
               [Blob((12, 12, 4), 0.7, "hit"), Blob((30, 35, 8), 0.3, "low")]),
    LayoutScan("sub-03_ses-1", (32, 32, 12), OBLIQUE, [],
               [Blob((16, 16, 6), 0.6, "fp")]),
    LayoutScan("sub-04_ses-1", (20, 20, 10), LAS, [], []),
]
EXPECTED = {
    "tp": sum(b.kind == "hit" for s in LAYOUT_SCANS for b in s.blobs),
    "fp": sum(b.kind == "fp" for s in LAYOUT_SCANS for b in s.blobs),
    "fn": sum(len(s.lesions) for s in LAYOUT_SCANS)
    - sum(b.kind == "hit" for s in LAYOUT_SCANS for b in s.blobs),
}


def _probability(scan: LayoutScan) -> np.ndarray:
    """Blobs whose probability falls from the peak at the centre to 0.6 * peak at 2.5 mm."""
    prob = np.zeros(scan.shape, np.float32)
    idx = np.indices(scan.shape).reshape(3, -1).T.astype(np.float64)
    for b in scan.blobs:
        d = np.sqrt((((idx - b.centre) @ scan.affine[:3, :3].T) ** 2).sum(axis=1))
        d = d.reshape(scan.shape)
        inside = d <= RADIUS_MM + 1e-9
        prob[inside] = np.maximum(prob[inside], b.peak * (1 - 0.4 * d[inside] / RADIUS_MM))
    return prob


@pytest.fixture(scope="module")
def layout_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts") / "REF"
    writer = DatasetWriter(root, name="LAYOUTS", version="1")
    for s in LAYOUT_SCANS:
        labels = np.zeros(s.shape, np.uint16)
        for n, c in enumerate(s.lesions, start=1):
            labels[ball(s.shape, c, 1.5, s.affine)] = n
        lesions = lesions_from_labels(labels, s.affine, scan_id=s.scan_id, mask_source="rater")
        writer.add_scan(ScanInfo(s.scan_id, subject_id=s.scan_id.split("_")[0]),
                        np.full(s.shape, 1000, np.float32), s.affine, labels, lesions)
    return writer.close()


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, data, affine)


def _disk_affine(ds, sid: str) -> np.ndarray:
    return nib.load(str(ds.image_path(sid))).affine


def _points(ds) -> list[dict]:
    rows = []
    for s in LAYOUT_SCANS:
        aff = _disk_affine(ds, s.scan_id)
        for b in s.blobs:
            x, y, z = nib.affines.apply_affine(aff, b.centre)
            rows.append({"scan_id": s.scan_id, "i": b.centre[0], "j": b.centre[1],
                         "k": b.centre[2], "x_mm": x, "y_mm": y, "z_mm": z, "score": b.peak})
    return rows


def make_layout(kind: str, folder: Path, ds) -> Path:
    folder.mkdir(parents=True)
    for s in LAYOUT_SCANS:
        prob = _probability(s)
        mask = (prob >= 0.5).astype(np.uint8)
        aff = _disk_affine(ds, s.scan_id)
        sub, ses = s.scan_id.split("_")
        if kind == "nii.gz":
            _write(folder / f"{s.scan_id}.nii.gz", prob, aff)
        elif kind == "nii":
            _write(folder / f"{s.scan_id}.nii", prob, aff)
        elif kind == "bids-probseg":
            _write(folder / sub / ses / "anat" /
                   f"{s.scan_id}_space-T2S_label-CMB_probseg.nii.gz", prob, aff)
        elif kind == "bids-mask":
            _write(folder / sub / ses / "anat" /
                   f"{s.scan_id}_space-T2S_label-CMB_mask.nii.gz", mask, aff)
        elif kind == "nnunet":
            _write(folder / f"{s.scan_id}.nii.gz", mask, aff)
            np.savez_compressed(folder / f"{s.scan_id}.npz", probabilities=prob[None])
    if kind.startswith("bids"):
        (folder / "dataset_description.json").write_text(json.dumps(
            {"Name": "cmb predictions", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    if kind == "nnunet":
        for name in ("plans.json", "dataset.json", "predict_from_raw_data_args.json"):
            (folder / name).write_text(json.dumps({"note": f"nnU-Net {name}"}))
    if kind.startswith("csv"):
        pts = pd.DataFrame(_points(ds))
        if kind == "csv-world":
            pts = pts[["scan_id", "x_mm", "y_mm", "z_mm", "score"]]
        elif kind == "csv-voxel0":
            pts = pts[["scan_id", "i", "j", "k", "score"]]
        else:  # csv-voxel1: 1-based indices, declared in the manifest
            pts = pts[["scan_id", "i", "j", "k", "score"]]
            pts[["i", "j", "k"]] += 1
            (folder / "cmbbench-submission.json").write_text(json.dumps(
                {"method": "points", "version": "1", "prediction_kind": "points",
                 "voxel_index_base": 1}))
        pts.to_csv(folder / "predictions.csv", index=False)
    return folder


LAYOUTS = ["nii.gz", "nii", "bids-probseg", "bids-mask", "nnunet", "csv-world", "csv-voxel0",
           "csv-voxel1"]


def _outcomes(table: pd.DataFrame) -> dict[str, int]:
    ref = table[table["kind"] == "reference"]
    cand = table[table["kind"] == "candidate"]
    return {"tp": int((ref["outcome"] == "TP").sum()), "fp": int((cand["outcome"] == "FP").sum()),
            "fn": int((ref["outcome"] == "FN").sum())}


def _detections(table: pd.DataFrame) -> np.ndarray:
    """World positions (mm) of the operating-point detections, sorted."""
    cand = table[(table["kind"] == "candidate") & table["outcome"].isin(["TP", "FP"])]
    xyz = cand[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    return xyz[np.lexsort(xyz.T[::-1])]


@pytest.fixture(scope="module")
def nifti_baseline(layout_reference, tmp_path_factory):
    folder = make_layout("nii.gz", tmp_path_factory.mktemp("baseline") / "preds",
                         layout_reference)
    return score_folder(folder, layout_reference, n_boot=0)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_prediction_layouts_score_alike(kind, layout_reference, nifti_baseline, tmp_path):
    folder = make_layout(kind, tmp_path / "preds", layout_reference)
    index = read_predictions_folder(folder, layout_reference.scan_ids)
    assert index.unmatched_files == []
    scans_with_blobs = {s.scan_id for s in LAYOUT_SCANS if s.blobs}
    if kind.startswith("csv"):
        assert set(index.points) == scans_with_blobs and not index.maps
    else:
        assert set(index.maps) == {s.scan_id for s in LAYOUT_SCANS}
        for sid, path in index.maps.items():
            assert path.name.startswith(sid)

    result = score_folder(folder, layout_reference, n_boot=0)
    assert _outcomes(result.table) == EXPECTED
    assert _outcomes(nifti_baseline.table) == EXPECTED
    assert (result.aggregates["tp"], result.aggregates["fp"], result.aggregates["fn"]) == (
        EXPECTED["tp"], EXPECTED["fp"], EXPECTED["fn"])
    assert result.missing == []
    # the detections sit where the NIfTI map puts them (catches 0/1-based and axis mix-ups)
    np.testing.assert_allclose(_detections(result.table), _detections(nifti_baseline.table),
                               atol=1e-3)
    # and, with a radius below one voxel, still match one-to-one
    strict = score_folder(folder, layout_reference, n_boot=0,
                          rule_overrides={"max_distance": 0.25})
    assert _outcomes(strict.table) == EXPECTED


def test_voxel_index_base_is_applied(layout_reference, tmp_path):
    """1-based indices without the manifest are read as 0-based: every detection moves."""
    folder = make_layout("csv-voxel1", tmp_path / "preds", layout_reference)
    (folder / "cmbbench-submission.json").unlink()
    strict = score_folder(folder, layout_reference, n_boot=0,
                          rule_overrides={"max_distance": 0.25})
    assert _outcomes(strict.table)["tp"] == 0


def test_predictions_folder_errors(layout_reference, tmp_path):
    ids = layout_reference.scan_ids
    sid = ids[0]
    shape, aff = LAYOUT_SCANS[0].shape, _disk_affine(layout_reference, sid)

    two = tmp_path / "two"
    _write(two / f"{sid}.nii.gz", np.zeros(shape, np.float32), aff)
    _write(two / f"{sid}.nii", np.zeros(shape, np.float32), aff)
    with pytest.raises(UnreadableInputError, match="two prediction files"):
        read_predictions_folder(two, ids)

    def csv_folder(name: str, text: str, manifest: dict | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "predictions.csv").write_text(text)
        if manifest is not None:
            (folder / "cmbbench-submission.json").write_text(json.dumps(manifest))
        return folder

    with pytest.raises(UnreadableInputError, match="x_mm"):
        read_predictions_folder(csv_folder("nocoords", f"scan_id,score\n{sid},0.5\n"), ids)
    with pytest.raises(UnreadableInputError, match="nope"):
        read_predictions_folder(csv_folder("unknown", "scan_id,i,j,k,score\nnope,1,2,3,0.5\n"),
                                ids)
    with pytest.raises(InvalidValuesError):
        read_predictions_folder(csv_folder("nan", f"scan_id,i,j,k,score\n{sid},1,2,3,\n"), ids)
    with pytest.raises(InvalidValuesError, match="line 3"):
        read_predictions_folder(csv_folder("text", f"scan_id,i,j,k,score\n{sid},1,2,3,0.5\n"
                                                   f"{sid},abc,2,3,0.5\n"), ids)
    with pytest.raises(InvalidValuesError):
        read_predictions_folder(csv_folder("range", f"scan_id,i,j,k,score\n{sid},1,2,3,1.5\n"),
                                ids)
    with pytest.raises(UnreadableInputError):
        read_predictions_folder(csv_folder("base", f"scan_id,i,j,k,score\n{sid},1,2,3,0.5\n",
                                           {"voxel_index_base": 2}), ids)
    bad_manifest = csv_folder("manifest", f"scan_id,i,j,k,score\n{sid},1,2,3,0.5\n")
    (bad_manifest / "cmbbench-submission.json").write_text("{not json")
    with pytest.raises(UnreadableInputError):
        read_predictions_folder(bad_manifest, ids)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingInputError):
        read_predictions_folder(empty, ids)
    with pytest.raises(MissingInputError):
        read_predictions_folder(tmp_path / "absent", ids)


# ---------------------------------------------------------------------------------------------
# classify_map
# ---------------------------------------------------------------------------------------------

def _grid(values: dict[tuple[int, int, int], float], dtype) -> np.ndarray:
    a = np.zeros((6, 6, 6), dtype=dtype)
    for idx, v in values.items():
        a[idx] = v
    return a


@pytest.mark.parametrize("values, dtype, kind", [
    ({(1, 1, 1): 0.25, (1, 1, 2): 0.8, (4, 4, 4): 1.0}, np.float32, "probability"),
    ({(1, 1, 1): 0.5}, np.float64, "probability"),
    ({(1, 1, 1): 1.0, (4, 4, 4): 1.0}, np.float32, "binary"),
    ({(1, 1, 1): 1, (4, 4, 4): 1}, np.uint8, "binary"),
    ({(1, 1, 1): 1}, np.int32, "binary"),
    ({(1, 1, 1): True, (4, 4, 4): True}, bool, "binary"),
    ({(1, 1, 1): 1, (4, 4, 4): 7}, np.uint16, "instance"),
    ({(1, 1, 1): 1.0, (3, 3, 3): 2.0, (4, 4, 4): 3.0}, np.float32, "instance"),
])
def test_classify_map_kinds(values, dtype, kind):
    assert classify_map(_grid(values, dtype)) == kind


@pytest.mark.parametrize("values, dtype, word", [
    ({(1, 1, 1): -1}, np.int16, "negative"),
    ({(1, 1, 1): -0.2, (2, 2, 2): 0.5}, np.float32, "negative"),
    ({(1, 1, 1): np.nan}, np.float32, "nan"),
    ({(1, 1, 1): np.inf}, np.float64, "inf"),
    ({(1, 1, 1): 0.3, (2, 2, 2): 1.7}, np.float32, "1.7"),
    ({(1, 1, 1): 1.7}, np.float32, "1.7"),
])
def test_classify_map_rejects(values, dtype, word):
    with pytest.raises(InvalidValuesError) as info:
        classify_map(_grid(values, dtype), path="pred.nii.gz")
    assert info.value.exit_code == 6
    assert word in str(info.value).lower()
    assert "pred.nii.gz" in str(info.value)


def test_map_kinds_become_candidates():
    rule26 = get_rule("cmbbench")
    rule6 = get_rule("cmbbench", connectivity=6)
    # two voxels touching at a corner: one lesion with 26-, two with 6-connectivity
    corner = _grid({(1, 1, 1): 1, (2, 2, 2): 1}, np.uint8)
    assert len(candidates_from_map(corner, RAS, scan_id="s", rule=rule26)[1]) == 1
    assert len(candidates_from_map(corner, RAS, scan_id="s", rule=rule6)[1]) == 2
    # an instance map is never split: label 3 has two far-apart parts, label 5 one
    inst = _grid({(0, 0, 0): 3, (5, 5, 5): 3, (2, 4, 1): 5}, np.uint16)
    _, cands, kind = candidates_from_map(inst, RAS, scan_id="s", rule=rule26)
    assert kind == "instance"
    assert sorted(cands["candidate_id"]) == [3, 5]
    assert set(cands["score"]) == {1.0}
    # a probability map: components above the floor (0.1), each scored by its peak
    prob = _grid({(1, 1, 1): 0.05, (3, 3, 3): 0.2, (3, 3, 4): 0.7, (5, 0, 0): 0.12}, np.float32)
    _, cands, kind = candidates_from_map(prob, RAS, scan_id="s", rule=rule26)
    assert kind == "probability"
    assert sorted(cands["score"].round(4)) == [0.12, 0.7]
    # an all-zero float map has no candidates
    _, cands, _ = candidates_from_map(np.zeros((4, 4, 4), np.float32), RAS, scan_id="s",
                                      rule=rule26)
    assert len(cands) == 0


# ---------------------------------------------------------------------------------------------
# ScoreResult save / load
# ---------------------------------------------------------------------------------------------

def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b  # exact: the tables are written and read back without losing a bit


def test_score_result_save_load(layout_reference, tmp_path):
    folder = make_layout("nii.gz", tmp_path / "preds", layout_reference)
    (folder / f"{LAYOUT_SCANS[2].scan_id}.nii.gz").unlink()
    result = score_folder(folder, layout_reference, rule="valdo2021", missing="empty",
                          n_boot=30, seed=7)
    assert result.missing == [LAYOUT_SCANS[2].scan_id]
    out = result.save(tmp_path / "results")
    for name in ("matches.csv", "scans.csv", "aggregates.json", "aggregates.csv", "froc.csv",
                 "strata.csv"):
        assert (out / name).is_file()

    loaded = ScoreResult.load(out)
    assert loaded.rule == result.rule
    assert loaded.missing == result.missing
    assert set(loaded.aggregates) == set(result.aggregates)
    for key, value in result.aggregates.items():
        assert _same(float(loaded.aggregates[key]), float(value)), key
    assert loaded.ci is not None and result.ci is not None
    assert (loaded.ci.n_boot, loaded.ci.seed) == (30, 7)
    for key in result.ci.lower:
        assert _same(loaded.ci.lower[key], result.ci.lower[key]), key
        assert _same(loaded.ci.upper[key], result.ci.upper[key]), key
    assert len(loaded.froc) == len(result.froc)
    np.testing.assert_allclose(loaded.froc["sensitivity"].to_numpy(float),
                               result.froc["sensitivity"].to_numpy(float), equal_nan=True)
    assert _outcomes(loaded.table) == _outcomes(result.table)
    # what was saved is what a fresh save of the loaded result writes
    again = loaded.save(tmp_path / "again")
    assert json.loads((again / "aggregates.json").read_text())["aggregates"] == json.loads(
        (out / "aggregates.json").read_text())["aggregates"]

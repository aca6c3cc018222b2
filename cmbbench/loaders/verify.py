"""``cmbbench datasets verify``: checks of a prepared (harmonized) dataset.

Checks, each reported with its failures:

``complete``
    ``dataset.json`` exists (a folder with shards but no ``dataset.json`` is half-prepared).
``checksums``
    every file listed in ``dataset.json`` exists and has the recorded SHA-256.
``counts``
    ``scans.csv``/``lesions.csv`` agree with ``dataset.json`` and with ``n_cmb`` per scan;
    the card's expected counts (``counts.scans``, ``counts.cmbs``) are compared too, but only
    as a warning (a user may prepare a subset).
``affines``
    finite, non-singular, near-orthogonal (|cos| < 1e-3), voxel sizes within 0.05-10 mm and
    equal to ``scans.csv``; label maps on the image grid.
``lesions``
    every lesion's voxel centroid inside the volume, its world coordinate equal to the affine
    image of its voxel coordinate (1e-3 mm), inside the head/brain foreground (an intensity
    mask: voxels above 10 % of the 99th percentile, holes filled - an approximation of a brain
    mask), and at a dark voxel: the darkest voxel of its 3x3x3 neighbourhood is at least
    :data:`DARK_CONTRAST` (10 %) below the median of the foreground voxels 3-5 mm away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..dataset import read_dataset
from ..errors import MissingInputError
from ..geometry import affines_match, voxel_sizes, voxel_to_world
from ..nifti import read_volume

__all__ = ["DARK_CONTRAST", "VerifyReport", "dark_and_inside", "verify_dataset"]

#: A lesion is "at a dark voxel" when the darkest voxel of its 3x3x3 neighbourhood is at least
#: this fraction below the median of the foreground voxels 3-5 mm away.
DARK_CONTRAST = 0.10


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`: per check, a list of failure lines (empty = passed),
    and warnings that do not fail the dataset."""

    root: Path
    failures: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: :meth:`~cmbbench.dataset.HarmonizedDataset.content_sha256` of the verified copy; None
    #: when a file failed its checksum or ``dataset.json`` lists none
    content_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not any(self.failures.values())

    def lines(self) -> list[str]:
        out = []
        for check, fails in self.failures.items():
            out.append(f"{check:<10}{'ok' if not fails else f'FAILED ({len(fails)})'}")
            out += [f"  - {f}" for f in fails[:20]]
            if len(fails) > 20:
                out.append(f"  ... and {len(fails) - 20} more")
        out += [f"warning: {w}" for w in self.warnings]
        out.append(f"content sha256: {self.content_sha256 or 'none (no verified checksums)'}")
        return out

    def to_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "failures": self.failures,
                "warnings": self.warnings, "content_sha256": self.content_sha256}


def _foreground(image: np.ndarray) -> np.ndarray:
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    pos = img[img > 0]
    if pos.size == 0:
        return np.zeros(img.shape, dtype=bool)
    fg = img > 0.1 * float(np.percentile(pos, 99))
    return ndimage.binary_fill_holes(fg)


def dark_and_inside(image: np.ndarray, affine: np.ndarray, ijk: np.ndarray,
                    fg: np.ndarray | None = None) -> list[str]:
    """Problems of one lesion centroid (0-based voxel ``ijk``): outside the volume, outside
    the foreground, or not darker than its 3-5 mm surroundings. Empty list = fine."""
    shape = np.asarray(image.shape)
    c = np.rint(np.asarray(ijk, dtype=np.float64)).astype(int)
    if np.any(c < 0) or np.any(c >= shape):
        return [f"centroid voxel {tuple(c)} outside the volume {tuple(shape)}"]
    fg = _foreground(image) if fg is None else fg
    probs = []
    if not fg[tuple(c)]:
        probs.append("outside the brain/head foreground")
    sp = voxel_sizes(affine)
    half = np.ceil(5.0 / sp).astype(int)
    lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, shape)
    crop = np.asarray(image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float64)
    g = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in zip(lo, hi, c, sp)],
                    indexing="ij")
    d = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
    shell = (d >= 3.0) & (d <= 5.0) & fg[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] & np.isfinite(crop)
    lo3, hi3 = np.maximum(c - 1, 0), np.minimum(c + 2, shape)
    nb = np.asarray(image[lo3[0]:hi3[0], lo3[1]:hi3[1], lo3[2]:hi3[2]], dtype=np.float64)
    if shell.any() and np.isfinite(nb).any():
        darkest, background = float(np.nanmin(nb)), float(np.median(crop[shell]))
        if not darkest < background - DARK_CONTRAST * abs(background):
            probs.append(f"not dark (darkest nearby {darkest:.4g} is not {DARK_CONTRAST:.0%} "
                         f"below the surrounding median {background:.4g})")
    return probs


def verify_dataset(root: str | Path, card: dict | None = None) -> VerifyReport:
    """Run every check on the harmonized dataset at ``root`` (see module docstring).

    Raises
    ------
    MissingInputError
        ``root`` is not a prepared dataset (no ``dataset.json``; half-prepared folders say so).
    """
    root = Path(root)
    if not (root / "dataset.json").is_file():
        if (root / ".shards").is_dir():
            raise MissingInputError("dataset is half-prepared (no dataset.json); re-run "
                                    "`cmbbench datasets prepare` to finish it", root)
        raise MissingInputError("not a prepared dataset (no dataset.json)", root)
    rep = VerifyReport(root=root)
    ds = read_dataset(root)
    meta = ds.card
    rep.failures["checksums"] = ds.checksum_failures()
    if not rep.failures["checksums"]:
        rep.content_sha256 = ds.content_sha256(verify=False)
    # counts
    fails = []
    if int(meta.get("n_scans", -1)) != len(ds.scans):
        fails.append(f"dataset.json n_scans={meta.get('n_scans')} but scans.csv has "
                     f"{len(ds.scans)} rows")
    if int(meta.get("n_cmb", -1)) != len(ds.lesions):
        fails.append(f"dataset.json n_cmb={meta.get('n_cmb')} but lesions.csv has "
                     f"{len(ds.lesions)} rows")
    per_scan = ds.lesions.groupby("scan_id").size()
    for _, row in ds.scans.iterrows():
        if int(row.get("n_cmb", 0)) != int(per_scan.get(row["scan_id"], 0)):
            fails.append(f"{row['scan_id']}: scans.csv n_cmb={row['n_cmb']} but "
                         f"{int(per_scan.get(row['scan_id'], 0))} lesion rows")
    rep.failures["counts"] = fails
    expected = (card or meta).get("counts") or {}
    for key, actual in (("scans", len(ds.scans)), ("cmbs", len(ds.lesions))):
        if expected.get(key) is not None and int(expected[key]) != actual:
            rep.warnings.append(f"card expects {expected[key]} {key}, dataset has {actual} "
                                f"(a subset, or a different release?)")
    # affines and lesions
    aff_fails, les_fails = [], []
    for _, row in ds.scans.iterrows():
        sid = str(row["scan_id"])
        try:
            vol = ds.read_image(sid)
        except Exception as exc:  # noqa: BLE001 - reported as a failure line
            aff_fails.append(f"{sid}: {exc}")
            continue
        a = vol.affine
        vs = voxel_sizes(a)
        cols = a[:3, :3] / vs
        cos = np.abs(cols.T @ cols - np.eye(3)).max()
        if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
            aff_fails.append(f"{sid}: singular or non-finite affine")
        if cos > 1e-3:
            aff_fails.append(f"{sid}: affine axes not orthogonal (|cos| up to {cos:.2g})")
        if np.any(vs < 0.05) or np.any(vs > 10):
            aff_fails.append(f"{sid}: implausible voxel size {tuple(np.round(vs, 3))} mm")
        listed = np.array([row[f"voxel_mm_{x}"] for x in "xyz"], dtype=np.float64)
        if not np.allclose(listed, vs, atol=1e-3):
            aff_fails.append(f"{sid}: scans.csv voxel size {tuple(listed)} != affine "
                             f"{tuple(np.round(vs, 4))}")
        lab = ds.label_path(sid)
        if lab is not None:
            try:
                lv = read_volume(lab)
            except Exception as exc:  # noqa: BLE001 - reported as a failure line
                aff_fails.append(f"{sid}: {exc}")
                continue
            if lv.data.shape != vol.data.shape or not affines_match(lv.affine, a, atol_mm=1e-2):
                aff_fails.append(f"{sid}: label map not on the image grid")
        les = ds.lesions_of(sid)
        if not len(les):
            continue
        fg = _foreground(vol.data)
        ijk = les[["i", "j", "k"]].to_numpy(dtype=np.float64)
        xyz = les[["x_mm", "y_mm", "z_mm"]].to_numpy(dtype=np.float64)
        err = np.abs(voxel_to_world(a, ijk) - xyz).max(axis=1)
        for n, (_, lr) in enumerate(les.iterrows()):
            probs = dark_and_inside(vol.data, a, ijk[n], fg)
            if err[n] > 1e-3:
                probs.append(f"world and voxel centroids disagree by {err[n]:.3g} mm")
            les_fails += [f"{sid} lesion {int(lr['lesion_id'])}: {p}" for p in probs]
    rep.failures["affines"] = aff_fails
    rep.failures["lesions"] = les_fails
    rep.failures = {"complete": [], **rep.failures}
    return rep


def _load_json(path: Path) -> dict:  # pragma: no cover - small helper
    return json.loads(path.read_text())

"""DOU (Dou et al., IEEE TMI 2016; CUHK "cmb-3dcnn" data).

Raw layout (``SOURCE`` is ``cmb-3dcnn-data/`` or the folder holding it)::

    nii/01.nii ... 20.nii               SWI, uncompressed NIfTI, orientations vary (LPS/RAS/LAS)
    ground_truth/01.mat ... 20.mat      MATLAB: ``cen`` (N x 3), ``gt_num`` (N)

Coordinate convention: ``cen`` rows are **1-based** (MATLAB) voxel indices ``(i, j, k)`` of the
NIfTI array as stored on disk; the loader subtracts 1 to get cmbbench's 0-based voxels, and world
coordinates come from each scan's own affine (never from a fixed orientation). The column order
``(i, j, k)`` is an assumption [unverified against Dou's code]; ``cmbbench datasets verify``
checks that every converted point sits on a dark voxel. Some volumes contain NaNs (kept as
"never grown into" for the derived masks, written as 0 in the harmonized image).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from ..errors import MissingInputError, UnreadableInputError
from ..nifti import read_volume
from .base import RawScan, RawScanRef, register

log = logging.getLogger(__name__)


def read_dou_mat(path: Path) -> np.ndarray:
    """Read a DOU ground-truth ``.mat`` and return its ``cen`` as **0-based** voxels ``(N, 3)``.

    Raises
    ------
    UnreadableInputError
        The file is not a readable MATLAB file, has no ``cen``, or ``cen`` is not N x 3.
    """
    try:
        with open(path, "rb") as fh:
            header = fh.read(128)
    except OSError as exc:
        raise UnreadableInputError(f"cannot read the file ({exc.strerror})", path) from None
    if header.startswith(b"MATLAB 7.3"):  # HDF5-based, which scipy.io.loadmat cannot read
        raise UnreadableInputError("MATLAB v7.3 (HDF5) .mat files are not supported; re-save "
                                   "the file with MATLAB's -v7 option", path)
    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, OSError, TypeError, KeyError, IndexError) as exc:
        raise UnreadableInputError(f"not a readable MATLAB .mat file "
                                   f"({' '.join(str(exc).split())[:120]})", path) from None
    except Exception as exc:  # noqa: BLE001 - scipy raises assorted errors on corrupt streams
        raise UnreadableInputError(f"not a readable MATLAB .mat file ({type(exc).__name__})",
                                   path) from None
    if "cen" not in mat:
        raise UnreadableInputError("no variable 'cen' in the .mat file", path)
    cen = np.asarray(mat["cen"], dtype=np.float64)
    if cen.size == 0:
        return np.zeros((0, 3))
    if cen.ndim != 2 or cen.shape[1] != 3:
        raise UnreadableInputError(f"'cen' must be N x 3, got shape {cen.shape}", path)
    if "gt_num" in mat:
        gt = np.asarray(mat["gt_num"]).ravel()
        if gt.size and int(gt[0]) != len(cen):
            log.warning("%s: gt_num=%d but cen has %d rows; using cen", path, int(gt[0]), len(cen))
    return cen - 1.0


@register
class DouLoader:
    """Loader of the DOU layout (points)."""

    name = "dou"
    label_kind = "points"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        root = source
        if not (root / "nii").is_dir() and (root / "cmb-3dcnn-data" / "nii").is_dir():
            root = root / "cmb-3dcnn-data"
        img_dir, gt_dir = root / "nii", root / "ground_truth"
        if not img_dir.is_dir() or not gt_dir.is_dir():
            raise MissingInputError("unknown layout for DOU: expected nii/ and ground_truth/ "
                                    "(cmb-3dcnn-data)", source)
        refs = []
        for img in sorted(img_dir.glob("*.nii")):
            stem = img.name[:-4]
            mat = gt_dir / f"{stem}.mat"
            if not mat.is_file():
                raise MissingInputError("ground-truth file not found for image "
                                        f"{img.name}", mat)
            refs.append(RawScanRef(scan_id=f"DOU-{stem}", subject_id=f"DOU-{stem}",
                                   image_path=img, label_path=mat))
        orphans = sorted({p.name[:-4] for p in gt_dir.glob("*.mat")}
                         - {r.image_path.name[:-4] for r in refs})
        if orphans:
            raise MissingInputError(f"image not found for ground truth {orphans[0]}.mat",
                                    img_dir / f"{orphans[0]}.nii")
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        vol = read_volume(ref.image_path)
        pts = read_dou_mat(ref.label_path) if ref.label_path else np.zeros((0, 3))
        return RawScan(ref=ref, image=vol.data, affine=vol.affine, points_vox=pts)

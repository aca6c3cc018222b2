"""MOMENI (real CMBs) and sMOMENI (synthetic CMBs) (Momeni et al., CMPB 207:106127, 2021).

Raw layout (``SOURCE`` is ``PublicDataShare_2020/``)::

    rCMB_DefiniteSubject/*.nii[.gz]          real scans with CMBs        (MOMENI)
    NoCMBSubject/*.nii[.gz]                  real scans without CMBs     (MOMENI)
    sCMB_DefiniteSubject/*.nii[.gz]          real + synthetic CMBs       (sMOMENI, "_rsCMB_")
    sCMB_NoCMBSubject/*.nii[.gz]             synthetic CMBs only         (sMOMENI, "_sCMB_")
    rCMBInformationInfo.xlsx                 labels of rCMB_DefiniteSubject
    sCMBInformationInfo.xlsx                 labels of sCMB_DefiniteSubject
    sCMBLocationInformationInfoNocmb.xlsx    labels of sCMB_NoCMBSubject

Workbooks: column 1 is the NIfTI file name, then repeating ``x, y, z`` triplets, **1-based**
voxel indices ``(i+1, j+1, k+1)`` of the array as stored (LPS on disk per the notes; the
affine is used regardless). A header row is accepted and skipped. Duplicate and near-duplicate
points are merged by :func:`cmbbench.loaders.base.merge_duplicate_points`. A file name listed
twice contributes the union of its points. Scans of the ``*Definite*`` folders not listed in
the workbook are an error (their CMBs would be lost silently).

Subjects: the subject id is the file-name prefix matched by ``loader_options.subject_regex``
(default: everything before the first ``_``) [the AIBL naming is unverified]. Splits are
patient-wise (``split`` mapping in the card); sMOMENI is built from the same patients, so its
card puts every scan in ``pretrain`` and flags ``never_test_with: [MOMENI]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import InvalidValuesError, MissingInputError, UnreadableInputError
from ..nifti import read_volume, strip_nifti_suffix
from .base import RawScan, RawScanRef, as_number, read_workbook_rows, register, safe_id

#: (image folder, workbook or None) per variant.
VARIANTS: dict[str, list[tuple[str, str | None]]] = {
    "real": [("rCMB_DefiniteSubject", "rCMBInformationInfo.xlsx"), ("NoCMBSubject", None)],
    "synthetic": [("sCMB_DefiniteSubject", "sCMBInformationInfo.xlsx"),
                  ("sCMB_NoCMBSubject", "sCMBLocationInformationInfoNocmb.xlsx")],
}


def read_triplet_workbook(path: Path) -> dict[str, np.ndarray]:
    """Read a MOMENI workbook: file name -> **0-based** voxel points ``(N, 3)``.

    Raises
    ------
    UnreadableInputError
        A row's coordinates are not whole triplets of numbers.
    """
    points: dict[str, list] = {}
    for n, row in enumerate(read_workbook_rows(path), start=1):
        name = "" if row[0] is None else str(row[0]).strip()
        values = row[1:]
        while values and (values[-1] is None or str(values[-1]).strip() == ""):
            values = values[:-1]
        nums = [as_number(v) for v in values]
        if strip_nifti_suffix(name) is None and not any(x is not None for x in nums):
            continue  # header row
        if not name:
            raise UnreadableInputError(f"row {n}: no file name in column 1", path)
        if any(x is None for x in nums) or len(nums) % 3:
            raise UnreadableInputError(f"row {n} ({name}): coordinates are not x,y,z number "
                                       f"triplets", path)
        pts = np.asarray(nums, dtype=np.float64).reshape(-1, 3) - 1.0
        key = strip_nifti_suffix(name) or name
        points.setdefault(key, []).extend(pts.tolist())
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 3) for k, v in points.items()}


@register
class MomeniLoader:
    """Loader of the MOMENI / sMOMENI layout (points); ``loader_options.variant`` is ``real``
    (MOMENI) or ``synthetic`` (sMOMENI)."""

    name = "momeni"
    label_kind = "points"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        root = source / "PublicDataShare_2020" if (source / "PublicDataShare_2020").is_dir() \
            else source
        variant = str(options.get("variant", "real"))
        if variant not in VARIANTS:
            raise InvalidValuesError(f"loader_options.variant must be one of {list(VARIANTS)}")
        regex = re.compile(str(options.get("subject_regex", r"^([^_]+)")))
        prefix = str(options.get("scan_prefix", "MOMENI" if variant == "real" else "sMOMENI"))
        folders = [(root / d, None if w is None else root / w) for d, w in VARIANTS[variant]]
        if not any(d.is_dir() for d, _ in folders):
            expected = " and ".join(d for d, _ in VARIANTS[variant])
            raise MissingInputError(f"unknown layout for MOMENI: expected {expected}", source)
        refs = []
        for folder, book in folders:
            if not folder.is_dir():
                raise MissingInputError("folder not found", folder)
            table = read_triplet_workbook(book) if book is not None else {}
            images = {strip_nifti_suffix(p.name): p for p in sorted(folder.iterdir())
                      if strip_nifti_suffix(p.name) is not None}
            missing = sorted(set(table) - set(images))
            if missing:
                raise MissingInputError(f"image {missing[0]} listed in {book.name} not found",
                                        folder / f"{missing[0]}.nii")
            for stem, img in images.items():
                if book is not None and stem not in table:
                    raise MissingInputError(f"scan {stem} is not listed in the workbook", book)
                m = regex.search(stem)
                subject = m.group(1) if m and m.groups() else (m.group(0) if m else stem)
                refs.append(RawScanRef(
                    scan_id=f"{prefix}-{safe_id(stem)}", subject_id=subject, image_path=img,
                    label_path=book, info={"sequence": "SWI"},
                    extra={"points": table.get(stem, np.zeros((0, 3)))}))
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        vol = read_volume(ref.image_path)
        return RawScan(ref=ref, image=vol.data, affine=vol.affine,
                       points_vox=np.asarray(ref.extra.get("points"), dtype=np.float64))

"""Yonsei MILab CMB data (Al-masni et al., NeuroImage: Clinical 28:102464, 2020).

Raw layout [unverified: the archive was not inspected; the notes only say "one Excel file per
subject with slice number, x (column), y (row)"]. The loader accepts, anywhere under
``SOURCE``::

    <stem>.xlsx                  one workbook per subject: slice, x (column), y (row) per CMB
    <stem><image_suffix>.nii[.gz] the SWI volume (``loader_options.image_suffix``, default "")

Coordinate convention: 2D point labels ``(slice, column, row)``, **1-based** by default
(``loader_options.one_based``) [unverified]. As in MATLAB, *row* indexes the first array axis
and *column* the second: ``i = row - 1``, ``j = column - 1``, ``k = slice - 1`` (0-based
voxels of the NIfTI array as stored). Columns are found by header name (``slice``;
``x``/``col``/``column``; ``y``/``row``); without a header the order is slice, x, y.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MissingInputError, UnreadableInputError
from ..nifti import read_volume, strip_nifti_suffix
from .base import RawScan, RawScanRef, as_number, read_workbook_rows, register, safe_id

_NAMES = {"slice": ("slice", "slice number", "slice_number", "z"),
          "col": ("x", "col", "column", "x (column)"),
          "row": ("y", "row", "y (row)")}


def read_slice_points(path: Path, *, one_based: bool = True) -> np.ndarray:
    """Read a Yonsei workbook into **0-based** voxel points ``(N, 3)`` as ``(i=row, j=column,
    k=slice)``.

    Raises
    ------
    UnreadableInputError
        Missing columns or non-numeric coordinates (the message names the row).
    """
    rows = read_workbook_rows(path)
    order = {"slice": 0, "col": 1, "row": 2}
    first = 1
    if rows and not all(as_number(v) is not None for v in rows[0][:3]):
        header = [("" if v is None else str(v)).strip().lower() for v in rows[0]]
        found = {}
        for key, names in _NAMES.items():
            hits = [n for n, h in enumerate(header) if h in names]
            if not hits:
                raise UnreadableInputError(f"no '{key}' column in the header {rows[0]}", path)
            found[key] = hits[0]
        order, rows, first = found, rows[1:], 2
    off = 1.0 if one_based else 0.0
    pts = []
    for n, row in enumerate(rows, start=first):
        vals = [as_number(row[order[k]]) if order[k] < len(row) else None
                for k in ("row", "col", "slice")]
        if any(v is None for v in vals):
            raise UnreadableInputError(f"row {n}: slice/x/y must be numbers, got {row}", path)
        pts.append([v - off for v in vals])
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3)


@register
class YonseiLoader:
    """Loader of the Yonsei layout (2D slice/column/row points)."""

    name = "yonsei"
    label_kind = "points"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]:
        suffix = str(options.get("image_suffix", ""))
        books = sorted(p for p in source.rglob("*.xlsx") if not p.name.startswith("~$"))
        images = {}
        for p in sorted(source.rglob("*.nii*")):
            stem = strip_nifti_suffix(p.name)
            if stem is not None:
                images.setdefault(stem, p)
        if not books:
            raise MissingInputError("unknown layout for Yonsei: no .xlsx label workbooks", source)
        refs = []
        for book in books:
            stem = book.name[:-5]
            img = images.get(stem + suffix)
            if img is None:
                raise MissingInputError(f"image {stem + suffix}.nii[.gz] not found for this "
                                        "workbook", book)
            refs.append(RawScanRef(scan_id=f"YONSEI-{safe_id(stem)}", subject_id=stem,
                                   image_path=img, label_path=book, info={"sequence": "SWI"}))
        return refs

    def load(self, ref: RawScanRef, options: dict) -> RawScan:
        vol = read_volume(ref.image_path)
        pts = read_slice_points(ref.label_path, one_based=bool(options.get("one_based", True)))
        return RawScan(ref=ref, image=vol.data, affine=vol.affine, points_vox=pts)

"""The harmonized dataset layout: reader and writer.

::

    <DATASET>/
      dataset.json            card snapshot + version + checksums (+ mask growing rule)
      scans.csv               one row per scan (cmbbench.model.SCAN_COLUMNS)
      lesions.csv             one row per reference CMB (cmbbench.model.LESION_COLUMNS)
      images/<scan_id>.nii.gz
      labels/<scan_id>.nii.gz instance label map (0 = background, n = lesion_id) where a mask exists
      mimics.csv              synthetic datasets only

The lesion table (world RAS+ mm through the image affine) is the canonical ground truth; label
maps, when present, carry each lesion's voxels under its ``lesion_id``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import MissingInputError, UnreadableInputError
from .geometry import voxel_sizes
from .model import LESION_COLUMNS, SCAN_COLUMNS, ScanInfo
from .nifti import Volume, read_volume, write_volume

__all__ = ["DatasetWriter", "HarmonizedDataset", "read_csv", "read_dataset", "sha256_file"]

LAYOUT_VERSION = "1"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_csv(path: Path, required: tuple[str, ...], *, dtype: dict | None = None) -> pd.DataFrame:
    """Read a CSV file, checking that the ``required`` columns exist (one-line errors)."""
    if not path.is_file():
        raise MissingInputError("file not found", path)
    try:
        frame = pd.read_csv(path, dtype=dtype, keep_default_na=True,
                            float_precision="round_trip")
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame(columns=list(required))
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise UnreadableInputError(f"malformed CSV ({' '.join(str(exc).split())})", path) from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UnreadableInputError(f"missing column(s): {', '.join(missing)}", path)
    return frame


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class HarmonizedDataset:
    """A dataset in the harmonized layout.

    Attributes
    ----------
    root
        Folder of the dataset.
    card
        Contents of ``dataset.json`` (name, version, checksums, ...).
    scans
        ``scans.csv`` as a table (``scan_id`` as string).
    lesions
        ``lesions.csv`` as a table.
    """

    root: Path
    card: dict
    scans: pd.DataFrame
    lesions: pd.DataFrame
    mimics: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.root.name))

    @property
    def scan_ids(self) -> list[str]:
        return self.scans["scan_id"].astype(str).tolist()

    def image_path(self, scan_id: str) -> Path:
        return self.root / "images" / f"{scan_id}.nii.gz"

    def label_path(self, scan_id: str) -> Path | None:
        path = self.root / "labels" / f"{scan_id}.nii.gz"
        return path if path.is_file() else None

    def read_image(self, scan_id: str) -> Volume:
        return read_volume(self.image_path(scan_id))

    def read_labels(self, scan_id: str) -> Volume | None:
        path = self.label_path(scan_id)
        return None if path is None else read_volume(path)

    def lesions_of(self, scan_id: str) -> pd.DataFrame:
        return self.lesions[self.lesions["scan_id"] == scan_id].reset_index(drop=True)


def read_dataset(root: str | Path) -> HarmonizedDataset:
    """Open a harmonized dataset folder.

    Raises
    ------
    MissingInputError
        The folder, ``scans.csv`` or ``lesions.csv`` does not exist.
    UnreadableInputError
        A table is malformed or lacks required columns, or ``dataset.json`` is not JSON.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError("dataset folder not found", root)
    card: dict = {}
    card_path = root / "dataset.json"
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except json.JSONDecodeError as exc:
            raise UnreadableInputError(f"invalid JSON ({exc})", card_path) from None
    scans = read_csv(root / "scans.csv", ("scan_id",), dtype={"scan_id": str, "subject_id": str})
    lesions = read_csv(root / "lesions.csv", ("scan_id", "lesion_id", "x_mm", "y_mm", "z_mm"),
                       dtype={"scan_id": str})
    for col in LESION_COLUMNS:
        if col not in lesions.columns:
            lesions[col] = {"location": "unknown", "mask_source": "none",
                            "n_voxels": 0}.get(col, np.nan)
    lesions["n_voxels"] = lesions["n_voxels"].fillna(0).astype(np.int64)
    lesions["lesion_id"] = lesions["lesion_id"].astype(np.int64)
    lesions["location"] = lesions["location"].fillna("unknown").astype(str)
    lesions["mask_source"] = lesions["mask_source"].fillna("none").astype(str)
    unknown = sorted(set(lesions["scan_id"]) - set(scans["scan_id"]))
    if unknown:
        raise UnreadableInputError(f"lesions reference unknown scan(s): {', '.join(unknown[:5])}",
                                   root / "lesions.csv")
    mimics = None
    if (root / "mimics.csv").is_file():
        mimics = read_csv(root / "mimics.csv", ("scan_id",), dtype={"scan_id": str})
    return HarmonizedDataset(root=root, card=card, scans=scans,
                             lesions=lesions[list(LESION_COLUMNS) + [
                                 c for c in lesions.columns if c not in LESION_COLUMNS]],
                             mimics=mimics)


@dataclass
class DatasetWriter:
    """Write a harmonized dataset scan by scan.

    Images and label maps are written as each scan is added; ``scans.csv``, ``lesions.csv`` and
    ``dataset.json`` (with SHA-256 checksums) are written by :meth:`close`.

    Example
    -------
    >>> w = DatasetWriter(root, name="MYDATA", version="1.0")      # doctest: +SKIP
    >>> w.add_scan(ScanInfo("s01"), image, affine, labels, lesion_table)  # doctest: +SKIP
    >>> w.close()                                                   # doctest: +SKIP
    """

    root: Path
    name: str
    version: str = "0"
    card: dict = field(default_factory=dict)
    _scans: list[dict] = field(default_factory=list, init=False)
    _lesions: list[pd.DataFrame] = field(default_factory=list, init=False)
    _checksums: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)

    def add_scan(self, info: ScanInfo, image: np.ndarray, affine: np.ndarray,
                 labels: np.ndarray | None, lesions: pd.DataFrame) -> None:
        """Write one scan's image (and label map) and remember its rows.

        ``info`` geometry fields left as NaN/empty are filled from the array and affine;
        ``n_cmb`` is set to the number of lesion rows.
        """
        row = asdict(info)
        vs = voxel_sizes(affine)
        for n, axis in enumerate("xyz"):
            if not np.isfinite(row[f"voxel_mm_{axis}"]):
                row[f"voxel_mm_{axis}"] = float(vs[n])
        if not np.isfinite(row["slice_thickness_mm"]):
            row["slice_thickness_mm"] = float(vs[2])
        row["shape"] = row["shape"] or "x".join(str(s) for s in image.shape)
        row["n_cmb"] = int(len(lesions))
        img_path = write_volume(self.root / "images" / f"{info.scan_id}.nii.gz", image, affine)
        self._checksums[f"images/{info.scan_id}.nii.gz"] = sha256_file(img_path)
        if labels is not None:
            lab_path = write_volume(self.root / "labels" / f"{info.scan_id}.nii.gz",
                                    labels.astype(np.uint16 if labels.max(initial=0) < 65535
                                                  else np.uint32), affine)
            self._checksums[f"labels/{info.scan_id}.nii.gz"] = sha256_file(lab_path)
        self._scans.append(row)
        self._lesions.append(lesions.reindex(columns=list(LESION_COLUMNS)))

    def close(self, mimics: pd.DataFrame | None = None) -> HarmonizedDataset:
        """Write the tables and ``dataset.json``; return the dataset as read back."""
        scans = pd.DataFrame(self._scans, columns=list(SCAN_COLUMNS))
        non_empty = [f for f in self._lesions if len(f)]
        lesions = (pd.concat(non_empty, ignore_index=True) if non_empty
                   else pd.DataFrame(columns=list(LESION_COLUMNS)))
        scans.to_csv(self.root / "scans.csv.partial", index=False)
        os.replace(self.root / "scans.csv.partial", self.root / "scans.csv")
        lesions.to_csv(self.root / "lesions.csv.partial", index=False)
        os.replace(self.root / "lesions.csv.partial", self.root / "lesions.csv")
        if mimics is not None:
            mimics.to_csv(self.root / "mimics.csv", index=False)
        card = {"name": self.name, "version": self.version, "layout_version": LAYOUT_VERSION,
                **self.card, "n_scans": len(scans), "n_cmb": len(lesions),
                "checksums": self._checksums}
        _atomic_write_text(self.root / "dataset.json", json.dumps(card, indent=2, sort_keys=True))
        return read_dataset(self.root)

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

__all__ = ["TABLE_FILES", "DatasetWriter", "HarmonizedDataset", "complete_lesions",
           "dataset_record", "digest_of_checksums", "files_sha256", "read_csv", "read_dataset",
           "sha256_file"]

LAYOUT_VERSION = "1"

#: The tables of the layout, hashed by :meth:`HarmonizedDataset.content_sha256` with the files
#: that ``dataset.json`` lists (whose checksums do not cover the tables).
TABLE_FILES: tuple[str, ...] = ("scans.csv", "lesions.csv", "mimics.csv")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_of_checksums(checksums: dict[str, str]) -> str:
    """Hex SHA-256 over ``relative path -> file sha256`` pairs, in sorted path order.

    One line ``"<path>  <sha256>\\n"`` per file is hashed, so the digest changes when any file
    changes, is added, removed or renamed, and does not depend on where the files lie or on the
    order in which they were listed.
    """
    h = hashlib.sha256()
    for rel in sorted(checksums):
        h.update(f"{rel}  {checksums[rel]}\n".encode())
    return h.hexdigest()


def files_sha256(paths: dict[str, Path]) -> str:
    """:func:`digest_of_checksums` of files given as ``name -> path`` (every file is read)."""
    return digest_of_checksums({name: sha256_file(p) for name, p in paths.items()})


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

    def checksum_failures(self) -> list[str]:
        """One line per file listed in ``dataset.json``'s checksums that is missing or whose
        bytes no longer have the recorded SHA-256 (reads every listed file)."""
        fails = []
        for rel, digest in sorted((self.card.get("checksums") or {}).items()):
            path = self.root / rel
            if not path.is_file():
                fails.append(f"{rel}: missing")
            elif sha256_file(path) != digest:
                fails.append(f"{rel}: checksum differs from dataset.json")
        return fails

    def content_sha256(self, *, verify: bool = True) -> str | None:
        """Which copy of the data this is: one SHA-256 over every file's SHA-256.

        The digest (:func:`digest_of_checksums`) covers the images and label maps through the
        checksums recorded in ``dataset.json`` and the tables (:data:`TABLE_FILES`, hashed
        now). Two folders with the same bytes give the same digest wherever they lie; one
        voxel or one table cell changed gives another. Runs record it (``run.json``) so that a
        number can be traced to the exact copy it was computed on; regenerated synthetic data
        is byte-identical only on the same numerical kernels (docs/synthetic.md, Limits).

        Parameters
        ----------
        verify
            Re-hash every listed file first (reads the whole dataset).

        Returns
        -------
        str or None
            Hex digest; None when ``dataset.json`` lists no checksums, or (with ``verify``)
            when a listed file is missing or no longer matches its checksum.
        """
        checksums = dict(self.card.get("checksums") or {})
        if not checksums:
            return None
        if verify and self.checksum_failures():
            return None
        for name in TABLE_FILES:
            if (self.root / name).is_file():
                checksums[name] = sha256_file(self.root / name)
        return digest_of_checksums(checksums)


def dataset_record(ds: HarmonizedDataset, requested_as: object) -> dict:
    """What a run records of its dataset (``run.json``'s ``dataset``): name, version, absolute
    path, number of scans, how it was asked for, and :meth:`HarmonizedDataset.content_sha256`.
    """
    return {"name": ds.name, "version": str(ds.card.get("version", "")),
            "path": str(ds.root.resolve()), "n_scans": len(ds.scan_ids),
            "requested_as": str(requested_as), "content_sha256": ds.content_sha256()}


def complete_lesions(lesions: pd.DataFrame) -> pd.DataFrame:
    """A lesion table completed to :data:`~cmbbench.model.LESION_COLUMNS`, those columns first.

    Absent or empty cells become: ``location`` ``"unknown"``, ``mask_source`` ``"none"``,
    ``n_voxels`` 0, any other column NaN; ``lesion_id`` and ``n_voxels`` are int64. Extra
    columns are kept after the standard ones. The input is not modified.
    """
    defaults = {"location": "unknown", "mask_source": "none", "n_voxels": 0}
    out = lesions.copy()
    for col in LESION_COLUMNS:
        if col not in out.columns:
            out[col] = defaults.get(col, np.nan)
    out["n_voxels"] = out["n_voxels"].fillna(defaults["n_voxels"]).astype(np.int64)
    out["lesion_id"] = out["lesion_id"].astype(np.int64)
    for col in ("location", "mask_source"):
        out[col] = out[col].fillna(defaults[col]).astype(str)
    return out[list(LESION_COLUMNS) + [c for c in out.columns if c not in LESION_COLUMNS]]


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
    lesions = complete_lesions(lesions)
    unknown = sorted(set(lesions["scan_id"]) - set(scans["scan_id"]))
    if unknown:
        raise UnreadableInputError(f"lesions reference unknown scan(s): {', '.join(unknown[:5])}",
                                   root / "lesions.csv")
    mimics = None
    if (root / "mimics.csv").is_file():
        mimics = read_csv(root / "mimics.csv", ("scan_id",), dtype={"scan_id": str})
    return HarmonizedDataset(root=root, card=card, scans=scans, lesions=lesions, mimics=mimics)


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

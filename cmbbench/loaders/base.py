"""The loader protocol and the resumable ``prepare`` that turns a raw dataset into the
harmonized layout (see :mod:`cmbbench.dataset`).

A *loader* knows one raw layout. It has two steps:

``discover(source, options) -> list[RawScanRef]``
    Cheap: walks the raw folder, pairs each image with its label file, and fails with one
    line naming the folder when the layout is not recognised.
``load(ref, options) -> RawScan``
    Reads one scan: the image array and affine as nibabel returns them, and either a label
    mask (``mask``) or point annotations converted to **0-based voxel indices** of that array
    (``points_vox``). Every 1-based convention (MATLAB ``cen``, Excel triplets) is undone here.

:func:`prepare` then harmonizes each scan:

- point datasets: duplicate points (closer than ``merge_distance_mm``) are merged, a mask is
  grown from each point by :func:`cmbbench.harmonize.grow_from_points` (``mask_source =
  derived``; the :class:`~cmbbench.harmonize.GrowRule` is recorded in ``dataset.json``); the
  lesion centroid stays the annotated point, in world RAS+ mm through the affine;
- mask datasets: a binary mask is split into 26-connected instances, an instance mask keeps
  its instances (renumbered 1..n); ``mask_source = rater``;
- every lesion gets a MARS ``location`` (lobar/deep/infratentorial) from the bundled atlas
  registered to its scan (:mod:`cmbbench.loaders.location`), or ``unknown`` with the reason:
  per scan in ``scans.csv`` (``location_source``, ``registration_dice``, ``registration_cost``),
  per lesion in ``dataset.json`` ``scan_notes.<scan_id>.location_unknown``, summarised in
  ``location_reason``; the method and its thresholds are in ``location_method``. Scans
  without lesions are not registered. A card with ``location: none`` (or
  ``prepare(..., locate=False)``) skips registration: every location is then ``unknown``
  with :data:`LOCATION_REASON`. A loader whose raw labels carry locations sets
  ``provides_location = True`` and is not registered either.

Resumability: each scan leaves ``images/<id>.nii.gz``, ``labels/<id>.nii.gz`` (written to a
temporary name and renamed) and last its shard ``.shards/<id>.json`` (renamed into place). A
scan is done only when its shard exists. ``scans.csv``, ``lesions.csv``, ``statistics.json``
and, last of all, ``dataset.json`` are written when every scan is done, so a half-prepared
folder never looks complete (:func:`cmbbench.registry.resolve_dataset` requires
``dataset.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from .. import __version__
from ..dataset import LAYOUT_VERSION, HarmonizedDataset, read_dataset, sha256_file
from ..errors import (
    ConfigurationError,
    GeometryMismatchError,
    InvalidValuesError,
    MissingInputError,
)
from ..geometry import voxel_sizes, voxel_to_world
from ..harmonize import (
    GrowRule,
    grow_from_points,
    label_instances,
    lesions_from_labels,
    lesions_from_points,
)
from ..model import LESION_COLUMNS, SCAN_COLUMNS, ScanInfo
from ..nifti import Volume, write_volume

__all__ = [
    "LOADERS",
    "LOCATION_REASON",
    "Loader",
    "RawScan",
    "RawScanRef",
    "get_loader",
    "merge_duplicate_points",
    "patient_split",
    "prepare",
    "shard_dir",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

#: Why every lesion's MARS location is ``unknown`` when atlas registration is switched off
#: (card ``location: none`` or ``prepare(..., locate=False)``; recorded in ``dataset.json``).
LOCATION_REASON = ("location switched off for this dataset (card 'location: none'): no atlas "
                   "registration was run")

#: Default distance (mm) under which two point annotations of one scan are one CMB.
DEFAULT_MERGE_MM = 1.5


@dataclass
class RawScanRef:
    """One scan of a raw dataset, found by a loader's ``discover``.

    Attributes
    ----------
    scan_id
        Harmonized scan id (file-name safe).
    subject_id
        Patient id (splits are patient-wise).
    image_path
        The image file (NIfTI).
    label_path
        The label file (mask NIfTI, ``.mat``, Excel workbook), or None for a scan without CMBs.
    info
        Extra ``scans.csv`` fields known from the layout (site, field strength, ...).
    extra
        Loader-specific data (e.g. the points read from a shared workbook).
    """

    scan_id: str
    subject_id: str
    image_path: Path
    label_path: Path | None = None
    info: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class RawScan:
    """One scan as read by a loader, before harmonization.

    Attributes
    ----------
    image
        Image array indexed ``[i, j, k]`` as nibabel returns it (no reorientation).
    affine
        4x4 voxel-to-world (RAS+ mm) matrix from the header.
    mask
        Label mask on the image grid (binary of any dtype, or an instance map), or None.
    points_vox
        ``(N, 3)`` **0-based** voxel coordinates of point annotations, or None.
    mask_is_instance
        Whether ``mask`` is an instance map (one integer per CMB) rather than binary.
    """

    ref: RawScanRef
    image: np.ndarray
    affine: np.ndarray
    mask: np.ndarray | None = None
    points_vox: np.ndarray | None = None
    mask_is_instance: bool = False


class Loader(Protocol):
    """A raw-format reader (see module docstring)."""

    name: str
    label_kind: str  # "points" | "mask"

    def discover(self, source: Path, options: dict) -> list[RawScanRef]: ...

    def load(self, ref: RawScanRef, options: dict) -> RawScan: ...


def get_loader(name: str) -> Loader:
    """The loader called ``name`` (``dou``, ``valdo``, ``momeni``, ``yonsei``, ``bids``,
    ``nnunet``)."""
    key = str(name).lower()
    if key not in LOADERS:
        raise ConfigurationError(f"unknown loader {name!r}; known loaders: {', '.join(LOADERS)}")
    return LOADERS[key]()


LOADERS: dict[str, Callable[[], Loader]] = {}


def register(cls: type) -> type:
    """Class decorator adding a loader to :data:`LOADERS` under ``cls.name``."""
    LOADERS[cls.name] = cls
    return cls


# ------------------------------------------------------------------------------ helpers

def merge_duplicate_points(points_vox: np.ndarray, affine: np.ndarray,
                           merge_distance_mm: float = DEFAULT_MERGE_MM) -> np.ndarray:
    """Merge point annotations closer than ``merge_distance_mm`` (world mm, single linkage).

    Each group is replaced by its mean position (0-based voxels); groups keep the order of
    their first point. Exact duplicates are always merged (also with distance 0).
    """
    pts = np.atleast_2d(np.asarray(points_vox, dtype=np.float64)).reshape(-1, 3)
    if len(pts) < 2:
        return pts
    world = voxel_to_world(affine, pts)
    d = np.sqrt(((world[:, None, :] - world[None, :, :]) ** 2).sum(-1))
    parent = list(range(len(pts)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(d <= merge_distance_mm + 1e-9, 1))):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for n in range(len(pts)):
        groups.setdefault(find(n), []).append(n)
    return np.array([pts[g].mean(axis=0) for g in sorted(groups.values(), key=min)])


def patient_split(subject_id: str, fractions: dict[str, float], salt: str = "") -> str:
    """Deterministic patient-wise split: every scan of a subject lands in the same split.

    The subject id is hashed (SHA-256 with ``salt``) to a number in [0, 1) that is cut by the
    cumulative ``fractions`` (in the dict's order), e.g. ``{"train": .6, "val": .2, "test": .2}``.
    """
    h = hashlib.sha256(f"{salt}{subject_id}".encode()).hexdigest()
    u = int(h[:12], 16) / float(16 ** 12)
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += float(fractions[name])
        if u < acc:
            return name
    return names[-1]


def check_points_inside(points_vox: np.ndarray, shape: tuple[int, ...], path: Path | None,
                        what: str = "point") -> None:
    """Raise :class:`InvalidValuesError` naming ``path`` if a point (0-based voxels, rounded)
    falls outside an array of ``shape``."""
    pts = np.atleast_2d(np.asarray(points_vox, dtype=np.float64)).reshape(-1, 3)
    if not np.all(np.isfinite(pts)):
        raise InvalidValuesError(f"non-finite {what} coordinate", path)
    idx = np.rint(pts).astype(int)
    bad = np.flatnonzero(np.any((idx < 0) | (idx >= np.asarray(shape)[:3]), axis=1))
    if len(bad):
        n = int(bad[0])
        raise InvalidValuesError(
            f"{what} {n + 1} at 0-based voxel {tuple(int(v) for v in idx[n])} is outside the "
            f"image of shape {tuple(int(s) for s in shape)}", path)


def check_same_grid(mask_shape: tuple[int, ...], image_shape: tuple[int, ...],
                    path: Path | None) -> None:
    """Raise :class:`GeometryMismatchError` naming ``path`` when the label and image shapes
    differ."""
    if tuple(mask_shape) != tuple(image_shape):
        raise GeometryMismatchError(f"label shape {tuple(mask_shape)} differs from the image "
                                    f"shape {tuple(image_shape)}", path)


def safe_id(text: str) -> str:
    """A file-name-safe scan id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def shard_dir(out: Path) -> Path:
    """Folder of the per-scan shards of a dataset being prepared."""
    return Path(out) / ".shards"


def _jsonable(value: object) -> object:
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if not np.isfinite(v) else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ------------------------------------------------------------------------------ harmonize

def harmonize_scan(raw: RawScan, *, label_kind: str, rule: GrowRule,
                   merge_distance_mm: float) -> tuple[np.ndarray, np.ndarray | None, pd.DataFrame,
                                                      dict]:
    """Harmonize one raw scan.

    Returns
    -------
    image, labels, lesions, notes
        The image (non-finite voxels set to 0, their count in ``notes``), the instance label
        map (or None), the lesion table (:data:`LESION_COLUMNS`) and notes for the shard.
    """
    ref = raw.ref
    image = np.asarray(raw.image)
    notes: dict = {}
    finite = np.isfinite(image) if image.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        notes["nonfinite_voxels_set_to_0"] = int((~finite).sum())
        image = np.where(finite, image, 0).astype(image.dtype)
    if label_kind == "points":
        pts = raw.points_vox if raw.points_vox is not None else np.zeros((0, 3))
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64)).reshape(-1, 3)
        check_points_inside(pts, image.shape, ref.label_path, what=f"{ref.scan_id}: point")
        merged = merge_duplicate_points(pts, raw.affine, merge_distance_mm)
        if len(merged) != len(pts):
            notes["duplicate_points_merged"] = int(len(pts) - len(merged))
            log.info("%s: merged %d duplicate point(s)", ref.scan_id, len(pts) - len(merged))
        if len(merged):
            # grow on the raw intensities with NaN kept as NaN (never grown into)
            labels = grow_from_points(np.asarray(raw.image, dtype=np.float64), raw.affine,
                                      merged, rule=rule)
        else:
            labels = np.zeros(image.shape, dtype=np.uint32)
        lesions = lesions_from_points(voxel_to_world(raw.affine, merged), raw.affine,
                                      scan_id=ref.scan_id, derived_labels=labels)
        return image, labels, lesions, notes
    if raw.mask is None:
        lesions = lesions_from_labels(np.zeros((1, 1, 1), dtype=np.uint8), raw.affine,
                                      scan_id=ref.scan_id)
        return image, None, lesions, notes
    mask = np.asarray(raw.mask)
    check_same_grid(mask.shape, image.shape, ref.label_path)
    if mask.dtype.kind == "f" and not np.all(np.isfinite(mask)):
        raise InvalidValuesError("NaN/inf voxel(s) in the label mask", ref.label_path)
    if mask.dtype.kind in "iuf" and float(mask.min(initial=0)) < 0:
        raise InvalidValuesError("negative label value(s)", ref.label_path)
    if raw.mask_is_instance:
        ids = np.unique(mask[mask > 0])
        labels = np.zeros(mask.shape, dtype=np.uint32)
        for n, v in enumerate(ids, start=1):
            labels[mask == v] = n
    else:
        labels, _ = label_instances(mask >= 0.5 if mask.dtype.kind == "f" else mask > 0,
                                    connectivity=26)
    lesions = lesions_from_labels(labels, raw.affine, scan_id=ref.scan_id, mask_source="rater")
    return image, labels, lesions, notes


def _locate(image: np.ndarray, affine: np.ndarray, lesions: pd.DataFrame, row: dict,
            notes: dict, locate: bool) -> dict | None:
    """Fill ``lesions.location`` and the scan's location columns/notes; return the
    registration summary for the shard (None when not registered)."""
    row["registration_dice"] = float("nan")
    row["registration_cost"] = float("nan")
    if not locate:
        row["location_source"] = "unknown: location switched off"
        return None
    from .location import locate_lesions

    loc = locate_lesions(image, affine, lesions)
    row["location_source"] = loc.source
    if loc.registration is None:
        return None
    reg = loc.registration
    row["registration_dice"] = float(reg.dice)
    row["registration_cost"] = float(reg.cost)
    lesions["location"] = loc.locations
    if loc.reasons:
        notes["location_unknown"] = {str(k): v for k, v in loc.reasons.items()}
    return reg.summary()


def _write_scan(loader: Loader, ref: RawScanRef, out: Path, options: dict, split: str,
                base_info: dict, rule: GrowRule, merge_mm: float, locate: bool = True) -> dict:
    raw = loader.load(ref, options)
    image, labels, lesions, notes = harmonize_scan(raw, label_kind=loader.label_kind, rule=rule,
                                                   merge_distance_mm=merge_mm)
    info = {**base_info, **ref.info}
    row = asdict(ScanInfo(scan_id=ref.scan_id, subject_id=str(ref.subject_id), split=split,
                          **{k: v for k, v in info.items() if k in SCAN_COLUMNS
                             and k not in ("scan_id", "subject_id", "split")}))
    vs = voxel_sizes(raw.affine)
    for n, axis in enumerate("xyz"):
        row[f"voxel_mm_{axis}"] = float(vs[n])
    if not np.isfinite(row["slice_thickness_mm"]):
        row["slice_thickness_mm"] = float(vs[2])
    row["shape"] = "x".join(str(s) for s in image.shape)
    row["n_cmb"] = len(lesions)
    if getattr(loader, "provides_location", False):
        row["location_source"] = "raw labels"
        registration = None
    else:
        registration = _locate(image, raw.affine, lesions, row, notes, locate)
    checksums = {}
    path = write_volume(out / "images" / f"{ref.scan_id}.nii.gz", image, raw.affine)
    checksums[f"images/{ref.scan_id}.nii.gz"] = sha256_file(path)
    if labels is not None:
        path = write_volume(out / "labels" / f"{ref.scan_id}.nii.gz",
                            labels.astype(np.uint16 if labels.max(initial=0) < 65535
                                          else np.uint32), raw.affine)
        checksums[f"labels/{ref.scan_id}.nii.gz"] = sha256_file(path)
    shard = {
        "scan": {k: _jsonable(v) for k, v in row.items()},
        "lesions": [{k: _jsonable(v) for k, v in r.items()}
                    for r in lesions.reindex(columns=list(LESION_COLUMNS)).to_dict("records")],
        "checksums": checksums,
        "raw": {"image": str(ref.image_path),
                "label": None if ref.label_path is None else str(ref.label_path)},
        "notes": notes,
        "registration": registration,
    }
    sd = shard_dir(out)
    sd.mkdir(exist_ok=True)
    tmp = sd / f"{ref.scan_id}.json.partial"
    tmp.write_text(json.dumps(shard, allow_nan=False))
    os.replace(tmp, sd / f"{ref.scan_id}.json")
    return shard


def _grow_rule(card: dict) -> GrowRule:
    opts = dict(card.get("grow_rule") or {})
    try:
        return GrowRule(**opts)
    except TypeError as exc:
        raise ConfigurationError(f"card {card.get('name')}: invalid grow_rule ({exc})") from None


def _scan_split(card: dict, subject_id: str) -> str:
    split = card.get("split", "test")
    if isinstance(split, dict):
        return patient_split(subject_id, split, salt=str(card.get("name", "")))
    return str(split)


def _locate_enabled(card: dict, locate: bool | None) -> bool:
    if locate is not None:
        return bool(locate)
    value = str(card.get("location", "atlas")).lower()
    if value not in ("atlas", "none"):
        raise ConfigurationError(f"card {card.get('name')}: location must be 'atlas' or "
                                 f"'none', got {card.get('location')!r}")
    return value == "atlas"


def _location_record(locate: bool) -> dict | None:
    if not locate:
        return None
    from ..errors import CmbbenchError
    from .location import location_method

    try:  # loads the bundled atlas: fail before any scan, with the way out
        return location_method()
    except CmbbenchError as exc:
        raise ConfigurationError(f"MARS locations need the bundled atlas ({exc.problem}); "
                                 f"install it, or prepare with --no-location") from None


def _record(card: dict, loader: Loader, locate: bool) -> dict:
    return {"dataset": card.get("name"), "version": str(card.get("version", "0")),
            "loader": loader.name, "options": card.get("loader_options") or {},
            "grow_rule": card.get("grow_rule") or {}, "split": card.get("split", "test"),
            "location": _location_record(locate)}


def prepare(card: dict, source: str | Path, out: str | Path, *,
            progress: Progress | None = None, locate: bool | None = None) -> HarmonizedDataset:
    """Turn the raw dataset at ``source`` into the harmonized layout at ``out`` (resumable).

    Parameters
    ----------
    card
        The registry card (``loader``, ``loader_options``, ``split``, ``grow_rule``,
        ``scan_info``, ...).
    source
        The user's copy of the raw dataset (layout described by the card's ``raw_layout``).
    out
        Output folder; scans already prepared there (a shard exists) are skipped.
    progress
        Called as ``progress(done, total, scan_id)`` after each scan and once at start.
    locate
        Derive MARS locations by atlas registration (default: the card's ``location``,
        ``atlas`` unless it says ``none``); see the module docstring.

    Raises
    ------
    MissingInputError, UnreadableInputError, InvalidValuesError, GeometryMismatchError
        Bad raw input, with a one-line message naming the file.
    ConfigurationError
        ``out`` holds a dataset prepared with another loader/options, or the card is invalid.
    """
    source, out = Path(source), Path(out)
    if not card.get("loader"):
        raise ConfigurationError(f"dataset {card.get('name')} has no loader (synthetic datasets "
                                 f"are made with `cmbbench datasets make`)")
    loader = get_loader(card["loader"])
    if not source.is_dir():
        raise MissingInputError("raw dataset folder not found", source)
    options = dict(card.get("loader_options") or {})
    rule = _grow_rule(card)
    merge_mm = float(options.get("merge_distance_mm", DEFAULT_MERGE_MM))
    refs = loader.discover(source, options)
    if not refs:
        raise MissingInputError(f"no scans found for loader {loader.name!r} (unknown layout?)",
                                source)
    ids = [r.scan_id for r in refs]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise ConfigurationError(f"duplicate scan id(s) {', '.join(dup[:5])}", source)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MissingInputError(f"output folder is not writable ({exc.strerror})", out) from None
    do_locate = _locate_enabled(card, locate) and not getattr(loader, "provides_location",
                                                               False)
    record = _record(card, loader, do_locate)
    rec_path = out / "prepare.json"
    if rec_path.is_file():
        if json.loads(rec_path.read_text()) != json.loads(json.dumps(record)):
            raise ConfigurationError("the output folder holds a dataset prepared with another "
                                     "card, loader or options; choose another --out or delete it",
                                     out)
    else:
        rec_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    sd = shard_dir(out)
    done = {p.name[:-5] for p in sd.glob("*.json")} if sd.is_dir() else set()
    todo = [r for r in refs if r.scan_id not in done]
    if todo:  # the folder is incomplete again until the end: no stale tables or card
        for name in ("dataset.json", "scans.csv", "lesions.csv", "statistics.json"):
            if (out / name).exists():
                (out / name).unlink()
    if progress:
        progress(len(refs) - len(todo), len(refs), "")
    base_info = dict(card.get("scan_info") or {})
    finished = len(refs) - len(todo)
    for ref in todo:
        _write_scan(loader, ref, out, options, _scan_split(card, ref.subject_id), base_info,
                    rule, merge_mm, do_locate)
        finished += 1
        if progress:
            progress(finished, len(refs), ref.scan_id)
    return _assemble(card, loader, out, ids, rule, source, record["location"])


def _location_reason(scans: pd.DataFrame, lesions: pd.DataFrame, notes: dict,
                     method: dict | None) -> str | None:
    """One line saying why lesions are ``unknown`` (None when every lesion has a class)."""
    if method is None:
        return LOCATION_REASON
    unknown = int((lesions["location"] == "unknown").sum()) if len(lesions) else 0
    if not unknown:
        return None
    src = scans.get("location_source", pd.Series([], dtype=str)).astype(str)
    failed = scans[src.str.startswith("unknown") & (scans["n_cmb"] > 0)]
    n_failed = int(failed["n_cmb"].sum())
    parts = []
    if len(failed):
        parts.append(f"{n_failed} on {len(failed)} scan(s) whose atlas registration was not "
                     f"accepted (scans.csv location_source says why)")
    if unknown - n_failed:
        parts.append(f"{unknown - n_failed} whose centroid falls outside the brain labels of the "
                     f"registered atlas (dataset.json scan_notes.<scan_id>.location_unknown)")
    return f"{unknown} of {len(lesions)} lesions unknown: " + "; ".join(parts)


def _assemble(card: dict, loader: Loader, out: Path, ids: list[str], rule: GrowRule,
              source: Path, location: dict | None) -> HarmonizedDataset:
    from .statistics import dataset_statistics

    shards = [json.loads((shard_dir(out) / f"{sid}.json").read_text()) for sid in ids]
    scans = pd.DataFrame([s["scan"] for s in shards])
    scans = scans[list(SCAN_COLUMNS) + [c for c in scans.columns if c not in SCAN_COLUMNS]]
    rows = [r for s in shards for r in s["lesions"]]
    lesions = pd.DataFrame(rows, columns=list(LESION_COLUMNS))
    for name, frame in (("scans.csv", scans), ("lesions.csv", lesions)):
        frame.to_csv(out / f"{name}.partial", index=False)
        os.replace(out / f"{name}.partial", out / name)
    checksums = {k: v for s in shards for k, v in s["checksums"].items()}
    notes = {s["scan"]["scan_id"]: s["notes"] for s in shards if s.get("notes")}
    meta = {k: v for k, v in card.items() if not k.startswith("_")}
    derived = loader.label_kind == "points"
    dataset_card = {
        **meta, "name": card["name"], "version": str(card.get("version", "0")),
        "layout_version": LAYOUT_VERSION, "kind": card.get("kind", "real"),
        "cmbbench_version": __version__, "loader": loader.name, "source": str(source),
        "mask_source": "derived" if derived else "rater",
        "grow_rule": json.loads(rule.describe()) if derived else None,
        "location_method": ({"method": "raw labels"} if getattr(loader, "provides_location",
                                                                 False) else location),
        "location_reason": (None if getattr(loader, "provides_location", False)
                            else _location_reason(scans, lesions, notes, location)),
        "n_scans": len(scans), "n_cmb": len(lesions),
        "scan_notes": notes, "checksums": checksums,
    }
    tmp_card = {**dataset_card}
    ds = HarmonizedDataset(root=out, card=tmp_card, scans=scans.astype({"scan_id": str}),
                           lesions=lesions)
    stats = dataset_statistics(ds)
    (out / "statistics.json.partial").write_text(json.dumps(stats, indent=2, sort_keys=True,
                                                            default=_jsonable))
    os.replace(out / "statistics.json.partial", out / "statistics.json")
    tmp = out / "dataset.json.partial"
    tmp.write_text(json.dumps(dataset_card, indent=2, sort_keys=True, default=str))
    os.replace(tmp, out / "dataset.json")
    log.info("prepared %s: %d scans, %d CMBs in %s", card["name"], len(scans), len(lesions), out)
    return read_dataset(out)


def check_label_volume(label: Volume, image: Volume) -> None:
    """Raise :class:`GeometryMismatchError` naming the label file when a label volume's shape or
    affine differs from its image's."""
    from ..geometry import affines_match

    check_same_grid(label.data.shape, image.data.shape, label.path)
    if not affines_match(label.affine, image.affine, atol_mm=1e-2):
        raise GeometryMismatchError("label affine differs from the image affine", label.path)


def read_workbook_rows(path: Path) -> list[list[object]]:
    """All rows of the first sheet of an Excel workbook (``.xlsx``), as lists of cell values.

    Raises
    ------
    MissingInputError
        The file does not exist.
    UnreadableInputError
        The file is not a readable ``.xlsx`` workbook (openpyxl is required).
    """
    from ..errors import UnreadableInputError

    if not path.is_file():
        raise MissingInputError("file not found", path)
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - dependency
        raise ConfigurationError("reading Excel workbooks needs openpyxl "
                                 "(pip install openpyxl)", path) from None
    try:
        wb = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
        ws = wb.worksheets[0]
        rows = [list(r) for r in ws.iter_rows(values_only=True)]
        wb.close()
    except Exception as exc:  # noqa: BLE001 - openpyxl raises zipfile/KeyError/Invalid...
        raise UnreadableInputError(f"not a readable .xlsx workbook ({type(exc).__name__})",
                                   path) from None
    # drop fully empty rows
    return [r for r in rows if any(v is not None and str(v).strip() != "" for v in r)]


def as_number(value: object) -> float | None:
    """A cell value as float, or None when empty/non-numeric."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None

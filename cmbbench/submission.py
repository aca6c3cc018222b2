"""Submissions: validate a predictions folder (or ``.zip``) against a dataset, then score and
store it as a ``scored`` run.

:func:`validate_submission` lists **every** problem at once: the manifest's schema, a scan
without a prediction, a map on another grid, values out of range, files that match no scan,
malformed or out-of-range ``predictions.csv`` rows. :func:`submit` validates, writes a run
directory (the source of truth: the predictions, ``run.json``, ``results/``) and imports it
into the results store; an invalid submission writes nothing to the store.

See ``docs/submission.md`` for the format and the rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .dataset import HarmonizedDataset, dataset_record, read_dataset, sha256_file
from .errors import CmbbenchError, InvalidSubmissionError, StoreError
from .geometry import affines_match, world_to_voxel
from .nifti import read_header, read_volume, strip_nifti_suffix
from .predictions import MANIFEST_NAME, _scan_for_stem, classify_map

__all__ = [
    "NAME_PATTERN",
    "VERSION_PATTERN",
    "Problem",
    "SubmitReport",
    "ValidationReport",
    "folder_sha256",
    "read_manifest",
    "stage_input",
    "submissions_root",
    "submit",
    "validate_submission",
]

log = logging.getLogger(__name__)

#: Method names: letters, digits and ``. _ + -``, starting with a letter or digit (no markup).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: Method versions: the same characters, at most 32.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,31}$")
#: Longest accepted free-text manifest field (characters).
MAX_TEXT = 4000
_TEXT_FIELDS = ("citation", "paper", "paper_url", "code", "code_url", "description",
                "test_overlap", "authors", "contact", "license", "licence", "notes")
_KINDS = ("probability", "binary", "instance", "mask", "points", "mixed")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MAX_LISTED_LINES = 10


@dataclass
class Problem:
    """One validation problem: the file concerned (if any) and what is wrong, in one line."""

    message: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class ValidationReport:
    """Result of :func:`validate_submission`.

    Attributes
    ----------
    problems
        Every problem found (empty when the submission is valid).
    manifest
        The normalised manifest (``method``, ``version``, ``citation``, ``paper_url``,
        ``code_url``, ``description``, ``training_data``, ``test_overlap``, ...; ``raw``: the
        file's content).
    n_scans, n_maps, n_point_scans
        Reference scans; scans predicted by a map; scans with rows in ``predictions.csv``.
    """

    root: Path
    dataset: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    n_scans: int = 0
    n_maps: int = 0
    n_point_scans: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def error(self) -> InvalidSubmissionError | None:
        """The error to raise for an invalid submission (None when valid)."""
        if self.ok:
            return None
        first = str(self.problems[0])
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return InvalidSubmissionError(
            f"invalid submission: {len(self.problems)} problem(s): {first}{more}; nothing "
            "was stored", self.root, problems=[str(p) for p in self.problems])

    def to_dict(self) -> dict:
        return {"ok": self.ok, "root": str(self.root), "dataset": self.dataset,
                "problems": [str(p) for p in self.problems], "warnings": list(self.warnings),
                "manifest": {k: v for k, v in self.manifest.items() if k != "raw"},
                "n_scans": self.n_scans, "n_maps": self.n_maps,
                "n_point_scans": self.n_point_scans}


# --------------------------------------------------------------------------------------------
# manifest


def _clean_text(key: str, value: object, path: Path, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    if isinstance(value, list) and key in ("authors",):
        value = ", ".join(str(v) for v in value)
    if not isinstance(value, str):
        problems.append(Problem(f"manifest field {key!r} must be a string, got "
                                f"{type(value).__name__}", str(path)))
        return None
    if len(value) > MAX_TEXT:
        problems.append(Problem(f"manifest field {key!r} is longer than {MAX_TEXT} characters",
                                str(path)))
        return None
    if _CONTROL.search(value):
        problems.append(Problem(f"manifest field {key!r} holds control characters", str(path)))
        return None
    return value


def read_manifest(root: str | Path) -> tuple[dict, list[Problem]]:
    """The normalised manifest of a predictions folder and the problems with it.

    The manifest is ``cmbbench-submission.json`` (flat keys ``method``, ``version``, ... or a
    nested ``method`` object with ``name``, ``version``, ...), else a BIDS
    ``dataset_description.json``'s first ``GeneratedBy`` entry (``Name``, ``Version``,
    ``CodeURL``, ``Description``).
    """
    root = Path(root)
    problems: list[Problem] = []
    path = root / MANIFEST_NAME
    raw: object = None
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            msg = f"invalid JSON ({exc.msg} at line {exc.lineno})" if isinstance(
                exc, json.JSONDecodeError) else "not UTF-8 text"
            return {}, [Problem(msg, str(path))]
        if not isinstance(raw, dict):
            return {}, [Problem("the manifest must be a JSON object", str(path))]
        data = dict(raw)
        if isinstance(data.get("method"), dict):
            nested = data.pop("method")
            data = {**{k: v for k, v in nested.items() if k != "name"}, **data,
                    "method": nested.get("name")}
    else:
        bids = root / "dataset_description.json"
        gen = None
        if bids.is_file():
            try:
                desc = json.loads(bids.read_text(encoding="utf-8"))
                gb = desc.get("GeneratedBy") if isinstance(desc, dict) else None
                gen = gb[0] if isinstance(gb, list) and gb and isinstance(gb[0], dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}, [Problem("invalid JSON", str(bids))]
        if gen is None:
            return {}, [Problem(f"no {MANIFEST_NAME} (nor a BIDS dataset_description.json with "
                                "GeneratedBy): the method name and version are required",
                                str(path))]
        path = bids
        raw = gen
        data = {"method": gen.get("Name"), "version": gen.get("Version"),
                "code_url": gen.get("CodeURL"), "description": gen.get("Description")}
    out: dict = {"raw": raw}
    name, version = data.get("method"), data.get("version")
    if not isinstance(name, str) or not name:
        problems.append(Problem("the manifest needs a method name ('method')", str(path)))
    elif not NAME_PATTERN.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        problems.append(Problem(
            f"method name {shown!r} is not allowed: use 1-64 letters, digits and . _ + - "
            "(starting with a letter or digit)", str(path)))
    else:
        out["method"] = name
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not version:
        problems.append(Problem("the manifest needs a method version ('version')", str(path)))
    elif not VERSION_PATTERN.match(version):
        problems.append(Problem(f"method version {version[:40]!r} is not allowed: use 1-32 "
                                "letters, digits and . _ + -", str(path)))
    else:
        out["version"] = version
    for key in _TEXT_FIELDS:
        if key in data:
            value = _clean_text(key, data[key], path, problems)
            if value is not None:
                out[key] = value
    td = data.get("training_data")
    if td is not None:
        if isinstance(td, list) and all(isinstance(v, str) for v in td):
            td = "; ".join(td)
        out_td = _clean_text("training_data", td, path, problems)
        if out_td is not None:
            out["training_data"] = out_td
    kind = data.get("prediction_kind")
    if kind is not None and kind not in _KINDS:
        problems.append(Problem(f"prediction_kind must be one of {', '.join(_KINDS)}, got "
                                f"{str(kind)[:40]!r}", str(path)))
    elif kind is not None:
        out["prediction_kind"] = kind
    base = data.get("voxel_index_base", 0)
    if base not in (0, 1) or isinstance(base, bool):
        problems.append(Problem("voxel_index_base must be 0 or 1", str(path)))
    out["voxel_index_base"] = base if base in (0, 1) else 0
    if "trainable" in data:
        if not isinstance(data["trainable"], bool):
            problems.append(Problem("trainable must be true or false", str(path)))
        else:
            out["trainable"] = data["trainable"]
    out["code_url"] = out.get("code_url") or out.get("code")
    out["licence"] = out.get("licence") or out.get("license")
    return out, problems


# --------------------------------------------------------------------------------------------
# folder


def _lines(rows: np.ndarray) -> str:
    nums = [str(int(r) + 2) for r in rows[:_MAX_LISTED_LINES]]  # header is line 1
    more = f" (and {len(rows) - _MAX_LISTED_LINES} more)" if len(rows) > _MAX_LISTED_LINES else ""
    return ", ".join(nums) + more


def _check_points(path: Path, ds: HarmonizedDataset, maps: dict[str, Path], base: int,
                  problems: list[Problem]) -> set[str]:
    """Problems of ``predictions.csv``; returns the scans that have rows."""
    p = str(path)
    try:
        frame = pd.read_csv(path, dtype={"scan_id": str})
    except pd.errors.EmptyDataError:
        return set()
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        problems.append(Problem(f"malformed CSV ({' '.join(str(exc).split())})", p))
        return set()
    if "scan_id" not in frame.columns:
        problems.append(Problem("missing column scan_id", p))
        return set()
    world = {"x_mm", "y_mm", "z_mm"} <= set(frame.columns)
    voxel = {"i", "j", "k"} <= set(frame.columns)
    if not world and not voxel:
        problems.append(Problem("needs columns x_mm, y_mm, z_mm (world RAS+ mm) or i, j, k "
                                "(voxel)", p))
        return set()
    cols = ["x_mm", "y_mm", "z_mm"] if world else ["i", "j", "k"]
    if "score" not in frame.columns:
        frame["score"] = 1.0
    values = frame[cols + ["score"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
    if bad.size:
        problems.append(Problem(f"non-numeric or NaN coordinate/score on line(s) {_lines(bad)}",
                                p))
    score = values[:, 3]
    out_of = np.flatnonzero(np.isfinite(score) & ((score < 0) | (score > 1)))
    if out_of.size:
        problems.append(Problem(f"score outside [0, 1] on line(s) {_lines(out_of)}", p))
    ids = frame["scan_id"].astype(str)
    wanted = set(ds.scan_ids)
    unknown = sorted(set(ids) - wanted)
    if unknown:
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        problems.append(Problem(f"unknown scan_id(s) {', '.join(unknown[:10])}{more}", p))
    both = sorted(set(ids) & set(maps))
    if both:
        problems.append(Problem(f"scan(s) {', '.join(both[:10])} have both a map and rows", p))
    outside: list[int] = []
    for sid, g in frame.assign(_row=np.arange(len(frame))).groupby(ids):
        if sid not in wanted:
            continue
        shape, affine = read_header(ds.image_path(sid))
        v = g[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        ok = np.all(np.isfinite(v), axis=1)
        vox = world_to_voxel(affine, v[ok]) if world else v[ok] - (1.0 if base == 1 else 0.0)
        lim = np.asarray(shape[:3], dtype=np.float64) - 0.5
        far = np.any((vox < -0.5) | (vox > lim), axis=1)
        outside += list(g["_row"].to_numpy()[ok][far])
    if outside:
        problems.append(Problem(f"position outside the scan's image on line(s) "
                                f"{_lines(np.sort(np.asarray(outside)))}", p))
    return set(ids) & wanted


def validate_submission(pred_dir: str | Path, dataset: str | Path | HarmonizedDataset, *,
                        require_manifest: bool = True) -> ValidationReport:
    """Check a predictions folder against a reference dataset; every problem is listed.

    Checks: the manifest (method name and version in the safe pattern, field types, no
    control characters); every reference scan has a prediction (a map, or rows in
    ``predictions.csv`` when the folder holds no maps); each map's grid (shape and affine)
    matches its image and its values are valid (finite, probabilities in [0, 1], labels
    non-negative); no NIfTI file matches no scan, or two files one scan; ``predictions.csv``
    rows are numeric, scores in [0, 1], known scans, positions inside the image.

    Parameters
    ----------
    dataset
        Registry name, harmonized dataset folder, or an opened dataset.
    """
    root = Path(pred_dir)
    if isinstance(dataset, HarmonizedDataset):
        ds = dataset
    else:
        from .registry import resolve_dataset

        ds = read_dataset(resolve_dataset(dataset, quiet=True))
    report = ValidationReport(root=root, dataset=ds.name, n_scans=len(ds.scan_ids))
    problems = report.problems
    if not root.is_dir():
        problems.append(Problem("predictions folder not found", str(root)))
        return report
    manifest, mprob = read_manifest(root)
    report.manifest = manifest
    if require_manifest or (root / MANIFEST_NAME).is_file():
        problems.extend(mprob)
    wanted = set(ds.scan_ids)
    maps: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if strip_nifti_suffix(p.name)):
        if path.is_symlink() or not path.is_file():
            problems.append(Problem("not a regular file (links are not accepted)", str(path)))
            continue
        sid = _scan_for_stem(strip_nifti_suffix(path.name) or "", wanted)
        if sid is None:
            problems.append(Problem("matches no scan of the reference dataset (expected "
                                    "<scan_id>.nii.gz)", str(path)))
        elif sid in maps:
            problems.append(Problem(f"a second prediction for scan {sid} (first: "
                                    f"{maps[sid].name})", str(path)))
        else:
            maps[sid] = path
    point_scans: set[str] = set()
    csv_path = root / "predictions.csv"
    if csv_path.is_file():
        point_scans = _check_points(csv_path, ds, maps, int(manifest.get("voxel_index_base", 0)),
                                    problems)
    points_only = csv_path.is_file() and not maps
    report.n_maps, report.n_point_scans = len(maps), len(point_scans)
    if not maps and not csv_path.is_file():
        problems.append(Problem("no predictions: neither NIfTI maps nor predictions.csv",
                                str(root)))
        return report
    for sid in ds.scan_ids:
        if sid in maps:
            _check_map(maps[sid], ds, sid, problems)
        elif sid not in point_scans and not points_only:
            problems.append(Problem(f"missing prediction for scan {sid}",
                                    str(root / f"{sid}.nii.gz")))
    return report


def _check_map(path: Path, ds: HarmonizedDataset, sid: str, problems: list[Problem]) -> None:
    try:
        shape, affine = read_header(path)
        ref_shape, ref_affine = read_header(ds.image_path(sid))
    except CmbbenchError as exc:
        problems.append(Problem(exc.problem, str(exc.path) if exc.path else str(path)))
        return
    if tuple(shape) != tuple(ref_shape):
        problems.append(Problem(f"grid mismatch: shape {tuple(shape)} differs from the image "
                                f"shape {tuple(ref_shape)}", str(path)))
        return
    if not affines_match(affine, ref_affine):
        delta = float(np.abs(np.asarray(affine)[:3] - np.asarray(ref_affine)[:3]).max())
        problems.append(Problem(f"grid mismatch: affine differs from the image affine (max "
                                f"difference {delta:.3g})", str(path)))
        return
    try:
        vol = read_volume(path)
        classify_map(np.asarray(vol.data), path=path)
    except CmbbenchError as exc:
        problems.append(Problem(exc.problem, str(path)))


# --------------------------------------------------------------------------------------------
# submit


@dataclass
class SubmitReport:
    """What :func:`submit` did: the run directory, the store's run id, the scores."""

    run_dir: Path
    run_id: str | None
    method_id: str
    dataset: str
    rule_id: str
    sha256: str
    validation: ValidationReport
    result: object = None
    store_url: str | None = None
    store_error: str | None = None

    def to_json_dict(self) -> dict:
        out = {"run_dir": str(self.run_dir), "run_id": self.run_id, "method_id": self.method_id,
               "dataset": self.dataset, "rule_id": self.rule_id, "sha256": self.sha256,
               "store": self.store_url, "store_error": self.store_error,
               "validation": self.validation.to_dict()}
        if self.result is not None:
            out["result"] = self.result.to_json_dict()  # type: ignore[attr-defined]
        return out


def submissions_root() -> Path:
    """Default parent of submission run directories: ``$CMBBENCH_HOME/submissions``."""
    from .registry import data_home

    return data_home() / "submissions"


def folder_sha256(root: Path) -> str:
    """Checksum of a folder: sha256 over the sorted relative paths and file checksums."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def stage_input(pred: Path, extract_to: Path, *, max_zip_bytes: int | None = None,
                max_zip_files: int | None = None) -> Path:
    """The folder to validate: ``pred`` itself, or the safely extracted content of a ``.zip``
    (:func:`cmbbench.safezip.safe_extract` into ``extract_to``).

    Raises
    ------
    InvalidSubmissionError
        A file that is not a ``.zip``, or an unsafe/oversized archive.
    """
    from .safezip import MAX_FILES, MAX_TOTAL_BYTES, safe_extract

    if pred.is_file() and pred.suffix.lower() == ".zip":
        return safe_extract(pred, extract_to, max_total_bytes=max_zip_bytes or MAX_TOTAL_BYTES,
                            max_files=max_zip_files or MAX_FILES)
    if pred.is_file():
        raise InvalidSubmissionError("a submission is a predictions folder or a .zip of one",
                                     pred)
    return pred


def relabel(report: ValidationReport, content: Path, pred: Path) -> None:
    """Name problems by the user's input: ``archive.zip/<member>`` for an extracted zip."""
    report.root = pred
    if content == pred:
        return
    prefix = str(content)
    for prob in report.problems:
        if prob.path and prob.path.startswith(prefix):
            rel = prob.path[len(prefix):].lstrip("/\\")
            prob.path = f"{pred}/{rel}" if rel else str(pred)


def submit(pred: str | Path, dataset: str | Path, *, rule: str = "cmbbench",
           rule_overrides: dict | None = None, n_boot: int = 1000, seed: int = 0,
           db: str | None = None, out: str | Path | None = None,
           max_zip_bytes: int | None = None, max_zip_files: int | None = None,
           store: bool = True) -> SubmitReport:
    """Validate, score and store a submission (a predictions folder or a ``.zip`` of one).

    The run directory (``out``, default ``$CMBBENCH_HOME/submissions/<method>@<version>__
    <dataset>__<rule>__<sha256[:12]>``) receives a copy of the predictions, ``results/`` and
    ``run.json`` (``kind: submission``); it is then imported into the store as tier ``scored``.
    Submitting the same files again replaces that run.

    Raises
    ------
    InvalidSubmissionError
        Validation problems (all listed in ``problems``) or an unsafe/oversized zip; nothing is
        written (neither run directory nor store rows).
    ConfigurationError, MissingInputError
        Unknown rule or dataset.
    StoreError
        Scored and kept in the run directory, but the store could not be written.
    """
    from .matching import get_rule
    from .registry import resolve_dataset
    from .scoring import score_folder

    rule_obj = get_rule(rule, **{k: v for k, v in (rule_overrides or {}).items()
                                 if v is not None})
    ds_path = resolve_dataset(dataset, quiet=True)
    ds = read_dataset(ds_path)
    pred = Path(pred)
    parent = Path(out).parent if out is not None else submissions_root()
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".staging-{uuid.uuid4().hex[:12]}"
    try:
        content = stage_input(pred, staging / "extract", max_zip_bytes=max_zip_bytes,
                              max_zip_files=max_zip_files)
        report = validate_submission(content, ds)
        relabel(report, content, pred)
        err = report.error()
        if err is not None:
            raise err
        if content != pred:
            os.replace(content, staging / "predictions")
        else:
            shutil.copytree(pred, staging / "predictions", symlinks=False)
        shutil.rmtree(staging / "extract", ignore_errors=True)
        sha = folder_sha256(staging / "predictions")
        man = report.manifest
        name, version = man["method"], man["version"]
        run_dir = Path(out) if out is not None else parent / (
            f"{name}@{version}__{ds.name}__{rule_obj.name}__{sha[:12]}")
        if run_dir.exists():
            log.info("%s: replacing an earlier submission of the same files", run_dir)
            shutil.rmtree(run_dir)
        os.replace(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        result = score_folder(run_dir / "predictions", ds, rule=rule_obj, missing="error",
                              n_boot=n_boot, seed=seed)
        result.meta["provenance"] = "scored"
        result.save(run_dir / "results")
        config = {
            "kind": "submission", "format": 1, "predictions_subdir": "predictions",
            "method": {"name": name, "version": version, "citation": man.get("citation"),
                       "paper": man.get("paper"), "paper_url": man.get("paper_url"),
                       "code_url": man.get("code_url"), "description": man.get("description"),
                       "training_data": man.get("training_data"),
                       "test_overlap": man.get("test_overlap"),
                       "trainable": man.get("trainable")},
            "dataset": dataset_record(ds, dataset),
            "rule": rule, "scoring": {"rule": rule, "rule_overrides": rule_overrides or {},
                                      "n_boot": int(n_boot), "seed": int(seed)},
            "seed": int(seed),
            "submission": {"sha256": sha, "source": str(pred.resolve()),
                           "zip": pred.suffix.lower() == ".zip", "submitted_at": _now(),
                           "manifest": man.get("raw")},
            "versions": {"cmbbench": __version__}, "created": _now(),
        }
        _write_json(run_dir / "run.json", config)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    sub = SubmitReport(run_dir=run_dir, run_id=None, method_id=f"{name}@{version}",
                       dataset=ds.name, rule_id=rule_obj.rule_id, sha256=sha,
                       validation=report, result=result)
    if store:
        from .store import import_run, resolve_url

        sub.store_url = resolve_url(db)
        try:
            sub.run_id = import_run(run_dir, db=db, tier="scored").run_id
        except StoreError as exc:
            raise StoreError(f"scored, but not stored ({exc.problem}); the run is kept in "
                             f"{run_dir}: import it with `cmbbench db import {run_dir}`",
                             exc.path) from None
    return sub


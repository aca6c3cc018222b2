"""Run directories: the resumable record of one method run on one dataset.

::

    <RUN_DIR>/
      run.json                 method (name, version, citation, params), dataset (name, version,
                               path), rule and scoring options, seed, versions (cmbbench, Python,
                               numpy, platform), part (id, num), backend, times
      shards/<scan_id>.json    one per finished scan: what was predicted (map file + sha256,
                               candidates), seconds, worker -- written last, atomically
      failed/<scan_id>.json    one per scan whose prediction raised: the one-line error and the
                               traceback (removed when a re-run succeeds)
      predictions/             the predictions folder (``cmbbench predict`` writes it at the top
                               of RUN_DIR instead): <scan_id>.nii.gz probability maps on the
                               image grid, predictions.csv for candidate-only methods, and the
                               cmbbench-submission.json manifest
      results/                 ``cmbbench evaluate`` only: ScoreResult.save() (matches.csv, ...)

A scan is finished exactly when its shard exists and is valid (parses, and the map it names
exists with the recorded sha256). The map is written first (temporary name, then renamed) and
the shard last (same), so a run killed at any moment leaves no shard that looks complete but is
not; re-running the same command skips finished scans and retries failed ones.

Parts: ``--part-id P --num-parts N`` runs the scans whose position in the dataset's scan list is
``P`` modulo ``N``. Parts may share one run directory (a shared filesystem) or use their own;
:func:`merge_runs` merges part directories into one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .dataset import sha256_file
from .errors import ConfigurationError, MissingInputError, UnreadableInputError
from .execution import MethodSpec, worker_method
from .predictions import MANIFEST_NAME

__all__ = [
    "REFERENCE_SCAN_COLUMNS",
    "RUN_FILE",
    "RunDirectory",
    "ScanTask",
    "content_conflict",
    "merge_runs",
    "one_line",
    "part_scans",
    "run_identity",
    "run_scan_task",
    "scan_seed",
    "versions",
]

log = logging.getLogger(__name__)

#: scans.csv columns derived from the reference annotations: never passed to a method
REFERENCE_SCAN_COLUMNS: frozenset[str] = frozenset({"n_cmb", "n_mimics", "positive"})

RUN_FILE = "run.json"
RUN_FORMAT = 1
POINTS_FILE = "predictions.csv"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line (at most ``limit`` characters)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary name in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _jsonable(obj: object) -> object:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def versions() -> dict:
    """Versions recorded with a run."""
    out = {"cmbbench": __version__, "python": platform.python_version(),
           "numpy": np.__version__, "platform": platform.platform()}
    import sys

    if "torch" in sys.modules:
        out["torch"] = str(sys.modules["torch"].__version__)
    return out


def scan_seed(seed: int, scan_id: str) -> int:
    """The seed of one scan: a hash of the run seed and the scan id (the same on every backend
    and in every part, whatever the order in which scans run)."""
    digest = hashlib.sha256(f"{int(seed)}:{scan_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def part_scans(scan_ids: list[str], part_id: int = 0, num_parts: int = 1) -> list[str]:
    """Scans of part ``part_id`` (0-based) of ``num_parts``: every ``num_parts``-th scan of the
    dataset's scan list, starting at position ``part_id``.

    Raises
    ------
    ConfigurationError
        ``num_parts < 1`` or ``part_id`` outside ``0 .. num_parts - 1``.
    """
    if num_parts < 1:
        raise ConfigurationError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ConfigurationError(f"--part-id must be in 0..{num_parts - 1} (0-based), "
                                 f"got {part_id}")
    return [s for n, s in enumerate(scan_ids) if n % num_parts == part_id]


def run_identity(config: dict) -> dict:
    """What must match for a run directory to be resumed (or merged): the kind of run, the
    method (name, version, parameters), the dataset (name, version) and the seed."""
    m, d = config.get("method", {}), config.get("dataset", {})
    return _jsonable({"kind": config.get("kind"),
                      "method": {"name": m.get("name"), "version": m.get("version"),
                                 "params": m.get("params", {})},
                      "dataset": {"name": d.get("name"), "version": d.get("version")},
                      "seed": config.get("seed")})


def content_conflict(a: dict, b: dict) -> str | None:
    """Why runs ``a`` and ``b`` (``run.json`` contents) were made on different copies of their
    dataset, or None when they were not or one of them does not say (runs recorded before
    ``content_sha256`` existed, or datasets without checksums)."""
    da = (a.get("dataset") or {}).get("content_sha256")
    db = (b.get("dataset") or {}).get("content_sha256")
    if da and db and da != db:
        return (f"another copy of dataset {(a.get('dataset') or {}).get('name')!r} "
                f"(content sha256 {str(da)[:12]}... against {str(db)[:12]}...)")
    return None


def _describe(config: dict) -> str:
    m, d = config.get("method", {}), config.get("dataset", {})
    params = m.get("params") or {}
    p = f" {json.dumps(params, sort_keys=True)}" if params else ""
    return (f"a `{config.get('kind')}` run of method {m.get('name')} {m.get('version')}{p} on "
            f"{d.get('name')} {d.get('version')} (seed {config.get('seed')})")


# --------------------------------------------------------------------------------------------
# the per-scan task (runs in a worker)


@dataclass(frozen=True)
class ScanTask:
    """One scan to predict, as shipped to a worker.

    Attributes
    ----------
    scan_id, image_path
        The scan and its image file.
    meta
        Its ``scans.csv`` row (JSON-able values), without the columns derived from the
        reference (:data:`REFERENCE_SCAN_COLUMNS`).
    map_path
        Where the probability map goes (written atomically by the worker).
    seed
        The scan's seed (:func:`scan_seed`).
    spec
        The method.
    threads
        Thread limit in the worker (None: leave as is, the serial backend).
    """

    scan_id: str
    image_path: str
    meta: dict
    map_path: str
    seed: int
    spec: MethodSpec
    threads: int | None = None


def _seed_everything(seed: int) -> None:
    import random
    import sys

    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        try:
            sys.modules["torch"].manual_seed(seed)
        except Exception:  # noqa: BLE001 - best effort
            log.debug("torch not seeded", exc_info=True)


def _candidates_array(cands: object, affine: np.ndarray) -> np.ndarray:
    """Validated ``(n, 4)`` array of 0-based voxel ``i, j, k`` and ``score``."""
    if not isinstance(cands, pd.DataFrame):
        raise TypeError(f"candidates must be a pandas DataFrame, got {type(cands).__name__}")
    cols = set(cands.columns)
    if "score" not in cols:
        raise ValueError("candidates need a 'score' column")
    if {"i", "j", "k"} <= cols:
        vox = cands[["i", "j", "k"]].to_numpy(np.float64)
    elif {"x_mm", "y_mm", "z_mm"} <= cols:
        from .geometry import world_to_voxel

        vox = world_to_voxel(affine, cands[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64))
    else:
        raise ValueError("candidates need columns i, j, k (0-based voxels) or x_mm, y_mm, z_mm")
    score = cands["score"].to_numpy(np.float64)
    arr = np.column_stack([vox.reshape(-1, 3), score]) if len(cands) else np.zeros((0, 4))
    if not np.all(np.isfinite(arr)):
        raise ValueError("candidates hold NaN/inf coordinates or scores")
    if len(arr) and (score.min() < 0 or score.max() > 1):
        raise ValueError(f"candidate scores must be in [0, 1], found "
                         f"[{score.min():g}, {score.max():g}]")
    return arr


def run_scan_task(task: ScanTask) -> dict:
    """Predict one scan in a worker: read the image, call the method, check its output, write
    the probability map. Returns the shard content (``status: done``) or a failure record
    (``status: failed``, with the one-line error and the traceback); never raises for a
    method's error, so one bad scan never stops the others."""
    from .methods.api import Prediction, ScanInput
    from .nifti import read_volume, write_volume

    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    stage = "loading the method"
    try:
        method = worker_method(task.spec, threads=task.threads)
        stage = "reading the image"
        vol = read_volume(task.image_path)
        meta = {k: v for k, v in task.meta.items() if k not in REFERENCE_SCAN_COLUMNS}
        scan = ScanInput(scan_id=task.scan_id, image=vol.data, affine=vol.affine,
                         sequence=str(meta.pop("sequence", "unknown") or "unknown"),
                         field_strength_t=_float(meta.pop("field_strength_t", None)),
                         te_ms=_float(meta.pop("te_ms", None)), extra=meta, seed=task.seed)
        stage = "predicting"
        _seed_everything(task.seed)
        pred = method.predict(scan)
        stage = "checking the prediction"
        if not isinstance(pred, Prediction):
            raise TypeError(f"predict() must return a cmbbench Prediction, got "
                            f"{type(pred).__name__}")
        if pred.probability is None and pred.candidates is None:
            raise ValueError("predict() returned neither a probability map nor candidates")
        shard: dict = {"scan_id": task.scan_id, "status": "done", "seed": task.seed,
                       "kind": "probability" if pred.probability is not None else "points",
                       "map": None, "sha256": None, "shape": list(vol.data.shape),
                       "max_probability": None, "candidates": None}
        if pred.candidates is not None:
            arr = _candidates_array(pred.candidates, vol.affine)
            shard["candidates"] = arr.tolist()
        if pred.probability is not None:
            prob = np.asarray(pred.probability)
            if tuple(prob.shape) != tuple(vol.data.shape):
                raise ValueError(f"probability map shape {tuple(prob.shape)} differs from the "
                                 f"image shape {tuple(vol.data.shape)}")
            prob = prob.astype(np.float32, copy=False)
            finite = np.isfinite(prob)
            if not finite.all():
                raise ValueError(f"{int((~finite).sum())} NaN/inf voxel(s) in the probability map")
            lo, hi = float(prob.min(initial=0.0)), float(prob.max(initial=0.0))
            if lo < 0 or hi > 1:
                raise ValueError(f"probabilities must be in [0, 1], found [{lo:g}, {hi:g}]")
            stage = "writing the map"
            path = write_volume(task.map_path, prob, vol.affine)
            shard.update(map=path.name, sha256=sha256_file(path), max_probability=hi)
        shard["n_candidates"] = None if shard["candidates"] is None else len(shard["candidates"])
        shard["seconds"] = round(time.perf_counter() - t0, 4)
        shard["worker"] = worker
        return shard
    except Exception as exc:  # noqa: BLE001 - recorded as this scan's failure
        return {"scan_id": task.scan_id, "status": "failed", "stage": stage,
                "error": one_line(exc), "traceback": traceback.format_exc(),
                "seconds": round(time.perf_counter() - t0, 4), "worker": worker}


def _float(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------
# the run directory


@dataclass
class RunDirectory:
    """A run directory (see the module docstring for the layout).

    Attributes
    ----------
    root
        The folder.
    predictions_subdir
        Folder of the predictions below ``root`` (``"predictions"`` for ``evaluate``, ``""`` for
        ``predict``, whose ``--out`` is itself the predictions folder).
    """

    root: Path
    predictions_subdir: str = "predictions"
    _config: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # paths ---------------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def failed_dir(self) -> Path:
        return self.root / "failed"

    @property
    def predictions_dir(self) -> Path:
        return self.root / self.predictions_subdir if self.predictions_subdir else self.root

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def map_path(self, scan_id: str) -> Path:
        return self.predictions_dir / f"{scan_id}.nii.gz"

    def shard_path(self, scan_id: str) -> Path:
        return self.shards_dir / f"{scan_id}.json"

    def failed_path(self, scan_id: str) -> Path:
        return self.failed_dir / f"{scan_id}.json"

    # config --------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> RunDirectory:
        """An existing run directory (its layout read from ``run.json``).

        Raises
        ------
        MissingInputError
            No ``run.json`` in ``root``.
        UnreadableInputError
            ``run.json`` is not valid JSON.
        """
        root = Path(root)
        config = read_run_config(root)
        if config is None:
            raise MissingInputError("not a cmbbench run directory (no run.json)", root)
        run = cls(root, predictions_subdir=config.get("predictions_subdir", "predictions"))
        run._config = config
        return run

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = read_run_config(self.root) or {}
        return self._config

    def prepare(self, config: dict, *, overwrite: bool = False,
                scan_ids: list[str] | None = None) -> bool:
        """Create or reopen the run directory for ``config``; returns True when it resumes an
        earlier run of the same method on the same dataset.

        Raises
        ------
        ConfigurationError
            The folder holds a run of another method, dataset, seed or kind, a run on another
            copy of the dataset (:func:`content_conflict`), or files that are not a cmbbench
            run, and ``overwrite`` is false.
        """
        existing = read_run_config(self.root)
        resumed = False
        if existing is not None:
            other_copy = content_conflict(existing, config)
            if run_identity(existing) == run_identity(config) and other_copy is None:
                resumed = True
            elif other_copy is not None and not overwrite:
                raise ConfigurationError(
                    f"the folder holds a run on {other_copy}: its predictions were made on "
                    "other images; choose another --out or pass --overwrite to replace it",
                    self.root)
            elif not overwrite:
                raise ConfigurationError(
                    f"the folder holds {_describe(existing)}, not {_describe(config)}; choose "
                    "another --out or pass --overwrite to replace it", self.root)
            else:
                self._clear(existing, scan_ids or [])
        elif self.root.is_dir() and any(self.root.iterdir()):
            if not overwrite:
                raise ConfigurationError(
                    "the folder is not empty and holds no cmbbench run (no run.json); choose "
                    "another --out or pass --overwrite", self.root)
            self._clear({}, scan_ids or [])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in (self.shards_dir, self.failed_dir, self.predictions_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MissingInputError(f"cannot create the run directory ({exc.strerror})",
                                    self.root) from None
        record = dict(config)
        record["format"] = RUN_FORMAT
        record["predictions_subdir"] = self.predictions_subdir
        record["created"] = (existing or {}).get("created", _now()) if resumed else _now()
        record["updated"] = _now()
        atomic_write_text(self.run_file, json.dumps(_jsonable(record), indent=2))
        self._config = _jsonable(record)
        return resumed

    def update_config(self, **changes: object) -> None:
        record = {**self.config, **changes, "updated": _now()}
        atomic_write_text(self.run_file, json.dumps(_jsonable(record), indent=2))
        self._config = _jsonable(record)

    def _clear(self, old: dict, scan_ids: list[str]) -> None:
        """Remove what a cmbbench run wrote here (never other files).

        ``old`` is the earlier run's ``run.json`` (empty when the folder holds none: then only
        prediction maps named after this dataset's scans are removed, since they would be
        scored as this run's; folders such as ``results/`` may be the user's and are kept)."""
        sub = old.get("predictions_subdir", self.predictions_subdir)
        old_pred = self.root / sub if sub else self.root
        names = set(scan_ids)
        if old:
            for d in (self.shards_dir, self.failed_dir):
                if d.is_dir():
                    names |= {p.stem for p in d.glob("*.json")}
        for pred_dir in {old_pred, self.predictions_dir}:
            if not pred_dir.is_dir():
                continue
            for sid in names:
                for p in (pred_dir / f"{sid}.nii.gz", pred_dir / f"{sid}.partial.nii.gz"):
                    p.unlink(missing_ok=True)
            if old:
                for name in (MANIFEST_NAME, POINTS_FILE):
                    (pred_dir / name).unlink(missing_ok=True)
                if pred_dir != self.root and not any(pred_dir.iterdir()):
                    pred_dir.rmdir()
        if old:
            ours = [self.shards_dir, self.failed_dir]
            if old.get("kind") == "evaluate":
                ours.append(self.results_dir)
            for d in ours:
                if d.is_dir():
                    shutil.rmtree(d)
            self.run_file.unlink(missing_ok=True)

    # shards --------------------------------------------------------------------------------
    def read_shard(self, scan_id: str, *, verify: bool = True) -> dict | None:
        """The shard of ``scan_id`` if it is valid (parses, names this scan, and the map it names
        exists with the recorded sha256 when ``verify``), else None."""
        path = self.shard_path(scan_id)
        try:
            shard = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(shard, dict) or shard.get("scan_id") != scan_id \
                or shard.get("status") != "done":
            return None
        if shard.get("map"):
            mp = self.predictions_dir / shard["map"]
            if not mp.is_file():
                return None
            if verify and sha256_file(mp) != shard.get("sha256"):
                log.warning("%s: map does not match its shard; the scan is predicted again", mp)
                return None
        return shard

    def finished(self, scan_ids: list[str], *, verify: bool = True) -> dict[str, dict]:
        """Valid shards of ``scan_ids``, by scan."""
        if not self.shards_dir.is_dir():
            return {}
        present = {p.stem for p in self.shards_dir.glob("*.json")}
        out = {}
        for sid in scan_ids:
            if sid in present:
                shard = self.read_shard(sid, verify=verify)
                if shard is not None:
                    out[sid] = shard
        return out

    def failures(self, scan_ids: list[str] | None = None) -> dict[str, dict]:
        """Failure records (of ``scan_ids``, or all), by scan."""
        if not self.failed_dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.failed_dir.glob("*.json")):
            if scan_ids is not None and p.stem not in scan_ids:
                continue
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                out[p.stem] = {"scan_id": p.stem, "error": "unreadable failure record"}
        return out

    def record(self, result: dict, *, part: tuple[int, int] = (0, 1)) -> None:
        """Write a worker's result: a shard (then drop an old failure record) or a failure."""
        sid = result["scan_id"]
        result = {**result, "part": list(part), "finished_at": _now()}
        if result["status"] == "done":
            atomic_write_text(self.shard_path(sid), json.dumps(_jsonable(result), indent=1))
            self.failed_path(sid).unlink(missing_ok=True)
        else:
            atomic_write_text(self.failed_path(sid), json.dumps(_jsonable(result), indent=1))

    def cleanup_partials(self) -> None:
        """Remove temporary files left by interrupted writes (called once every scan is done).

        ``.<name>.<pid>.partial`` files of another process still alive on this machine (a part
        sharing the folder, finishing at the same moment) are left alone."""
        for d in {self.root, self.shards_dir, self.failed_dir, self.predictions_dir}:
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if not p.is_file() or not (p.name.endswith(".partial") or ".partial." in p.name):
                    continue
                if p.name.endswith(".partial") and _writer_alive(p.name):
                    continue
                p.unlink(missing_ok=True)

    # predictions folder --------------------------------------------------------------------
    def write_points(self, shards: dict[str, dict]) -> Path | None:
        """Write ``predictions.csv`` (0-based voxel ``i, j, k`` and ``score``) for the scans whose
        method returned candidates only; remove a stale one when there are none."""
        path = self.predictions_dir / POINTS_FILE
        rows = [(sid, *c) for sid, s in shards.items()
                if s.get("kind") == "points" for c in (s.get("candidates") or [])]
        if not any(s.get("kind") == "points" for s in shards.values()):
            path.unlink(missing_ok=True)
            return None
        frame = pd.DataFrame(rows, columns=["scan_id", "i", "j", "k", "score"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path

    def write_manifest(self, shards: dict[str, dict], failed: list[str]) -> Path:
        """Write the predictions folder's ``cmbbench-submission.json``."""
        cfg = self.config
        m, d = cfg.get("method", {}), cfg.get("dataset", {})
        kinds = {s.get("kind") for s in shards.values()}
        kind = "probability" if kinds <= {"probability"} else (
            "points" if kinds == {"points"} else "mixed")
        manifest = {
            "method": m.get("name"), "version": m.get("version"), "paper": m.get("citation"),
            "citation": m.get("citation"), "params": m.get("params", {}),
            "prediction_kind": kind, "voxel_index_base": 0,
            "dataset": d.get("name"), "dataset_version": d.get("version"),
            "seed": cfg.get("seed"), "cmbbench_version": __version__,
            "produced_by": f"cmbbench {cfg.get('kind', 'predict')}",
            "n_scans": len(shards), "failed_scans": sorted(failed),
        }
        return atomic_write_text(self.predictions_dir / MANIFEST_NAME,
                                 json.dumps(_jsonable(manifest), indent=2))


def _writer_alive(name: str) -> bool:
    """Whether the process that names the temporary file ``.<name>.<pid>.partial`` is alive."""
    try:
        pid = int(name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def read_run_config(root: Path) -> dict | None:
    """``run.json`` of ``root``, or None when there is none."""
    path = Path(root) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnreadableInputError(f"invalid JSON ({exc.msg} at line {exc.lineno})",
                                   path) from None
    if not isinstance(data, dict):
        raise UnreadableInputError("run.json must hold a JSON object", path)
    return data


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name.replace(".nii", f".{os.getpid()}.partial.nii", 1)
                        if ".nii" in dst.name else f".{dst.name}.{os.getpid()}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge_runs(sources: list[str | Path], dest: str | Path, *,
               overwrite: bool = False) -> RunDirectory:
    """Merge part run directories into ``dest`` (which may be one of them).

    Every source must be a run of the same kind, method (name, version, parameters), dataset and
    seed, on the same copy of the dataset (:func:`content_conflict`). Valid shards are copied with their maps (map first, shard last, each atomically);
    failure records are copied for scans that no source finished. A scan finished in ``dest``
    already is kept as it is.

    Raises
    ------
    MissingInputError
        A source is not a run directory.
    ConfigurationError
        The sources are runs of different methods/datasets/seeds, or ``dest`` holds another run
        (and ``overwrite`` is false).
    """
    runs = [RunDirectory.open(s) for s in sources]
    if not runs:
        raise MissingInputError("no run directory to merge")
    ident = run_identity(runs[0].config)
    for r in runs[1:]:
        if run_identity(r.config) != ident:
            raise ConfigurationError(f"cannot merge {_describe(r.config)} into "
                                     f"{_describe(runs[0].config)}", r.root)
        other_copy = content_conflict(runs[0].config, r.config)
        if other_copy is not None:
            raise ConfigurationError(f"cannot merge a part made on {other_copy}", r.root)
    base = runs[0].config
    out = RunDirectory(dest, predictions_subdir=base.get("predictions_subdir", "predictions"))
    config = {k: v for k, v in base.items()
              if k not in ("format", "predictions_subdir", "created", "updated")}
    config["part"] = {"id": 0, "num": 1}
    config["merged_from"] = sorted({str(r.root.resolve()) for r in runs})
    dest_path = Path(dest).resolve()
    existing = read_run_config(Path(dest))
    if existing is not None and run_identity(existing) == ident:
        config["merged_from"] = sorted(set(config["merged_from"])
                                       | set(existing.get("merged_from", [])))
    out.prepare(config, overwrite=overwrite)
    have = {p.stem for p in out.shards_dir.glob("*.json")}
    for r in runs:
        if r.root.resolve() == dest_path:
            continue
        ids = sorted(p.stem for p in r.shards_dir.glob("*.json")) if r.shards_dir.is_dir() else []
        for sid, shard in r.finished(ids).items():
            if sid in have and out.read_shard(sid) is not None:
                continue
            if shard.get("map"):
                _copy_atomic(r.predictions_dir / shard["map"], out.predictions_dir / shard["map"])
            atomic_write_text(out.shard_path(sid), json.dumps(shard, indent=1))
            out.failed_path(sid).unlink(missing_ok=True)
            have.add(sid)
    for r in runs:
        if r.root.resolve() == dest_path:
            continue
        for sid, rec in r.failures().items():
            if sid not in have:
                atomic_write_text(out.failed_path(sid), json.dumps(rec, indent=1))
    return out

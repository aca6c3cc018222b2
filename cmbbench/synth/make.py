"""Write a synthetic dataset in the harmonized layout, resumably and in parallel.

Each finished scan leaves, in this order, ``images/<id>.nii.gz``, ``labels/<id>.nii.gz``,
``mimics/<id>.nii.gz`` (each written under a temporary name and renamed) and last a shard
``.shards/<id>.json`` (its scans.csv row, lesion and mimic rows, checksums), also renamed into
place. A scan counts as done only when its shard exists, so an interrupted run never leaves a
scan that looks complete; re-running skips the finished ones. The tables (``scans.csv``,
``lesions.csv``, ``mimics.csv``) and ``dataset.json`` are assembled from the shards at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..dataset import HarmonizedDataset, read_dataset, sha256_file
from ..errors import ConfigurationError, MissingInputError
from ..model import SCAN_COLUMNS
from ..nifti import write_volume
from .generator import GENERATOR_VERSION, generate_scan
from .recipe import SynthRecipe

__all__ = ["make_dataset", "scan_ids"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def scan_ids(recipe: SynthRecipe) -> list[str]:
    """Scan ids of a recipe, in generation order."""
    return [f"{recipe.name}-{n:04d}" for n in range(recipe.n_scans)]


def _recipe_record(recipe: SynthRecipe) -> dict:
    return {"recipe": recipe.to_dict(), "generator_version": GENERATOR_VERSION}


def _jsonable(value: object) -> object:
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if not np.isfinite(v) else v
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _write_scan(recipe: SynthRecipe, index: int, out: Path) -> str:
    """Generate scan ``index`` and write its files and shard; returns the scan id."""
    scan = generate_scan(recipe, index)
    checksums = {}
    for folder, data in (("images", scan.image), ("labels", scan.labels),
                         ("mimics", scan.mimic_labels)):
        path = write_volume(out / folder / f"{scan.scan_id}.nii.gz", data, scan.affine)
        checksums[f"{folder}/{scan.scan_id}.nii.gz"] = sha256_file(path)
    shard = {
        "index": index,
        "scan": {k: _jsonable(v) for k, v in scan.info.items()},
        "lesions": [{k: _jsonable(v) for k, v in r.items()}
                    for r in scan.lesions.to_dict(orient="records")],
        "mimics": [{k: _jsonable(v) for k, v in r.items()}
                   for r in scan.mimics.to_dict(orient="records")],
        "checksums": checksums,
    }
    shard_dir = out / ".shards"
    shard_dir.mkdir(exist_ok=True)
    tmp = shard_dir / f"{scan.scan_id}.json.partial"
    tmp.write_text(json.dumps(shard, allow_nan=False))
    os.replace(tmp, shard_dir / f"{scan.scan_id}.json")
    return scan.scan_id


def _same_record(old: dict, new: dict) -> bool:
    """Whether a folder's ``recipe.json`` (``old``) records the recipe ``new``. A recipe field
    added to :class:`SynthRecipe` after the folder was made, absent from ``old``, counts as
    recorded when ``new`` holds its default (a default never changes what is generated)."""
    defaults = {f.name: f.default for f in fields(SynthRecipe) if f.default is not MISSING}
    rec = dict(old.get("recipe") or {})
    for key, value in (new.get("recipe") or {}).items():
        if key not in rec and key in defaults and value == defaults[key]:
            rec[key] = value
    return {**old, "recipe": rec} == new


def _check_output(out: Path, recipe: SynthRecipe) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MissingInputError(f"output folder is not writable ({exc.strerror})", out) from None
    record_path = out / "recipe.json"
    record = _recipe_record(recipe)
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if not _same_record(old, json.loads(json.dumps(record))):
            raise ConfigurationError(
                "the output folder holds a dataset made from a different recipe or generator "
                "version; choose another --out or delete it", out)
    else:
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True))


def make_dataset(recipe: SynthRecipe, out: str | Path, *, workers: int = 1,
                 progress: Progress | None = None, card: dict | None = None) -> HarmonizedDataset:
    """Generate (or finish generating) ``recipe`` into ``out`` and return the dataset.

    Parameters
    ----------
    workers
        Processes generating scans in parallel (1 = in this process).
    progress
        Called as ``progress(done, total, scan_id)`` after each scan (and once at start).
    card
        The registry card, stored in ``dataset.json``.
    """
    out = Path(out)
    _check_output(out, recipe)
    ids = scan_ids(recipe)
    done = {p.name[:-5] for p in (out / ".shards").glob("*.json")} if (out / ".shards").is_dir() else set()
    todo = [n for n, sid in enumerate(ids) if sid not in done]
    if progress:
        progress(len(ids) - len(todo), len(ids), "")
    if todo:
        log.info("generating %d of %d scan(s) of %s into %s", len(todo), len(ids), recipe.name, out)
    finished = len(ids) - len(todo)
    if workers <= 1 or len(todo) <= 1:
        for n in todo:
            sid = _write_scan(recipe, n, out)
            finished += 1
            if progress:
                progress(finished, len(ids), sid)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_scan, recipe, n, out) for n in todo]
            for fut in as_completed(futures):
                sid = fut.result()
                finished += 1
                if progress:
                    progress(finished, len(ids), sid)
    return _assemble(recipe, out, ids, card or {})


def _assemble(recipe: SynthRecipe, out: Path, ids: list[str], card: dict) -> HarmonizedDataset:
    shards = [json.loads((out / ".shards" / f"{sid}.json").read_text()) for sid in ids]
    scans = pd.DataFrame([s["scan"] for s in shards])
    scans = scans[list(SCAN_COLUMNS) + [c for c in scans.columns if c not in SCAN_COLUMNS]]
    lesions = pd.DataFrame([r for s in shards for r in s["lesions"]])
    mimics = pd.DataFrame([r for s in shards for r in s["mimics"]])
    for name, frame in (("scans.csv", scans), ("lesions.csv", lesions), ("mimics.csv", mimics)):
        frame.to_csv(out / f"{name}.partial", index=False)
        os.replace(out / f"{name}.partial", out / name)
    checksums = {k: v for s in shards for k, v in s["checksums"].items()}
    meta = {k: v for k, v in card.items() if not k.startswith("_")}
    dataset_card = {**meta, "name": recipe.name, "version": recipe.version, "layout_version": "1",
                    "kind": "synthetic", "generator_version": GENERATOR_VERSION,
                    "cmbbench_version": __version__, "recipe": recipe.to_dict(),
                    "n_scans": len(scans), "n_cmb": int(len(lesions)),
                    "n_mimics": int(len(mimics)), "checksums": checksums}
    tmp = out / "dataset.json.partial"
    tmp.write_text(json.dumps(dataset_card, indent=2, sort_keys=True, default=str))
    os.replace(tmp, out / "dataset.json")
    return read_dataset(out)

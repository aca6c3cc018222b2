"""Shared helpers of the results-store and submission tests: tiny real runs and datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cmbbench.evaluation import evaluate
from cmbbench.examples import make_example
from cmbbench.geometry import world_to_voxel
from cmbbench.nifti import read_header, write_volume

REPO = Path(__file__).resolve().parents[1]


def evaluated_run(root: Path, *, n_boot: int = 50, seed: int = 1) -> tuple[Path, Path]:
    """The scoring example (6 small scans) and a finished ``evaluate`` run of ``log`` on it."""
    ds, _ = make_example(root / "example")
    report = evaluate("log", ds.root, out=root / "run", n_boot=n_boot, seed=seed)
    assert report.results_dir is not None
    return ds.root, report.run_dir


def add_mimics(ds_root: Path, scan_id: str, centre_vox: tuple[float, float, float],
               mimic_class: str = "medullary_vein") -> None:
    """Make the example 'synthetic': one mimic (a 2-voxel-radius ball) in ``scan_id``, an
    empty mimic map in every other scan, and ``mimics.csv``."""
    scans = pd.read_csv(ds_root / "scans.csv", dtype={"scan_id": str})
    (ds_root / "mimics").mkdir(exist_ok=True)
    rows = []
    for sid in scans["scan_id"]:
        shape, affine = read_header(ds_root / "images" / f"{sid}.nii.gz")
        lab = np.zeros(shape, dtype=np.uint16)
        if sid == scan_id:
            g = np.indices(shape).astype(float)
            d = np.sqrt(sum((g[n] - centre_vox[n]) ** 2 for n in range(3)))
            lab[d <= 2.0] = 1
            xyz = (affine @ np.r_[np.asarray(centre_vox, float), 1.0])[:3]
            rows.append({"scan_id": sid, "mimic_id": 1, "mimic_class": mimic_class,
                         "x_mm": xyz[0], "y_mm": xyz[1], "z_mm": xyz[2], "i": centre_vox[0],
                         "j": centre_vox[1], "k": centre_vox[2], "n_voxels": int(lab.sum()),
                         "size_mm": 4.0})
        write_volume(ds_root / "mimics" / f"{sid}.nii.gz", lab, affine)
    pd.DataFrame(rows).to_csv(ds_root / "mimics.csv", index=False)


def contract_columns(doc: str | None = None) -> dict[str, list[str]]:
    """Table -> column names, parsed from the contract's schema table in ``docs/store.md``
    (the ``## Schema`` section up to its first subsection).

    Backticked names at parenthesis depth 0 of the primary-key and columns cells (names inside
    parentheses are example values, not columns)."""
    text = doc if doc is not None else (REPO / "docs" / "store.md").read_text()
    section = text.split("## Schema", 1)[1]
    section = re.split(r"^##", section, maxsplit=1, flags=re.MULTILINE)[0]
    out: dict[str, list[str]] = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([a-z_]+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if not m:
            continue
        cols: list[str] = []
        for cell in (m.group(2), m.group(3)):
            depth = 0
            for n, seg in enumerate(cell.split("`")):
                if n % 2 == 0:
                    depth += seg.count("(") - seg.count(")")
                elif depth == 0 and re.fullmatch(r"[a-z_][a-z0-9_]*", seg):
                    cols.append(seg)
        out[m.group(1)] = cols
    return out


def voxel_of(ds_root: Path, scan_id: str, xyz: np.ndarray) -> np.ndarray:
    """World mm -> 0-based voxel in a scan of a dataset."""
    _, affine = read_header(ds_root / "images" / f"{scan_id}.nii.gz")
    return world_to_voxel(affine, np.atleast_2d(np.asarray(xyz, dtype=float)))


def write_manifest(folder: Path, **fields: object) -> None:
    (folder / "cmbbench-submission.json").write_text(json.dumps(fields))

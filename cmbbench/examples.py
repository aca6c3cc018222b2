"""Small, fully controlled scoring cases built from spheres placed on purpose.

These are the test-case factories of the suite and the data of ``cmbbench make-example``: a
tiny harmonized reference dataset plus a predictions folder, so ``cmbbench score`` can be tried
on a fresh install in seconds. They are *not* the realistic synthetic datasets (SYNTH, made by
the generator on real anatomy); they exist to make every matching situation explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import DatasetWriter, HarmonizedDataset
from .geometry import voxel_sizes
from .harmonize import lesions_from_labels
from .model import ScanInfo
from .nifti import write_volume

__all__ = ["ExampleScan", "affine_for", "example_scans", "make_example", "sphere"]


def sphere(shape: tuple[int, int, int], centre_vox: np.ndarray | tuple, radius_mm: float,
           spacing_mm: np.ndarray | tuple = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ball of ``radius_mm`` (mm) around ``centre_vox`` (0-based voxels).

    Only the ball's bounding box is touched, so it is cheap on large grids.
    """
    c = np.asarray(centre_vox, dtype=np.float64)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    out = np.zeros(shape, dtype=bool)
    half = np.ceil(radius_mm / sp).astype(int) + 1
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.ceil(c).astype(int) + half + 1, shape)
    if np.any(hi <= lo):
        return out
    g = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in zip(lo, hi, c, sp)],
                    indexing="ij")
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2
                                                  <= radius_mm ** 2 + 1e-9)
    return out


def affine_for(spacing_mm: tuple[float, float, float], orientation: str = "RAS",
               shape: tuple[int, int, int] = (64, 64, 32)) -> np.ndarray:
    """A voxel-to-RAS affine with the given spacing whose array axes point along ``orientation``
    (e.g. ``"LPS"``: i increases to the Left, j Posterior, k Superior), centred on the origin."""
    signs = {"R": 1.0, "L": -1.0, "A": 1.0, "P": -1.0, "S": 1.0, "I": -1.0}
    axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    for n, letter in enumerate(orientation):
        a[axis[letter], n] = signs[letter] * spacing_mm[n]
    centre = (np.asarray(shape) - 1) / 2.0
    a[:3, 3] = -a[:3, :3] @ centre
    return a


@dataclass
class ExampleScan:
    """One example scan: grid, reference spheres and predicted blobs.

    ``predicted`` items are ``(centre_vox, radius_mm, peak_probability)``.
    """

    scan_id: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    orientation: str
    reference: list[tuple[tuple[float, float, float], float]] = field(default_factory=list)
    predicted: list[tuple[tuple[float, float, float], float, float]] = field(default_factory=list)
    sequence: str = "SWI"
    field_strength_t: float = 3.0


def example_scans() -> list[ExampleScan]:
    """The example cases: exact hit, shifted hit, split, merge, duplicate, miss, FP, empty scans,
    anisotropic voxels and non-RAS affines."""
    return [
        ExampleScan("ex01", (48, 48, 24), (1.0, 1.0, 1.0), "RAS",
                    reference=[((12, 12, 8), 2.0), ((30, 30, 12), 1.5)],
                    predicted=[((12, 12, 8), 2.0, 0.95), ((31, 30, 12), 1.5, 0.8)]),
        ExampleScan("ex02", (64, 64, 20), (0.5, 0.5, 2.0), "LPS",
                    reference=[((20, 20, 10), 1.5), ((44, 40, 6), 2.5), ((10, 50, 14), 1.5)],
                    predicted=[((21, 20, 10), 1.5, 0.9), ((44, 40, 6), 1.0, 0.7),
                               ((48, 40, 6), 1.0, 0.6), ((55, 12, 4), 1.5, 0.75)]),
        ExampleScan("ex03", (48, 48, 16), (0.9, 0.9, 3.0), "LAS",
                    reference=[((16, 16, 8), 2.0)],
                    predicted=[((16, 16, 8), 2.0, 0.4)], sequence="T2S", field_strength_t=1.5),
        ExampleScan("ex04", (40, 40, 20), (1.0, 1.0, 1.0), "RAS", reference=[],
                    predicted=[((20, 20, 10), 1.5, 0.65)], sequence="T2S",
                    field_strength_t=1.5),
        ExampleScan("ex05", (40, 40, 20), (1.0, 1.0, 1.0), "RAS", reference=[], predicted=[]),
        ExampleScan("ex06", (48, 48, 24), (1.0, 1.0, 1.0), "RAS",
                    reference=[((15, 15, 12), 1.5), ((33, 33, 12), 2.0)],
                    predicted=[]),
    ]


def _probability_blob(shape: tuple[int, int, int], centre: tuple, radius_mm: float,
                      peak: float, spacing: tuple) -> np.ndarray:
    """A blob whose probability falls linearly from ``peak`` at the centre to 0.3*peak at its
    edge (so its peak is exactly ``peak`` and it stays one component above the 0.1 floor)."""
    ball = sphere(shape, centre, radius_mm, spacing)
    idx = np.nonzero(ball)
    d = np.sqrt(sum(((idx[n] - centre[n]) * spacing[n]) ** 2 for n in range(3)))
    prob = np.zeros(shape, dtype=np.float32)
    prob[idx] = peak * (1.0 - 0.7 * d / max(radius_mm, 1e-6))
    return prob


def make_example(root: str | Path, *, seed: int = 0) -> tuple[HarmonizedDataset, Path]:
    """Write ``root/reference`` (a harmonized dataset) and ``root/predictions`` (probability maps).

    Returns the reference dataset and the predictions folder.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    writer = DatasetWriter(root / "reference", name="EXAMPLE", version="1",
                           card={"description": "cmbbench scoring example (spheres)"})
    pred_dir = root / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for ex in example_scans():
        affine = affine_for(ex.spacing_mm, ex.orientation, ex.shape)
        labels = np.zeros(ex.shape, dtype=np.uint16)
        image = (1000.0 + 20.0 * rng.standard_normal(ex.shape)).astype(np.float32)
        for n, (centre, radius) in enumerate(ex.reference, start=1):
            ball = sphere(ex.shape, centre, radius, ex.spacing_mm)
            labels[ball] = n
            image[ball] = 300.0
        lesions = lesions_from_labels(labels, affine, scan_id=ex.scan_id, mask_source="rater")
        info = ScanInfo(scan_id=ex.scan_id, subject_id=ex.scan_id, split="test",
                        sequence=ex.sequence, field_strength_t=ex.field_strength_t,
                        te_ms=20.0)
        writer.add_scan(info, image, affine, labels, lesions)
        prob = np.zeros(ex.shape, dtype=np.float32)
        for centre, radius, peak in ex.predicted:
            prob = np.maximum(prob, _probability_blob(ex.shape, centre, radius, peak,
                                                      tuple(voxel_sizes(affine))))
        write_volume(pred_dir / f"{ex.scan_id}.nii.gz", prob, affine)
    (pred_dir / "cmbbench-submission.json").write_text(pd.Series({
        "method": "example", "version": "1", "prediction_kind": "probability",
        "description": "hand-placed probability blobs for the scoring example",
    }).to_json(indent=2))
    return writer.close(), pred_dir

"""The method plugin API.

A method is a class deriving from :class:`Method` that declares who it is (name, version,
citation), what it needs (:class:`Requirements`) and how it predicts: ``predict(scan)`` returns
a :class:`Prediction` on the scan's own voxel grid -- a probability map in [0, 1], scored
candidates, or both. Trainable methods also implement ``fit``.

Methods register through the ``cmbbench.methods`` entry-point group, so a third-party package
adds a method without touching cmbbench::

    [project.entry-points."cmbbench.methods"]
    mymethod = "mypackage.module:MyMethod"

Lifecycle: the runner instantiates the class once per worker process, calls :meth:`Method.load`
once (weights, caches), then :meth:`Method.predict` for each scan assigned to that worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

__all__ = ["Method", "Prediction", "Requirements", "ScanInput"]


@dataclass(frozen=True)
class Requirements:
    """What a method needs from a scan.

    Attributes
    ----------
    sequences
        Sequences it accepts (``SWI``, ``T2S``).
    needs_labels
        Whether ``predict`` needs anything beyond the image (never the reference lesions).
    trainable
        Whether the method implements :meth:`Method.fit`.
    torch
        Whether it needs the ``[inference]`` extra (torch).
    """

    sequences: tuple[str, ...] = ("SWI", "T2S")
    trainable: bool = False
    torch: bool = False


@dataclass
class ScanInput:
    """What a method receives for one scan (never the reference annotations).

    Attributes
    ----------
    scan_id
        Identifier of the scan.
    image
        3D magnitude (T2*) or SWI image, array axes as stored (index ``[i, j, k]``, 0-based).
    affine
        4x4 voxel-to-world (RAS+ mm) matrix.
    sequence, field_strength_t, te_ms
        Acquisition metadata from ``scans.csv`` (``unknown``/NaN when not known).
    extra
        Other scans.csv columns (e.g. ``slice_thickness_mm``).
    seed
        Seed of this scan in this run (derived from the run's ``--seed`` and the scan id, the
        same on every backend); the runner also seeds Python's, numpy's legacy and (when
        imported) torch's global generators with it before ``predict``.
    """

    scan_id: str
    image: np.ndarray
    affine: np.ndarray
    sequence: str = "unknown"
    field_strength_t: float = float("nan")
    te_ms: float = float("nan")
    extra: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel edge lengths (mm) along the array axes."""
        a = np.asarray(self.affine, dtype=np.float64)
        return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


@dataclass
class Prediction:
    """A method's output for one scan, on the scan's voxel grid.

    Attributes
    ----------
    probability
        Float32 map in [0, 1] with the image's shape, or None.
    candidates
        Scored point candidates (columns ``i, j, k`` 0-based voxels and ``score`` in [0, 1]),
        or None. When both are given, the map is what gets scored; the candidates are kept as
        the method's own detections (e.g. for inspection).
    """

    probability: np.ndarray | None = None
    candidates: pd.DataFrame | None = None


class Method(ABC):
    """Base class of detection methods (subclass it and register an entry point).

    Class attributes
    ----------------
    name, version
        Registry name and version (the version changes whenever predictions would).
    citation
        Paper or source the method reproduces.
    description
        One paragraph: what it does, in physical units.
    limitations
        Known limits shown by ``cmbbench methods info``.
    requirements
        :class:`Requirements`.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    citation: ClassVar[str] = ""
    description: ClassVar[str] = ""
    limitations: ClassVar[str] = ""
    requirements: ClassVar[Requirements] = Requirements()

    def __init__(self, **params: object) -> None:
        self.params = dict(params)

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights/caches; called once per worker before the first ``predict``."""

    @abstractmethod
    def predict(self, scan: ScanInput) -> Prediction:
        """Predict CMBs on one scan (on its own grid)."""

    def fit(self, train: object, val: object, *, out_dir: Path, seed: int = 0) -> Path:
        """Train on ``train`` with model selection on ``val``; return the checkpoint path.

        Only trainable methods implement it.
        """
        raise TypeError(f"method {self.name} is not trainable")

    def info(self) -> dict:
        """Everything ``cmbbench methods info`` shows."""
        return {"name": self.name, "version": self.version, "citation": self.citation,
                "description": self.description, "limitations": self.limitations,
                "requirements": self.requirements.__dict__, "params": self.params}

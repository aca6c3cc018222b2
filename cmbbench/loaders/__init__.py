"""Loaders of public CMB datasets into the harmonized layout (:mod:`cmbbench.dataset`).

One module per raw layout: :mod:`.dou`, :mod:`.valdo`, :mod:`.momeni` (MOMENI and sMOMENI),
:mod:`.yonsei`, and two generic ones, :mod:`.bids` and :mod:`.nnunet`. :func:`prepare` (in
:mod:`.base`) runs a card's loader resumably; :func:`verify_dataset` checks the result;
:func:`dataset_statistics` summarises a dataset for the docs and the leaderboard;
:mod:`.location` gives each lesion its MARS location from the atlas registered to its scan
(:mod:`cmbbench.registration`).
"""

from __future__ import annotations

from . import bids, dou, momeni, nnunet, valdo, yonsei  # noqa: F401 - register the loaders
from .base import LOADERS, LOCATION_REASON, Loader, RawScan, RawScanRef, get_loader, prepare
from .statistics import dataset_statistics, statistics_markdown
from .verify import VerifyReport, verify_dataset

__all__ = [
    "LOADERS",
    "LOCATION_REASON",
    "Loader",
    "RawScan",
    "RawScanRef",
    "VerifyReport",
    "dataset_statistics",
    "get_loader",
    "prepare",
    "prepare_command",
    "statistics_markdown",
    "verify_dataset",
]


def prepare_command(name: str) -> str:
    """The exact command that prepares registry dataset ``name`` from the user's copy."""
    return f"cmbbench datasets prepare {name} --source RAW_DIR"

"""Definitions of the metrics the leaderboard shows: the single source for docs and app.

The table below is rendered into ``docs/metrics.md`` (between the ``metric-definitions``
markers) and shown by the leaderboard's "Metric definitions" page; a test fails when the two
drift apart. Regenerate the docs block with::

    python -m cmbbench.metric_definitions --write docs/metrics.md

Each definition names the metric twice: ``key`` is its name in the results store
(``aggregates.metric``, see ``docs/store.md``) and the leaderboard's column; ``aggregate_key``
is the key of :func:`cmbbench.metrics.aggregate` that computes it.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BEGIN_MARKER",
    "DEFINITIONS",
    "END_MARKER",
    "MetricDefinition",
    "by_key",
    "docs_block",
    "render_markdown",
    "replace_docs_block",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricDefinition:
    """One leaderboard metric.

    Attributes
    ----------
    key
        Name in the store's ``aggregates.metric`` column and the leaderboard column id.
    aggregate_key
        Key of :func:`cmbbench.metrics.aggregate` that computes the value.
    label
        Short column label shown by the app.
    group
        ``pooled``, ``per-scan``, ``FROC``, ``scan level``, ``count`` or ``segmentation``.
    definition
        Formula in words and symbols (Markdown; notation of ``docs/metrics.md``).
    unit
        Unit of the value (``—`` for ratios).
    higher_is_better
        Direction used for ranking; ``None`` for values that are not ranked (SDs).
    """

    key: str
    aggregate_key: str
    label: str
    group: str
    definition: str
    unit: str
    higher_is_better: bool | None


DEFINITIONS: tuple[MetricDefinition, ...] = (
    MetricDefinition("precision", "precision_pooled", "Precision", "pooled",
                     "ΣTPp / (ΣTPp + ΣFP) over all scans at the operating threshold", "—", True),
    MetricDefinition("recall", "recall_pooled", "Recall", "pooled",
                     "ΣTP / ΣR: detected reference CMBs over all reference CMBs", "—", True),
    MetricDefinition("f1", "f1_pooled", "F1", "pooled",
                     "harmonic mean of pooled precision and recall "
                     "(= 2ΣTP / (2ΣTP + ΣFP + ΣFN) for one-to-one rules)", "—", True),
    MetricDefinition("fp_per_scan", "fp_per_scan", "FP/scan", "pooled",
                     "ΣFP / N, N = **all** scans, CMB-free scans included", "FP per scan", False),
    MetricDefinition("fp_per_cmb", "fp_per_cmb", "FP/CMB", "pooled",
                     "ΣFP / ΣR (not FP per scan: they coincide only with one CMB per scan)",
                     "FP per reference CMB", False),
    MetricDefinition("cpm", "cpm", "CPM", "FROC",
                     "mean FROC sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan "
                     "(step rule, no interpolation)", "—", True),
    MetricDefinition("ap", "average_precision", "AP", "FROC",
                     "Σ (R_n − R_{n−1}) · P_n over the FROC points (step integral of the "
                     "lesion precision–recall curve)", "—", True),
    MetricDefinition("precision_scan_mean", "precision_mean", "Precision per scan (mean)",
                     "per-scan", "mean of TPp_s / (TPp_s + FP_s) over the scans where it is "
                     "defined (NaN skipped)", "—", True),
    MetricDefinition("precision_scan_sd", "precision_sd", "Precision per scan (SD)",
                     "per-scan", "sample SD (ddof 1) of the same per-scan values", "—", None),
    MetricDefinition("recall_scan_mean", "recall_mean", "Recall per scan (mean)", "per-scan",
                     "mean of TP_s / R_s over the CMB-positive scans", "—", True),
    MetricDefinition("recall_scan_sd", "recall_sd", "Recall per scan (SD)", "per-scan",
                     "sample SD (ddof 1) of the same per-scan values", "—", None),
    MetricDefinition("f1_scan_mean", "f1_mean", "F1 per scan (mean)", "per-scan",
                     "mean of the per-scan F1 over the scans where it is defined", "—", True),
    MetricDefinition("f1_scan_sd", "f1_sd", "F1 per scan (SD)", "per-scan",
                     "sample SD (ddof 1) of the same per-scan values", "—", None),
    MetricDefinition("scan_ge1_sensitivity", "scan_ge1_sensitivity", "Scan sensitivity (≥1)",
                     "scan level", "share of CMB-positive scans with ≥ 1 detection", "—", True),
    MetricDefinition("scan_ge1_specificity", "scan_ge1_specificity", "Scan specificity (≥1)",
                     "scan level", "share of CMB-free scans without any detection", "—", True),
    MetricDefinition("scan_ge1_auroc", "scan_ge1_auroc", "Scan AUROC (≥1)", "scan level",
                     "AUROC of the scan's top candidate score for CMB presence", "—", True),
    MetricDefinition("count_mae", "count_mae", "Count MAE", "count",
                     "mean over all scans of |D_s − R_s| (detections minus reference CMBs)",
                     "CMBs", False),
    MetricDefinition("dice_pairs_mean", "dice_pairs_mean", "Dice (matched pairs)",
                     "segmentation", "mean voxel Dice over TP pairs whose CMB has a rater "
                     "mask (derived masks never used)", "—", True),
)

BEGIN_MARKER = "<!-- BEGIN metric-definitions"
END_MARKER = "<!-- END metric-definitions -->"
_BEGIN_LINE = (BEGIN_MARKER + ": generated from cmbbench/metric_definitions.py by "
               "`python -m cmbbench.metric_definitions --write docs/metrics.md`; "
               "edit the source, not this block -->")


def by_key() -> dict[str, MetricDefinition]:
    """The definitions keyed by store name (``key``)."""
    return {d.key: d for d in DEFINITIONS}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The definitions as one Markdown table (used verbatim by the docs and the app)."""
    better = {True: "higher", False: "lower", None: "—"}
    lines = ["| column | store key | `aggregate` key | group | definition | unit | better |",
             "|---|---|---|---|---|---|---|"]
    for d in DEFINITIONS:
        lines.append(f"| {_cell(d.label)} | `{d.key}` | `{d.aggregate_key}` | {d.group} | "
                     f"{_cell(d.definition)} | {d.unit} | {better[d.higher_is_better]} |")
    return "\n".join(lines)


def docs_block() -> str:
    """The generated block of ``docs/metrics.md``, markers included."""
    return f"{_BEGIN_LINE}\n{render_markdown()}\n{END_MARKER}"


_BLOCK_RE = re.compile(re.escape(BEGIN_MARKER) + r".*?" + re.escape(END_MARKER), re.DOTALL)


def replace_docs_block(text: str) -> str:
    """``text`` with its generated block replaced by :func:`docs_block`.

    Raises
    ------
    ValueError
        ``text`` has no block between the markers.
    """
    if not _BLOCK_RE.search(text):
        raise ValueError("no metric-definitions block (markers) found")
    return _BLOCK_RE.sub(lambda _m: docs_block(), text, count=1)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None,
                        help="rewrite the generated block of this Markdown file in place")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write is None:
        sys.stdout.write(docs_block() + "\n")
        return
    args.write.write_text(replace_docs_block(args.write.read_text()))
    log.info("rewrote the metric-definitions block of %s", args.write)


if __name__ == "__main__":  # pragma: no cover
    _main()

"""The edge-case policy table of ``docs/metrics.md``, one test (parametrized case) per cell.

Columns of the table (situations of a scan):

- ``empty_ref``  : the scan has no reference CMB, the prediction has candidates;
- ``empty_pred`` : the scan has reference CMBs, the prediction is empty;
- ``both_empty`` : no reference CMB and no candidate.

Rows are metrics. Per-scan cells are read from :func:`cmbbench.metrics.scan_table`; pooled
cells from :func:`cmbbench.metrics.aggregate` over a dataset in which ALL scans are in the same
situation. Test ids read ``<metric>-<situation>[-<rule>]`` so a failing test names its cell.

Every case is built for real: spheres (``cmbbench.examples.sphere``) of radius 2 mm on a 1 mm
grid are the reference (rater) masks and the predictions, scored with
:func:`cmbbench.scoring.score_case`. A radius-2 ball on a 1 mm grid has 33 voxels (centre 1,
6 face neighbours at distance 1, 12 edge neighbours at sqrt 2, 8 corners at sqrt 3, 6 voxels at
distance 2), so its volume is 33 mm^3.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cmbbench.examples import affine_for, sphere
from cmbbench.harmonize import lesions_from_labels
from cmbbench.matching import get_rule
from cmbbench.metrics import FROC_FP_RATES, aggregate, froc_curve, prepare, scan_table
from cmbbench.scoring import ScoreResult, score_case

NAN = math.nan
SHAPE = (32, 32, 32)
AFFINE = affine_for((1.0, 1.0, 1.0), "RAS", SHAPE)
BALL_MM3 = 33.0  # voxels (= mm^3) of a radius-2 mm ball on a 1 mm grid, counted above
SITES = [(8, 8, 8), (22, 8, 8), (8, 22, 8), (22, 22, 22)]  # >= 14 mm apart: never matched
RULES = ["cmbbench", "delpozo2024", "valdo2021", "dou2016", "wmh2017"]
SITUATIONS = ["empty_ref", "empty_pred", "both_empty"]


def build_case(scan_id: str, ref_sites: list[int], pred: list[tuple[int, float]] | None,
               rule: str = "cmbbench"):
    """Score one scan. ``ref_sites``: indices into SITES of reference balls (rater masks);
    ``pred``: (site index, probability) of predicted balls, ``[]`` for an all-zero map, or
    ``None`` for no prediction at all (a missing file scored as empty)."""
    labels = np.zeros(SHAPE, dtype=np.uint16)
    for n, s in enumerate(ref_sites, start=1):
        labels[sphere(SHAPE, SITES[s], 2.0)] = n
    lesions = lesions_from_labels(labels, AFFINE, scan_id=scan_id, mask_source="rater")
    prob = None
    if pred is not None:
        prob = np.zeros(SHAPE, dtype=np.float32)
        for s, p in pred:
            prob[sphere(SHAPE, SITES[s], 2.0)] = p
    return score_case(scan_id=scan_id, lesions=lesions, image_shape=SHAPE, image_affine=AFFINE,
                      rule=get_rule(rule), ref_labels=labels, prediction=prob)


def tables(cases) -> tuple[pd.DataFrame, pd.DataFrame]:
    parts = [c.table for c in cases if len(c.table)]
    table = pd.concat(parts, ignore_index=True) if parts else cases[0].table
    extra = pd.DataFrame([{"scan_id": c.scan_id, **c.extras} for c in cases])
    return table, scan_table(table, [c.scan_id for c in cases], extra=extra)


# One scan per situation (per-scan cells). Probabilities 0.875/0.75 (exact in float32) are
# above every preset's operating threshold (0.5), so both predicted balls are detections.
def per_scan_case(situation: str, rule: str, missing: bool = False):
    if situation == "empty_ref":
        return build_case("er", [], [(0, 0.875), (1, 0.75)], rule)
    if situation == "empty_pred":
        return build_case("ep", [2, 3], None if missing else [], rule)
    return build_case("be", [], None if missing else [], rule)


# --------------------------------------------------------------------------------------------
# Per-scan cells: metric -> (empty_ref, empty_pred, both_empty)
# The empty_ref scan has 2 predicted balls (0.875, 0.75) and no CMB; the empty_pred scan has 2
# CMBs (rater masks) and nothing predicted; the both_empty scan has neither.
# --------------------------------------------------------------------------------------------
PER_SCAN = {
    "n_ref": (0, 2, 0),
    "n_pred": (2, 0, 0),
    "tp": (0, 0, 0),
    "tp_pred": (0, 0, 0),
    "fp": (2, 0, 0),                 # both candidates are false alarms on a CMB-free scan
    "fn": (0, 2, 0),
    "precision": (0.0, NAN, NAN),    # 0/2 ; 0/0 ; 0/0
    "recall": (NAN, 0.0, NAN),       # 0/0 ; 0/2 ; 0/0
    "f1": (0.0, 0.0, NAN),           # one side empty -> 0 ; both empty -> NaN
    "count_diff": (2, -2, 0),        # n_pred - n_ref
    "abs_count_diff": (2, 2, 0),
    "max_score": (0.875, 0.0, 0.0),  # 0 without candidates
    "dice_scan": (0.0, 0.0, NAN),    # 2*0/(0+66) ; 2*0/(66+0) ; 0/0
    "volume_ref_mm3": (0.0, 2 * BALL_MM3, 0.0),
    "volume_pred_mm3": (2 * BALL_MM3, 0.0, 0.0),
}


def _same(actual: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("metric", list(PER_SCAN))
def test_per_scan_policy(metric, situation, rule):
    """Per-scan cell (metric, situation); the policy does not depend on the matching rule."""
    case = per_scan_case(situation, rule)
    _, scans = tables([case])
    expected = PER_SCAN[metric][SITUATIONS.index(situation)]
    actual = float(scans.loc[0, metric])
    assert _same(actual, expected), f"{metric} [{situation}, {rule}]: {actual} != {expected}"


@pytest.mark.parametrize("situation", ["empty_pred", "both_empty"])
@pytest.mark.parametrize("metric", list(PER_SCAN))
def test_per_scan_policy_missing_prediction_equals_empty_map(metric, situation):
    """No prediction at all (a missing file scored as empty) is the same cell as an all-zero
    map, Dice and volumes included (Dice 0 against CMBs, NaN when both are empty)."""
    case = per_scan_case(situation, "cmbbench", missing=True)
    _, scans = tables([case])
    expected = PER_SCAN[metric][SITUATIONS.index(situation)]
    actual = float(scans.loc[0, metric])
    assert _same(actual, expected), f"{metric} [{situation}, missing]: {actual} != {expected}"


# --------------------------------------------------------------------------------------------
# Pooled cells: ALL scans of the dataset are in the situation. Two scans each:
#   empty_ref : no CMB; 2 predicted balls (0.875, 0.75) and 1 predicted ball (0.625)
#   empty_pred: 2 CMBs + all-zero map, and 1 CMB + no prediction at all
#   both_empty: all-zero label map + all-zero map, and all-zero label map + no prediction
# --------------------------------------------------------------------------------------------
def pooled_dataset(situation: str):
    if situation == "empty_ref":
        return [build_case("r1", [], [(0, 0.875), (1, 0.75)]), build_case("r2", [], [(2, 0.625)])]
    if situation == "empty_pred":
        return [build_case("p1", [0, 1], []), build_case("p2", [2], None)]
    return [build_case("b1", [], []), build_case("b2", [], None)]


SENS = {f"sens_at_{f:g}_fp": (NAN, 0.0, NAN) for f in FROC_FP_RATES}

POOLED = {
    "n_scans": (2, 2, 2),
    "n_ref": (0, 3, 0),
    "n_pred": (3, 0, 0),
    "tp": (0, 0, 0),
    "fp": (3, 0, 0),
    "fn": (0, 3, 0),
    "n_scans_positive": (0, 2, 0),
    "precision_pooled": (0.0, NAN, NAN),   # 0/3 ; 0/0 ; 0/0
    "recall_pooled": (NAN, 0.0, NAN),      # 0/0 ; 0/3 ; 0/0
    "f1_pooled": (0.0, 0.0, NAN),
    "fp_per_scan": (1.5, 0.0, 0.0),        # 3 FP / 2 scans: negatives count in the denominator
    "fp_per_cmb": (NAN, 0.0, NAN),         # FP / #reference CMBs: undefined without CMBs
    "precision_mean": (0.0, NAN, NAN),     # per-scan values (0, 0) ; (NaN, NaN) ; (NaN, NaN)
    "precision_sd": (0.0, NAN, NAN),
    "precision_n": (2, 0, 0),              # number of scans where it is defined
    "recall_mean": (NAN, 0.0, NAN),
    "recall_sd": (NAN, 0.0, NAN),
    "recall_n": (0, 2, 0),
    "f1_mean": (0.0, 0.0, NAN),
    "f1_sd": (0.0, 0.0, NAN),
    "f1_n": (2, 2, 0),
    **SENS,                                # no lesion: sensitivity undefined; no hit: 0
    "cpm": (NAN, 0.0, NAN),
    "average_precision": (NAN, 0.0, NAN),
    # >=1 category: every empty_ref scan is a negative called positive (n_pred >= 1);
    # every empty_pred scan is a positive called negative; both_empty scans are true negatives.
    "scan_ge1_sensitivity": (NAN, 0.0, NAN),
    "scan_ge1_specificity": (0.0, NAN, 1.0),
    "scan_ge1_auroc": (NAN, NAN, NAN),     # one class only
    # >=3, >=5, >=11 categories: no scan has 3 CMBs (max 2) nor 3 candidates (max 2): every
    # scan is a true negative, so sensitivity and AUROC are undefined and specificity is 1
    **{f"scan_ge{k}_{m}": v for k in (3, 5, 11) for m, v in (
        ("sensitivity", (NAN, NAN, NAN)), ("specificity", (1.0, 1.0, 1.0)),
        ("auroc", (NAN, NAN, NAN)))},
    "count_mae": (1.5, 1.5, 0.0),          # |+2|,|+1| ; |-2|,|-1| ; 0,0
    "count_bias": (1.5, -1.5, 0.0),
    "abs_count_diff_median": (1.5, 1.5, 0.0),  # median of {1, 2} = 1.5 (np.median convention)
    "dice_pairs_mean": (NAN, NAN, NAN),    # no matched pair exists
    "dice_scan_mean": (0.0, 0.0, NAN),     # per-scan Dice (0, 0) ; (0, 0) ; (NaN, NaN)
    "dice_scan_sd": (0.0, 0.0, NAN),
    "dice_scan_n": (2, 2, 0),
}


@pytest.fixture(scope="module")
def pooled_results():
    out = {}
    for situation in SITUATIONS:
        table, scans = tables(pooled_dataset(situation))
        out[situation] = ScoreResult.from_tables(table, scans, get_rule("cmbbench"), n_boot=0)
    return out


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("metric", list(POOLED))
def test_pooled_policy(metric, situation, pooled_results):
    """Pooled cell (metric, situation) when every scan of the dataset is in the situation."""
    expected = POOLED[metric][SITUATIONS.index(situation)]
    actual = float(pooled_results[situation].aggregates[metric])
    assert _same(actual, expected), f"{metric} [all {situation}]: {actual} != {expected}"


def test_pooled_policy_covers_every_aggregate_key(pooled_results):
    """The policy table has a row for every key aggregate returns (none forgotten)."""
    keys = set(pooled_results["empty_ref"].aggregates)
    doc_rows = set(POOLED) | {"tp_pred", "ignored", "merged"}
    assert keys == doc_rows


# FROC curve cells: the whole curve when all scans are in the situation.
@pytest.mark.parametrize("situation", SITUATIONS)
def test_froc_curve_policy(situation, pooled_results):
    curve = pooled_results[situation].froc
    assert curve["threshold"].iloc[0] == math.inf  # the "nothing detected" point is always kept
    if situation == "empty_ref":
        # thresholds 0.875, 0.75, 0.625 (one FP each), 2 scans -> FP/scan 0, .5, 1, 1.5
        assert list(curve["threshold"]) == [math.inf, 0.875, 0.75, 0.625]
        assert list(curve["fp_per_scan"]) == [0.0, 0.5, 1.0, 1.5]
        assert curve["sensitivity"].isna().all()
        assert curve["precision"].iloc[0] != curve["precision"].iloc[0]  # NaN: nothing counted
        assert list(curve["precision"].iloc[1:]) == [0.0, 0.0, 0.0]
    elif situation == "empty_pred":
        # no candidate: only the +inf point, sensitivity 0 (3 lesions, none found)
        assert len(curve) == 1
        assert curve["sensitivity"].iloc[0] == 0.0 and curve["fp_per_scan"].iloc[0] == 0.0
    else:
        assert len(curve) == 1
        assert math.isnan(curve["sensitivity"].iloc[0]) and curve["fp_per_scan"].iloc[0] == 0.0


# --------------------------------------------------------------------------------------------
# How undefined per-scan cells enter the averages: they are skipped, never counted as 0 or 1.
# --------------------------------------------------------------------------------------------
def test_nan_cells_are_skipped_by_per_scan_means():
    cases = [
        build_case("hit", [0], [(0, 0.9)]),            # P = R = F1 = 1, Dice 1
        per_scan_case("empty_ref", "cmbbench"),        # P 0, R NaN, F1 0, Dice 0
        per_scan_case("empty_pred", "cmbbench"),       # P NaN, R 0, F1 0, Dice 0
        per_scan_case("both_empty", "cmbbench"),       # all NaN
    ]
    cases[1].scan_id, cases[2].scan_id, cases[3].scan_id = "er", "ep", "be"
    table, scans = tables(cases)
    agg = aggregate(prepare(table, scans), operating_threshold=0.5)
    # precision: (1, 0) over the 2 scans where it is defined
    assert agg["precision_mean"] == pytest.approx(0.5) and agg["precision_n"] == 2
    # recall: (1, 0)
    assert agg["recall_mean"] == pytest.approx(0.5) and agg["recall_n"] == 2
    # F1: (1, 0, 0); the both-empty scan is neither a 0 nor a 1
    assert agg["f1_mean"] == pytest.approx(1 / 3) and agg["f1_n"] == 3
    # Dice per scan: (1, 0, 0)
    assert agg["dice_scan_mean"] == pytest.approx(1 / 3) and agg["dice_scan_n"] == 3
    # pooled: TP 1, FP 2, FN 2, 4 scans, 3 CMBs
    assert agg["precision_pooled"] == pytest.approx(1 / 3)
    assert agg["recall_pooled"] == pytest.approx(1 / 3)
    assert agg["fp_per_scan"] == pytest.approx(2 / 4)
    assert agg["fp_per_cmb"] == pytest.approx(2 / 3)


def test_froc_of_mixed_dataset_counts_negative_scans_in_fp_per_scan():
    """FP/scan of the FROC divides by every scan, CMB-free and both-empty scans included."""
    cases = [build_case("hit", [0], [(0, 0.9)]), build_case("neg", [], [(1, 0.6)]),
             build_case("nil", [], [])]
    table, scans = tables(cases)
    curve = froc_curve(prepare(table, scans))
    # thresholds: +inf, 0.9 (hit), 0.6 (FP on the negative scan); 3 scans
    assert list(curve["sensitivity"]) == [0.0, 1.0, 1.0]
    assert list(curve["fp_per_scan"]) == pytest.approx([0.0, 0.0, 1 / 3])

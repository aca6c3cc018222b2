"""Metrics against hand-computed expectations (see docs/metrics.md for the definitions).

Most cases are point annotations matched with the default rule (world centroid distance
<= 5 mm, optimal one-to-one, duplicates FP): a candidate 1 mm from a lesion detects it, a
candidate 100+ mm away from everything is a false positive. Expected values are worked out by
hand in the comments, never copied from cmbbench's output.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmbbench.examples import affine_for
from cmbbench.harmonize import lesions_from_labels
from cmbbench.matching import MATCH_COLUMNS, get_rule, match_scan
from cmbbench.metrics import (
    COUNT_CATEGORIES,
    FROC_FP_RATES,
    aggregate,
    auroc,
    average_precision,
    froc_curve,
    prepare,
    scan_table,
    sensitivity_at,
)
from cmbbench.model import CANDIDATE_COLUMNS, LESION_COLUMNS
from cmbbench.scoring import ScoreResult, score_case
from cmbbench.statistics import bootstrap_ci

NAN = math.nan
RULE = get_rule("cmbbench")


# --------------------------------------------------------------------------------------------
# Helpers: point lesions and point candidates on one line (x axis, mm)
# --------------------------------------------------------------------------------------------
def lesion_frame(scan_id: str, xs: list[float]) -> pd.DataFrame:
    rows = [{"scan_id": scan_id, "lesion_id": n, "x_mm": x, "y_mm": 0.0, "z_mm": 0.0,
             "i": x, "j": 0.0, "k": 0.0, "diameter_mm": 3.0, "volume_mm3": NAN, "n_voxels": 0,
             "location": "unknown", "mask_source": "none"} for n, x in enumerate(xs, start=1)]
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


def cand_frame(scan_id: str, cands: list[tuple[float, float]]) -> pd.DataFrame:
    rows = [{"scan_id": scan_id, "candidate_id": n, "x_mm": x, "y_mm": 0.0, "z_mm": 0.0,
             "i": x, "j": 0.0, "k": 0.0, "score": s, "volume_mm3": NAN, "n_voxels": 0}
            for n, (x, s) in enumerate(cands, start=1)]
    return pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))


def far(n: int) -> float:
    """x of the n-th false-positive site: 1000 + 100 n mm, far from every lesion and each other."""
    return 1000.0 + 100.0 * n


def build(spec: dict[str, tuple[list[float], list[tuple[float, float]]]], rule=RULE):
    """spec: scan_id -> (lesion x positions, [(candidate x, score)]). Returns (table, scans)."""
    parts = [match_scan(lesion_frame(s, les), cand_frame(s, cands), rule, scan_id=s)
             for s, (les, cands) in spec.items()]
    parts = [p for p in parts if len(p)]
    table = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame(columns=list(MATCH_COLUMNS)))
    return table, scan_table(table, list(spec))


def agg(spec, rule=RULE, weights=None):
    table, scans = build(spec, rule)
    return aggregate(prepare(table, scans), operating_threshold=rule.operating_threshold,
                     weights=weights)


# --------------------------------------------------------------------------------------------
# A 5-scan dataset covering every situation
#   A: 2 CMBs (x=0, 20); TP at 0.9 on x=0, FP at 0.6           -> P .5, R .5, F1 .5
#   B: 1 CMB; TP at 0.8                                        -> P 1,  R 1,  F1 1
#   C: no CMB; FPs at 0.7 and 0.55                             -> P 0,  R NaN, F1 0
#   D: no CMB, no candidate                                    -> P NaN, R NaN, F1 NaN
#   E: 3 CMBs, no candidate                                    -> P NaN, R 0, F1 0
# --------------------------------------------------------------------------------------------
FIVE = {
    "A": ([0.0, 20.0], [(1.0, 0.9), (far(1), 0.6)]),
    "B": ([0.0], [(1.0, 0.8)]),
    "C": ([], [(far(1), 0.7), (far(2), 0.55)]),
    "D": ([], []),
    "E": ([0.0, 20.0, 40.0], []),
}


def test_per_scan_precision_recall_f1():
    _, scans = build(FIVE)
    s = scans.set_index("scan_id")
    assert list(s["tp"]) == [1, 1, 0, 0, 0]
    assert list(s["fp"]) == [1, 0, 2, 0, 0]
    assert list(s["fn"]) == [1, 0, 0, 0, 3]
    np.testing.assert_allclose(s["precision"], [0.5, 1.0, 0.0, NAN, NAN])
    np.testing.assert_allclose(s["recall"], [0.5, 1.0, NAN, NAN, 0.0])
    np.testing.assert_allclose(s["f1"], [0.5, 1.0, 0.0, NAN, 0.0])
    np.testing.assert_array_equal(s["count_diff"], [0, 0, 2, 0, -3])
    np.testing.assert_allclose(s["max_score"], [0.9, 0.8, 0.7, 0.0, 0.0])


def test_per_scan_mean_and_sample_sd_skip_nan():
    a = agg(FIVE)
    # precision over A, B, C = (.5, 1, 0): mean .5; deviations (0, .5, -.5) -> SS .5 / (3-1)
    assert a["precision_mean"] == pytest.approx(0.5)
    assert a["precision_sd"] == pytest.approx(math.sqrt(0.25))
    assert a["precision_n"] == 3
    # recall over A, B, E = (.5, 1, 0): same numbers
    assert a["recall_mean"] == pytest.approx(0.5)
    assert a["recall_sd"] == pytest.approx(0.5)
    assert a["recall_n"] == 3
    # F1 over A, B, C, E = (.5, 1, 0, 0): mean .375; SS = .125^2+.625^2+.375^2+.375^2 = .6875
    assert a["f1_mean"] == pytest.approx(0.375)
    assert a["f1_sd"] == pytest.approx(math.sqrt(0.6875 / 3))
    assert a["f1_n"] == 4


def test_pooled_metrics():
    a = agg(FIVE)
    # TP 2 (A, B), FP 3 (A 1, C 2), FN 4 (A 1, E 3); 6 CMBs, 5 scans, 3 with CMBs
    assert (a["tp"], a["fp"], a["fn"], a["n_ref"], a["n_scans"]) == (2, 3, 4, 6, 5)
    assert a["n_pred"] == 5 and a["n_scans_positive"] == 3
    assert a["precision_pooled"] == pytest.approx(2 / 5)
    assert a["recall_pooled"] == pytest.approx(2 / 6)
    assert a["f1_pooled"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 4))  # 2TP / (2TP + FP + FN)
    # FP per scan over ALL 5 scans (negatives C and D included) = 3/5; dividing by the 3
    # positive scans only (the poster's FPavg) would give 1.0
    assert a["fp_per_scan"] == pytest.approx(3 / 5)
    assert a["fp_per_cmb"] == pytest.approx(3 / 6)


def test_count_agreement():
    a = agg(FIVE)
    # count differences n_pred - n_ref: A 0, B 0, C +2, D 0, E -3
    assert a["count_mae"] == pytest.approx(5 / 5)
    assert a["count_bias"] == pytest.approx(-1 / 5)
    assert a["abs_count_diff_median"] == 0.0  # median of (0, 0, 2, 0, 3)


def test_count_median_averages_the_two_middle_values():
    # |count diff| = (1, 2, 3, 4) -> median 2.5 (as np.median), not the lower median 2
    spec = {f"s{n}": ([], [(far(m), 0.9) for m in range(n)]) for n in (1, 2, 3, 4)}
    assert agg(spec)["abs_count_diff_median"] == 2.5


def test_scan_level_ge1_and_ge3():
    a = agg(FIVE)
    # >=1: positives A, B, E; negatives C, D. Called positive (n_pred >= 1): A, B, C.
    assert a["scan_ge1_sensitivity"] == pytest.approx(2 / 3)  # A, B of A, B, E
    assert a["scan_ge1_specificity"] == pytest.approx(1 / 2)  # D of C, D
    # AUROC on the highest score: pos (A .9, B .8, E 0) vs neg (C .7, D 0):
    # A>C, A>D, B>C, B>D = 4; E<C = 0; E=D tie = .5 -> 4.5 / 6
    assert a["scan_ge1_auroc"] == pytest.approx(0.75)
    # >=3: only E is positive, and no scan has 3 detections
    assert a["scan_ge3_sensitivity"] == 0.0
    assert a["scan_ge3_specificity"] == 1.0
    # 3rd highest score is 0 for every scan (none has 3 candidates): all tied -> 0.5
    assert a["scan_ge3_auroc"] == pytest.approx(0.5)
    # >=5, >=11: no positive scan
    for k in (5, 11):
        assert math.isnan(a[f"scan_ge{k}_sensitivity"])
        assert a[f"scan_ge{k}_specificity"] == 1.0
        assert math.isnan(a[f"scan_ge{k}_auroc"])


def test_scan_level_uses_kth_highest_score_and_operating_threshold():
    spec = {
        # 3 CMBs, 3 TPs (.9 .8 .7): 3rd score .7, 3 detections >= .5 -> called >=3
        "P1": ([0.0, 20.0, 40.0], [(1.0, 0.9), (21.0, 0.8), (41.0, 0.7)]),
        # 4 CMBs, 2 TPs (.95 .6): 3rd score 0, 2 detections -> not called
        "P2": ([0.0, 20.0, 40.0, 60.0], [(1.0, 0.95), (21.0, 0.6)]),
        # 1 CMB, TP .99 + FPs .98 and .3 (below the 0.5 operating threshold): 3rd score .3,
        # 2 detections at the operating point -> not called
        "N1": ([0.0], [(1.0, 0.99), (far(1), 0.98), (far(2), 0.3)]),
        "N2": ([], []),
    }
    a = agg(spec)
    # >=3: positives P1, P2; negatives N1, N2
    assert a["scan_ge3_sensitivity"] == pytest.approx(1 / 2)
    assert a["scan_ge3_specificity"] == 1.0
    # AUROC with the 3rd score: P1 .7 > N1 .3, P1 .7 > N2 0, P2 0 < N1 .3, P2 0 = N2 0
    # -> (1 + 1 + 0 + .5) / 4. (The top score would give (0 + 1 + 0 + 1) / 4 = .5.)
    assert a["scan_ge3_auroc"] == pytest.approx(0.625)
    # n_pred counts only candidates at or above the operating threshold
    _, scans = build(spec)
    assert list(scans["n_pred"]) == [3, 2, 2, 0]


# --------------------------------------------------------------------------------------------
# The poster's DOU numbers (logged counts: TP 51, FP 10, FN 23, 20 scans, 74 CMBs)
# --------------------------------------------------------------------------------------------
DOU_N_REF = [1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 5, 6, 6, 6, 6]
DOU_FN = [0, 1, 0, 1, 1, 1, 0, 1, 2, 1, 1, 2, 1, 1, 2, 1, 2, 2, 2, 1]
DOU_FP = [1, 0, 0, 1, 0, 2, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 2, 0, 1, 0]


def dou_spec() -> dict:
    spec = {}
    for n, (n_ref, fn, fp) in enumerate(zip(DOU_N_REF, DOU_FN, DOU_FP), start=1):
        xs = [20.0 * m for m in range(n_ref)]
        hits = [(x + 1.0, 0.9) for x in xs[: n_ref - fn]]  # the first n_ref - fn are detected
        fps = [(far(m), 0.8) for m in range(fp)]
        spec[f"{n:02d}"] = (xs, hits + fps)
    return spec


def test_dou_poster_numbers_from_logged_counts():
    assert (len(DOU_N_REF), sum(DOU_N_REF), sum(DOU_FN), sum(DOU_FP)) == (20, 74, 23, 10)
    a = agg(dou_spec())
    assert (a["tp"], a["fp"], a["fn"], a["n_scans"], a["n_ref"]) == (51, 10, 23, 20, 74)
    # P = 51/61 = .83607, R = 51/74 = .68919, F1 = 102/135 = .75556
    assert round(a["precision_pooled"], 3) == 0.836
    assert round(a["recall_pooled"], 3) == 0.689
    assert round(a["f1_pooled"], 3) == 0.756
    # FP per scan = 10/20 = .50; FP per reference CMB = 10/74 = .1351 (printed "0.13" as
    # "FPscan" on the poster); the two are different quantities
    assert a["fp_per_scan"] == pytest.approx(0.50)
    assert round(a["fp_per_cmb"], 3) == 0.135
    assert a["fp_per_scan"] != pytest.approx(a["fp_per_cmb"], abs=0.1)


# --------------------------------------------------------------------------------------------
# FROC, sensitivity at FP rates, CPM, AP
#   scan s1: CMBs at 0, 20, 40. TP .9 on x=0; TP .6 on x=20; x=40 never found;
#            FP .8; FP .6 (tied with the TP on x=20)
#   scan s2: CMB at 0. TP .3 on it; FP .9 (tied with s1's TP); FP .2
#   4 CMBs, 2 scans.
# Operating points (threshold: cumulative TP, FP -> sensitivity, FP/scan, precision):
#   +inf: 0, 0 -> 0,   0,   NaN
#   .9  : 1, 1 -> .25, .5,  1/2
#   .8  : 1, 2 -> .25, 1.0, 1/3
#   .6  : 2, 3 -> .5,  1.5, 2/5
#   .3  : 3, 3 -> .75, 1.5, 3/6
#   .2  : 3, 4 -> .75, 2.0, 3/7
# --------------------------------------------------------------------------------------------
FROC_SPEC = {
    "s1": ([0.0, 20.0, 40.0], [(1.0, 0.9), (21.0, 0.6), (far(1), 0.8), (far(2), 0.6)]),
    "s2": ([0.0], [(1.0, 0.3), (far(1), 0.9), (far(2), 0.2)]),
}


def froc_of(spec):
    table, scans = build(spec)
    return froc_curve(prepare(table, scans))


def test_froc_keeps_every_operating_point_with_ties():
    c = froc_of(FROC_SPEC)
    assert list(c["threshold"]) == [math.inf, 0.9, 0.8, 0.6, 0.3, 0.2]
    assert list(c["tp"]) == [0, 1, 1, 2, 3, 3]
    assert list(c["fp"]) == [0, 1, 2, 3, 3, 4]
    np.testing.assert_allclose(c["sensitivity"], [0, .25, .25, .5, .75, .75])
    np.testing.assert_allclose(c["fp_per_scan"], [0, .5, 1.0, 1.5, 1.5, 2.0])
    np.testing.assert_allclose(c["precision"], [NAN, 1 / 2, 1 / 3, 2 / 5, 3 / 6, 3 / 7])


def test_sensitivity_at_step_rule_no_interpolation():
    c = froc_of(FROC_SPEC)
    # highest sensitivity among points with FP/scan <= rate
    expected = {0.125: 0.0, 0.25: 0.0,  # only +inf qualifies (interpolation would give .125)
                0.5: 0.25, 1.0: 0.25,
                2.0: 0.75, 4.0: 0.75, 8.0: 0.75}  # constant beyond the curve's end (2 FP/scan)
    for rate, sens in expected.items():
        assert sensitivity_at(c, rate) == pytest.approx(sens), rate
    # between operating points: at 1.4 FP/scan only the 1.0 point qualifies
    assert sensitivity_at(c, 1.4) == pytest.approx(0.25)
    assert sensitivity_at(c, 1.5) == pytest.approx(0.75)  # (1.5, .75) beats (1.5, .5)


def test_cpm_and_named_sensitivities():
    a = agg(FROC_SPEC)
    sens = [0.0, 0.0, 0.25, 0.25, 0.75, 0.75, 0.75]
    for f, s in zip(FROC_FP_RATES, sens):
        assert a[f"sens_at_{f:g}_fp"] == pytest.approx(s)
    assert a["cpm"] == pytest.approx(2.75 / 7)


def test_average_precision_hand_computed():
    # sum over operating points of (R_n - R_{n-1}) * P_n:
    # .9: .25 * 1/2; .8: 0; .6: .25 * 2/5; .3: .25 * 1/2; .2: 0  -> .125 + .1 + .125
    assert average_precision(froc_of(FROC_SPEC)) == pytest.approx(0.35)
    assert agg(FROC_SPEC)["average_precision"] == pytest.approx(0.35)


def test_average_precision_matches_sklearn_when_every_lesion_is_found():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    # drop the never-found CMB at x=40 so every lesion has exactly one TP candidate; then the
    # lesion PR curve equals the candidate PR curve of sklearn (labels: TP=1, FP=0)
    spec = {"s1": ([0.0, 20.0], FROC_SPEC["s1"][1]), "s2": FROC_SPEC["s2"]}
    ours = average_precision(froc_of(spec))
    scores = [0.9, 0.6, 0.8, 0.6, 0.3, 0.9, 0.2]
    labels = [1, 1, 0, 0, 1, 0, 0]
    # by hand: .9: R 1/3, P 1/2; .8: no gain; .6: R 2/3, P 2/5; .3: R 1, P 3/6; .2: no gain
    hand = (1 / 3) * (1 / 2) + (1 / 3) * (2 / 5) + (1 / 3) * (3 / 6)
    assert ours == pytest.approx(hand)
    assert ours == pytest.approx(sklearn_metrics.average_precision_score(labels, scores))


def test_average_precision_without_detections_and_without_lesions():
    assert average_precision(froc_of({"s": ([0.0], [])})) == 0.0
    assert math.isnan(average_precision(froc_of({"s": ([], [(far(1), 0.9)])})))


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
def test_auroc_hand_computed_with_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 1, 0, 0], dtype=bool)
    # pos (.9, .5, .5) vs neg (.5, .1): .9 beats both (2); each .5 ties .5 (.5) and beats .1 (1)
    # -> (2 + 1.5 + 1.5) / 6
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert auroc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_auroc_weights_equal_duplication_and_one_class_is_nan():
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0], dtype=bool)
    w = np.array([1, 2, 3, 1])
    dup_s, dup_l = np.repeat(scores, w), np.repeat(labels, w)
    # pos (.9, .5, .5) vs neg (.5, .5, .5, .1): .9 -> 4; each .5 -> 3*.5 + 1 = 2.5 -> 9 / 12
    assert auroc(scores, labels, w) == pytest.approx(9 / 12)
    assert auroc(dup_s, dup_l) == pytest.approx(9 / 12)
    assert math.isnan(auroc(scores, np.ones(4, dtype=bool)))


# --------------------------------------------------------------------------------------------
# Weights and the bootstrap
# --------------------------------------------------------------------------------------------
def test_integer_weights_equal_explicit_duplication():
    weights = {"A": 2, "B": 0, "C": 1, "D": 3, "E": 1}
    weighted = agg(FIVE, weights=np.array([weights[s] for s in FIVE], dtype=float))
    dup = {f"{s}_{m}": FIVE[s] for s, w in weights.items() for m in range(w)}
    explicit = agg(dup)
    assert set(weighted) == set(explicit)
    for key in explicit:
        assert weighted[key] == pytest.approx(explicit[key], nan_ok=True), key


def test_bootstrap_reproducible_and_seed_dependent():
    table, scans = build(dou_spec())
    prep = prepare(table, scans)
    a = bootstrap_ci(prep, operating_threshold=0.5, n_boot=200, seed=7)
    b = bootstrap_ci(prep, operating_threshold=0.5, n_boot=200, seed=7)
    c = bootstrap_ci(prep, operating_threshold=0.5, n_boot=200, seed=8)
    assert (a.seed, a.n_boot, a.confidence) == (7, 200, 0.95)
    np.testing.assert_equal(a.lower, b.lower)  # identical, NaN cells included
    np.testing.assert_equal(a.upper, b.upper)
    keys = ["recall_pooled", "precision_pooled", "f1_pooled", "fp_per_scan"]
    assert any((a.lower[k], a.upper[k]) != (c.lower[k], c.upper[k]) for k in keys)
    point = aggregate(prep, operating_threshold=0.5)
    for k in keys:
        assert a.lower[k] <= point[k] <= a.upper[k], k
        assert a.lower[k] < a.upper[k], k  # the scans differ: a real interval
    # scans are resampled, so the scan count never varies
    assert a.lower["n_scans"] == a.upper["n_scans"] == 20


def test_bootstrap_of_identical_scans_is_degenerate():
    # every scan: 2 CMBs, 1 found, 1 FP -> every replicate has recall .5 and FP/scan 1
    spec = {f"s{n}": ([0.0, 20.0], [(1.0, 0.9), (far(1), 0.7)]) for n in range(6)}
    table, scans = build(spec)
    ci = bootstrap_ci(prepare(table, scans), operating_threshold=0.5, n_boot=50, seed=0)
    assert ci.lower["recall_pooled"] == ci.upper["recall_pooled"] == pytest.approx(0.5)
    assert ci.lower["fp_per_scan"] == ci.upper["fp_per_scan"] == pytest.approx(1.0)


def test_score_result_records_bootstrap_recipe():
    table, scans = build(dou_spec())
    res = ScoreResult.from_tables(table, scans, RULE, n_boot=30, seed=3)
    d = res.to_json_dict()
    assert (d["ci"]["n_boot"], d["ci"]["seed"], d["ci"]["confidence"]) == (30, 3, 0.95)


# --------------------------------------------------------------------------------------------
# Consistency: FROC at the operating threshold equals the main table (one-to-one rules)
# --------------------------------------------------------------------------------------------
def froc_row_at(curve: pd.DataFrame, threshold: float) -> pd.Series:
    """The operating point whose candidates are exactly those with score >= threshold."""
    return curve[curve["threshold"] >= threshold].iloc[-1]


@pytest.mark.parametrize("assignment,expected_recall", [("optimal", 1.0),
                                                        ("greedy_confidence", 0.5)])
def test_froc_at_operating_threshold_equals_pooled_recall(assignment, expected_recall):
    # CMBs at 0 and 6 mm. c1 (.9) at 2.5 mm: 2.5 from L1, 3.5 from L2; c2 (.6) at -2: only L1
    # (8 mm from L2); c3 (.4, below the operating threshold) at 10: only L2.
    # optimal: c2-L1, c1-L2 -> recall 1. greedy_confidence: c1 takes its closest L1, c2 has
    # no free lesion -> FP, recall .5.
    rule = get_rule("cmbbench", assignment=assignment)
    spec = {"s": ([0.0, 6.0], [(2.5, 0.9), (-2.0, 0.6), (10.0, 0.4)])}
    table, scans = build(spec, rule)
    prep = prepare(table, scans)
    a = aggregate(prep, operating_threshold=0.5)
    assert a["recall_pooled"] == pytest.approx(expected_recall)
    row = froc_row_at(froc_curve(prep), 0.5)
    assert row["threshold"] == 0.6
    assert row["sensitivity"] == pytest.approx(a["recall_pooled"])
    assert row["fp_per_scan"] == pytest.approx(a["fp_per_scan"])


@settings(max_examples=60, deadline=None)
@given(
    scans=st.lists(st.tuples(
        st.lists(st.integers(0, 12), max_size=4),
        st.lists(st.tuples(st.integers(-3, 15), st.sampled_from([0.2, 0.5, 0.7, 0.9])),
                 max_size=5)), min_size=1, max_size=3),
    assignment=st.sampled_from(["optimal", "greedy_confidence"]),
    duplicates=st.sampled_from(["fp", "ignore"]),
)
def test_froc_at_operating_threshold_equals_main_table_property(scans, assignment, duplicates):
    rule = get_rule("cmbbench", assignment=assignment, duplicates=duplicates)
    spec = {f"s{n}": ([float(x) for x in les], [(float(x), s) for x, s in cands])
            for n, (les, cands) in enumerate(scans)}
    table, sc = build(spec, rule)
    prep = prepare(table, sc)
    a = aggregate(prep, operating_threshold=0.5)
    row = froc_row_at(froc_curve(prep), 0.5)
    if a["n_ref"]:
        assert row["sensitivity"] == pytest.approx(a["recall_pooled"])
    assert row["fp_per_scan"] == pytest.approx(a["fp_per_scan"])
    assert row["precision"] == pytest.approx(a["precision_pooled"], nan_ok=True)


# --------------------------------------------------------------------------------------------
# Dice: matched pairs (rater masks only) and per scan
# --------------------------------------------------------------------------------------------
SHAPE = (24, 24, 24)
AFFINE = affine_for((1.0, 1.0, 1.0), "RAS", SHAPE)


def cube_case(scan_id: str, cubes: list[tuple[int, int]], mask_source: str = "rater"):
    """cubes: (reference start, predicted start) along i of 2x2x2 cubes at j, k = 4:6, placed
    at i-offsets; a shift of 1 voxel leaves 4 of 8 voxels shared -> pair Dice 2*4/16 = .5."""
    labels = np.zeros(SHAPE, dtype=np.uint16)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    for n, (r, p) in enumerate(cubes, start=1):
        labels[r:r + 2, 4:6, 4:6] = n
        pred[p:p + 2, 4:6, 4:6] = 1
    lesions = lesions_from_labels(labels, AFFINE, scan_id=scan_id, mask_source=mask_source)
    return score_case(scan_id=scan_id, lesions=lesions, image_shape=SHAPE, image_affine=AFFINE,
                      rule=RULE, ref_labels=labels, prediction=pred)


def dice_aggregates(cases):
    table = pd.concat([c.table for c in cases], ignore_index=True)
    extra = pd.DataFrame([{"scan_id": c.scan_id, **c.extras} for c in cases])
    scans = scan_table(table, [c.scan_id for c in cases], extra=extra)
    return scans, aggregate(prepare(table, scans), operating_threshold=0.5)


def test_dice_pairs_pooled_over_pairs_and_dice_per_scan():
    x = cube_case("X", [(2, 2), (10, 10)])  # two exact pairs: Dice 1, 1; scan Dice 1
    y = cube_case("Y", [(2, 3)])            # shifted by 1 voxel: pair Dice .5; scan Dice .5
    scans, a = dice_aggregates([x, y])
    assert list(scans["dice_scan"]) == pytest.approx([1.0, 0.5])
    assert a["dice_pairs_mean"] == pytest.approx((1 + 1 + 0.5) / 3)  # per pair
    assert a["dice_scan_mean"] == pytest.approx((1 + 0.5) / 2)       # per scan
    assert a["dice_scan_sd"] == pytest.approx(math.sqrt(2 * 0.25 ** 2 / 1))
    assert a["dice_scan_n"] == 2


def test_dice_never_uses_derived_masks():
    y = cube_case("Y", [(2, 3)], mask_source="derived")
    scans, a = dice_aggregates([y])
    assert a["tp"] == 1  # the pair matches (1 mm apart) ...
    assert math.isnan(a["dice_pairs_mean"])  # ... but a derived mask gives no Dice
    assert math.isnan(scans.loc[0, "dice_scan"]) and math.isnan(a["dice_scan_mean"])


def test_count_categories_constant():
    assert COUNT_CATEGORIES == (1, 3, 5, 11)
    assert FROC_FP_RATES == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

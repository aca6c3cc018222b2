"""Matching rules on spheres placed on purpose, with hand-computed expectations per preset.

Grid: 40^3 voxels of 1 mm unless stated. Each case lists, per preset, the expected counts:
tp (detected lesions), fn, tp_pred (correct candidates), fp, ignored, merged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_case, outcome_counts

from cmbbench.errors import ConfigurationError
from cmbbench.matching import PRESETS, get_rule, match_scan
from cmbbench.model import CANDIDATE_COLUMNS

PRESET_NAMES = ["cmbbench", "delpozo2024", "valdo2021", "dou2016", "wmh2017"]


def C(tp=0, fn=0, tp_pred=None, fp=0, ignored=0, merged=0):
    return {"tp": tp, "fn": fn, "tp_pred": tp if tp_pred is None else tp_pred, "fp": fp,
            "ignored": ignored, "merged": merged}


CASES = {
    # one sphere r=2 mm predicted exactly
    "exact_hit": (
        [((10, 10, 10), 2.0)], [((10, 10, 10), 2.0, 0.9)],
        {p: C(tp=1) for p in PRESET_NAMES},
    ),
    # shifted by one voxel (1 mm): overlaps, 1 mm away
    "shift_1_voxel": (
        [((10, 10, 10), 2.0)], [((11, 10, 10), 2.0, 0.9)],
        {p: C(tp=1) for p in PRESET_NAMES},
    ),
    # one r=3 lesion, two separate r=1 predictions inside it (4 voxels apart), scores .9/.8
    "split": (
        [((20, 20, 20), 3.0)], [((18, 20, 20), 1.0, 0.9), ((22, 20, 20), 1.0, 0.8)],
        {
            "cmbbench": C(tp=1, fp=1),             # second one is a duplicate -> FP
            "delpozo2024": C(tp=1, ignored=1),     # second hit on the same CMB is ignored
            "valdo2021": C(tp=1, fp=1),            # closest wins, rest FP
            "dou2016": C(tp=1, merged=1),          # merged: 4 voxels < 10
            "wmh2017": C(tp=1, tp_pred=2),         # both touch the lesion
        },
    ),
    # two r=1.5 lesions 4 mm apart covered by one prediction (union of two r=2 balls)
    "merge": (
        [((10, 30, 10), 1.5), ((14, 30, 10), 1.5)],
        [((10, 30, 10), 2.0, 0.9), ((14, 30, 10), 2.0, 0.9)],
        {
            "cmbbench": C(tp=1, fn=1),
            "delpozo2024": C(tp=1, fn=1),
            "valdo2021": C(tp=1, fn=1),
            "dou2016": C(tp=1, fn=1),
            "wmh2017": C(tp=2, tp_pred=1),         # no one-to-one: both lesions count found
        },
    ),
    # a second, non-overlapping detection 4 mm from a hit lesion
    "duplicate_near": (
        [((30, 10, 30), 2.0)], [((30, 10, 30), 1.5, 0.9), ((30, 14, 30), 1.0, 0.7)],
        {
            "cmbbench": C(tp=1, fp=1),             # within 5 mm but lesion taken: duplicate FP
            "delpozo2024": C(tp=1, fp=1),          # no overlap -> plain FP, not ignored
            "valdo2021": C(tp=1, fp=1),
            "dou2016": C(tp=1, merged=1),
            "wmh2017": C(tp=1, fp=1),
        },
    ),
    # prediction 7 mm away: a miss for every rule except Dou's 10-voxel radius
    "far_miss_7mm": (
        [((10, 10, 25), 1.5)], [((10, 10, 32), 1.5, 0.9)],
        {
            "cmbbench": C(fn=1, fp=1),
            "delpozo2024": C(fn=1, fp=1),
            "valdo2021": C(fn=1, fp=1),
            "dou2016": C(tp=1),
            "wmh2017": C(fn=1, fp=1),
        },
    ),
    # prediction 12 mm away: a miss for every rule
    "far_miss_12mm": (
        [((10, 10, 14), 1.5)], [((10, 10, 26), 1.5, 0.9)],
        {p: C(fn=1, fp=1) for p in PRESET_NAMES},
    ),
    "both_empty": ([], [], {p: C() for p in PRESET_NAMES}),
    "reference_empty": ([], [((20, 20, 20), 1.5, 0.8)], {p: C(fp=1) for p in PRESET_NAMES}),
    "prediction_empty": ([((20, 20, 20), 1.5)], [], {p: C(fn=1) for p in PRESET_NAMES}),
    # below the operating threshold (0.5): not a detection at the operating point
    "below_threshold": (
        [((20, 20, 20), 2.0)], [((20, 20, 20), 2.0, 0.3)],
        {"cmbbench": C(fn=1), "delpozo2024": C(fn=1), "valdo2021": C(fn=1),
         "dou2016": C(fn=1), "wmh2017": C(fn=1)},
    ),
}


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_preset_on_case(case_name: str, preset: str) -> None:
    refs, preds, expected = CASES[case_name]
    case = make_case(refs, preds)
    assert case.counts(preset) == expected[preset]


def test_below_floor_prediction_is_not_even_a_candidate() -> None:
    # floor 0.1 (cmbbench) keeps a 0.3 blob as a below-threshold candidate; floor 0.5
    # (valdo2021) does not extract it at all.
    case = make_case([((20, 20, 20), 2.0)], [((20, 20, 20), 2.0, 0.3)])
    t = case.score("cmbbench")
    assert list(t.loc[t["kind"] == "candidate", "outcome"]) == ["below_threshold"]
    assert (case.score("valdo2021")["kind"] == "candidate").sum() == 0


def test_optimal_beats_greedy_when_closest_pair_blocks() -> None:
    # Lesions A at x=10, B at x=14 (voxel = mm). P1 at x=11 is 1 mm from A and 3 mm from B;
    # P2 at x=7 is 3 mm from A and 7 mm from B (out of range).
    # Greedy by distance takes P1-A first, then P2 has nothing: 1 TP, 1 FN, 1 duplicate FP.
    # Optimal one-to-one maximises matches: P1-B and P2-A: 2 TP.
    case = make_case([((10, 20, 20), 1.0), ((14, 20, 20), 1.0)],
                     [((11, 20, 20), 0.5, 0.9), ((7, 20, 20), 0.5, 0.8)])
    assert case.counts("cmbbench") == C(tp=2)
    assert case.counts("valdo2021") == C(tp=1, fn=1, fp=1)
    assert case.counts("cmbbench", assignment="greedy_confidence") == C(tp=1, fn=1, fp=1)
    table = case.score("cmbbench")
    ref = table[table["kind"] == "reference"].set_index("lesion_id")
    # lesion 1 (A, x=10) is matched to the candidate at x=7, lesion 2 (B) to the one at x=11
    assert ref.loc[1, "distance_mm"] == pytest.approx(3.0)
    assert ref.loc[2, "distance_mm"] == pytest.approx(3.0)


def test_optimal_minimises_distance_among_maximum_matchings() -> None:
    # One lesion, two candidates within 5 mm at 4 mm (score .9) and 1 mm (score .6):
    # one match either way; optimal picks the closer one, the other is a duplicate FP.
    case = make_case([((20, 20, 20), 1.0)],
                     [((24, 20, 20), 0.5, 0.9), ((21, 20, 20), 0.5, 0.6)])
    t = case.score("cmbbench")
    ref = t[t["kind"] == "reference"].iloc[0]
    assert ref["distance_mm"] == pytest.approx(1.0)
    assert ref["score"] == pytest.approx(0.6)
    cand = t[t["kind"] == "candidate"]
    assert cand.loc[cand["score"].round(3) == 0.9, "outcome"].tolist() == ["FP"]
    # the threshold sweep credits the lesion at 0.9 (it is detected at any threshold <= 0.9)
    assert ref["hit_score"] == pytest.approx(0.9, abs=1e-6)


def test_sweep_keeps_lesions_found_and_counts_maximal() -> None:
    # Same geometry as the optimal/greedy case, P1 scored 0.9, P2 scored 0.3.
    # At threshold 0.9 only P1 exists: one lesion found (A, the closer). At 0.3 the
    # augmenting path P2->A->P1->B gives two. Hit scores: A=0.9, B=0.3.
    case = make_case([((10, 20, 20), 1.0), ((14, 20, 20), 1.0)],
                     [((11, 20, 20), 0.5, 0.9), ((7, 20, 20), 0.5, 0.3)])
    t = case.score("cmbbench")
    ref = t[t["kind"] == "reference"].set_index("lesion_id")
    assert ref.loc[1, "hit_score"] == pytest.approx(0.9, abs=1e-6)
    assert ref.loc[2, "hit_score"] == pytest.approx(0.3, abs=1e-6)
    # operating point 0.5: only P1 counts -> 1 TP; at 0.3 both
    assert outcome_counts(t)["tp"] == 1
    assert case.counts("cmbbench", operating_threshold=0.3)["tp"] == 2


def test_distance_rule_is_inclusive_and_strict_option() -> None:
    # centroids exactly 5 mm apart: matched by "<= 5 mm", not by a strict rule
    case = make_case([((20, 20, 15), 1.0)], [((20, 20, 20), 1.0, 0.9)])
    assert case.counts("cmbbench")["tp"] == 1
    assert case.counts("cmbbench", strict=True)["tp"] == 0


def test_anisotropic_voxels_distance_in_mm_vs_voxels() -> None:
    # 0.5 x 0.5 x 3 mm voxels. A prediction one slice away is 3 mm away (match); two slices
    # away is 6 mm (no match for the mm rule) but only 2 voxels (match for dou2016's 10 voxels).
    sp = (0.5, 0.5, 3.0)
    one = make_case([((20, 20, 5), 1.5)], [((20, 20, 6), 1.5, 0.9)], shape=(40, 40, 12),
                    spacing=sp)
    two = make_case([((20, 20, 5), 1.5)], [((20, 20, 7), 1.5, 0.9)], shape=(40, 40, 12),
                    spacing=sp)
    assert one.counts("cmbbench") == C(tp=1)
    assert two.counts("cmbbench") == C(fn=1, fp=1)
    assert two.counts("dou2016") == C(tp=1)
    t = two.score("cmbbench")
    cand = t[t["kind"] == "candidate"].iloc[0]
    ref = t[t["kind"] == "reference"].iloc[0]
    d = np.linalg.norm(cand[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
                       - ref[["x_mm", "y_mm", "z_mm"]].to_numpy(float))
    assert d == pytest.approx(6.0)


@pytest.mark.parametrize("orientation", ["LPS", "LAS", "RPI", "ASL"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_non_ras_affines_give_same_counts(orientation: str, preset: str) -> None:
    refs = [((10, 10, 10), 2.0), ((25, 25, 20), 1.5), ((30, 12, 30), 2.0)]
    preds = [((11, 10, 10), 2.0, 0.9), ((25, 29, 20), 1.5, 0.8), ((5, 35, 5), 1.0, 0.7)]
    ras = make_case(refs, preds, spacing=(0.8, 0.8, 1.5))
    other = make_case(refs, preds, spacing=(0.8, 0.8, 1.5), orientation=orientation)
    assert other.counts(preset) == ras.counts(preset)
    # world coordinates differ (axes flipped/permuted) but distances do not
    a = ras.score(preset)
    b = other.score(preset)
    np.testing.assert_allclose(a["distance_mm"].to_numpy(float), b["distance_mm"].to_numpy(float),
                               equal_nan=True)


def test_world_centroid_through_lps_affine() -> None:
    # LPS grid with 2 mm voxels: index i grows to the Left, so x_mm = -(2*i) + offset
    case = make_case([((5, 5, 5), 2.0)], [], spacing=(2.0, 2.0, 2.0), orientation="LPS")
    les = case.lesions.iloc[0]
    expected = case.affine @ np.array([5.0, 5.0, 5.0, 1.0])
    assert [les.x_mm, les.y_mm, les.z_mm] == pytest.approx(list(expected[:3]))
    assert case.affine[0, 0] == -2.0 and case.affine[1, 1] == -2.0


def test_delpozo_uses_6_connectivity() -> None:
    # Two voxels of prediction touching only at a corner are one candidate with 26-connectivity
    # and two with 6-connectivity (scipy.ndimage.label's default, used by del Pozo).
    case = make_case([((20, 20, 20), 1.0)], [])
    case.prob[20, 20, 20] = 0.9
    case.prob[21, 21, 21] = 0.9
    n26 = (case.score("cmbbench")["kind"] == "candidate").sum()
    n6 = (case.score("delpozo2024")["kind"] == "candidate").sum()
    assert (n26, n6) == (1, 2)
    assert case.counts("delpozo2024") == C(tp=1, fp=1)  # second voxel does not touch the lesion


def test_point_candidates_with_overlap_rule_use_point_in_mask() -> None:
    case = make_case([((20, 20, 20), 2.0)], [])
    cands = pd.DataFrame({
        "scan_id": "s", "candidate_id": [1, 2],
        "x_mm": [0.0, 0.0], "y_mm": [0.0, 0.0], "z_mm": [0.0, 0.0],
        "i": [21.0, 30.0], "j": [20.0, 20.0], "k": [20.0, 20.0],
        "score": [0.9, 0.8], "volume_mm3": np.nan, "n_voxels": 0,
    }, columns=list(CANDIDATE_COLUMNS))
    table = match_scan(case.lesions, cands, get_rule("delpozo2024"), scan_id="s",
                       ref_labels=case.ref_labels, cand_labels=None)
    assert outcome_counts(table) == C(tp=1, fp=1)


def test_overlap_rule_without_masks_is_a_configuration_error() -> None:
    case = make_case([((20, 20, 20), 2.0)], [])
    empty = pd.DataFrame({"scan_id": "s", "candidate_id": [1], "x_mm": [0.0], "y_mm": [0.0],
                          "z_mm": [0.0], "i": [20.0], "j": [20.0], "k": [20.0], "score": [0.9],
                          "volume_mm3": [np.nan], "n_voxels": [0]})
    with pytest.raises(ConfigurationError):
        match_scan(case.lesions, empty, get_rule("wmh2017"), scan_id="s")


def test_get_rule_errors_and_overrides() -> None:
    with pytest.raises(ConfigurationError, match="unknown matching rule"):
        get_rule("nope")
    with pytest.raises(ConfigurationError, match="version"):
        get_rule("cmbbench@9")
    assert get_rule("cmbbench@1").rule_id == "cmbbench@1"
    assert get_rule("cmbbench", max_distance=3.0).max_distance == 3.0
    with pytest.raises(ConfigurationError):
        get_rule("cmbbench", operating_threshold=0.05)  # below the 0.1 floor
    with pytest.raises(ConfigurationError):
        get_rule("cmbbench", colour="red")
    assert set(PRESETS) == set(PRESET_NAMES)


def test_invariants_hold_on_random_cases() -> None:
    rng = np.random.default_rng(7)
    for _ in range(25):
        refs = [(tuple(rng.uniform(4, 36, 3)), float(rng.uniform(1, 2.5)))
                for _ in range(rng.integers(0, 6))]
        preds = [(tuple(rng.uniform(4, 36, 3)), float(rng.uniform(0.8, 2.5)),
                  float(rng.choice([0.2, 0.5, 0.7, 0.9, 0.95])))
                 for _ in range(rng.integers(0, 8))]
        case = make_case(refs, preds)
        for preset in PRESET_NAMES:
            t = case.score(preset)
            c = outcome_counts(t)
            n_ref = (t["kind"] == "reference").sum()
            assert c["tp"] + c["fn"] == n_ref
            if preset != "wmh2017":
                assert c["tp"] == c["tp_pred"]
            # sweep: the number of lesions with hit_score >= 0.5 equals the TP count at the
            # operating point 0.5 for the exact sweeps (optimal, greedy_confidence, many-to-many)
            if PRESETS[preset].assignment in ("optimal", "many_to_many"):
                ref = t[t["kind"] == "reference"]
                assert int((ref["hit_score"] >= 0.5).sum()) == c["tp"], preset


def test_overridden_rule_is_recorded_as_such() -> None:
    rule = get_rule("cmbbench", max_distance=3.0, operating_threshold=0.5)
    # 0.5 is the preset's own threshold: not an override; 3.0 mm is
    assert rule.rule_id == "cmbbench@1+max_distance=3.0"
    assert get_rule("cmbbench").rule_id == "cmbbench@1"
    from cmbbench.matching import MatchRule
    back = MatchRule(**{k: v for k, v in rule.to_dict().items() if k != "rule_id"})
    assert back.rule_id == rule.rule_id

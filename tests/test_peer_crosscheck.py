"""Cross-checks of cmbbench against independent peers, plus regressions for peers' known bugs.

Peers (test dependencies, pinned in ``pyproject.toml``'s ``dev`` extra): panoptica 2.1.7,
picai_eval 1.4.13, grand-challenge-metrics 0.6.0. Each cross-check runs the peer and cmbbench on
the same randomized, seeded cases and requires identical TP/FP/FN counts wherever the peer's rule
coincides with a cmbbench rule:

- *Star cases* (every connected component of the reference/candidate overlap graph is a star:
  one lesion with several candidates, or one candidate with several lesions): every one-to-one
  overlap rule gives the same counts, so panoptica's greedy IoU and max-IoU bipartite matchers,
  picai's Hungarian (both duplicate policies) and cmbbench's ``optimal`` and ``greedy_pair``
  overlap rules must agree exactly.
- *Crowded cases* (chains of close lesions with candidates that bridge neighbours, so some
  graph component is not a star; kept only when, inside each component, the shared voxel counts
  are distinct and order the pairs exactly as their IoUs do): panoptica's greedy-by-IoU and
  cmbbench's greedy-by-overlap then visit the pairs in the same order and must agree although
  the matching is ambiguous; picai's Hungarian and cmbbench's ``optimal`` both find the maximum
  number of matches (checked against an independent Hopcroft-Karp matching).
- *Points* for grand-challenge-metrics' ``score_detection`` (world mm, anisotropic voxels).

Where the rules do *not* coincide, the difference is pinned by a hand-built case (panoptica's
``MaxBipartiteMatching`` maximises summed IoU, not the number of matches; picai's ``+1`` trick
does not always maximise the number of matches; grand-challenge-metrics' greedy depends on the
order of the ground truth).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cc3d
import numpy as np
import pandas as pd
import pytest
from conftest import outcome_counts
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, maximum_bipartite_matching

from cmbbench.examples import affine_for, sphere
from cmbbench.harmonize import label_instances, lesions_from_labels, lesions_from_points
from cmbbench.matching import MatchRule, get_rule
from cmbbench.metrics import froc_curve, prepare, scan_table, sensitivity_at
from cmbbench.scoring import score_case

pytest.importorskip("panoptica")
pytest.importorskip("picai_eval")
pytest.importorskip("grand_challenge_metrics")

from grand_challenge_metrics.scorers import score_detection
from panoptica import (
    ConnectedComponentsInstanceApproximator,
    InputType,
    MaxBipartiteMatching,
    Metric,
    NaiveThresholdMatching,
    Panoptica_Evaluator,
    disable_citation_reminder,
)
from picai_eval.eval import evaluate as picai_evaluate
from picai_eval.eval import evaluate_case as picai_evaluate_case

disable_citation_reminder()  # panoptica prints a citation reminder on first use
logging.getLogger("panoptica").setLevel(logging.WARNING)

SHAPE = (48, 48, 32)
N_CASES = 25
#: picai's IoU adds 1e-8 to numerator and denominator, so a disjoint pair scores ~1e-10 > 0;
#: any real overlap of lesions this small has IoU > 1e-3. 1e-6 therefore means "any overlap".
PICAI_ANY_OVERLAP = 1e-6


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    """A reference mask, a prediction mask and a detection map (one confidence per blob)."""

    ref: np.ndarray   # bool
    pred: np.ndarray  # bool
    det: np.ndarray   # float32, constant confidence per 26-connected prediction blob
    seed: int


def overlap_rule(assignment: str, duplicates: str) -> MatchRule:
    """cmbbench any-voxel-overlap rule (26-connectivity, binarised at 0.5)."""
    return get_rule("cmbbench", criterion="overlap", min_overlap_voxels=1,
                    assignment=assignment, duplicates=duplicates, candidate_floor=0.5,
                    operating_threshold=0.5, connectivity=26)


def counts_from_table(table: pd.DataFrame) -> dict[str, int]:
    """TP/FP/FN counted from cmbbench's per-lesion/per-candidate table (no merging rule here)."""
    counts = outcome_counts(table)
    counts.pop("merged")
    return counts


def cmbbench_counts(ref: np.ndarray, pred: np.ndarray, rule: MatchRule,
                    affine: np.ndarray | None = None) -> dict[str, int]:
    """Score one case with cmbbench from arrays (reference mask, prediction map)."""
    affine = np.eye(4) if affine is None else affine
    labels, _ = label_instances(ref, connectivity=rule.connectivity)
    lesions = lesions_from_labels(labels, affine, scan_id="case")
    case = score_case(scan_id="case", lesions=lesions, image_shape=ref.shape,
                      image_affine=affine, rule=rule, ref_labels=labels, prediction=pred)
    return counts_from_table(case.table)


def panoptica_counts(ref: np.ndarray, pred: np.ndarray, matcher) -> dict[str, int]:
    """panoptica TP/FP/FN on binary masks (semantic input, cc3d 26-connected instances)."""
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=matcher,
        instance_metrics=[Metric.IOU],
        global_metrics=[Metric.DSC],
    )
    res = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), verbose=False)
    (result,) = res.values()
    return {"tp": int(result.tp), "fp": int(result.fp), "fn": int(result.fn)}


def any_overlap_naive() -> NaiveThresholdMatching:
    """panoptica greedy-by-IoU, accepting any overlap (IoU > 0: strict threshold at 0)."""
    return NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=0.0,
                                  strict_threshold=True)


def any_overlap_bipartite() -> MaxBipartiteMatching:
    """panoptica Hungarian on 1 - IoU, accepting any overlap (IoU > 0)."""
    return MaxBipartiteMatching(matching_metric=Metric.IOU, matching_threshold=0.0,
                                strict_threshold=True)


def picai_counts(ref: np.ndarray, det: np.ndarray, *, allow_unmatched: bool) -> dict[str, int]:
    """picai_eval TP/FP/FN (FN = missed reference lesions) from its (is_lesion, conf, overlap)
    tuples."""
    y_list, *_ = picai_evaluate_case(
        y_det=det, y_true=ref.astype(np.int32), min_overlap=PICAI_ANY_OVERLAP,
        overlap_func="IoU", allow_unmatched_candidates_with_minimal_overlap=allow_unmatched)
    tp = sum(1 for is_lesion, conf, _ in y_list if is_lesion == 1 and conf > 0)
    fn = sum(1 for is_lesion, conf, _ in y_list if is_lesion == 1 and conf == 0)
    fp = sum(1 for is_lesion, _, _ in y_list if is_lesion == 0)
    return {"tp": tp, "fp": fp, "fn": fn}


def overlap_graph(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int, dict[tuple[int, int], int],
                                                             np.ndarray, np.ndarray]:
    """Independent (cc3d + numpy) overlap graph: #lesions, #candidates, shared voxels per
    (lesion, candidate) (0-based), and the voxel count of each lesion / candidate."""
    rl, nr = cc3d.connected_components(ref, connectivity=26, return_N=True)
    pl, npred = cc3d.connected_components(pred, connectivity=26, return_N=True)
    both = (rl > 0) & (pl > 0)
    pairs, n = np.unique(np.stack([rl[both], pl[both]]), axis=1, return_counts=True)
    ov = {(int(r) - 1, int(c) - 1): int(k) for (r, c), k in zip(pairs.T, n)}
    ref_sizes = np.bincount(rl.ravel(), minlength=nr + 1)[1:]
    pred_sizes = np.bincount(pl.ravel(), minlength=npred + 1)[1:]
    return int(nr), int(npred), ov, ref_sizes, pred_sizes


def graph_components(nr: int, nc: int, ov: dict[tuple[int, int], int]) -> list[list[tuple[int, int]]]:
    """Edges of the overlap graph grouped by connected component (components with edges only)."""
    if not ov:
        return []
    rows = [r for r, _ in ov] + [nr + c for _, c in ov]
    cols = [nr + c for _, c in ov] + [r for r, _ in ov]
    adj = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(nr + nc, nr + nc))
    _, lab = connected_components(adj, directed=False)
    groups: dict[int, list[tuple[int, int]]] = {}
    for (r, c) in ov:
        groups.setdefault(int(lab[r]), []).append((r, c))
    return list(groups.values())


def is_star(edges: list[tuple[int, int]]) -> bool:
    """Every edge of the component has an endpoint of degree 1 and there is one hub at most."""
    refs = {r for r, _ in edges}
    cands = {c for _, c in edges}
    return len(refs) == 1 or len(cands) == 1


def max_matching_size(nr: int, nc: int, ov: dict[tuple[int, int], int]) -> int:
    """Maximum bipartite matching cardinality (scipy Hopcroft-Karp), an independent oracle."""
    if not ov or nr == 0 or nc == 0:
        return 0
    rr = [r for r, _ in ov]
    cc = [c for _, c in ov]
    m = csr_matrix((np.ones(len(rr)), (rr, cc)), shape=(nr, nc))
    return int((maximum_bipartite_matching(m, perm_type="column") >= 0).sum())


def detection_map(pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random confidence in [0.5, 1) per 26-connected prediction blob."""
    pl, n = cc3d.connected_components(pred, connectivity=26, return_N=True)
    conf = np.r_[0.0, rng.uniform(0.5, 0.999, size=n)].astype(np.float32)
    return conf[pl]


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _far_from(p: np.ndarray, others: list[np.ndarray], d: float) -> bool:
    return all(np.linalg.norm(p - o) >= d for o in others)


def _random_centre(rng: np.random.Generator, margin: float = 4.0) -> np.ndarray:
    lo = np.full(3, margin)
    hi = np.array(SHAPE, dtype=float) - 1 - margin
    return lo + rng.uniform(size=3) * (hi - lo)


# ---------------------------------------------------------------------------------------------
# case generators (seeded; rejection sampling keeps them deterministic)
# ---------------------------------------------------------------------------------------------

def _star_case(seed: int) -> Case | None:
    """Well-separated spheres (r = 1-3 voxels): hits jittered by 0-2 voxels, misses, duplicate
    hits, extra FPs and sometimes one candidate merging two close lesions."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    centres: list[np.ndarray] = []
    n_ref = int(rng.integers(0, 7))
    for _ in range(n_ref):
        for _attempt in range(200):
            c = _random_centre(rng)
            if _far_from(c, centres, 14.0):
                break
        else:
            continue
        centres.append(c)
        r = float(rng.uniform(1.0, 3.0))
        ref |= sphere(SHAPE, c, r)
        event = rng.choice(["hit", "hit", "hit", "miss", "dup", "merge"])
        if event == "merge":  # a second lesion next to it and one candidate over both
            d = _unit(rng)
            c2 = c + d * (2 * r + 2.5)
            ref |= sphere(SHAPE, c2, r)
            pred |= sphere(SHAPE, (c + c2) / 2 + rng.uniform(-0.5, 0.5, 3), r + 2.0)
            continue
        if event == "dup":  # two separate small candidates on opposite sides of the lesion
            r = max(r, 2.3)
            ref |= sphere(SHAPE, c, r)
            d = _unit(rng)
            pred |= sphere(SHAPE, c + d * (r - 0.3), 1.0)
            pred |= sphere(SHAPE, c - d * (r - 0.3), 1.0)
            continue
        for _h in range({"hit": 1, "miss": 0}[str(event)]):
            jit = _unit(rng) * rng.uniform(0.0, 2.0)
            pred |= sphere(SHAPE, c + jit, float(np.clip(r * rng.uniform(0.8, 1.2), 1.0, 3.3)))
    for _ in range(int(rng.integers(0, 3))):  # extra FPs, far from every lesion
        for _attempt in range(200):
            c = _random_centre(rng)
            if _far_from(c, centres, 12.0):
                pred |= sphere(SHAPE, c, float(rng.uniform(1.0, 3.0)))
                break
    nr, nc, ov, _, _ = overlap_graph(ref, pred)
    if not all(is_star(e) for e in graph_components(nr, nc, ov)):
        return None
    return Case(ref=ref, pred=pred, det=detection_map(pred, rng), seed=seed)


def _crowded_case(seed: int) -> Case | None:
    """Chains of 2-4 close spheres (r = 1.5-3 voxels, gaps of 2-3.5 voxels) along random lines;
    small candidates hit one side of a lesion and larger candidates bridge two neighbours, so
    alternating paths (ambiguous matchings) occur. Kept only when some graph component is not a
    star and, inside each component, the shared voxel counts are distinct and order the pairs
    exactly as their IoUs do (then greedy-by-IoU and greedy-by-overlap visit the pairs in the
    same order)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    placed: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(2, 5))
        radii = rng.uniform(1.5, 3.0, size=k)
        gaps = rng.uniform(2.0, 3.5, size=k - 1)
        length = 2 * radii.sum() + gaps.sum()
        d = _unit(rng)
        for _attempt in range(200):
            start = _random_centre(rng)
            end = start + d * length
            mid = (start + end) / 2
            if (np.all(end > 4) and np.all(end < np.array(SHAPE) - 5)
                    and _far_from(mid, placed, length / 2 + 12)):
                break
        else:
            continue
        placed.append(mid)
        centres = [start + d * radii[0]]
        for n in range(1, k):
            centres.append(centres[-1] + d * (radii[n - 1] + gaps[n - 1] + radii[n]))
        for n in range(k):
            ref |= sphere(SHAPE, centres[n], radii[n])
        for n in range(k):
            if rng.uniform() < 0.6:  # a small hit on one side of the lesion
                side = float(rng.choice([-1.0, 1.0]))
                pred |= sphere(SHAPE, centres[n] + side * d * (radii[n] + rng.uniform(-1.0, 0.5))
                               + rng.uniform(-0.5, 0.5, 3), float(rng.uniform(1.0, 1.6)))
            if n < k - 1 and rng.uniform() < 0.5:  # a candidate bridging lesions n and n + 1
                m = centres[n] + d * (radii[n] + gaps[n] / 2 + rng.uniform(-1.5, 1.5))
                pred |= sphere(SHAPE, m + rng.uniform(-0.5, 0.5, 3),
                               gaps[n] / 2 + rng.uniform(0.6, 2.0))
    for _ in range(int(rng.integers(0, 3))):  # isolated FPs
        c = _random_centre(rng)
        if _far_from(c, placed, 14.0):
            pred |= sphere(SHAPE, c, float(rng.uniform(1.0, 3.0)))
    nr, nc, ov, rs, ps = overlap_graph(ref, pred)
    components = graph_components(nr, nc, ov)
    if all(is_star(e) for e in components):
        return None
    for edges in components:
        vals = [ov[e] for e in edges]
        ious = [ov[(r, c)] / (rs[r] + ps[c] - ov[(r, c)]) for r, c in edges]
        if len(set(vals)) != len(vals) or len(set(ious)) != len(ious):
            return None
        if list(np.argsort(vals)) != list(np.argsort(ious)):
            return None
    return Case(ref=ref, pred=pred, det=detection_map(pred, rng), seed=seed)


def _collect(make, base_seed: int, n: int) -> list[Case]:
    cases: list[Case] = []
    seed = base_seed
    while len(cases) < n:
        case = make(seed)
        seed += 1
        if case is not None:
            cases.append(case)
        assert seed - base_seed < 50 * n, "case generator rejects too much"
    return cases


@functools.cache
def star_cases() -> list[Case]:
    return _collect(_star_case, 1000, N_CASES)


@functools.cache
def crowded_cases() -> list[Case]:
    return _collect(_crowded_case, 5000, N_CASES)


# ---------------------------------------------------------------------------------------------
# generators are not trivial
# ---------------------------------------------------------------------------------------------

def test_star_cases_cover_every_situation():
    """The star cases hold hits, misses, FPs, duplicate candidates and merged lesions."""
    seen = {"hit": 0, "miss": 0, "fp": 0, "dup": 0, "merge": 0, "empty_ref": 0}
    for case in star_cases():
        nr, nc, ov, _, _ = overlap_graph(case.ref, case.pred)
        seen["empty_ref"] += nr == 0
        refs_hit = {r for r, _ in ov}
        cands_hit = {c for _, c in ov}
        seen["hit"] += len(refs_hit)
        seen["miss"] += nr - len(refs_hit)
        seen["fp"] += nc - len(cands_hit)
        for edges in graph_components(nr, nc, ov):
            seen["dup"] += len({c for _, c in edges}) > 1
            seen["merge"] += len({r for r, _ in edges}) > 1
    assert all(v > 0 for v in seen.values()), seen


def test_crowded_cases_are_ambiguous():
    """Every crowded case has a non-star component, and on some of them greedy matching finds
    fewer matches than the maximum (so the greedy cross-check can tell greedy from optimal)."""
    n_suboptimal = 0
    for case in crowded_cases():
        nr, nc, ov, _, _ = overlap_graph(case.ref, case.pred)
        assert any(not is_star(e) for e in graph_components(nr, nc, ov))
        greedy = cmbbench_counts(case.ref, case.pred, overlap_rule("greedy_pair", "fp"))
        n_suboptimal += greedy["tp"] < max_matching_size(nr, nc, ov)
    assert n_suboptimal >= 3, n_suboptimal


# ---------------------------------------------------------------------------------------------
# panoptica
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("idx", range(N_CASES))
def test_panoptica_star_cases(idx):
    """Star cases: panoptica's greedy and bipartite any-overlap matchers, and cmbbench's optimal
    and greedy overlap rules (duplicates FP), give identical TP/FP/FN."""
    case = star_cases()[idx]
    naive = panoptica_counts(case.ref, case.pred, any_overlap_naive())
    bip = panoptica_counts(case.ref, case.pred, any_overlap_bipartite())
    for assignment in ("optimal", "greedy_pair"):
        ours = cmbbench_counts(case.ref, case.pred, overlap_rule(assignment, "fp"))
        assert ours["tp"] == ours["tp_pred"]
        mine = {"tp": ours["tp"], "fp": ours["fp"], "fn": ours["fn"]}
        assert mine == naive, (assignment, case.seed)
        assert mine == bip, (assignment, case.seed)


@pytest.mark.parametrize("idx", range(N_CASES))
def test_panoptica_greedy_crowded_cases(idx):
    """Ambiguous cases: panoptica's greedy-by-IoU equals cmbbench's greedy-by-overlap (the
    generator keeps only cases where both orders of the pairs coincide)."""
    case = crowded_cases()[idx]
    naive = panoptica_counts(case.ref, case.pred, any_overlap_naive())
    ours = cmbbench_counts(case.ref, case.pred, overlap_rule("greedy_pair", "fp"))
    assert {"tp": ours["tp"], "fp": ours["fp"], "fn": ours["fn"]} == naive, case.seed
    # panoptica's bipartite matcher maximises summed IoU: never more matches than cmbbench
    # ``optimal``, which equals the maximum matching size
    nr, nc, ov, _, _ = overlap_graph(case.ref, case.pred)
    best = cmbbench_counts(case.ref, case.pred, overlap_rule("optimal", "fp"))
    assert best["tp"] == max_matching_size(nr, nc, ov)
    assert panoptica_counts(case.ref, case.pred, any_overlap_bipartite())["tp"] <= best["tp"]


def test_panoptica_bipartite_maximises_iou_not_matches():
    """Pinned design difference: panoptica's MaxBipartiteMatching minimises sum(1 - IoU) and so
    prefers one large-IoU pair to two small-IoU pairs; cmbbench ``optimal`` maximises the number
    of matches first. Lesion A is hit almost exactly by X; X also grazes lesion B, and a second
    candidate Y grazes A."""
    shape = (40, 20, 20)
    a = sphere(shape, (15, 10, 10), 3.0)
    b = sphere(shape, (22, 10, 10), 2.0)
    x = sphere(shape, (17, 10, 10), 3.0)  # 69 shared voxels with A, touches B's tip
    y = sphere(shape, (10, 10, 10), 2.0)  # touches A's tip
    ref, pred = a | b, x | y
    nr, nc, ov, _, _ = overlap_graph(ref, pred)
    assert (nr, nc) == (2, 2) and len(ov) == 3  # A-X (large), B-X, A-Y (small)
    assert max_matching_size(nr, nc, ov) == 2
    ours = cmbbench_counts(ref, pred, overlap_rule("optimal", "fp"))
    assert (ours["tp"], ours["fp"], ours["fn"]) == (2, 0, 0)
    bip = panoptica_counts(ref, pred, any_overlap_bipartite())
    assert (bip["tp"], bip["fp"], bip["fn"]) == (1, 1, 1)
    # picai's +1 trick gets this one right (2 + small > 1 + large)
    assert picai_counts(ref, pred.astype(np.float32), allow_unmatched=False)["tp"] == 2


def test_panoptica_default_iou_rejects_shifted_small_cmb():
    """Known peer limitation: panoptica's default (IoU >= 0.5) rejects a 19-voxel CMB (r = 1.5
    voxels) predicted one voxel off (IoU 0.36); the cmbbench default distance rule matches it."""
    shape = (32, 32, 32)
    ref = sphere(shape, (16, 16, 16), 1.5)
    pred = sphere(shape, (17, 16, 16), 1.5)
    assert ref.sum() == 19
    iou = (ref & pred).sum() / (ref | pred).sum()
    assert 0.3 < iou < 0.5
    default = panoptica_counts(ref, pred, NaiveThresholdMatching())
    assert (default["tp"], default["fp"], default["fn"]) == (0, 1, 1)
    ours = cmbbench_counts(ref, pred.astype(np.uint8), get_rule("cmbbench"),
                           affine=affine_for((1.0, 1.0, 1.0), "RAS", shape))
    assert (ours["tp"], ours["fp"], ours["fn"]) == (1, 0, 0)


# ---------------------------------------------------------------------------------------------
# picai_eval
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("idx", range(N_CASES))
@pytest.mark.parametrize("allow_unmatched,duplicates", [(True, "ignore"), (False, "fp")])
def test_picai_star_cases(idx, allow_unmatched, duplicates):
    """Star cases, detection maps with one confidence per blob: picai's Hungarian (IoU > 0)
    equals cmbbench ``optimal`` overlap; picai's default of dropping unmatched candidates that
    overlap a lesion is cmbbench's ``duplicates='ignore'``."""
    case = star_cases()[idx]
    theirs = picai_counts(case.ref, case.det, allow_unmatched=allow_unmatched)
    ours = cmbbench_counts(case.ref, case.det, overlap_rule("optimal", duplicates))
    assert {"tp": ours["tp"], "fp": ours["fp"], "fn": ours["fn"]} == theirs, case.seed


@pytest.mark.parametrize("idx", range(N_CASES))
def test_picai_crowded_cases(idx):
    """Ambiguous cases: picai's Hungarian and cmbbench ``optimal`` find the maximum number of
    matches (checked against an independent Hopcroft-Karp matching)."""
    case = crowded_cases()[idx]
    nr, nc, ov, _, _ = overlap_graph(case.ref, case.pred)
    for allow_unmatched, duplicates in ((True, "ignore"), (False, "fp")):
        theirs = picai_counts(case.ref, case.det, allow_unmatched=allow_unmatched)
        ours = cmbbench_counts(case.ref, case.det, overlap_rule("optimal", duplicates))
        assert {"tp": ours["tp"], "fp": ours["fp"], "fn": ours["fn"]} == theirs, case.seed
    assert ours["tp"] == max_matching_size(nr, nc, ov)


def _bar(shape, x0, x1, y0, y1):
    m = np.zeros(shape, dtype=bool)
    m[x0:x1 + 1, y0:y1 + 1, 0:3] = True
    return m


def test_picai_plus_one_trick_can_lose_a_match():
    """picai documents "maximise the number of matches, then the overlap", but adding 1 to each
    IoU and maximising the sum does not guarantee it: two pairs of IoU 0.71 (sum 3.41) beat three
    pairs of IoU 0.04-0.06 (sum 3.15). Lesions C, A, B and candidates X, Y, Z form the chain
    C-X-A-Y-B-Z (bars along x; the candidates are separated by empty columns).
    cmbbench ``optimal`` finds the three matches."""
    shape = (48, 10, 3)
    C, A, B = _bar(shape, 0, 2, 0, 6), _bar(shape, 5, 18, 0, 6), _bar(shape, 21, 34, 0, 6)
    X = _bar(shape, 2, 16, 0, 6)   # covers most of A, grazes C at x = 2
    Y = _bar(shape, 18, 32, 0, 6)  # grazes A at x = 18, covers most of B
    Z = _bar(shape, 34, 40, 0, 6)  # grazes B at x = 34
    # X (ends at 16) and Y (starts at 18) are separated by the empty column x = 17
    ref, pred = C | A | B, X | Y | Z
    nr, nc, ov, _, _ = overlap_graph(ref, pred)
    assert (nr, nc) == (3, 3) and len(ov) == 5
    assert max_matching_size(nr, nc, ov) == 3
    theirs = picai_counts(ref, pred.astype(np.float32), allow_unmatched=False)
    assert theirs == {"tp": 2, "fp": 1, "fn": 1}
    ours = cmbbench_counts(ref, pred, overlap_rule("optimal", "fp"))
    assert (ours["tp"], ours["fp"], ours["fn"]) == (3, 0, 0)


def test_picai_froc_binary_masks_bug():
    """Known picai bug: with binary masks (one confidence) and every lesion hit, picai's last
    operating point is replaced by (TP of the previous point, FP = inf), so lesion TPR is 0 at
    any FP rate although AP = 1. cmbbench keeps every operating point: sensitivity 1.0."""
    shape = (40, 40, 20)
    refs, preds, tables = [], [], []
    rule = get_rule("cmbbench")
    aff = affine_for((1.0, 1.0, 1.0), "RAS", shape)
    for n, centres in enumerate([[(10, 10, 10), (28, 28, 10)], [(20, 12, 8)]]):
        ref = np.zeros(shape, dtype=bool)
        pred = np.zeros(shape, dtype=bool)
        for c in centres:
            ref |= sphere(shape, c, 2.0)
            pred |= sphere(shape, (c[0] + 1, c[1], c[2]), 2.0)
        refs.append(ref.astype(np.int32))
        preds.append(pred.astype(np.float32))
        labels, _ = label_instances(ref)
        case = score_case(scan_id=f"s{n}", lesions=lesions_from_labels(labels, aff, scan_id=f"s{n}"),
                          image_shape=shape, image_affine=aff, rule=rule, ref_labels=labels,
                          prediction=pred.astype(np.uint8))
        tables.append(case.table)
    metrics = picai_evaluate(y_det=preds, y_true=refs, min_overlap=0.1, num_parallel_calls=1)
    assert metrics.AP == pytest.approx(1.0)
    assert metrics.lesion_TPR_at_FPR(1.0) == 0.0  # the peer bug
    table = pd.concat(tables, ignore_index=True)
    counts = counts_from_table(table)
    assert (counts["tp"], counts["fp"], counts["fn"]) == (3, 0, 0)
    curve = froc_curve(prepare(table, scan_table(table, ["s0", "s1"])))
    for rate in (0.125, 1.0, 8.0):
        assert sensitivity_at(curve, rate) == 1.0


def test_froc_keeps_lowest_threshold_monai_case():
    """MONAI's FROC drops the lowest unique probability, so hits at 0.9 and 0.3 with one FP at
    0.7 never reach sensitivity 1.0 there. cmbbench keeps that operating point: sensitivity 1.0
    at 1 FP/scan, 0.5 at fewer."""
    shape = (48, 48, 24)
    aff = affine_for((1.0, 1.0, 1.0), "RAS", shape)
    ref = sphere(shape, (12, 12, 12), 2.0) | sphere(shape, (36, 36, 12), 2.0)
    prob = np.zeros(shape, dtype=np.float32)
    prob[sphere(shape, (12, 12, 12), 2.0)] = 0.9
    prob[sphere(shape, (36, 36, 12), 2.0)] = 0.3
    prob[sphere(shape, (12, 36, 12), 2.0)] = 0.7
    rule = get_rule("cmbbench")
    labels, _ = label_instances(ref)
    case = score_case(scan_id="m", lesions=lesions_from_labels(labels, aff, scan_id="m"),
                      image_shape=shape, image_affine=aff, rule=rule, ref_labels=labels,
                      prediction=prob)
    curve = froc_curve(prepare(case.table, scan_table(case.table, ["m"])))
    assert 0.3 in set(np.round(curve["threshold"].to_numpy(), 6))
    assert sensitivity_at(curve, 1.0) == 1.0
    assert sensitivity_at(curve, 0.5) == 0.5
    low = curve[np.isclose(curve["threshold"], 0.3)].iloc[0]
    assert (low["sensitivity"], low["fp_per_scan"]) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# grand-challenge-metrics (evalutils) score_detection
# ---------------------------------------------------------------------------------------------

def _point_case(seed: int, radius: float, ambiguous: bool):
    """Reference and predicted points in world mm on an anisotropic, non-RAS grid; predictions
    are returned in 0-based voxel coordinates too (cmbbench gets voxels, the peer gets mm)."""
    rng = np.random.default_rng(seed)
    shape = (128, 128, 40)
    spacing = tuple(rng.choice([0.5, 0.8, 1.0], size=2)) + (float(rng.choice([1.0, 2.0, 3.0])),)
    aff = affine_for(spacing, str(rng.choice(["RAS", "LPS", "LAS"])), shape)
    ext = np.array(shape) * np.array(spacing)
    lo, hi = -ext / 2 + 2 * radius, ext / 2 - 2 * radius
    gt: list[np.ndarray] = []
    sep = 2.2 * radius if not ambiguous else 0.6 * radius
    for _ in range(int(rng.integers(0, 10))):
        for _attempt in range(200):
            p = lo + rng.uniform(size=3) * (hi - lo)
            if _far_from(p, gt, sep):
                gt.append(p)
                break
    preds: list[np.ndarray] = []
    for g in gt:
        k = int(rng.choice([0, 1, 1, 1, 2]))
        for _ in range(k):
            preds.append(g + _unit(rng) * rng.uniform(0, 0.95 * radius))
    for _ in range(int(rng.integers(0, 4))):
        for _attempt in range(200):
            p = lo + rng.uniform(size=3) * (hi - lo)
            if _far_from(p, gt, 1.2 * radius):
                preds.append(p)
                break
    order = rng.permutation(len(preds))
    preds = [preds[i] for i in order]
    gt_arr = np.array(gt).reshape(-1, 3)
    pred_arr = np.array(preds).reshape(-1, 3)
    pred_vox = np.linalg.solve(aff[:3, :3], (pred_arr - aff[:3, 3]).T).T if len(preds) else pred_arr
    return aff, gt_arr, pred_arr, pred_vox


def cmbbench_point_counts(aff, gt_mm, pred_vox, rule) -> dict[str, int]:
    lesions = lesions_from_points(gt_mm, aff, scan_id="p")
    points = pd.DataFrame({"i": pred_vox[:, 0], "j": pred_vox[:, 1], "k": pred_vox[:, 2],
                           "score": np.ones(len(pred_vox))})
    case = score_case(scan_id="p", lesions=lesions, image_shape=(128, 128, 40),
                      image_affine=aff, rule=rule, points=points)
    return counts_from_table(case.table)


def gcm_counts(gt_mm, pred_mm, radius) -> dict[str, int]:
    s = score_detection(ground_truth=[tuple(p) for p in gt_mm],
                        predictions=[tuple(p) for p in pred_mm], radius=radius)
    return {"tp": s.true_positives, "fp": s.false_positives, "fn": s.false_negatives}


@pytest.mark.parametrize("seed", range(N_CASES))
def test_gcm_unambiguous_points(seed):
    """Reference points more than 2 radii apart (so each prediction is within the radius of at
    most one reference): score_detection in world mm equals the cmbbench default rule
    (5 mm, optimal, duplicates FP) fed voxel coordinates on an anisotropic non-RAS grid."""
    rule = get_rule("cmbbench")
    aff, gt, pred_mm, pred_vox = _point_case(seed, rule.max_distance, ambiguous=False)
    ours = cmbbench_point_counts(aff, gt, pred_vox, rule)
    assert {"tp": ours["tp"], "fp": ours["fp"], "fn": ours["fn"]} == gcm_counts(
        gt, pred_mm, rule.max_distance)


@pytest.mark.parametrize("seed", range(10))
def test_gcm_ambiguous_points_never_beat_optimal(seed):
    """Crowded points: the peer's greedy never finds more matches than cmbbench, and cmbbench's
    count equals an independent maximum bipartite matching and does not depend on point order."""
    rule = get_rule("cmbbench")
    aff, gt, pred_mm, pred_vox = _point_case(10_000 + seed, rule.max_distance, ambiguous=True)
    ours = cmbbench_point_counts(aff, gt, pred_vox, rule)
    theirs = gcm_counts(gt, pred_mm, rule.max_distance)
    assert theirs["tp"] <= ours["tp"]
    d = np.linalg.norm(gt[:, None, :] - pred_mm[None, :, :], axis=2) if len(gt) and len(pred_mm) \
        else np.zeros((len(gt), len(pred_mm)))
    ov = {(int(r), int(c)): 1 for r, c in zip(*np.nonzero(d <= rule.max_distance))}
    assert ours["tp"] == max_matching_size(len(gt), len(pred_mm), ov)
    rev = cmbbench_point_counts(aff, gt[::-1], pred_vox[::-1], rule)
    assert rev == ours


def test_gcm_order_dependence_bug():
    """Verified peer bug: GT A = 0, B = 3, predictions at 1.4 and -1.5, radius 1.6. Order A, B
    gives 1 TP; order B, A gives 2 TP. cmbbench's optimal assignment gives 2 TP either way."""
    a, b = (0.0, 0.0, 0.0), (3.0, 0.0, 0.0)
    preds = [(1.4, 0.0, 0.0), (-1.5, 0.0, 0.0)]
    assert score_detection(ground_truth=[a, b], predictions=preds, radius=1.6).true_positives == 1
    assert score_detection(ground_truth=[b, a], predictions=preds, radius=1.6).true_positives == 2
    rule = get_rule("cmbbench", max_distance=1.6)
    aff = np.eye(4)
    for gt in ([a, b], [b, a]):
        for pr in (preds, preds[::-1]):
            lesions = lesions_from_points(np.array(gt), aff, scan_id="o")
            pts = pd.DataFrame({"x_mm": [p[0] for p in pr], "y_mm": [p[1] for p in pr],
                                "z_mm": [p[2] for p in pr], "score": [1.0, 1.0]})
            case = score_case(scan_id="o", lesions=lesions, image_shape=(8, 8, 8),
                              image_affine=aff, rule=rule, points=pts)
            c = counts_from_table(case.table)
            assert (c["tp"], c["fp"], c["fn"]) == (2, 0, 0), (gt, pr)

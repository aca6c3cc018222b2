"""Matching rules: which predicted candidate detects which reference CMB.

A rule is a named, versioned, frozen configuration (:class:`MatchRule`) recorded with every
result. Matching a scan has three steps:

1. **Candidate pairs** (:func:`candidate_pairs`): by centroid distance (a KD-tree radius query,
   in world mm or in voxel units) or by voxel overlap (counted on voxels where both label maps
   are foreground, never by full-volume masks per pair). Point annotations or point candidates
   overlap an instance when the point's voxel lies inside it.
2. **Assignment** of the pairs, one of:

   - ``optimal``: one-to-one, lexicographically optimal: maximise the number of matches, then
     minimise the summed pair cost (distance, or minus overlap voxels), then prefer higher
     candidate scores. Solved exactly by successive shortest augmenting paths on tuple costs
     (no ``+1``/big-M float tricks).
   - ``greedy_pair``: one-to-one, pairs taken best localisation first (closest / largest overlap).
   - ``greedy_confidence``: one-to-one, candidates in descending score take their best free lesion.
   - ``many_to_many``: no one-to-one constraint: a lesion is detected if any candidate pairs with
     it, a candidate is correct if it pairs with any lesion (WMH 2017).

3. **Duplicates**: a one-to-one rule leaves some candidates paired only with lesions already
   taken. The rule's ``duplicates`` policy counts them as ``FP`` or ``ignored`` (neither TP nor FP).

Two matchings are made per scan. The *operating-point* matching uses the candidates whose score
is >= the operating threshold and gives the main table (P/R/F1, FP per scan). The *sweep*
matching gives each lesion a ``hit_score`` (the highest threshold at which it is detected) and
each candidate a ``sweep_status``, from which FROC and AP are read. For ``optimal`` and
``greedy_confidence`` the sweep is exact: candidates are inserted in descending score, each by
an augmenting path (``optimal``: the number of matches is maximal at every threshold and a
matched lesion never becomes unmatched) or by taking the best free lesion (``greedy_confidence``).
For ``many_to_many`` a lesion's hit score is the best score among its paired candidates (exact).
For ``greedy_pair`` the sweep is the matching of all candidates, thresholded afterwards (the
picai/LUNA convention; documented approximation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .errors import ConfigurationError, ConsistencyError
from .harmonize import DEFAULT_CANDIDATE_FLOOR, DEFAULT_OPERATING_THRESHOLD, nonzero_indices

__all__ = [
    "MATCH_COLUMNS",
    "PRESETS",
    "MatchRule",
    "PairTable",
    "candidate_pairs",
    "get_rule",
    "list_rules",
    "match_scan",
]

Criterion = Literal["distance", "overlap"]
Assignment = Literal["optimal", "greedy_pair", "greedy_confidence", "many_to_many"]
DuplicatePolicy = Literal["fp", "ignore"]


@dataclass(frozen=True)
class MatchRule:
    """A named, versioned matching rule.

    Attributes
    ----------
    name, version
        Identify the rule; ``f"{name}@{version}"`` is recorded with every result.
    criterion
        ``distance``: centroid distance ``<= max_distance`` (``< max_distance`` if ``strict``);
        ``overlap``: at least ``min_overlap_voxels`` shared voxels.
    max_distance
        Distance threshold, in ``distance_unit`` (``mm``: world RAS+ mm; ``voxel``: Euclidean
        distance between 0-based voxel centroids in the reference image's grid).
    assignment, duplicates
        See the module docstring.
    connectivity
        Neighbourhood (6, 18, 26) used to split binary masks into instances, in voxels.
    candidate_floor
        Probability floor (inclusive) of candidate extraction from probability maps.
    operating_threshold
        Candidates with score >= this are the detections of the main table.
    merge_within
        If set, candidates closer than this (``distance_unit``) to a higher-scored candidate are
        merged into it before matching (Dou 2016's post-processing); their outcome is ``merged``.
    """

    name: str
    version: str
    criterion: Criterion
    assignment: Assignment
    duplicates: DuplicatePolicy
    max_distance: float = 5.0
    distance_unit: Literal["mm", "voxel"] = "mm"
    strict: bool = False
    min_overlap_voxels: int = 1
    connectivity: int = 26
    candidate_floor: float = DEFAULT_CANDIDATE_FLOOR
    operating_threshold: float = DEFAULT_OPERATING_THRESHOLD
    merge_within: float | None = None
    description: str = ""
    citation: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    overrides: tuple = ()

    def __post_init__(self) -> None:
        # JSON round trips turn the (key, value) pairs into lists
        object.__setattr__(self, "overrides", tuple(tuple(p) for p in self.overrides))

    @property
    def rule_id(self) -> str:
        """``name@version``, plus ``+key=value,...`` when preset fields were overridden."""
        base = f"{self.name}@{self.version}"
        if not self.overrides:
            return base
        return base + "+" + ",".join(f"{k}={v}" for k, v in self.overrides)

    @property
    def one_to_one(self) -> bool:
        return self.assignment != "many_to_many"

    def validate(self) -> MatchRule:
        """Raise :class:`ConfigurationError` on an inconsistent rule; return ``self``."""
        if self.criterion not in ("distance", "overlap"):
            raise ConfigurationError(f"rule {self.rule_id}: unknown criterion {self.criterion!r}")
        if self.assignment not in ("optimal", "greedy_pair", "greedy_confidence", "many_to_many"):
            raise ConfigurationError(f"rule {self.rule_id}: unknown assignment {self.assignment!r}")
        if self.duplicates not in ("fp", "ignore"):
            raise ConfigurationError(f"rule {self.rule_id}: duplicates must be 'fp' or 'ignore'")
        if self.distance_unit not in ("mm", "voxel"):
            raise ConfigurationError(f"rule {self.rule_id}: distance_unit must be 'mm' or 'voxel'")
        if self.max_distance <= 0 or self.min_overlap_voxels < 1:
            raise ConfigurationError(f"rule {self.rule_id}: thresholds must be positive")
        if self.connectivity not in (6, 18, 26):
            raise ConfigurationError(f"rule {self.rule_id}: connectivity must be 6, 18 or 26")
        if not 0 < self.candidate_floor <= self.operating_threshold <= 1:
            raise ConfigurationError(
                f"rule {self.rule_id}: need 0 < candidate_floor <= operating_threshold <= 1")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rule_id"] = self.rule_id
        return d


PRESETS: dict[str, MatchRule] = {
    r.name: r.validate()
    for r in (
        MatchRule(
            name="cmbbench", version="1", criterion="distance", max_distance=5.0,
            distance_unit="mm", assignment="optimal", duplicates="fp", connectivity=26,
            description="cmbbench default: world-space centroid distance <= 5 mm, optimal "
                        "one-to-one assignment (max matches, then min distance), duplicates FP.",
            citation="cmbbench",
        ),
        MatchRule(
            name="delpozo2024", version="1", criterion="overlap", min_overlap_voxels=1,
            assignment="greedy_pair", duplicates="ignore", connectivity=6,
            candidate_floor=0.5, operating_threshold=0.5,
            description="del Pozo Lerida et al. (poster/MicrobleedNet): any-voxel overlap, greedy "
                        "by overlap, a second prediction on an already-hit CMB is ignored; "
                        "6-connected components (scipy.ndimage.label default), binarised at 0.5.",
            citation="del Pozo Lerida et al. 2024, MicrobleedNet (cmbnet/utils/utils_evaluation.py)",
        ),
        MatchRule(
            name="valdo2021", version="1", criterion="distance", max_distance=5.0,
            distance_unit="mm", assignment="greedy_pair", duplicates="fp", connectivity=26,
            candidate_floor=0.5, operating_threshold=0.5,
            description="VALDO 2021 task 2: binarise at 0.5, 26-connected components, "
                        "centre-of-mass distance in mm, closest wins, the rest FP. The paper's "
                        "assignment radius was not retrievable; 5 mm is used.",
            citation="Sudre et al. 2024, Where is VALDO? (WhereIsValdo/valdo-eval-2021)",
        ),
        MatchRule(
            name="dou2016", version="1", criterion="distance", max_distance=10.0,
            distance_unit="voxel", strict=True, assignment="greedy_pair", duplicates="ignore",
            connectivity=26, candidate_floor=0.5, operating_threshold=0.5, merge_within=10.0,
            description="Dou et al. 2016 demo evaluation: detections closer than 10 voxels are "
                        "merged; a detection is a TP when a reference centroid is < 10 voxels "
                        "away (native grid, nearest first); extra hits ignored.",
            citation="Dou et al. 2016, IEEE TMI 35(5):1182-1195",
        ),
        MatchRule(
            name="wmh2017", version="1", criterion="overlap", min_overlap_voxels=1,
            assignment="many_to_many", duplicates="fp", connectivity=26,
            candidate_floor=0.5, operating_threshold=0.5,
            description="WMH 2017 challenge: any-voxel overlap, no one-to-one matching; a lesion "
                        "is detected if any predicted voxel touches it, a prediction is correct "
                        "if it touches any lesion.",
            citation="Kuijf et al. 2019, IEEE TMI (WMH segmentation challenge evaluation.py)",
        ),
    )
}


def list_rules() -> list[MatchRule]:
    """All preset rules."""
    return list(PRESETS.values())


def get_rule(name: str | MatchRule, **overrides: object) -> MatchRule:
    """Look up a preset by ``name`` or ``name@version`` and apply field overrides.

    Overridden fields that differ from the preset are recorded in ``rule.overrides`` and in the
    rule id (``cmbbench@1+max_distance=3.0``), so a result never passes for the preset's.

    Raises
    ------
    ConfigurationError
        Unknown rule name or version.
    """
    if isinstance(name, MatchRule):
        rule = name
    else:
        base, _, version = str(name).partition("@")
        if base not in PRESETS:
            raise ConfigurationError(
                f"unknown matching rule {name!r}; known rules: {', '.join(sorted(PRESETS))}")
        rule = PRESETS[base]
        if version and version != rule.version:
            raise ConfigurationError(
                f"rule {base!r} has version {rule.version}, not {version!r}")
    clean = {k: v for k, v in overrides.items() if v is not None}
    if clean:
        unknown = set(clean) - set(MatchRule.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(f"unknown rule parameter(s): {', '.join(sorted(unknown))}")
        changed = {k: v for k, v in clean.items() if getattr(rule, k) != v}
        if changed:
            merged = dict(rule.overrides)
            merged.update(changed)
            rule = replace(rule, **changed, overrides=tuple(sorted(merged.items())))
    return rule.validate()


# ---------------------------------------------------------------------------------------------
# Candidate pairs
# ---------------------------------------------------------------------------------------------

@dataclass
class PairTable:
    """Reference/candidate pairs that could match, by row position in the two tables.

    Attributes
    ----------
    ref, cand
        Row positions (0-based) into the lesion and candidate tables.
    distance_mm, distance_vox
        Centroid distances in world mm and in voxel units.
    overlap
        Shared voxels (0 when not computed or disjoint).
    """

    ref: np.ndarray
    cand: np.ndarray
    distance_mm: np.ndarray
    distance_vox: np.ndarray
    overlap: np.ndarray

    def __len__(self) -> int:
        return int(self.ref.size)


def _overlap_counts(ref_labels: np.ndarray, cand_labels: np.ndarray) -> dict[tuple[int, int], int]:
    """Shared voxel counts per (lesion label, candidate label), from co-foreground voxels only."""
    fg = nonzero_indices(ref_labels)  # reference voxels first: no full-volume temporaries
    c_fg = cand_labels[fg]
    keep = c_fg > 0
    if not keep.any():
        return {}
    r = ref_labels[fg][keep].astype(np.int64)
    c = c_fg[keep].astype(np.int64)
    key = r * (int(c.max()) + 1) + c
    uniq, counts = np.unique(key, return_counts=True)
    base = int(c.max()) + 1
    return {(int(k // base), int(k % base)): int(n) for k, n in zip(uniq, counts)}


def _point_in_labels(labels: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Label value at the voxel containing each 0-based point (0 outside the array)."""
    if len(ijk) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.rint(np.asarray(ijk, dtype=np.float64)).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(labels.shape)), axis=1)
    out = np.zeros(len(idx), dtype=np.int64)
    ii = idx[inside]
    out[inside] = labels[ii[:, 0], ii[:, 1], ii[:, 2]]
    return out


def candidate_pairs(lesions: pd.DataFrame, candidates: pd.DataFrame, rule: MatchRule, *,
                    ref_labels: np.ndarray | None = None,
                    cand_labels: np.ndarray | None = None) -> PairTable:
    """All pairs that satisfy the rule's criterion, with distances and overlaps.

    For overlap rules a lesion or candidate without voxels (a point) is tested by the voxel
    containing its centroid. For distance rules, overlaps are also filled in when both label
    maps are given (so Dice on matched pairs can be reported).
    """
    n_r, n_c = len(lesions), len(candidates)
    ref_w = lesions[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
    cand_w = candidates[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)
    ref_v = lesions[["i", "j", "k"]].to_numpy(np.float64)
    cand_v = candidates[["i", "j", "k"]].to_numpy(np.float64)
    ref_pos = {int(l): n for n, l in enumerate(lesions["lesion_id"].to_numpy())}
    cand_pos = {int(c): n for n, c in enumerate(candidates["candidate_id"].to_numpy())}
    overlaps: dict[tuple[int, int], int] = {}
    if ref_labels is not None and cand_labels is not None and n_r and n_c:
        overlaps = {(ref_pos[r], cand_pos[c]): n
                    for (r, c), n in _overlap_counts(ref_labels, cand_labels).items()
                    if r in ref_pos and c in cand_pos}
    if n_r == 0 or n_c == 0:
        pairs: set[tuple[int, int]] = set()
    elif rule.criterion == "distance":
        a, b = (ref_w, cand_w) if rule.distance_unit == "mm" else (ref_v, cand_v)
        sdm = cKDTree(a).sparse_distance_matrix(cKDTree(b), rule.max_distance,
                                                output_type="ndarray")
        keep = sdm["v"] < rule.max_distance if rule.strict else sdm["v"] <= rule.max_distance
        pairs = {(int(i), int(j)) for i, j in zip(sdm["i"][keep], sdm["j"][keep])}
        # sparse_distance_matrix omits zero distances; add exact coincidences
        tree_b = cKDTree(b)
        for i, js in enumerate(tree_b.query_ball_point(a, r=1e-9)):
            pairs.update((i, int(j)) for j in js)
    else:
        pairs = set(overlaps)
        if ref_labels is None or cand_labels is None:
            if ref_labels is None and cand_labels is None:
                raise ConfigurationError(
                    f"rule {rule.rule_id} matches by overlap but neither the reference nor the "
                    "prediction has voxel masks")
            if cand_labels is not None:  # point references inside candidate instances
                hit = _point_in_labels(cand_labels, ref_v)
                pairs = {(r, cand_pos[int(h)]) for r, h in enumerate(hit) if int(h) in cand_pos}
            else:  # point candidates inside reference instances
                hit = _point_in_labels(ref_labels, cand_v)
                pairs = {(ref_pos[int(h)], c) for c, h in enumerate(hit) if int(h) in ref_pos}
            overlaps = {p: 1 for p in pairs}
        pairs = {p for p in pairs if overlaps.get(p, 0) >= rule.min_overlap_voxels}
    ordered = sorted(pairs)
    ref = np.array([p[0] for p in ordered], dtype=np.int64)
    cand = np.array([p[1] for p in ordered], dtype=np.int64)
    return PairTable(
        ref=ref, cand=cand,
        distance_mm=np.linalg.norm(ref_w[ref] - cand_w[cand], axis=1) if len(ref) else np.zeros(0),
        distance_vox=np.linalg.norm(ref_v[ref] - cand_v[cand], axis=1) if len(ref) else np.zeros(0),
        overlap=np.array([overlaps.get(p, 0) for p in ordered], dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------

Cost = tuple[float, float]


def _add(a: Cost, b: Cost) -> Cost:
    return (a[0] + b[0], a[1] + b[1])


def _neg(a: Cost) -> Cost:
    return (-a[0], -a[1])


class _Bipartite:
    """A one-to-one matching between candidates (left) and lesions (right) over allowed edges."""

    def __init__(self, n_cand: int, n_ref: int, edges: dict[tuple[int, int], Cost]) -> None:
        self.edges = edges  # (cand, ref) -> lexicographic cost
        self.adj: list[list[int]] = [[] for _ in range(n_cand)]
        for (c, r) in sorted(edges, key=lambda e: (edges[e], e)):
            self.adj[c].append(r)
        self.match_c = [-1] * n_cand
        self.match_r = [-1] * n_ref

    def _apply(self, path: list[int]) -> None:
        """Flip an alternating path [c0, r0, c1, r1, ...] ending at a free lesion."""
        for n in range(0, len(path), 2):
            c, r = path[n], path[n + 1]
            self.match_c[c] = r
            self.match_r[r] = c

    def augment_min_cost(self, sources: list[int]) -> bool:
        """One successive-shortest-path step from all free ``sources`` (Bellman-Ford on the
        residual graph with lexicographic tuple costs). Returns False when no augmenting path."""
        free = [c for c in sources if self.match_c[c] < 0]
        if not free:
            return False
        dist_c: dict[int, Cost] = {c: (0.0, 0.0) for c in free}
        prev_c: dict[int, int] = {c: -1 for c in free}  # cand -> lesion it was reached from
        dist_r: dict[int, Cost] = {}
        prev_r: dict[int, int] = {}
        changed = True
        rounds = 0
        limit = len(self.match_c) + len(self.match_r) + 2
        while changed and rounds <= limit:
            changed = False
            rounds += 1
            for c in sorted(dist_c):
                dc = dist_c[c]
                for r in self.adj[c]:
                    if self.match_c[c] == r:
                        continue
                    nd = _add(dc, self.edges[(c, r)])
                    if r not in dist_r or nd < dist_r[r]:
                        dist_r[r], prev_r[r] = nd, c
                        changed = True
                        c2 = self.match_r[r]
                        if c2 >= 0:
                            nd2 = _add(nd, _neg(self.edges[(c2, r)]))
                            if c2 not in dist_c or nd2 < dist_c[c2]:
                                dist_c[c2], prev_c[c2] = nd2, r
        targets = [r for r in dist_r if self.match_r[r] < 0]
        if not targets:
            return False
        end = min(targets, key=lambda r: (dist_r[r], r))
        path: list[int] = []
        r = end
        while True:
            c = prev_r[r]
            path[:0] = [c, r]
            r = prev_c[c]
            if r < 0:
                break
        self._apply(path)
        return True

    def augment_bfs(self, source: int) -> bool:
        """Shortest (fewest edges) augmenting path from one free candidate, neighbours in cost
        order; never unmatches a matched lesion or candidate."""
        if self.match_c[source] >= 0:
            return False
        prev_r: dict[int, int] = {}
        queue = deque([source])
        seen_c = {source}
        while queue:
            c = queue.popleft()
            for r in self.adj[c]:
                if r in prev_r:
                    continue
                prev_r[r] = c
                c2 = self.match_r[r]
                if c2 < 0:
                    path: list[int] = []
                    rr = r
                    while True:
                        cc = prev_r[rr]
                        path[:0] = [cc, rr]
                        if cc == source:
                            break
                        rr = self.match_c[cc]
                    self._apply(path)
                    return True
                if c2 not in seen_c:
                    seen_c.add(c2)
                    queue.append(c2)
        return False


def _edges(pairs: PairTable, rule: MatchRule, scores: np.ndarray) -> dict[tuple[int, int], Cost]:
    """Lexicographic pair costs keyed (candidate, lesion): (localisation cost, -score)."""
    if rule.criterion == "distance":
        primary = pairs.distance_mm if rule.distance_unit == "mm" else pairs.distance_vox
        primary = primary.astype(np.float64)
    else:
        primary = -pairs.overlap.astype(np.float64)
    return {(int(c), int(r)): (float(p), -float(scores[c]))
            for r, c, p in zip(pairs.ref, pairs.cand, primary)}


def _assign(n_ref: int, n_cand: int, edges: dict[tuple[int, int], Cost], active: np.ndarray,
            scores: np.ndarray, assignment: str) -> np.ndarray:
    """One-to-one assignment among ``active`` candidates; returns lesion index per candidate."""
    sub = {e: w for e, w in edges.items() if active[e[0]]}
    g = _Bipartite(n_cand, n_ref, sub)
    if assignment == "optimal":
        sources = [int(c) for c in np.flatnonzero(active) if g.adj[c]]
        while g.augment_min_cost(sources):
            pass
    elif assignment == "greedy_pair":
        for (c, r) in sorted(sub, key=lambda e: (sub[e], e)):
            if g.match_c[c] < 0 and g.match_r[r] < 0:
                g._apply([c, r])
    elif assignment == "greedy_confidence":
        order = sorted(np.flatnonzero(active), key=lambda c: (-scores[c], c))
        for c in order:
            for r in g.adj[c]:  # cost order
                if g.match_r[r] < 0:
                    g._apply([int(c), r])
                    break
    else:  # pragma: no cover - validated earlier
        raise ConfigurationError(f"unknown assignment {assignment!r}")
    return np.array(g.match_c, dtype=np.int64)


def _sweep(n_ref: int, n_cand: int, edges: dict[tuple[int, int], Cost], active: np.ndarray,
           scores: np.ndarray, rule: MatchRule) -> tuple[np.ndarray, np.ndarray]:
    """Threshold sweep: per-lesion hit score and per-candidate 'matched' flag."""
    hit = np.full(n_ref, np.nan)
    matched = np.zeros(n_cand, dtype=bool)
    order = sorted(np.flatnonzero(active), key=lambda c: (-scores[c], c))
    if rule.assignment == "many_to_many":
        for (c, r) in edges:
            if active[c]:
                matched[c] = True
                hit[r] = scores[c] if np.isnan(hit[r]) else max(hit[r], scores[c])
        return hit, matched
    if rule.assignment == "greedy_pair":
        match_c = _assign(n_ref, n_cand, edges, active, scores, "greedy_pair")
        for c, r in enumerate(match_c):
            if r >= 0:
                matched[c] = True
                hit[r] = scores[c]
        return hit, matched
    sub = {e: w for e, w in edges.items() if active[e[0]]}
    g = _Bipartite(n_cand, n_ref, sub)
    for c in order:
        c = int(c)
        before = set(r for r in range(n_ref) if g.match_r[r] >= 0) if rule.assignment == "optimal" else None
        if rule.assignment == "optimal":
            ok = g.augment_bfs(c)
        else:  # greedy_confidence
            ok = False
            for r in g.adj[c]:
                if g.match_r[r] < 0:
                    g._apply([c, r])
                    ok = True
                    break
        if ok:
            matched[c] = True
            if before is None:
                hit[g.match_c[c]] = scores[c]
            else:
                new = [r for r in range(n_ref) if g.match_r[r] >= 0 and r not in before]
                for r in new:
                    hit[r] = scores[c]
    return hit, matched


def _merge_nms(cands: pd.DataFrame, active: np.ndarray, rule: MatchRule) -> np.ndarray:
    """Boolean mask of candidates suppressed by a higher-scored candidate within merge_within."""
    merged = np.zeros(len(cands), dtype=bool)
    if rule.merge_within is None or len(cands) == 0:
        return merged
    cols = ["x_mm", "y_mm", "z_mm"] if rule.distance_unit == "mm" else ["i", "j", "k"]
    pts = cands[cols].to_numpy(np.float64)
    scores = cands["score"].to_numpy(np.float64)
    kept: list[int] = []
    for c in sorted(np.flatnonzero(active), key=lambda c: (-scores[c], c)):
        if kept and np.min(np.linalg.norm(pts[kept] - pts[c], axis=1)) < rule.merge_within:
            merged[c] = True
        else:
            kept.append(int(c))
    return merged


MATCH_COLUMNS: tuple[str, ...] = (
    "scan_id", "kind", "lesion_id", "candidate_id", "outcome", "score", "hit_score",
    "sweep_status", "distance_mm", "distance_vox", "overlap_voxels", "dice",
    "x_mm", "y_mm", "z_mm", "diameter_mm", "volume_mm3", "n_voxels", "location", "mask_source",
)


def match_scan(lesions: pd.DataFrame, candidates: pd.DataFrame, rule: MatchRule, *,
               scan_id: str, ref_labels: np.ndarray | None = None,
               cand_labels: np.ndarray | None = None) -> pd.DataFrame:
    """Match one scan's candidates to its reference lesions.

    Parameters
    ----------
    lesions
        Reference lesion table (:data:`cmbbench.model.LESION_COLUMNS`).
    candidates
        Candidate table (:data:`cmbbench.model.CANDIDATE_COLUMNS`), all candidates above the
        rule's floor.
    rule
        The matching rule.
    ref_labels, cand_labels
        Instance label maps on the scan's grid (values = ``lesion_id`` / ``candidate_id``), when
        the reference / prediction has voxels.

    Returns
    -------
    pandas.DataFrame
        The per-lesion/per-candidate table (:data:`MATCH_COLUMNS`): one ``kind == "reference"``
        row per lesion (outcome TP or FN at the operating point, its partner, ``hit_score`` for
        the sweep) and one ``kind == "candidate"`` row per candidate (outcome TP, FP, ignored,
        merged or below_threshold; ``sweep_status`` TP, FP, ignored or merged).

    Raises
    ------
    ConsistencyError
        If the counts violate TP + FN = #lesions or TP + FP + ignored + merged + below = #candidates.
    """
    lesions = lesions.reset_index(drop=True)
    candidates = candidates.reset_index(drop=True)
    n_r, n_c = len(lesions), len(candidates)
    scores = candidates["score"].to_numpy(np.float64) if n_c else np.zeros(0)
    pairs = candidate_pairs(lesions, candidates, rule, ref_labels=ref_labels,
                            cand_labels=cand_labels)
    edges = _edges(pairs, rule, scores)
    pair_index = {(int(r), int(c)): n for n, (r, c) in enumerate(zip(pairs.ref, pairs.cand))}
    has_pair = np.zeros(n_c, dtype=bool)
    has_pair[pairs.cand] = True

    above_floor = np.ones(n_c, dtype=bool)
    merged = _merge_nms(candidates, above_floor, rule)
    live = above_floor & ~merged
    at_op = live & (scores >= rule.operating_threshold)

    # --- operating point -------------------------------------------------------------------
    if rule.one_to_one:
        match_c = _assign(n_r, n_c, edges, at_op, scores, rule.assignment)
        ref_partner = np.full(n_r, -1, dtype=np.int64)
        for c, r in enumerate(match_c):
            if r >= 0:
                ref_partner[r] = c
        cand_partner = match_c
        cand_tp = match_c >= 0
        ref_tp = ref_partner >= 0
    else:
        ref_partner = np.full(n_r, -1, dtype=np.int64)
        cand_partner = np.full(n_c, -1, dtype=np.int64)
        best: dict[int, tuple[Cost, int]] = {}
        best_c: dict[int, tuple[Cost, int]] = {}
        for (c, r), w in edges.items():
            if at_op[c]:
                if r not in best or (w, c) < best[r]:
                    best[r] = (w, c)
                if c not in best_c or (w, r) < best_c[c]:
                    best_c[c] = (w, r)
        for r, (_, c) in best.items():
            ref_partner[r] = c
        for c, (_, r) in best_c.items():
            cand_partner[c] = r
        ref_tp = ref_partner >= 0
        cand_tp = cand_partner >= 0

    dup_label = "FP" if rule.duplicates == "fp" else "ignored"
    cand_outcome = np.full(n_c, "below_threshold", dtype=object)
    cand_outcome[at_op] = "FP"
    cand_outcome[at_op & has_pair & ~cand_tp] = dup_label
    cand_outcome[cand_tp] = "TP"
    cand_outcome[merged] = "merged"

    # --- sweep -----------------------------------------------------------------------------
    hit, swept = _sweep(n_r, n_c, edges, live, scores, rule)
    sweep_status = np.full(n_c, "FP", dtype=object)
    sweep_status[has_pair & ~swept] = dup_label
    sweep_status[swept] = "TP"
    sweep_status[merged] = "merged"

    # --- consistency checks (evalutils-style invariants) ------------------------------------
    n_tp_ref = int(ref_tp.sum())
    counts = {o: int((cand_outcome == o).sum()) for o in
              ("TP", "FP", "ignored", "merged", "below_threshold")}
    if n_tp_ref + int((~ref_tp).sum()) != n_r:
        raise ConsistencyError(f"scan {scan_id}: TP + FN != number of reference lesions")
    if sum(counts.values()) != n_c:
        raise ConsistencyError(f"scan {scan_id}: candidate outcomes do not add up")
    if rule.one_to_one and n_tp_ref != counts["TP"]:
        raise ConsistencyError(f"scan {scan_id}: one-to-one rule gave {n_tp_ref} detected "
                               f"lesions but {counts['TP']} TP candidates")

    # --- table ---------------------------------------------------------------------------------
    def pair_values(r: int, c: int) -> tuple[float, float, int, float]:
        n = pair_index.get((r, c))
        if n is None:
            return (np.nan, np.nan, 0, np.nan)
        ov = int(pairs.overlap[n])
        nr = int(lesions.at[r, "n_voxels"])
        nc = int(candidates.at[c, "n_voxels"])
        dice = 2.0 * ov / (nr + nc) if (nr > 0 and nc > 0) else np.nan
        return (float(pairs.distance_mm[n]), float(pairs.distance_vox[n]), ov, dice)

    rows: list[dict] = []
    for r in range(n_r):
        c = int(ref_partner[r])
        d_mm, d_vox, ov, dice = pair_values(r, c) if c >= 0 else (np.nan, np.nan, 0, np.nan)
        rows.append({
            "scan_id": scan_id, "kind": "reference",
            "lesion_id": int(lesions.at[r, "lesion_id"]),
            "candidate_id": int(candidates.at[c, "candidate_id"]) if c >= 0 else -1,
            "outcome": "TP" if ref_tp[r] else "FN",
            "score": float(scores[c]) if c >= 0 else np.nan,
            "hit_score": float(hit[r]), "sweep_status": "",
            "distance_mm": d_mm, "distance_vox": d_vox, "overlap_voxels": ov, "dice": dice,
            "x_mm": float(lesions.at[r, "x_mm"]), "y_mm": float(lesions.at[r, "y_mm"]),
            "z_mm": float(lesions.at[r, "z_mm"]),
            "diameter_mm": float(lesions.at[r, "diameter_mm"]),
            "volume_mm3": float(lesions.at[r, "volume_mm3"]),
            "n_voxels": int(lesions.at[r, "n_voxels"]),
            "location": str(lesions.at[r, "location"]),
            "mask_source": str(lesions.at[r, "mask_source"]),
        })
    for c in range(n_c):
        r = int(cand_partner[c])
        d_mm, d_vox, ov, dice = pair_values(r, c) if r >= 0 else (np.nan, np.nan, 0, np.nan)
        rows.append({
            "scan_id": scan_id, "kind": "candidate",
            "lesion_id": int(lesions.at[r, "lesion_id"]) if r >= 0 else -1,
            "candidate_id": int(candidates.at[c, "candidate_id"]),
            "outcome": str(cand_outcome[c]), "score": float(scores[c]),
            "hit_score": np.nan, "sweep_status": str(sweep_status[c]),
            "distance_mm": d_mm, "distance_vox": d_vox, "overlap_voxels": ov, "dice": dice,
            "x_mm": float(candidates.at[c, "x_mm"]), "y_mm": float(candidates.at[c, "y_mm"]),
            "z_mm": float(candidates.at[c, "z_mm"]),
            "diameter_mm": np.nan,
            "volume_mm3": float(candidates.at[c, "volume_mm3"]),
            "n_voxels": int(candidates.at[c, "n_voxels"]),
            "location": "", "mask_source": "",
        })
    return pd.DataFrame(rows, columns=list(MATCH_COLUMNS))

"""Choice of the post-processing variant and the operating threshold of "ours" on validation
scans (:func:`calibrate`), and the best-F1 operating point of a set of match tables
(:func:`operating_point`). Thresholds are on the candidate score (probability, or the
tempered log-odds of :func:`.infer.tempered`); all scoring is cmbbench's, rule ``cmbbench``,
on each scan's native grid."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from .infer import sliding_window, tempered
from .plugin import Ours
from .postprocess import RULES
from .training_data import ValSet, score_native

__all__ = ["calibrate", "operating_point"]

log = logging.getLogger(__name__)


def calibrate(model: torch.nn.Module, val: ValSet, infer: dict, *,
              surfaces: tuple[float, ...] = (2.0, 0.0), scores: tuple[str, ...] = ("prob", "logit"),
              progress: Callable[[str], None] | None = None) -> dict:
    """Choose the post-processing variant and the operating threshold on validation scans.

    Variants: all location rules with each surface band width in ``surfaces`` (mm), the brain
    mask rule alone, and no post-processing, each with ``scores`` (``prob``: mean probability;
    ``logit``: tempered mean log-odds, named ``<variant>+logit``; both maps come from one
    sliding-window pass). The variant with the highest CPM (threshold-free; ties: the
    earlier, more conservative one, ``prob`` before ``logit``) is kept; its operating
    threshold lies halfway between the candidate score that maximises the pooled F1 over the
    validation scans (rule ``cmbbench``) and the next lower score, unclipped up to 1 - 1e-6
    (saturated networks). Returns the ``operating`` record stored in the checkpoint JSON (with
    every variant's numbers, ``rules``, ``surface_mm`` and ``score``).
    """
    from ...matching import get_rule

    say = progress or (lambda m: log.info(m))
    rule = get_rule("cmbbench")
    meth = Ours(threshold=float(infer.get("threshold", 0.1)), patch=int(infer.get("patch", 96)),
                overlap=float(infer.get("overlap", 0.15)), postprocess=True)
    meth.model, meth.meta = model, {}
    model.eval()
    # (name, surface band mm, rules, score); rules None = no post-processing
    base = ([(f"surface_{s:g}mm", float(s), RULES) for s in surfaces]
            + [("mask_only", 0.0, ("mask",)), ("none", 0.0, None)])
    specs: list[tuple[str, float, tuple[str, ...] | None, str]] = [
        (n + ("" if sc == "prob" else f"+{sc}"), sf, rl, sc) for sc in scores
        for n, sf, rl in base]
    names = [sp[0] for sp in specs]
    acc: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    t0 = time.perf_counter()
    for item in val.items:
        pre = item[1]
        prob, logodds = sliding_window(model, pre.image, pre.mask, patch=meth.patch,
                                       overlap=meth.overlap, output="both")
        raw_of = {"prob": prob, "logit": tempered(logodds)}
        for name, surf, rules, sc in specs:
            meth._surface_mm = surf
            meth._rules = rules or RULES
            meth._score = sc
            after, rows, before = meth.postprocess_work(raw_of[sc], pre)
            pp = rules is not None
            table, extras = score_native(meth, after if pp else before, rows, item, rule,
                                         postprocess=pp)
            acc[name][0].append(table)
            acc[name][1].append(extras)
    ids = [i[0] for i in val.items]
    variants = {}
    score_of = {sp[0]: sp[3] for sp in specs}
    for name, (tables, extras) in acc.items():
        meth._score = score_of[name]
        variants[name] = operating_point(tables, extras, ids, rule,
                                         floor=meth._level(meth.threshold))
        say(f"calibration {name}: CPM {variants[name]['cpm']:.3f}, best F1 "
            f"{variants[name]['f1']:.3f} at threshold {variants[name]['threshold']:.6f}")
    chosen = max(names, key=lambda n: (np.nan_to_num(variants[n]["cpm"], nan=-1.0),
                                       -names.index(n)))
    v = variants[chosen]
    _, surf, rules, sc = next(sp for sp in specs if sp[0] == chosen)
    meth._score = sc
    op = {"postprocess": rules is not None, "surface_mm": surf, "rules": list(rules or ()),
          "score": sc,
          "threshold": float(np.clip(v["threshold"], meth._level(meth.threshold),
                                     1.0 - 1e-6)),
          "chosen": chosen, "variants": variants, "scans": ids, "rule": rule.rule_id,
          "dataset": {"name": val.ref.name, "version": val.ref.version},
          "seconds": round(time.perf_counter() - t0, 1)}
    return op


def operating_point(tables: list[pd.DataFrame], extras: list[dict], ids: list[str],
                    rule, *, floor: float) -> dict:  # noqa: ANN001
    """CPM of per-scan match ``tables`` and the operating threshold that maximises the pooled
    F1 (candidate scores at or above ``floor`` only).

    The threshold lies halfway between the best-F1 candidate's score and the next lower
    score, so that rounding can never move that candidate across the operating point.
    Returns ``cpm``, ``f1_at_0.5``, ``threshold``, and ``f1``/``precision``/``recall``/
    ``fp_per_scan`` at that threshold.
    """
    from ...matching import MATCH_COLUMNS
    from ...metrics import scan_table
    from ...scoring import ScoreResult

    ne = [t for t in tables if len(t)]
    table = pd.concat(ne, ignore_index=True) if ne else pd.DataFrame(columns=MATCH_COLUMNS)
    res = ScoreResult.from_tables(table, scan_table(table, ids, extra=pd.DataFrame(extras)),
                                  rule, n_boot=0)
    fr = res.froc
    fr = fr[np.isfinite(fr["threshold"]) & (fr["threshold"] >= floor)]
    p_, r_ = fr["precision"].fillna(0).to_numpy(), fr["sensitivity"].fillna(0).to_numpy()
    f1 = np.where(p_ + r_ > 0, 2 * p_ * r_ / np.maximum(p_ + r_, 1e-12), 0.0)
    best = int(np.argmax(f1)) if len(f1) else -1
    thr = 0.5
    if best >= 0:
        t_best = float(fr["threshold"].iloc[best])
        below = fr["threshold"][fr["threshold"] < t_best]
        thr = 0.5 * (t_best + float(below.max())) if len(below) else t_best
    return {"cpm": float(res.aggregates["cpm"]),
            "f1_at_0.5": float(res.aggregates["f1_pooled"]),
            "threshold": thr,
            "f1": float(f1[best]) if best >= 0 else 0.0,
            "precision": float(p_[best]) if best >= 0 else 0.0,
            "recall": float(r_[best]) if best >= 0 else 0.0,
            "fp_per_scan": float(fr["fp_per_scan"].iloc[best]) if best >= 0 else 0.0}

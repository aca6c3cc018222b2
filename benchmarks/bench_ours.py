"""Benchmark of "ours" inference: a 512 x 512 x 150 scan (0.45 x 0.45 x 1.0 mm, the DOU-like
high-resolution case) on the CPU with the shipped checkpoint; wall time and peak memory.

Usage: python benchmarks/bench_ours.py [--threads 2] [--tta] [--shape 512 512 150]
Targets (issue 5): <= 60 s and <= 6 GB peak RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def head_phantom(shape, spacing, seed=0):
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum((((gi - (n - 1) / 2) * s) / (0.42 * n * s)) ** 2 for gi, n, s in zip(g, shape, sp))
    img = np.where(r2 < 1, 1.0, 0.03).astype(np.float32)
    img += rng.normal(0, 0.05, shape).astype(np.float32)
    return img


def report(dataset: str, max_scans: int | None, threads: int) -> None:
    """Pooled P/R/F1, FP/scan and CPM with and without post-processing (cmbbench rule)."""
    import torch

    from cmbbench.dataset import read_dataset
    from cmbbench.methods.ours.plugin import Ours
    from cmbbench.methods.ours.training_data import DataRef, ValSet, from_dataset
    from cmbbench.registry import resolve_dataset

    torch.set_num_threads(threads)
    ds = read_dataset(resolve_dataset(dataset))
    ids = ds.scan_ids[:max_scans]
    m = Ours()
    m.load()
    t0 = time.perf_counter()
    val = ValSet(DataRef(ds.name, str(ds.card.get("version", "")), ds.root,
                          from_dataset(ds, ids)), m.work_mm)
    res = val.score_both(m.model, {}, keys=(
        "cpm", "precision_pooled", "recall_pooled", "f1_pooled", "fp_per_scan",
        "precision_mean", "recall_mean", "f1_mean"))
    print(json.dumps({"dataset": ds.name, "n_scans": len(ids), "checkpoint_sha256":
                      m.meta.get("sha256"), "seconds": round(time.perf_counter() - t0, 1),
                      **res}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.45, 0.45, 1.0))
    ap.add_argument("--report", default=None, metavar="DATASET",
                    help="instead: score the shipped checkpoint on DATASET (name or folder) "
                         "with and without the location post-processing (one inference)")
    ap.add_argument("--max-scans", type=int, default=None)
    a = ap.parse_args()
    if a.report:
        report(a.report, a.max_scans, a.threads)
        return
    import torch

    from cmbbench.methods.api import ScanInput
    from cmbbench.methods.ours.plugin import Ours

    torch.set_num_threads(a.threads)
    img = head_phantom(tuple(a.shape), a.spacing)
    aff = np.diag([*a.spacing, 1.0])
    m = Ours(tta=a.tta, threads=a.threads)
    m.load()
    t0 = time.perf_counter()
    pred = m.predict(ScanInput("bench", img, aff))
    dt = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"shape": list(a.shape), "spacing_mm": list(a.spacing), "threads": a.threads,
                      "tta": a.tta, "seconds": round(dt, 1), "peak_rss_gb": round(peak_gb, 2),
                      "n_candidates": len(pred.candidates),
                      "meets_60s": dt <= 60, "meets_6gb": peak_gb <= 6}))


if __name__ == "__main__":
    main()

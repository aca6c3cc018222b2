"""Bootstrap confidence intervals that resample scans (never lesions).

A bootstrap replicate draws ``n_scans`` scans with replacement; it is represented by per-scan
multiplicities (multinomial weights) and every metric is recomputed by
:func:`cmbbench.metrics.aggregate` on the same prepared arrays. The seed and the number of
replicates are returned with the intervals so a result can be reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import PreparedTables, aggregate

__all__ = ["BootstrapResult", "bootstrap_ci"]


@dataclass
class BootstrapResult:
    """Percentile intervals per metric.

    Attributes
    ----------
    lower, upper
        Metric name -> bound (NaN when the metric is undefined in too many replicates).
    n_boot, seed, confidence
        The recipe: number of replicates, RNG seed (numpy ``default_rng``), level.
    """

    lower: dict[str, float]
    upper: dict[str, float]
    n_boot: int
    seed: int
    confidence: float


def bootstrap_ci(prep: PreparedTables, *, operating_threshold: float, n_boot: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
    """Percentile bootstrap CIs over scans for every metric of :func:`aggregate`.

    Replicates in which a metric is undefined (NaN) are left out for that metric; if more than
    half are undefined the interval is NaN.
    """
    n = len(prep.scans)
    rng = np.random.default_rng(seed)
    if n == 0 or n_boot <= 0:
        return BootstrapResult({}, {}, n_boot, seed, confidence)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        w = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
        for k, v in aggregate(prep, operating_threshold=operating_threshold, weights=w).items():
            samples.setdefault(k, []).append(v)
    alpha = (1.0 - confidence) / 2.0
    lower, upper = {}, {}
    for k, vals in samples.items():
        arr = np.asarray(vals, dtype=np.float64)
        ok = arr[~np.isnan(arr)]
        if ok.size * 2 < arr.size or ok.size == 0:
            lower[k] = upper[k] = float("nan")
        else:
            lower[k] = float(np.quantile(ok, alpha))
            upper[k] = float(np.quantile(ok, 1.0 - alpha))
    return BootstrapResult(lower, upper, n_boot, seed, confidence)

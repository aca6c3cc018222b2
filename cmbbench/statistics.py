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

__all__ = ["BootstrapResult", "bootstrap_ci", "bootstrap_weights", "percentile_interval"]


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


def bootstrap_weights(n_scans: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """Per-scan multiplicities of ``n_boot`` bootstrap replicates over ``n_scans`` scans.

    Row ``b`` says how many times each scan is drawn in replicate ``b`` (a multinomial draw of
    ``n_scans`` scans with replacement). The draws are those of :func:`bootstrap_ci` with the
    same ``seed``, so intervals computed from these weights (e.g. per stratum) use the very
    replicates of the overall intervals.

    Returns
    -------
    numpy.ndarray
        ``(n_boot, n_scans)`` float array (empty when either is 0).
    """
    rng = np.random.default_rng(seed)
    if n_scans <= 0 or n_boot <= 0:
        return np.zeros((max(n_boot, 0), max(n_scans, 0)))
    p = np.full(n_scans, 1.0 / n_scans)
    return np.stack([rng.multinomial(n_scans, p) for _ in range(n_boot)]).astype(np.float64)


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates of one metric.

    Replicates in which the metric is undefined (NaN) are left out; if more than half are
    undefined (or all are) the interval is ``(nan, nan)``.
    """
    arr = np.asarray(samples, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    if ok.size * 2 < arr.size or ok.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(ok, alpha)), float(np.quantile(ok, 1.0 - alpha))


def bootstrap_ci(prep: PreparedTables, *, operating_threshold: float, n_boot: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
    """Percentile bootstrap CIs over scans for every metric of :func:`aggregate`.

    Replicates in which a metric is undefined (NaN) are left out for that metric; if more than
    half are undefined the interval is NaN. The replicates are :func:`bootstrap_weights`.
    """
    n = len(prep.scans)
    if n == 0 or n_boot <= 0:
        return BootstrapResult({}, {}, n_boot, seed, confidence)
    samples: dict[str, list[float]] = {}
    for w in bootstrap_weights(n, n_boot, seed):
        for k, v in aggregate(prep, operating_threshold=operating_threshold, weights=w).items():
            samples.setdefault(k, []).append(v)
    lower, upper = {}, {}
    for k, vals in samples.items():
        lower[k], upper[k] = percentile_interval(np.asarray(vals), confidence)
    return BootstrapResult(lower, upper, n_boot, seed, confidence)

"""Speed of every method on one 512 x 512 x 150 scan (0.45 x 0.45 x 1.0 mm, the DOU geometry),
side by side: wall time of ``predict`` (weights already loaded) and peak RSS, each method in its
own process so that the peaks are its own.

Usage::

    python benchmarks/bench_methods_speed.py [--methods log bian2013 ours dou2016 sundaresan2023]
        [--threads 2] [--repeats 1] [--json out.json]

The scan is the head phantom of ``bench_ours.py`` (an ellipsoid of tissue with noise) with 12
dark spheres of 1-2.5 mm radius, so that the candidate stages have something to do; the
cascade baselines also pay for their false candidates on noise (dou2016 caps stage 1 at 300).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_METHODS = ["log", "bian2013", "ours", "dou2016", "sundaresan2023"]


def phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float],
            seed: int = 0) -> np.ndarray:
    """Head-like ellipsoid (tissue 1, air 0.03, noise 0.05) with 12 dark spheres."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_ours import head_phantom

    img = head_phantom(shape, spacing, seed)
    rng = np.random.default_rng(seed + 1)
    sp = np.asarray(spacing)
    for _ in range(12):
        c = np.array(shape) * rng.uniform(0.3, 0.7, 3)
        r = rng.uniform(1.0, 2.5)
        half = np.ceil(r / sp).astype(int) + 1
        lo = np.maximum(c.astype(int) - half, 0)
        hi = np.minimum(c.astype(int) + half + 1, shape)
        g = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in zip(lo, hi, c, sp)],
                        indexing="ij", sparse=True)
        ball = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= r * r
        img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][ball] = 0.2
    return img


def run_one(name: str, threads: int, repeats: int, shape: tuple, spacing: tuple) -> dict:
    """Time one method in this process."""
    import threadpoolctl

    from cmbbench.methods.api import ScanInput
    from cmbbench.methods.registry import load_method

    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch-free environment
        pass
    img = phantom(shape, spacing)
    aff = np.diag([*spacing, 1.0])
    method = load_method(name)
    t0 = time.perf_counter()
    method.load()
    load_s = time.perf_counter() - t0
    times, n_cand = [], 0
    with threadpoolctl.threadpool_limits(threads):
        for _ in range(repeats):
            t0 = time.perf_counter()
            pred = method.predict(ScanInput("bench", img, aff, sequence="SWI"))
            times.append(time.perf_counter() - t0)
            n_cand = 0 if pred.candidates is None else len(pred.candidates)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"method": name, "seconds": round(min(times), 1), "seconds_all": [round(t, 1) for t
                                                                            in times],
            "load_seconds": round(load_s, 2), "peak_rss_gb": round(peak, 2),
            "n_candidates": n_cand, "threads": threads, "shape": list(shape),
            "spacing_mm": list(spacing)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.45, 0.45, 1.0))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.threads, a.repeats, tuple(a.shape),
                                 tuple(a.spacing))))
        return
    rows = []
    for name in a.methods:
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(a.threads),
               "--repeats", str(a.repeats), "--shape", *map(str, a.shape),
               "--spacing", *map(str, a.spacing)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            rows.append({"method": name, "error": res.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"| method | seconds per {'x'.join(map(str, a.shape))} scan | peak RSS (GB) "
          f"| candidates |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | |")
        else:
            print(f"| {r['method']} | {r['seconds']} | {r['peak_rss_gb']} | {r['n_candidates']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Execution scaling: scans/minute of one method on a SYNTH dataset, serial vs local vs Dask.

Usage::

    python benchmarks/bench_execution.py [--dataset NAME|DIR] [--n-scans 8] [--size small|tiny]
                                         [--method log] [--workers 2] [--repeats 1]
                                         [--json out.json]

What runs
---------
``cmbbench.evaluation.predict_dataset`` of ``--method`` (an installed method; default ``log``,
the LoG baseline, or a built-in dark-blob thresholder when it is not installed) on every scan
of the dataset, into a fresh run directory, once per backend:

- ``serial``: in this process;
- ``local``: a process pool of ``--workers`` processes (spawn);
- ``dask``: a Dask ``LocalCluster`` of ``--workers`` single-threaded processes on 127.0.0.1.

The dataset is ``--dataset`` (a registry name such as SYNTH-demo, or a folder), or a synthetic
recipe of ``--n-scans`` scans generated once into ``--data-dir`` and reused: ``--size small``
(default; 160-180 mm in-plane field of view, 90 mm slab) or ``--size tiny`` (the tests' recipe:
80 x 80 mm, 36 mm slab).

What is measured
----------------
- ``end-to-end s``: wall time of ``predict_dataset`` with the backend's own start-up (pool or
  cluster start, worker imports, method load) and shutdown: what a user waits for.
- ``warm s``: the same run on an executor started (and its worker processes warmed up with a
  task importing cmbbench) beforehand: pool/cluster start-up excluded; each worker still
  imports and loads the method on its first scan.
- ``scans/min`` for both, and each backend's ratio to serial (``speed-up``; > 1 is faster).

Every backend's predicted maps must be identical (sha256 per scan); the script exits with
status 1 otherwise. Ratios depend on the scan size: with tiny scans the start-up dominates,
with real scans (minutes each) the ratio tends to the number of workers on free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmbbench.dataset import read_dataset
from cmbbench.evaluation import predict_dataset
from cmbbench.execution import make_executor
from cmbbench.methods.api import Method, Prediction


class DarkBlobBench(Method):
    """Fallback workload when ``--method`` is not installed: a Gaussian-smoothed darkness map."""

    name = "bench-dark-blob"
    version = "1"
    citation = "cmbbench benchmark"

    def predict(self, scan):
        from scipy import ndimage as ndi

        img = scan.image.astype(np.float32)
        smooth = ndi.gaussian_filter(img, 1.0)
        local = ndi.uniform_filter(smooth, 9)
        z = (local - smooth) / (np.std(img) + 1e-6)
        return Prediction(probability=(1.0 / (1.0 + np.exp(-(z - 2.0) * 3.0))).astype(np.float32))


SIZES = {
    # the test suite's tiny recipe: 80 x 80 mm, 36 mm slab (about 0.1 s per scan for log)
    "tiny": dict(fov_mm=(80.0, 80.0), slab_mm=36.0, inplane_mm=(1.0, 1.0), max_cmbs_per_scan=4,
                 medullary_veins=(2, 3), cortical_veins=(1, 2)),
    # a head-sized in-plane field of view on a 90 mm slab (about 1 s per scan for log)
    "small": dict(fov_mm=(160.0, 180.0), slab_mm=90.0, inplane_mm=(0.8, 1.0),
                  max_cmbs_per_scan=6),
}


def _bench_dataset(data_dir: Path, n_scans: int, size: str) -> Path:
    from cmbbench.synth.make import make_dataset
    from cmbbench.synth.recipe import SynthRecipe

    recipe = SynthRecipe(name=f"SYNTH-bench-{size}", seed=1, n_scans=n_scans, **SIZES[size])
    out = data_dir / f"{recipe.name}-{n_scans}"
    if not (out / "dataset.json").is_file():
        print(f"generating {recipe.name} ({n_scans} scans) into {out} ...", file=sys.stderr)
        make_dataset(recipe, out, workers=min(2, os.cpu_count() or 1))
    return out


def _warm_up(seconds: float) -> int:
    """Runs in a worker: import what a scan task imports, then hold the worker a moment so
    that each warm-up task lands on its own worker."""
    import scipy.ndimage  # noqa: F401

    import cmbbench.nifti
    import cmbbench.runs  # noqa: F401

    time.sleep(seconds)
    return os.getpid()


def _maps_digest(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted((run_dir / "shards").glob("*.json")):
        shard = json.loads(p.read_text())
        out[p.stem] = shard.get("sha256") or json.dumps(shard.get("candidates"))
    return out


def _one(method: object, ds_root: Path, backend: str, workers: int, warm: bool,
         scratch: Path, tag: str) -> tuple[float, dict[str, str], dict]:
    out = scratch / f"{backend}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    kw: dict = {} if backend == "serial" else {"workers": workers}
    if not warm:
        t0 = time.perf_counter()
        report = predict_dataset(method, ds_root, out, backend=backend, **kw)
        seconds = time.perf_counter() - t0
    else:
        ex = make_executor(backend, **kw)
        ex.start()
        # start every worker process and import the task's modules before the clock starts
        for fut in ex.as_completed([ex.submit(_warm_up, 0.5) for _ in range(workers)]):
            fut.result()
        try:
            t0 = time.perf_counter()
            report = predict_dataset(method, ds_root, out, executor=ex)
            seconds = time.perf_counter() - t0
        finally:
            ex.shutdown()
    if report.failed:
        raise SystemExit(f"{backend}: {len(report.failed)} scan(s) failed: {report.failed}")
    return seconds, _maps_digest(out), report.backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None, help="registry name or folder [default: a tiny "
                                                    "SYNTH recipe generated into --data-dir]")
    ap.add_argument("--n-scans", type=int, default=8)
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="generated recipe when no --dataset is given")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "cmbbench-bench-data")
    ap.add_argument("--method", default="log")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per backend (best kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    if args.dataset:
        from cmbbench.registry import resolve_dataset

        ds_root = resolve_dataset(args.dataset)
    else:
        ds_root = _bench_dataset(args.data_dir, args.n_scans, args.size)
    ds = read_dataset(ds_root)
    n = len(ds.scan_ids)

    from cmbbench.methods.registry import available_methods

    method: object = args.method
    if args.method not in available_methods():
        print(f"method {args.method!r} is not installed; using the built-in "
              f"{DarkBlobBench.name}", file=sys.stderr)
        method = DarkBlobBench
    method_name = method if isinstance(method, str) else DarkBlobBench.name

    backends = ["serial", "local", "dask"]
    try:
        import distributed  # noqa: F401
    except ImportError:
        print("dask[distributed] is not installed: the dask backend is skipped", file=sys.stderr)
        backends.remove("dask")

    scratch = Path(tempfile.mkdtemp(prefix="cmbbench-bench-exec-"))
    rows, digests = [], {}
    try:
        for backend in backends:
            for warm in (False, True):
                if warm and backend == "serial":
                    continue
                best, described = float("inf"), {}
                for r in range(args.repeats):
                    sec, dig, described = _one(method, ds_root, backend, args.workers, warm,
                                               scratch, f"{'warm' if warm else 'cold'}{r}")
                    best = min(best, sec)
                    digests[(backend, warm, r)] = dig
                rows.append({"backend": backend, "workers": described.get("workers", 1),
                             "mode": "warm" if warm else "end-to-end", "seconds": best,
                             "scans_per_min": 60.0 * n / best})
                print(f"  {backend:<7} {rows[-1]['mode']:<11} {best:7.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ref = digests[("serial", False, 0)]
    identical = all(d == ref for d in digests.values()) and len(ref) == n
    serial_s = next(r["seconds"] for r in rows if r["backend"] == "serial")
    for r in rows:
        r["speedup_vs_serial"] = serial_s / r["seconds"]

    mvox = [np.prod([int(x) for x in str(sh).split("x")]) / 1e6 for sh in ds.scans["shape"]]
    print(f"\nexecution scaling: method {method_name} on {ds.name} ({n} scans, "
          f"{np.mean(mvox):.2f} Mvoxels per scan on average), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    print(f"{'backend':<9}{'workers':>8}  {'mode':<12}{'seconds':>9}{'scans/min':>11}"
          f"{'vs serial':>11}")
    for r in rows:
        print(f"{r['backend']:<9}{r['workers']:>8}  {r['mode']:<12}{r['seconds']:>9.2f}"
              f"{r['scans_per_min']:>11.1f}{r['speedup_vs_serial']:>10.2f}x")
    print(f"predicted maps identical across backends: {'yes' if identical else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({
            "method": method_name, "dataset": ds.name, "n_scans": n, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "rows": rows, "identical": identical},
            indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

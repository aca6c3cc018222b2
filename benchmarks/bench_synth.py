"""Speed of the synthetic generator.

1. One whole-brain 256 x 256 scan (0.9 mm in-plane, 1 mm slices, 3 T SWI: 256 x 256 x ~164
   voxels) with 10 CMBs and the recipe's mimics, on one core (BLAS/OpenMP threads = 1, set
   before numpy is imported). Target: <= 10 s.
2. ``SYNTH-demo`` generated from scratch with 2 worker processes into a temporary folder.
   Target: <= 120 s.

No peer tool generates CMBs on real anatomy, so there is no side-by-side ratio; the numbers are
wall-clock seconds on this machine (``python benchmarks/bench_synth.py [--repeats N]``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from cmbbench.synth.anatomy import load_atlas  # noqa: E402
from cmbbench.synth.generator import generate_scan  # noqa: E402
from cmbbench.synth.make import make_dataset  # noqa: E402
from cmbbench.synth.recipe import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()

    atlas = load_atlas()
    _ = atlas.mars  # derived once per process; not part of a scan's cost
    recipe = dataclasses.replace(load_recipe("SYNTH-demo"), fov_mm=(230.4, 230.4))
    overrides = dict(protocol="swi_3t_3d", inplane_mm=0.9, slice_thickness_mm=1.0, gap_mm=0.0,
                     n_cmb=10)
    times, cpu = [], []
    for n in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        scan = generate_scan(recipe, 100 + n, atlas=atlas, overrides=overrides)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"scan {n}: shape {scan.image.shape}, {len(scan.lesions)} CMBs, "
              f"{len(scan.mimics)} mimics, wall {times[-1]:.2f} s, CPU {cpu[-1]:.2f} s")
    # the generator runs single-threaded, so CPU time is its one-core cost even when other
    # processes share the machine (wall time then includes waiting for the core)
    print(f"whole-brain 256x256 scan, one core: median CPU {statistics.median(cpu):.2f} s, "
          f"median wall {statistics.median(times):.2f} s, load {os.getloadavg()[0]:.1f} "
          f"(target <= 10 s)")
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ds = make_dataset(load_recipe("SYNTH-demo"), tmp, workers=2)
            dt = time.perf_counter() - t0
        print(f"SYNTH-demo ({len(ds.scan_ids)} scans, {len(ds.lesions)} CMBs) with 2 workers: "
              f"{dt:.1f} s (target <= 120 s)")


if __name__ == "__main__":
    main()

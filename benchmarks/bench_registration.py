"""Quality and speed of the atlas registration behind the MARS lesion locations.

For every scan of a prepared synthetic dataset (default ``SYNTH-val``; its ``lesions.csv``
holds the true MARS class of each CMB, decided on the generator's own deformed atlas), the
bundled atlas is registered to the image by :func:`cmbbench.registration.register_atlas` and
each CMB is located by :func:`cmbbench.loaders.location.locate_lesions`. Reported: agreement of
the derived locations with the true ones (all CMBs; unknown counts as disagreement), per-class
confusion, registration Dice, cost and seconds per scan (one core: BLAS threads = 1).

``python benchmarks/bench_registration.py [--dataset SYNTH-val] [--limit N] [--json OUT]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import pandas as pd  # noqa: E402

from cmbbench.loaders.location import locate_lesions  # noqa: E402
from cmbbench.registry import resolve_dataset  # noqa: E402
from cmbbench.dataset import read_dataset  # noqa: E402
from cmbbench.synth.anatomy import load_atlas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="SYNTH-val")
    parser.add_argument("--limit", type=int, default=0, help="first N scans only")
    parser.add_argument("--all-scans", action="store_true",
                        help="also register scans without CMBs (Dice and time only)")
    parser.add_argument("--json", default=None, help="write per-scan rows to this JSON file")
    args = parser.parse_args()

    atlas = load_atlas()
    _ = atlas.mars  # derived once per process
    ds = read_dataset(resolve_dataset(args.dataset))
    ids = ds.scan_ids[: args.limit] if args.limit else ds.scan_ids
    rows, pairs = [], []
    for sid in ids:
        les = ds.lesions_of(sid)
        if not len(les) and not args.all_scans:
            continue
        vol = ds.read_image(sid)
        probe = les if len(les) else pd.DataFrame({"lesion_id": [0], "x_mm": [0.0],
                                                   "y_mm": [0.0], "z_mm": [0.0]})
        t = time.perf_counter()
        loc = locate_lesions(vol.data, vol.affine, probe, atlas=atlas)
        sec = time.perf_counter() - t
        reg = loc.registration
        rows.append({"scan_id": sid, "shape": "x".join(map(str, vol.data.shape)),
                     "dice": reg.dice, "cost": reg.cost, "cost_initial": reg.cost_initial,
                     "ok": reg.ok, "reason": reg.reason, "seconds": sec,
                     "n_eval": reg.n_evaluations, "n_cmb": len(les),
                     "agree": int(sum(a == b for a, b in zip(les["location"], loc.locations)))
                     if len(les) else 0})
        if len(les):
            pairs += list(zip(les["location"], loc.locations))
        r = rows[-1]
        print(f"{sid} {r['shape']:>12} Dice {r['dice']:.3f} cost {r['cost_initial']:.3f} -> "
              f"{r['cost']:.3f} {r['seconds']:.1f} s ok={r['ok']} agree {r['agree']}/{r['n_cmb']}"
              + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
    tab = pd.DataFrame(pairs, columns=["true", "derived"])
    n_agree = int((tab["true"] == tab["derived"]).sum())
    dice = [r["dice"] for r in rows]
    secs = [r["seconds"] for r in rows]
    print(f"\n{args.dataset}: {len(rows)} scans registered, {len(tab)} CMBs")
    print(f"location agreement: {n_agree}/{len(tab)} = {n_agree / max(len(tab), 1):.1%}")
    print(f"registration Dice: median {statistics.median(dice):.3f}, min {min(dice):.3f}; "
          f"accepted {sum(r['ok'] for r in rows)}/{len(rows)}")
    print(f"seconds per scan: median {statistics.median(secs):.1f}, max {max(secs):.1f}")
    print(pd.crosstab(tab["true"], tab["derived"]).to_string())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "agreement": n_agree / max(len(tab), 1)}, fh, indent=1,
                      default=str)


if __name__ == "__main__":
    main()

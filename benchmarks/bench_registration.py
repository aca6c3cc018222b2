"""Quality and speed of the atlas registration behind the MARS lesion locations.

For every scan of a prepared synthetic dataset (default ``SYNTH-val``; its ``lesions.csv``
holds the true MARS class of each CMB, decided on the generator's own deformed atlas), the
bundled atlas is registered to the image by :func:`cmbbench.registration.register_atlas` and
each CMB is located by :func:`cmbbench.loaders.location.locate_lesions`. Reported: agreement of
the derived locations with the true ones (all CMBs; unknown counts as disagreement), per-class
confusion, registration Dice, cost and seconds per scan (one core: BLAS threads = 1), and as
a baseline the agreement *without* registration (scan world mm read as MNI mm).

Options that make the synthetic scans harder:

``--perturb``
    move each scan's world frame by a random rigid transform (rotations up to 15 degrees per
    axis, shifts up to 30 mm; seeded per scan), as a real scanner frame would be: SYNTH scans
    otherwise sit within a few mm of MNI space.
``--skull``
    surround the brain with a dark 6 mm "skull" and a bright 6 mm "scalp" shell (no neck or
    face: an optimistic stand-in for scans that are not skull-stripped).

``python benchmarks/bench_registration.py [--dataset SYNTH-val] [--perturb] [--skull]
[--limit N] [--json OUT]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import statistics
import time

import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from cmbbench.dataset import read_dataset
from cmbbench.geometry import voxel_sizes, voxel_to_world
from cmbbench.loaders.location import locate_lesions, mars_at
from cmbbench.registry import resolve_dataset
from cmbbench.synth.anatomy import load_atlas


def _rigid(rng: np.random.Generator) -> np.ndarray:
    rx, ry, rz = np.deg2rad(rng.uniform(-15, 15, 3))
    r = (np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
         @ np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
         @ np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]]))
    w = np.eye(4)
    w[:3, :3] = r
    w[:3, 3] = rng.uniform(-30, 30, 3)
    return w


def _add_skull(img: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    brain = ndi.binary_fill_holes(img > 0.1 * np.percentile(img[img > 0], 99))
    d = ndi.distance_transform_edt(~brain, sampling=voxel_sizes(affine))
    ref = float(np.percentile(img[brain], 75))
    out = img.copy()
    skull, scalp = (d > 1) & (d <= 7), (d > 7) & (d <= 13)
    out[skull] = np.abs(rng.normal(0.05 * ref, 0.02 * ref, int(skull.sum())))
    out[scalp] = np.abs(rng.normal(0.9 * ref, 0.1 * ref, int(scalp.sum())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="SYNTH-val")
    parser.add_argument("--limit", type=int, default=0, help="first N scans only")
    parser.add_argument("--all-scans", action="store_true",
                        help="also register scans without CMBs (Dice and time only)")
    parser.add_argument("--perturb", action="store_true", help="random rigid world frame")
    parser.add_argument("--skull", action="store_true", help="add a skull and scalp shell")
    parser.add_argument("--json", default=None, help="write per-scan rows to this JSON file")
    args = parser.parse_args()

    atlas = load_atlas()
    _ = atlas.mars  # derived once per process
    ds = read_dataset(resolve_dataset(args.dataset))
    ids = ds.scan_ids[: args.limit] if args.limit else ds.scan_ids
    rows, pairs, base = [], [], []
    inv_atlas = np.linalg.inv(atlas.affine)
    for n, sid in enumerate(ids):
        les = ds.lesions_of(sid).copy()
        if not len(les) and not args.all_scans:
            continue
        vol = ds.read_image(sid)
        rng = np.random.default_rng([7, n])
        image, affine = vol.data, vol.affine
        if args.skull:
            image = _add_skull(image, affine, rng)
        if args.perturb:
            affine = _rigid(rng) @ affine
            les[["x_mm", "y_mm", "z_mm"]] = voxel_to_world(affine,
                                                           les[["i", "j", "k"]].to_numpy(float))
        probe = les if len(les) else pd.DataFrame({"lesion_id": [0], "x_mm": [0.0],
                                                   "y_mm": [0.0], "z_mm": [0.0]})
        t = time.perf_counter()
        loc = locate_lesions(image, affine, probe, atlas=atlas)
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
            xyz = les[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
            unreg, _ = mars_at(atlas, xyz @ inv_atlas[:3, :3].T + inv_atlas[:3, 3])
            base += [a == b for a, b in zip(les["location"], unreg)]
        r = rows[-1]
        print(f"{sid} {r['shape']:>12} Dice {r['dice']:.3f} cost {r['cost_initial']:.3f} -> "
              f"{r['cost']:.3f} {r['seconds']:.1f} s ok={r['ok']} agree {r['agree']}/{r['n_cmb']}"
              + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
    tab = pd.DataFrame(pairs, columns=["true", "derived"])
    n_agree = int((tab["true"] == tab["derived"]).sum())
    dice = [r["dice"] for r in rows]
    secs = [r["seconds"] for r in rows]
    flags = " ".join(f for f, on in (("--perturb", args.perturb), ("--skull", args.skull)) if on)
    print(f"\n{args.dataset} {flags}: {len(rows)} scans registered, {len(tab)} CMBs")
    print(f"location agreement: {n_agree}/{len(tab)} = {n_agree / max(len(tab), 1):.1%} "
          f"(without registration: {sum(base)}/{len(base)} = "
          f"{sum(base) / max(len(base), 1):.1%})")
    print(f"registration Dice: median {statistics.median(dice):.3f}, min {min(dice):.3f}; "
          f"accepted {sum(r['ok'] for r in rows)}/{len(rows)}")
    print(f"seconds per scan: median {statistics.median(secs):.1f}, max {max(secs):.1f}")
    print(pd.crosstab(tab["true"], tab["derived"]).to_string())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "agreement": n_agree / max(len(tab), 1),
                       "agreement_without_registration": sum(base) / max(len(base), 1)}, fh,
                      indent=1, default=str)


if __name__ == "__main__":
    main()

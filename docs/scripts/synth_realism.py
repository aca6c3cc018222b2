"""Realism report of a generated synthetic dataset against the targets of the reference notes.

    python docs/scripts/synth_realism.py DATASET_DIR_OR_NAME

Prints Markdown tables:

1. apparent CMB diameter (equivalent-sphere diameter of the ground-truth mask, mm): median and
   5-95 % range, overall and per protocol, against the real distribution (957 CMBs: median
   2.7 mm, 5-95 % 1.4-4.8 mm);
2. location shares (MARS) against 73 % lobar / 13 % deep / 12.5 % infratentorial;
3. CMB count per positive scan against the power law P(k) ~ k^-1.73 (P(1) = 0.51,
   P(>=5) = 0.22);
4. CMB-to-background contrast ``1 - min(CMB) / median(ring)`` (ring: voxels 3-6 mm from the
   darkest voxel, in-plane, outside any label) by sequence, field strength and slice thickness.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from cmbbench.dataset import read_dataset
from cmbbench.registry import resolve_dataset


def contrast_table(ds) -> pd.DataFrame:  # noqa: ANN001
    rows = []
    for sid in ds.scan_ids:
        les = ds.lesions_of(sid)
        if not len(les):
            continue
        img = ds.read_image(sid).data.astype(np.float64)
        lab_vol = ds.read_labels(sid)
        labels = lab_vol.data
        sp = lab_vol.spacing_mm
        scan = ds.scans[ds.scans["scan_id"] == sid].iloc[0]
        for _, row in les.iterrows():
            mask = labels == row.lesion_id
            v = np.unravel_index(int(np.argmin(np.where(mask, img, np.inf))), img.shape)
            h = np.ceil(6.0 / sp[:2]).astype(int)
            sl = (slice(max(v[0] - h[0], 0), v[0] + h[0] + 1),
                  slice(max(v[1] - h[1], 0), v[1] + h[1] + 1), v[2])
            ii, jj = np.meshgrid(np.arange(sl[0].start, sl[0].stop),
                                 np.arange(sl[1].start, sl[1].stop), indexing="ij")
            r = np.hypot((ii - v[0]) * sp[0], (jj - v[1]) * sp[1])
            ring = (r >= 3.0) & (r <= 6.0) & (labels[sl] == 0) & (img[sl] > 0)
            if ring.sum() < 5:
                continue
            rows.append({"sequence": scan.sequence, "field_t": scan.field_strength_t,
                         "slice_mm": scan.slice_thickness_mm,
                         "contrast": 1.0 - img[v] / np.median(img[sl][ring])})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    args = parser.parse_args()
    ds = read_dataset(resolve_dataset(args.dataset))
    les = ds.lesions.merge(ds.scans[["scan_id", "protocol", "sequence", "field_strength_t",
                                     "slice_thickness_mm"]], on="scan_id")
    print(f"## {ds.name}: {len(ds.scan_ids)} scans, {len(les)} CMBs, "
          f"{int((ds.scans['n_cmb'] > 0).sum())} positive scans\n")
    print("| group | n | median diameter (mm) | 5-95 % (mm) |\n|---|---|---|---|")
    print("| real CMBs (target) | 957 | 2.7 | 1.4-4.8 |")
    for name, g in [("all synthetic", les)] + list(les.groupby("protocol")):
        q = np.quantile(g["diameter_mm"], [0.05, 0.5, 0.95])
        print(f"| {name} | {len(g)} | {q[1]:.2f} | {q[0]:.2f}-{q[2]:.2f} |")
    print("\n| location | target | synthetic |\n|---|---|---|")
    shares = les["location"].value_counts(normalize=True)
    for loc, target in (("lobar", 0.73), ("deep", 0.13), ("infratentorial", 0.125)):
        print(f"| {loc} | {target:.3f} | {shares.get(loc, 0.0):.3f} |")
    counts = ds.scans.loc[ds.scans["n_cmb"] > 0, "n_cmb"]
    k = np.arange(1, 41)
    p = k ** -1.73
    p /= p.sum()
    print("\n| count per positive scan | target (k^-1.73, k<=40) | synthetic |\n|---|---|---|")
    print(f"| P(1) | {p[0]:.2f} | {(counts == 1).mean():.2f} |")
    print(f"| P(>=5) | {p[4:].sum():.2f} | {(counts >= 5).mean():.2f} |")
    print(f"| median | {int(k[np.searchsorted(np.cumsum(p), 0.5)])} | {counts.median():.0f} |")
    ct = contrast_table(ds)
    if len(ct):
        ct["slice_bin"] = pd.cut(ct["slice_mm"], [0, 1.5, 3.0, 10.0],
                                 labels=["<=1.5 mm", "1.5-3 mm", ">3 mm"])
        print("\n| sequence | field (T) | slices | n | median contrast | IQR |\n|---|---|---|---|---|---|")
        for (seq, f, sb), g in ct.groupby(["sequence", "field_t", "slice_bin"], observed=True):
            q = np.quantile(g["contrast"], [0.25, 0.5, 0.75])
            print(f"| {seq} | {f:g} | {sb} | {len(g)} | {q[1]:.2f} | {q[0]:.2f}-{q[2]:.2f} |")


if __name__ == "__main__":
    main()

"""Compare methods on one dataset: the table of docs/methods.md, re-runnable by any reader.

    python benchmarks/compare_methods.py --dataset SYNTH-test \
        [--methods log bian2013 ours dou2016 sundaresan2023] [--runs runs/] \
        [--backend local --workers 2] [--markdown docs/methods_table.md]

Runs (or resumes) ``cmbbench evaluate`` for each method under the default rule ``cmbbench@1``
and prints Markdown: pooled precision/recall/F1 with bootstrap 95% CIs, FP per scan, FP per
CMB, CPM, then recall by lesion size and location, and recall / FP per scan by sequence, field
strength and slice thickness. Every number is read from the runs' results folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cmbbench.evaluation import evaluate


def fmt_ci(agg: dict, ci: dict | None, key: str) -> str:
    v = agg.get(key)
    if v is None or pd.isna(v):
        return "n/a"
    if ci and key in ci["lower"] and ci["lower"][key] is not None:
        return f"{v:.3f} [{ci['lower'][key]:.3f}, {ci['upper'][key]:.3f}]"
    return f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="SYNTH-test")
    parser.add_argument("--methods", nargs="+",
                        default=["log", "bian2013", "ours", "dou2016", "sundaresan2023"])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--backend", default="serial")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()

    main_rows, strata = [], []
    for name in args.methods:
        report = evaluate(name, args.dataset, out=args.runs / f"{name}__{args.dataset}__cmbbench",
                          backend=args.backend, workers=args.workers, quiet=False)
        res = report.result
        info = res.to_json_dict()
        agg, ci = info["aggregates"], info["ci"]
        main_rows.append(
            f"| {name} | {fmt_ci(agg, ci, 'precision_pooled')} | {fmt_ci(agg, ci, 'recall_pooled')} "
            f"| {fmt_ci(agg, ci, 'f1_pooled')} | {fmt_ci(agg, ci, 'fp_per_scan')} "
            f"| {fmt_ci(agg, ci, 'fp_per_cmb')} | {fmt_ci(agg, ci, 'cpm')} |")
        st = res.strata.copy()
        st.insert(0, "method", name)
        strata.append(st)
    lines = [f"### {args.dataset}, rule cmbbench@1, operating threshold 0.5", "",
             "| method | precision | recall | F1 | FP/scan | FP/CMB | CPM |",
             "|---|---|---|---|---|---|---|", *main_rows, ""]
    st = pd.concat(strata, ignore_index=True)
    lesion = st[st["stratum_kind"].isin(["diameter_mm", "location"])]
    lines += ["Recall by lesion stratum (n = reference CMBs):", "",
              "| stratum | " + " | ".join(args.methods) + " |",
              "|---|" + "---|" * len(args.methods)]
    for (kind, value), g in lesion.groupby(["stratum_kind", "stratum"], sort=False):
        cells = []
        for m in args.methods:
            row = g[g["method"] == m]
            cells.append("n/a" if row.empty else f"{row['recall'].iloc[0]:.2f} (n={int(row['n_ref'].iloc[0])})")
        lines.append(f"| {kind} {value} | " + " | ".join(cells) + " |")
    scan = st[st["stratum_kind"].isin(["sequence", "field_strength_t", "slice_thickness_bin"])]
    lines += ["", "Recall / FP per scan by scan stratum:", "",
              "| stratum | " + " | ".join(args.methods) + " |",
              "|---|" + "---|" * len(args.methods)]
    for (kind, value), g in scan.groupby(["stratum_kind", "stratum"], sort=False):
        cells = []
        for m in args.methods:
            row = g[g["method"] == m]
            cells.append("n/a" if row.empty else
                         f"{row['recall'].iloc[0]:.2f} / {row['fp_per_scan'].iloc[0]:.1f} "
                         f"(scans={int(row['n_scans'].iloc[0])})")
        lines.append(f"| {kind} {value} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()

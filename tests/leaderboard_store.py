"""A small, hand-made results store for the leaderboard tests.

The tables are created by the store itself (:func:`cmbbench.store.engine.ensure_schema` in a
:func:`cmbbench.store.engine.write_transaction`), and the rows are chosen so that every test
can predict what the app must show:

- ``SYNTH-mini-v1`` (synthetic, 4 scans with real NIfTI images on disk), rule ``cmbbench@1``,
  split ``test``: ``bian2013`` F1 0.60 [0.50, 0.70], ``ours`` 0.55 [0.45, 0.65] (overlapping
  CIs: both rank 1–2), a *scored* submission whose method name is a ``<script>`` tag
  0.40 [0.35, 0.44] (rank 3), ``log`` 0.20 [0.10, 0.30] (rank 4); one ``log`` run under
  ``delpozo2024`` (another board);
- ``DOU-v1`` (no images): ``bian2013`` reproduced and the poster's *reported* row (FP/scan
  corrected to 0.50, with a note) whose method's paper link is a ``javascript:`` URL.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cmbbench.nifti import write_volume
from cmbbench.store import schema
from cmbbench.store.engine import ensure_schema, set_meta, write_transaction, writer_engine

SCRIPT_NAME = "<script>alert(1)</script>"
SYNTH = "SYNTH-mini-v1"
DOU = "DOU-v1"
#: content digests of two copies of the synthetic dataset (the board's runs use COPY_A)
COPY_A = "a" * 8 + "0123456789abcdef" * 3 + "b" * 8
COPY_B = "c" * 8 + "fedcba9876543210" * 3 + "d" * 8
SHAPE = (32, 32, 12)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SCANS = [  # scan_id, sequence, field T, slice thickness mm
    ("mini-0", "SWI", 3.0, 1.0), ("mini-1", "SWI", 1.5, 2.0),
    ("mini-2", "T2S", 3.0, 2.0), ("mini-3", "T2S", 1.5, 5.0),
]
# f1 value and CI of the SYNTH-mini / cmbbench@1 / test board
F1 = {"bian2013@1.0": (0.60, 0.50, 0.70), "ours@0.1": (0.55, 0.45, 0.65),
      f"{SCRIPT_NAME}@1": (0.40, 0.35, 0.44), "log@1.0": (0.20, 0.10, 0.30)}


def _thickness_bin(t: float) -> str:
    return "<=1.5 mm" if t <= 1.5 else "(1.5, 3] mm" if t <= 3 else ">3 mm"


def _images(root: Path) -> Path:
    """Write the SYNTH-mini images (noise plus dark dots) and return the dataset folder."""
    folder = root / SYNTH
    rng = np.random.default_rng(0)
    for scan_id, *_ in SCANS:
        data = (100 + 10 * rng.standard_normal(SHAPE)).astype(np.float32)
        data[10:13, 10:13, 5:7] = 10.0
        write_volume(folder / "images" / f"{scan_id}.nii.gz", data, AFFINE)
    return folder


def _method(method_id: str, *, paper_url: str | None = "https://doi.org/10.0/example",
            description: str = "a test method") -> dict:
    name, version = method_id.rsplit("@", 1)
    manifest = {"name": name, "version": version, "paper": paper_url,
                "training_data": "SYNTH-train", "description": description}
    return {"method_id": method_id, "name": name, "version": version,
            "citation": f"{name} et al.", "paper_url": paper_url,
            "code_url": "https://github.com/example/code", "description": description,
            "trainable": name == "ours", "training_data": "SYNTH-train-v1",
            "test_overlap": "none", "manifest_json": json.dumps(manifest)}


def _overall(run_id: str, f1: tuple[float, float, float], fp_scan: float, n_scans: int,
             n_boot: int | None = 200) -> list[dict]:
    v, lo, hi = f1
    base = {"run_id": run_id, "stratum": "all", "stratum_value": "all", "n_scans": n_scans,
            "n_lesions": 8, "n_boot": n_boot, "seed": 0}
    ci = n_boot is not None
    values = {"precision": (v + 0.05, v - 0.05, v + 0.15), "recall": (v - 0.02, v - 0.12, v + 0.08),
              "f1": (v, lo, hi), "fp_per_scan": (fp_scan, fp_scan * 0.7, fp_scan * 1.3),
              "fp_per_cmb": (fp_scan / 2, fp_scan * 0.3, fp_scan * 0.7),
              "cpm": (v - 0.05, v - 0.15, v + 0.05), "ap": (v - 0.1, v - 0.2, v),
              "precision_scan_mean": (v, None, None), "precision_scan_sd": (0.2, None, None),
              "recall_scan_mean": (v + 0.01, None, None), "recall_scan_sd": (0.25, None, None),
              "f1_scan_mean": (v - 0.01, None, None), "f1_scan_sd": (0.22, None, None)}
    return [{**base, "metric": m, "value": val, "ci_lower": lo_ if ci else None,
             "ci_upper": hi_ if ci else None} for m, (val, lo_, hi_) in values.items()]


def _strata(run_id: str, v: float) -> list[dict]:
    rows = []

    def add(stratum: str, value: str, metric: str, x: float) -> None:
        rows.append({"run_id": run_id, "stratum": stratum, "stratum_value": value,
                     "metric": metric, "value": x, "ci_lower": max(x - 0.1, 0),
                     "ci_upper": x + 0.1, "n_scans": 2, "n_lesions": 3, "n_boot": 200,
                     "seed": 0})

    for n, b in enumerate(("[0, 2) mm", "[2, 3) mm", "[3, 5) mm", "[5, 10) mm")):
        add("size_bin", b, "recall", min(1.0, v * (0.5 + 0.25 * n)))
    for n, loc in enumerate(("lobar", "deep", "infratentorial")):
        add("location", loc, "recall", min(1.0, v + 0.1 * n))
    for kind, values in (("sequence", ("SWI", "T2S")), ("field_strength_t", ("1.5", "3.0")),
                         ("slice_thickness_bin", ("<=1.5 mm", "(1.5, 3] mm", ">3 mm")),
                         ("dataset", (SYNTH,))):
        for n, value in enumerate(values):
            for metric, x in (("recall", v + 0.05 * n), ("fp_per_scan", 2.0 + n),
                              ("precision", v), ("f1", v)):
                add(kind, value, metric, x)
    for n, cls in enumerate(("vein", "calcification", "none")):
        add("mimic_class", cls, "fp_per_scan", 0.5 + n)
    return rows


def _curves(run_id: str, v: float) -> list[dict]:
    rows = []
    for p, t in enumerate(np.linspace(0.95, 0.1, 12)):
        fp = 0.05 * np.exp(4.0 * (0.95 - t))
        sens = min(1.0, v * (1.2 - t * 0.6))
        rows.append({"run_id": run_id, "curve": "froc", "point": p, "threshold": float(t),
                     "x": float(fp), "y": float(sens)})
        rows.append({"run_id": run_id, "curve": "pr", "point": p, "threshold": float(t),
                     "x": float(sens), "y": float(max(0.0, 1.0 - fp / 10))})
    return rows


def _run(run_id: str, method_id: str, dataset_id: str, rule_id: str, tier: str,
         n_scans: int, imported_at: str, split: str = "test",
         data_sha256: str | None = None) -> dict:
    config = {} if data_sha256 is None else {"dataset": {"content_sha256": data_sha256}}
    return {"run_id": run_id, "method_id": method_id, "dataset_id": dataset_id,
            "split": split, "rule_id": rule_id, "tier": tier, "status": "complete",
            "operating_threshold": 0.5, "n_scans": n_scans,
            "run_dir": None if tier == "reported" else f"/runs/{run_id}",
            "cmbbench_version": "0.1.0", "versions_json": "{}",
            "config_json": json.dumps(config), "created_at": imported_at,
            "imported_at": imported_at}


def build_store(root: Path) -> str:
    """Create the store under ``root`` (``root/store.sqlite`` plus the image folder).

    Returns
    -------
    The store URL.
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = _images(root)
    url = f"sqlite:///{root / 'store.sqlite'}"
    methods = [_method(m) for m in ("bian2013@1.0", "ours@0.1", "log@1.0")]
    methods.append(_method(f"{SCRIPT_NAME}@1", description=f"manifest text {SCRIPT_NAME}"))
    methods.append(_method("poster@2024", paper_url="javascript:alert(1)"))
    datasets = [
        {"dataset_id": SYNTH, "name": "SYNTH-mini", "version": "1", "n_scans": len(SCANS),
         "n_cmb": 8, "synthetic": True, "card_json": "{}", "stats_json": "{}",
         "path": str(folder)},
        {"dataset_id": DOU, "name": "DOU", "version": "1", "n_scans": 20, "n_cmb": 74,
         "synthetic": False, "card_json": "{}", "stats_json": "{}", "path": None},
    ]
    scans = [{"dataset_id": SYNTH, "scan_id": s, "subject_id": s, "split": "test",
              "sequence": seq, "field_strength_t": f, "slice_thickness_mm": t,
              "slice_thickness_bin": _thickness_bin(t), "voxel_mm_x": 1.0, "voxel_mm_y": 1.0,
              "voxel_mm_z": 2.0, "n_cmb": 2, "image_path": None}
             for s, seq, f, t in SCANS]
    runs, aggs, curves, scan_rows, match_rows = [], [], [], [], []
    fp_scan = {"bian2013@1.0": 2.6, "ours@0.1": 1.2, f"{SCRIPT_NAME}@1": 3.0, "log@1.0": 74.2}
    for n, (method_id, f1) in enumerate(F1.items()):
        run_id = f"synth{n:02d}"
        tier = "scored" if method_id.startswith("<") else "reproduced"
        # the scored run was recorded before content digests existed
        runs.append(_run(run_id, method_id, SYNTH, "cmbbench@1", tier, len(SCANS),
                         f"2026-01-0{n + 1}T00:00:00+00:00",
                         data_sha256=None if tier == "scored" else COPY_A))
        aggs += _overall(run_id, f1, fp_scan[method_id], len(SCANS)) + _strata(run_id, f1[0])
        curves += _curves(run_id, f1[0])
        for s, *_ in SCANS:
            scan_rows.append({"run_id": run_id, "scan_id": s, "tp": 1, "fp": 1 + n, "fn": 1,
                              "n_ref": 2, "n_pred": 2 + n, "precision": 1 / (2 + n),
                              "recall": 0.5, "f1": 2 / (4 + n), "dice_scan": None})
            kinds = [("tp", 11.0, 11.0, 5.0), ("fn", 20.0, 22.0, 6.0), ("fp", 25.0, 8.0, 5.0)]
            for row, (kind, i, j, k) in enumerate(kinds):
                match_rows.append({
                    "run_id": run_id, "row": len(match_rows), "scan_id": s, "kind": kind,
                    "lesion_id": None if kind == "fp" else row + 1,
                    "candidate_id": None if kind == "fn" else row + 1,
                    "score": None if kind == "fn" else 0.9, "distance_mm": 0.5,
                    "x_mm": i, "y_mm": j, "z_mm": 2 * k, "i": i, "j": j, "k": k,
                    "mimic_class": "vein" if kind == "fp" else None})
    runs.append(_run("synth-delpozo", "log@1.0", SYNTH, "delpozo2024@1", "reproduced",
                     len(SCANS), "2026-01-05T00:00:00+00:00"))
    aggs += _overall("synth-delpozo", (0.3, 0.2, 0.4), 10.0, len(SCANS))
    runs.append(_run("dou-bian", "bian2013@1.0", DOU, "cmbbench@1", "reproduced", 20,
                     "2026-01-06T00:00:00+00:00"))
    aggs += _overall("dou-bian", (0.5, 0.4, 0.6), 1.5, 20)
    for s in ("dou-01", "dou-02"):  # no image anywhere: the drill-down says so
        scans.append({"dataset_id": DOU, "scan_id": s, "subject_id": s, "split": "test",
                      "sequence": "SWI", "field_strength_t": 3.0, "slice_thickness_mm": 2.0,
                      "slice_thickness_bin": "(1.5, 3] mm", "voxel_mm_x": 0.45,
                      "voxel_mm_y": 0.45, "voxel_mm_z": 2.0, "n_cmb": 3, "image_path": None})
        scan_rows.append({"run_id": "dou-bian", "scan_id": s, "tp": 2, "fp": 1, "fn": 1,
                          "n_ref": 3, "n_pred": 3, "precision": 2 / 3, "recall": 2 / 3,
                          "f1": 2 / 3, "dice_scan": None})
        match_rows.append({"run_id": "dou-bian", "row": len(match_rows), "scan_id": s,
                           "kind": "fp", "lesion_id": None, "candidate_id": 1, "score": 0.8,
                           "distance_mm": None, "x_mm": 1.0, "y_mm": 2.0, "z_mm": 3.0,
                           "i": None, "j": None, "k": None, "mimic_class": None})
    runs.append(_run("dou-poster", "poster@2024", DOU, "delpozo2024@1", "reported", 20,
                     "2026-01-07T00:00:00+00:00"))
    aggs += [r for r in _overall("dou-poster", (0.756, 0.0, 0.0), 0.50, 20, n_boot=None)
             if r["metric"] in ("precision", "recall", "f1", "fp_per_scan", "fp_per_cmb")]
    reported = [{"run_id": "dou-poster", "citation": "Poster et al. 2024",
                 "url": "https://example.org/poster", "table_page": "Table 2",
                 "paper_rule": "any-voxel overlap, greedy", "paper_split": "20 test scans",
                 "note": "FP/scan corrected to 0.50: the poster printed FP per CMB (0.13)",
                 "source": "test"}]
    engine = writer_engine(url)
    with write_transaction(engine) as conn:
        ensure_schema(conn)
        for table, rows in ((schema.methods, methods), (schema.datasets, datasets),
                            (schema.scans, scans), (schema.runs, runs),
                            (schema.scan_metrics, scan_rows), (schema.matches, match_rows),
                            (schema.aggregates, aggs), (schema.curves, curves),
                            (schema.reported, reported)):
            conn.execute(table.insert(), rows)
        set_meta(conn, "updated_at", "2026-01-07T00:00:00+00:00")
    engine.dispose()
    return url

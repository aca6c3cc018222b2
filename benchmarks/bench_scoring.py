"""Scoring speed and memory: cmbbench vs panoptica vs picai_eval on large 3D volumes.

Usage::

    python benchmarks/bench_scoring.py [--repeats N] [--json out.json] [--sizes 10,40]
                                       [--skip-picai] [--strict]

Cases
-----
One 512x512x200 ``uint8`` reference/prediction pair per lesion count (10 and 40 by default),
as in section 6 of ``reference/research-eval-frameworks.md``: random spheres of radius 1.5-4
voxels at least 20 voxels apart; every lesion but 2 is predicted by the same sphere shifted by
1 voxel in a random direction; 2 extra predicted spheres far from every lesion (FPs). Voxels are
0.5 x 0.5 x 1.0 mm. Expected counts: TP = n - 2, FP = 2, FN = 2.

Tools (each starts from the two binary arrays, so instance labelling is included)
------------------------------------------------------------------------------
- ``cmbbench-overlap``: ``label_instances`` + ``lesions_from_labels`` on the reference, then
  ``score_case`` with an any-voxel-overlap rule (optimal one-to-one, duplicates FP).
- ``cmbbench-distance``: the same with the default rule (centroid distance <= 5 mm, optimal).
- ``panoptica``: ``Panoptica_Evaluator`` on semantic input, connected-components instances,
  ``NaiveThresholdMatching`` (IoU >= 0.1), instance metrics DSC and IoU, global DSC (the
  configuration timed in the reference notes).
- ``picai``: ``picai_eval.eval.evaluate_case`` (IoU >= 0.1); run once per size (it takes
  minutes at 40 lesions).

What is measured
----------------
Every tool and size runs in a fresh process (``multiprocessing`` *spawn*), which imports the
tool and loads the two arrays from ``.npy`` files before anything is measured, so no tool pays
for or profits from another's allocations.

- ``first s``: wall time of the first scoring call in that process (cold: lazy imports, caches).
- ``best s`` / ``median s``: best and median wall time of ``--repeats`` further calls (warm);
  for picai, its single call. Ratios use ``best s`` (least disturbed by other load on the
  machine, as ``timeit`` does).
- ``peak RSS MiB``: the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``)
  at the end: interpreter + imports + the two 52 MB input arrays + the scoring's high-water mark.
- ``d RSS MiB``: how much the first scoring call raised that peak above its level just before the
  call (interpreter, imports and inputs excluded): the extra memory the scoring needs.
- ``tracemalloc MiB``: peak of Python + numpy allocations traced during one extra call
  (``tracemalloc``; numpy reports its buffers to it). It counts allocated bytes, so zero-filled
  buffers whose pages are never written count although they never become resident (it can
  exceed ``d RSS``), and memory that C extensions allocate without numpy (e.g. cc3d's internal
  buffers) is *not* seen. Not run for picai.

Ratios compare the tools' ``best s`` (and first-call time) and peak memory to cmbbench-overlap.
Targets: cmbbench >= 5x faster than panoptica and >= 20x faster than picai per case, cmbbench
peak RSS < 1 GB. The script exits with status 1 if any tool's TP/FP/FN differ from the expected
counts (or from each other), and, with ``--strict``, also if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

SHAPE = (512, 512, 200)
SPACING = (0.5, 0.5, 1.0)
MIN_SEPARATION_VOX = 20.0
TOOLS = ("cmbbench-overlap", "cmbbench-distance", "panoptica", "picai")


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

def _paste_sphere(arr: np.ndarray, centre: np.ndarray, radius: float) -> None:
    """Set a ball of ``radius`` voxels around ``centre`` to 1, touching only its bounding box."""
    from cmbbench.examples import sphere

    lo = np.maximum(np.floor(centre - radius).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(centre + radius).astype(int) + 2, arr.shape)
    ball = sphere(tuple(int(h - l) for l, h in zip(lo, hi)), centre - lo, radius)
    arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= ball.astype(arr.dtype)


def make_pair(n_lesions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The reference/prediction pair with ``n_lesions`` lesions and its expected counts."""
    rng = np.random.default_rng(seed)
    margin = 10.0
    hi = np.array(SHAPE, dtype=float) - 1 - margin
    centres: list[np.ndarray] = []
    while len(centres) < n_lesions + 2:
        c = margin + rng.uniform(size=3) * (hi - margin)
        if all(np.linalg.norm(c - o) >= MIN_SEPARATION_VOX for o in centres):
            centres.append(c)
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    for n, c in enumerate(centres):
        r = float(rng.uniform(1.5, 4.0))
        if n < n_lesions:
            _paste_sphere(ref, c, r)
        if 2 <= n:  # lesions 0 and 1 are missed; centres n_lesions.. are FPs
            shift = rng.normal(size=3)
            _paste_sphere(pred, c + shift / np.linalg.norm(shift), r)
    return ref, pred, {"tp": n_lesions - 2, "fp": 2, "fn": 2}


def affine() -> np.ndarray:
    from cmbbench.examples import affine_for

    return affine_for(SPACING, "RAS", SHAPE)


# ---------------------------------------------------------------------------------------------
# the scoring calls (run inside the worker process)
# ---------------------------------------------------------------------------------------------

def _cmbbench_scorer(rule_kind: str):
    from cmbbench.harmonize import label_instances, lesions_from_labels
    from cmbbench.matching import get_rule
    from cmbbench.scoring import score_case

    if rule_kind == "overlap":
        rule = get_rule("cmbbench", criterion="overlap", min_overlap_voxels=1,
                        assignment="optimal", duplicates="fp", candidate_floor=0.5)
    else:
        rule = get_rule("cmbbench")
    aff = affine()

    def score(ref: np.ndarray, pred: np.ndarray) -> dict[str, int]:
        labels, _ = label_instances(ref, connectivity=rule.connectivity)
        lesions = lesions_from_labels(labels, aff, scan_id="bench")
        table = score_case(scan_id="bench", lesions=lesions, image_shape=ref.shape,
                           image_affine=aff, rule=rule, ref_labels=labels,
                           prediction=pred).table
        refs = table[table["kind"] == "reference"]
        cands = table[table["kind"] == "candidate"]
        return {"tp": int((refs["outcome"] == "TP").sum()),
                "fp": int((cands["outcome"] == "FP").sum()),
                "fn": int((refs["outcome"] == "FN").sum())}

    return score


def _panoptica_scorer():
    import logging

    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        Metric,
        NaiveThresholdMatching,
        Panoptica_Evaluator,
    )
    from panoptica.utils.citation_reminder import disable_citation_reminder

    disable_citation_reminder()
    logging.getLogger("panoptica").setLevel(logging.WARNING)
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU,
                                                matching_threshold=0.1),
        instance_metrics=[Metric.DSC, Metric.IOU],
        global_metrics=[Metric.DSC],
    )

    def score(ref: np.ndarray, pred: np.ndarray) -> dict[str, int]:
        (res,) = evaluator.evaluate(pred, ref, verbose=False).values()
        return {"tp": int(res.tp), "fp": int(res.fp), "fn": int(res.fn)}

    return score


def _picai_scorer():
    from picai_eval.eval import evaluate_case

    def score(ref: np.ndarray, pred: np.ndarray) -> dict[str, int]:
        y_list, *_ = evaluate_case(y_det=pred, y_true=ref, min_overlap=0.1)
        return {"tp": sum(1 for t, c, _ in y_list if t == 1 and c > 0),
                "fp": sum(1 for t, _, _ in y_list if t == 0),
                "fn": sum(1 for t, c, _ in y_list if t == 1 and c == 0)}

    return score


def _max_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 ** 2) if sys.platform == "darwin" else rss / 1024.0


def worker(tool: str, ref_path: str, pred_path: str, repeats: int, trace: bool) -> dict:
    """Score one case with one tool in this (fresh) process; see the module docstring."""
    import warnings

    warnings.filterwarnings("ignore")
    if tool == "cmbbench-overlap":
        score = _cmbbench_scorer("overlap")
    elif tool == "cmbbench-distance":
        score = _cmbbench_scorer("distance")
    elif tool == "panoptica":
        score = _panoptica_scorer()
    elif tool == "picai":
        score = _picai_scorer()
    else:
        raise ValueError(tool)
    ref = np.load(ref_path)
    pred = np.load(pred_path)
    rss_before = _max_rss_mib()
    t0 = time.perf_counter()
    counts = score(ref, pred)
    first = time.perf_counter() - t0
    rss_after = _max_rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        again = score(ref, pred)
        times.append(time.perf_counter() - t0)
        if again != counts:
            raise RuntimeError(f"{tool}: counts changed between calls: {counts} vs {again}")
    traced = float("nan")
    if trace:
        tracemalloc.start()
        score(ref, pred)
        traced = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.stop()
    return {
        "tool": tool, "counts": counts, "first_s": first,
        "time_s": min(times) if times else first,
        "median_s": statistics.median(times) if times else first,
        "times_s": times, "peak_rss_mib": _max_rss_mib(),
        "delta_rss_mib": max(0.0, rss_after - rss_before),
        "tracemalloc_mib": traced,
    }


def _child(conn, *args) -> None:
    try:
        conn.send(("ok", worker(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_isolated(tool: str, ref_path: str, pred_path: str, repeats: int, trace: bool) -> dict:
    """Run :func:`worker` in a fresh spawned interpreter and return its result."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, tool, ref_path, pred_path, repeats, trace))
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", "worker died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{tool}: {payload} (exit code {proc.exitcode})")
    return payload


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    versions = {}
    for mod in ("numpy", "scipy", "cc3d", "pandas", "panoptica", "picai_eval", "cmbbench"):
        try:
            from importlib.metadata import version

            dist = {"cc3d": "connected-components-3d", "picai_eval": "picai-eval"}.get(mod, mod)
            versions[mod] = version(dist)
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = "?"
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions}


def _fmt(x: float, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5,
                    help="warm timed calls per tool and size after the first (default 5; "
                         "picai always runs once)")
    ap.add_argument("--sizes", default="10,40", help="lesion counts (default 10,40)")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    ap.add_argument("--skip-picai", action="store_true", help="do not run picai_eval")
    ap.add_argument("--strict", action="store_true",
                    help="also exit 1 when a speed/memory target is missed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    tools = [t for t in TOOLS if not (args.skip_picai and t == "picai")]
    info = machine_info()
    print(f"machine: {info['cpu']} | {info['cpus']} CPUs | {info['memory_gib']} GiB | "
          f"Python {info['python']}", flush=True)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), flush=True)

    results: list[dict] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="cmbbench-bench-") as tmp:
        for n in sizes:
            ref, pred, expected = make_pair(n, seed=args.seed + n)
            ref_path, pred_path = f"{tmp}/ref{n}.npy", f"{tmp}/pred{n}.npy"
            np.save(ref_path, ref)
            np.save(pred_path, pred)
            del ref, pred
            for tool in tools:
                print(f"  running {tool} on {n} lesions ...", file=sys.stderr, flush=True)
                reps = 0 if tool == "picai" else args.repeats
                res = run_isolated(tool, ref_path, pred_path, reps, trace=tool != "picai")
                res.update(n_lesions=n, expected=expected)
                res["counts_ok"] = res["counts"] == expected
                ok &= res["counts_ok"]
                results.append(res)

    shape = "x".join(map(str, SHAPE))
    print(f"\n{shape} uint8, spacing {SPACING} mm; expected TP = n-2, FP = 2, FN = 2\n")
    head = (f"{'lesions':>7}  {'tool':<18} {'TP/FP/FN':>9} {'first s':>8} {'best s':>8} "
            f"{'median s':>8} "
            f"{'peak RSS MiB':>12} {'d RSS MiB':>9} {'tracemalloc MiB':>15}  counts")
    print(head)
    print("-" * len(head))
    for r in results:
        c = r["counts"]
        print(f"{r['n_lesions']:>7}  {r['tool']:<18} {c['tp']:>3}/{c['fp']}/{c['fn']:<3} "
              f"{_fmt(r['first_s']):>8} {_fmt(r['time_s']):>8} {_fmt(r['median_s']):>8} "
              f"{_fmt(r['peak_rss_mib'], 0):>12} "
              f"{_fmt(r['delta_rss_mib'], 0):>9} {_fmt(r['tracemalloc_mib'], 0):>15}  "
              f"{'ok' if r['counts_ok'] else 'MISMATCH'}")

    print("\nratios (tool / cmbbench-overlap; time = best warm call, first = first call)")
    targets_ok = True
    ratio_rows = []
    for n in sizes:
        by = {r["tool"]: r for r in results if r["n_lesions"] == n}
        base = by["cmbbench-overlap"]
        for tool in [t for t in tools if t != "cmbbench-overlap"]:
            r = by[tool]
            row = {"n_lesions": n, "tool": tool,
                   "time_ratio": r["time_s"] / base["time_s"],
                   "first_ratio": r["first_s"] / base["first_s"],
                   "peak_rss_ratio": r["peak_rss_mib"] / base["peak_rss_mib"],
                   "delta_rss_ratio": (r["delta_rss_mib"] / base["delta_rss_mib"]
                                       if base["delta_rss_mib"] > 0 else float("nan"))}
            ratio_rows.append(row)
            print(f"{n:>7}  {tool:<18} time x{row['time_ratio']:.1f}  first x"
                  f"{row['first_ratio']:.1f}  peak RSS x{row['peak_rss_ratio']:.2f}  "
                  f"d RSS x{row['delta_rss_ratio']:.2f}")
        goals = [("panoptica", 5.0), ("picai", 20.0)]
        for tool, goal in goals:
            if tool in by:
                for cmb in ("cmbbench-overlap", "cmbbench-distance"):
                    ratio = by[tool]["time_s"] / by[cmb]["time_s"]
                    hit = ratio >= goal
                    targets_ok &= hit
                    print(f"target {n:>3} lesions: {cmb} >= {goal:g}x faster than {tool}: "
                          f"x{ratio:.1f} {'met' if hit else 'MISSED'}")
        for cmb in ("cmbbench-overlap", "cmbbench-distance"):
            hit = by[cmb]["peak_rss_mib"] < 1024
            targets_ok &= hit
            print(f"target {n:>3} lesions: {cmb} peak RSS < 1 GiB: "
                  f"{by[cmb]['peak_rss_mib']:.0f} MiB {'met' if hit else 'MISSED'}")

    if args.json:
        args.json.write_text(json.dumps({"machine": info, "shape": SHAPE, "spacing_mm": SPACING,
                                         "results": results, "ratios": ratio_rows,
                                         "counts_ok": ok, "targets_ok": targets_ok},
                                        indent=2, default=float))
    if not ok:
        print("\nERROR: TP/FP/FN counts differ between tools or from the expected counts",
              file=sys.stderr)
        return 1
    if args.strict and not targets_ok:
        print("\nERROR: a speed/memory target was missed (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

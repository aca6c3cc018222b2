"""Run a method on a dataset: predict (resumably, on any backend), then score.

The library entry points behind ``cmbbench predict``, ``cmbbench evaluate`` and
``cmbbench merge`` (the command line only parses options and prints):

- :func:`predict_dataset` writes a predictions folder (probability maps on each image's grid,
  a ``cmbbench-submission.json`` manifest) in a resumable run directory;
- :func:`evaluate` does the same in ``runs/<method>__<dataset>__<rule>/`` and scores the
  predictions (:func:`cmbbench.scoring.score_folder`), saving the results in ``results/``;
- :func:`merge` merges the run directories of independent parts (``part_id/num_parts``) and
  finishes the run (manifest, and scores for an ``evaluate`` run).

Each returns a :class:`RunReport`. A method that raises on a scan does not stop the run: the
scan is recorded in ``failed/``, the others finish, and :meth:`RunReport.error` returns a
:class:`cmbbench.errors.PartialFailureError` (exit code 8). Re-running retries only those scans.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import HarmonizedDataset, dataset_record, read_dataset
from .errors import CmbbenchError, ConfigurationError, MissingInputError, PartialFailureError
from .execution import Executor, MethodSpec, make_executor, worker_init
from .methods.api import Method
from .runs import (
    REFERENCE_SCAN_COLUMNS,
    RunDirectory,
    ScanTask,
    merge_runs,
    one_line,
    part_scans,
    run_scan_task,
    scan_seed,
    versions,
)

__all__ = [
    "RunReport",
    "default_run_dir",
    "evaluate",
    "merge",
    "predict_dataset",
    "resolve_method",
    "summary_lines",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------
# inputs


def resolve_method(method: str | Method | type[Method],
                   params: dict | None = None) -> tuple[MethodSpec, dict]:
    """The worker spec and the run record of ``method``.

    ``method`` is a registry name (an entry point of ``cmbbench.methods``), a :class:`Method`
    subclass (instantiated with ``params`` in each worker), or a method object (each worker of
    the ``local``/``dask`` backends gets a pickled copy; the serial backend uses it as is).

    Raises
    ------
    ConfigurationError
        Unknown method name (the message lists the installed ones), a method that cannot be
        imported, parameters its constructor rejects, or an object that is not a Method.
    """
    params = dict(params or {})
    if isinstance(method, str):
        from .methods.registry import available_methods, load_method

        proto = load_method(method, **params)
        known = available_methods()
        name = method if method in known else next(
            (n for n in known if n.lower() == method.lower()), method)
        spec = MethodSpec(name=name, params=params)
        source = f"entry point {known[name].value}" if name in known else "entry point"
    elif isinstance(method, type) and issubclass(method, Method):
        try:
            proto = method(**params)
        except TypeError as exc:
            raise ConfigurationError(f"method {method.__name__} rejects its parameters: "
                                     f"{exc}") from None
        name = method.name or method.__name__
        spec = MethodSpec(name=name, params=params, factory=method)
        source = f"class {method.__module__}:{method.__qualname__}"
    elif isinstance(method, Method):
        if params:
            raise ConfigurationError("params apply to a method name or class, not to a method "
                                     "object (it holds its own)")
        proto = method
        name = method.name or type(method).__name__
        params = dict(getattr(method, "params", {}) or {})
        spec = MethodSpec(name=name, params=params, instance=method)
        source = f"object {type(method).__module__}:{type(method).__qualname__}"
    else:
        raise ConfigurationError(f"not a method: {method!r} (expected a registry name, a "
                                 "cmbbench Method subclass or a Method object)")
    record = {"name": name, "version": str(proto.version), "citation": proto.citation,
              "description": proto.description, "params": params, "source": source,
              "requirements": dict(proto.requirements.__dict__)}
    return spec, record


def _open_dataset(dataset: str | Path | HarmonizedDataset, *, quiet: bool) -> HarmonizedDataset:
    if isinstance(dataset, HarmonizedDataset):
        return dataset
    from .registry import resolve_dataset

    return read_dataset(resolve_dataset(dataset, quiet=quiet))


def default_run_dir(method_name: str, dataset_name: str, rule_name: str) -> Path:
    """``runs/<method>__<dataset>__<rule>`` (relative to the working directory)."""
    return Path("runs") / f"{method_name}__{dataset_name}__{rule_name}"


# --------------------------------------------------------------------------------------------
# report


@dataclass
class RunReport:
    """What a predict/evaluate/merge invocation did.

    Attributes
    ----------
    kind
        ``predict`` or ``evaluate``.
    run_dir, predictions_dir, results_dir
        The run directory, its predictions folder and (``evaluate``, once scored) its results.
    method, dataset
        The records written to ``run.json``.
    part
        ``(part_id, num_parts)``.
    part_scan_ids
        Scans of this part.
    resumed
        Scans already finished before this invocation (skipped).
    predicted
        Scans finished by this invocation.
    failed
        Scans of this part whose prediction failed: scan id -> one-line error.
    failed_all
        Every failed scan of the run directory (all parts).
    pending
        Scans of other parts not finished yet (the run is complete when this is empty).
    result
        The :class:`cmbbench.scoring.ScoreResult` (``evaluate`` on a complete run), else None.
    """

    kind: str
    run_dir: Path
    predictions_dir: Path
    method: dict
    dataset: dict
    rule: str | None
    backend: dict
    part: tuple[int, int]
    part_scan_ids: list[str]
    resumed: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    failed_all: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    seconds: float = 0.0
    result: object = None
    results_dir: Path | None = None

    @property
    def complete(self) -> bool:
        """Every scan of the dataset is finished or failed (nothing left to other parts)."""
        return not self.pending

    @property
    def scans_per_minute(self) -> float:
        return 60.0 * len(self.predicted) / self.seconds if self.seconds > 0 else float("nan")

    def error(self) -> PartialFailureError | None:
        """A :class:`PartialFailureError` naming the failed scans, or None when none failed."""
        if not self.failed:
            return None
        first = next(iter(self.failed.items()))
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return PartialFailureError(
            f"{len(self.failed)} of {len(self.part_scan_ids)} scan(s) failed: {first[0]}: "
            f"{first[1]}{more}; the others finished; re-run the same command to retry only the "
            "failed scans", self.run_dir)

    def to_json_dict(self) -> dict:
        def clean(x: object) -> object:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        out = {
            "kind": self.kind, "run_dir": str(self.run_dir),
            "predictions_dir": str(self.predictions_dir),
            "results_dir": None if self.results_dir is None else str(self.results_dir),
            "method": self.method, "dataset": self.dataset, "rule": self.rule,
            "backend": self.backend, "part": {"id": self.part[0], "num": self.part[1]},
            "scans": {"total": self.dataset.get("n_scans"), "in_part": len(self.part_scan_ids),
                      "predicted": list(self.predicted), "resumed": list(self.resumed),
                      "failed": dict(self.failed), "failed_all": dict(self.failed_all),
                      "pending_other_parts": list(self.pending)},
            "complete": self.complete, "seconds": round(self.seconds, 3),
            "scans_per_minute": clean(round(self.scans_per_minute, 3)
                                      if math.isfinite(self.scans_per_minute) else float("nan")),
        }
        if self.result is not None:
            out["result"] = self.result.to_json_dict()  # type: ignore[attr-defined]
        return out


# --------------------------------------------------------------------------------------------
# running


def _execute(run: RunDirectory, ds: HarmonizedDataset, spec: MethodSpec, todo: list[str], *,
             seed: int, part: tuple[int, int], executor: Executor | None, backend: str,
             workers: int | None, scheduler: str | None, progress: Progress | None,
             done_before: int, total: int) -> tuple[list[str], dict[str, str], dict]:
    """Predict ``todo`` on the executor, recording each scan as it finishes."""
    own = executor is None
    if own:
        if backend == "local" and workers is None:
            workers = max(1, min(os.cpu_count() or 1, len(todo)))
        executor = make_executor(backend, workers=workers, scheduler=scheduler)
    threads = None if executor.backend == "serial" else 1
    initializer, initargs = None, ()
    if executor.backend != "serial":
        try:
            initargs = (pickle.dumps(spec), threads)
        except Exception as exc:  # noqa: BLE001 - unpicklable method object or class
            raise ConfigurationError(
                f"method {spec.name} cannot be sent to worker processes ({one_line(exc)}); use "
                "the serial backend, or register the method as a plugin") from None
        initializer = worker_init
    rows = ds.scans.set_index(ds.scans["scan_id"].astype(str))
    predicted: list[str] = []
    failed: dict[str, str] = {}
    done = done_before
    try:
        if not executor.started:
            executor.start(initializer, initargs)
        futures = {}
        for sid in todo:
            meta = {k: (None if isinstance(v, float) and math.isnan(v) else
                        (v.item() if hasattr(v, "item") else v))
                    for k, v in rows.loc[sid].to_dict().items()
                    if k != "scan_id" and k not in REFERENCE_SCAN_COLUMNS}
            task = ScanTask(scan_id=sid, image_path=str(ds.image_path(sid)), meta=meta,
                            map_path=str(run.map_path(sid)), seed=scan_seed(seed, sid),
                            spec=spec, threads=threads)
            futures[executor.submit(run_scan_task, task)] = sid
        for fut in executor.as_completed(list(futures)):
            sid = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker itself died
                res = {"scan_id": sid, "status": "failed", "stage": "worker",
                       "error": one_line(exc), "traceback": ""}
            run.record(res, part=part)
            if res["status"] == "done":
                predicted.append(sid)
            else:
                failed[sid] = res["error"]
                log.info("scan %s failed: %s", sid, res["error"])
            done += 1
            if progress:
                progress(done, total, sid)
        described = executor.describe()
    finally:
        if own:
            executor.shutdown(cancel=True)
    return predicted, failed, described


def _finalize(run: RunDirectory, ds: HarmonizedDataset, report: RunReport,
              verified: set[str]) -> None:
    """When every scan is finished or failed: manifest (+ predictions.csv), and for an
    ``evaluate`` run the scores."""
    ids = ds.scan_ids
    finished = run.finished([s for s in ids if s in verified], verify=False)
    finished.update(run.finished([s for s in ids if s not in verified], verify=True))
    failures = {sid: rec.get("error", "") for sid, rec in run.failures(ids).items()
                if sid not in finished}
    report.failed_all = failures
    report.pending = [s for s in ids if s not in finished and s not in failures]
    if report.pending:
        return
    for sid in failures:  # a map left by an interrupted attempt must not be scored
        run.map_path(sid).unlink(missing_ok=True)
    run.cleanup_partials()
    shards = {sid: finished[sid] for sid in ids if sid in finished}
    run.write_points(shards)
    run.write_manifest(shards, list(failures))
    if report.kind != "evaluate" or not shards:  # nothing to score when every scan failed
        return
    from .scoring import score_folder

    scoring = run.config.get("scoring", {})
    has_points = any(s.get("kind") == "points" for s in shards.values())
    has_maps = any(s.get("kind") == "probability" for s in shards.values())
    missing = "empty" if failures or (has_points and has_maps) else "error"
    result = score_folder(run.predictions_dir, ds, rule=scoring.get("rule", "cmbbench"),
                          missing=missing, n_boot=int(scoring.get("n_boot", 1000)),
                          seed=int(scoring.get("seed", 0)),
                          rule_overrides=scoring.get("rule_overrides") or {})
    result.missing = [s for s in result.missing if s in failures]
    result.meta["provenance"] = "reproduced"
    result.meta["run"] = {"run_dir": str(run.root.resolve()), "method": run.config.get("method"),
                          "seed": run.config.get("seed"), "failed_scans": failures,
                          "complete_without_failures": not failures}
    result.save(run.results_dir)
    report.result = result
    report.results_dir = run.results_dir


def _run(kind: str, method: str | Method | type[Method],
         dataset: str | Path | HarmonizedDataset, out: str | Path | None, *,
         params: dict | None, backend: str, workers: int | None, scheduler: str | None,
         executor: Executor | None, seed: int, part_id: int, num_parts: int, overwrite: bool,
         progress: Progress | None, quiet: bool, scoring: dict | None) -> RunReport:
    t0 = time.perf_counter()
    if executor is None:  # validate the options before any work
        make_executor(backend, workers=workers, scheduler=scheduler)
    spec, method_record = resolve_method(method, params)
    ds = _open_dataset(dataset, quiet=quiet)
    if not ds.scan_ids:
        raise ConfigurationError("the dataset has no scans", ds.root / "scans.csv")
    mine = part_scans(ds.scan_ids, part_id, num_parts)
    if out is None:
        if kind != "evaluate":
            raise ConfigurationError("predict needs --out")
        from .matching import get_rule

        rule_name = get_rule(scoring["rule"]).name  # type: ignore[index]
        out = default_run_dir(spec.name, ds.name, rule_name)
    run = RunDirectory(Path(out), predictions_subdir="predictions" if kind == "evaluate" else "")
    requested_as = ds.root if isinstance(dataset, HarmonizedDataset) else dataset
    config = {"kind": kind, "method": method_record,
              "dataset": dataset_record(ds, requested_as),
              "rule": None if scoring is None else scoring["rule"], "scoring": scoring,
              "seed": int(seed), "versions": versions(),
              "part": {"id": part_id, "num": num_parts},
              "backend": executor.describe() if executor else {"backend": backend,
                                                               "workers": workers,
                                                               "scheduler": scheduler}}
    run.prepare(config, overwrite=overwrite, scan_ids=ds.scan_ids)
    finished = run.finished(mine, verify=True)
    todo = [s for s in mine if s not in finished]
    report = RunReport(kind=kind, run_dir=run.root, predictions_dir=run.predictions_dir,
                       method=method_record, dataset=config["dataset"],
                       rule=config["rule"], backend=config["backend"],
                       part=(part_id, num_parts), part_scan_ids=mine,
                       resumed=[s for s in mine if s in finished])
    if progress:
        progress(len(finished), len(mine), "")
    if todo:
        log.debug("%s: predicting %d of %d scan(s) with %s", run.root, len(todo), len(mine),
                 spec.name)
        predicted, failed, described = _execute(
            run, ds, spec, todo, seed=seed, part=(part_id, num_parts), executor=executor,
            backend=backend, workers=workers, scheduler=scheduler, progress=progress,
            done_before=len(finished), total=len(mine))
        report.predicted, report.failed, report.backend = predicted, failed, described
        run.update_config(backend=described)
    report.seconds = time.perf_counter() - t0
    _finalize(run, ds, report, verified=set(mine))
    report.seconds = time.perf_counter() - t0
    return report


def predict_dataset(method: str | Method | type[Method],
                    dataset: str | Path | HarmonizedDataset, out: str | Path, *,
                    params: dict | None = None, backend: str = "serial",
                    workers: int | None = None, scheduler: str | None = None,
                    executor: Executor | None = None, seed: int = 0, part_id: int = 0,
                    num_parts: int = 1, overwrite: bool = False,
                    progress: Progress | None = None, quiet: bool = True) -> RunReport:
    """Run ``method`` on every scan of ``dataset`` and write a predictions folder in ``out``.

    ``out`` is both the run directory (``run.json``, ``shards/``, ``failed/``) and the
    predictions folder (``<scan_id>.nii.gz`` probability maps on each image's grid,
    ``predictions.csv`` for candidate-only methods, ``cmbbench-submission.json``), so
    ``cmbbench score OUT --reference DATASET`` scores it. Re-running resumes.

    Parameters
    ----------
    method
        Registry name, :class:`Method` subclass, or method object (see :func:`resolve_method`).
    dataset
        Registry name (``SYNTH-demo``; a synthetic dataset is generated on first use), a
        harmonized dataset folder, or an opened dataset.
    params
        Method constructor parameters (with a name or a class).
    backend, workers, scheduler
        ``serial``, ``local`` (``workers`` processes) or ``dask`` (``scheduler`` address, or a
        LocalCluster of ``workers`` processes); or pass a started/unstarted ``executor``
        (it is not shut down).
    seed
        Run seed; each scan gets :func:`cmbbench.runs.scan_seed` ``(seed, scan_id)``.
    part_id, num_parts
        Run only part ``part_id`` (0-based) of ``num_parts``.
    overwrite
        Replace a run of another method/dataset/seed (or unrelated files) found in ``out``.
    progress
        ``progress(done, total, scan_id)`` after each scan.

    Raises
    ------
    ConfigurationError
        Unknown method/dataset/backend, invalid options, or ``out`` holds another run.
    MissingInputError, UnreadableInputError
        The dataset cannot be read.
    """
    return _run("predict", method, dataset, out, params=params, backend=backend,
                workers=workers, scheduler=scheduler, executor=executor, seed=seed,
                part_id=part_id, num_parts=num_parts, overwrite=overwrite, progress=progress,
                quiet=quiet, scoring=None)


def evaluate(method: str | Method | type[Method], dataset: str | Path | HarmonizedDataset, *,
             out: str | Path | None = None, rule: str = "cmbbench",
             rule_overrides: dict | None = None, n_boot: int = 1000,
             params: dict | None = None, backend: str = "serial", workers: int | None = None,
             scheduler: str | None = None, executor: Executor | None = None, seed: int = 0,
             part_id: int = 0, num_parts: int = 1, overwrite: bool = False,
             progress: Progress | None = None, quiet: bool = True) -> RunReport:
    """Predict (as :func:`predict_dataset`) and score in one go.

    The run directory is ``out`` or ``runs/<method>__<dataset>__<rule>``; predictions go to its
    ``predictions/`` folder and, once every scan is finished (or failed), the scores of
    :func:`cmbbench.scoring.score_folder` to ``results/`` (failed scans are scored as scans
    without candidates and listed in ``missing_scored_as_empty``). ``rule``,
    ``rule_overrides`` (``operating_threshold``, ``candidate_floor``) and ``n_boot`` are the
    scoring options (``seed`` also seeds the bootstrap).
    """
    from .matching import get_rule

    get_rule(rule, **(rule_overrides or {}))  # unknown rule: fail before predicting
    scoring = {"rule": rule, "rule_overrides": {k: v for k, v in (rule_overrides or {}).items()
                                                if v is not None},
               "n_boot": int(n_boot), "seed": int(seed)}
    return _run("evaluate", method, dataset, out, params=params, backend=backend,
                workers=workers, scheduler=scheduler, executor=executor, seed=seed,
                part_id=part_id, num_parts=num_parts, overwrite=overwrite, progress=progress,
                quiet=quiet, scoring=scoring)


def merge(parts: list[str | Path], out: str | Path, *, overwrite: bool = False,
          quiet: bool = True) -> RunReport:
    """Merge part run directories into ``out`` and finish the run when every scan is done
    (manifest; scores for ``evaluate`` runs). The dataset is opened from the path (or registry
    name) recorded in ``run.json``."""
    t0 = time.perf_counter()
    run = merge_runs(list(parts), out, overwrite=overwrite)
    cfg = run.config
    d = cfg.get("dataset", {})
    path = Path(d.get("path") or "")
    if d.get("path") and path.is_dir():
        ds = _open_dataset(path, quiet=quiet)
    else:
        try:
            ds = _open_dataset(str(d.get("name", "")), quiet=quiet)
        except CmbbenchError:
            raise MissingInputError(
                f"the run's dataset {d.get('name')!r} is neither at its recorded path nor a "
                "registry dataset", path) from None
    report = RunReport(kind=cfg.get("kind", "predict"), run_dir=run.root,
                       predictions_dir=run.predictions_dir, method=cfg.get("method", {}),
                       dataset=cfg.get("dataset", {}), rule=cfg.get("rule"),
                       backend=cfg.get("backend", {}), part=(0, 1),
                       part_scan_ids=list(ds.scan_ids))
    report.resumed = list(run.finished(ds.scan_ids, verify=False))
    _finalize(run, ds, report, verified=set())
    report.failed = dict(report.failed_all)
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------
# summary


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{float(v):.{digits}f}"  # type: ignore[arg-type]


def summary_lines(report: RunReport) -> list[str]:
    """The human-readable summary printed by ``cmbbench evaluate``/``predict``/``merge``:
    what ran, then (when scored) per-scan mean ± SD (the poster's Table 1 style), pooled
    counts and rates (its Table 2 style), FP per scan, FP per CMB and CPM, then failures."""
    m, d = report.method, report.dataset
    part = f", part {report.part[0]} of {report.part[1]}" if report.part[1] > 1 else ""
    b = report.backend or {}
    nw = b.get("workers")
    n_workers = f" ({nw} worker{'' if nw == 1 else 's'})" if nw else ""
    lines = [
        f"{report.kind}: method {m.get('name')} {m.get('version')} on {d.get('name')} "
        f"({d.get('n_scans')} scans{part}; content sha256 "
        f"{str(d.get('content_sha256'))[:12] if d.get('content_sha256') else 'unverified'})",
        f"scans: {len(report.predicted)} predicted, {len(report.resumed)} already done "
        f"(resumed), {len(report.failed)} failed; backend {b.get('backend')}{n_workers}; "
        f"{report.seconds:.1f} s",
        f"run directory: {report.run_dir}",
    ]
    res = report.result
    if res is not None:
        a = res.aggregates  # type: ignore[attr-defined]
        ci = res.ci  # type: ignore[attr-defined]

        def with_ci(key: str) -> str:
            s = f"{_fmt(a.get(key)):<8}"
            if ci is not None and key in ci.lower and not math.isnan(ci.lower[key]):
                s += f" [{_fmt(ci.lower[key])}, {_fmt(ci.upper[key])}]"
            return s

        rule = res.rule  # type: ignore[attr-defined]
        lines += [
            "",
            f"rule {rule.rule_id}; operating threshold {rule.operating_threshold:g}; "
            f"{int(a['n_scans'])} scans ({int(a['n_scans_positive'])} with CMBs), "
            f"{int(a['n_ref'])} reference CMBs, {int(a['n_pred'])} predicted",
            "",
            "Per scan, mean ± SD (as the poster's Table 1)",
            f"  {'precision':<26}{_fmt(a['precision_mean'])} ± {_fmt(a['precision_sd'])}"
            f"  (n={int(a['precision_n'])})",
            f"  {'recall (sensitivity)':<26}{_fmt(a['recall_mean'])} ± {_fmt(a['recall_sd'])}"
            f"  (n={int(a['recall_n'])})",
            f"  {'F1':<26}{_fmt(a['f1_mean'])} ± {_fmt(a['f1_sd'])}  (n={int(a['f1_n'])})",
            "",
            "Pooled over all scans (as the poster's Table 2)"
            + ("; [95% CI, bootstrap over scans]" if ci is not None else ""),
            f"  {'TP / FP / FN':<26}{int(a['tp'])} / {int(a['fp'])} / {int(a['fn'])}",
            f"  {'precision':<26}{with_ci('precision_pooled')}",
            f"  {'recall (sensitivity)':<26}{with_ci('recall_pooled')}",
            f"  {'F1':<26}{with_ci('f1_pooled')}",
            f"  {'FP per scan (all scans)':<26}{with_ci('fp_per_scan')}",
            f"  {'FP per reference CMB':<26}{with_ci('fp_per_cmb')}",
            f"  {'CPM (1/8..8 FP/scan)':<26}{with_ci('cpm')}",
        ]
        if report.results_dir is not None:
            lines += ["", f"results written to {report.results_dir}"]
    elif report.kind == "predict" and report.complete:
        lines.append(f"predictions written to {report.predictions_dir}")
    if report.failed_all:
        lines.append("")
        how = " (scored as scans without candidates)" if res is not None else ""
        lines.append(f"FAILED scans{how}; re-run the same command to retry only these:")
        lines += [f"  {sid}: {err}" for sid, err in report.failed_all.items()]
    if report.pending:
        lines.append("")
        lines.append(f"{len(report.pending)} scan(s) of other parts are not finished yet; the "
                     "run is completed (manifest" + (", scores" if report.kind == "evaluate"
                                                     else "")
                     + ") when the last part finishes, or by `cmbbench merge`")
    return lines

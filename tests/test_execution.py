"""Executors: the same run gives identical results on the serial, local and Dask backends.

The method below is seeded noise on top of a dark-blob detector, so the parity test also checks
that every scan gets the same seed whatever the backend, worker or completion order. The Dask
cases use a real ``distributed.LocalCluster`` bound to 127.0.0.1 (an external cluster reached
by its scheduler address, and the LocalCluster the executor starts itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmbbench.errors import ConfigurationError
from cmbbench.evaluation import evaluate
from cmbbench.examples import make_example
from cmbbench.execution import LocalExecutor, SerialExecutor, make_executor
from cmbbench.methods.api import Method, Prediction, ScanInput
from cmbbench.nifti import read_volume


class NoisyDarkBlob(Method):
    """Dark blobs -> probability, plus seeded noise (legacy global RNG and scan.seed).

    ``log_dir``: each load() and predict() appends a JSON line to ``<log_dir>/<pid>.jsonl``.
    """

    name = "noisy-dark-blob"
    version = "1"
    citation = "cmbbench test method"

    def load(self) -> None:
        self._loaded_in = os.getpid()
        self._log({"event": "load", "omp": os.environ.get("OMP_NUM_THREADS")})

    def _log(self, rec: dict) -> None:
        log_dir = self.params.get("log_dir")
        if log_dir:
            with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), **rec}) + "\n")

    def predict(self, scan: ScanInput) -> Prediction:
        assert self._loaded_in == os.getpid(), "predict() before load() in this process"
        self._log({"event": "predict", "scan": scan.scan_id, "extra": sorted(scan.extra)})
        img = scan.image.astype(np.float64)
        p = 1.0 / (1.0 + np.exp((img - 600.0) / 50.0))
        # seeded noise: identical only if the scan's seed is the same on every backend
        p = p * np.random.uniform(0.6, 0.95)
        p = p + np.random.default_rng(scan.seed).uniform(0.0, 0.05, size=p.shape)
        # a seeded false positive blob, varying per scan
        rng = np.random.default_rng(scan.seed + 1)
        c = [int(rng.integers(3, s - 3)) for s in img.shape]
        p[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = rng.uniform(0.3, 0.9)
        return Prediction(probability=np.clip(p, 0.0, 1.0).astype(np.float32))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    ds, _ = make_example(root)
    return ds


def _run(ds, out: Path, log_dir: Path, **kw):
    log_dir.mkdir(parents=True, exist_ok=True)
    return evaluate(NoisyDarkBlob, ds.root, out=out, params={"log_dir": str(log_dir)},
                    n_boot=50, seed=7, **kw)


@pytest.fixture(scope="module")
def serial_run(example, tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    report = _run(example, root / "run", root / "log", backend="serial")
    assert report.complete and not report.failed
    return report


def _logs(log_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(log_dir.glob("*.jsonl"))
            for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    yield cluster
    cluster.close()


@pytest.mark.parametrize("backend", ["local", "dask-scheduler", "dask-localcluster"])
def test_backend_parity(backend, example, serial_run, tmp_path, request):
    kw: dict = {}
    if backend == "local":
        kw = {"backend": "local", "workers": 2}
    elif backend == "dask-scheduler":
        cluster = request.getfixturevalue("dask_cluster")
        kw = {"backend": "dask", "scheduler": cluster.scheduler_address}
    else:
        pytest.importorskip("distributed")
        kw = {"backend": "dask", "workers": 2}
    report = _run(example, tmp_path / "run", tmp_path / "log", **kw)
    assert report.complete and not report.failed
    assert sorted(report.predicted) == sorted(example.scan_ids)
    assert report.backend["backend"] == kw["backend"]

    # identical predicted maps, voxel for voxel
    for sid in example.scan_ids:
        a = read_volume(serial_run.predictions_dir / f"{sid}.nii.gz").data
        b = read_volume(report.predictions_dir / f"{sid}.nii.gz").data
        assert np.array_equal(a, b), sid
    # identical scores: per-lesion table, per-scan table, aggregates and bootstrap CIs
    for name in ("matches.csv", "scans.csv", "froc.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(serial_run.results_dir / name),
                                      pd.read_csv(report.results_dir / name))
    ja = json.loads((serial_run.results_dir / "aggregates.json").read_text())
    jb = json.loads((report.results_dir / "aggregates.json").read_text())
    assert ja["aggregates"] == jb["aggregates"] and ja["ci"] == jb["ci"]
    assert ja["aggregates"]["fp"] > 0  # the comparison is not between two trivial results

    # the model is loaded once per worker process, before its first scan; workers single-threaded
    logs = _logs(tmp_path / "log")
    loads = [r for r in logs if r["event"] == "load"]
    predicts = [r for r in logs if r["event"] == "predict"]
    assert sorted(r["scan"] for r in predicts) == sorted(example.scan_ids)
    # the method never sees anything derived from the reference
    assert all("n_cmb" not in r["extra"] and "slice_thickness_mm" in r["extra"]
               for r in predicts)
    pids = [r["pid"] for r in loads]
    assert len(pids) == len(set(pids)), "method loaded twice in one worker"
    assert {r["pid"] for r in predicts} <= set(pids)
    assert 1 <= len(pids) <= 2
    assert os.getpid() not in pids  # nothing ran in the coordinator
    assert all(r["omp"] == "1" for r in loads)


def test_serial_loads_once_in_process(serial_run):
    logs = _logs(Path(serial_run.run_dir).parent / "log")
    loads = [r for r in logs if r["event"] == "load"]
    assert len(loads) == 1 and loads[0]["pid"] == os.getpid()


def _square(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * x


@pytest.mark.parametrize("factory", [lambda: SerialExecutor(), lambda: LocalExecutor(workers=2)],
                         ids=["serial", "local"])
def test_executor_interface(factory):
    with factory() as ex:
        futures = {ex.submit(_square, n): n for n in range(5)}
        got, errors = {}, {}
        for fut in ex.as_completed(list(futures)):
            try:
                got[futures[fut]] = fut.result()
            except ValueError as exc:
                errors[futures[fut]] = str(exc)
    assert got == {0: 0, 1: 1, 2: 4, 4: 16}
    assert errors == {3: "three"}


def test_serial_runs_tasks_as_they_are_collected():
    calls = []
    ex = SerialExecutor().start()
    futs = [ex.submit(calls.append, n) for n in range(3)]
    assert calls == []  # nothing runs at submit time
    it = ex.as_completed(futs)
    next(it)
    assert calls == [0]
    list(it)
    assert calls == [0, 1, 2]


def test_make_executor_rejects_bad_options():
    with pytest.raises(ConfigurationError, match="available backends: serial, local, dask"):
        make_executor("threads")
    with pytest.raises(ConfigurationError, match="--scheduler needs --backend dask"):
        make_executor("local", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="--workers"):
        make_executor("serial", workers=4)
    with pytest.raises(ConfigurationError, match="at least 1"):
        make_executor("local", workers=0)
    assert make_executor("local", workers=3).workers == 3


def test_unpicklable_method_object_is_a_configuration_error(example, tmp_path):
    obj = NoisyDarkBlob()
    obj.hook = lambda: None  # lambdas do not pickle
    with pytest.raises(ConfigurationError, match="cannot be sent to worker processes"):
        evaluate(obj, example.root, out=tmp_path / "run", backend="local", workers=2, n_boot=0)
    # the serial backend uses the object as it is
    report = evaluate(obj, example.root, out=tmp_path / "run", backend="serial", n_boot=0)
    assert report.complete and not report.failed


class BrokenLoad(Method):
    name = "broken-load"
    version = "1"

    def load(self) -> None:
        raise RuntimeError("weights file not found")

    def predict(self, scan: ScanInput) -> Prediction:  # pragma: no cover - never reached
        raise AssertionError


@pytest.mark.parametrize("backend", ["serial", "local"])
def test_method_that_cannot_load_fails_every_scan_with_its_error(backend, example, tmp_path):
    kw = {"workers": 2} if backend == "local" else {}
    report = evaluate(BrokenLoad, example.root, out=tmp_path / "run", backend=backend, n_boot=0,
                      **kw)
    assert sorted(report.failed) == sorted(example.scan_ids)
    assert set(report.failed.values()) == {"RuntimeError: weights file not found"}
    assert report.error().exit_code == 8 and report.result is None

"""Run directories: resume, SIGKILL safety, partial failures, parts and their merge, refusal.

A run killed with SIGKILL loses nothing it had finished and leaves no shard that looks complete
but is not; re-running the same command predicts only what is missing. A method that raises on
one scan fails that scan only (exit code 8 from the CLI, see test_plugins.py) and a re-run
retries only it. Parts of a run (``part_id/num_parts``) merge into the same result as one run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import cmbbench
from cmbbench.dataset import read_dataset, sha256_file
from cmbbench.errors import ConfigurationError, MissingInputError, PartialFailureError
from cmbbench.evaluation import evaluate, merge, predict_dataset
from cmbbench.examples import make_example
from cmbbench.nifti import read_volume
from cmbbench.runs import RunDirectory, part_scans, scan_seed

# The test method lives in a module written to disk, so that a subprocess (the run that gets
# killed) and this process run exactly the same code.
METHOD_SOURCE = textwrap.dedent('''
    import os, time
    from pathlib import Path
    import numpy as np
    from cmbbench.methods.api import Method, Prediction

    class SlowBlob(Method):
        """Dark blobs, ``delay_s`` per scan; records each predicted scan in ``calls``; raises on
        ``fail_scan`` while the file ``fail_marker`` exists."""
        name = "slow-blob"
        version = "2"
        citation = "cmbbench test method"

        def predict(self, scan):
            calls = self.params.get("calls")
            if calls:
                with open(calls, "a") as fh:
                    fh.write(scan.scan_id + "\\n")
            marker = self.params.get("fail_marker")
            if scan.scan_id == self.params.get("fail_scan") and marker and Path(marker).exists():
                raise RuntimeError(f"cannot handle {scan.scan_id}\\nsecond line of the message")
            time.sleep(float(self.params.get("delay_s", 0.0)))
            img = scan.image.astype(np.float64)
            p = 1.0 / (1.0 + np.exp((img - 600.0) / 50.0)) * 0.9
            p[tuple(int(n) // 3 for n in img.shape)] = np.random.default_rng(scan.seed).uniform()
            return Prediction(probability=p.astype(np.float32))

    class OtherBlob(SlowBlob):
        name = "other-blob"
''')

RUNNER_SOURCE = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from slowmethod import SlowBlob
    from cmbbench.evaluation import evaluate
    params = json.loads(sys.argv[4])
    report = evaluate(SlowBlob, sys.argv[2], out=sys.argv[3], params=params, n_boot=0)
    print(json.dumps({"predicted": report.predicted, "resumed": report.resumed}))
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ds, _ = make_example(root / "example")
    (root / "slowmethod.py").write_text(METHOD_SOURCE)
    (root / "runner.py").write_text(RUNNER_SOURCE)
    sys.path.insert(0, str(root))
    import slowmethod

    yield {"root": root, "ds": ds, "SlowBlob": slowmethod.SlowBlob,
           "OtherBlob": slowmethod.OtherBlob}
    sys.path.remove(str(root))


def _maps(pred_dir: Path, ids: list[str]) -> dict[str, np.ndarray]:
    return {sid: read_volume(pred_dir / f"{sid}.nii.gz").data for sid in ids}


def _agg(report) -> dict:
    """Aggregates with NaN as None (NaN != NaN)."""
    return report.result.to_json_dict()["aggregates"]


def _calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ----------------------------------------------------------------------------------------------
# resume after SIGKILL


def test_resume_after_sigkill(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    out = tmp_path / "run"
    calls = tmp_path / "calls.txt"
    params = {"calls": str(calls), "delay_s": 0.4}
    cmd = [sys.executable, str(env["root"] / "runner.py"), str(env["root"]), str(ds.root),
           str(out), json.dumps(params)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = list((out / "shards").glob("*.json")) if (out / "shards").is_dir() else []
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    run = RunDirectory.open(out)
    n_ids = len(ds.scan_ids)
    shard_files = sorted((out / "shards").glob("*.json"))
    assert 2 <= len(shard_files) < n_ids
    # every shard that exists is complete: it parses and its map has the recorded checksum
    for path in shard_files:
        shard = json.loads(path.read_text())
        assert shard["status"] == "done" and shard["scan_id"] == path.stem
        assert sha256_file(run.predictions_dir / shard["map"]) == shard["sha256"]
        assert run.read_shard(path.stem) is not None
    finished_before = {p.stem for p in shard_files}
    assert not (out / "results").exists()

    # re-running the same command resumes: only the unfinished scans are predicted again
    calls_before = _calls(calls)
    report = evaluate(SlowBlob, ds.root, out=out, params=params, n_boot=0)
    assert report.complete and not report.failed
    assert set(report.resumed) == finished_before
    assert set(report.predicted) == set(ds.scan_ids) - finished_before
    assert set(_calls(calls)[len(calls_before):]) == set(ds.scan_ids) - finished_before
    assert not list(out.rglob("*.partial*"))

    # and the result is that of an uninterrupted run
    clean = evaluate(SlowBlob, ds.root, out=tmp_path / "clean", n_boot=0,
                     params={**params, "delay_s": 0.0, "calls": str(tmp_path / "c2.txt")})
    for sid, data in _maps(clean.predictions_dir, ds.scan_ids).items():
        assert np.array_equal(data, _maps(report.predictions_dir, [sid])[sid])
    pd.testing.assert_frame_equal(pd.read_csv(clean.results_dir / "matches.csv"),
                                  pd.read_csv(report.results_dir / "matches.csv"))


def test_torn_writes_are_redone(env, tmp_path):
    """A shard whose map was cut short, a shard cut short and stray temporary files: the scans
    are predicted again, and nothing half-written is scored."""
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    out = tmp_path / "run"
    calls = tmp_path / "calls.txt"
    params = {"calls": str(calls)}
    predict_dataset(SlowBlob, ds.root, out, params=params)
    a, b, c = ds.scan_ids[:3]
    data = (out / f"{a}.nii.gz").read_bytes()
    (out / f"{a}.nii.gz").write_bytes(data[: len(data) // 2])      # map cut short
    (out / "shards" / f"{b}.json").write_text('{"scan_id": "')     # shard cut short
    (out / "shards" / f"{c}.json").unlink()                          # map without shard
    (out / f"{c}.partial.nii.gz").write_bytes(b"\x1f\x8b junk")
    (out / "shards" / f".{c}.json.123.partial").write_text("{")
    n = len(_calls(calls))
    report = predict_dataset(SlowBlob, ds.root, out, params=params)
    assert sorted(report.predicted) == sorted([a, b, c])
    assert sorted(_calls(calls)[n:]) == sorted([a, b, c])
    assert not list(out.rglob("*.partial*"))
    for sid in ds.scan_ids:
        assert RunDirectory.open(out).read_shard(sid) is not None


def test_rerun_of_finished_run_predicts_nothing(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    calls = tmp_path / "calls.txt"
    first = evaluate(SlowBlob, ds.root, out=tmp_path / "run", params={"calls": str(calls)},
                     n_boot=0)
    again = evaluate(SlowBlob, ds.root, out=tmp_path / "run", params={"calls": str(calls)},
                     n_boot=0)
    assert again.predicted == [] and sorted(again.resumed) == sorted(ds.scan_ids)
    assert len(_calls(calls)) == len(ds.scan_ids)
    assert _agg(again) == _agg(first)


# ----------------------------------------------------------------------------------------------
# partial failure


def test_partial_failure_then_retry_only_the_failed_scan(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    bad = ds.scan_ids[2]
    marker = tmp_path / "fail-now"
    marker.write_text("")
    calls = tmp_path / "calls.txt"
    params = {"calls": str(calls), "fail_scan": bad, "fail_marker": str(marker)}
    out = tmp_path / "run"
    report = evaluate(SlowBlob, ds.root, out=out, params=params, n_boot=0)
    assert list(report.failed) == [bad]
    assert "RuntimeError: cannot handle" in report.failed[bad]
    assert "\n" not in report.failed[bad]
    assert sorted(report.predicted) == sorted(set(ds.scan_ids) - {bad})
    err = report.error()
    assert isinstance(err, PartialFailureError) and err.exit_code == 8 and bad in str(err)
    record = json.loads((out / "failed" / f"{bad}.json").read_text())
    assert record["error"] == report.failed[bad] and "Traceback" in record["traceback"]
    assert not (out / "shards" / f"{bad}.json").exists()
    # the other scans are scored; the failed one counts as a scan without candidates
    agg = json.loads((out / "results" / "aggregates.json").read_text())
    assert agg["missing_scored_as_empty"] == [bad]
    assert agg["meta"]["run"]["failed_scans"] == {bad: report.failed[bad]}

    marker.unlink()
    n = len(_calls(calls))
    again = evaluate(SlowBlob, ds.root, out=out, params=params, n_boot=0)
    assert again.predicted == [bad] and again.failed == {} and again.error() is None
    assert _calls(calls)[n:] == [bad]
    assert not list((out / "failed").glob("*.json"))
    agg = json.loads((out / "results" / "aggregates.json").read_text())
    assert agg["missing_scored_as_empty"] == []


# ----------------------------------------------------------------------------------------------
# parts


def test_part_assignment():
    ids = [f"s{n}" for n in range(7)]
    parts = [part_scans(ids, p, 3) for p in range(3)]
    assert parts == [["s0", "s3", "s6"], ["s1", "s4"], ["s2", "s5"]]
    assert sorted(s for part in parts for s in part) == ids
    with pytest.raises(ConfigurationError, match="0-based"):
        part_scans(ids, 3, 3)
    with pytest.raises(ConfigurationError, match="at least 1"):
        part_scans(ids, 0, 0)
    assert scan_seed(0, "a") == scan_seed(0, "a") != scan_seed(1, "a")


def test_parts_in_separate_folders_merge(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    full = evaluate(SlowBlob, ds.root, out=tmp_path / "full", n_boot=100, seed=3)
    parts = []
    for p in range(2):
        r = evaluate(SlowBlob, ds.root, out=tmp_path / f"part{p}", n_boot=100, seed=3,
                     part_id=p, num_parts=2)
        assert not r.complete and r.result is None and not (r.run_dir / "results").exists()
        assert sorted(r.predicted) == part_scans(ds.scan_ids, p, 2)
        parts.append(r.run_dir)
    merged = merge(parts, tmp_path / "merged")
    assert merged.complete and not merged.failed and merged.result is not None
    cfg = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert cfg["part"] == {"id": 0, "num": 1} and len(cfg["merged_from"]) == 2
    for name in ("matches.csv", "scans.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(full.results_dir / name),
                                      pd.read_csv(merged.results_dir / name))
    assert _agg(full) == _agg(merged)
    ja = json.loads((full.results_dir / "aggregates.json").read_text())
    jb = json.loads((merged.results_dir / "aggregates.json").read_text())
    assert ja["ci"] == jb["ci"]
    for sid, data in _maps(full.predictions_dir, ds.scan_ids).items():
        assert np.array_equal(data, _maps(merged.predictions_dir, [sid])[sid])
    manifest = json.loads((merged.predictions_dir / "cmbbench-submission.json").read_text())
    assert manifest["n_scans"] == len(ds.scan_ids)


def test_parts_sharing_one_folder_complete_the_run(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    out = tmp_path / "shared"
    first = predict_dataset(SlowBlob, ds.root, out, part_id=1, num_parts=2)
    assert not first.complete and sorted(first.pending) == part_scans(ds.scan_ids, 0, 2)
    assert not (out / "cmbbench-submission.json").exists()
    last = predict_dataset(SlowBlob, ds.root, out, part_id=0, num_parts=2)
    assert last.complete and sorted(last.resumed) == []
    assert (out / "cmbbench-submission.json").exists()
    assert sorted(p.stem for p in (out / "shards").glob("*.json")) == sorted(ds.scan_ids)


def test_merge_refuses_runs_of_different_methods(env, tmp_path):
    ds = env["ds"]
    a = predict_dataset(env["SlowBlob"], ds.root, tmp_path / "a", part_id=0, num_parts=2)
    b = predict_dataset(env["OtherBlob"], ds.root, tmp_path / "b", part_id=1, num_parts=2)
    with pytest.raises(ConfigurationError, match="cannot merge"):
        merge([a.run_dir, b.run_dir], tmp_path / "m")
    with pytest.raises(MissingInputError, match="not a cmbbench run directory"):
        merge([a.run_dir, tmp_path], tmp_path / "m2")


# ----------------------------------------------------------------------------------------------
# the run record, and refusing another method's folder


def test_run_json_records_the_run(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    report = evaluate(SlowBlob, ds.root, out=tmp_path / "run", params={"delay_s": 0},
                      rule="valdo2021", n_boot=0, seed=11)
    cfg = json.loads((tmp_path / "run" / "run.json").read_text())
    assert cfg["kind"] == "evaluate"
    assert cfg["method"]["name"] == "slow-blob" and cfg["method"]["version"] == "2"
    assert cfg["method"]["params"] == {"delay_s": 0}
    assert cfg["method"]["citation"] == "cmbbench test method"
    assert cfg["dataset"]["name"] == "EXAMPLE" and cfg["dataset"]["version"] == "1"
    assert cfg["dataset"]["path"] == str(ds.root.resolve())
    assert cfg["dataset"]["content_sha256"] == ds.content_sha256() is not None
    assert cfg["rule"] == "valdo2021" and cfg["seed"] == 11
    assert cfg["versions"]["cmbbench"] == cmbbench.__version__
    assert cfg["versions"]["numpy"] == np.__version__ and cfg["versions"]["python"]
    assert cfg["part"] == {"id": 0, "num": 1}
    assert cfg["backend"]["backend"] == "serial"
    shard = json.loads((tmp_path / "run" / "shards" / f"{ds.scan_ids[0]}.json").read_text())
    assert shard["seed"] == scan_seed(11, ds.scan_ids[0])
    assert report.result.rule.name == "valdo2021"
    manifest = json.loads((tmp_path / "run" / "predictions" /
                           "cmbbench-submission.json").read_text())
    assert manifest["method"] == "slow-blob" and manifest["prediction_kind"] == "probability"


def test_folder_with_another_methods_run_is_refused(env, tmp_path):
    ds = env["ds"]
    out = tmp_path / "run"
    predict_dataset(env["SlowBlob"], ds.root, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigurationError, match="slow-blob.*--overwrite"):
        predict_dataset(env["OtherBlob"], ds.root, out)
    with pytest.raises(ConfigurationError, match="--overwrite"):
        predict_dataset(env["SlowBlob"], ds.root, out, params={"delay_s": 0.1})  # other params
    with pytest.raises(ConfigurationError, match="--overwrite"):
        predict_dataset(env["SlowBlob"], ds.root, out, seed=5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    report = predict_dataset(env["OtherBlob"], ds.root, out, overwrite=True)
    assert report.complete and sorted(report.predicted) == sorted(ds.scan_ids)
    assert json.loads((out / "run.json").read_text())["method"]["name"] == "other-blob"
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only run files


def _other_copy(ds, dest: Path) -> Path:
    """A copy of ``ds`` with one voxel of its first image changed (checksum rewritten)."""
    shutil.copytree(ds.root, dest)
    sid = ds.scan_ids[0]
    path = dest / "images" / f"{sid}.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] += 7.0
    nib.save(nib.Nifti1Image(data, img.affine), path)
    card = json.loads((dest / "dataset.json").read_text())
    card["checksums"][f"images/{sid}.nii.gz"] = sha256_file(path)
    (dest / "dataset.json").write_text(json.dumps(card))
    return dest


def test_a_run_on_another_copy_is_not_resumed_or_merged(env, tmp_path):
    ds, SlowBlob = env["ds"], env["SlowBlob"]
    other = read_dataset(_other_copy(ds, tmp_path / "copy"))
    assert other.name == ds.name and other.content_sha256() != ds.content_sha256()
    out = tmp_path / "run"
    predict_dataset(SlowBlob, ds.root, out, part_id=0, num_parts=2)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigurationError, match="another copy of dataset 'EXAMPLE'"):
        predict_dataset(SlowBlob, other.root, out, part_id=1, num_parts=2)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    b = predict_dataset(SlowBlob, other.root, tmp_path / "b", part_id=1, num_parts=2)
    with pytest.raises(ConfigurationError, match="cannot merge a part made on another copy"):
        merge([out, b.run_dir], tmp_path / "m")
    report = predict_dataset(SlowBlob, other.root, out, overwrite=True)
    assert report.complete and not report.resumed
    assert json.loads((out / "run.json").read_text())["dataset"]["content_sha256"] == \
        other.content_sha256()


def test_folder_with_unrelated_files_is_refused(env, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    (out / "results").mkdir()
    (out / "results" / "matches.csv").write_text("mine")
    with pytest.raises(ConfigurationError, match="holds no cmbbench run"):
        predict_dataset(env["SlowBlob"], env["ds"].root, out)
    predict_dataset(env["SlowBlob"], env["ds"].root, out, overwrite=True)
    assert (out / "thesis.tex").exists()
    assert (out / "results" / "matches.csv").read_text() == "mine"

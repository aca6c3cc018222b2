"""Submissions: validation lists every problem at once, bad input is refused with a clear
one-line message and writes nothing, zips are checked before extraction, a valid submission
lands in the store as `scored`, and two submissions at once (two real processes, one SQLite
file) both land intact."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from store_support import write_manifest

from cmbbench.cli import main as cli_main
from cmbbench.dataset import read_dataset
from cmbbench.errors import InvalidSubmissionError
from cmbbench.examples import make_example
from cmbbench.safezip import check_zip, safe_extract
from cmbbench.store import init_store, open_store, table_counts
from cmbbench.submission import read_manifest, submit, validate_submission

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    ds, pred = make_example(tmp_path_factory.mktemp("sub") / "ex")
    return ds.root, pred


def _copy(pred: Path, dest: Path) -> Path:
    shutil.copytree(pred, dest)
    return dest


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "cmbbench"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cmbbench.cli"]


def _env(tmp: Path, **extra: str) -> dict:
    env = {**os.environ, "CMBBENCH_HOME": str(tmp / "home"), **extra}
    env.pop("CMBBENCH_DB", None)
    return env


def _scored_runs(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM runs WHERE tier = 'scored'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _break(pred: Path, ds: Path) -> None:
    """Every kind of problem at once."""
    (pred / "ex02.nii.gz").unlink()                                     # missing scan
    im = nib.load(pred / "ex03.nii.gz")                                 # wrong grid (shape)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), im.affine),
             pred / "ex03.nii.gz")
    im = nib.load(pred / "ex04.nii.gz")                                 # NaN voxel
    d = np.asarray(im.dataobj).copy()
    d[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(d, im.affine), pred / "ex04.nii.gz")
    im = nib.load(pred / "ex05.nii.gz")                                 # wrong affine
    nib.save(nib.Nifti1Image(np.asarray(im.dataobj), im.affine @ np.diag([2, 1, 1, 1])),
             pred / "ex05.nii.gz")
    im = nib.load(pred / "ex06.nii.gz")                                 # probability 1.7
    d = np.asarray(im.dataobj).astype(np.float32)
    d[1, 1, 1] = 1.7
    nib.save(nib.Nifti1Image(d, im.affine), pred / "ex06.nii.gz")
    shutil.copy(pred / "ex01.nii.gz", pred / "zz99.nii.gz")             # matches no scan
    write_manifest(pred, method="<script>alert(1)</script>", version="1")


# ---------------------------------------------------------------------------------------------
# validation


def test_a_valid_submission_validates(example):
    rep = validate_submission(example[1], example[0])
    assert rep.ok, [str(p) for p in rep.problems]
    assert rep.manifest["method"] == "example" and rep.n_maps == 6


def test_every_problem_is_listed_at_once(example, tmp_path):
    pred = _copy(example[1], tmp_path / "bad")
    _break(pred, example[0])
    rep = validate_submission(pred, example[0])
    text = [str(p) for p in rep.problems]
    expect = [("cmbbench-submission.json", "method name '<script>alert(1)</script>' is not"),
              ("zz99.nii.gz", "matches no scan"),
              ("ex02.nii.gz", "missing prediction for scan ex02"),
              ("ex03.nii.gz", "shape (10, 10, 10) differs"),
              ("ex04.nii.gz", "NaN"),
              ("ex05.nii.gz", "affine differs"),
              ("ex06.nii.gz", "[0, 1]")]
    assert len(text) == len(expect), text
    for name, words in expect:
        assert any(name in t and words in t for t in text), (name, words, text)
    assert all("\n" not in t for t in text)
    err = rep.error()
    assert isinstance(err, InvalidSubmissionError) and err.exit_code == 9
    assert len(err.problems) == len(expect) and "nothing was stored" in str(err)


def test_validate_cli_lists_problems_and_exits_9(example, tmp_path):
    pred = _copy(example[1], tmp_path / "bad")
    _break(pred, example[0])
    r = CliRunner()
    proc = r.invoke(cli_main, ["validate", str(pred), "--dataset", str(example[0])])
    assert proc.exit_code == 9
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("problem: ")]
    assert len(lines) == 7
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("cmbbench: error: ") and "7 problem(s)" in err[0]
    ok = r.invoke(cli_main, ["validate", str(example[1]), "--dataset", str(example[0]),
                             "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    zipped = tmp_path / "bad.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for p in sorted(pred.iterdir()):
            zf.write(p, p.name)
    proc = r.invoke(cli_main, ["validate", str(zipped), "--dataset", str(example[0])])
    assert proc.exit_code == 9
    assert f"problem: {zipped}/ex02.nii.gz: missing prediction for scan ex02" in proc.stdout


def test_points_csv_problems_are_listed_with_line_numbers(example, tmp_path):
    pred = tmp_path / "pts"
    pred.mkdir()
    write_manifest(pred, method="pts", version="1")
    pd.DataFrame({"scan_id": ["ex01", "ex01", "nope", "ex02", "ex02"],
                  "i": [12, 12, 1, 5000, "x"], "j": [12, 12, 1, 1, 1], "k": [8, 8, 1, 1, 1],
                  "score": [0.9, 1.5, 0.5, 0.5, 0.5]}).to_csv(pred / "predictions.csv",
                                                              index=False)
    rep = validate_submission(pred, example[0])
    text = "\n".join(str(p) for p in rep.problems)
    assert "non-numeric or NaN coordinate/score on line(s) 6" in text
    assert "score outside [0, 1] on line(s) 3" in text
    assert "unknown scan_id(s) nope" in text
    assert "position outside the scan's image on line(s) 5" in text
    assert "missing prediction" not in text  # points-only: a scan without rows is empty


@pytest.mark.parametrize("manifest, problem", [
    ({"method": "ok-name_1.2+x", "version": 3}, None),
    ({"method": {"name": "nested", "version": "1", "code_url": "https://x.org"}}, None),
    ({"method": "a b", "version": "1"}, "method name 'a b' is not allowed"),
    ({"method": "x" * 65, "version": "1"}, "is not allowed"),
    ({"method": "m"}, "needs a method version"),
    ({"version": "1"}, "needs a method name"),
    ({"method": "m", "version": "1", "description": "bell\x07"}, "control characters"),
    ({"method": "m", "version": "1", "citation": 5}, "must be a string"),
    ({"method": "m", "version": "1", "voxel_index_base": 2}, "voxel_index_base"),
    ({"method": "m", "version": "1", "prediction_kind": "<b>"}, "prediction_kind"),
])
def test_manifest_schema(tmp_path, manifest, problem):
    (tmp_path / "cmbbench-submission.json").write_text(json.dumps(manifest))
    out, problems = read_manifest(tmp_path)
    if problem is None:
        assert not problems and out["method"] and out["version"]
    else:
        assert any(problem in str(p) for p in problems), [str(p) for p in problems]


def test_manifest_from_bids_generated_by_and_missing_manifest(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "GeneratedBy": [{"Name": "bidsnet", "Version": "0.3",
                                       "CodeURL": "https://example.org/bidsnet"}]}))
    out, problems = read_manifest(tmp_path)
    assert not problems and (out["method"], out["version"]) == ("bidsnet", "0.3")
    assert out["code_url"] == "https://example.org/bidsnet"
    empty = tmp_path / "e"
    empty.mkdir()
    _, problems = read_manifest(empty)
    assert "no cmbbench-submission.json" in str(problems[0])


# ---------------------------------------------------------------------------------------------
# submit


def test_submit_scores_and_stores_a_scored_run(example, tmp_path, monkeypatch):
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    db = str(tmp_path / "s.sqlite")
    rep = submit(example[1], example[0], db=db, n_boot=20)
    run_dir = rep.run_dir
    assert run_dir.parent == tmp_path / "home" / "submissions"
    assert run_dir.name.startswith("example@1__EXAMPLE__cmbbench__")
    cfg = json.loads((run_dir / "run.json").read_text())
    assert cfg["kind"] == "submission" and cfg["submission"]["sha256"] == rep.sha256
    assert cfg["dataset"]["content_sha256"] == read_dataset(example[0]).content_sha256() is not None
    assert (run_dir / "results" / "aggregates.json").is_file()
    assert sorted(p.name for p in (run_dir / "predictions").glob("*.nii.gz")) == [
        f"ex0{n}.nii.gz" for n in range(1, 7)]
    engine = open_store(db)
    with engine.connect() as conn:
        runs = pd.read_sql("SELECT * FROM runs WHERE tier = 'scored'", conn)
        meth = pd.read_sql("SELECT * FROM methods WHERE method_id = 'example@1'", conn)
    assert runs["run_id"].tolist() == [rep.run_id] and runs["run_dir"][0] == str(run_dir)
    assert runs["submission_sha256"][0] == rep.sha256
    assert meth["description"][0].startswith("hand-placed")
    before = table_counts(engine)
    again = submit(example[1], example[0], db=db, n_boot=20)  # the same files: replaced
    assert again.run_id == rep.run_id and again.run_dir == run_dir
    assert table_counts(engine) == before
    changed = _copy(example[1], tmp_path / "changed")
    im = nib.load(changed / "ex05.nii.gz")
    d = np.asarray(im.dataobj).astype(np.float32)
    d[20, 20, 10] = 0.9
    nib.save(nib.Nifti1Image(d, im.affine), changed / "ex05.nii.gz")
    third = submit(changed, example[0], db=db, n_boot=20)
    assert third.run_id != rep.run_id
    assert table_counts(engine)["runs"] == before["runs"] + 1
    engine.dispose()


BAD_CASES = ["missing_scan", "wrong_grid", "script_name", "zip_traversal", "zip_10gb"]


def _make_bad(case: str, example: tuple[Path, Path], tmp: Path) -> Path:
    pred = example[1]
    if case.startswith("zip"):
        z = tmp / f"{case}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for p in sorted(pred.iterdir()):
                zf.write(p, p.name)
            if case == "zip_traversal":
                zf.writestr("../escaped.txt", b"should never be written")
            else:
                zf.filelist[0].file_size = 10 * 1000 ** 3  # declared in the central directory
        return z
    bad = _copy(pred, tmp / case)
    if case == "missing_scan":
        (bad / "ex03.nii.gz").unlink()
    elif case == "wrong_grid":
        im = nib.load(bad / "ex01.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((47, 48, 24), np.float32), im.affine),
                 bad / "ex01.nii.gz")
    else:
        write_manifest(bad, method="<script>alert('x')</script>", version="1")
    return bad


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_submissions_are_refused_and_write_nothing(example, tmp_path, case, monkeypatch):
    bad = _make_bad(case, example, tmp_path)
    db = tmp_path / "s.sqlite"
    monkeypatch.chdir(tmp_path)
    proc = CliRunner().invoke(cli_main, ["submit", str(bad), "--dataset", str(example[0]),
                                         "--db", str(db), "--n-boot", "0"],
                              env={"CMBBENCH_HOME": str(tmp_path / "home"), "CMBBENCH_DB": None})
    assert proc.exit_code == 9, proc.output
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"cmbbench: error: {bad}")
    words = {"missing_scan": "missing prediction for scan ex03",
             "wrong_grid": "grid mismatch", "script_name": "is not allowed",
             "zip_traversal": "'..' path component",
             "zip_10gb": "declares 10.0 GB uncompressed"}[case]
    assert words in err[0]
    assert _scored_runs(db) == 0
    subs = tmp_path / "home" / "submissions"
    assert not subs.exists() or not any(subs.iterdir())
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------------------------------------
# zips


def _zip(path: Path, members: dict[str, bytes], **patch: object) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for key, value in patch.items():
            setattr(zf.filelist[0], key, value)
    return path


def test_zip_member_checks(tmp_path):
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("a.nii.gz")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    cases = {
        "symbolic link": link,
        "absolute path": _zip(tmp_path / "abs.zip", {"/tmp/x.nii.gz": b"1"}),
        "absolute path ": _zip(tmp_path / "drive.zip", {"C:/x.nii.gz": b"1"}),
        "'..' path component": _zip(tmp_path / "dots.zip", {"a/../../x": b"1"}),
        "appears twice": _zip(tmp_path / "dup.zip", {"a/x.nii.gz": b"1", "a/X.nii.gz": b"2"}),
        "more than the limit of 3": _zip(tmp_path / "many.zip",
                                         {f"{n}.txt": b"" for n in range(4)}),
        "encrypted": _zip(tmp_path / "enc.zip", {"x": b"1"}, flag_bits=0x1),
        "not a readable zip": tmp_path / "garbage.zip",
    }
    (tmp_path / "garbage.zip").write_bytes(b"PK\x03\x04 not really")
    for words, path in cases.items():
        with pytest.raises(InvalidSubmissionError, match=words.strip().replace("(", r"\(")):
            check_zip(path, max_files=3)


def test_zip_declared_size_is_refused_before_extraction(tmp_path):
    z = _zip(tmp_path / "big.zip", {"a.nii.gz": b"small"}, file_size=10 * 1000 ** 3)
    t0 = time.perf_counter()
    with pytest.raises(InvalidSubmissionError, match=r"declares 10\.0 GB .*nothing was "):
        safe_extract(z, tmp_path / "out")
    assert time.perf_counter() - t0 < 2
    assert not (tmp_path / "out").exists()


def test_zip_member_larger_than_declared_is_refused_and_cleaned(tmp_path):
    z = _zip(tmp_path / "lie.zip", {"a.bin": b"x" * 100_000}, file_size=10)
    with pytest.raises(InvalidSubmissionError):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_with_a_top_level_folder_is_submitted(example, tmp_path, monkeypatch):
    monkeypatch.setenv("CMBBENCH_HOME", str(tmp_path / "home"))
    z = tmp_path / "preds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(example[1].iterdir()):
            zf.write(p, f"my_preds/{p.name}")
    db = str(tmp_path / "s.sqlite")
    rep = submit(z, example[0], db=db, n_boot=0)
    direct = submit(example[1], example[0], db=db, n_boot=0)
    assert rep.sha256 == direct.sha256 and rep.run_id == direct.run_id
    assert not list((tmp_path / "home" / "submissions").glob(".staging-*"))


# ---------------------------------------------------------------------------------------------
# concurrency


def test_two_submits_at_once_both_land_intact(example, tmp_path):
    """Two real processes submit to one SQLite store at the same time; each holds the write
    lock for 1.5 s (CMBBENCH_STORE_HOLD_S), so their transactions overlap and the second must
    wait for the first (busy timeout, BEGIN IMMEDIATE) instead of failing."""
    db = tmp_path / "s.sqlite"
    env = _env(tmp_path, CMBBENCH_STORE_HOLD_S="1.5")
    preds = []
    for name in ("alpha", "beta"):
        p = _copy(example[1], tmp_path / name)
        write_manifest(p, method=name, version="1")
        preds.append(p)
    init_store(str(db))  # both processes race on the import, not on creating the schema
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*_cli(), "submit", str(p), "--dataset", str(example[0]),
                               "--db", str(db), "--n-boot", "20", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in preds]
    outs = [p.communicate(timeout=180) for p in procs]
    wall = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    ids = [json.loads(out)["run_id"] for out, _ in outs]
    assert len(set(ids)) == 2
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for rid in ids:
        n_scans = con.execute("SELECT COUNT(*) FROM scan_metrics WHERE run_id = ?",
                              (rid,)).fetchone()[0]
        n_agg = con.execute("SELECT COUNT(*) FROM aggregates WHERE run_id = ?",
                            (rid,)).fetchone()[0]
        n_curve = con.execute("SELECT COUNT(*) FROM curves WHERE run_id = ?",
                              (rid,)).fetchone()[0]
        assert n_scans == 6 and n_agg > 50 and n_curve > 0
    methods = {r[0] for r in con.execute("SELECT method_id FROM runs WHERE tier = 'scored'")}
    con.close()
    assert methods == {"alpha@1", "beta@1"}
    assert wall >= 3.0  # both held the lock 1.5 s, one after the other

"""Method plugins: a third-party package installed with pip appears in ``cmbbench methods`` and
runs through ``cmbbench predict``/``evaluate`` (in a subprocess, as a user would run it).

The package is written to a temporary folder (``pyproject.toml`` declaring the
``cmbbench.methods`` entry point, and the module), packed as a wheel, and installed with
``pip install --no-deps --no-index --target SITE``; the CLI runs with ``PYTHONPATH=SITE``.
Nothing is installed into the test environment itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from cmbbench.examples import make_example
from cmbbench.methods.registry import available_methods

REPO = Path(__file__).resolve().parents[1]
CONFIG, PARTIAL = 7, 8

DIST, VERSION = "cmbbench-demo-plugin", "0.3.1"
PACKAGE = "cmbbench_demo_plugin"

PYPROJECT = textwrap.dedent(f'''
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{DIST}"
    version = "{VERSION}"
    dependencies = ["cmbbench"]

    [project.entry-points."cmbbench.methods"]
    demo-dark = "{PACKAGE}.detector:DemoDark"
    demo-points = "{PACKAGE}.detector:DemoPoints"
    demo-broken = "{PACKAGE}.missing_module:Nothing"
''')

MODULE = textwrap.dedent('''
    """A third-party CMB detector: dark blobs become a probability map."""
    from pathlib import Path

    import numpy as np
    import pandas as pd
    import scipy.ndimage as ndi

    from cmbbench.methods.api import Method, Prediction, Requirements


    class DemoDark(Method):
        name = "demo-dark"
        version = "0.3.1"
        citation = "Demo et al. 2031, J. Imaginary Neuroimaging 1:1"
        description = "Logistic map of image darkness (test plugin)."
        limitations = "Finds every dark thing."
        requirements = Requirements(sequences=("SWI", "T2S"))

        def predict(self, scan):
            marker = self.params.get("fail_marker")
            if scan.scan_id == self.params.get("fail_scan") and marker and Path(marker).exists():
                raise ValueError(f"demo-dark cannot read {scan.scan_id}")
            img = scan.image.astype(np.float64)
            p = 0.95 / (1.0 + np.exp((img - float(self.params.get("level", 600))) / 50.0))
            return Prediction(probability=p.astype(np.float32))


    class DemoPoints(Method):
        """Candidates only (no map): centroids of dark components, in voxels."""
        name = "demo-points"
        version = "1"
        citation = "test plugin"

        def predict(self, scan):
            lab, n = ndi.label(scan.image < 600)
            if n == 0:
                return Prediction(candidates=pd.DataFrame(columns=["i", "j", "k", "score"]))
            c = np.array(ndi.center_of_mass(np.ones_like(lab), lab, range(1, n + 1)))
            return Prediction(candidates=pd.DataFrame(
                {"i": c[:, 0], "j": c[:, 1], "k": c[:, 2], "score": 0.9}))
''')


def _build_wheel(pkg_dir: Path, out_dir: Path) -> Path:
    """Pack ``pkg_dir`` (module + pyproject metadata) as a wheel (PEP 427) without build tools."""
    dist_info = f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    eps = ["[cmbbench.methods]"]
    in_section = False
    for line in (pkg_dir / "pyproject.toml").read_text().splitlines():
        if line.strip().startswith("["):
            in_section = line.strip() == '[project.entry-points."cmbbench.methods"]'
            continue
        if in_section and "=" in line:
            key, value = (s.strip().strip('"') for s in line.split("=", 1))
            eps.append(f"{key} = {value}")
    files = {
        f"{PACKAGE}/__init__.py": b"",
        f"{PACKAGE}/detector.py": (pkg_dir / PACKAGE / "detector.py").read_bytes(),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n"
                                  "Requires-Dist: cmbbench\n").encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cmbbench-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": ("\n".join(eps) + "\n").encode(),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{DIST.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    (pkg / PACKAGE).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / PACKAGE / "__init__.py").write_text("")
    (pkg / PACKAGE / "detector.py").write_text(MODULE)
    wheel = _build_wheel(pkg, root)
    site = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert (site / PACKAGE / "detector.py").is_file()
    ds, _ = make_example(root / "example")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["CMBBENCH_HOME"] = str(root / "home")  # never the user's cache
    env.pop("COLUMNS", None)
    return {"site": site, "env": env, "ds": ds, "root": root}


def _command() -> list[str]:
    script = Path(sys.executable).parent / "cmbbench"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cmbbench.cli"]


def cli(plugin: dict, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(), *map(str, args)], cwd=cwd, env=plugin["env"],
                          capture_output=True, text=True, timeout=180, check=False)


def one_json(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout.strip()
    assert text, f"no JSON on stdout; stderr: {proc.stderr!r}"
    obj, end = json.JSONDecoder().raw_decode(text)
    assert text[end:].strip() == "", f"more than one JSON value on stdout: {text!r}"
    return obj


def err_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_plugin_is_not_installed_in_this_environment():
    assert "demo-dark" not in available_methods()


def test_methods_list_and_info_show_the_plugin(plugin, tmp_path):
    proc = cli(plugin, "methods", "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "demo-dark" in rows and "0.3.1" in rows["demo-dark"]
    assert f"{DIST} {VERSION}" in rows["demo-dark"]
    assert "cannot be loaded" in rows["demo-broken"]  # a broken plugin hides nothing else
    assert "demo-points" in rows

    listed = one_json(cli(plugin, "methods", "list", "--json", cwd=tmp_path))
    by_name = {r["name"]: r for r in listed["methods"]}
    assert by_name["demo-dark"]["distribution"] == {"name": DIST, "version": VERSION}
    assert by_name["demo-broken"]["error"]

    info = one_json(cli(plugin, "methods", "info", "demo-dark", "--json", cwd=tmp_path))
    assert info["ok"] and info["version"] == "0.3.1"
    assert info["citation"].startswith("Demo et al. 2031")
    assert info["entry_point"] == f"{PACKAGE}.detector:DemoDark"
    proc = cli(plugin, "methods", "info", "demo-dark", cwd=tmp_path)
    assert proc.returncode == 0 and "Finds every dark thing" in proc.stdout

    proc = cli(plugin, "methods", "info", "nope", cwd=tmp_path)
    assert proc.returncode == CONFIG
    assert len(err_lines(proc)) == 1 and "demo-dark" in proc.stderr


def test_evaluate_runs_the_plugin(plugin, tmp_path):
    ds = plugin["ds"]
    proc = cli(plugin, "evaluate", "--method", "demo-dark", "--dataset", ds.root, "--n-boot",
               "20", "--backend", "local", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("Per scan, mean ± SD", "Pooled over all scans", "FP per scan (all scans)",
                 "FP per reference CMB", "CPM", "precision", "recall", "F1"):
        assert text in out
    run_dir = tmp_path / "runs" / "demo-dark__EXAMPLE__cmbbench"
    assert (run_dir / "results" / "aggregates.json").is_file()
    assert "6/6 done" in proc.stderr  # a periodic status line (stderr is not a TTY)
    cfg = json.loads((run_dir / "run.json").read_text())
    assert cfg["method"]["source"] == f"entry point {PACKAGE}.detector:DemoDark"
    assert cfg["backend"] == {"backend": "local", "workers": 2}

    # same command again: resumes (nothing to predict), same scores, JSON on stdout only
    proc = cli(plugin, "evaluate", "--method", "demo-dark", "--dataset", ds.root, "--n-boot",
               "20", "--json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    obj = one_json(proc)
    assert obj["ok"] and obj["scans"]["predicted"] == [] and len(obj["scans"]["resumed"]) == 6
    assert obj["result"]["aggregates"]["tp"] == 8


def test_predict_writes_a_scorable_predictions_folder(plugin, tmp_path):
    ds = plugin["ds"]
    proc = cli(plugin, "predict", "--method", "demo-dark", "--dataset", ds.root, "--out",
               "preds", "--param", "level=650", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    manifest = json.loads((tmp_path / "preds" / "cmbbench-submission.json").read_text())
    assert manifest["method"] == "demo-dark" and manifest["version"] == "0.3.1"
    assert manifest["citation"].startswith("Demo et al.")
    assert manifest["prediction_kind"] == "probability"
    assert manifest["dataset"] == "EXAMPLE" and manifest["params"] == {"level": 650}
    assert manifest["cmbbench_version"]
    assert sorted(p.name for p in (tmp_path / "preds").glob("*.nii.gz")) == \
        sorted(f"{s}.nii.gz" for s in ds.scan_ids)
    proc = cli(plugin, "score", "preds", "--reference", ds.root, "--n-boot", "0", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert one_json(proc)["meta"]["manifest"]["method"] == "demo-dark"


def test_candidate_only_plugin_is_scored_from_points(plugin, tmp_path):
    ds = plugin["ds"]
    proc = cli(plugin, "evaluate", "--method", "demo-points", "--dataset", ds.root, "--n-boot",
               "0", "--json", "--quiet", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    obj = one_json(proc)
    assert obj["result"]["aggregates"]["tp"] == 8
    assert (tmp_path / "run" / "predictions" / "predictions.csv").is_file()
    manifest = json.loads((tmp_path / "run" / "predictions" /
                           "cmbbench-submission.json").read_text())
    assert manifest["prediction_kind"] == "points"


def test_unknown_method_and_dataset_list_the_available_ones(plugin, tmp_path):
    ds = plugin["ds"]
    proc = cli(plugin, "evaluate", "--method", "nope", "--dataset", ds.root, cwd=tmp_path)
    assert proc.returncode == CONFIG
    (line,) = err_lines(proc)
    assert line.startswith("cmbbench: error: unknown method 'nope'; available methods:")
    assert "demo-dark" in line and "demo-points" in line

    proc = cli(plugin, "predict", "--method", "demo-dark", "--dataset", "NOPE-DATA", "--out",
               "x", "--json", cwd=tmp_path)
    assert proc.returncode == CONFIG
    err = one_json(proc)["error"]
    assert err["exit_code"] == CONFIG and "SYNTH-demo" in err["message"]
    assert not (tmp_path / "x").exists()


def test_method_failing_on_one_scan(plugin, tmp_path):
    ds = plugin["ds"]
    bad = ds.scan_ids[3]
    marker = tmp_path / "marker"
    marker.write_text("")
    args = ["evaluate", "--method", "demo-dark", "--dataset", ds.root, "--n-boot", "0",
            "--out", "run", "--param", f"fail_scan={bad}", "--param", f"fail_marker={marker}"]
    proc = cli(plugin, *args, "--quiet", cwd=tmp_path)
    assert proc.returncode == PARTIAL, proc.stderr
    (line,) = err_lines(proc)
    assert line.startswith("cmbbench: error: run: 1 of 6 scan(s) failed") and bad in line
    assert f"{bad}: ValueError: demo-dark cannot read {bad}" in proc.stdout
    assert "Pooled over all scans" in proc.stdout  # the others are scored
    assert len(list((tmp_path / "run" / "shards").glob("*.json"))) == 5

    marker.unlink()
    proc = cli(plugin, *args, "--json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    obj = one_json(proc)
    assert obj["scans"]["predicted"] == [bad] and len(obj["scans"]["resumed"]) == 5
    assert obj["result"]["missing_scored_as_empty"] == []


def test_partial_failure_json(plugin, tmp_path):
    ds = plugin["ds"]
    marker = tmp_path / "marker"
    marker.write_text("")
    proc = cli(plugin, "predict", "--method", "demo-dark", "--dataset", ds.root, "--out", "p",
               "--param", f"fail_scan={ds.scan_ids[0]}", "--param", f"fail_marker={marker}",
               "--json", cwd=tmp_path)
    assert proc.returncode == PARTIAL
    obj = one_json(proc)
    assert obj["ok"] is False and obj["error"]["type"] == "PartialFailureError"
    assert obj["error"]["exit_code"] == PARTIAL
    assert list(obj["scans"]["failed"]) == [ds.scan_ids[0]]


def test_output_folder_of_another_method_is_refused(plugin, tmp_path):
    ds = plugin["ds"]
    proc = cli(plugin, "predict", "--method", "demo-points", "--dataset", ds.root, "--out",
               "run", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli(plugin, "predict", "--method", "demo-dark", "--dataset", ds.root, "--out",
               "run", "--quiet", cwd=tmp_path)
    assert proc.returncode == CONFIG
    (line,) = err_lines(proc)
    assert "demo-points" in line and "--overwrite" in line
    proc = cli(plugin, "predict", "--method", "demo-dark", "--dataset", ds.root, "--out",
               "run", "--quiet", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "run" / "predictions.csv").exists()  # the old run's files are gone


def test_bad_run_options(plugin, tmp_path):
    ds = plugin["ds"]
    base = ["predict", "--method", "demo-dark", "--dataset", ds.root, "--out", "o"]
    for extra, word in ((["--part-id", "2", "--num-parts", "2"], "--part-id"),
                        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
                        (["--workers", "3"], "--workers")):
        proc = cli(plugin, *base, *extra, cwd=tmp_path)
        assert proc.returncode == CONFIG, (extra, proc.stderr)
        (line,) = err_lines(proc)
        assert word in line
    proc = cli(plugin, *base, "--param", "novalue", cwd=tmp_path)
    assert proc.returncode == 2


def test_merge_command(plugin, tmp_path):
    ds = plugin["ds"]
    for p in range(2):
        proc = cli(plugin, "evaluate", "--method", "demo-dark", "--dataset", ds.root,
                   "--n-boot", "0", "--out", f"part{p}", "--part-id", p, "--num-parts", 2,
                   "--quiet", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "not finished yet" in proc.stdout
    proc = cli(plugin, "merge", "part0", "part1", "--out", "all", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    obj = one_json(proc)
    assert obj["complete"] and obj["result"]["aggregates"]["n_scans"] == 6
    assert (tmp_path / "all" / "results" / "matches.csv").is_file()

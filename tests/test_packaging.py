"""The wheel carries what a non-editable install needs: the leaderboard app, the dataset cards,
the shipped recipes and checkpoints; and the installed code finds them there.

Builds the real wheel with the environment's setuptools (no network: ``--no-build-isolation``),
unpacks it and imports ``cmbbench`` from the unpacked tree in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git tracks them (or, without git, the tree minus build output
    and virtual environments) copied to ``dest``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs"))
        return dest
    for rel in filter(None, listed):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_file():
            shutil.copy2(REPO / rel, target)
    return dest


@pytest.fixture(scope="module")
def wheel_tree(tmp_path_factory) -> tuple[Path, set[str]]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build the wheel without the network")
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools writes build/ and *.egg-info/ next to the sources
    source = _source_copy(out / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("cmbbench-*.whl")
    tree = out / "tree"
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        z.extractall(tree)
    return tree, names


def _checkout_files(folder: str, pattern: str) -> list[str]:
    return sorted(p.relative_to(REPO / folder).as_posix()
                  for p in (REPO / folder).glob(pattern) if p.is_file())


def test_wheel_holds_app_cards_recipes_and_checkpoints(wheel_tree):
    _, names = wheel_tree
    app = _checkout_files("leaderboard", "**/*.py")
    cards = _checkout_files("datasets_registry", "*.yaml")
    assert "app.py" in app and len(app) >= 7 and len(cards) >= 6
    missing = [f"cmbbench/leaderboard_app/{f}" for f in app
               if f"cmbbench/leaderboard_app/{f}" not in names]
    missing += [f"cmbbench/datasets_registry/{f}" for f in cards
                if f"cmbbench/datasets_registry/{f}" not in names]
    for pkg, folder in (("cmbbench/methods/ours", "cmbbench/methods/ours"),
                        ("cmbbench_baselines", "baselines")):
        for sub, pattern in (("recipes", "*.yaml"), ("weights", "*.pt"), ("weights", "*.json")):
            shipped = _checkout_files(f"{folder}/{sub}", pattern)
            assert shipped, (folder, sub, pattern)
            missing += [f"{pkg}/{sub}/{f}" for f in shipped if f"{pkg}/{sub}/{f}" not in names]
    assert "cmbbench/store/reported.yaml" in names
    assert not missing, missing


def test_installed_tree_finds_its_app_and_registry(wheel_tree, tmp_path):
    tree, _ = wheel_tree
    code = ("import json, cmbbench\n"
            "from cmbbench.registry import registry_dir, list_cards\n"
            "from cmbbench.leaderboard.cli import app_path\n"
            "print(json.dumps({'package': cmbbench.__file__, 'registry': str(registry_dir()),"
            " 'cards': len(list_cards()), 'app': str(app_path())}))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CMBBENCH_REGISTRY", "CMBBENCH_LEADERBOARD_APP")}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(tree)  # the unpacked wheel, not the checkout
    assert Path(found["registry"]) == tree / "cmbbench" / "datasets_registry"
    assert found["cards"] == len(_checkout_files("datasets_registry", "*.yaml"))
    assert Path(found["app"]) == tree / "cmbbench" / "leaderboard_app" / "app.py"

"""Load benchmark of the leaderboard app: the main page on a store of 50 runs x 1,000 scans.

Target: the main page renders in <= 3 s. Two measurements, each cold (empty caches, as for the
first visitor after a store change) and warm (a later visitor):

1. **script**: runs of ``leaderboard/app.py`` (main page) under Streamlit's ``AppTest``: the
   store queries, the tables and the element tree, without a browser (see
   :func:`time_script` for the three cases);
2. **browser** (when Debian's chromium and the playwright package are present): `cmbbench
   leaderboard` on 127.0.0.1, Playwright opens the page in a new tab and the clock stops when
   the leaderboard grid holds all its rows (page load, websocket, script run, rendering
   included). The browser context is shared (a returning visitor's HTTP cache): the very
   first visit, which downloads Streamlit's JavaScript bundle, is a warm-up and not counted.
   "cold" is the first main-page load after the server started (empty query caches);
   ``*_heading`` is the time until the page's heading shows (sidebar done, table not yet);
   ``baseline_page`` is the metric-definitions page, which reads nothing from the store: the
   front end's own cost on this machine. ``*_cpu_s`` is the CPU time (user + system, every
   process: server, playwright, chromium; needs psutil) one page load consumed: unlike the
   wall time it hardly depends on what else the machine runs.

The store comes from ``benchmarks/make_store.py`` (generated if ``--db`` does not exist)::

    python benchmarks/bench_leaderboard.py                      # /tmp/cmbbench-load.sqlite
    python benchmarks/bench_leaderboard.py --db /tmp/load.sqlite --repeats 5

Prints one JSON object (all times in seconds) and exits 1 when a median exceeds the target.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "leaderboard" / "app.py"
TARGET_S = 3.0
log = logging.getLogger("bench_leaderboard")


def ensure_store(db: str, runs: int, scans: int) -> None:
    """Build the load store with benchmarks/make_store.py unless ``db`` exists."""
    if Path(db).exists():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_store import make_load_store

    log.info("generating %d runs x %d scans into %s (make_store.py)", runs, scans, db)
    info = make_load_store(db, n_runs=runs, n_scans=scans)
    log.info("store written in %.0f s", info["seconds"])


def store_facts(db: str) -> dict:
    """Rows per table and the default board's number of ranked runs."""
    from cmbbench.leaderboard import queries

    engine = queries.connect(queries.store_url(db))
    with engine.connect() as conn:
        counts = {t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                  for t in ("runs", "scans", "scan_metrics", "matches", "aggregates", "curves")}
    runs = queries.load_runs(engine)
    engine.dispose()
    ranked = runs[runs["tier"].isin(queries.RANKED_TIERS)].sort_values("imported_at")
    last = ranked.iloc[-1]
    board = ranked[(ranked["dataset_id"] == last["dataset_id"])
                   & (ranked["rule_id"] == last["rule_id"]) & (ranked["split"] == last["split"])]
    return {"counts": counts, "board": [last["dataset_id"], last["rule_id"], last["split"]],
            "board_rows": int(board.drop_duplicates(["method_id", "tier"]).shape[0])}


def time_script(db: str, repeats: int) -> dict:
    """Main-page script runs under AppTest.

    ``new_session_cold``: a new session with empty caches (AppTest's own session set-up, about
    0.5 s here, included: an upper bound); ``new_session_warm``: a new session, caches filled;
    ``rerun``: the same session again (a widget change), caches filled.
    """
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["CMBBENCH_DB"] = db
    AppTest.from_file(str(APP), default_timeout=120).run()  # imports, once per process
    out: dict[str, list[float]] = {"new_session_cold": [], "new_session_warm": [], "rerun": []}

    def run(at: AppTest, bucket: str) -> None:
        t0 = time.perf_counter()
        at.run()
        out[bucket].append(time.perf_counter() - t0)
        if at.exception:
            raise RuntimeError(f"the app raised: {at.exception}")
        if not at.dataframe:
            raise RuntimeError("the main page shows no table")

    for _ in range(repeats):
        st.cache_data.clear()
        st.cache_resource.clear()
        run(AppTest.from_file(str(APP), default_timeout=120), "new_session_cold")
        at = AppTest.from_file(str(APP), default_timeout=120)
        run(at, "new_session_warm")
        run(at, "rerun")
    return out


def _cpu_snapshot() -> dict[int, float]:
    """CPU seconds (user + system) of every descendant process (server, playwright, chromium);
    empty without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_browser(db: str, repeats: int, rows: int) -> dict | str:
    """Page loads in chromium until the leaderboard grid holds ``rows`` rows."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        return "skipped: the playwright package is not installed"
    if chromium is None:
        return "skipped: no chromium (apt-get install -y chromium)"
    port = _free_port()
    exe = Path(sys.executable).with_name("cmbbench")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cmbbench.cli"]
    server = subprocess.Popen([*cmd, "leaderboard", "--db", db, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    return "failed: the server did not start"
                time.sleep(0.3)
        times: dict[str, list[float]] = {k: [] for k in (
            "cold", "cold_heading", "cold_cpu_s", "warm", "warm_heading", "warm_cpu_s",
            "baseline_page", "baseline_page_cpu_s")}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            # one browser context (one HTTP cache), as for a returning visitor; the first
            # visit, which downloads Streamlit's JavaScript bundle, is not counted
            ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
            warmup = ctx.new_page()
            warmup.goto(f"{base}/definitions")
            warmup.get_by_role("heading", name="Metric definitions").wait_for(timeout=120_000)
            warmup.close()
            for n in range(repeats):
                for kind in ("cold", "warm") if n == 0 else ("warm",):
                    page = ctx.new_page()
                    cpu0 = _cpu_snapshot()
                    t0 = time.perf_counter()
                    page.goto(base)
                    page.get_by_role("heading", name="Leaderboard").wait_for(timeout=120_000)
                    t1 = time.perf_counter()
                    expect(page.locator("table[role=grid]").first).to_have_attribute(
                        "aria-rowcount", str(rows + 1), timeout=120_000)
                    times[kind].append(time.perf_counter() - t0)
                    times[f"{kind}_heading"].append(t1 - t0)
                    if cpu0:  # measured before the tab closes (its renderer still lives)
                        times[f"{kind}_cpu_s"].append(_cpu_used(cpu0, _cpu_snapshot()))
                    page.close()
                # baseline: a page that reads nothing from the store (the front end's cost)
                page = ctx.new_page()
                cpu0 = _cpu_snapshot()
                t0 = time.perf_counter()
                page.goto(f"{base}/definitions")
                page.get_by_role("heading", name="Metric definitions").wait_for(timeout=120_000)
                times["baseline_page"].append(time.perf_counter() - t0)
                if cpu0:
                    times["baseline_page_cpu_s"].append(_cpu_used(cpu0, _cpu_snapshot()))
                page.close()
            browser.close()
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "all": [round(v, 3) for v in values]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="/tmp/cmbbench-load.sqlite",
                        help="SQLite file of the load store (generated when missing)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    ensure_store(args.db, args.runs, args.scans)
    facts = store_facts(args.db)
    log.info("store: %s", facts)
    script = time_script(args.db, args.repeats)
    result: dict = {"store": args.db, **facts, "target_s": TARGET_S,
                    "script": {k: _summary(v) for k, v in script.items()}}
    if not args.no_browser:
        browser = time_browser(args.db, args.repeats, facts["board_rows"])
        result["browser"] = (browser if isinstance(browser, str)
                             else {k: _summary(v) for k, v in browser.items() if v})
    medians = [result["script"][k]["median"] for k in result["script"]]
    if isinstance(result.get("browser"), dict):
        medians += [result["browser"][k]["median"] for k in ("cold", "warm")]
    result["within_target"] = all(m <= TARGET_S for m in medians)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())

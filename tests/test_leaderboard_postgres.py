"""The leaderboard app on a real PostgreSQL store (the server of ``test_store_postgres.py``,
started on 127.0.0.1 from Debian's ``postgresql`` package; skipped, with the reason, without
it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

st = pytest.importorskip("streamlit", reason="the [leaderboard] extra is not installed")
from store_support import evaluated_run
from streamlit.testing.v1 import AppTest
from test_store_postgres import pg_url  # noqa: F401 - the server fixture

from cmbbench.leaderboard import queries
from cmbbench.store import import_run, init_store

APP = str(Path(__file__).resolve().parents[1] / "leaderboard" / "app.py")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_app_reads_a_postgres_store(pg_url, tmp_path, monkeypatch):  # noqa: F811
    st.cache_data.clear()
    st.cache_resource.clear()
    _, run_dir = evaluated_run(tmp_path)
    init_store(pg_url)
    report = import_run(run_dir, db=pg_url)
    engine = queries.connect(pg_url)
    try:
        matches = queries.load_matches(engine, report.run_id, "ex06")  # ORDER BY "row"
        assert len(matches) and set(matches["kind"]) <= {"tp", "fp", "fn"}
        runs = queries.load_runs(engine)
        assert report.run_id in set(runs["run_id"])
    finally:
        engine.dispose()
    monkeypatch.setenv("CMBBENCH_DB", pg_url)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    df = at.dataframe[0].value
    assert list(df["Method"]) == ["log"] and df["F1"].str.contains(r"\[").all()
    for page in ("curves", "strata", "drilldown", "method"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, at.exception)
    at.switch_page("views/curves.py").run()
    assert json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    st.cache_data.clear()
    st.cache_resource.clear()

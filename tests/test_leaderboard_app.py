"""Every page of the Streamlit app, headless (``streamlit.testing.v1.AppTest``), on a real
store: the hand-made one of ``leaderboard_store.py`` and one built by ``cmbbench evaluate`` +
the store's importer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

st = pytest.importorskip("streamlit", reason="the [leaderboard] extra is not installed")
from click.testing import CliRunner
from leaderboard_store import COPY_A, COPY_B, DOU, SCRIPT_NAME, SYNTH, build_store
from streamlit.testing.v1 import AppTest

from cmbbench.cli import main
from cmbbench.dataset import read_dataset
from cmbbench.metric_definitions import DEFINITIONS, render_markdown

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "leaderboard" / "app.py")
CI_CELL = re.compile(r"^\d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\]$")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("lbapp"))


@pytest.fixture(autouse=True)
def _fresh_caches():
    # st.cache_data / cache_resource outlive an AppTest within one process
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


def open_app(monkeypatch, url: str, dataset: str | None = SYNTH) -> AppTest:
    monkeypatch.setenv("CMBBENCH_DB", url)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    if dataset is not None:
        at.sidebar.selectbox(key="board_dataset").select(dataset).run()
        assert not at.exception, at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


# a column that only that table has (st.dataframe keys are not in the element tree)
TABLES = {"leaderboard_table": "Rank interval", "reported_table": "Citation",
          "strata_table": "CMBs", "drill_scans": "dice_scan", "drill_matches": "candidate_id",
          "drill_scan_attrs": "value", "method_runs": "imported_at"}


def find_table(at: AppTest, key: str):
    return next((df.value for df in at.dataframe if TABLES[key] in df.value.columns), None)


def table(at: AppTest, key: str):
    df = find_table(at, key)
    assert df is not None, f"no {key} on the page"
    return df


def elements(at: AppTest):
    """Every element of the main area and the sidebar."""
    out = []

    def walk(node):
        for child in getattr(node, "children", {}).values():
            out.append(child)
            walk(child)

    for root in at._tree.children.values():
        walk(root)
    return out


def assert_no_html(at: AppTest) -> None:
    for el in elements(at):
        proto = getattr(el, "proto", None)
        assert not getattr(proto, "allow_html", False), el  # no unsafe_allow_html anywhere
        assert getattr(el, "type", "") != "html", el


# ---------------------------------------------------------------------------------------------


def test_leaderboard_page_ranks_with_cis_and_rank_intervals(monkeypatch, store_url):
    at = open_app(monkeypatch, store_url)
    df = table(at, "leaderboard_table")
    assert list(df["Method"]) == ["bian2013", "ours", SCRIPT_NAME, "log"]
    assert list(df["Rank"]) == ["1", "2", "3", "4"]
    assert list(df["Rank interval"]) == ["1–2", "1–2", "3", "4"]
    for col in ("Precision", "Recall", "F1", "FP/scan", "FP/CMB", "CPM"):
        assert df[col].str.match(CI_CELL).all(), col
    assert df["Recall per scan (mean ± SD)"].str.contains("±").all()
    assert set(df["Paper"]) == {"https://doi.org/10.0/example"}
    assert_no_html(at)


def test_tier_filter_changes_the_table(monkeypatch, store_url):
    at = open_app(monkeypatch, store_url)
    assert len(table(at, "leaderboard_table")) == 4
    at.checkbox(key="tier_scored").uncheck().run()
    df = table(at, "leaderboard_table")
    assert list(df["Method"]) == ["bian2013", "ours", "log"]
    assert list(df["Rank"]) == ["1", "2", "3"]
    at.checkbox(key="tier_reproduced").uncheck().run()
    assert find_table(at, "leaderboard_table") is None
    assert any("No ranked run" in i.value for i in at.info)


def test_rank_metric_and_rule_filters_change_the_table(monkeypatch, store_url):
    at = open_app(monkeypatch, store_url)
    at.selectbox(key="rank_metric").select("fp_per_scan").run()
    assert list(table(at, "leaderboard_table")["Method"])[:2] == ["ours", "bian2013"]
    at.sidebar.selectbox(key="board_rule").select("delpozo2024@1").run()
    df = table(at, "leaderboard_table")
    assert list(df["Method"]) == ["log"] and df["F1"].iloc[0] == "0.300 [0.200, 0.400]"


def test_reported_rows_are_shown_apart_and_never_ranked(monkeypatch, store_url):
    at = open_app(monkeypatch, store_url, dataset=DOU)
    ranked = table(at, "leaderboard_table")
    assert list(ranked["Method"]) == ["bian2013"]
    reported = table(at, "reported_table")
    assert list(reported["Method"]) == ["poster"]
    assert "Rank" not in reported.columns
    assert reported["FP/scan"].iloc[0] == "0.500"
    assert "corrected to 0.50" in reported["Note"].iloc[0]
    assert reported["Link"].iloc[0] == "https://example.org/poster"
    assert any(h.value.startswith("Reported in papers (not ranked)") for h in at.subheader)


def test_curves_page_overlays_methods(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url), "curves")
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # FROC and PR
    froc = json.loads(charts[0].proto.spec)
    names = [t["name"] for t in froc["data"]]
    assert "bian2013@1.0 (reproduced)" in names and "log@1.0 (reproduced)" in names
    # the <script> name reaches plotly escaped, so plotly shows it as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@1 (scored)" in names
    assert SCRIPT_NAME + "@1 (scored)" not in names
    assert froc["layout"]["xaxis"]["type"] == "log"
    at.multiselect(key="curve_methods").set_value(["ours@0.1 (reproduced)"]).run()
    froc = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in froc["data"]] == ["ours@0.1 (reproduced)"]


def test_curves_page_shows_reported_points_as_markers(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url, dataset=DOU), "curves")
    froc = json.loads(at.get("plotly_chart")[0].proto.spec)
    reported = [t for t in froc["data"] if t["name"] == "reported (not ranked)"]
    assert len(reported) == 1 and reported[0]["mode"] == "markers"
    assert reported[0]["x"] == [0.5]


@pytest.mark.parametrize(("stratum", "metric", "values"), [
    ("size_bin", "recall", ["[0, 2) mm", "[2, 3) mm", "[3, 5) mm", "[5, 10) mm"]),
    ("location", "recall", ["lobar", "deep", "infratentorial"]),
    ("slice_thickness_bin", "fp_per_scan", ["<=1.5 mm", "(1.5, 3] mm", ">3 mm"]),
    ("mimic_class", "fp_per_scan", ["none", "calcification", "vein"]),
])
def test_strata_page(monkeypatch, store_url, stratum, metric, values):
    at = goto(open_app(monkeypatch, store_url), "strata")
    at.selectbox(key="stratum").select(stratum).run()
    at.selectbox(key=f"stratum_metric_{stratum}").select(metric).run()
    df = table(at, "strata_table")
    label = df.columns[1]
    assert sorted(df[label].unique()) == sorted(values)
    assert len(df) == 4 * len(values)  # four ranked methods
    assert df.iloc[:, 2].str.match(CI_CELL).all()
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["type"] for t in chart["data"]} == {"bar"} and len(chart["data"]) == 4


def test_strata_page_by_dataset_and_without_mimics(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url), "strata")
    at.selectbox(key="stratum").select("dataset").run()
    df = table(at, "strata_table")  # each method's runs on every dataset, same rule
    assert sorted(df["Dataset"]) == [DOU] + [SYNTH] * 4
    assert sorted(df[df["Dataset"] == DOU]["Method"]) == ["bian2013@1.0 (reproduced)"]
    at = goto(open_app(monkeypatch, store_url, dataset=DOU), "strata")
    at.selectbox(key="stratum").select("mimic_class").run()
    assert any("synthetic datasets only" in i.value for i in at.info)


def test_drilldown_page_shows_the_scan_with_its_matches(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url), "drilldown")
    images = at.get("image")
    assert len(images) == 1
    assert "radiological" in images[0].proto.imgs[0].caption
    matches = table(at, "drill_matches")
    assert sorted(matches["kind"]) == ["fn", "fp", "tp"]
    scans = table(at, "drill_scans")
    assert len(scans) == 4
    assert at.slider[0].value == 5  # the first finding's slice
    assert any(c.value == "TP 1 · FP 1 · FN 1 in this scan" for c in at.caption)
    at.selectbox(key="drill_scan").select("mini-3").run()
    attrs = table(at, "drill_scan_attrs")
    assert attrs.loc["slice_thickness_bin", "value"] == ">3 mm"


def test_drilldown_without_images_says_so(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url, dataset=DOU), "drilldown")
    assert not at.get("image")
    assert any("not available" in i.value for i in at.info)


def test_method_page_shows_manifest_text_literally(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url), "method")
    at.selectbox(key="method_id").select(f"{SCRIPT_NAME}@1").run()
    texts = [t.value for t in at.text]
    assert f"{SCRIPT_NAME} (version 1)" in texts
    assert f"manifest text {SCRIPT_NAME}" in texts
    assert "none" in texts  # overlap with the test data
    manifest = json.loads(at.json[0].proto.body)
    assert manifest["name"] == SCRIPT_NAME
    assert list(table(at, "method_runs")["tier"]) == ["scored"]
    assert_no_html(at)
    at.selectbox(key="method_id").select("poster@2024").run()
    assert not at.get("link_button") or all(
        "javascript" not in b.proto.url for b in at.get("link_button"))
    assert any("no http(s) link" in c.value for c in at.caption)


def test_definitions_page_renders_the_shared_source(monkeypatch, store_url):
    at = goto(open_app(monkeypatch, store_url), "definitions")
    bodies = [m.value for m in at.markdown]
    assert render_markdown() in bodies
    for d in DEFINITIONS:
        assert f"`{d.key}`" in render_markdown()


def test_every_page_without_a_store_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("CMBBENCH_DB", f"sqlite:///{tmp_path / 'none.sqlite'}")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert at.error[0].value == "The results store cannot be read."
    assert any("no results store" in t.value for t in at.text)
    goto(at, "definitions")  # needs no store
    assert render_markdown() in [m.value for m in at.markdown]
    assert not (tmp_path / "none.sqlite").exists()


def test_a_real_evaluate_run_shows_up(monkeypatch, tmp_path):
    """The README path: `cmbbench evaluate` imports its run into the store; the app shows it."""
    runner = CliRunner()
    res = runner.invoke(main, ["make-example", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    db = str(tmp_path / "store.sqlite")
    res = runner.invoke(main, ["evaluate", "--method", "log", "--dataset",
                               str(tmp_path / "ex" / "reference"), "--out",
                               str(tmp_path / "run"), "--n-boot", "50", "--quiet", "--db", db])
    assert res.exit_code == 0, res.output
    at = open_app(monkeypatch, f"sqlite:///{db}", dataset=None)
    # the newest ranked run's board is the default
    assert at.sidebar.selectbox(key="board_dataset").value == "EXAMPLE-v1"
    df = table(at, "leaderboard_table")
    assert list(df["Method"]) == ["log"] and list(df["Tier"]) == ["reproduced"]
    assert df["F1"].str.match(CI_CELL).all()
    digest = read_dataset(tmp_path / "ex" / "reference").content_sha256()
    assert list(df["Data copy"]) == [digest[:12]]
    at = goto(at, "drilldown")
    assert len(at.get("image")) == 1
    assert len(table(at, "drill_matches")) > 0
    goto(at, "curves")
    froc = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert froc["data"][0]["name"].startswith("log@")
    assert len(froc["data"][0]["x"]) > 3


def test_an_import_shows_up_without_restarting_the_app(monkeypatch, tmp_path):
    """Cached reads are keyed by the store revision: a write invalidates them."""
    url = build_store(tmp_path / "store")
    at = open_app(monkeypatch, url)
    assert len(table(at, "leaderboard_table")) == 4
    from leaderboard_store import _overall, _run

    from cmbbench.store import schema, write_transaction, writer_engine
    from cmbbench.store.engine import set_meta

    assert not at.warning  # every run that recorded a digest used one copy
    engine = writer_engine(url)
    with write_transaction(engine) as conn:
        conn.execute(schema.runs.insert(), [_run("late", "ours@0.1", SYNTH, "cmbbench@1",
                                                 "scored", 4, "2026-02-01T00:00:00+00:00",
                                                 data_sha256=COPY_B)])
        conn.execute(schema.aggregates.insert(), _overall("late", (0.9, 0.85, 0.95), 0.1, 4))
        set_meta(conn, "updated_at", "2026-02-01T00:00:00+00:00")
    engine.dispose()
    at.run()
    df = table(at, "leaderboard_table")
    assert len(df) == 5
    assert df["Tier"].iloc[0] == "scored" and df["F1"].iloc[0].startswith("0.900")
    assert df["Data copy"].iloc[0] == COPY_B[:12]
    # the new run used another copy of the dataset: the board says so, naming both copies
    (warning,) = at.warning
    assert "2 different copies" in warning.value
    assert COPY_A[:12] in warning.value and f"{COPY_B[:12]} (ours@0.1)" in warning.value


def test_streamlit_run_db_argument(monkeypatch):
    """`streamlit run leaderboard/app.py -- --db URL` reaches the app as sys.argv."""
    from cmbbench.leaderboard import ui

    monkeypatch.delenv("CMBBENCH_DB", raising=False)
    monkeypatch.setattr("sys.argv", [APP, "--db", "sqlite:////x/y.sqlite"])
    assert ui.db_url() == "sqlite:////x/y.sqlite"
    monkeypatch.setattr("sys.argv", ["pytest", "--db", "sqlite:////x/y.sqlite"])
    monkeypatch.setenv("CMBBENCH_DB", "sqlite:////other.sqlite")
    assert ui.db_url() == "sqlite:////other.sqlite"


def test_md_escape_shows_markdown_literally():
    from cmbbench.leaderboard.ui import md_escape

    assert md_escape("[x](javascript:alert(1)) *b* <i>") == (
        r"\[x\]\(javascript\:alert\(1\)\) \*b\* \<i\>")

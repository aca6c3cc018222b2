"""The leaderboard's library side: rank intervals, tables, metric definitions (docs and app
share one source), the slice renderer, the read-only engine, the static export and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from leaderboard_store import COPY_A, COPY_B, DOU, SCRIPT_NAME, SYNTH, build_store

from cmbbench.cli import main
from cmbbench.leaderboard import queries
from cmbbench.leaderboard.cli import streamlit_command
from cmbbench.leaderboard.slices import MARKERS, SliceView, finding_voxels, image_path, render_slice
from cmbbench.leaderboard.tables import (
    Board,
    copies_warning,
    data_copies,
    display_frame,
    format_ci,
    leaderboard_frame,
    rank_intervals,
    reported_frame,
    safe_url,
    strata_frame,
)
from cmbbench.metric_definitions import DEFINITIONS, docs_block, render_markdown, replace_docs_block
from cmbbench.metrics import aggregate, prepare, scan_table

REPO = Path(__file__).resolve().parents[1]
BOARD = Board(SYNTH, "cmbbench@1", "test")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("lbstore"))


@pytest.fixture(scope="module")
def tables(store_url):
    engine = queries.connect(store_url)
    runs = queries.load_runs(engine)
    agg = queries.load_aggregates(engine, list(runs["run_id"]))
    engine.dispose()
    return runs, agg


# ---------------------------------------------------------------------------------------------
# rank intervals


def test_rank_intervals_hand_computed():
    # A .60 [.50,.70], B .55 [.45,.65] overlap: both 1-2; C .40 [.35,.44] below both: 3;
    # D .20 [.10,.30]: 4; E has no value: not ranked.
    v = np.array([0.60, 0.55, 0.40, 0.20, np.nan])
    lo = np.array([0.50, 0.45, 0.35, 0.10, np.nan])
    hi = np.array([0.70, 0.65, 0.44, 0.30, np.nan])
    rank, best, worst = rank_intervals(v, lo, hi, higher_is_better=True)
    assert rank[:4].tolist() == [1, 2, 3, 4] and math.isnan(rank[4])
    assert best[:4].tolist() == [1, 1, 3, 4]
    assert worst[:4].tolist() == [2, 2, 3, 4]


def test_rank_intervals_lower_is_better_and_ties_and_missing_ci():
    # FP/scan: 1.0 [0.5, 1.5] and 1.2 [1.1, 1.3] overlap; 1.0 (no CI) ties with the first.
    v = np.array([1.0, 1.2, 1.0, 9.0])
    lo = np.array([0.5, 1.1, np.nan, 8.0])
    hi = np.array([1.5, 1.3, np.nan, 10.0])
    rank, best, worst = rank_intervals(v, lo, hi, higher_is_better=False)
    assert rank.tolist() == [1, 3, 1, 4]  # ties share the best rank
    assert best.tolist() == [1, 2, 1, 4]  # row 1's CI [1.1,1.3] is entirely worse than 1.0
    assert worst.tolist() == [3, 3, 2, 4]


def test_rank_interval_always_contains_the_rank():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        v = rng.random(n).round(2)
        half = rng.random(n) * 0.3
        rank, best, worst = rank_intervals(v, v - half, v + half,
                                           higher_is_better=bool(rng.integers(2)))
        assert (best <= rank).all() and (rank <= worst).all()
        assert best.min() == 1 and worst.max() <= n


# ---------------------------------------------------------------------------------------------
# tables


def test_safe_url_keeps_only_http_links():
    assert safe_url("https://doi.org/10.1/x") == "https://doi.org/10.1/x"
    assert safe_url(" http://example.org ") == "http://example.org"
    for bad in ("javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,<b>x",
                "ftp://example.org", "https://", "", None, float("nan"), "example.org"):
        assert safe_url(bad) is None, bad


def test_format_ci():
    assert format_ci(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
    assert format_ci(0.5, None, None) == "0.500"
    assert format_ci(float("nan"), 0.1, 0.2) == "—"


def test_leaderboard_frame_ranks_tiers_and_reported(tables):
    runs, agg = tables
    frame = leaderboard_frame(runs, agg, BOARD)
    assert list(frame["method_name"]) == ["bian2013", "ours", SCRIPT_NAME, "log"]
    assert frame[["rank", "rank_best", "rank_worst"]].to_numpy().tolist() == [
        [1, 1, 2], [2, 1, 2], [3, 3, 3], [4, 4, 4]]
    assert frame["f1_ci_lower"].notna().all() and frame["f1_ci_upper"].notna().all()
    assert "reported" not in set(frame["tier"])
    only_reproduced = leaderboard_frame(runs, agg, BOARD, tiers=["reproduced"])
    assert SCRIPT_NAME not in set(only_reproduced["method_name"])
    assert list(only_reproduced["rank"]) == [1, 2, 3]
    # "reported" is never ranked, even when asked for
    assert leaderboard_frame(runs, agg, Board(DOU, "delpozo2024@1", "test"),
                             tiers=["reported"]).empty
    by_fp = leaderboard_frame(runs, agg, BOARD, rank_metric="fp_per_scan")
    assert by_fp["method_name"].iloc[0] == "ours"  # 1.2 FP/scan: lowest is best
    rep = reported_frame(runs, agg, DOU)
    assert list(rep["method_name"]) == ["poster"]
    assert rep["fp_per_scan"].iloc[0] == pytest.approx(0.50)
    assert "corrected" in rep["reported_note"].iloc[0]


def test_display_frame_is_text_with_safe_links(tables):
    runs, agg = tables
    shown = display_frame(leaderboard_frame(runs, agg, BOARD))
    assert shown.loc[0, "F1"] == "0.600 [0.500, 0.700]"
    assert shown.loc[0, "Rank interval"] == "1–2" and shown.loc[2, "Rank interval"] == "3"
    assert shown.loc[2, "Method"] == SCRIPT_NAME  # the literal text, not markup
    assert shown.loc[0, "F1 per scan (mean ± SD)"] == "0.590 ± 0.220"
    frame = leaderboard_frame(runs, agg, BOARD).assign(paper_url="javascript:alert(1)")
    assert display_frame(frame)["Paper"].isna().all()


def test_data_copy_column_and_warning(tables):
    runs, agg = tables
    frame = leaderboard_frame(runs, agg, BOARD)
    # reproduced runs recorded COPY_A; the scored run predates digests
    assert data_copies(frame) == {COPY_A: ["bian2013@1.0", "ours@0.1", "log@1.0"]}
    assert copies_warning(frame) is None
    shown = display_frame(frame).set_index("Method")["Data copy"]
    assert shown["ours"] == COPY_A[:12] and shown[SCRIPT_NAME] == "—"
    other = frame.copy()
    other.loc[other["method_name"] == "log", "data_sha256"] = COPY_B
    warning = copies_warning(other)
    assert warning is not None and "2 different copies" in warning
    assert f"{COPY_A[:12]} (bian2013@1.0, ours@0.1)" in warning
    assert f"{COPY_B[:12]} (log@1.0)" in warning
    assert queries.content_digest('{"dataset": {"content_sha256": "ab"}}') == "ab"
    assert queries.content_digest("{}") is None and queries.content_digest("not json") is None
    assert queries.content_digest(None) is None and queries.content_digest("[1]") is None


def test_strata_frame_orders_size_bins(tables):
    _runs, agg = tables
    labels = {"synth00": "bian", "synth03": "log"}
    sf = strata_frame(agg, labels, "size_bin", "recall")
    assert list(sf["stratum_value"].unique()) == ["[0, 2) mm", "[2, 3) mm", "[3, 5) mm",
                                                  "[5, 10) mm"]
    assert list(sf["method"][:2]) == ["bian", "log"]
    assert sf["ci_lower"].notna().all()


def test_engine_is_read_only(store_url):
    engine = queries.connect(store_url)
    with (pytest.raises(sa.exc.OperationalError, match="readonly|read-only|read only"),
          engine.begin() as conn):
        conn.execute(sa.text("DELETE FROM runs"))
    assert len(queries.load_runs(engine)) == 7
    engine.dispose()


def test_missing_store_is_not_created(tmp_path):
    path = tmp_path / "none.sqlite"
    with pytest.raises(queries.StoreUnavailable, match="no results store"):
        queries.connect(f"sqlite:///{path}")
    assert not path.exists()


def test_metric_aliases_normalise_aggregate_keys(tmp_path, store_url):
    # a store written with aggregate() keys is read with the store names
    frame = pd.DataFrame({"metric": ["precision_pooled", "average_precision", "recall_mean",
                                     "cpm"]})
    assert list(frame["metric"].replace(queries.METRIC_ALIASES)) == [
        "precision", "ap", "recall_scan_mean", "cpm"]


# ---------------------------------------------------------------------------------------------
# metric definitions: one source for docs/metrics.md, the app and the store


def test_docs_metrics_md_holds_the_generated_block():
    text = (REPO / "docs" / "metrics.md").read_text()
    assert docs_block() in text, ("docs/metrics.md is out of date: run "
                                  "`python -m cmbbench.metric_definitions --write "
                                  "docs/metrics.md`")
    assert replace_docs_block(text) == text


def test_replace_docs_block_rewrites_and_requires_markers():
    stale = f"intro\n{docs_block().replace('higher', 'HIGHER')}\noutro\n"
    assert replace_docs_block(stale) == f"intro\n{docs_block()}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_docs_block("no block here")


def test_every_definition_is_computed_by_aggregate_and_named_by_the_store(case_factory):
    case = case_factory([((10, 10, 10), 2.0), ((25, 25, 25), 2.0)],
                        [((10, 10, 10), 2.0, 0.9), ((30, 10, 10), 2.0, 0.7)])
    table = case.score()
    scans = scan_table(table, ["s"])
    keys = set(aggregate(prepare(table, scans), operating_threshold=0.5))
    from cmbbench.store.bundle import store_metric_name

    for d in DEFINITIONS:
        assert d.aggregate_key in keys, d
        assert store_metric_name(d.aggregate_key) == d.key, d
    assert len({d.key for d in DEFINITIONS}) == len(DEFINITIONS)
    assert render_markdown().count("\n") == len(DEFINITIONS) + 1


# ---------------------------------------------------------------------------------------------
# slice renderer


def _view() -> SliceView:
    data = np.full((20, 10, 6), 50.0, dtype=np.float32)
    return SliceView(data=data, affine=np.eye(4), original_affine=np.eye(4),
                     spacing=np.ones(3), window=(0.0, 100.0))


def test_render_slice_marks_findings_radiologically():
    view = _view()
    matches = pd.DataFrame({"kind": ["tp", "fp", "fn"], "x_mm": [17.0, 2.0, np.nan],
                            "y_mm": [5.0, 5.0, np.nan], "z_mm": [3.0, 3.0, np.nan],
                            "i": [np.nan, np.nan, 10.0], "j": [np.nan, np.nan, 5.0],
                            "k": [np.nan, np.nan, 0.0]})
    found = finding_voxels(matches, view)
    assert found[["ci", "cj", "ck"]].to_numpy().tolist() == [[17, 5, 3], [2, 5, 3],
                                                             [10, 5, 0]]
    rgb = render_slice(view, 4, found, target_px=200)
    assert rgb.shape == (100, 200, 3) and rgb.dtype == np.uint8  # 10x20 plane, scale 10
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert MARKERS["tp"][0] in colours and MARKERS["fp"][0] in colours
    assert MARKERS["fn"][0] not in colours  # slice 0 is 4 mm away: not drawn
    tp_cols = np.nonzero((rgb == MARKERS["tp"][0]).all(axis=2))[1]
    fp_cols = np.nonzero((rgb == MARKERS["fp"][0]).all(axis=2))[1]
    # patient's right (large i: the TP at i=17) is shown on the viewer's left
    assert tp_cols.mean() < 100 < fp_cols.mean()
    plain = render_slice(view, 3, None, target_px=200)
    assert (plain == 127).all()  # 50 in a [0, 100] window


def test_image_path_prefers_the_scan_row(tmp_path):
    img = tmp_path / "own.nii.gz"
    img.write_bytes(b"x")
    (tmp_path / "ds" / "images").mkdir(parents=True)
    fallback = tmp_path / "ds" / "images" / "s1.nii.gz"
    fallback.write_bytes(b"x")
    ds = {"path": str(tmp_path / "ds")}
    assert image_path({"image_path": str(img)}, ds, "s1") == img
    assert image_path({"image_path": None}, ds, "s1") == fallback
    assert image_path({"image_path": str(tmp_path / "gone.nii.gz")}, ds, "s1") == fallback
    assert image_path(None, {"path": None}, "s1") is None


# ---------------------------------------------------------------------------------------------
# export and CLI


def test_export_snapshot_writes_tables_and_figures(store_url, tmp_path):
    out = tmp_path / "snap"
    result = CliRunner().invoke(main, ["leaderboard", "export", "--out", str(out), "--db",
                                       store_url, "--dataset", SYNTH, "--dataset", DOU])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "snapshot.json").read_text())
    assert {b["folder"] for b in index["boards"]} == {
        "SYNTH-mini-v1/cmbbench_1/test", "SYNTH-mini-v1/delpozo2024_1/test",
        "DOU-v1/cmbbench_1/test"}
    for f in index["files"]:
        assert (out / f).is_file(), f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    board = out / "SYNTH-mini-v1" / "cmbbench_1" / "test"
    lb = pd.read_csv(board / "leaderboard.csv")
    assert list(lb["rank"]) == [1, 2, 3, 4] and list(lb["rank_worst"]) == [2, 2, 3, 4]
    assert lb["f1_ci_lower"].notna().all()
    records = json.loads((board / "leaderboard.json").read_text())
    assert records[2]["method_name"] == SCRIPT_NAME
    for name in ("froc.png", "pr.png", "strata_size_bin_recall.png",
                 "strata_mimic_class_fp_per_scan.png", "strata.csv", "froc.csv"):
        assert (board / name).is_file(), name
    reported = pd.read_csv(out / "DOU-v1" / "reported.csv")
    assert list(reported["method_name"]) == ["poster"]
    assert not (out / "SYNTH-mini-v1" / "reported.csv").exists()


def test_cli_leaderboard_without_store_fails_clearly(tmp_path):
    result = CliRunner().invoke(main, ["leaderboard", "--db", str(tmp_path / "no.sqlite")])
    assert result.exit_code == 10
    assert "no results store" in result.output
    assert not (tmp_path / "no.sqlite").exists()
    result = CliRunner().invoke(main, ["leaderboard", "export", "--out", str(tmp_path / "o"),
                                       "--db", str(tmp_path / "no.sqlite")])
    assert result.exit_code == 10


def test_cli_export_rejects_unknown_rank_metric(store_url, tmp_path):
    result = CliRunner().invoke(main, ["leaderboard", "export", "--out", str(tmp_path),
                                       "--db", store_url, "--rank-by", "bogus"])
    assert result.exit_code == 2 and "unknown rank metric" in result.output


def test_streamlit_command_serves_the_app_on_loopback():
    cmd = streamlit_command("sqlite:////x/store.sqlite", port=8765)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    assert Path(cmd[4]) == REPO / "leaderboard" / "app.py"
    assert "--server.address=127.0.0.1" in cmd and "--server.port=8765" in cmd
    assert cmd[-3:] == ["--", "--db", "sqlite:////x/store.sqlite"]

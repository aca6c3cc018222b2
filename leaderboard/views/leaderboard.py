"""Leaderboard: methods x metrics for one dataset, rule and split, with CIs and rank intervals.

Reported rows (copied from papers) are listed apart and never ranked.
"""

from __future__ import annotations

import streamlit as st

from cmbbench.leaderboard import ui
from cmbbench.leaderboard.tables import (
    MEAN_SD,
    TABLE_METRICS,
    board_runs,
    copies_warning,
    display_frame,
    format_ci,
    leaderboard_frame,
    reported_frame,
    safe_url,
)
from cmbbench.metric_definitions import by_key

st.title("Leaderboard")
handle = ui.require_store()
board = ui.current_board()
if board is None:
    st.info("The store holds no runs yet: add one with `cmbbench evaluate` or "
            "`cmbbench db import RUN_DIR`.")
    st.stop()

defs = by_key()
runs = handle.runs()
st.caption(f"Dataset {ui.md_escape(board.dataset_id)} · rule {ui.md_escape(board.rule_id)} · "
           f"split {ui.md_escape(board.split)}")

c_tier, c_rank = st.columns([2, 2])
with c_tier:
    st.write("Tiers ranked")
    tiers = [t for t in ("reproduced", "scored")
             if st.checkbox(t, value=True, key=f"tier_{t}")]
with c_rank:
    rankable = list(TABLE_METRICS) + [m for m, _ in MEAN_SD]
    rank_metric = st.selectbox("Rank by", rankable, index=rankable.index("f1"),
                               format_func=lambda k: defs[k].label, key="rank_metric")

board_ids = list(board_runs(runs, board)["run_id"])
reported_ids = list(runs[(runs["dataset_id"] == board.dataset_id)
                         & (runs["tier"] == "reported")]["run_id"])
aggregates = handle.aggregates(board_ids + reported_ids)
frame = leaderboard_frame(runs, aggregates, board, tiers=tiers, rank_metric=rank_metric)

if frame.empty:
    st.info("No ranked run for this dataset, rule, split and tier selection.")
else:
    warning = copies_warning(frame)
    if warning:
        st.warning(warning)
    shown = display_frame(frame)
    st.dataframe(shown, hide_index=True, key="leaderboard_table",
                 column_config={"Paper": st.column_config.LinkColumn("Paper"),
                                "Code": st.column_config.LinkColumn("Code")})
    direction = "higher" if defs[rank_metric].higher_is_better else "lower"
    st.caption(
        f"{len(frame)} ranked rows, ranked by {defs[rank_metric].label} ({direction} is "
        "better). Cells: value [95% bootstrap CI over scans]; per-scan columns: mean ± SD. "
        "Rank interval: the ranks the CIs allow (rows whose CIs overlap may swap). "
        "Data copy: the first hex digits of the content sha256 of the dataset files the row "
        "was computed on (`cmbbench datasets verify` prints yours).")
    st.download_button("Download CSV (numbers with CI bounds)",
                       frame.to_csv(index=False).encode(), file_name="leaderboard.csv",
                       mime="text/csv", key="download_csv")

st.subheader("Reported in papers (not ranked)")
reported = reported_frame(runs, aggregates, board.dataset_id)
if reported.empty:
    st.caption("No reported rows for this dataset.")
else:
    st.caption("Numbers copied from the papers under their own matching rule and split: not "
               "comparable with the ranked rows, never ranked.")
    table = reported.assign(
        **{defs[m].label: [format_ci(v) for v in reported[m]] for m in TABLE_METRICS},
        Link=[safe_url(u) for u in reported.get("reported_url", reported["paper_url"])])
    table = table.rename(columns={"method_name": "Method", "reported_citation": "Citation",
                                  "table_page": "Table/page", "paper_rule": "Paper's rule",
                                  "paper_split": "Paper's split", "reported_note": "Note"})
    cols = ["Method", "Citation", "Table/page", "Paper's rule", "Paper's split"]
    cols += [defs[m].label for m in TABLE_METRICS] + ["Note", "Link"]
    st.dataframe(table[[c for c in cols if c in table.columns]], hide_index=True,
                 key="reported_table", column_config={"Link": st.column_config.LinkColumn()})

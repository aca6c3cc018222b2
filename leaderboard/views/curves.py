"""FROC and precision-recall curves of the board's runs, several methods overlaid."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from cmbbench.leaderboard import ui
from cmbbench.leaderboard.figures import froc_figure, pr_figure
from cmbbench.leaderboard.tables import leaderboard_frame, reported_frame, run_label

st.title("FROC and precision–recall curves")
handle = ui.require_store()
board = ui.current_board()
if board is None:
    st.info("The store holds no runs yet.")
    st.stop()

runs = handle.runs()
ranked = leaderboard_frame(runs, handle.aggregates(list(runs["run_id"][
    (runs["dataset_id"] == board.dataset_id) & (runs["rule_id"] == board.rule_id)])), board)
labels = ui.board_labels(ranked)
if not labels:
    st.info("No ranked run for this dataset, rule and split.")
    st.stop()
chosen = st.multiselect("Methods", list(labels.values()), default=list(labels.values())[:8],
                        key="curve_methods")
selected = {rid: lab for rid, lab in labels.items() if lab in chosen}
log_x = st.toggle("Logarithmic FP/scan axis", value=True, key="froc_log_x")

reported = reported_frame(runs, handle.aggregates(list(runs["run_id"][
    (runs["dataset_id"] == board.dataset_id) & (runs["tier"] == "reported")])),
    board.dataset_id)
points = pd.DataFrame({"x": reported["fp_per_scan"], "y": reported["recall"],
                       "label": [run_label(r) for _, r in reported.iterrows()]})
points = points.dropna(subset=["x", "y"])
if log_x:
    points = points[points["x"] > 0]

st.subheader("FROC")
froc = handle.curves(list(selected), "froc")
if froc.empty:
    st.caption("No FROC points stored for the selected runs.")
st.plotly_chart(froc_figure(froc, selected, log_x=log_x, reported=points), key="froc_chart")
st.caption("Every operating point is drawn (step rule, as the CPM uses). Dotted lines: the "
           "CPM rates 1/8 … 8 FP/scan. Crosses: reported operating points (not ranked, "
           "each under its paper's rule).")

st.subheader("Precision–recall (lesion level)")
pr = handle.curves(list(selected), "pr")
if pr.empty:
    st.caption("No precision–recall points stored for the selected runs.")
st.plotly_chart(pr_figure(pr, selected), key="pr_chart")

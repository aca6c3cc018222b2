"""Stratified analyses: recall by lesion size and location; FP/scan and recall by sequence,
field strength, slice thickness and dataset; FP by mimic class on synthetic data."""

from __future__ import annotations

import streamlit as st

from cmbbench.leaderboard import ui
from cmbbench.leaderboard.figures import strata_figure
from cmbbench.leaderboard.tables import (
    STRATA,
    dataset_strata_frame,
    format_ci,
    leaderboard_frame,
    strata_frame,
)
from cmbbench.metric_definitions import by_key

st.title("Stratified analyses")
handle = ui.require_store()
board = ui.current_board()
if board is None:
    st.info("The store holds no runs yet.")
    st.stop()

defs = by_key()
runs = handle.runs()
board_ids = list(runs["run_id"][(runs["dataset_id"] == board.dataset_id)
                                & (runs["rule_id"] == board.rule_id)])
ranked = leaderboard_frame(runs, handle.aggregates(board_ids), board)
labels = ui.board_labels(ranked)
if not labels:
    st.info("No ranked run for this dataset, rule and split.")
    st.stop()

stratum = st.selectbox("Stratum", list(STRATA), format_func=lambda s: STRATA[s][0],
                       key="stratum")
metric = st.selectbox("Metric", list(STRATA[stratum][1]), format_func=lambda m: defs[m].label,
                      key=f"stratum_metric_{stratum}")
chosen = st.multiselect("Methods", list(labels.values()), default=list(labels.values())[:6],
                        key="strata_methods")
selected = {rid: lab for rid, lab in labels.items() if lab in chosen}

if stratum == "dataset":
    all_ids = list(runs["run_id"][runs["rule_id"] == board.rule_id])
    method_ids = list(ranked[ranked["run_id"].isin(selected)]["method_id"])
    frame = dataset_strata_frame(runs, handle.aggregates(all_ids), board.rule_id, metric,
                                 method_ids)
    st.caption("By dataset: each method's overall value on every dataset it was run on "
               "under this rule (latest run per dataset).")
else:
    frame = strata_frame(handle.aggregates(list(selected), strata=(stratum,)), selected,
                         stratum, metric)

if frame.empty:
    note = (" Mimic classes exist on synthetic datasets only." if stratum == "mimic_class"
            else "")
    st.info(f"No {STRATA[stratum][0].lower()} values stored for the selected runs.{note}")
    st.stop()

st.plotly_chart(strata_figure(frame, defs[metric].label), key="strata_chart")
table = frame.assign(**{
    defs[metric].label: [format_ci(v, lo, hi) for v, lo, hi in
                         zip(frame["value"], frame["ci_lower"], frame["ci_upper"])]})
table = table.rename(columns={"method": "Method", "stratum_value": STRATA[stratum][0],
                              "n_scans": "Scans", "n_lesions": "CMBs"})
st.dataframe(table[["Method", STRATA[stratum][0], defs[metric].label, "Scans", "CMBs"]],
             hide_index=True, key="strata_table")
st.caption("Value [95% bootstrap CI over scans]; scans and CMBs in the stratum.")

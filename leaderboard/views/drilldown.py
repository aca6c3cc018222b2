"""Per-scan drill-down: one run's scans, the scan's match table and a slice viewer with
TP/FP/FN marked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from cmbbench.leaderboard import ui
from cmbbench.leaderboard.slices import MARKERS, finding_voxels, image_path, render_slice
from cmbbench.leaderboard.tables import leaderboard_frame

st.title("Scan drill-down")
handle = ui.require_store()
board = ui.current_board()
if board is None:
    st.info("The store holds no runs yet.")
    st.stop()

runs = handle.runs()
board_ids = list(runs["run_id"][(runs["dataset_id"] == board.dataset_id)
                                & (runs["rule_id"] == board.rule_id)])
ranked = leaderboard_frame(runs, handle.aggregates(board_ids), board)
labels = ui.board_labels(ranked)
if not labels:
    st.info("No ranked run for this dataset, rule and split.")
    st.stop()
run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="drill_run")

per_scan = handle.scan_metrics(run_id)
if per_scan.empty:
    st.info("This run has no per-scan rows in the store.")
    st.stop()
st.caption("Scans of the run, most errors (FP + FN) first.")
st.dataframe(per_scan.drop(columns=["errors"]), hide_index=True, key="drill_scans",
             height=220)
scan_id = st.selectbox("Scan", list(per_scan["scan_id"]), key="drill_scan")

matches = handle.matches(run_id, scan_id)
scans = handle.scans(board.dataset_id)
scan_row = scans[scans["scan_id"] == scan_id]
scan = scan_row.iloc[0] if len(scan_row) else None
datasets = handle.datasets()
ds_row = datasets[datasets["dataset_id"] == board.dataset_id]
dataset = ds_row.iloc[0] if len(ds_row) else None

col_img, col_tab = st.columns([3, 2])
with col_tab:
    st.subheader("Matches")
    st.dataframe(matches, hide_index=True, key="drill_matches")
    if scan is not None:
        st.subheader("Scan")
        st.dataframe(scan.to_frame("value").astype(str), key="drill_scan_attrs")

with col_img:
    path = image_path(scan, dataset, scan_id)
    if path is None:
        st.info("The scan's image is not available here (no scans.image_path and no "
                "harmonized dataset folder with images/<scan_id>.nii.gz).")
    else:
        view = ui.load_slice_view(path)
        found = finding_voxels(matches, view)
        on_image = found[np.isfinite(found["ck"])] if len(found) else found
        choices = ["(none)"] + [f"{r['kind'].upper()} {i}" for i, r in on_image.iterrows()]
        jump = st.selectbox("Go to finding", choices, key=f"drill_jump_{run_id}_{scan_id}")
        if jump != "(none)":
            default_k = round(on_image.loc[int(jump.split()[1]), "ck"])
        elif len(on_image):
            default_k = round(on_image["ck"].iloc[0])
        else:
            default_k = view.n_slices // 2
        default_k = int(np.clip(default_k, 0, view.n_slices - 1))
        k = st.slider("Axial slice", 0, view.n_slices - 1, default_k,
                      key=f"drill_slice_{run_id}_{scan_id}_{jump}")
        legend = " · ".join(f"{kind.upper()}: {colour_shape[1]}"
                            for kind, colour_shape in MARKERS.items())
        st.image(render_slice(view, k, on_image),
                 caption=f"slice {k} of {view.n_slices} (radiological: patient's right on the "
                         f"left, anterior up) — {legend}")
        counts = pd.Series(matches["kind"].str.lower()).value_counts() if len(matches) else {}
        st.caption("TP {} · FP {} · FN {} in this scan".format(
            *(int(counts.get(k_, 0)) for k_ in ("tp", "fp", "fn"))))

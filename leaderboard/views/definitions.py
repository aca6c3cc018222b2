"""Metric definitions: rendered from cmbbench.metric_definitions, like docs/metrics.md."""

from __future__ import annotations

import streamlit as st

from cmbbench.metric_definitions import render_markdown

st.title("Metric definitions")
st.markdown(
    "Every number on the leaderboard is computed by cmbbench from the per-lesion/per-candidate "
    "match table at the matching rule's operating threshold; confidence intervals are "
    "percentile bootstrap intervals over **scans** (never lesions). Notation: per scan *s*, "
    "R_s reference CMBs, TP_s detected CMBs, TPp_s correct candidates, FP_s false positives, "
    "D_s detections; N = all scored scans, CMB-free scans included. The full definitions and "
    "the edge-case policy (empty reference, empty prediction, both empty) are in "
    "`docs/metrics.md`; the table below is generated from the same source "
    "(`cmbbench/metric_definitions.py`).")
st.markdown(render_markdown())
st.subheader("Tiers")
st.markdown(
    "- **reproduced**: cmbbench ran the method itself;\n"
    "- **scored**: cmbbench scored predictions submitted by the method's authors;\n"
    "- **reported**: numbers copied from a paper, under the paper's own matching rule and "
    "split; shown apart and never ranked.")
st.subheader("Rank and rank interval")
st.markdown(
    "Ranked rows (reproduced and scored, one dataset, rule and split) are ordered by the rank "
    "metric (pooled F1 by default); ties share the best rank. The rank interval runs from "
    "1 + the number of rows whose whole 95% CI is better, to the number of rows minus those "
    "whose whole CI is worse: rows with overlapping CIs may swap places.")

"""Method page: manifest, training data, overlap with the test data, and the method's runs.

All of it is user-supplied text and is shown as text (st.text / st.json / st.dataframe).
"""

from __future__ import annotations

import json

import streamlit as st

from cmbbench.leaderboard import ui
from cmbbench.leaderboard.tables import safe_url

st.title("Methods")
handle = ui.require_store()
methods = handle.methods()
if methods.empty:
    st.info("The store holds no methods yet.")
    st.stop()

method_id = st.selectbox("Method", list(methods["method_id"]), key="method_id")
m = methods[methods["method_id"] == method_id].iloc[0]

st.subheader("Method")
st.text(f"{m['name']} (version {m['version']})")
for label, column in (("Citation", "citation"), ("Description", "description"),
                      ("Training data", "training_data"),
                      ("Overlap with the test data", "test_overlap")):
    st.caption(label)
    value = m.get(column)
    st.text("—" if value is None or str(value) in ("", "nan", "None") else str(value))
st.caption("Trainable")
st.text("yes" if bool(m.get("trainable")) else "no")
links = [(label, safe_url(m.get(col))) for label, col in (("Paper", "paper_url"),
                                                          ("Code", "code_url"))]
for (label, url), col in zip(links, st.columns(2)):
    with col:
        if url:
            st.link_button(label, url)
        else:
            st.caption(f"{label}: no http(s) link")

st.subheader("Manifest")
raw = m.get("manifest_json")
try:
    manifest = json.loads(raw) if isinstance(raw, str) and raw else None
except json.JSONDecodeError:
    manifest = None
if manifest is None:
    st.text(str(raw) if raw else "no manifest stored")
else:
    st.json(manifest, expanded=True)

st.subheader("Runs")
runs = handle.runs()
mine = runs[runs["method_id"] == method_id]
st.dataframe(mine[["run_id", "dataset_id", "rule_id", "split", "tier", "status", "n_scans",
                   "cmbbench_version", "imported_at"]], hide_index=True, key="method_runs")

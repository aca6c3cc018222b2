"""The cmbbench leaderboard: a read-only Streamlit app over the results store.

Start it with ``cmbbench leaderboard [--db URL] [--port P]`` or
``streamlit run leaderboard/app.py [-- --db URL]``. The store is ``--db``, else
``$CMBBENCH_DB``, else ``$CMBBENCH_HOME/store.sqlite``. Pages live in ``views/``; all logic is
in :mod:`cmbbench.leaderboard` (this folder is a script directory, not a package).
"""

from __future__ import annotations

import streamlit as st

from cmbbench.leaderboard import ui

st.set_page_config(page_title="cmbbench leaderboard", layout="wide")

PAGES = [
    st.Page("views/leaderboard.py", title="Leaderboard", url_path="leaderboard", default=True),
    st.Page("views/curves.py", title="FROC & PR curves", url_path="curves"),
    st.Page("views/strata.py", title="Strata", url_path="strata"),
    st.Page("views/drilldown.py", title="Scan drill-down", url_path="drilldown"),
    st.Page("views/method.py", title="Methods", url_path="method"),
    st.Page("views/definitions.py", title="Metric definitions", url_path="definitions"),
]

page = st.navigation(PAGES)
ui.sidebar()
page.run()

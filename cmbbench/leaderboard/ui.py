"""Streamlit helpers shared by the leaderboard pages: cached store reads, the sidebar, text.

Every read is cached with ``st.cache_data`` keyed by the store URL and the store revision
(:func:`.queries.revision`: number of runs and the last ``imported_at``), so pages are fast and
an import shows up on the next page load. User-supplied text (method and dataset names,
manifests, citations) is only ever shown through elements that render text literally
(``st.text``, ``st.code``, ``st.json``, ``st.dataframe``) or after :func:`md_escape` inside
Markdown; nothing uses ``unsafe_allow_html``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from sqlalchemy.engine import Engine

from . import queries
from .slices import SliceView, load_view
from .tables import Board, run_label

__all__ = [
    "StoreHandle",
    "board_labels",
    "current_board",
    "db_url",
    "load_slice_view",
    "md_escape",
    "require_store",
    "sidebar",
    "store",
]

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$=:])")


def md_escape(text: object) -> str:
    """``text`` with every Markdown special character backslash-escaped (shown literally)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def db_url() -> str:
    """The store URL: the app's ``--db`` script argument, else ``CMBBENCH_DB``, else default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=None)
    # `streamlit run leaderboard/app.py -- --db URL` sets sys.argv to [app.py, --db, URL]
    own = bool(sys.argv) and Path(sys.argv[0]).name == "app.py"
    args, _ = parser.parse_known_args(sys.argv[1:] if own else [])
    return queries.store_url(args.db)


@st.cache_resource(show_spinner=False)
def _engine(url: str) -> Engine:
    return queries.connect(url)


@st.cache_data(show_spinner=False, max_entries=8)
def _runs(url: str, rev: str) -> pd.DataFrame:
    return queries.load_runs(_engine(url))


@st.cache_data(show_spinner=False, max_entries=8)
def _methods(url: str, rev: str) -> pd.DataFrame:
    return queries.load_methods(_engine(url))


@st.cache_data(show_spinner=False, max_entries=8)
def _datasets(url: str, rev: str) -> pd.DataFrame:
    return queries.load_datasets(_engine(url))


@st.cache_data(show_spinner=False, max_entries=64)
def _aggregates(url: str, rev: str, run_ids: tuple[str, ...],
                strata: tuple[str, ...] | None) -> pd.DataFrame:
    return queries.load_aggregates(_engine(url), list(run_ids),
                                   None if strata is None else list(strata))


@st.cache_data(show_spinner=False, max_entries=32)
def _curves(url: str, rev: str, run_ids: tuple[str, ...], curve: str) -> pd.DataFrame:
    return queries.load_curves(_engine(url), list(run_ids), curve)


@st.cache_data(show_spinner=False, max_entries=32)
def _scan_metrics(url: str, rev: str, run_id: str) -> pd.DataFrame:
    return queries.load_scan_metrics(_engine(url), run_id)


@st.cache_data(show_spinner=False, max_entries=64)
def _matches(url: str, rev: str, run_id: str, scan_id: str) -> pd.DataFrame:
    return queries.load_matches(_engine(url), run_id, scan_id)


@st.cache_data(show_spinner=False, max_entries=16)
def _scans(url: str, rev: str, dataset_id: str) -> pd.DataFrame:
    return queries.load_scans(_engine(url), dataset_id)


@st.cache_resource(show_spinner=False, max_entries=4)
def _view(path: str, mtime: float) -> SliceView:
    return load_view(path)


def load_slice_view(path: Path) -> SliceView:
    """The scan at ``path`` ready to slice (cached by path and modification time)."""
    return _view(str(path), path.stat().st_mtime)


@dataclass(frozen=True)
class StoreHandle:
    """The store the app reads: URL and revision; its methods are the cached reads."""

    url: str
    rev: str

    def runs(self) -> pd.DataFrame:
        return _runs(self.url, self.rev)

    def methods(self) -> pd.DataFrame:
        return _methods(self.url, self.rev)

    def datasets(self) -> pd.DataFrame:
        return _datasets(self.url, self.rev)

    def aggregates(self, run_ids: list[str] | tuple[str, ...],
                   strata: list[str] | tuple[str, ...] | None = ("all",)) -> pd.DataFrame:
        return _aggregates(self.url, self.rev, tuple(sorted(run_ids)),
                           None if strata is None else tuple(strata))

    def curves(self, run_ids: list[str] | tuple[str, ...], curve: str) -> pd.DataFrame:
        return _curves(self.url, self.rev, tuple(sorted(run_ids)), curve)

    def scan_metrics(self, run_id: str) -> pd.DataFrame:
        return _scan_metrics(self.url, self.rev, run_id)

    def matches(self, run_id: str, scan_id: str) -> pd.DataFrame:
        return _matches(self.url, self.rev, run_id, scan_id)

    def scans(self, dataset_id: str) -> pd.DataFrame:
        return _scans(self.url, self.rev, dataset_id)


def store() -> StoreHandle | str:
    """The store handle, or the reason it cannot be read (a one-line message)."""
    url = db_url()
    try:
        rev = queries.revision(_engine(url))
    except queries.StoreUnavailable as exc:
        _engine.clear()  # a store created later must be found without a restart
        return str(exc)
    return StoreHandle(url, rev)


def require_store() -> StoreHandle:
    """The store handle; otherwise an error message and the page stops."""
    handle = store()
    if isinstance(handle, str):
        st.error("The results store cannot be read.")
        st.text(handle)
        st.stop()
    return handle


def _options(frame: pd.DataFrame, column: str) -> list[str]:
    return sorted(str(v) for v in frame[column].dropna().unique())


def _select(label: str, options: list[str], key: str, preferred: str | None) -> None:
    """A selectbox whose stale value (not among ``options``) is dropped; ``preferred`` is the
    default when it is an option."""
    if st.session_state.get(key) not in options:
        st.session_state.pop(key, None)
    index = options.index(preferred) if preferred in options else 0
    st.selectbox(label, options, index=index, key=key)


def sidebar() -> None:
    """The board selectors (dataset, rule, split) and the store line, on every page."""
    handle = store()
    with st.sidebar:
        if isinstance(handle, str):
            st.caption("No results store")
            return
        runs = handle.runs()
        st.caption("Results store (read only)")
        st.text(queries.display_url(handle.url))
        if runs.empty:
            st.caption("The store holds no runs yet.")
            return
        # default board: the one of the most recently imported ranked run
        ranked_all = runs[runs["tier"].isin(queries.RANKED_TIERS)]
        latest = ranked_all.sort_values("imported_at").iloc[-1] if len(ranked_all) else None
        datasets = _options(runs, "dataset_id")
        _select("Dataset", datasets, "board_dataset",
                None if latest is None else latest["dataset_id"])
        ds = runs[runs["dataset_id"] == st.session_state["board_dataset"]]
        ranked = ds[ds["tier"].isin(queries.RANKED_TIERS)]
        _select("Matching rule", _options(ranked if len(ranked) else ds, "rule_id"),
                "board_rule", None if latest is None else latest["rule_id"])
        sel = ranked[ranked["rule_id"] == st.session_state["board_rule"]]
        _select("Split", _options(sel, "split") or ["all"], "board_split",
                None if latest is None else latest["split"])
        st.caption(f"{len(runs)} runs in the store")


def current_board() -> Board | None:
    """The board chosen in the sidebar (``None`` when the store has no runs)."""
    ds, rule = st.session_state.get("board_dataset"), st.session_state.get("board_rule")
    if ds is None or rule is None:
        return None
    return Board(ds, rule, st.session_state.get("board_split"))


def board_labels(runs: pd.DataFrame) -> dict[str, str]:
    """run_id -> label for the runs of a board, made unique if two runs share one."""
    labels: dict[str, str] = {}
    for _, r in runs.iterrows():
        label = run_label(r)
        if label in labels.values():
            label = f"{label} [{r['run_id']}]"
        labels[r["run_id"]] = label
    return labels

"""Read-only views of the results store for the leaderboard app and its static export.

- :mod:`.queries`: the store's tables as DataFrames (plain SQL against the schema contract of
  ``docs/store.md``), through a read-only engine;
- :mod:`.tables`: the leaderboard table (metrics with CIs, rank intervals, tier filter,
  reported rows apart), strata and curve frames;
- :mod:`.figures`: plotly figures (app) and matplotlib PNGs (export);
- :mod:`.slices`: the drill-down slice renderer (TP/FP/FN marked);
- :mod:`.export`: ``cmbbench leaderboard export``;
- :mod:`.cli`: the ``cmbbench leaderboard`` command group.

The Streamlit app itself lives in ``leaderboard/`` at the repository root and only imports
this package. Nothing here writes to the store.
"""

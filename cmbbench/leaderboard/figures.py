"""FROC, precision–recall and strata figures: plotly for the app, matplotlib PNGs for export.

Both renderers take the same frames (:func:`.queries.load_curves`, :func:`.tables.strata_frame`)
so the app and the static snapshot show the same numbers. Labels are user text (method names):
plotly interprets a few HTML-like tags in labels, so they are HTML-escaped (plotly shows the
escaped text literally); matplotlib labels are plain text already.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..metrics import FROC_FP_RATES

if TYPE_CHECKING:  # plotly is the [leaderboard] extra
    import plotly.graph_objects as go

__all__ = [
    "froc_figure",
    "plotly_text",
    "pr_figure",
    "save_curve_png",
    "save_strata_png",
    "strata_figure",
]

_AXES = {"froc": ("FP per scan (all scans)", "Sensitivity (lesion recall)"),
         "pr": ("Recall", "Precision")}


def plotly_text(text: object) -> str:
    """``text`` escaped for plotly labels (``<script>`` is shown as ``<script>``, not parsed)."""
    return html.escape(str(text), quote=False)


def _mpl_text(text: object) -> str:
    """``text`` as literal matplotlib text (no mathtext; no leading ``_`` hiding a label)."""
    s = str(text).replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _finite(frame: pd.DataFrame) -> pd.DataFrame:
    x = pd.to_numeric(frame["x"], errors="coerce")
    y = pd.to_numeric(frame["y"], errors="coerce")
    return frame.assign(x=x, y=y)[np.isfinite(x) & np.isfinite(y)]


def _curve_figure(curves: pd.DataFrame, labels: dict[str, str], kind: str, *,
                  log_x: bool = False, reported: pd.DataFrame | None = None) -> go.Figure:
    import plotly.graph_objects as go

    fig = go.Figure()
    for run_id, label in labels.items():
        pts = _finite(curves[curves["run_id"] == run_id].sort_values("point"))
        if kind == "froc" and log_x:
            pts = pts[pts["x"] > 0]
        if pts.empty:
            continue
        fig.add_trace(go.Scatter(
            x=pts["x"], y=pts["y"], mode="lines+markers", name=plotly_text(label),
            line={"shape": "hv"}, marker={"size": 4},
            customdata=pts[["threshold"]].to_numpy(),
            hovertemplate="%{x:.3f}, %{y:.3f} (threshold %{customdata[0]:.3f})"))
    if reported is not None and len(reported):
        fig.add_trace(go.Scatter(
            x=reported["x"], y=reported["y"], mode="markers", name="reported (not ranked)",
            marker={"symbol": "x", "size": 10, "color": "black"},
            text=[plotly_text(t) for t in reported["label"]],
            hovertemplate="%{text}: %{x:.3f}, %{y:.3f}<extra></extra>"))
    xt, yt = _AXES[kind]
    fig.update_layout(xaxis_title=xt, yaxis_title=yt, yaxis_range=[0, 1.02],
                      legend_title_text="method (tier)", margin={"t": 30, "b": 40},
                      height=480, showlegend=True)
    if kind == "froc":
        if log_x:
            fig.update_xaxes(type="log", tickvals=list(FROC_FP_RATES),
                             ticktext=[f"{r:g}" for r in FROC_FP_RATES],
                             range=[np.log10(1 / 32), np.log10(16)])
        for r in FROC_FP_RATES:
            fig.add_vline(x=r, line_dash="dot", line_color="lightgrey")
    else:
        fig.update_xaxes(range=[0, 1.02])
    return fig


def froc_figure(curves: pd.DataFrame, labels: dict[str, str], *, log_x: bool = True,
                reported: pd.DataFrame | None = None) -> go.Figure:
    """FROC curves (every operating point, step-drawn) of the runs in ``labels``.

    ``reported``: optional single operating points of reported rows (columns ``x`` = FP/scan,
    ``y`` = recall, ``label``), drawn as crosses, never as curves.
    """
    return _curve_figure(curves, labels, "froc", log_x=log_x, reported=reported)


def pr_figure(curves: pd.DataFrame, labels: dict[str, str]) -> go.Figure:
    """Lesion precision–recall curves of the runs in ``labels``."""
    return _curve_figure(curves, labels, "pr")


def strata_figure(frame: pd.DataFrame, metric_label: str) -> go.Figure:
    """Grouped bars of one stratum (x = stratum value, one colour per method) with CI bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, g in frame.groupby("method", sort=False):
        err_hi = (g["ci_upper"] - g["value"]).to_numpy(np.float64)
        err_lo = (g["value"] - g["ci_lower"]).to_numpy(np.float64)
        fig.add_trace(go.Bar(
            x=[plotly_text(v) for v in g["stratum_value"]], y=g["value"],
            name=plotly_text(method),
            error_y={"type": "data", "symmetric": False, "array": np.nan_to_num(err_hi),
                     "arrayminus": np.nan_to_num(err_lo)}))
    fig.update_layout(barmode="group", yaxis_title=metric_label, margin={"t": 30, "b": 40},
                      legend_title_text="method (tier)", height=420, showlegend=True)
    return fig


def save_curve_png(path: str | Path, curves: pd.DataFrame, labels: dict[str, str],
                   kind: str, *, title: str = "") -> Path:
    """The FROC (``kind='froc'``, log x) or PR curves as a PNG, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for run_id, label in labels.items():
        pts = _finite(curves[curves["run_id"] == run_id].sort_values("point"))
        if kind == "froc":
            pts = pts[pts["x"] > 0]
        if len(pts):
            ax.step(pts["x"], pts["y"], where="post", label=_mpl_text(label), linewidth=1.3)
    xt, yt = _AXES[kind]
    if kind == "froc":
        ax.set_xscale("log")
        ax.set_xticks(list(FROC_FP_RATES), [f"{r:g}" for r in FROC_FP_RATES])
        for r in FROC_FP_RATES:
            ax.axvline(r, color="0.85", linestyle=":", linewidth=0.8)
    else:
        ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xt)
    ax.set_ylabel(yt)
    ax.set_title(_mpl_text(title), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_strata_png(path: str | Path, frame: pd.DataFrame, metric_label: str, *,
                    title: str = "") -> Path:
    """A stratum's grouped bars with CI whiskers as a PNG, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(dict.fromkeys(frame["stratum_value"]))
    methods = list(dict.fromkeys(frame["method"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.8 / max(len(methods), 1)
    for n, method in enumerate(methods):
        g = frame[frame["method"] == method].set_index("stratum_value").reindex(values)
        x = np.arange(len(values)) + n * width
        err = np.vstack([(g["value"] - g["ci_lower"]).to_numpy(np.float64),
                         (g["ci_upper"] - g["value"]).to_numpy(np.float64)])
        # lists, not arrays: matplotlib 3.11 warns on a single bar with a (2, 1) error array
        ax.bar(x.tolist(), g["value"].to_numpy(np.float64).tolist(), width,
               label=_mpl_text(method), yerr=np.nan_to_num(err).tolist(), capsize=2)
    ax.set_xticks(np.arange(len(values)) + width * (len(methods) - 1) / 2,
                  [_mpl_text(v) for v in values], fontsize=8)
    ax.set_ylabel(metric_label)
    ax.set_title(_mpl_text(title), fontsize=9)
    if methods:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

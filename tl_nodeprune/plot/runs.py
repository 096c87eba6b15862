"""Figures of runs and comparisons: training history, head overlap, sweep frontier, ROC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..circuit import Circuit
from ..granularities import SPECS
from ._common import CLASS_COLOURS

# Columns `frontier` reads from a sweep DataFrame (one row per circuit).
FRONTIER_COLUMNS = {
    "method": "str: one line per method (e.g. 'nodeprune', 'edge_pruning')",
    "size": "float: circuit size on the x axis (a fraction, or a count: say so in size_label)",
    "faithfulness": "float: f = (C - E) / (M - E) on held-out prompts",
}


def history(history: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Loss terms (top, log scale) and kept fraction per granularity (bottom) against step.

    Reads `PruneResult.history`: `step`, `loss`, `faithfulness`, `sparsity_<g>` and
    `kept_<g>` columns.
    """
    if "step" not in history.columns:
        raise ValueError(f"history needs a 'step' column; it has {list(history.columns)}.")
    loss_cols = [c for c in ("loss", "faithfulness") if c in history.columns]
    loss_cols += [c for c in history.columns if c.startswith("sparsity_")]
    kept_cols = [f"kept_{g}" for g in SPECS if f"kept_{g}" in history.columns]
    if not loss_cols and not kept_cols:
        raise ValueError("history has no loss or kept_<granularity> columns to plot.")
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
        subplot_titles=("loss terms", "kept fraction (deterministic gates)"),
    )  # fmt: skip
    step = history["step"].to_numpy()
    for col in loss_cols:
        fig.add_trace(go.Scatter(x=step, y=history[col], mode="lines", name=col), row=1, col=1)
    for col in kept_cols:
        fig.add_trace(
            go.Scatter(x=step, y=history[col], mode="lines", name=col.replace("kept_", "kept ")),
            row=2,
            col=1,
        )
    fig.update_yaxes(type="log", row=1)
    fig.update_yaxes(range=[0, 1.02], title="fraction kept", row=2)
    fig.update_xaxes(range=[float(step.min()), float(step.max())], title="step", row=2)
    fig.update_layout(title=title or "Training history", height=520)
    return fig


def overlap(
    a: Circuit, b: Circuit, names: tuple[str, str] = ("A", "B"), title: str | None = None
) -> go.Figure:
    """Which heads two circuits of one model share: both, only the first, only the second."""
    a.shape.check_same(b.shape)
    ka, kb = a.kept("head").numpy(), b.kept("head").numpy()
    n_layers, n_heads = ka.shape
    fig = go.Figure()
    groups = (
        ("both", ka & kb, "#6a3d9a", "square"),
        (f"only {names[0]}", ka & ~kb, "#1f77b4", "triangle-left"),
        (f"only {names[1]}", ~ka & kb, "#d62728", "triangle-right"),
    )
    for label, mask, colour, symbol in groups:
        layer, head = np.nonzero(mask)
        fig.add_trace(
            go.Scatter(
                x=head, y=layer, mode="markers", name=f"{label} ({len(layer)})",
                marker={"symbol": symbol, "size": 12, "color": colour},
                hovertemplate=f"layer %{{y}}, head %{{x}}: {label}<extra></extra>",
            )
        )  # fmt: skip
    fig.update_xaxes(title="head", range=[-0.5, n_heads - 0.5], dtick=1)
    fig.update_yaxes(title="layer", range=[-0.5, n_layers - 0.5], dtick=1 if n_layers <= 32 else 2)
    fig.update_layout(
        title=title or f"Head overlap: {names[0]} vs {names[1]}",
        height=max(320, 22 * n_layers + 120),
        width=max(420, 40 * n_heads + 260),
    )
    return fig


def frontier(
    sweep: pd.DataFrame, size_label: str = "circuit size", title: str | None = None
) -> go.Figure:
    """Faithfulness against circuit size, one line per method, from a sweep DataFrame.

    Needs the columns in `FRONTIER_COLUMNS`; any other columns show in the hover.
    """
    missing = [c for c in FRONTIER_COLUMNS if c not in sweep.columns]
    if missing:
        raise ValueError(
            f"frontier needs columns {list(FRONTIER_COLUMNS)}; missing {missing}. "
            + "; ".join(f"{k}: {v}" for k, v in FRONTIER_COLUMNS.items())
        )
    extra = [c for c in sweep.columns if c not in FRONTIER_COLUMNS]
    fig = go.Figure()
    for i, (method, rows) in enumerate(sweep.groupby("method", sort=False)):
        rows = rows.sort_values("size")
        hover = [
            "<br>".join(f"{c}: {r[c]}" for c in extra) for _, r in rows.iterrows()
        ] if extra else None  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=rows["size"], y=rows["faithfulness"], mode="lines+markers", name=str(method),
                line={"color": CLASS_COLOURS[i % len(CLASS_COLOURS)]}, text=hover,
                hovertemplate="size %{x}<br>faithfulness %{y:.3f}<br>%{text}<extra></extra>",
            )
        )  # fmt: skip
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    fig.update_xaxes(title=size_label)
    fig.update_yaxes(title="faithfulness")
    fig.update_layout(title=title or "Size / faithfulness frontier", height=420)
    return fig


Curve = tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def roc(curves: Mapping[str, Curve] | Curve, title: str | None = None) -> go.Figure:
    """ROC curves against a reference: `{name: (fpr, tpr)}`, or one `(fpr, tpr)` pair."""
    if not isinstance(curves, Mapping):
        curves = {"circuit": curves}
    fig = go.Figure(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                   line={"dash": "dot", "color": "gray"}, hoverinfo="skip")
    )  # fmt: skip
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"ROC {name!r}: fpr and tpr must be 1-d of one length.")
        if ((fpr < 0) | (fpr > 1) | (tpr < 0) | (tpr > 1)).any():
            raise ValueError(f"ROC {name!r}: rates must lie in [0, 1].")
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=name))
    fig.update_xaxes(title="false positive rate", range=[0, 1], constrain="domain")
    fig.update_yaxes(title="true positive rate", range=[0, 1], scaleanchor="x")
    fig.update_layout(title=title or "ROC against the reference", height=440, width=480)
    return fig

"""Where a position-aware circuit's nodes work: kept nodes by token position."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..circuit import Circuit
from ..granularities import node_name, spec
from ._common import PlotReference, head_classes


def by_position(
    circuit: Circuit,
    granularity: str = "head",
    reference: PlotReference | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of the nodes kept at some position (rows, by layer) x positions (columns).

    A cell is the node's gate at that position, 0 where its parent is closed there (the node
    is then ablated whatever its own gate); kept cells carry a marker. With `reference`, head
    rows are labelled with their class (e.g. "name mover").
    """
    if circuit.positions is None:
        raise ValueError(
            "This circuit is position-blind (one gate per node, at every position); find one "
            "with PruneConfig(positions='named') or 'absolute' to see where its nodes work."
        )
    if granularity not in circuit.gates:
        raise ValueError(
            f"The circuit has no {granularity!r} gates; choose from {circuit.granularities}."
        )
    kept_at = circuit.kept_at(granularity)  # (positions, *units)
    rows = circuit.kept(granularity).nonzero().tolist()
    gate = np.where(_parent_closed(circuit, granularity), 0.0, circuit.gates[granularity].numpy())
    names = list(circuit.positions.names)
    z = np.array([[gate[(p, *idx)] for p in range(len(names))] for idx in rows]).reshape(
        len(rows), len(names)
    )
    kept = np.array([[bool(kept_at[(p, *idx)]) for p in range(len(names))] for idx in rows],
                    dtype=bool).reshape(len(rows), len(names))  # fmt: skip
    labels = _row_labels(circuit, granularity, rows, reference)
    fig = go.Figure(
        go.Heatmap(z=z, x=names, y=labels, zmin=0, zmax=1,
                   colorscale="Blues", colorbar={"title": "gate"},
                   hovertemplate="%{y} at %{x}<br>gate %{z:.3f}<extra></extra>")  # fmt: skip
    )
    ys, xs = np.nonzero(kept)
    fig.add_trace(go.Scatter(x=[names[i] for i in xs], y=[labels[i] for i in ys], mode="markers",
                             marker={"symbol": "square-open", "size": 14, "color": "#d62728"},
                             name="kept", hoverinfo="skip"))  # fmt: skip
    noun = spec(granularity).noun
    # Categorical axes fixed to the cells: markers would otherwise pad them.
    fig.update_yaxes(range=[len(rows) - 0.5, -0.5], title=noun)
    fig.update_xaxes(range=[-0.5, len(names) - 0.5], title=f"position ({circuit.positions.kind})")
    fig.update_layout(
        title=title or f"{len(rows)} {noun}s kept at {int(kept.sum())} node-positions",
        height=max(320, 22 * len(rows) + 140),
        width=max(420, 60 * len(names) + 260),
    )
    return fig


def _parent_closed(circuit: Circuit, granularity: str) -> np.ndarray:
    """Per position and unit, whether an ancestor closes the node there."""
    parent = spec(granularity).parent
    shape = circuit.gates[granularity].shape
    if parent is None:
        return np.zeros(shape, dtype=bool)
    kept = circuit.kept_at(parent).numpy()
    return ~np.broadcast_to(kept.reshape(*kept.shape, *([1] * (len(shape) - kept.ndim))), shape)


def _row_labels(
    circuit: Circuit, granularity: str, rows: list[list[int]], reference: PlotReference | None
) -> list[str]:
    """Node names, with the reference class of heads that have one."""
    classes = head_classes(circuit, reference) if granularity == "head" and reference else None
    labels = []
    for idx in rows:
        label = node_name(granularity, idx)
        if classes is not None and classes[idx[0]][idx[1]]:
            label += f" ({classes[idx[0]][idx[1]]})"
        labels.append(label)
    return labels

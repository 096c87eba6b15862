"""Figures of one circuit: head gates, neuron gates, and the circuit as a layered graph."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..circuit import Circuit
from ._common import (
    KEPT_COLOUR,
    NO_CLASS,
    PRUNED_COLOUR,
    Reference,
    class_colours,
    head_classes,
    unit_values,
)


def heads(
    circuit: Circuit, reference: Reference | None = None, title: str | None = None
) -> go.Figure:
    """Layer x head heatmap of head gates; kept heads outlined; reference classes in the hover."""
    gate, own = unit_values(circuit, "head")
    kept = circuit.kept("head").numpy()
    classes = head_classes(circuit, reference)
    n_layers, n_heads = kept.shape
    status = np.where(kept, "kept", "pruned")
    custom = np.dstack([status, np.array(classes, dtype=object)])
    cls_line = "<br>reference: %{customdata[1]}" if reference else ""
    fig = go.Figure(
        go.Heatmap(
            z=gate.numpy(),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            zmin=0,
            zmax=1,
            colorscale="Blues",
            colorbar={"title": "gate" if own else "block gate"},
            customdata=custom,
            hovertemplate="layer %{y}, head %{x}<br>gate %{z:.3f} (%{customdata[0]})"
            + cls_line
            + "<extra></extra>",
            name="gates",
        )
    )
    layer_idx, head_idx = np.nonzero(kept)
    fig.add_trace(
        go.Scatter(
            x=head_idx,
            y=layer_idx,
            mode="markers",
            marker={
                "symbol": "square-open",
                "size": 16,
                "color": KEPT_COLOUR,
                "line": {"width": 2},
            },
            name=f"kept ({len(layer_idx)})",
            hoverinfo="skip",
        )
    )
    if reference:
        ref = [(layer, head, c) for (layer, head), c in sorted(reference.items())]
        fig.add_trace(
            go.Scatter(
                x=[h for _, h, _ in ref],
                y=[layer for layer, _, _ in ref],
                mode="markers",
                marker={"symbol": "circle", "size": 6, "color": "#ff7f0e"},
                text=[c for _, _, c in ref],
                hovertemplate="layer %{y}, head %{x}<br>reference: %{text}<extra></extra>",
                name=f"reference ({len(ref)})",
            )
        )
    fig.update_xaxes(title="head", range=[-0.5, n_heads - 0.5], dtick=1)
    fig.update_yaxes(title="layer", range=[-0.5, n_layers - 0.5], dtick=1 if n_layers <= 32 else 2)
    fig.update_layout(
        title=title or f"Heads: {int(kept.sum())}/{kept.size} kept",
        height=max(320, 22 * n_layers + 120),
        width=max(420, 40 * n_heads + 260),
        legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
    )
    return fig


def neurons(circuit: Circuit, title: str | None = None) -> go.Figure:
    """Kept neurons per layer (bars) over every neuron's gate, sorted within its layer (WebGL).

    Neuron i-th largest in layer l sits at x = l + (i + 0.5) / d_mlp, so zooming into one layer
    separates single neurons; hover names each one (`m3.n17`).
    """
    if not circuit.shape.has("neuron"):
        raise ValueError(f"Model {circuit.shape.name!r} is attention-only: it has no neurons.")
    gate, own = unit_values(circuit, "neuron")
    kept = circuit.kept("neuron").numpy()
    values = gate.numpy()
    n_layers, d_mlp = values.shape
    order = np.argsort(-values, axis=1, kind="stable")  # (layer, rank) -> neuron index
    sorted_vals = np.take_along_axis(values, order, axis=1)
    sorted_kept = np.take_along_axis(kept, order, axis=1)
    x = np.arange(n_layers)[:, None] + (np.arange(d_mlp)[None, :] + 0.5) / d_mlp
    layer = np.broadcast_to(np.arange(n_layers)[:, None], order.shape)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.06
    )
    fig.add_trace(
        go.Bar(
            x=np.arange(n_layers) + 0.5,
            y=kept.sum(axis=1),
            width=0.9,
            marker_color=KEPT_COLOUR,
            name="kept per layer",
            hovertemplate="layer %{customdata}: %{y} kept<extra></extra>",
            customdata=np.arange(n_layers),
        ),
        row=1,
        col=1,
    )
    for label, mask, colour in (
        ("kept", sorted_kept, KEPT_COLOUR),
        ("pruned", ~sorted_kept, PRUNED_COLOUR),
    ):  # noqa: E501
        fig.add_trace(
            go.Scattergl(
                x=x[mask],
                y=sorted_vals[mask],
                mode="markers",
                marker={"size": 3, "color": colour},
                customdata=np.stack([layer[mask], order[mask]], axis=-1),
                hovertemplate="m%{customdata[0]}.n%{customdata[1]}<br>gate %{y:.3f}<extra></extra>",
                name=f"{label} ({int(mask.sum())})",
            ),
            row=2,
            col=1,
        )
    fig.add_hline(y=circuit.threshold, line_dash="dot", line_color="black", row=2, col=1)
    fig.update_xaxes(
        range=[0, n_layers], title="layer (neurons sorted by gate within a layer)", row=2
    )
    fig.update_yaxes(title="kept neurons", range=[0, d_mlp], row=1)
    fig.update_yaxes(title="gate" if own else "block gate", range=[-0.02, 1.02], row=2)
    fig.update_layout(
        title=title or f"Neurons: {int(kept.sum())}/{kept.size} kept",
        height=520,
        legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
    )
    return fig


def graph(
    circuit: Circuit, reference: Reference | None = None, title: str | None = None
) -> go.Figure:
    """The circuit as a layered graph: input, kept heads (or attention blocks), MLPs, logits.

    Layer l's attention sits in column 2l and its MLP in column 2l + 1. Node-level circuits
    have no edges, so the connections drawn are the implied ones: each kept node feeds every
    kept node of the next occupied column through the residual stream. Circuits with `edges`
    draw those edges instead.
    """
    shape = circuit.shape
    heads_gated = "head" in circuit.gates
    head_gate, _ = unit_values(circuit, "head")
    classes = head_classes(circuit, reference)
    nodes: dict[str, tuple[float, float]] = {"input": (-1.0, 0.0)}
    columns: list[list[str]] = [["input"]]
    head_rows, mlp_rows, block_rows = [], [], []
    kept_heads, kept_attn = circuit.kept("head"), circuit.kept("attn")
    stacks = [
        [f"a{layer}.h{h}" for h in kept_heads[layer].nonzero().flatten().tolist()]
        if heads_gated
        else [f"a{layer}"] * bool(kept_attn[layer])
        for layer in range(shape.n_layers)
    ]
    tallest = max(1, *(len(names) for names in stacks))
    mlp_lane = -(tallest - 1) / 2 - 1  # MLPs get a lane under the tallest stack of heads
    for layer, names in enumerate(stacks):
        for i, name in enumerate(names):
            nodes[name] = (2.0 * layer, (len(names) - 1) / 2 - i)
            (head_rows if heads_gated else block_rows).append((name, layer))
        columns.append(names)
        mlp = [f"m{layer}"] if shape.has("mlp") and bool(circuit.kept("mlp")[layer]) else []
        for name in mlp:
            nodes[name] = (2.0 * layer + 1, mlp_lane)
            mlp_rows.append((name, layer))
        columns.append(mlp)
    nodes["logits"] = (2.0 * shape.n_layers, 0.0)
    columns.append(["logits"])
    pairs = _edge_pairs(circuit, nodes) if circuit.edges is not None else _implied_pairs(columns)
    ex, ey = [], []
    for a, b in pairs:
        ex += [nodes[a][0], nodes[b][0], None]
        ey += [nodes[a][1], nodes[b][1], None]
    fig = go.Figure(
        go.Scatter(
            x=ex,
            y=ey,
            mode="lines",
            line={"width": 0.6, "color": "rgba(90,90,90,0.35)"},
            hoverinfo="skip",
            name=f"connections ({len(pairs)})",
        )  # fmt: skip
    )
    fig.add_trace(_nodes_trace(["input", "logits"], nodes, "square", "black", "input / logits"))
    if mlp_rows:
        n_neurons = circuit.kept("neuron").sum(1).tolist() if "neuron" in circuit.gates else None
        text = [
            name + (f": {int(n_neurons[layer])}/{shape.d_mlp} neurons" if n_neurons else "")
            for name, layer in mlp_rows
        ]
        fig.add_trace(
            _nodes_trace(
                [n for n, _ in mlp_rows], nodes, "diamond", "#2ca02c", "MLP blocks", text, "bottom"
            )
        )
    if block_rows:
        names = [n for n, _ in block_rows]
        fig.add_trace(_nodes_trace(names, nodes, "square", "#1f77b4", "attention blocks"))
    by_class: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for name, layer in head_rows:
        h = int(name.split(".h")[1])
        cls = classes[layer][h] or (NO_CLASS if reference else "heads")
        by_class.setdefault(cls, []).append(name)
        texts[name] = f"{name}: gate {float(head_gate[layer, h]):.3f}" + (
            f"<br>reference: {classes[layer][h] or '-'}" if reference else ""
        )
    colours = class_colours(sorted(c for c in by_class if c not in (NO_CLASS, "heads")))
    colours.update({NO_CLASS: "#7f7f7f", "heads": "#1f77b4"})
    for cls, names in sorted(by_class.items(), key=lambda kv: kv[0] in (NO_CLASS, "heads")):
        fig.add_trace(
            _nodes_trace(names, nodes, "circle", colours[cls], f"{cls} ({len(names)})",
                         [texts[n] for n in names])
        )  # fmt: skip
    top = (tallest - 1) / 2 + 0.6
    fig.update_xaxes(
        range=[-1.5, 2 * shape.n_layers + 1.5],
        tickvals=[-1, *[2 * layer for layer in range(shape.n_layers)], 2 * shape.n_layers],
        ticktext=["in", *[str(layer) for layer in range(shape.n_layers)], "out"],
        title="layer (attention, then MLP)",
        showgrid=False,
    )
    fig.update_yaxes(visible=False, range=[mlp_lane - 0.8, top])
    fig.update_layout(
        title=title or f"Circuit graph: {len(nodes) - 2} nodes, {len(pairs)} connections",
        height=max(380, 48 * (tallest + 2) + 160),
        width=max(700, 45 * shape.n_layers + 300),
        plot_bgcolor="white",
    )
    return fig


def _nodes_trace(
    names: list[str],
    nodes: dict[str, tuple[float, float]],
    symbol: str,
    colour: str,
    label: str,
    text: list[str] | None = None,
    label_at: str = "right",
) -> go.Scatter:
    return go.Scatter(
        x=[nodes[n][0] for n in names],
        y=[nodes[n][1] for n in names],
        mode="markers+text",
        text=[n.split(".")[-1] if "." in n else n for n in names],
        textposition="middle right" if label_at == "right" else "bottom center",
        textfont={"size": 9},
        hovertext=text or names,
        hoverinfo="text",
        marker={
            "symbol": symbol,
            "size": 11,
            "color": colour,
            "line": {"width": 1, "color": "white"},
        },
        name=label,
    )


def _implied_pairs(columns: list[list[str]]) -> list[tuple[str, str]]:
    """Every node of an occupied column to every node of the next occupied column."""
    occupied = [c for c in columns if c]
    return [
        (a, b) for up, down in zip(occupied, occupied[1:], strict=False) for a in up for b in down
    ]


def _edge_pairs(circuit: Circuit, nodes: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """The circuit's own edges between drawn nodes, q/k/v inputs of one head merged."""
    pairs = []
    for edge in circuit.edges or ():
        writer, reader = edge.split("->")
        reader = reader.split("<")[0]
        if reader != "logits" and reader not in nodes and "." in reader:
            reader = reader.split(".")[0]  # block-level drawing of a head reader
        if writer in nodes and reader in nodes:
            pairs.append((writer, reader))
    return list(dict.fromkeys(pairs))

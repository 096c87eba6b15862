"""Figures of one circuit: head gates, neuron gates, and the circuit as a layered graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from ..circuit import Circuit
from ..granularities import GranularitySpec, node_name, spec
from ..references import as_head_classes
from ..sites import ModelShape
from ._common import (
    KEPT_COLOUR,
    NO_CLASS,
    PRUNED_COLOUR,
    PlotReference,
    class_colours,
    head_classes,
    unit_values,
)


def heads(
    circuit: Circuit, reference: PlotReference | None = None, title: str | None = None
) -> go.Figure:
    """Layer x head heatmap of head gates; kept heads outlined; reference classes in the hover."""
    gate, own = unit_values(circuit, "head")
    kept = circuit.kept("head").numpy()
    classes = head_classes(circuit, reference)
    n_layers, n_heads = kept.shape
    fig = go.Figure(_gate_heatmap(gate.numpy(), own, kept, classes, bool(reference)))
    fig.add_trace(_kept_outline(kept))
    if reference:
        fig.add_trace(_reference_markers(reference))
    fig.update_xaxes(title="head", range=[-0.5, n_heads - 0.5], dtick=1)
    fig.update_yaxes(title="layer", range=[-0.5, n_layers - 0.5], dtick=1 if n_layers <= 32 else 2)
    fig.update_layout(
        title=title or f"Heads: {int(kept.sum())}/{kept.size} kept",
        height=max(320, 22 * n_layers + 120),
        width=max(420, 40 * n_heads + 260),
        legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
    )
    return fig


def _gate_heatmap(
    gate: np.ndarray, own: bool, kept: np.ndarray, classes: list[list[str]], with_classes: bool
) -> go.Heatmap:
    """The layer x head grid of gates; hover says kept or pruned, and the reference class."""
    n_layers, n_heads = kept.shape
    status = np.where(kept, "kept", "pruned")
    custom = np.dstack([status, np.array(classes, dtype=object)])
    cls_line = "<br>reference: %{customdata[1]}" if with_classes else ""
    return go.Heatmap(
        z=gate,
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


def _kept_outline(kept: np.ndarray) -> go.Scatter:
    """An open square around every kept head of the heatmap."""
    layer_idx, head_idx = np.nonzero(kept)
    return go.Scatter(
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


def _reference_markers(reference: PlotReference) -> go.Scatter:
    """A dot on every reference head, its class in the hover."""
    ref = [(layer, head, c) for (layer, head), c in sorted(as_head_classes(reference).items())]
    return go.Scatter(
        x=[h for _, h, _ in ref],
        y=[layer for layer, _, _ in ref],
        mode="markers",
        marker={"symbol": "circle", "size": 6, "color": "#ff7f0e"},
        text=[c for _, _, c in ref],
        hovertemplate="layer %{y}, head %{x}<br>reference: %{text}<extra></extra>",
        name=f"reference ({len(ref)})",
    )


def neurons(circuit: Circuit, title: str | None = None) -> go.Figure:
    """Kept neurons per layer (bars) over every neuron's gate, sorted within its layer (WebGL).

    Neuron i-th largest in layer l sits at x = l + (i + 0.5) / d_mlp, so zooming into one layer
    separates single neurons; hover names each one (`m3.n17`).
    """
    if not circuit.shape.has("neuron"):
        raise ValueError(f"Model {circuit.shape.name!r} is attention-only: it has no neurons.")
    return units(circuit, "neuron", title)


def units(circuit: Circuit, granularity: str, title: str | None = None) -> go.Figure:
    """Kept nodes of `granularity` per layer (bars) over every node's gate, sorted per layer.

    The drawing of every granularity with many nodes per layer (`GranularitySpec.view`
    "strip": neurons, head value dimensions, ...). The i-th largest node of layer l sits at
    x = l + (i + 0.5) / n, n nodes per layer; hover names each node.
    """
    s = spec(granularity)
    if not circuit.shape.has(granularity):
        raise ValueError(f"Model {circuit.shape.name!r} has no {s.noun} nodes.")
    gate, own = unit_values(circuit, granularity)
    n_layers = gate.shape[0]
    kept = circuit.kept(granularity).numpy().reshape(n_layers, -1)  # (layer, unit)
    values = gate.numpy().reshape(n_layers, -1)
    per_layer = values.shape[1]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.35, 0.65], vertical_spacing=0.06
    )
    fig.add_trace(_kept_per_layer_bars(kept), row=1, col=1)
    for trace in _sorted_gate_strip(values, kept, _unit_hover(s)):
        fig.add_trace(trace, row=2, col=1)
    fig.add_hline(y=circuit.threshold, line_dash="dot", line_color="black", row=2, col=1)
    fig.update_xaxes(
        range=[0, n_layers], title=f"layer ({s.noun}s sorted by gate within a layer)", row=2
    )
    fig.update_yaxes(title=f"kept {s.noun}s", range=[0, per_layer], row=1)
    fig.update_yaxes(title="gate" if own else "block gate", range=[-0.02, 1.02], row=2)
    fig.update_layout(
        title=title or f"{s.noun[0].upper()}{s.noun[1:]}s: {int(kept.sum())}/{kept.size} kept",
        height=520,
        legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
    )
    return fig


def _unit_hover(s: GranularitySpec) -> str:
    """Hover template naming a node from customdata (layer, flat unit index)."""
    if len(s.unit_axes) == 1:  # a name template, not one string per node
        first, unit = s.letters
        return f"{first}%{{customdata[0]}}.{unit}%{{customdata[1]}}"
    # several unit axes: the flat index, named in the hover of the node's row
    return f"{s.noun} %{{customdata[1]}} of layer %{{customdata[0]}}"


def _kept_per_layer_bars(kept: np.ndarray) -> go.Bar:
    """One bar per layer: how many of its nodes are kept."""
    n_layers = kept.shape[0]
    return go.Bar(
        x=np.arange(n_layers) + 0.5,
        y=kept.sum(axis=1),
        width=0.9,
        marker_color=KEPT_COLOUR,
        name="kept per layer",
        hovertemplate="layer %{customdata}: %{y} kept<extra></extra>",
        customdata=np.arange(n_layers),
    )


def _sorted_gate_strip(values: np.ndarray, kept: np.ndarray, hover: str) -> list[go.Scattergl]:
    """Every node's gate, largest first within its layer: one trace kept, one pruned."""
    n_layers, per_layer = values.shape
    order = np.argsort(-values, axis=1, kind="stable")  # (layer, rank) -> unit index
    sorted_vals = np.take_along_axis(values, order, axis=1)
    sorted_kept = np.take_along_axis(kept, order, axis=1)
    x = np.arange(n_layers)[:, None] + (np.arange(per_layer)[None, :] + 0.5) / per_layer
    layer = np.broadcast_to(np.arange(n_layers)[:, None], order.shape)
    return [
        go.Scattergl(
            x=x[mask],
            y=sorted_vals[mask],
            mode="markers",
            marker={"size": 3, "color": colour},
            customdata=np.stack([layer[mask], order[mask]], axis=-1),
            hovertemplate=hover + "<br>gate %{y:.3f}<extra></extra>",
            name=f"{label} ({int(mask.sum())})",
        )
        for label, mask, colour in (
            ("kept", sorted_kept, KEPT_COLOUR),
            ("pruned", ~sorted_kept, PRUNED_COLOUR),
        )
    ]


def graph(
    circuit: Circuit, reference: PlotReference | None = None, title: str | None = None
) -> go.Figure:
    """The circuit as a layered graph: input, kept heads (or attention blocks), MLPs, logits.

    Layer l's attention sits in column 2l and its MLP in column 2l + 1. Node-level circuits
    have no edges, so the connections drawn are the implied ones: each kept node feeds every
    kept node of the next occupied column through the residual stream. Circuits with `edges`
    draw those edges instead.
    """
    head_gate, _ = unit_values(circuit, "head")
    classes = head_classes(circuit, reference)
    place = _place_nodes(circuit)
    nodes = place.nodes
    if circuit.edges is not None:
        pairs = _edge_pairs(circuit, nodes)
    else:
        pairs = _implied_pairs(place.columns)
    fig = go.Figure(_connections_trace(pairs, nodes))
    fig.add_trace(_nodes_trace(["input", "logits"], nodes, "square", "black", "input / logits"))
    if place.mlp_rows:
        fig.add_trace(_mlp_trace(circuit, place))
    if place.block_rows:
        names = [n for n, _ in place.block_rows]
        fig.add_trace(_nodes_trace(names, nodes, "square", "#1f77b4", "attention blocks"))
    for trace in _head_traces(place, head_gate, classes, reference):
        fig.add_trace(trace)
    _lay_out_graph(fig, circuit.shape, place, len(pairs), title)
    return fig


@dataclass
class _Placement:
    """Where `graph` draws each node, the columns left to right, and the nodes of each kind."""

    nodes: dict[str, tuple[float, float]]  # name -> (x, y)
    columns: list[list[str]]
    head_rows: list[tuple[str, int]]  # (name, layer)
    mlp_rows: list[tuple[str, int]]
    block_rows: list[tuple[str, int]]
    tallest: int  # most attention nodes in one column (at least 1)
    mlp_lane: float  # the y of every MLP block


def _attention_stacks(circuit: Circuit) -> list[list[str]]:
    """Per layer, the kept heads' names, or the attention block's name when heads are ungated."""
    kept_heads, kept_attn = circuit.kept("head"), circuit.kept("attn")
    return [
        [node_name("head", (layer, h)) for h in kept_heads[layer].nonzero().flatten().tolist()]
        if "head" in circuit.gates
        else [node_name("attn", (layer,))] * bool(kept_attn[layer])
        for layer in range(circuit.shape.n_layers)
    ]


def _place_nodes(circuit: Circuit) -> _Placement:
    """Input, then per layer a centred stack of attention nodes and an MLP lane, then logits."""
    shape = circuit.shape
    heads_gated = "head" in circuit.gates
    stacks = _attention_stacks(circuit)
    tallest = max(1, *(len(names) for names in stacks))
    mlp_lane = -(tallest - 1) / 2 - 1  # MLPs get a lane under the tallest stack of heads
    place = _Placement({"input": (-1.0, 0.0)}, [["input"]], [], [], [], tallest, mlp_lane)
    for layer, names in enumerate(stacks):
        for i, name in enumerate(names):
            place.nodes[name] = (2.0 * layer, (len(names) - 1) / 2 - i)
            (place.head_rows if heads_gated else place.block_rows).append((name, layer))
        place.columns.append(names)
        mlp_kept = shape.has("mlp") and bool(circuit.kept("mlp")[layer])
        mlp = [node_name("mlp", (layer,))] if mlp_kept else []
        for name in mlp:
            place.nodes[name] = (2.0 * layer + 1, mlp_lane)
            place.mlp_rows.append((name, layer))
        place.columns.append(mlp)
    place.nodes["logits"] = (2.0 * shape.n_layers, 0.0)
    place.columns.append(["logits"])
    return place


def _connections_trace(
    pairs: list[tuple[str, str]], nodes: dict[str, tuple[float, float]]
) -> go.Scatter:
    """Every connection as a line segment, all in one trace (None breaks the line)."""
    ex, ey = [], []
    for a, b in pairs:
        ex += [nodes[a][0], nodes[b][0], None]
        ey += [nodes[a][1], nodes[b][1], None]
    return go.Scatter(
        x=ex,
        y=ey,
        mode="lines",
        line={"width": 0.6, "color": "rgba(90,90,90,0.35)"},
        hoverinfo="skip",
        name=f"connections ({len(pairs)})",
    )  # fmt: skip


def _mlp_trace(circuit: Circuit, place: _Placement) -> go.Scatter:
    """The kept MLP blocks; hover counts their kept neurons when neurons are gated."""
    shape = circuit.shape
    n_neurons = circuit.kept("neuron").sum(1).tolist() if "neuron" in circuit.gates else None
    text = [
        name + (f": {int(n_neurons[layer])}/{shape.d_mlp} neurons" if n_neurons else "")
        for name, layer in place.mlp_rows
    ]
    names = [n for n, _ in place.mlp_rows]
    return _nodes_trace(names, place.nodes, "diamond", "#2ca02c", "MLP blocks", text, "bottom")


def _head_traces(
    place: _Placement,
    head_gate: Tensor,
    classes: list[list[str]],
    reference: PlotReference | None,
) -> list[go.Scatter]:
    """The kept heads, one trace per reference class (unclassed heads last)."""
    by_class: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for name, layer in place.head_rows:
        h = int(name.split(".h")[1])
        cls = classes[layer][h] or (NO_CLASS if reference else "heads")
        by_class.setdefault(cls, []).append(name)
        texts[name] = f"{name}: gate {float(head_gate[layer, h]):.3f}" + (
            f"<br>reference: {classes[layer][h] or '-'}" if reference else ""
        )
    colours = class_colours(sorted(c for c in by_class if c not in (NO_CLASS, "heads")))
    colours.update({NO_CLASS: "#7f7f7f", "heads": "#1f77b4"})
    return [
        _nodes_trace(names, place.nodes, "circle", colours[cls], f"{cls} ({len(names)})",
                     [texts[n] for n in names])
        for cls, names in sorted(by_class.items(), key=lambda kv: kv[0] in (NO_CLASS, "heads"))
    ]  # fmt: skip


def _lay_out_graph(
    fig: go.Figure, shape: ModelShape, place: _Placement, n_pairs: int, title: str | None
) -> None:
    """Layer ticks on x, no y axis, and a size that grows with layers and the tallest stack."""
    top = (place.tallest - 1) / 2 + 0.6
    fig.update_xaxes(
        range=[-1.5, 2 * shape.n_layers + 1.5],
        tickvals=[-1, *[2 * layer for layer in range(shape.n_layers)], 2 * shape.n_layers],
        ticktext=["in", *[str(layer) for layer in range(shape.n_layers)], "out"],
        title="layer (attention, then MLP)",
        showgrid=False,
    )
    fig.update_yaxes(visible=False, range=[place.mlp_lane - 0.8, top])
    fig.update_layout(
        title=title or f"Circuit graph: {len(place.nodes) - 2} nodes, {n_pairs} connections",
        height=max(380, 48 * (place.tallest + 2) + 160),
        width=max(700, 45 * shape.n_layers + 300),
        plot_bgcolor="white",
    )


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

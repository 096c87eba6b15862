import time

import numpy as np
import pandas as pd
import pytest
import torch

from tl_nodeprune import Circuit, ModelShape, plot

SHAPE = ModelShape("toy", n_layers=3, n_heads=4, d_head=2, d_mlp=6, d_vocab=11)


def _circuit() -> Circuit:
    # attention block 2 is closed, so its open head (2, 1) is pruned by the hierarchy
    return Circuit(
        SHAPE,
        {
            "attn": torch.tensor([1.0, 1.0, 0.0]),
            "mlp": torch.tensor([0.0, 1.0, 1.0]),
            "head": torch.tensor(
                [[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.7, 0.6], [0.0, 1.0, 0.0, 0.0]]
            ),
            "neuron": torch.tensor(
                [[1.0] * 6, [0.2, 0.8, 0.0, 0.6, 0.1, 0.0], [0.0, 0.0, 0.3, 0.0, 0.55, 0.0]]
            ),
        },
    )


def _points(trace) -> set[tuple[int, int]]:
    return {(int(y), int(x)) for x, y in zip(trace.x, trace.y, strict=True)}


def test_heads_outlines_exactly_the_kept_heads_and_names_reference_classes():
    ref = {(0, 0): "name mover", (2, 1): "induction"}
    fig = plot.heads(_circuit(), reference=ref)
    heat, kept, refs = fig.data
    assert heat.type == "heatmap" and np.asarray(heat.z).shape == (3, 4)
    assert np.asarray(heat.z)[2, 1] == pytest.approx(1.0)  # own gate, though pruned by its block
    assert heat.customdata[2][1][0] == "pruned" and heat.customdata[0][0][0] == "kept"
    assert heat.customdata[0][0][1] == "name mover" and heat.customdata[1][2][1] == ""
    assert _points(kept) == {(0, 0), (1, 2), (1, 3)}
    assert _points(refs) == {(0, 0), (2, 1)} and set(refs.text) == {"name mover", "induction"}
    assert tuple(fig.layout.xaxis.range) == (-0.5, 3.5)
    assert tuple(fig.layout.yaxis.range) == (-0.5, 2.5)


def test_heads_refuses_a_reference_outside_the_model():
    with pytest.raises(ValueError, match="outside"):
        plot.heads(_circuit(), reference={(3, 0): "name mover"})


def test_neurons_counts_per_layer_and_sorts_gates_within_layers():
    fig = plot.neurons(_circuit())
    bars, kept, pruned = fig.data
    # layer 0's neurons are open but its MLP block is closed; layer 2 keeps only n4 (0.55)
    assert list(bars.y) == [0, 2, 1]
    assert len(kept.x) == 3 and len(pruned.x) == 15
    assert kept.type == "scattergl"
    names = {f"m{int(a)}.n{int(b)}" for a, b in kept.customdata}
    assert names == {"m1.n1", "m1.n3", "m2.n4"}
    layer1 = sorted((x, y) for x, y in zip(kept.x, kept.y, strict=True) if 1 <= x < 2) + sorted(
        (x, y) for x, y in zip(pruned.x, pruned.y, strict=True) if 1 <= x < 2
    )
    layer1.sort()
    assert [y for _, y in layer1] == sorted([0.2, 0.8, 0.0, 0.6, 0.1, 0.0], reverse=True)
    assert tuple(fig.layout.xaxis2.range) == (0, 3)


def test_neurons_of_a_real_size_circuit_build_fast():
    shape = ModelShape("smollm2-like", n_layers=30, n_heads=9, d_head=64, d_mlp=1536, d_vocab=10)
    gen = torch.Generator().manual_seed(0)
    circuit = Circuit(
        shape,
        {"mlp": torch.ones(30), "neuron": torch.rand(30, 1536, generator=gen)},
    )
    start = time.perf_counter()
    fig = plot.neurons(circuit)
    fig.to_json()  # serialisation is part of showing it
    assert time.perf_counter() - start < 3.0
    assert len(fig.data[1].x) + len(fig.data[2].x) == 46_080


def test_graph_draws_kept_nodes_in_layer_columns_with_implied_connections():
    ref = {(0, 0): "name mover"}
    fig = plot.graph(_circuit(), reference=ref)
    by_name = {t.name: t for t in fig.data}
    heads = by_name["name mover (1)"], by_name["not in reference (2)"]
    assert {h for t in heads for h in t.hovertext} >= {"a0.h0: gate 0.900<br>reference: name mover"}
    assert sorted(x for t in heads for x in t.x) == [0, 2, 2]  # layer l's heads in column 2l
    mlp = by_name["MLP blocks"]
    assert list(mlp.x) == [3, 5] and "2/6 neurons" in mlp.hovertext[0]
    assert max(mlp.y) < min(y for t in heads for y in t.y)  # MLPs on their own lane, below
    # columns: input | a0.h0 | a1.h2 a1.h3 | m1 | m2 | logits -> 1 + 2 + 2 + 1 + 1 connections
    assert by_name["connections (7)"].x.count(None) == 7
    assert tuple(fig.layout.xaxis.range) == (-1.5, 7.5)


def test_graph_draws_the_edges_of_an_edge_circuit():
    edges = ["input->a0.h1<q>", "a0.h1->m1", "m1->logits"]
    fig = plot.graph(Circuit.from_edges(SHAPE, edges))
    lines = next(t for t in fig.data if t.name.startswith("connections"))
    assert lines.name == "connections (3)"
    assert list(lines.x) == [-1, 0, None, 0, 3, None, 3, 6, None]


def test_history_plots_loss_terms_and_kept_fractions():
    hist = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "loss": [3.0, 2.0, 1.0],
            "faithfulness": [0.1, 0.2, 0.3],
            "sparsity_head": [2.9, 1.8, 0.7],
            "kept_head": [1.0, 0.5, 0.25],
            "kept_neuron": [1.0, 0.9, 0.1],
            "lambda_head": [1.0, 1.0, 1.0],
        }
    )
    fig = plot.history(hist)
    assert [t.name for t in fig.data] == [
        "loss", "faithfulness", "sparsity_head", "kept head", "kept neuron"
    ]  # fmt: skip
    assert list(fig.data[3].y) == [1.0, 0.5, 0.25] and fig.data[3].yaxis == "y2"
    assert fig.layout.yaxis.type == "log" and tuple(fig.layout.xaxis2.range) == (0, 2)


def test_overlap_splits_heads_into_both_and_each_only():
    a = Circuit.from_nodes(SHAPE, ["a0.h0", "a1.h1", "a2.h3"], ("head",))
    b = Circuit.from_nodes(SHAPE, ["a0.h0", "a1.h2"], ("head",))
    both, only_a, only_b = plot.overlap(a, b, names=("seed 0", "seed 1")).data
    assert _points(both) == {(0, 0)} and both.name == "both (1)"
    assert _points(only_a) == {(1, 1), (2, 3)} and only_a.name == "only seed 0 (2)"
    assert _points(only_b) == {(1, 2)}


def test_frontier_draws_one_sorted_line_per_method_and_names_missing_columns():
    sweep = pd.DataFrame(
        {
            "method": ["nodeprune", "nodeprune", "edge_pruning"],
            "size": [0.3, 0.1, 0.2],
            "faithfulness": [0.9, 0.6, 0.8],
            "seed": [0, 0, 0],
        }
    )
    fig = plot.frontier(sweep)
    ours = fig.data[0]
    assert ours.name == "nodeprune" and list(ours.x) == [0.1, 0.3] and list(ours.y) == [0.6, 0.9]
    assert "seed: 0" in ours.text[0]
    with pytest.raises(ValueError, match="missing \\['faithfulness'\\]"):
        plot.frontier(sweep.drop(columns="faithfulness"))


def test_roc_has_chance_line_and_curves_on_unit_axes():
    fig = plot.roc({"ours": ([0, 0.1, 1], [0, 0.8, 1]), "acdc": ([0, 0.5, 1], [0, 0.6, 1])})
    assert [t.name for t in fig.data] == ["chance", "ours", "acdc"]
    assert tuple(fig.layout.xaxis.range) == (0, 1) and tuple(fig.layout.yaxis.range) == (0, 1)
    assert plot.roc(([0, 1], [0, 1])).data[1].name == "circuit"
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        plot.roc(([0, 2], [0, 1]))

"""Pure parts of node scores and curves: size read off a curve, top-n circuits, projections."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from tl_nodeprune.circuit import Circuit
from tl_nodeprune.curves import keep_top, refine_size, size_for
from tl_nodeprune.node_scores import NodeList, edge_node_scores, method_scores
from tl_nodeprune.pruner import PruneResult
from tl_nodeprune.sites import ModelShape

SHAPE = ModelShape("toy", n_layers=2, n_heads=2, d_head=4, d_mlp=3, d_vocab=10, d_model=8)


def hand_curve(n_nodes, faithfulness, kl=None) -> pd.DataFrame:
    kl = kl if kl is not None else [1 - f for f in faithfulness]
    return pd.DataFrame({"n_nodes": n_nodes, "faithfulness": faithfulness, "kl": kl})


def test_size_for_is_the_first_measured_size_reaching_the_target():
    frame = hand_curve([0, 2, 4, 8, 16], [0.1, 0.5, 0.89, 0.95, 1.0], [0.9, 0.5, 0.1, 0.05, 0])
    assert size_for(frame, target_f=0.9) == 8  # no interpolation between 4 and 8
    assert size_for(frame, target_f=0.95) == 8  # reaching it exactly counts
    assert size_for(frame, max_kl=0.5) == 2
    assert size_for(frame, max_kl=0.05) == 8


def test_size_for_a_target_never_reached_is_none():
    frame = hand_curve([1, 2, 3], [0.2, 0.5, math.nan], kl=[2.0, 1.0, math.nan])
    assert size_for(frame, target_f=0.9) is None
    assert size_for(frame, max_kl=0.3) is None


def test_size_for_a_curve_that_crosses_dips_and_crosses_again_is_its_first_crossing():
    # rows out of order on purpose: the size axis decides, not the row order
    frame = hand_curve([8, 1, 2, 4, 16], [0.95, 0.3, 0.92, 0.6, 0.99])
    assert size_for(frame, target_f=0.9) == 2
    assert size_for(frame, target_f=0.93) == 8


def measured(f_of_n):
    """A `measure` for refine_size that records the sizes it was asked for."""
    asked = []

    def measure(n):
        asked.append(n)
        return SimpleNamespace(faithfulness=f_of_n(n), kl=1 - f_of_n(n))

    return measure, asked


def test_refine_size_bisects_the_grid_step_down_to_the_true_size():
    # f = n / 200 along the ranking: the grid (0, 40, 100, 200) first reaches 0.9 at 200;
    # the true smallest size is 180, which a bisection to one node must find exactly
    frame = hand_curve([0, 40, 100, 200], [0.0, 0.2, 0.5, 1.0])
    frame["fraction"] = frame.n_nodes / 200
    frame.attrs.update(n_total=200, cpr=0.123)
    measure, asked = measured(lambda n: n / 200)
    out = refine_size(frame, measure, 0.9, resolution=0.0)
    assert size_for(out, target_f=0.9) == 180
    assert all(100 < n < 200 for n in asked) and len(asked) <= 7  # only inside the step
    assert out.n_nodes.is_monotonic_increasing and out.refined.sum() == len(asked)
    assert out.attrs["cpr"] == 0.123  # the grid's summary is kept, not recomputed
    coarse = refine_size(frame, measured(lambda n: n / 200)[0], 0.9, resolution=0.1)
    assert size_for(coarse, target_f=0.9) in range(180, 201)
    assert 0 < coarse.refined.sum() < len(asked)  # a coarser resolution measures less


def test_refine_size_looks_only_below_the_first_crossing_and_leaves_a_miss_alone():
    # f crosses at 20, dips, crosses again: the first crossing is bisected against 10
    frame = hand_curve([10, 20, 40, 80], [0.5, 0.95, 0.6, 0.99])
    frame.attrs["n_total"] = 80
    measure, asked = measured(lambda n: 0.95 if n >= 17 else 0.5)
    out = refine_size(frame, measure, 0.9, resolution=0.0)
    assert size_for(out, target_f=0.9) == 17 and all(10 < n < 20 for n in asked)
    never = hand_curve([10, 20], [0.1, 0.2])
    measure, asked = measured(lambda n: 1.0)
    assert size_for(refine_size(never, measure, 0.9), target_f=0.9) is None and asked == []


def test_the_neurons_search_goes_up_the_grid_and_bisects_to_its_step():
    from tl_nodeprune.irrelevant import smallest_reaching

    measure, asked = measured(lambda k: 1.0 if k >= 41_000 else 0.5)
    assert smallest_reaching(measure, 46_080, 0.9) == 41_000
    assert 40_999 in asked
    assert len(asked) <= 27  # total, the grid's 11 sizes up to the hit, 15 halvings of 23,040
    measure, coarse = measured(lambda k: 1.0 if k >= 41_000 else 0.5)
    assert 41_000 <= smallest_reaching(measure, 46_080, 0.9, step=460) <= 41_460
    assert len(coarse) < len(asked) - 4
    measure, asked = measured(lambda k: 1.0)
    assert smallest_reaching(measure, 100, 0.9) == 0  # no neuron needed
    measure, asked = measured(lambda k: math.nan if k == 100 else 1.0)
    assert smallest_reaching(measure, 100, 0.9) is None and asked == [100]  # NaN never reaches it


def test_the_neurons_search_finds_the_small_circuit_before_a_dip():
    """Node pruning's neuron curves peak early, dip at mid sizes and recover at all: a search
    down from all the neurons stops in the dip (it reported 99% needed where 1.5% reach f)."""
    from tl_nodeprune.irrelevant import smallest_reaching

    measure, asked = measured(lambda k: 0.95 if 420 <= k <= 2_000 or k == 46_080 else 0.5)
    assert smallest_reaching(measure, 46_080, 0.9) == 420
    assert max(asked[1:]) <= 2_000 + 1  # never climbs into the dip once the peak is found


def test_size_for_needs_exactly_one_target():
    frame = hand_curve([1], [1.0])
    for kwargs in ({}, {"target_f": 0.9, "max_kl": 0.3}):
        with pytest.raises(ValueError, match="exactly one"):
            size_for(frame, **kwargs)


def test_node_list_order_and_round_trip():
    nodes = NodeList(SHAPE)
    assert nodes.names[:4] == ("a0", "a1", "m0", "m1")
    assert nodes.names[4:8] == ("a0.h0", "a0.h1", "a1.h0", "a1.h1")
    assert nodes.names[8:] == tuple(f"m{layer}.n{i}" for layer in range(2) for i in range(3))
    tensors = {g: torch.randn(SHAPE.units(g)) for g in nodes.granularities}
    back = nodes.tensors(nodes.series(tensors))
    for g, t in tensors.items():
        torch.testing.assert_close(back[g], t)
    with pytest.raises(ValueError, match="neuron"):
        nodes.series({g: t for g, t in tensors.items() if g != "neuron"})


def test_keep_top_keeps_the_best_nodes_of_the_level_and_opens_their_blocks():
    nodes = NodeList(SHAPE)
    values = dict.fromkeys(nodes.names, 0.0)
    values.update({"a1": 100.0, "a1.h1": 5.0, "m0": 4.0, "m1.n2": 3.0, "a0.h0": math.nan})
    scores = pd.Series(values)
    blocks = keep_top(scores, nodes, 2, "blocks_heads")
    assert blocks.nodes == ["a1", "m0", "a1.h1"]  # a block's own score is not ranked
    assert blocks.kept("neuron").sum() == 3  # a kept MLP block runs all its neurons
    neurons = keep_top(scores, nodes, 2, "neurons")
    assert neurons.nodes == ["a1", "m1", "a1.h1", "m1.n2"]
    ties = keep_top(scores, nodes, 3, "neurons")  # the first of the tied zeros, NaN last
    assert ties.kept("head").tolist() == [[False, True], [False, True]]
    assert ties.kept("neuron").sum() == 1
    with pytest.raises(ValueError, match="0..10"):
        keep_top(scores, nodes, 11, "neurons")
    with pytest.raises(ValueError, match="Unknown level"):
        keep_top(scores, nodes, 1, "edges")


def test_edge_scores_project_to_the_best_edge_of_each_node():
    edges = {
        "input->a0.h1<q>": 2.0,  # a0.h1 read with 2.0
        "a0.h1->m1": -1.0,  # written with -1.0: the max is 2.0
        "a0.h0->a1.h0<k>": 0.5,
        "m0->logits": 7.0,
        "a1.h1->logits": -3.0,  # ranked by |score| with magnitude=True
    }
    circuit = Circuit.from_edges(SHAPE, ["m0->logits"], edge_scores=edges)
    out = edge_node_scores(circuit)
    assert out["head"].tolist() == [[0.5, 2.0], [0.5, -3.0]]
    assert out["mlp"].tolist() == [7.0, -1.0]
    assert out["attn"].tolist() == [2.0, 0.5]
    assert out["neuron"].tolist() == [[7.0] * 3, [-1.0] * 3]  # inherited from the block
    assert edge_node_scores(circuit, magnitude=True)["head"][1, 1] == 3.0
    with pytest.raises(ValueError, match="no edge_scores"):
        edge_node_scores(Circuit.from_edges(SHAPE, ["m0->logits"]))


def test_edge_projection_under_grouped_query_attention_skips_shared_key_value_readers():
    gqa = ModelShape("gqa", 2, 2, 4, 3, 10, d_model=8, n_key_value_heads=1)
    circuit = Circuit.from_edges(gqa, [], edge_scores={"a0.h1->a1.h0<v>": 4.0})
    out = edge_node_scores(circuit)
    assert out["head"][0, 1] == 4.0 and out["head"][1, 0] == -math.inf


def fake_model(shape: ModelShape) -> SimpleNamespace:
    """Only the config a shape is read from (scores from a finished result need no forward)."""
    cfg = SimpleNamespace(n_layers=shape.n_layers, n_heads=shape.n_heads, d_head=shape.d_head,
                          d_mlp=shape.d_mlp, d_vocab=shape.d_vocab, d_model=shape.d_model,
                          model_name=shape.name)  # fmt: skip
    return SimpleNamespace(cfg=cfg)


def test_node_pruning_scores_combine_a_childs_log_alpha_with_its_parents_by_min():
    log_alpha = {
        "attn": torch.tensor([1.0, -2.0]),
        "head": torch.tensor([[3.0, 0.5], [4.0, -5.0]]),
        "neuron": torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 6.0]]),  # MLP blocks not gated
    }
    result = PruneResult(None, pd.DataFrame(), log_alpha, None, 0.0)
    scores = method_scores(fake_model(SHAPE), None, "node_pruning", result=result)
    assert scores["a1"] == -2.0 and scores["a0.h0"] == 1.0 and scores["a0.h1"] == 0.5
    assert scores["a1.h0"] == -2.0 and scores["a1.h1"] == -5.0
    assert scores["m0"] == 2.0 and scores["m1"] == 6.0  # an ungated block: its best neuron
    assert scores["m0.n2"] == -1.0 and scores["m1.n2"] == 6.0

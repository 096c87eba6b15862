import json

import pytest
import torch

from tl_nodeprune import Circuit, ModelShape
from tl_nodeprune.circuit import parse_node

SHAPE = ModelShape("toy", n_layers=2, n_heads=3, d_head=4, d_mlp=5, d_vocab=11)


def _circuit() -> Circuit:
    return Circuit(
        SHAPE,
        {
            "attn": torch.tensor([1.0, 0.0]),
            "mlp": torch.tensor([0.0, 0.9]),
            "head": torch.tensor([[1.0, 0.2, 0.7], [1.0, 1.0, 1.0]]),
            "neuron": torch.tensor([[1.0] * 5, [0.0, 0.6, 0.0, 1.0, 0.4]]),
        },
    )


def test_hierarchy_prunes_nodes_inside_pruned_blocks():
    c = _circuit()
    assert c.heads == [(0, 0), (0, 2)]  # layer-1 heads are open but their block is closed
    assert c.neurons == {1: [1, 3]}  # layer-0 neurons are open but their block is closed
    assert c.attn_blocks == [0] and c.mlp_blocks == [1]
    assert c.own_kept("head")[1].all() and not c.kept("head")[1].any()
    assert c.nodes == ["a0", "m1", "a0.h0", "a0.h2", "m1.n1", "m1.n3"]


def test_head_dims_inherit_their_heads():
    c = Circuit(
        SHAPE,
        {"head": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), "head_dim": torch.ones(2, 3, 4)},
    )
    assert int(c.kept("head_dim").sum()) == 2 * 4


def test_counts_fractions_and_frames():
    c = _circuit()
    assert c.n_kept("head") == 2 and c.fraction("head") == pytest.approx(2 / 6)
    summary = c.summary()
    assert summary.loc["neuron", "kept"] == 2 and summary.loc["neuron", "total"] == 10
    frame = c.to_frame()
    assert len(frame) == 2 + 2 + 6 + 10
    assert not frame.set_index("name").loc["a1.h2", "kept"]
    assert set(frame.loc[frame.kept, "name"]) == set(c.nodes)


def test_save_load_round_trip_is_plain_json(tmp_path):
    c = _circuit()
    c.meta["task"] = "toy"
    path = c.save(tmp_path / "new_folder" / "c.json")
    data = json.loads(path.read_text())
    assert data["model"]["d_mlp"] == 5 and data["format"] == "tl_nodeprune.circuit"
    back = Circuit.load(path)
    assert back.shape == c.shape and back.nodes == c.nodes and back.meta == {"task": "toy"}
    assert all(torch.equal(back.gates[g], c.gates[g]) for g in c.gates)


def test_loading_something_else_raises(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="Not a tl_nodeprune circuit"):
        Circuit.load(path)


def test_wrong_gate_shape_raises():
    with pytest.raises(ValueError, match="expected"):
        Circuit(SHAPE, {"head": torch.ones(2, 4)})


def test_node_names_round_trip():
    c = _circuit()
    again = Circuit.from_nodes(SHAPE, c.nodes, c.granularities)
    assert again.nodes == c.nodes
    assert parse_node("a3.h5") == ("head", (3, 5))
    assert parse_node("m2.n17") == ("neuron", (2, 17))
    with pytest.raises(ValueError, match="Bad node name"):
        parse_node("x1.q2")


def test_other_model_shape_is_refused():
    other = ModelShape("big", n_layers=4, n_heads=3, d_head=4, d_mlp=5, d_vocab=11)
    with pytest.raises(ValueError, match="n_layers: circuit has 2, model has 4"):
        other.check_same(SHAPE)


def test_version_1_files_still_load(tmp_path):
    old = {
        "format": "tl_nodeprune.circuit",
        "version": 1,
        "model": {"name": "toy", "n_layers": 2, "n_heads": 3, "d_head": 4, "d_mlp": 5,
                  "d_vocab": 11},
        "threshold": 0.5,
        "gates": {"attn": [1.0, 0.0], "head": [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]},
        "meta": {},
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    c = Circuit.load(path)
    assert c.heads == [(0, 0), (0, 2)] and c.edges is None and c.scores == {}
    assert c.shape.vocab_out == 11 and c.shape.kv_heads == 3


def test_edges_induce_nodes_and_round_trip(tmp_path):
    edges = ["input->a0.h1<q>", "a0.h1->m1", "m1->logits", "a0.h2->a1.h0<v>"]
    c = Circuit.from_edges(SHAPE, edges, {"m1->logits": 2.5})
    # a1.h0 is induced by its value input, a0.h2 by its output, a0.h1 by both.
    assert c.heads == [(0, 1), (0, 2), (1, 0)]
    assert c.attn_blocks == [0, 1] and c.mlp_blocks == [1]
    back = Circuit.load(c.save(tmp_path / "e.json"))
    assert back.edges == tuple(edges) and back.edge_scores == {"m1->logits": 2.5}
    assert back.nodes == c.nodes


def test_grouped_query_key_value_readers_induce_no_query_head():
    gqa = ModelShape("gqa", 2, 4, 4, 5, 11, n_key_value_heads=2)
    c = Circuit.from_edges(gqa, ["input->a1.h1<k>", "a0.h3->a1.h1<v>"])
    assert c.heads == [(0, 3)]
    with pytest.raises(ValueError, match="out of range"):
        Circuit.from_edges(gqa, ["input->a1.h2<k>"])  # only 2 key/value heads


@pytest.mark.parametrize("bad", ["a0.h1-a1.h0<q>", "a0.h1->a1.h0", "m1->a0.h0<x>", "a5.h0->m1"])
def test_bad_edge_names_are_refused(bad):
    with pytest.raises(ValueError, match="(?i)edge"):
        Circuit.from_edges(SHAPE, [bad])


def test_scores_must_match_the_gate_shape():
    with pytest.raises(ValueError, match="Scores for 'head'"):
        Circuit(SHAPE, {"attn": torch.ones(2)}, scores={"head": torch.ones(3)})

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

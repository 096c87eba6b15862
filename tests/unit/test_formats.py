"""Readers and writers of other tools' circuit files: fixtures, round trips, malformed input."""

import json
import re
from pathlib import Path

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.formats import FormatError, from_mib, graph_edges, to_mib
from tl_nodeprune.references import GPT2_SMALL

FIXTURES = Path(__file__).parent.parent / "fixtures"
TINY = tnp.ModelShape("tiny", n_layers=2, n_heads=2, d_head=4, d_mlp=8, d_vocab=16, d_model=8)


def test_graph_edge_counts_match_hand_count_and_published_gpt2_count():
    # layer 0: input -> 2 heads x q,k,v (6), m0 <- input, a0.h0, a0.h1 (3);
    # layer 1: 4 writers x 6 (24), m1 <- 6 writers (6); logits <- 7 writers (7).
    assert len(list(graph_edges(TINY))) == 6 + 3 + 24 + 6 + 7
    assert len(list(graph_edges(GPT2_SMALL))) == 32491  # MIB / EAP-IG's GPT-2 small graph


def test_mib_fixture_reads_to_hand_checked_nodes_edges_and_scores():
    c = tnp.read_mib(FIXTURES / "mib_tiny.json", TINY)
    assert set(c.edges) == {
        "input->a0.h1<q>", "a0.h1->m1", "input->a1.h0<v>", "a1.h0->logits", "m1->logits"
    }  # fmt: skip
    assert c.heads == [(0, 1), (1, 0)]
    assert c.mlp_blocks == [1] and c.attn_blocks == [0, 1]
    assert c.edge_scores["a0.h0->logits"] == -0.02
    assert torch.equal(c.scores["head"], torch.tensor([[0.1, 0.7], [0.4, 0.2]]))
    assert torch.equal(c.scores["mlp"], torch.tensor([0.0, 0.9]))
    # without a shape, the cfg gives one (d_mlp = 4 d_model) and the same nodes
    assert tnp.read_mib(FIXTURES / "mib_tiny.json").nodes == c.nodes


def test_edge_pruning_fixture_reads_to_hand_checked_nodes():
    c = tnp.read_edge_pruning(FIXTURES / "edge_pruning_tiny.json", TINY)
    assert set(c.edges) == {
        "input->a0.h0<q>", "a0.h0->m0", "input->a1.h1<k>", "m0->logits", "a1.h1->logits"
    }  # fmt: skip
    assert c.heads == [(0, 0), (1, 1)] and c.mlp_blocks == [0]


def test_edge_pruning_llama_edges_number_key_value_heads(tmp_path):
    gqa = tnp.ModelShape("gqa", n_layers=2, n_heads=4, d_head=2, d_mlp=8, d_vocab=16, d_model=8,
                         n_key_value_heads=2)  # fmt: skip
    path = tmp_path / "edges.json"
    path.write_text('[["embeds", "a0.h3.q"], ["a0.h3", "a1.h1.k"], ["a0.h3", "resid_post"]]')
    c = tnp.read_edge_pruning(path, gqa)
    assert set(c.edges) == {"input->a0.h3<q>", "a0.h3->a1.h1<k>", "a0.h3->logits"}
    assert c.heads == [(0, 3)]  # a shared key head induces no query head
    path.write_text('[["a0.h3", "a1.h2.k"]]')  # only 2 key/value heads
    with pytest.raises(FormatError, match="entry 0"):
        tnp.read_edge_pruning(path, gqa)


def test_acdc_fixture_reads_edges_skips_internal_ones_and_keeps_effect_sizes():
    c = tnp.read_acdc(FIXTURES / "acdc_tiny.json", TINY)
    assert set(c.edges) == {"a1.h0->logits", "m0->a1.h0<q>", "input->m0", "a0.h1->a1.h1<v>"}
    assert c.heads == [(0, 1), (1, 0), (1, 1)] and c.mlp_blocks == [0]
    assert c.edge_scores == {
        "a1.h0->logits": 0.5, "m0->a1.h0<q>": 0.2, "input->m0": 0.1, "a0.h1->a1.h1<v>": 0.05
    }  # fmt: skip


def test_edge_circuit_round_trips_through_mib_file(tmp_path):
    edges = ["input->a0.h1<k>", "a0.h1->a1.h0<q>", "a1.h0->m1", "m1->logits", "m0->logits"]
    scores = {e: 0.1 * i for i, e in enumerate(edges)}
    ours = tnp.Circuit.from_edges(TINY, edges, scores)
    back = tnp.read_mib(tnp.write_mib(ours, tmp_path / "c.json"), TINY)
    assert set(back.edges) == set(edges)
    assert back.nodes == ours.nodes
    assert {e: back.edge_scores[e] for e in edges} == pytest.approx(scores)


def test_node_circuit_round_trips_through_mib_and_exports_its_induced_subgraph():
    shape = tnp.ModelShape("t", n_layers=3, n_heads=4, d_head=2, d_mlp=8, d_vocab=9, d_model=8)
    head = torch.zeros(3, 4)
    head[0, 2] = head[2, 1] = head[2, 3] = 1.0
    ours = tnp.Circuit(shape, {"attn": head.amax(1), "head": head, "mlp": torch.tensor([1., 0, 1])})
    data = to_mib(ours)
    assert len(data["edges"]) == len(list(graph_edges(shape)))
    kept = {e for e, v in data["edges"].items() if v["in_graph"]}
    assert "a0.h2->a2.h1<k>" in kept and "m0->m2" in kept and "input->logits" in kept
    assert "a0.h1->logits" not in kept and "m1->logits" not in kept and "m0->a1.h0<q>" not in kept
    back = from_mib(json.loads(json.dumps(data)), shape)
    for g in ("attn", "head", "mlp"):
        assert torch.equal(back.kept(g), ours.kept(g)), g


@pytest.mark.parametrize(
    "reader, text, message",
    [
        ("mib", '{"cfg": {"n_layers": 2}, "nodes": {}, "edges": {}}', "cfg.n_heads"),
        ("mib", '{"cfg": {"n_layers": 2, "n_heads": 2, "d_model": 8}, "nodes": {}}', "'edges'"),
        ("mib", '{"cfg": {"n_layers": 2, "n_heads": 2, "d_model": 8}, "nodes": {},'
                ' "edges": {"input->a0.h1<q>": {"score": 1}}}', "input->a0.h1<q>"),  # fmt: skip
        ("mib", '{"cfg": {"n_layers": 2, "n_heads": 2, "d_model": 8}, "nodes": {},'
                ' "edges": {"a5.h1->logits": {"in_graph": true}}}', "a5.h1->logits"),  # fmt: skip
        ("mib", '{"cfg": {"n_layers": 3, "n_heads": 2, "d_model": 8}, "nodes": {}, "edges": {}}',
         "cfg.n_layers"),  # fmt: skip
        ("mib", '{"cfg": {\n"n_layers": 2,,\n}}', "line 2"),
        ("ep", '[["a0.h0", "m0"], ["a0.h0", "a1.h1.x"]]', "entry 1"),
        ("ep", '[["a0.h0", "m0"], ["a0.h0"]]', "entry 1"),
        ("acdc", '[["blocks.1.hook_q_input", "[:, :, 0]", "blocks.0.hook_foo", "[:]"]]', "entry 0"),
        ("acdc", '[["blocks.1.hook_q_input", "[:]", "blocks.0.hook_mlp_out", "[:]"]]', "entry 0"),
        ("acdc", '[["blocks.1.hook_resid_post", "[:]"]]', "entry 0"),
    ],
)
def test_malformed_files_raise_an_error_naming_the_key_or_entry(tmp_path, reader, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    read = {"mib": tnp.read_mib, "ep": tnp.read_edge_pruning, "acdc": tnp.read_acdc}[reader]
    with pytest.raises(FormatError, match=re.escape(message)):
        read(path, TINY)

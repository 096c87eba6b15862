"""The edge graph: EAP-IG/MIB edge counts and names, and an exact edge-masked forward."""

import pytest
import torch

from tl_nodeprune.baselines.graph import EdgeGraph, EdgeRun, corrupted_values, edge_forward
from tl_nodeprune.circuit import parse_edge
from tl_nodeprune.objectives import forward_answers
from tl_nodeprune.planted import planted_problem, tiny_model
from tl_nodeprune.sites import ModelShape

from ..conftest import hook_count


def test_gpt2_small_shape_has_158_nodes_and_32491_edges():
    model = tiny_model("bridge-native", n_layers=12, n_heads=12, d_head=4, d_mlp=8)
    graph = EdgeGraph.from_model(model)
    assert (graph.n_nodes, graph.n_edges) == (158, 32491)
    names = graph.edge_names
    assert len(set(names)) == len(names) == 32491
    for name in ("input->a0.h1<q>", "a5.h1->m5", "m11->logits", "a10.h7->a11.h3<v>"):
        assert name in graph.edge_index
    for name in ("a5.h1->a5.h2<q>", "m5->m5", "m5->a5.h0<k>"):  # same layer, not upstream
        assert name not in graph.edge_index
    shape = ModelShape.from_model(model)
    for name in names[::97]:
        parse_edge(name, shape)


def test_grouped_query_graph_has_one_key_and_value_reader_per_key_value_head():
    model = tiny_model("bridge-llama", n_layers=2, n_heads=4)  # 2 key/value heads
    graph = EdgeGraph.from_model(model)
    assert "input->a0.h1<k>" in graph.edge_index and "input->a0.h2<k>" not in graph.edge_index
    assert "input->a0.h3<q>" in graph.edge_index
    # readers per layer: 4 q + 2 k + 2 v + 1 mlp, reading 1 + 5 * layer writers (+4 for mlp)
    expected = sum(8 * (1 + 5 * la) + (5 + 5 * la) for la in range(2)) + 11
    assert graph.n_edges == expected


def test_parallel_blocks_drop_same_layer_edges_into_the_mlp():
    shape = ModelShape("p", n_layers=2, n_heads=2, d_head=4, d_mlp=8, d_vocab=10, d_model=8)
    seq, par = EdgeGraph(shape), EdgeGraph(shape, parallel_attn_mlp=True)
    assert "a1.h0->m1" in seq.edge_index and "a1.h0->m1" not in par.edge_index
    assert seq.n_edges - par.n_edges == 2 * 2


@pytest.fixture
def problem(flavour):
    return planted_problem(flavour, seed=0, n_prompts=8)


def test_all_masks_open_is_the_model_and_all_closed_the_corrupted_run(problem):
    model, task = problem.model, problem.task
    graph = EdgeGraph.from_model(model)
    corr = corrupted_values(model, graph, task.corrupted)
    with torch.no_grad():
        clean, corrupted = model(task.clean)[:, -1], model(task.corrupted)[:, -1]
        ones = edge_forward(model, graph, task.clean, task.answer_pos, torch.ones(graph.n_edges),
                            corr)  # fmt: skip
        zeros = edge_forward(model, graph, task.clean, task.answer_pos,
                             torch.zeros(graph.n_edges), corr)  # fmt: skip
    assert (clean - corrupted).abs().max() > 1.0
    torch.testing.assert_close(ones, clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zeros, corrupted, atol=1e-4, rtol=1e-4)
    assert hook_count(model) == 0


def test_closing_one_edge_into_the_logits_removes_exactly_that_writers_change(problem):
    model, task = problem.model, problem.task
    graph = EdgeGraph.from_model(model)
    (layer, head), *_ = problem.circuit.heads
    corr = corrupted_values(model, graph, task.corrupted)
    mask = torch.ones(graph.n_edges)
    mask[graph.edge_index[f"a{layer}.h{head}->logits"]] = 0.0
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    clean = corrupted_values(model, graph, task.clean)
    w_o = model.blocks[layer].attn.W_O[head].detach()  # (d_head, d_model)
    z = f"blocks.{layer}.attn.hook_z"
    change = (clean[z][:, :, head] - corr[z][:, :, head]) @ w_o
    with torch.no_grad():
        expected = model.unembed(model.ln_final(clean[last] - change))[:, -1]
        got = edge_forward(model, graph, task.clean, task.answer_pos, mask, corr)
    assert change[:, -1].norm(dim=-1).min() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_after_an_error_inside_the_forward(problem):
    model, task = problem.model, problem.task
    graph = EdgeGraph.from_model(model)
    corr = corrupted_values(model, graph, task.corrupted)
    del corr["blocks.1.hook_mlp_out"]
    with pytest.raises(KeyError):
        edge_forward(model, graph, task.clean, task.answer_pos, torch.ones(graph.n_edges), corr)
    assert hook_count(model) == 0


class _PerEdgeRun(EdgeRun):
    """Each reader's input by the definition, one edge at a time: base + sum of mask x delta."""

    def reader_input(self, key, base):
        deltas = torch.cat(self.chunks)  # (writers so far, batch, pos, d_model)
        mask = self.masks[key]
        rows = [base + sum(mask[r, w] * deltas[w] for w in range(mask.shape[1]))
                for r in range(mask.shape[0])]  # fmt: skip
        return torch.stack(rows, dim=2)


def test_masked_forward_and_mask_gradients_match_the_per_edge_definition(flavour):
    model = tiny_model(flavour, n_layers=3, n_heads=4)  # random: every writer's delta counts
    graph = EdgeGraph.from_model(model)
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, model.cfg.d_vocab, (2, 4, 6), generator=gen)
    corr = corrupted_values(model, graph, corrupted)
    mask = torch.rand(graph.n_edges, generator=gen)
    results = []
    for run_class in (EdgeRun, _PerEdgeRun):
        leaf = mask.clone().requires_grad_(True)
        run = run_class(model, graph, leaf, corr)
        logits = forward_answers(model, clean, torch.full((4,), 5), run.hooks(), fast=False)
        (logits.log_softmax(-1)[:, :3] * torch.arange(12.0).view(4, 3)).sum().backward()
        results.append((logits.detach(), leaf.grad))
    (got, got_grad), (want, want_grad) = results
    assert (want_grad.abs() > 1e-4).float().mean() > 0.9  # (nearly) every edge matters here
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)

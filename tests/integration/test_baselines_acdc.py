"""ACDC on the smallest planted model, and its up-front refusal of graphs too large to finish."""

import pytest

from tl_nodeprune.baselines.acdc import acdc, estimate_forward_passes
from tl_nodeprune.baselines.edge_eval import evaluate_edges
from tl_nodeprune.baselines.graph import EdgeGraph
from tl_nodeprune.planted import planted_problem

from ..conftest import hook_count


def test_acdc_recovers_the_planted_nodes_of_the_smallest_model(flavour):
    problem = planted_problem(flavour, seed=1, n_layers=2, n_heads=2, d_mlp=8, silent_layer=None,
                              neurons_per_layer=2, n_prompts=16)  # fmt: skip
    found = acdc(problem.model, problem.task, threshold=0.005)
    assert found.heads == problem.circuit.heads
    assert found.mlp_blocks == problem.circuit.mlp_blocks
    truth = problem.circuit
    live = {"input", "logits"} | {f"a{la}.h{h}" for la, h in truth.heads}
    live |= {f"m{la}" for la in truth.mlp_blocks}
    ends = {end.split("<")[0] for name in found.edges for end in name.split("->")}
    assert ends <= live and found.n_edges < found.meta["n_edges_total"] / 1.5
    assert evaluate_edges(problem.model, found, problem.task).kl < 0.1
    assert hook_count(problem.model) == 0


def test_acdc_refuses_with_its_estimate_unless_forced():
    problem = planted_problem("bridge-native", seed=0, n_prompts=8)
    graph = EdgeGraph.from_model(problem.model)
    estimate = estimate_forward_passes(graph, 8, 4)
    assert estimate == (graph.n_edges + 1) * 2
    with pytest.raises(ValueError, match=f"{estimate:,} forward passes"):
        acdc(problem.model, problem.task, batch_size=4, max_forward_passes=100)

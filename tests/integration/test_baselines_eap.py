"""EAP and EAP-IG: exact gradients of the edge masks, agreement with exact edge patching."""

import pytest
import torch

from tl_nodeprune.baselines.eap import eap, eap_scores, select_edges
from tl_nodeprune.baselines.edge_eval import edge_logits
from tl_nodeprune.baselines.graph import EdgeGraph
from tl_nodeprune.planted import planted_problem

from ..conftest import hook_count


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()])
    return torch.corrcoef(ranks)[0, 1].item()


@pytest.fixture(scope="module")
def native():
    return planted_problem("bridge-native", seed=0, n_prompts=16)


def test_eap_is_the_finite_difference_of_partly_patching_each_edge(flavour):
    problem = planted_problem(flavour, seed=0, n_prompts=8)
    model, task = problem.model, problem.task
    graph = EdgeGraph.from_model(model)
    scores = eap_scores(model, task, ig_steps=1)
    ones = torch.ones(graph.n_edges)
    base = task.score(edge_logits(model, graph, task, ones)).mean()
    eps = 1e-3
    for i in scores.abs().topk(8).indices.tolist():
        mask = ones.clone()
        mask[i] = 1 - eps
        slope = (base - task.score(edge_logits(model, graph, task, mask)).mean()) / eps
        assert slope.item() == pytest.approx(scores[i].item(), rel=0.03, abs=1e-3)
    assert hook_count(model) == 0


def test_eap_ig_ranks_edges_like_exact_single_edge_patching(native):
    model, task, planted = native.model, native.task, native.circuit
    graph = EdgeGraph.from_model(model)
    live = {f"a{la}.h{h}" for la, h in planted.heads} | {f"m{la}" for la in planted.mlp_blocks}
    # Edges between live nodes; every other edge has exactly zero effect (zeroed weights).
    candidates = [
        i for i, name in enumerate(graph.edge_names)
        if name.split("->")[0] in live | {"input"}
        and (name.split("->")[1].split("<")[0] in live | {"logits"})
    ]  # fmt: skip
    ones = torch.ones(graph.n_edges)
    base = task.score(edge_logits(model, graph, task, ones)).mean()
    exact = []
    for i in candidates:
        mask = ones.clone()
        mask[i] = 0.0
        exact.append(base - task.score(edge_logits(model, graph, task, mask)).mean())
    exact_t = torch.stack(exact)
    plain = eap_scores(model, task, ig_steps=1)[candidates]
    integrated = eap_scores(model, task, ig_steps=5)[candidates]
    assert _spearman(integrated, exact_t) > 0.7  # measured 0.79 (EAP: 0.54)
    assert _spearman(integrated, exact_t) > _spearman(plain, exact_t)


def test_eap_ig_recovers_the_planted_nodes(flavour):
    problem = planted_problem(flavour, seed=1, n_layers=4, n_heads=2, d_mlp=16, silent_layer=2,
                              n_prompts=16)  # fmt: skip
    found = eap(problem.model, problem.task, ig_steps=3, threshold=1e-5)
    assert found.heads == problem.circuit.heads
    assert found.mlp_blocks == problem.circuit.mlp_blocks
    assert found.meta["method"] == "eap_ig"


def test_selection_takes_the_largest_magnitudes_and_refuses_ambiguity():
    graph = EdgeGraph(planted_problem("bridge-native", n_prompts=2).circuit.shape)
    scores = torch.zeros(graph.n_edges)
    scores[[3, 7, 11]] = torch.tensor([0.5, -2.0, 1.0])
    assert select_edges(graph, scores, top_n=2) == [graph.edge_names[7], graph.edge_names[11]]
    assert len(select_edges(graph, scores, threshold=0.6)) == 2
    with pytest.raises(ValueError, match="exactly one"):
        select_edges(graph, scores, top_n=2, threshold=0.1)

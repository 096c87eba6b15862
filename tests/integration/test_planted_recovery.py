"""Ground truth: discovery with default settings finds exactly the planted circuit."""

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.planted import planted_problem

CASES = [
    {"seed": 0},
    {"seed": 1, "n_layers": 4, "n_heads": 2, "d_mlp": 16, "silent_layer": 2},
    {"seed": 2, "heads_per_layer": 2, "neurons_per_layer": 2, "d_mlp": 24},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}")
def test_discovery_recovers_the_planted_circuit_exactly(flavour, case):
    problem = planted_problem(flavour, **case)
    result = tnp.NodePruner(problem.model, tnp.PruneConfig(progress=False)).fit(problem.task)
    found, truth = result.circuit, problem.circuit
    for g in ("attn", "mlp", "head", "neuron"):
        kept, planted = found.kept(g), truth.kept(g)
        hits = int((kept & planted).sum())
        precision, recall = hits / max(1, int(kept.sum())), hits / int(planted.sum())
        assert (precision, recall) == (1.0, 1.0), f"{g}: precision {precision}, recall {recall}"
    silent = case.get("silent_layer", 0)
    assert not found.own_kept("attn")[silent], "the silenced block must be pruned as a block"
    assert found.nodes == truth.nodes

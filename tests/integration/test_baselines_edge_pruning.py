"""Edge pruning recovers planted nodes, and leaves the model as it found it."""

import importlib

import pytest
import torch

from tl_nodeprune.baselines.edge_eval import evaluate_edges
from tl_nodeprune.baselines.edge_pruning import EdgePruneConfig, edge_pruning
from tl_nodeprune.planted import planted_problem

from ..conftest import hook_count

ep_module = importlib.import_module("tl_nodeprune.baselines.edge_pruning")

FAST = EdgePruneConfig(steps=80, warmup_steps=40, target_edge_sparsity=0.9, progress=False)


def test_edge_pruning_recovers_the_planted_heads_and_mlps(flavour):
    problem = planted_problem(flavour, seed=0)
    found = edge_pruning(problem.model, problem.task, FAST)
    assert found.heads == problem.circuit.heads
    assert found.mlp_blocks == problem.circuit.mlp_blocks
    assert found.n_edges < 0.2 * found.meta["n_edges_total"]
    result = evaluate_edges(problem.model, found, problem.task)
    assert result.faithfulness == pytest.approx(1.0, abs=0.1)


def test_edge_pruning_restores_the_model_after_an_error(monkeypatch):
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    model = problem.model.train()
    flags = [p.requires_grad for p in model.parameters()]

    def broken(*args, **kwargs):
        raise RuntimeError("objective failed")

    monkeypatch.setattr(ep_module, "kl_divergence", broken)
    with pytest.raises(RuntimeError, match="objective failed"):
        edge_pruning(model, problem.task, FAST)
    assert hook_count(model) == 0 and model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_config_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="target_edge_sparsity"):
        EdgePruneConfig(target_edge_sparsity=1.0)
    with pytest.raises(ValueError, match="steps"):
        EdgePruneConfig(steps=0)


def test_node_masks_prune_writers_outside_the_planted_circuit():
    problem = planted_problem("bridge-native", seed=0)
    cfg = EdgePruneConfig(steps=80, warmup_steps=40, target_edge_sparsity=0.9,
                          node_masks=True, target_node_sparsity=0.6, progress=False)  # fmt: skip
    found = edge_pruning(problem.model, problem.task, cfg)
    assert found.heads == problem.circuit.heads
    writers = {name.split("->")[0] for name in found.edges}
    assert all(w in ("input", "m0", "m1", "m2") or tuple(map(int, w[1:].split(".h")))
               in problem.circuit.heads for w in writers)  # fmt: skip
    assert torch.isfinite(torch.tensor(list(found.edge_scores.values()))).all()


def test_until_target_stops_at_the_first_step_that_meets_the_target():
    """The stopped circuit is the fixed-length run's of that many steps; one step fewer misses."""
    problem = planted_problem("bridge-native", seed=0)
    cfg = EdgePruneConfig(steps=200, warmup_steps=10, target_edge_sparsity=0.85,
                          until_target=True, progress=False)  # fmt: skip
    found = edge_pruning(problem.model, problem.task, cfg)
    budget = 0.15 * found.meta["n_edges_total"]
    steps = found.meta["steps"]
    assert found.meta["reached_target"] and 10 < steps < 200
    assert found.n_edges <= budget
    fixed = {"until_target": False, "progress": False}
    same = edge_pruning(problem.model, problem.task, cfg, steps=steps, **fixed)
    assert same.edges == found.edges
    before = edge_pruning(problem.model, problem.task, cfg, steps=steps - 1, **fixed)
    assert before.n_edges > budget
    last = found.meta["trace"][-1]
    assert last["steps"] == steps and last["kl"] == pytest.approx(found.meta["final_kl"])
    assert last["kept_edges"] == pytest.approx(found.n_edges / found.meta["n_edges_total"])


def test_until_target_waits_for_the_end_of_the_warm_up():
    """The kept fraction falls under the target early (all gates cross zero together near
    step init/lr = 30); the run goes on until the target has ramped in fully."""
    problem = planted_problem("bridge-native", seed=0)
    cfg = EdgePruneConfig(steps=200, warmup_steps=60, target_edge_sparsity=0.85,
                          until_target=True, progress=False, log_every=5)  # fmt: skip
    found = edge_pruning(problem.model, problem.task, cfg)
    early = [r["steps"] for r in found.meta["trace"] if r["kept_edges"] <= 0.15]
    assert early and early[0] < 60
    assert found.meta["steps"] == 60 and found.meta["reached_target"]


def test_until_target_reports_a_cap_reached_first():
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    cfg = EdgePruneConfig(steps=5, warmup_steps=40, target_edge_sparsity=0.9,
                          until_target=True, progress=False)  # fmt: skip
    found = edge_pruning(problem.model, problem.task, cfg)
    assert found.meta["steps"] == 5 and found.meta["reached_target"] is False
    assert found.n_edges > 0.1 * found.meta["n_edges_total"]

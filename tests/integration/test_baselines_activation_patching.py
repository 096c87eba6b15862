"""Activation patching: exact lone-ablation effects recover the planted nodes."""

import pytest
import torch

from tl_nodeprune.baselines.activation_patching import activation_patching, node_effects
from tl_nodeprune.evaluation import evaluate
from tl_nodeprune.planted import planted_problem

from ..conftest import hook_count


def test_activation_patching_recovers_the_planted_heads_and_neurons(flavour):
    problem = planted_problem(flavour, seed=1, n_layers=4, n_heads=2, d_mlp=16, silent_layer=2,
                              n_prompts=16)  # fmt: skip
    truth = problem.circuit
    found = activation_patching(problem.model, problem.task, threshold=1e-6, neuron_group_size=1)
    assert found.heads == truth.heads
    assert found.mlp_blocks == truth.mlp_blocks
    assert found.neurons == truth.neurons
    assert hook_count(problem.model) == 0
    # top_k by effect: exactly the planted heads, MLPs and neurons are the nonzero ones
    n_planted = len(truth.heads) + len(truth.mlp_blocks) + sum(map(len, truth.neurons.values()))
    ranked = activation_patching(problem.model, problem.task, top_k=n_planted,
                                 threshold=None, neuron_group_size=1)  # fmt: skip
    assert ranked.nodes == found.nodes


def test_lone_head_effect_equals_evaluating_the_circuit_without_that_head():
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    model, task = problem.model, problem.task
    effects = node_effects(model, task, effect="metric")
    layer, head = problem.circuit.heads[0]
    full = problem.circuit.__class__.full(problem.circuit.shape)
    gates = {**full.gates, "head": torch.ones(full.shape.units("head"))}
    gates["head"][layer, head] = 0.0
    without = evaluate(model, type(full)(full.shape, gates), task)
    assert effects["head"][layer, head].item() == pytest.approx(
        without.metric_full - without.metric_circuit, abs=1e-5
    )
    assert abs(effects["head"][layer, head].item()) > 0.01


def test_bad_arguments_are_refused():
    problem = planted_problem("bridge-native", seed=0, n_prompts=4)
    with pytest.raises(ValueError, match="effect"):
        node_effects(problem.model, problem.task, effect="logits")
    with pytest.raises(ValueError, match="Give top_k"):
        activation_patching(problem.model, problem.task, top_k=None, threshold=None)

"""PruneConfig(target_kl=...): dual ascent on one scale of every sparsity term holds the
training KL at a budget; without a budget a run is bit for bit what it was."""

import functools
import math

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.planted import add_distractors, planted_problem

STEPS = 300  # the scale needs ~150 steps to find its level and ~100 more for the gates to settle


@pytest.fixture(scope="module")
def budget_run():
    """Fits at a given budget on the planted model of seed 0 with distractors, cached.

    Removing any one planted node costs a KL of 0.22 to 3.2, so the bare planted model offers
    no circuit between KL 0 and 0.22; its 36 weak distractors (6 heads or neurons per layer)
    give the budget something to trade nodes for.
    """
    problem = add_distractors(planted_problem("bridge-native", seed=0), per_layer=6, strength=0.3)

    @functools.cache
    def fit(target_kl: float) -> tuple[tnp.PruneResult, float]:
        config = tnp.PruneConfig(progress=False, steps=STEPS, target_kl=target_kl)
        result = tnp.NodePruner(problem.model, config).fit(problem.task)
        return result, tnp.evaluate(problem.model, result.circuit, problem.task).kl

    return fit


def test_the_training_kl_ends_at_the_budget_and_the_circuit_within_it(budget_run):
    # Measured (seed 0, kl_lr 10): the last 25 steps' training KL 0.213, the circuit's 0.20;
    # at budgets 0.05, 0.1, 0.4 and 0.8 the same run ends 0.75x, 1.4x, 1.2x and 1.7x the budget.
    result, circuit_kl = budget_run(0.2)
    history = result.history
    assert history.kl_budget_scale.iloc[0] == 1.0
    assert history.kl_budget_scale.max() > 5, "the scale rose while the KL was under budget"
    assert history.train_kl.tail(25).mean() == pytest.approx(0.2, rel=0.25)
    # The final circuit is deterministic, so its KL is not the stochastic gates' average:
    # within the same 25%, and above half the budget (the full planted circuit has KL 0).
    assert 0.1 < circuit_kl < 0.25


def test_a_looser_budget_keeps_fewer_nodes(budget_run):
    # Measured: 44 nodes (circuit KL 0.03) at 0.05, 35 (KL 0.43) at 0.4.
    (tight, tight_kl), (loose, loose_kl) = budget_run(0.05), budget_run(0.4)
    assert len(loose.circuit.nodes) < len(tight.circuit.nodes) - 3
    assert tight_kl < 0.1 < 0.3 < loose_kl < 0.6


def test_without_a_budget_the_run_is_exactly_the_default_and_a_frozen_scale_changes_nothing():
    problem = planted_problem("bridge-native", seed=0)

    def fit(**kwargs):
        config = tnp.PruneConfig(progress=False, **kwargs)
        return tnp.NodePruner(problem.model, config).fit(problem.task)

    default, unset = fit(), fit(target_kl=None, kl_lr=50.0)
    for g in default.log_alpha:
        assert torch.equal(default.log_alpha[g], unset.log_alpha[g]), g
    assert unset.history.equals(default.history)  # and no budget columns
    # A rate so small that the scale stays exactly 1.0 in float32: same gates, two columns more.
    frozen = fit(target_kl=0.2, kl_lr=1e-12)
    for g in default.log_alpha:
        assert torch.equal(default.log_alpha[g], frozen.log_alpha[g]), g
    history = frozen.history
    assert list(history.columns) == [*default.history.columns, "train_kl", "kl_budget_scale"]
    assert (history.kl_budget_scale == 1.0).all()
    assert history.train_kl.equals(history.faithfulness)  # the KL objective is the budget's KL


def test_with_another_objective_the_kl_is_computed_and_the_scale_follows_dual_ascent():
    problem = planted_problem("bridge-native", seed=0)
    config = tnp.PruneConfig(progress=False, steps=40, objective="logit_diff", target_kl=0.05,
                             kl_lr=20.0, log_every=10)  # fmt: skip
    history = tnp.NodePruner(problem.model, config).fit(problem.task).history
    kl, scale = history.train_kl.to_numpy(), history.kl_budget_scale.to_numpy()
    # 0 only when every sampled gate is fully open
    assert (kl >= 0).all() and kl.max() > 0.1
    assert not history.train_kl.equals(history.faithfulness)
    expected = [1.0]
    for value in kl[:-1]:
        expected.append(max(0.0, expected[-1] + 20.0 * (0.05 - value)))
    assert scale == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert scale.max() > 1.0


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf])
def test_a_budget_must_be_a_positive_finite_number(value):
    with pytest.raises(ValueError, match=r"PruneConfig\.target_kl must be None or a finite num"):
        tnp.PruneConfig(target_kl=value)
    with pytest.raises(ValueError, match=r"PruneConfig\.kl_lr must be a finite number > 0"):
        tnp.PruneConfig(kl_lr=0.0)

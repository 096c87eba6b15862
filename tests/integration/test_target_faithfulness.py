"""PruneConfig(target_faithfulness=...) during training: dual ascent on one scale of every
sparsity term holds the batch faithfulness in [target, 1.1], and the circuit is the smallest
in that band on held-out validation prompts."""

import dataclasses
import functools
import warnings

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.compiled import compiled_problem
from tl_nodeprune.planted import add_distractors, planted_problem
from tl_nodeprune.selection import circuit_at
from tl_nodeprune.training import RepeatedPromptsWarning

from ..conftest import hook_count

STEPS = 300


@pytest.fixture(scope="module")
def steered():
    """Fits on the planted model of seed 0 with distractors at a faithfulness target and rate
    (cached; the default KL budget off: the band alone; one noise draw per batch, as the
    numbers below were measured), with the default (log_alpha > 0) circuit's KL faithfulness
    on the validation quarter the fit held out. The planted task's logit difference does not
    separate the full model from the empty circuit (on the training split the full model is
    0.58 below it), so the KL measure is used."""
    problem = add_distractors(planted_problem("bridge-native", seed=0), per_layer=6, strength=0.3)
    validation = problem.task.split(1 - tnp.PruneConfig().validation_fraction, seed=0)[1]

    @functools.cache
    def fit(target: float, rate: float) -> tuple[tnp.PruneResult, float]:
        config = tnp.PruneConfig(progress=False, steps=STEPS, target_faithfulness=target,
                                 selection_measure="kl", faithfulness_lr=rate,
                                 target_kl=None, gate_noise="batch")  # fmt: skip
        result = tnp.NodePruner(problem.model, config).fit(problem.task)
        default = circuit_at(result.circuit.shape, result.log_alpha, 0.0)
        ev = tnp.evaluate(problem.model, default, validation)
        return result, 1 - ev.kl / ev.kl_empty

    return fit


def test_training_holds_the_faithfulness_at_the_target_and_a_frozen_scale_does_not(steered):
    # Measured (seed 0): the gates alone give KL faithfulness 0.51 on validation prompts at
    # target 0.5 (17 nodes), and 1.00 (45 nodes) with the scale frozen at 1: the selection
    # then has to cut a circuit the training never shaped. With one draw per prompt (the default
    # gate_noise) the gates alone give 0.18 (13 nodes) at target 0.5 while the batch f holds
    # 0.53, and the selection keeps 35 nodes (26 with the scale frozen, 40 at target 0.95).
    steered_run, steered_f = steered(0.5, 10.0)
    frozen_run, frozen_f = steered(0.5, 1e-12)
    assert 0.35 <= steered_f <= 0.7
    assert frozen_f > 0.95
    assert (frozen_run.history.faithfulness_budget_scale == 1.0).all()
    assert steered_run.history.faithfulness_budget_scale.max() > 10
    chosen = steered_run.selection
    assert 0.5 <= chosen.faithfulness <= 1.1 and chosen.circuit.meta["selection"]["upper"] == 1.1


def test_a_looser_target_keeps_fewer_nodes(steered):
    loose, tight = steered(0.5, 10.0)[0], steered(0.95, 10.0)[0]
    assert len(loose.circuit.nodes) < len(tight.circuit.nodes) - 10  # measured: 16 and 39


def test_the_scale_follows_dual_ascent_on_the_band(steered):
    history = steered(0.95, 10.0)[0].history
    f, scale = history.train_faithfulness.to_numpy(), history.faithfulness_budget_scale
    expected = [1.0]
    for value in f[:-1]:
        expected.append(max(0.0, expected[-1] + 10.0 * min(value - 0.95, 1.1 - value)))
    assert scale.to_numpy() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert (f > 0.95).any() and (f < 0.95).any(), "the band's both sides were visited"


@pytest.mark.parametrize("measure", ["metric", "kl"])
@pytest.mark.parametrize(("init", "expected"), [(20.0, 1.0), (-20.0, 0.0)])
def test_the_batch_faithfulness_is_one_for_the_full_model_and_zero_for_the_empty_circuit(
    measure, init, expected
):
    # Gates at log_alpha +-20 sample exactly 1 or 0: the gated forward is the full model or
    # the empty circuit on every batch, whatever the batch.
    problem = compiled_problem("chain_soft", "bridge-native", seed=0)
    config = tnp.PruneConfig(progress=False, steps=4, lr=1e-6, init_log_alpha=init, log_every=1,
                             target_faithfulness=0.9, selection_measure=measure,
                             granularities=("attn", "mlp", "head"))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RepeatedPromptsWarning)
        history = tnp.NodePruner(problem.model, config).fit(problem.task).history
    assert history.train_faithfulness.to_numpy() == pytest.approx([expected] * 4, abs=1e-4)


def test_a_metric_that_does_not_separate_the_full_model_from_the_empty_circuit_is_refused():
    # the planted model's own answers swapped: the full model prefers the "incorrect" one
    problem = planted_problem("bridge-native", seed=0)
    task = dataclasses.replace(problem.task, correct=problem.task.incorrect,
                               incorrect=problem.task.correct)  # fmt: skip
    config = tnp.PruneConfig(progress=False, steps=2, target_faithfulness=0.9)
    with pytest.raises(ValueError, match=r"full model beats the empty circuit by -\d+\.\d+ .*"
                                         r"use selection_measure='kl'"):  # fmt: skip
        tnp.NodePruner(problem.model, config).fit(task)
    assert hook_count(problem.model) == 0

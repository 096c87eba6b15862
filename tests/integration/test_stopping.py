"""PruneConfig(validate_every=N): the circuit is scored on the validation prompts every N steps
and the run returns the gates of the best check (stopping by validation loss)."""

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.evaluation import Evaluator
from tl_nodeprune.planted import planted_problem

from ..conftest import NO_BUDGETS


def test_the_run_returns_exactly_the_gates_it_had_after_the_best_check(monkeypatch):
    # The validation KL is scripted (the third of six checks is best), so the returned gates
    # must be those of a run stopped after step 29: same split, same batches, same noise.
    problem = planted_problem("bridge-native", seed=0)
    scripted = iter([5.0, 4.0, 0.5, 3.0, 2.0, 1.0])
    real_call = Evaluator.__call__

    def call(self, circuit):
        evaluation = real_call(self, circuit)
        return type(evaluation)(**{**evaluation.to_dict(), "kl": next(scripted)})

    monkeypatch.setattr(Evaluator, "__call__", call)
    config = tnp.PruneConfig(progress=False, steps=60, validate_every=10, **NO_BUDGETS)
    result = tnp.NodePruner(problem.model, config).fit(problem.task)
    monkeypatch.setattr(Evaluator, "__call__", real_call)
    stopped = result.circuit.meta["early_stopping"]
    assert [c["step"] for c in stopped["checks"]] == [9, 19, 29, 39, 49, 59]
    assert stopped["best_step"] == 29
    short = tnp.PruneConfig(progress=False, steps=30, validate_every=30, **NO_BUDGETS)
    reference = tnp.NodePruner(problem.model, short).fit(problem.task)
    longer = tnp.PruneConfig(progress=False, steps=60, validate_every=60, **NO_BUDGETS)
    full = tnp.NodePruner(problem.model, longer).fit(problem.task)
    for g in result.log_alpha:
        assert torch.equal(result.log_alpha[g], reference.log_alpha[g]), g
        assert not torch.equal(result.log_alpha[g], full.log_alpha[g]), g  # 30 more steps
    assert result.circuit.nodes == reference.circuit.nodes


def test_a_check_scores_the_circuit_on_the_held_out_prompts_at_the_training_prices():
    problem = planted_problem("bridge-native", seed=1)
    config = tnp.PruneConfig(progress=False, steps=40, validate_every=20, **NO_BUDGETS)
    result = tnp.NodePruner(problem.model, config).fit(problem.task)
    stopped = result.circuit.meta["early_stopping"]
    best = next(c for c in stopped["checks"] if c["step"] == stopped["best_step"])
    validation = problem.task.split(1 - config.validation_fraction, seed=config.seed)[1]
    circuit = result.circuit
    assert best["kl"] == pytest.approx(tnp.evaluate(problem.model, circuit, validation).kl,
                                       abs=1e-6)  # fmt: skip
    shape = circuit.shape
    price = sum(config.penalty_for(g, shape) * int((circuit.gates[g] > 0.5).sum()) / shape.count(g)
                for g in circuit.granularities)  # fmt: skip
    assert best["price"] == pytest.approx(price, rel=1e-6)
    assert best["nodes"] == len(circuit.nodes)
    assert min(c["kl"] + c["price"] for c in stopped["checks"]) == pytest.approx(
        best["kl"] + best["price"]
    )


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_validate_every_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=r"PruneConfig\.validate_every must be None or a positive"):
        tnp.PruneConfig(validate_every=value)

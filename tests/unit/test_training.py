"""Training machinery shared by NodePruner and edge pruning: batch order, warm-up, sparsity
terms and the on-device history."""

import math
import warnings

import pytest
import torch

from tl_nodeprune.tasks.base import PromptTask
from tl_nodeprune.training import (
    BatchPlan,
    History,
    KLBudget,
    RepeatedPromptsWarning,
    Sparsity,
    batches,
    ramp,
    warn_repeated_prompts,
)


def test_every_example_is_seen_once_per_epoch_in_a_fresh_order():
    n, size = 10, 4  # epochs of batches 4, 4, 2
    order = batches(torch.Generator().manual_seed(0), n, size)
    epochs = [[next(order) for _ in range(3)] for _ in range(3)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert sorted(torch.cat(epoch).tolist()) == list(range(n))
        assert all(torch.equal(b, b.sort().values) for b in epoch)
    assert len({tuple(torch.cat(e).tolist()) for e in epochs}) == 3, "each epoch reshuffles"


def test_batch_plan_trims_each_step_to_its_longest_prompt_and_keeps_its_prompts():
    clean = torch.arange(6 * 5).reshape(6, 5)
    answer_pos = torch.tensor([0, 4, 1, 2, 3, 1])
    task = PromptTask(clean, clean.flip(1), torch.zeros(6, 1, dtype=torch.long),
                      torch.ones(6, 1, dtype=torch.long), answer_pos,
                      prompts=tuple(f"p{i}" for i in range(6)))  # fmt: skip
    plan = BatchPlan.draw(task, steps=5, batch_size=4, seed=3, device="cpu")
    order = batches(torch.Generator().manual_seed(3), 6, 4)
    for step, expected in zip(range(5), order, strict=False):
        idx, seq, batch = plan.batch(task, step)
        assert torch.equal(idx, expected)
        assert seq == int(answer_pos[expected].max()) + 1
        assert torch.equal(batch.clean, clean[expected, :seq])
        assert batch.prompts == tuple(f"p{i}" for i in expected.tolist())


def test_ramp_rises_linearly_then_holds():
    assert [ramp(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 0) == 1.0


def test_fixed_penalty_warms_up_and_lagrangian_multiplier_rises_while_above_target():
    sparsity = Sparsity({"head": 2.0}, {"neuron": 0.5}, warmup_steps=2, lagrangian_lr=0.1,
                        lagrangian_rho=0.0, device="cpu", scales={"neuron": 10})  # fmt: skip
    l0 = {"head": torch.tensor(0.5), "neuron": torch.tensor(0.9)}
    terms = sparsity.terms(l0, step=0)
    assert terms["sparsity_head"].item() == pytest.approx(2.0 * 0.5 * 0.5)  # half warmed up
    assert terms["sparsity_neuron"].item() == 0.0  # multiplier starts at 0, rho is 0
    for step in range(3):
        sparsity.ascend(l0, step)
    # target kept fraction 1 - 0.5 * ramp: 0.75 at step 0, then 0.5; gaps 0.15, 0.4, 0.4
    assert sparsity.multipliers["neuron"].item() == pytest.approx(0.1 * (0.15 + 0.4 + 0.4))
    terms = sparsity.terms(l0, step=3)
    assert terms["sparsity_neuron"].item() == pytest.approx(10 * 0.095 * 0.4)


def test_kl_budget_scale_starts_at_one_rises_below_budget_falls_above_and_stops_at_zero():
    budget = KLBudget(target=0.2, lr=10.0, device="cpu")
    terms = {"sparsity_head": torch.tensor(0.5), "sparsity_neuron": torch.tensor(2.0)}
    assert {k: v.item() for k, v in budget.apply(terms).items()} == {
        "sparsity_head": 0.5, "sparsity_neuron": 2.0
    }
    first = budget.scale
    budget.ascend(torch.tensor(0.1))  # below the budget: 1 + 10 * 0.1
    assert budget.scale.item() == pytest.approx(2.0)
    assert first.item() == 1.0, "a step's scale is replaced, not edited (its history row holds it)"
    assert budget.apply(terms)["sparsity_neuron"].item() == pytest.approx(4.0)
    budget.ascend(torch.tensor(0.3, requires_grad=True))  # above: 2 - 10 * 0.1
    assert budget.scale.item() == pytest.approx(1.0) and not budget.scale.requires_grad
    budget.ascend(torch.tensor(5.0))  # far above: clamped at 0, not negative
    assert budget.scale.item() == 0.0
    budget.ascend(torch.tensor(0.15))
    assert budget.scale.item() == pytest.approx(0.5)


def test_history_reads_at_intervals_and_names_the_first_non_finite_step():
    history = History(log_every=3, advice="Lower the rate.")

    def add(step: int, loss: float, faith: float) -> None:
        history.add(step, torch.tensor(loss), {"faith": torch.tensor(faith)}, {"kept": 0.5})

    for step in range(4):
        add(step, step + 1.0, step + 1.0)
    assert [r["loss"] for r in history.rows] == [1.0, 2.0, 3.0], "step 3 waits for its read"
    assert list(history.frame().columns) == ["step", "loss", "faith", "kept"]
    add(4, math.nan, 7.0)
    with pytest.raises(FloatingPointError, match=r"^Loss became nan at step 4 \(faith=7\)"
                       r"\. Lower the rate\.$"):  # fmt: skip
        add(5, math.inf, 1.0)


def test_a_run_that_shows_each_prompt_many_times_warns_and_a_long_prompt_set_does_not():
    with pytest.warns(RepeatedPromptsWarning, match=r"each of its 96 training prompts 12\.5 times"):
        assert warn_repeated_prompts(96, 150, 8) == 12.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_repeated_prompts(800, 150, 8) == 1.5
        assert warn_repeated_prompts(120, 150, 8) == 10.0  # the limit itself is allowed

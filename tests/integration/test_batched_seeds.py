"""fit_seeds(..., batched=True): every seed's gates trained in one forward per step, each on its
own rows, give each seed what its own fit gives; seeds do not see each other; padding to the
longest batch changes no answer; refused combinations say so; hooks never stay on."""

from dataclasses import replace

import pytest
import torch

import tl_nodeprune as tnp
import tl_nodeprune.batched_seeds as batched_seeds
from tl_nodeprune.batched_seeds import batched_step
from tl_nodeprune.planted import planted_problem
from tl_nodeprune.tasks.base import PromptTask
from tl_nodeprune.training import BatchPlan

from ..conftest import NO_BUDGETS, fails_cleanly, hook_count

SEEDS = (0, 1, 2)
STEPS = 12


@pytest.fixture(scope="module")
def problem():
    return planted_problem("bridge-native", seed=0)


def _mixed_lengths(task: PromptTask, named: bool = False) -> PromptTask:
    """The task with prompts of 4 to 8 tokens (answers read at their last), optionally with
    token labels: the first token "start", the last "END", the rest "other"."""
    ends = torch.randint(3, 8, (len(task),), generator=torch.Generator().manual_seed(3))
    labels = None
    if named:
        labels = [["start"] + ["other"] * (int(e) - 1) + ["END"] for e in ends]
    return PromptTask.from_tokens(task.clean, task.corrupted, task.correct[:, 0],
                                  task.incorrect[:, 0], answer_pos=ends.tolist(),
                                  positions=labels, name="mixed")  # fmt: skip


def _gap(a: tnp.PruneResult, b: tnp.PruneResult) -> float:
    return max((a.log_alpha[g] - b.log_alpha[g]).abs().max().item() for g in a.log_alpha)


def _check_equal_to_separate_fits(model, task: PromptTask, config: tnp.PruneConfig) -> None:
    """Batched and one fit per seed agree per seed: log_alpha, circuit and history."""
    spread = tnp.NodePruner(model, config).fit_seeds(task, SEEDS, batched=True)
    assert spread.seeds == list(SEEDS)
    alone = {s: tnp.NodePruner(model, replace(config, seed=s)).fit(task) for s in SEEDS}
    for s in SEEDS:
        got = spread.results[s]
        assert got.config.seed == s
        assert _gap(got, alone[s]) < 1e-4, s
        assert got.circuit.nodes == alone[s].circuit.nodes
        stopped = [r.circuit.meta.get("early_stopping", {}).get("best_step")
                   for r in (got, alone[s])]  # fmt: skip
        assert stopped[0] == stopped[1]
        assert list(got.history.columns) == list(alone[s].history.columns)
        assert torch.allclose(torch.tensor(got.history.values, dtype=torch.float64),
                              torch.tensor(alone[s].history.values, dtype=torch.float64),
                              atol=1e-4, equal_nan=True)  # fmt: skip
    # The seeds really differ, so the tolerance above can tell one seed's gates from another's.
    assert min(_gap(alone[0], alone[s]) for s in SEEDS[1:]) > 1e-2


CASES = {
    "penalties": {},
    "example_noise": {"gate_noise": "example"},
    "target_sparsity": {"target_sparsity": {"head": 0.5}, "warmup_steps": 4},
    "target_kl_cosine_lr": {"target_kl": 0.2, "lr_final": 0.05},
    "mean_ablation_split": {"ablation": "mean", "target_kl": 0.2},
    "zero_ablation_bounds": {"ablation": "zero", "log_alpha_bounds": (-4.0, 4.0)},
    "logit_diff": {"objective": "logit_diff", "target_kl": 0.3},
    "certify": {"certify": True},
    "target_faithfulness": {"target_faithfulness": 0.8, "selection_measure": "kl"},
    "validate_every": {"validate_every": 5, "lr": 0.6},
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_seed_follows_its_own_fit(problem, case):
    config = tnp.PruneConfig(progress=False, steps=STEPS, **{"lr": 0.3, **CASES[case]})
    _check_equal_to_separate_fits(problem.model, problem.task, config)


@pytest.mark.parametrize("named", [False, True])
def test_prompts_of_different_lengths_padded_to_the_longest_change_no_answer(problem, named):
    task = _mixed_lengths(problem.task, named)
    plans = [BatchPlan.draw(task, STEPS, 8, s, "cpu").seqs for s in SEEDS]
    assert any(len({p[i] for p in plans}) > 1 for i in range(STEPS)), "no step pads any seed"
    config = tnp.PruneConfig(progress=False, steps=STEPS, lr=0.3, target_kl=0.2,
                             positions="named" if named else None,
                             gate_noise="example" if named else "batch")  # fmt: skip
    _check_equal_to_separate_fits(problem.model, task, config)


def _seed0_after(model, other: PromptTask, task: PromptTask) -> dict[str, torch.Tensor]:
    """Seed 0's log_alpha after batched steps beside a seed-1 run on `other` prompts.

    The default budgets are off: the faithfulness band refuses the swapped prompts (there the
    full model does not beat the empty circuit), and isolation is what is tested here."""
    config = tnp.PruneConfig(progress=False, steps=STEPS, lr=0.3, **NO_BUDGETS)
    with tnp.NodePruner(model, config).training(task) as run0:
        pruner1 = tnp.NodePruner(model, replace(config, seed=1))
        with pruner1.training(other) as run1:
            for step in range(STEPS):
                batched_step([run0, run1], step)
    return {g: la.detach().clone() for g, la in run0.gates.log_alpha.items()}


def test_a_seed_does_not_see_its_neighbours_prompts(problem):
    task = problem.task
    shuffled = replace(task, clean=task.corrupted, corrupted=task.clean)  # other activations
    a = _seed0_after(problem.model, task, task)
    b = _seed0_after(problem.model, _mixed_lengths(shuffled), task)
    config = tnp.PruneConfig(progress=False, steps=STEPS, lr=0.3, **NO_BUDGETS)
    alone = tnp.NodePruner(problem.model, config)
    c = alone.fit(task).log_alpha
    for g in a:
        assert (a[g] - b[g]).abs().max() < 1e-5
        assert (a[g] - c[g].to(a[g].device)).abs().max() < 1e-4
        assert (a[g] - 3.0).abs().max() > 0.1  # trained


def test_refused_under_a_process_group(problem, monkeypatch):
    monkeypatch.setattr(batched_seeds.distributed, "active", lambda: True)
    monkeypatch.setattr(batched_seeds.distributed, "world", lambda: 2)
    pruner = tnp.NodePruner(problem.model, tnp.PruneConfig(progress=False, steps=2))
    with pytest.raises(ValueError, match="call fit_seeds without batched=True"):
        pruner.fit_seeds(problem.task, SEEDS, batched=True)
    assert hook_count(problem.model) == 0


# Block 1 runs 13 times while the reference is made and the runs prepared, once per training
# step (calls 14-16), then in the selection: a failure in each stage.
@pytest.mark.parametrize("fail_at", [1, 15, 40])
def test_no_hook_stays_after_a_failure(fail_at):
    problem = planted_problem("bridge-native", seed=1)
    config = tnp.PruneConfig(progress=False, steps=3, target_kl=0.2)
    pruner = tnp.NodePruner(problem.model, config)
    fails_cleanly(problem.model, lambda: pruner.fit_seeds(problem.task, SEEDS, batched=True),
                  fail_at)  # fmt: skip
    assert hook_count(problem.model) == 0

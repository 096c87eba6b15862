"""PruneConfig(validation_split="groups"): the prompts a run selects, certifies and stops on come
from groups (IOI: templates) that its training prompts never use."""

from dataclasses import replace

import pytest

import tl_nodeprune as tnp
from tl_nodeprune import evaluation
from tl_nodeprune.planted import planted_problem


@pytest.mark.parametrize("setting", [{"target_kl": 0.3}, {"validate_every": 5}, {"certify": True}])
def test_the_validation_prompts_come_from_groups_training_never_sees(monkeypatch, setting):
    problem = planted_problem("bridge-native", seed=0)
    n = len(problem.task)
    groups = tuple(f"template {i % 6}" for i in range(n))
    task = replace(problem.task, groups=groups)
    seen: list[tuple[str, ...]] = []
    real_init = evaluation.Evaluator.__init__

    def spy(self, model, task, *args, **kwargs):
        seen.append(task.groups)
        real_init(self, model, task, *args, **kwargs)

    monkeypatch.setattr(evaluation.Evaluator, "__init__", spy)
    trained: list[tuple[str, ...]] = []
    real_fit_task = tnp.NodePruner.training

    def training(self, train, *args, **kwargs):
        trained.append(train.groups)
        return real_fit_task(self, train, *args, **kwargs)

    monkeypatch.setattr(tnp.NodePruner, "training", training)
    config = tnp.PruneConfig(progress=False, steps=6, validation_split="groups", **setting)
    tnp.NodePruner(problem.model, config).fit(task)
    [train_groups] = trained
    assert seen, "something scored the validation prompts"
    for validation_groups in seen:
        assert validation_groups and not set(validation_groups) & set(train_groups)
    assert len(set(train_groups)) + len(set(seen[0])) == 6  # every template in one part


def test_a_task_without_groups_is_refused_with_the_fix():
    problem = planted_problem("bridge-native", seed=0)
    config = tnp.PruneConfig(progress=False, steps=2, target_kl=0.3, validation_split="groups")
    with pytest.raises(ValueError, match="has no groups to hold out"):
        tnp.NodePruner(problem.model, config).fit(problem.task)

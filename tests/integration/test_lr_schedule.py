"""`PruneConfig.lr_final`: a cosine from lr to lr_final over the run."""

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.planted import planted_problem


def _fit(problem, **kw):
    config = tnp.PruneConfig(steps=12, progress=False, seed=3, **kw)
    return tnp.NodePruner(problem.model, config).fit(problem.task).log_alpha


def test_lr_final_equal_to_lr_is_the_constant_rate_and_lower_moves_gates_less():
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    start = tnp.PruneConfig().init_log_alpha
    constant = _fit(problem)
    same = _fit(problem, lr_final=tnp.PruneConfig().lr)
    slow = _fit(problem, lr_final=0.002)
    for g in constant:
        assert torch.equal(constant[g], same[g]), g  # the schedule's first and every factor is 1
    moved = {name: sum((la[g] - start).abs().sum().item() for g in la)
             for name, la in (("constant", constant), ("slow", slow))}  # fmt: skip
    assert moved["slow"] < 0.9 * moved["constant"]


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.5, float("nan")])
def test_lr_final_outside_zero_to_lr_is_refused(bad):
    with pytest.raises(ValueError, match="lr_final"):
        tnp.PruneConfig(lr=0.2, lr_final=bad)

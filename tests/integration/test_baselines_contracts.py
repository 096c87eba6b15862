"""Every baseline leaves the model as it found it, also when it fails half-way."""

import pytest

from tl_nodeprune.baselines import BASELINES
from tl_nodeprune.planted import planted_problem

from ..conftest import fails_cleanly, hook_count

SETTINGS = {
    "edge_pruning": {"steps": 3, "progress": False},
    "eap": {"top_n": 5},
    "eap_ig": {"top_n": 5},
    "activation_patching": {"top_k": 3},
    "acdc": {"threshold": 0.01},
}


@pytest.mark.parametrize("method", sorted(BASELINES))
@pytest.mark.parametrize("fail_at", [1, 4])
def test_baseline_restores_hooks_mode_and_flags_after_an_error(method, fail_at):
    problem = planted_problem("bridge-native", seed=0, n_layers=2, n_prompts=8)
    model = problem.model
    fails_cleanly(model, lambda: BASELINES[method](model, problem.task, **SETTINGS[method]),
                  fail_at)  # fmt: skip
    assert not getattr(model.cfg, "use_split_qkv_input", False)


def test_every_registered_baseline_has_contract_settings():
    assert set(SETTINGS) == set(BASELINES)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baseline_checks_answers_against_the_output_vocabulary(method):
    """Every method reads its answers through the one reference run, which checks both
    vocabularies: an answer id the unembedding has no row for is refused, by name."""
    problem = planted_problem("bridge-native", seed=0, n_layers=2, n_prompts=8)
    model, task = problem.model, problem.task
    out_vocab = int(task.correct.max())  # the model's output rows end below this answer
    model.cfg.d_vocab_out = out_vocab
    try:
        with pytest.raises(ValueError, match="outside the model's output vocabulary"):
            BASELINES[method](model, task, **SETTINGS[method])
    finally:
        model.cfg.d_vocab_out = model.cfg.d_vocab
    assert hook_count(model) == 0

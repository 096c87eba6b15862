"""Contracts every run keeps: model untouched, hooks gone, exact identity, determinism, errors."""

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.ablation import Ablation, capture, mixing_hooks, site_masks
from tl_nodeprune.gates import GateSet
from tl_nodeprune.planted import planted_problem, tiny_model
from tl_nodeprune.sites import hook_name

from ..conftest import NO_BUDGETS, hook_count

FAST = tnp.PruneConfig(steps=20, progress=False)


@pytest.fixture
def problem(flavour):
    return planted_problem(flavour, seed=0, n_prompts=16)


def _state(model):
    return {
        "training": model.training,
        "flags": [p.requires_grad for p in model.parameters()],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def test_all_gates_open_gives_the_models_logits_exactly(problem):
    model, task = problem.model, problem.task
    shape = tnp.ModelShape.from_model(model)
    gates = GateSet(shape, shape.available() + ("head_dim",), init_log_alpha=10.0).deterministic()
    masks = site_masks(shape, gates)
    values = Ablation(model, task, list(masks), "corrupted").values(torch.arange(len(task)), 8)
    with torch.no_grad():
        plain = model(task.clean)
        with model.hooks(fwd_hooks=mixing_hooks(masks, values)):
            gated = model(task.clean)
    assert torch.equal(plain, gated)
    assert hook_count(model) == 0


def test_fit_leaves_the_model_as_it_was(problem):
    model, task = problem.model, problem.task
    model.train()
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    before = _state(model)
    with torch.no_grad():
        logits_before = model.eval()(task.clean)
    model.train()
    tnp.NodePruner(model, FAST).fit(task)
    after = _state(model)
    assert after["training"] is True and after["flags"] == before["flags"]
    assert all(torch.equal(a, b) for a, b in zip(after["weights"], before["weights"], strict=True))
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model.eval()(task.clean), logits_before)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_inside_fit_cleans_up(problem, error):
    """A failure in the middle of a gated forward pass (here: a user's own hook raising)."""
    model, task = problem.model, problem.task
    before = _state(model)
    point = model.hook_dict["blocks.1.hook_resid_pre"]
    seen = []
    gated = {hook_name(g, layer) for g in ("head", "neuron") for layer in range(3)}

    def hooked_sites():
        return {n for n in gated if model.hook_dict[n]._forward_hooks}

    def user_hook(x, hook):
        if torch.is_grad_enabled():  # a training step (captures run without gradient)
            seen.append(hooked_sites())
            if len(seen) == 2:
                raise error
        return x

    point.add_hook(user_hook)
    baseline = hook_count(model)
    try:
        with pytest.raises(type(error)):
            tnp.NodePruner(model, tnp.PruneConfig(steps=10, progress=False)).fit(task)
        assert seen[-1] == gated, "every gated site was hooked when the error struck"
        assert hook_count(model) == baseline and not hooked_sites()
    finally:
        point.remove_hooks()
    after = _state(model)
    assert after["flags"] == before["flags"] and after["training"] == before["training"]
    assert all(torch.equal(a, b) for a, b in zip(after["weights"], before["weights"], strict=True))


def test_same_seed_same_circuit_other_seed_other_gates(problem):
    def run(seed):
        cfg = tnp.PruneConfig(steps=30, seed=seed, progress=False)
        return tnp.NodePruner(problem.model, cfg).fit(problem.task)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a.log_alpha[g], b.log_alpha[g]) for g in a.log_alpha)
    assert a.circuit.nodes == b.circuit.nodes
    assert a.history.equals(b.history)
    assert not torch.equal(a.log_alpha["neuron"], c.log_alpha["neuron"])


def test_history_has_one_row_per_step_with_named_terms(problem):
    cfg = tnp.PruneConfig(steps=20, progress=False, **NO_BUDGETS)
    result = tnp.NodePruner(problem.model, cfg).fit(problem.task)
    h = result.history
    assert list(h.step) == list(range(20))
    for col in ("loss", "faithfulness", "sparsity_head", "kept_neuron", "lambda_attn"):
        assert col in h
    # the default sparsity term prices each open node: mean expected L0 x units x node price
    units = problem.circuit.shape.units("head")
    price = tnp.pruner.DEFAULT_NODE_COST["head"] * units[0] * units[1]
    assert h.sparsity_head.iloc[0] == pytest.approx(price * h.expected_l0_head.iloc[0], rel=1e-5)
    assert (h.faithfulness >= 0).all(), "a KL divergence is never negative"
    assert h.kept_neuron.iloc[-1] < h.kept_neuron.iloc[0]


def test_non_finite_loss_raises_a_clear_error(problem):
    cfg = tnp.PruneConfig(steps=5, objective=lambda c, f, t: c.sum() * float("nan"), progress=False)
    with pytest.raises(FloatingPointError, match="step 0.*float32.*lr"):
        tnp.NodePruner(problem.model, cfg).fit(problem.task)
    assert hook_count(problem.model) == 0


def test_answer_outside_vocabulary_is_refused_before_training(problem):
    task = problem.task
    bad = tnp.PromptTask.from_tokens(
        task.clean, task.corrupted, task.correct + 1000, task.incorrect
    )
    with pytest.raises(ValueError, match="outside the model's output vocabulary"):
        tnp.NodePruner(problem.model, FAST).fit(bad)


def test_granularity_the_model_lacks(flavour):
    if flavour == "bridge-llama":
        pytest.skip("a llama config cannot be attention-only")
    model = tiny_model(flavour, attn_only=True)
    with pytest.raises(ValueError, match="attention-only"):
        tnp.NodePruner(model, tnp.PruneConfig(granularities=("head", "neuron")))
    assert tnp.NodePruner(model).granularities == ("attn", "head")


def test_unknown_granularity_lists_the_choices(problem):
    with pytest.raises(ValueError, match="choose from attn, mlp, head, neuron, head_dim"):
        tnp.NodePruner(problem.model, tnp.PruneConfig(granularities=("layer",)))


def test_evaluate_full_is_one_empty_is_zero_planted_is_one(problem):
    model, task = problem.model, problem.task
    shape = tnp.ModelShape.from_model(model)
    full = tnp.evaluate(model, tnp.Circuit.full(shape), task)
    empty = tnp.evaluate(model, tnp.Circuit.empty(shape), task)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-6) and full.kl == pytest.approx(
        0, abs=1e-6
    )
    # the empty circuit's metric, computed independently: every block's output patched with
    # its value on the corrupted prompts, without the mixing hooks
    blocks = [hook_name(g, layer) for g in ("attn", "mlp") for layer in range(3)]
    corrupted = capture(model, task.corrupted, blocks)
    patch = [(n, lambda x, hook, n=n: corrupted[n]) for n in blocks]
    with torch.no_grad(), model.hooks(fwd_hooks=patch):
        patched = task.answer_logits(model(task.clean))
    assert empty.metric_empty == pytest.approx(task.score(patched).mean().item(), abs=1e-5)
    assert empty.kl > 0.1
    for ablation in ("corrupted", "mean"):
        planted = tnp.evaluate(model, problem.circuit, task, ablation=ablation)
        assert planted.kl == pytest.approx(0, abs=1e-5), ablation
    assert set(full.to_frame().columns) >= {"metric_full", "faithfulness", "kl"}


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_target_sparsity_is_met_by_the_lagrangian(problem, target):
    cfg = tnp.PruneConfig(
        steps=150, target_sparsity={"neuron": target, "head": 0.5}, warmup_steps=50,
        progress=False, **NO_BUDGETS,
    )  # fmt: skip
    h = tnp.NodePruner(problem.model, cfg).fit(problem.task).history
    assert h.expected_l0_neuron.iloc[-30:].mean() == pytest.approx(1 - target, abs=0.05)
    assert h.expected_l0_head.iloc[-30:].mean() == pytest.approx(0.5, abs=0.05)
    assert h.expected_l0_neuron.iloc[10] > 1 - target + 0.1, "the target is warmed up"


def test_circuit_of_another_shape_is_refused(problem):
    other = tnp.Circuit.full(tnp.ModelShape("x", 7, 4, 8, 32, 64))
    with pytest.raises(ValueError, match="n_layers: circuit has 7"):
        tnp.evaluate(problem.model, other, problem.task)


def test_answer_only_unembedding_matches_the_models_logits(problem):
    from tl_nodeprune.objectives import fast_path_matches, forward_answers

    model, task = problem.model, problem.task
    pos = torch.randint(0, task.clean.shape[1], (len(task),), generator=torch.Generator())
    with torch.no_grad():
        quick = forward_answers(model, task.clean, pos, fast=True)
        ref = model(task.clean)[torch.arange(len(task)), pos]
    assert torch.allclose(quick, ref, atol=1e-5)
    assert fast_path_matches(model, task)
    assert hook_count(model) == 0

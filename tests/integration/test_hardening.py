"""Issue 10: discovery on other ablations, objectives, granularities and architectures; the
history read in blocks; dtypes; and errors that need a model."""

import math
import warnings

import pytest
import torch
from torch import nn

import tl_nodeprune as tnp
from tl_nodeprune.evaluation import Evaluator
from tl_nodeprune.objectives import fast_path_matches, forward_answers, kl_divergence
from tl_nodeprune.planted import (
    add_distractors,
    available_flavours,
    output_weights,
    plant,
    planted_problem,
    tiny_model,
)
from tl_nodeprune.training import FewValidationPromptsWarning

from ..conftest import NO_BUDGETS, hook_count

pytestmark = pytest.mark.skipif(
    "bridge-native" not in available_flavours(), reason="needs TransformerBridge.boot_native"
)
GATED = ("attn", "mlp", "head", "neuron")


def _random_task(d_vocab: int, n: int = 32, seq: int = 8, seed: int = 0) -> tnp.PromptTask:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, d_vocab, (2, n, seq), generator=gen)
    correct = torch.randint(0, d_vocab, (n,), generator=gen)
    incorrect = (correct + 1 + torch.randint(0, d_vocab - 1, (n,), generator=gen)) % d_vocab
    return tnp.PromptTask.from_tokens(toks[0], toks[1], correct, incorrect)


def _assert_same_nodes(found: tnp.Circuit, truth: tnp.Circuit, granularities=GATED) -> None:
    for g in granularities:
        if not truth.shape.has(g):
            continue
        extra = (found.kept(g) & ~truth.kept(g)).nonzero().tolist()
        missing = (truth.kept(g) & ~found.kept(g)).nonzero().tolist()
        assert not extra and not missing, f"{g}: extra {extra}, missing {missing}"


@pytest.mark.parametrize(("ablation", "objective"), [("mean", "kl"), ("zero", "logit_diff")])
def test_fit_recovers_the_planted_circuit_with_other_ablations_and_objectives(ablation, objective):
    problem = planted_problem("bridge-native", seed=0, n_prompts=32)
    cfg = tnp.PruneConfig(steps=100, ablation=ablation, objective=objective, progress=False)
    result = tnp.NodePruner(problem.model, cfg).fit(problem.task)
    _assert_same_nodes(result.circuit, problem.circuit)
    assert result.circuit.meta["ablation"] == ablation


def test_head_dim_gates_keep_exactly_the_planted_heads_dimensions():
    problem = planted_problem("bridge-native", seed=0, n_prompts=32)
    # The budgets are off: this tests head_dim gating. With them on, the selection along the gate
    # order drops value dimension d0 of planted head a2.h1 (15 of 16 dims kept): the circuit
    # without it still meets both budgets on validation (f 0.999, KL 0.0065 nats).
    cfg = tnp.PruneConfig(
        steps=100, granularities=(*GATED, "head_dim"), progress=False, **NO_BUDGETS
    )
    found = tnp.NodePruner(problem.model, cfg).fit(problem.task).circuit
    dims = found.kept("head_dim")  # (layer, head, d_head)
    planted = problem.circuit.kept("head")
    assert torch.equal(dims.any(-1), planted), "dimensions kept only inside planted heads"
    assert dims[planted].all(), "every value dimension of a planted head writes to the output"


def test_fit_on_an_attention_only_model_recovers_its_planted_heads():
    model = tiny_model("bridge-native", n_layers=2, attn_only=True, seed=3)
    planted = [(0, 1), (1, 2)]
    with torch.no_grad():
        for layer in range(2):
            w, axis = output_weights(model, layer, "attn")  # (d_model, head * d_head)
            keep = torch.tensor([(layer, h) in planted for h in range(4)], dtype=w.dtype)
            w.mul_(keep.repeat_interleave(w.shape[axis] // 4))
    # The budgets are off: this tests an attention-only model. On the random task the full model
    # does not beat the empty circuit in its metric, so the faithfulness band refuses it.
    cfg = tnp.PruneConfig(steps=100, progress=False, **NO_BUDGETS)
    found = tnp.NodePruner(model, cfg).fit(_random_task(model.cfg.d_vocab)).circuit
    assert found.granularities == ("attn", "head")
    assert found.heads == planted
    assert found.fraction("head") == pytest.approx(2 / 8)


def _parallel_bridge():
    """A tiny GPT-NeoX with parallel attention and MLP, wrapped by the bridge offline."""
    transformers = pytest.importorskip("transformers")
    builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")
    hf = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=32, use_parallel_residual=True,
        rotary_pct=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = builder.build_bridge_from_module(
        transformers.GPTNeoXForCausalLM(hf), "GPTNeoXForCausalLM", hf_config=hf,
        model_name="tiny-neox-parallel",
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / 32**0.5)
        model.unembed.original_component.weight.mul_(4.0)
    return model


def test_fit_on_a_parallel_attention_and_mlp_model_recovers_its_planted_circuit():
    model = _parallel_bridge()
    task = _random_task(64)
    seen = {}
    with torch.no_grad():  # parallel: zeroing layer 0's attention leaves its MLP input alone
        for zero in (False, True):
            hooks = [("blocks.0.hook_attn_out", lambda x, hook: x * 0)] if zero else []
            hooks.append(("blocks.0.mlp.hook_post", lambda x, hook, z=zero: seen.update({z: x})))
            with model.hooks(fwd_hooks=hooks):
                model(task.clean)
    assert torch.equal(seen[False], seen[True]), "attention and MLP must run in parallel"
    truth = plant(model, [(0, 1), (1, 2)], [(0, 3), (0, 7), (1, 5)], task)
    found = tnp.NodePruner(model, tnp.PruneConfig(steps=100, progress=False)).fit(task).circuit
    _assert_same_nodes(found, truth)


def test_distractor_heads_with_small_effects_are_pruned():
    """Precision: two unplanted heads per layer write to the output (a change of norm 0.01 each,
    planted units 1), so ablating them moves the KL, but by less than a head's price."""
    problem = planted_problem("bridge-native", seed=0, n_prompts=32)
    problem = add_distractors(problem, per_layer=2, strength=0.01, kinds=("head",))
    assert len(problem.circuit.meta["distractors"]) == 6
    ablate_all_but_truth = tnp.evaluate(problem.model, problem.circuit, problem.task)
    assert ablate_all_but_truth.kl > 1e-4, "the distractors must change the output"
    cfg = tnp.PruneConfig(steps=150, progress=False)
    found = tnp.NodePruner(problem.model, cfg).fit(problem.task)
    _assert_same_nodes(found.circuit, problem.circuit)


@pytest.mark.slow  # 300 steps on 64 prompts: about a minute on two cores
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {**NO_BUDGETS, "gate_noise": "batch"},
            id="compact",
            marks=pytest.mark.xfail(
                strict=True,
                reason="measured (issue 10): penalties alone keep distractor neuron m0.n28 (norm "
                "0.003, alone about 30x below the neuron price in KL) in the circuit",
            ),
        ),
    ],
)
def test_distractor_neurons_with_small_effects_are_pruned(settings):
    # The defaults' budgets select the smallest circuit within them on validation prompts,
    # which leaves the weak distractor out; the compact setting keeps it.
    problem = planted_problem("bridge-native", seed=0)
    problem = add_distractors(problem, per_layer=2, strength=0.003)
    config = tnp.PruneConfig(progress=False, **settings)
    found = tnp.NodePruner(problem.model, config).fit(problem.task)
    _assert_same_nodes(found.circuit, problem.circuit)


def test_target_sparsity_is_met_by_the_kept_fraction_on_an_unplanted_model():
    """Every unit of a random model matters a little, so gates must split to meet the target.

    (On a planted model the kept fraction is the planted one whatever the target: units that
    do nothing sit at expected L0 = target with closed deterministic gates.)
    """
    model = tiny_model("bridge-native", n_layers=3)
    cfg = tnp.PruneConfig(
        steps=150, target_sparsity={"neuron": 0.8}, warmup_steps=50, progress=False, **NO_BUDGETS
    )
    circuit = tnp.NodePruner(model, cfg).fit(_random_task(64, n=16)).circuit
    assert circuit.own_kept("neuron").float().mean().item() == pytest.approx(0.2, abs=0.1)


def test_history_read_in_blocks_is_the_same_whatever_the_interval():
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)

    def fit(log_every):
        cfg = tnp.PruneConfig(
            steps=12, warmup_steps=4, log_every=log_every, progress=False, **NO_BUDGETS
        )
        return tnp.NodePruner(problem.model, cfg).fit(problem.task)

    every, blocks = fit(1), fit(5)  # 5 does not divide 12: the last block is read at the end
    assert every.history.equals(blocks.history)
    h = blocks.history
    assert list(h.step) == list(range(12))
    circuit = blocks.circuit
    for g in GATED:  # the last row was taken after the last update: it is the circuit's
        assert h[f"kept_{g}"].iloc[-1] == pytest.approx(circuit.own_kept(g).float().mean().item())
    penalty = blocks.config.penalty_for("head", circuit.shape)
    assert h.lambda_head.iloc[0] == pytest.approx(penalty / 4)
    assert h.lambda_head[3:].tolist() == pytest.approx([penalty] * 9)


def test_a_loss_that_turns_non_finite_later_names_its_step():
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    calls = []

    def objective(circuit, full, task):
        calls.append(1)
        loss = kl_divergence(full, circuit)
        return loss * math.inf if len(calls) == 7 else loss

    cfg = tnp.PruneConfig(steps=20, objective=objective, log_every=10, progress=False)
    with pytest.raises(FloatingPointError, match="at step 6 .*float32"):
        tnp.NodePruner(problem.model, cfg).fit(problem.task)
    assert len(calls) == 10, "the check rides on the read at the end of the interval"
    assert hook_count(problem.model) == 0


def test_bfloat16_fast_path_is_accepted_and_kl_is_computed_in_float32():
    problem = planted_problem("bridge-native", seed=0, n_prompts=8)
    model, task = problem.model.to(torch.bfloat16), problem.task
    with torch.no_grad():
        quick = forward_answers(model, task.clean, task.answer_pos, fast=True)
        slow = forward_answers(model, task.clean, task.answer_pos, fast=False)
    assert quick.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast_path_matches(model, task)
    kl = kl_divergence(slow, quick)
    reference = kl_divergence(slow.double(), quick.double())
    assert kl.dtype == torch.float32 and kl.item() == pytest.approx(reference.item(), abs=1e-6)


def test_falling_back_to_the_full_unembedding_warns(monkeypatch):
    problem = planted_problem("bridge-native", seed=0, n_prompts=8)
    monkeypatch.setattr(problem.model, "ln_final", nn.Identity())  # the fast path skips the norm
    with pytest.warns(UserWarning, match="does not reproduce.*differ by up to.*full unembedding"):
        assert not fast_path_matches(problem.model, problem.task)


def test_a_fast_evaluator_scores_as_evaluate_and_falls_back_where_the_fast_path_differs(
    monkeypatch,
):
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    model, task, circuit = problem.model, problem.task, problem.circuit
    exact = tnp.evaluate(model, circuit, task)
    fast = Evaluator(model, task, fast=True)
    assert fast.fast
    got = fast(circuit)
    assert got.faithfulness == pytest.approx(exact.faithfulness, abs=1e-5)
    assert got.kl == pytest.approx(exact.kl, abs=1e-5)
    monkeypatch.setattr(model, "ln_final", nn.Identity())  # the fast path now skips the norm
    with pytest.warns(UserWarning, match="does not reproduce"):
        fallback = Evaluator(model, task, fast=True)
    assert not fallback.fast
    again = fallback(circuit)
    exact = tnp.evaluate(model, circuit, task)
    assert (again.faithfulness, again.kl) == (exact.faithfulness, exact.kl)


def test_penalty_for_a_granularity_an_attention_only_model_lacks():
    model = tiny_model("bridge-native", attn_only=True)
    with pytest.raises(ValueError, match="penalty names 'neuron'.*granularities: attn, head"):
        tnp.NodePruner(model, tnp.PruneConfig(penalty={"neuron": 1.0}))


def test_evaluate_refuses_another_d_model_and_nan_gates():
    problem = planted_problem("bridge-native", seed=0, n_prompts=8)
    shape = problem.circuit.shape
    wider = tnp.ModelShape(**{**shape.to_dict(), "d_model": shape.d_model * 2})
    with pytest.raises(ValueError, match="d_model: circuit has 64, model has 32"):
        tnp.evaluate(problem.model, tnp.Circuit.full(wider), problem.task)
    gates = {g: t.clone() for g, t in problem.circuit.gates.items()}
    gates["head"][0, 0] = math.nan
    with pytest.raises(ValueError, match="'head' gates hold NaN"):
        tnp.evaluate(problem.model, tnp.Circuit(shape, gates), problem.task)


def test_too_few_prompts_to_hold_out_name_the_settings_that_hold_them_out_and_the_way_out():
    problem = planted_problem("bridge-native", seed=0, n_prompts=64)
    model, two = problem.model, problem.task.subset(range(2))
    hooks = hook_count(model)
    with pytest.raises(ValueError, match=r"for target_kl, target_faithfulness: .*"
                       r"PruneConfig\(target_kl=None, target_faithfulness=None\)"):  # fmt: skip
        tnp.NodePruner(model, tnp.PruneConfig(steps=2, progress=False)).fit(two)
    assert hook_count(model) == hooks
    # certify alone holds prompts out too: the message names only it
    certify_only = tnp.PruneConfig(steps=2, progress=False, certify=True, **NO_BUDGETS)
    with pytest.raises(ValueError, match=r"for certify: .*PruneConfig\(certify=False\)"):
        tnp.NodePruner(model, certify_only).fit(two)
    # the way out the message gives trains on both prompts
    result = tnp.NodePruner(model, tnp.PruneConfig(steps=2, progress=False, **NO_BUDGETS)).fit(two)
    assert result.selection is None and len(result.history) == 2


@pytest.mark.parametrize(("n_prompts", "warned"), [(16, True), (64, False)])
def test_a_budget_checked_on_few_validation_prompts_warns(n_prompts, warned):
    problem = planted_problem("bridge-native", seed=0, n_prompts=64)
    task = problem.task.subset(range(n_prompts))
    config = tnp.PruneConfig(steps=2, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tnp.NodePruner(problem.model, config).fit(task)
    few = [w for w in caught if issubclass(w.category, FewValidationPromptsWarning)]
    assert len(few) == warned
    if warned:
        assert "leaves 4 validation prompt(s)" in str(few[0].message)

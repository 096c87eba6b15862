"""Hand-compiled models (tl_nodeprune.compiled) compute what they claim; their circuit is the truth.

Per model and flavour: the truth circuit reproduces the full model, the full model is right on
clean and corrupted prompts, every needed node costs well above its price when removed alone,
and in `and_pair` neither head suffices alone.
"""

from functools import cache

import pytest
import torch

from tl_nodeprune.circuit import Circuit
from tl_nodeprune.compiled import (
    COMPILED,
    FLAVOURS,
    GRANULARITIES,
    SOFT_LOGIT_SCALE,
    compiled_problem,
    differences,
)
from tl_nodeprune.evaluation import Evaluator, circuit_logits
from tl_nodeprune.granularities import SPECS
from tl_nodeprune.planted import available_flavours

BUILT = [f for f in FLAVOURS if f in available_flavours()]
CASES = [(name, f) for f in BUILT for name in COMPILED]
HEAD_PRICE = SPECS["head"].price
# A needed node's lone removal must cost at least this (6.7 head prices, the low end of the
# issue's 7-12x): a wrong answer costs ~0.42 at the soft logit scale (0.275 for induction_soft's
# previous-token head, whose removal blurs the match instead of moving it), ~10 at the sharp one.
KL_FLOOR = 0.2
assert KL_FLOOR > 6 * HEAD_PRICE


@cache
def _problem(name: str, flavour: str):
    return compiled_problem(name, flavour, seed=0, n_prompts=32)


@cache
def _evaluator(name: str, flavour: str) -> Evaluator:
    p = _problem(name, flavour)
    return Evaluator(p.model, p.task, granularities=GRANULARITIES)


def _without(truth: Circuit, node: tuple[str, tuple[int, ...]]) -> Circuit:
    gates = {g: t.clone() for g, t in truth.gates.items()}
    gates[node[0]][node[1]] = 0.0
    return Circuit(truth.shape, gates)


@pytest.mark.parametrize(("name", "flavour"), CASES)
def test_truth_circuit_reproduces_the_full_model(name, flavour):
    ev = _evaluator(name, flavour)(_problem(name, flavour).circuit)
    assert ev.kl < 1e-3
    assert ev.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert ev.kl_empty > KL_FLOOR  # the empty circuit is far from the model


@pytest.mark.parametrize(("name", "flavour"), CASES)
def test_full_model_answers_clean_and_corrupted_prompts(name, flavour):
    p = _problem(name, flavour)
    rows = torch.arange(len(p.task))
    with torch.no_grad():
        for tokens, answer in (
            (p.task.clean, p.task.correct),
            (p.task.corrupted, p.task.incorrect),
        ):
            logits = p.model(tokens)[rows, p.task.answer_pos]
            assert torch.equal(logits.argmax(-1), answer[:, 0])
    assert not torch.equal(p.task.clean, p.task.corrupted)


@pytest.mark.parametrize(("name", "flavour"), CASES)
def test_each_needed_node_costs_well_above_its_price(name, flavour):
    truth, evaluate = _problem(name, flavour).circuit, _evaluator(name, flavour)
    needed = [(g, tuple(i)) for g in GRANULARITIES for i in truth.kept(g).nonzero().tolist()]
    assert needed
    costs = {node: evaluate(_without(truth, node)).kl for node in needed}
    cheap = {node: round(kl, 3) for node, kl in costs.items() if kl < KL_FLOOR}
    assert not cheap, f"needed nodes whose removal costs less than {KL_FLOOR}: {cheap}"


@pytest.mark.parametrize("flavour", BUILT)
@pytest.mark.parametrize("name", ["and_pair", "and_pair_soft"])
def test_and_pair_heads_are_useless_alone(name, flavour):
    p, evaluate = _problem(name, flavour), _evaluator(name, flavour)
    heads = [tuple(i) for i in p.circuit.kept("head").nonzero().tolist()]
    assert len(heads) == 2
    for head in heads:
        alone = _without(p.circuit, ("head", head))  # the other head alone
        logits = circuit_logits(p.model, alone, p.task, evaluate.ablation)
        right = (logits.argmax(-1) == p.task.correct[:, 0]).float().mean().item()
        assert right < 0.2, f"one head of the AND pair alone still answers {right:.0%} right"


def test_compiled_shapes_match_the_brief():
    for name in ("copy", "chain", "and_pair", "deep", "induction"):
        truth = _problem(name, BUILT[0]).circuit
        assert 3 <= truth.shape.n_layers <= 6 and truth.shape.n_heads == 4
    deep = _problem("deep", BUILT[0]).circuit
    assert (deep.n_kept("head"), deep.n_kept("mlp")) == (4, 5)
    assert SOFT_LOGIT_SCALE < 2  # soft models must sit in the KL range, not at ~10


def test_differences_names_missed_and_extra_nodes():
    truth = _problem("chain", BUILT[0]).circuit
    gates = {g: t.clone() for g, t in truth.gates.items()}
    (layer, head), *_ = truth.kept("head").nonzero().tolist()
    gates["attn"][layer] = 0.0  # closing the block loses its head too
    gates["head"][3 - layer, 0] = gates["attn"][3 - layer] = 1.0  # and an unneeded head
    missed, extra = differences(truth, Circuit(truth.shape, gates))
    assert missed == [f"a{layer}", f"a{layer}.h{head}"]
    assert f"a{3 - layer}.h0" in extra


def test_llama_bridge_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="RMSNorm"):
        compiled_problem("copy", "bridge-llama")
    with pytest.raises(ValueError, match="choose from"):
        compiled_problem("nope")


@pytest.mark.skipif(len(BUILT) < 2, reason="needs both flavours (TransformerLens < 4)")
def test_flavours_compute_the_same_logits():
    hooked, bridge = (_problem("deep_soft", f) for f in BUILT[:2])
    with torch.no_grad():
        a, b = hooked.model(hooked.task.clean), bridge.model(bridge.task.clean)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

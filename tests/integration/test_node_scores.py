"""Every method's node scores over one node list, and faithfulness curves read from them."""

import functools

import pandas as pd
import pytest
import torch

from tl_nodeprune.curves import compare_methods, curve, curve_evaluator, keep_top
from tl_nodeprune.granularities import parse_node_name
from tl_nodeprune.node_scores import (
    METHODS,
    NodeList,
    attention_block_effects,
    attribution_scores,
    method_scores,
)
from tl_nodeprune.planted import add_distractors, planted_problem, tiny_model
from tl_nodeprune.tasks.base import PromptTask

from ..conftest import NO_BUDGETS, fails_cleanly

FAST = {"node_pruning": {"steps": 3}, "edge_pruning": {"steps": 3}}
LEVEL_GRANS = {"blocks_heads": ("head", "mlp"), "neurons": ("head", "neuron")}


def posed(problem) -> PromptTask:
    """The planted prompts with answers the model separates: its own top token on the clean
    prompt against its top token on the corrupted one (random answers make f erratic)."""
    task, model = problem.task, problem.model
    with torch.no_grad():
        clean, corrupted = model(task.clean)[:, -1], model(task.corrupted)[:, -1]
    good, bad = clean.argmax(-1), corrupted.argmax(-1)
    bad = torch.where(bad == good, clean.topk(2).indices[:, 1], bad)
    return PromptTask.from_tokens(task.clean, task.corrupted, good, bad, name="planted-top")


@functools.cache
def distracted(seed: int):
    """Planted model of `seed` with 2 weak distractor heads and neurons per layer (strength
    0.01: real effects, small enough that the planted circuit alone keeps f >= 0.99)."""
    problem = add_distractors(planted_problem("bridge-native", seed=seed), 2, strength=0.01)
    return problem, posed(problem)


@functools.cache
def pruning_scores(seed: int) -> pd.Series:
    """Node pruning's scores with the default budgets off: the test below is about the ranking
    its log_alpha gives (see there)."""
    problem, task = distracted(seed)
    return method_scores(problem.model, task, "node_pruning", **NO_BUDGETS)


@pytest.mark.parametrize("level", ["blocks_heads", "neurons"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_pruning_reaches_the_planted_faithfulness_at_the_planted_size(seed, level):
    # Measured f at the planted size (seeds 0-2): 0.996, 1.001, 1.000 (blocks and heads) and
    # 0.994, 1.002, 1.000 (heads and neurons); random orders of 5 seeds at most 0.61 and 0.30.
    # The scores come from a run with the default budgets off: this tests the ranking the
    # sparsity penalties give. With them on, their scale sits at 0 for 82-85% of the 300 steps
    # and a distractor neuron outranks a planted one at seeds 0 and 1 (f 0.957 and 0.901 at
    # the planted size), though the circuit those runs select holds every planted node.
    problem, task = distracted(seed)
    nodes = NodeList.from_model(problem.model)
    n = sum(problem.circuit.n_kept(g) for g in LEVEL_GRANS[level])
    total = len([x for g in LEVEL_GRANS[level] for x in nodes.names_of(g)])
    evaluator = curve_evaluator(problem.model, task, level)
    scores = pruning_scores(seed)
    ours = curve(problem.model, task, scores, [n / total], level, evaluator=evaluator)
    assert ours.n_nodes.tolist() == [n]
    assert ours.faithfulness[0] >= 0.99
    kept = keep_top(scores, nodes, n, level).nodes  # with the blocks of kept heads/neurons
    truth = problem.circuit.nodes
    expected = (
        truth if level == "neurons" else [x for x in truth if parse_node_name(x)[0] != "neuron"]
    )
    assert sorted(kept) == sorted(expected), "exactly the planted nodes, no distractor"
    for random_seed in range(5):
        chance = method_scores(problem.model, task, "random", seed=random_seed)
        theirs = curve(problem.model, task, chance, [n / total], level, evaluator=evaluator)
        assert theirs.faithfulness[0] < 0.99, f"random seed {random_seed} hit the circuit"


def test_every_method_scores_the_same_node_list(flavour):
    problem = planted_problem(flavour, seed=0, n_layers=2, n_prompts=16)
    model, task = problem.model, posed(problem)
    names = NodeList.from_model(model).names
    assert len(names) == 2 * (1 + 1 + 4 + 32) and names[:4] == ("a0", "a1", "m0", "m1")
    assert names[4] == "a0.h0" and names[-1] == "m1.n31"
    for method in METHODS:
        scores = method_scores(model, task, method, **FAST.get(method, {}))
        assert tuple(scores.index) == names, method
        assert scores.dtype == float and not scores.isna().any(), method
        assert scores.attrs["method"] == method and scores.attrs["seconds"] >= 0


def test_an_attention_only_model_has_no_mlp_nodes():
    model = tiny_model("bridge-native", n_layers=2, attn_only=True)
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 64, (2, 8, 6), generator=gen)
    task = PromptTask.from_tokens(clean, corrupted, torch.arange(8), torch.arange(8) + 1)
    expected = ("a0", "a1", *(f"a{layer}.h{h}" for layer in range(2) for h in range(4)))
    for method in ("eap", "activation_patching", "random"):
        assert tuple(method_scores(model, task, method).index) == expected


def test_block_attribution_is_the_sum_of_its_childrens():
    # attn_out = sum over heads of z_h W_O[h] (+ bias) and mlp_out = post W_out (+ bias) are
    # linear, so a block's first-order effect is exactly the sum of its heads' or neurons'
    problem = planted_problem("bridge-native", seed=1, n_layers=2, n_prompts=16)
    task = posed(problem)
    for ig_steps in (1, 3):
        scores = attribution_scores(problem.model, task, ig_steps=ig_steps)
        assert scores["head"].abs().max() > 0.1
        torch.testing.assert_close(scores["attn"], scores["head"].sum(1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores["mlp"], scores["neuron"].sum(1), atol=1e-4, rtol=1e-4)


def test_node_attribution_matches_transformer_lens_attribution_patching():
    ap = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    try:  # TransformerLens has no public way to bridge a model built in memory.
        from transformer_lens.model_bridge.sources._bridge_builder import (  # noqa: PLC2701
            build_bridge_from_module,
        )
    except ImportError:
        pytest.skip("this TransformerLens cannot bridge an in-memory model")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = build_bridge_from_module(GPT2LMHeadModel(cfg).eval(), "GPT2LMHeadModel",
                                     hf_config=cfg, model_name="tiny-gpt2").eval()  # fmt: skip
    clean, corrupted = torch.randint(0, 64, (2, 3, 6), generator=torch.Generator().manual_seed(1))
    task = PromptTask.from_tokens(clean, corrupted, [3, 3, 3], [5, 5, 5])
    result = ap.attribution_patch(
        model, clean, corrupted, lambda logits: logits[0, -1, 3] - logits[0, -1, 5],
        ap.EdgeAttributionConfig(granularity="node"),
    )  # fmt: skip
    theirs = {"head": torch.zeros(2, 4), "mlp": torch.zeros(2)}
    for node, score in result.node_scores.items():  # per position: sum them
        if node.kind == "attn_head_out":
            theirs["head"][node.layer, node.head] += score
        elif node.kind == "mlp_out":
            theirs["mlp"][node.layer] += score
    ours = attribution_scores(model, task, corrupted_gradient=True)
    assert theirs["head"].abs().max() > 0.01
    for g in ("head", "mlp"):
        torch.testing.assert_close(ours[g], theirs[g], atol=1e-4, rtol=1e-3)


def test_activation_patching_of_a_silent_attention_block_is_zero():
    # silent_layer 0 has no planted head (and no distractors): ablating it changes nothing
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    effects = attention_block_effects(problem.model, posed(problem))
    assert effects[0] == 0.0 and (effects[1:].abs() > 0.05).all()


def test_compare_methods_reads_every_method_off_one_table():
    problem, task = distracted(0)
    table = compare_methods(problem.model, task, ["node_pruning", "random"],
                            fractions=[i / 15 for i in range(16)])  # fmt: skip
    assert list(table.index) == ["node_pruning", "random"]
    assert table.loc["node_pruning", "n_f"] <= 5 < table.loc["random", "n_f"]
    assert table.attrs["at_size"] == table.loc["node_pruning", "n_f"]
    assert table.loc["node_pruning", "f_at_size"] >= 0.9 > table.loc["random", "f_at_size"]
    assert table.loc["node_pruning", "cpr"] > table.loc["random", "cpr"]
    assert table.loc["node_pruning", "cmd"] < table.loc["random", "cmd"]
    assert {"n_kl_0.3", "n_kl_0.1"} <= set(table.columns)
    assert table.loc["node_pruning", "n_kl_0.1"] <= 5
    curves = table.attrs["curves"]
    assert curves["random"].n_nodes.tolist() == list(range(16))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"] + ["curve"])
@pytest.mark.parametrize("fail_at", [1, 4])
def test_a_failing_method_leaves_no_hooks_and_restores_mode_and_flags(method, fail_at):
    problem = planted_problem("bridge-native", seed=0, n_layers=2, n_prompts=8)
    model, task = problem.model, posed(problem)
    scores = method_scores(model, task, "random") if method == "curve" else None

    def run():
        if method == "curve":
            return curve(model, task, scores, [0.5, 1.0])
        return method_scores(model, task, method, **FAST.get(method, {}))

    fails_cleanly(model, run, fail_at)

"""Block checkpointing changes memory, never results: same gate gradients, same circuits."""

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

import tl_nodeprune as tnp
from tl_nodeprune.ablation import capture, mixing_hooks, site_masks
from tl_nodeprune.checkpoint import activation_bytes, checkpointed_blocks, wrapped_blocks
from tl_nodeprune.gates import GateSet, HardConcrete
from tl_nodeprune.objectives import forward_answers, kl_divergence
from tl_nodeprune.planted import planted_problem, tiny_model
from tl_nodeprune.sites import ModelShape, frozen

from ..conftest import hook_count


def _setup(flavour):
    model = tiny_model(flavour, n_layers=2)
    shape = ModelShape.from_model(model)
    gates = GateSet(shape, shape.resolve(None), 1.0, HardConcrete(), "cpu")
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (3, 10), generator=gen)
    corrupted = torch.randint(0, 64, (3, 10), generator=gen)
    return model, shape, gates, tokens, corrupted, torch.tensor([9, 5, 7])


def _counting(hooks, calls):
    """The same hooks, each counting its calls (forward and recomputation alike)."""

    def wrap(name, fn):
        def hook(x, hook):
            calls[name] = calls.get(name, 0) + 1
            return fn(x, hook)

        return hook

    return [(name, wrap(name, fn)) for name, fn in hooks]


def _gate_grads(flavour, count, fast=True):
    """Gradient into every gate's log_alpha for one noisy KL step, and the hook calls.

    `count` blocks are checkpointed (None: all of them).
    """
    model, shape, gates, tokens, corrupted, pos = _setup(flavour)
    calls: dict[str, int] = {}
    with frozen(model):
        masks = site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
        ablated = capture(model, corrupted, list(masks))
        full = forward_answers(model, tokens, pos, fast=fast).detach()
        hooks = _counting(mixing_hooks(masks, ablated), calls)
        with model.hooks(fwd_hooks=hooks), checkpointed_blocks(model, count):
            loss = kl_divergence(full, forward_answers(model, tokens, pos, fast=fast))
            loss.backward()
    return {g: p.grad.clone() for g, p in gates.log_alpha.items()}, calls


@pytest.mark.parametrize("fast", [True, False], ids=["answer-positions", "full-logits"])
def test_gate_gradients_are_the_same_with_checkpointing(flavour, fast):
    plain, plain_calls = _gate_grads(flavour, 0, fast)
    ckpt, ckpt_calls = _gate_grads(flavour, None, fast)
    for g in plain:
        assert plain[g].abs().max() > 0, f"{g}: no gradient at all"
        torch.testing.assert_close(ckpt[g], plain[g], rtol=1e-5, atol=1e-6)
    # Checkpointing really happened: every gated hook ran again during backward.
    assert set(plain_calls.values()) == {1}
    assert set(ckpt_calls.values()) == {2}


def test_checkpointing_only_the_first_block_gives_the_same_gradients(flavour):
    plain, _ = _gate_grads(flavour, 0)
    partial, calls = _gate_grads(flavour, 1)
    for g in plain:
        torch.testing.assert_close(partial[g], plain[g], rtol=1e-5, atol=1e-6)
    assert {n: c for n, c in calls.items() if n.startswith("blocks.0.")} == {
        n: 2 for n in calls if n.startswith("blocks.0.")
    }
    assert {c for n, c in calls.items() if n.startswith("blocks.1.")} == {1}


def test_checkpointing_keeps_far_fewer_activations_for_backward(flavour):
    """Bytes saved for backward outside the checkpointed blocks, with and without."""
    saved = {}
    for checkpoint in (False, True):
        model, shape, gates, tokens, corrupted, pos = _setup(flavour)
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with frozen(model):
            masks = site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
            hooks = mixing_hooks(masks, capture(model, corrupted, list(masks)))
            with (
                model.hooks(fwd_hooks=hooks),
                checkpointed_blocks(model, None if checkpoint else 0),
            ):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = forward_answers(model, tokens, pos)
                out.sum().backward()
        saved[checkpoint] = total[0]
    assert saved[True] < saved[False] / 3, saved


def test_activation_estimate_is_close_to_what_backward_keeps(flavour):
    """'auto' decides on `activation_bytes`: it must track the bytes really saved for backward."""
    model, shape, gates, tokens, corrupted, pos = _setup(flavour)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # frozen weights are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with frozen(model):
        masks = site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
        hooks = mixing_hooks(masks, capture(model, corrupted, list(masks)))
        with model.hooks(fwd_hooks=hooks):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward_answers(model, tokens, pos)
    ratio = sum(saved.values()) / activation_bytes(shape, *tokens.shape)
    assert 0.5 < ratio < 1.5, ratio


def test_backward_outside_the_hooks_context_fails_loudly(flavour):
    """The pitfall the training loop avoids by owning forward and backward in one context."""
    model, shape, gates, tokens, corrupted, pos = _setup(flavour)
    with frozen(model):
        masks = site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
        hooks = mixing_hooks(masks, capture(model, corrupted, list(masks)))
        with model.hooks(fwd_hooks=hooks), checkpointed_blocks(model):
            loss = forward_answers(model, tokens, pos).logsumexp(-1).sum()
        with pytest.raises(CheckpointError):
            loss.backward()
    assert hook_count(model) == 0 and wrapped_blocks(model) == 0


def test_blocks_are_restored_after_an_exception_inside_a_block(flavour):
    model, shape, gates, tokens, corrupted, pos = _setup(flavour)
    reference = model(tokens).detach()

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", boom)]):
            with checkpointed_blocks(model):
                assert wrapped_blocks(model) == model.cfg.n_layers
                model(tokens).sum().backward()
    assert hook_count(model) == 0 and wrapped_blocks(model) == 0
    torch.testing.assert_close(model(tokens), reference, rtol=0, atol=0)


def test_pruner_restores_the_model_after_success_and_after_an_exception(flavour):
    problem = planted_problem(flavour, n_layers=2, n_prompts=8)
    config = tnp.PruneConfig(steps=2, batch_size=4, progress=False, checkpoint=True)
    tnp.NodePruner(problem.model, config).fit(problem.task)
    assert hook_count(problem.model) == 0 and wrapped_blocks(problem.model) == 0

    def failing(circuit, full, task):
        raise ValueError("objective failed")

    config = tnp.PruneConfig(steps=2, progress=False, checkpoint=True, objective=failing)
    with pytest.raises(ValueError, match="objective failed"):
        tnp.NodePruner(problem.model, config).fit(problem.task)
    assert hook_count(problem.model) == 0 and wrapped_blocks(problem.model) == 0


def test_checkpointed_discovery_finds_the_same_planted_circuit(flavour):
    """Same trajectory, so the same circuit (100 steps: already pruning, cheap to run twice)."""
    problem = planted_problem(flavour, seed=0)
    results = {
        mode: tnp.NodePruner(
            problem.model, tnp.PruneConfig(steps=100, progress=False, checkpoint=mode)
        ).fit(problem.task)
        for mode in (False, True)
    }
    found = results[True].circuit
    assert found.nodes == results[False].circuit.nodes
    units = sum(la.numel() for la in results[True].log_alpha.values())
    assert 0 < len(found.nodes) < units / 2, (len(found.nodes), units)
    for g, la in results[False].log_alpha.items():
        torch.testing.assert_close(results[True].log_alpha[g], la, rtol=1e-3, atol=1e-3)


def test_capture_stops_at_the_last_requested_hook(flavour):
    """Caching ablated values never runs later blocks nor the full-vocabulary unembedding."""
    model, shape, gates, tokens, corrupted, pos = _setup(flavour)
    later = []
    names = ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: later.append(1))]):
        got = capture(model, tokens, names)
    assert later == [] and hook_count(model) == 0
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for n in names:
        torch.testing.assert_close(got[n], cache[n])

"""Ablated values: the batched cache equals one capture, and lazy values equal eager ones."""

import torch

import tl_nodeprune as tnp
from tl_nodeprune.ablation import Ablation, capture, mixing_hooks, site_masks
from tl_nodeprune.checkpoint import checkpointed_blocks
from tl_nodeprune.gates import GateSet
from tl_nodeprune.objectives import forward_answers
from tl_nodeprune.planted import planted_problem


def _masks(model):
    shape = tnp.ModelShape.from_model(model)
    gates = GateSet(shape, shape.available(), init_log_alpha=0.0)
    return site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))


def test_cache_built_batch_by_batch_equals_one_capture(flavour):
    problem = planted_problem(flavour, seed=1, n_prompts=7)
    model, task = problem.model, problem.task
    names = list(_masks(model))
    whole = capture(model, task.corrupted, names)
    # 7 prompts in batches of 3: slots 0-2, 3-5 and a short last batch 6
    cached = Ablation(model, task, names, "corrupted", batch_size=3).values(torch.arange(7), 8)
    for name in names:  # equal up to the rounding of a different batch size, not slot order
        torch.testing.assert_close(cached[name], whole[name][:, :8], rtol=1e-5, atol=1e-6)


def test_lazy_values_give_the_eager_logits_and_gradients(flavour):
    problem = planted_problem(flavour, seed=2, n_prompts=9)
    model, task = problem.model, problem.task
    masks = {n: m.detach().requires_grad_(True) for n, m in _masks(model).items()}
    ablation = Ablation(model, task, list(masks), "corrupted", batch_size=4)
    idx, seq = torch.tensor([1, 4, 8]), task.clean.shape[1] - 1
    lazy = ablation.lazy_values(idx, seq)
    assert all(callable(v) for v in lazy.values())
    tokens, pos = task.clean[idx, :seq], torch.full((3,), seq - 1)
    runs = []
    for values, checkpoint in ((ablation.values(idx, seq), 0), (lazy, None)):
        # lazy values under checkpointing: the hooks index the cache again when blocks rerun
        with model.hooks(fwd_hooks=mixing_hooks(masks, values)), checkpointed_blocks(
            model, checkpoint
        ):
            logits = forward_answers(model, tokens, pos)
            grads = torch.autograd.grad(logits.logsumexp(-1).sum(), list(masks.values()))
        runs.append((logits.detach(), grads))
    (eager_logits, eager_grads), (lazy_logits, lazy_grads) = runs
    torch.testing.assert_close(lazy_logits, eager_logits)
    for a, b in zip(lazy_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in eager_grads)  # the comparison is not of zeros


def test_cache_stays_under_half_the_free_memory(monkeypatch, flavour):
    problem = planted_problem(flavour, seed=3, n_prompts=6)
    model, task = problem.model, problem.task
    names = list(_masks(model))
    size = Ablation(model, task, names, "corrupted").cache_size()
    # room for the cache twice over: cached; less than that free: recomputed per batch, with
    # the same values, however large cache_bytes is
    monkeypatch.setattr(tnp.ablation, "free_bytes", lambda device: 2 * size)
    roomy = Ablation(model, task, names, "corrupted", cache_bytes=2**40)
    monkeypatch.setattr(tnp.ablation, "free_bytes", lambda device: 2 * size - 2)
    tight = Ablation(model, task, names, "corrupted", cache_bytes=2**40)
    assert roomy.cached and not tight.cached
    idx, seq = torch.tensor([0, 2, 5]), task.clean.shape[1]
    recomputed = tight.values(idx, seq)
    for name, value in roomy.values(idx, seq).items():
        torch.testing.assert_close(recomputed[name], value, rtol=1e-5, atol=1e-6)


def test_per_example_gates_gate_each_prompt_by_its_own_row(flavour):
    """Row 0 all open, row 1 all closed, row 2 a batch-shared draw: each prompt's logits are
    its clean run, its run with every node ablated and the shared draw's run."""
    problem = planted_problem(flavour, seed=3, n_prompts=3)
    model, task = problem.model, problem.task
    shape = tnp.ModelShape.from_model(model)
    grans = shape.available()
    shared = GateSet(shape, grans, init_log_alpha=0.0).sample(torch.Generator().manual_seed(1))
    rows = {g: torch.stack([torch.ones_like(t), torch.zeros_like(t), t]) for g, t in
            shared.items()}  # fmt: skip
    names = list(site_masks(shape, shared))
    idx, seq = torch.arange(3), task.clean.shape[1]
    values = Ablation(model, task, names, "corrupted", batch_size=3).values(idx, seq)
    pos = task.answer_pos

    def logits(masks, tokens=task.clean):
        with model.hooks(fwd_hooks=mixing_hooks(masks, values)):
            return forward_answers(model, tokens, pos)

    per_example = logits(site_masks(shape, rows, per_example=True))
    torch.testing.assert_close(per_example[0], forward_answers(model, task.clean, pos)[0])
    closed = {g: torch.zeros_like(t) for g, t in shared.items()}
    torch.testing.assert_close(per_example[1], logits(site_masks(shape, closed))[1])
    torch.testing.assert_close(per_example[2], logits(site_masks(shape, shared))[2])
    for a, b in ((0, 1), (0, 2), (1, 2)):  # three different gatings, three different outputs
        assert not torch.allclose(per_example[a], per_example[b], atol=1e-3)

"""Shared fixtures: every model flavour the installed TransformerLens can build."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformer_lens.hook_points import HookPoint

from tl_nodeprune.planted import available_flavours

FLAVOURS = available_flavours()
# The default budgets (target_kl, target_faithfulness) off: tests of another mechanism pass this,
# so they keep testing what they name rather than the budgets' selection.
NO_BUDGETS = {"target_kl": None, "target_faithfulness": None}


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


def hook_count(model) -> int:
    """Forward and backward hooks attached anywhere in `model`."""
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks)
        for m in model.modules()
        if isinstance(m, HookPoint)
    )


def fails_cleanly(model, run: Callable[[], object], fail_at: int) -> None:
    """Run `run` with a failure injected at the `fail_at`-th call of block 1, and check that it
    raises and leaves no hooks, the model in train mode and every requires_grad flag as it was.

    The model is put in train mode with its embedding frozen first, so that a method which
    forgets to restore either is caught.
    """
    model.train()
    model.embed.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    calls = []

    def explode(module, args):
        calls.append(1)
        if len(calls) >= fail_at:
            raise RuntimeError("injected failure")

    handle = model.blocks[1].register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run()
    finally:
        handle.remove()
    assert hook_count(model) == 0
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags

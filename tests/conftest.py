"""Shared fixtures: every model flavour the installed TransformerLens can build."""

from __future__ import annotations

import pytest
from transformer_lens.hook_points import HookPoint

from tl_nodeprune.planted import available_flavours

FLAVOURS = available_flavours()


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

"""Per-block activation checkpointing: keep each block's input, recompute its insides in backward.

Most of a pruning step's memory is the model's own activations saved for backward. Under
`checkpointed_blocks`, every transformer block runs through
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: its forward keeps only what it
was called with, and backward runs the block again to get the rest. The recomputation calls the
block's hook points again, so backward must run while the same `model.hooks(...)` are attached:
the gates, ablated values and random draws (gates are sampled before the forward) are then the
same in both passes. Outside the hooks, the recomputed block saves fewer tensors than the first
pass did and torch raises `CheckpointError`; `NodePruner` therefore runs forward and backward in
one hooks context.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .granularities import spec
from .sites import ModelShape

CheckpointMode = Union[bool, Literal["auto"]]  # noqa: UP007 (runtime alias)


def check_checkpoint(mode: object, budget_bytes: object) -> None:
    """Raise a ValueError naming the field when a checkpoint setting is invalid."""
    if mode not in (True, False, "auto") or not isinstance(mode, (bool, str)):
        raise ValueError(f"PruneConfig.checkpoint must be False, True or 'auto', got {mode!r}.")
    if not (isinstance(budget_bytes, int) and budget_bytes > 0):
        raise ValueError(
            f"PruneConfig.checkpoint_budget_bytes must be a positive int, got {budget_bytes!r}."
        )


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    element_size: int = 4,
    granularities: Iterable[str] | None = None,
) -> int:
    """Estimated bytes a forward pass keeps for backward without checkpointing.

    Per layer and token: about 6 residual-width tensors (two layer norms' inputs and outputs
    and the residual sums), q, k, v and z (4 x heads x d_head), attention scores and pattern
    (2 x heads x seq), 2 x d_mlp for the pre-activation and the activation, and one gated
    copy of the activation at each hook `granularities` gate (default: every default one the
    model has, which adds both block outputs, z and the MLP activation). On a random
    GPT-2-small-shaped bridge at 8x64 with all four granularities gated it gives 486 MiB,
    where autograd kept 326 MiB besides weights and the ablated cache (`bench/checkpointing.py
    --saved 8,64`) and a whole step's peak RSS rose by 0.98 GiB (docs/lab/checkpointing.md):
    between the two, so 'auto' errs towards checkpointing.
    """
    d_model = shape.d_model or shape.n_heads * shape.d_head
    gated = {
        spec(g).hook: math.prod(spec(g).activation(replace(shape, d_model=d_model)))
        for g in shape.resolve(granularities)
    }  # one gated copy per hook, whatever number of granularities share it
    per_token = (
        6 * d_model
        + 4 * shape.n_heads * shape.d_head
        + 2 * shape.n_heads * seq
        + 2 * shape.d_mlp
        + sum(gated.values())
    )
    return int(shape.n_layers * batch * seq * per_token * element_size)


def blocks_to_checkpoint(
    mode: CheckpointMode,
    budget_bytes: int,
    shape: ModelShape,
    batch: int,
    seq: int,
    element_size: int = 4,
    granularities: Iterable[str] | None = None,
) -> int:
    """How many blocks to checkpoint in a step: all, none, or under 'auto' the fewest that fit.

    Each checkpointed block trades its activations for its input (one residual-width tensor)
    and one extra forward in backward, so 'auto' pays recomputation only where the estimate
    would exceed `budget_bytes`; when no number fits, it checkpoints every block.
    """
    if mode != "auto":
        return shape.n_layers if mode else 0
    per_layer = activation_bytes(shape, batch, seq, element_size, granularities) / shape.n_layers
    block_input = batch * seq * (shape.d_model or shape.n_heads * shape.d_head) * element_size
    for k in range(shape.n_layers + 1):
        # k blocks keep only their inputs; backward recomputes one of them at a time.
        kept = (shape.n_layers - k) * per_layer + k * block_input + (per_layer if k else 0)
        if kept <= budget_bytes:
            return k
    return shape.n_layers


def model_blocks(model: Any) -> list[nn.Module]:
    """The transformer blocks of a HookedTransformer or a TransformerBridge, in order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`; cannot checkpoint it.")
    return list(blocks)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` under non-reentrant checkpointing, or plain when no gradient is recorded."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def checkpointed_blocks(model: Any, count: int | None = None) -> Iterator[None]:
    """Checkpoint the first `count` blocks of `model` (all by default) inside the context.

    Each such block gets an instance-level `forward` that calls the class's forward through
    `checkpoint`; leaving the context (normally or by an exception) deletes it again. Run the
    backward pass inside both this context and the `model.hooks(...)` of the forward.
    """
    blocks = model_blocks(model)
    wrapped: list[nn.Module] = []
    try:
        for block in blocks[: len(blocks) if count is None else count]:
            if "forward" in vars(block):
                raise RuntimeError(
                    f"{type(block).__name__} already has an instance-level forward; "
                    "checkpointed_blocks does not nest."
                )
            # object.__setattr__: a bridge component forwards attribute writes to the module
            # it wraps, which would put the wrapper one level too deep.
            object.__setattr__(block, "forward", _checkpointed(block.forward))
            wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            object.__delattr__(block, "forward")


def wrapped_blocks(model: Any) -> int:
    """How many blocks of `model` currently carry a checkpointing forward (0 when restored)."""
    return sum("forward" in vars(block) for block in model_blocks(model))

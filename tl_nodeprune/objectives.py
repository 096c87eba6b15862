"""Faithfulness objectives: how far the gated model's answers are from the full model's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .tasks.base import PromptTask, _set_value

ObjectiveFn = Callable[[Tensor, Tensor, PromptTask], Tensor]
Objective = Union[Literal["kl", "logit_diff"], ObjectiveFn]  # noqa: UP007 (runtime alias)
OBJECTIVES: tuple[str, ...] = ("kl", "logit_diff")


def check_objective(objective: Objective) -> None:
    if not callable(objective) and objective not in OBJECTIVES:
        raise ValueError(
            f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)} or pass "
            "a callable (circuit_logits, full_logits, task) -> scalar tensor."
        )


def kl_divergence(
    full: Float[Tensor, "batch vocab"], circuit: Float[Tensor, "batch vocab"]
) -> Float[Tensor, ""]:
    """KL(full || circuit) of the next-token distributions, averaged over the batch."""
    p_log = full.log_softmax(-1)
    q_log = circuit.log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def logit_diff(task: PromptTask, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    """Mean correct-answer logit minus mean incorrect-answer logit, per example."""
    return _set_value(logits, task.correct, "logit_diff") - _set_value(
        logits, task.incorrect, "logit_diff"
    )


def faithfulness_loss(
    objective: Objective,
    circuit: Float[Tensor, "batch vocab"],
    full: Float[Tensor, "batch vocab"],
    task: PromptTask,
) -> Float[Tensor, ""]:
    """The loss that keeps the circuit faithful; 0 when it behaves like the full model."""
    if callable(objective):
        return objective(circuit, full, task)
    if objective == "kl":
        return kl_divergence(full, circuit)
    return ((logit_diff(task, circuit) - logit_diff(task, full)) ** 2).mean()


class _ResidualRead(Exception):
    """Ends a forward pass once the last residual stream has been read."""


def forward_answers(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    hooks: list | None = None,
    fast: bool = True,
) -> Float[Tensor, "batch vocab"]:
    """Logits at each example's answer position, under `hooks`.

    With `fast`, the pass stops at the last residual stream and only the answer positions go
    through the final norm and the unembedding: full-vocabulary logits (and their gradient)
    at every position are most of the cost on a 49k-token vocabulary, and the objective never
    reads them. `fast_path_matches` checks that this equals the model's own logits.
    """
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    pos = answer_pos.to(tokens.device)
    if not fast:
        with model.hooks(fwd_hooks=hooks or []):
            return model(tokens)[rows, pos]
    store: dict[str, Tensor] = {}

    def read(x: Tensor, hook: Any) -> Tensor:
        store["resid"] = x
        raise _ResidualRead

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    try:
        with model.hooks(fwd_hooks=[*(hooks or []), (last, read)]):
            model(tokens)
    except _ResidualRead:
        pass
    resid = store["resid"][rows, pos][:, None]  # (batch, 1, d_model)
    return model.unembed(model.ln_final(resid))[:, 0]


def fast_path_matches(model: Any, task: PromptTask, n: int = 4) -> bool:
    """Whether `forward_answers(fast=True)` reproduces the model's logits on a few prompts."""
    part = task.subset(torch.arange(min(n, len(task))))
    tokens = part.clean.to(next(model.parameters()).device)
    with torch.no_grad():
        slow = forward_answers(model, tokens, part.answer_pos, fast=False)
        try:
            quick = forward_answers(model, tokens, part.answer_pos, fast=True)
        except (AttributeError, KeyError, TypeError, RuntimeError):
            return False  # no ln_final / unembed module, or another hook layout
    return quick.shape == slow.shape and bool(torch.allclose(quick, slow, atol=1e-4, rtol=1e-4))


def answer_logits(
    model: Any,
    task: PromptTask,
    hooks_for: Callable[[Tensor, int], list] | None = None,
    batch_size: int = 32,
    fast: bool = False,
) -> Float[Tensor, "batch vocab"]:
    """Logits at each example's answer position, in batches, without gradient.

    `hooks_for(idx, seq)` gives the hooks for the examples `idx` trimmed to `seq` positions.
    """
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            part = task.subset(idx)
            hooks = hooks_for(idx, part.clean.shape[1]) if hooks_for else []
            out.append(forward_answers(model, part.clean.to(device), part.answer_pos, hooks, fast))
    return torch.cat(out)

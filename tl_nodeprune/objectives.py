"""Faithfulness objectives: how far the gated model's answers are from the full model's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Union

import torch
from jaxtyping import Float
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


def answer_logits(
    model: Any,
    task: PromptTask,
    hooks_for: Callable[[Tensor, int], list] | None = None,
    batch_size: int = 32,
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
            with model.hooks(fwd_hooks=hooks):
                logits = model(part.clean.to(device))
            out.append(part.answer_logits(logits))
    return torch.cat(out)

"""Faithfulness objectives: how far the gated model's answers are from the full model's."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, Union, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .tasks.base import PromptTask, answer_set_value

ObjectiveFn = Callable[[Tensor, Tensor, PromptTask], Tensor]
ObjectiveName = Literal["kl", "logit_diff"]  # a new one: a name here, a branch in faithfulness_loss
Objective = Union[ObjectiveName, ObjectiveFn]  # noqa: UP007 (runtime alias)
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)


def check_objective(objective: Objective) -> None:
    if not callable(objective) and objective not in OBJECTIVES:
        raise ValueError(
            f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)} or pass "
            "a callable (circuit_logits, full_logits, task) -> scalar tensor."
        )


def kl_per_prompt(
    full: Float[Tensor, "batch vocab"], circuit: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """KL(full || circuit) of each prompt's next-token distributions.

    Computed in float32 whatever the model's dtype: in bfloat16 the log-softmax of a large
    vocabulary loses the small differences the loss is made of.
    """
    p_log = full.float().log_softmax(-1)
    q_log = circuit.float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def kl_divergence(
    full: Float[Tensor, "batch vocab"], circuit: Float[Tensor, "batch vocab"]
) -> Float[Tensor, ""]:
    """KL(full || circuit) of the next-token distributions, averaged over the batch."""
    return kl_per_prompt(full, circuit).mean()


def logit_diff(task: PromptTask, logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    """Mean correct-answer logit minus mean incorrect-answer logit, per example."""
    return answer_set_value(logits, task.correct, "logit_diff") - answer_set_value(
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
    gap = logit_diff(task, circuit.float()) - logit_diff(task, full.float())
    return (gap**2).mean()


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
    at every position are a large share of the cost on a 49k-token vocabulary, and the
    objective never reads them. `fast_path_matches` checks that this equals the model's own logits.
    """
    if not fast:
        with model.hooks(fwd_hooks=hooks or []):
            logits = model(tokens)
        rows = torch.arange(tokens.shape[0], device=logits.device)
        return logits[rows, answer_pos.to(logits.device)]
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
    resid = store["resid"]  # (batch, pos, d_model), on the last block's device
    rows = torch.arange(tokens.shape[0], device=resid.device)
    resid = resid[rows, answer_pos.to(resid.device)][:, None]  # (batch, 1, d_model)
    final = getattr(model, "ln_final", None)  # None: a model without normalisation
    return model.unembed(resid if final is None else final(resid))[:, 0]


# Agreement asked of the answer-only unembedding, by the dtype the model computes in: the two
# paths round differently, by about the dtype's resolution times the logits' size.
FAST_PATH_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def fast_path_matches(model: Any, task: PromptTask, n: int = 4) -> bool:
    """Whether `forward_answers(fast=True)` reproduces the model's logits on a few prompts.

    When it does not, training falls back to the full unembedding (slower, same result) and
    a warning says so, with the reason.
    """
    part = task.subset(torch.arange(min(n, len(task))))
    tokens = part.clean.to(next(model.parameters()).device)
    reason = ""
    with torch.no_grad():
        slow = forward_answers(model, tokens, part.answer_pos, fast=False)
        tol = FAST_PATH_TOLERANCE.get(slow.dtype, 1e-4)
        try:
            quick = forward_answers(model, tokens, part.answer_pos, fast=True)
        except (AttributeError, KeyError, TypeError, RuntimeError) as error:
            reason = f"{type(error).__name__}: {error}"  # no ln_final / unembed, other layout
        else:
            if quick.shape != slow.shape:
                reason = f"shape {tuple(quick.shape)} instead of {tuple(slow.shape)}"
            elif not torch.allclose(quick.float(), slow.float(), atol=tol, rtol=tol):
                diff = (quick.float() - slow.float()).abs().max().item()
                reason = f"logits differ by up to {diff:.3g} (tolerance {tol:g} for {slow.dtype})"
    if reason:
        warnings.warn(
            "The answer-only unembedding does not reproduce this model's logits "
            f"({reason}); training uses the full unembedding instead, which is slower.",
            stacklevel=2,
        )
    return not reason


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
    task = task.to(next(model.parameters()).device)
    seqs = (task.answer_pos.cpu() + 1).tolist()  # one read, before the loop
    out = []
    with torch.no_grad():
        for start in range(0, len(task), batch_size):
            stop = min(start + batch_size, len(task))
            idx = torch.arange(start, stop, device=task.clean.device)
            seq = max(seqs[start:stop])
            part = task.take(idx, seq)
            hooks = hooks_for(idx, seq) if hooks_for else []
            out.append(forward_answers(model, part.clean, part.answer_pos, hooks, fast))
    return torch.cat(out)

"""What a closed gate puts in place of a node's output: corrupted, mean or zero activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from .sites import ModelShape, hook_name
from .tasks.base import PromptTask

AblationKind = Literal["corrupted", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("corrupted", "mean", "zero")
HookFn = Callable[..., Tensor]


def check_ablation(kind: str) -> None:
    if kind not in ABLATIONS:
        raise ValueError(f"Unknown ablation {kind!r}; choose from {', '.join(ABLATIONS)}.")


def site_masks(shape: ModelShape, gates: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per hook, the gate tensor that mixes clean and ablated values there.

    Block gates act on the block output; head and head_dim gates multiply at `hook_z`
    (hierarchy inside one hook); neuron gates act on `mlp.hook_post`.
    """
    masks: dict[str, Tensor] = {}
    for layer in range(shape.n_layers):
        for g in ("attn", "mlp", "neuron"):
            if g in gates:
                masks[hook_name(g, layer)] = gates[g][layer]
        if "head" in gates or "head_dim" in gates:
            z = gates["head"][layer][:, None] if "head" in gates else None  # head -> (head, 1)
            if "head_dim" in gates:
                z = gates["head_dim"][layer] if z is None else z * gates["head_dim"][layer]
            masks[hook_name("head", layer)] = z
    return masks


def _mix_hook(mask: Tensor, ablated: Tensor | None) -> HookFn:
    """clean * g + ablated * (1 - g): exactly the clean value when g == 1."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        m = mask.to(x.dtype)
        if ablated is None:
            return x * m
        return x * m + ablated.to(x.dtype) * (1 - m)

    return hook


def mixing_hooks(
    masks: dict[str, Tensor], ablated: dict[str, Tensor | None]
) -> list[tuple[str, HookFn]]:
    """`(hook name, fn)` pairs for `model.hooks`, each closure bound to its site's tensors."""
    return [(name, _mix_hook(mask, ablated.get(name))) for name, mask in masks.items()]


class _AllCaptured(Exception):
    """Ends a capturing forward pass once every requested activation is stored."""


def capture(model: Any, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Run `model` without gradient and return the activations at `names`.

    The pass stops at the last requested hook, so the later blocks and the full-vocabulary
    logits (the largest tensor of a forward pass) are never computed.
    """
    store: dict[str, Tensor] = {}
    wanted = len(set(names))

    def saver(name: str) -> HookFn:
        def hook(x: Tensor, hook: Any) -> Tensor:
            store[name] = x.detach()
            if len(store) == wanted:
                raise _AllCaptured
            return x

        return hook

    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, saver(n)) for n in names]):
            model(tokens)
    except _AllCaptured:
        pass
    return store


class Ablation:
    """Ablated values per gated hook for a task, cached up front when they fit in memory."""

    def __init__(
        self,
        model: Any,
        task: PromptTask,
        names: list[str],
        kind: AblationKind = "corrupted",
        batch_size: int = 32,
        max_cache_bytes: int = 2**31,
    ) -> None:
        check_ablation(kind)
        self.model, self.task, self.names, self.kind = model, task, names, kind
        self.device = next(model.parameters()).device
        self._cache: dict[str, Tensor] | None = None
        if kind == "mean":
            self._cache = self._position_means(batch_size)
        elif kind == "corrupted":
            probe = capture(model, task.corrupted[:1, :1].to(self.device), names)
            per_token = sum(v.numel() * v.element_size() for v in probe.values())
            if per_token * task.clean.numel() <= max_cache_bytes:
                self._cache = self._gather(task.corrupted, batch_size)

    def _gather(self, tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
        chunks = [
            capture(self.model, tokens[i : i + batch_size].to(self.device), self.names)
            for i in range(0, len(tokens), batch_size)
        ]
        return {n: torch.cat([c[n] for c in chunks]) for n in self.names}

    def _position_means(self, batch_size: int) -> dict[str, Tensor]:
        """Mean clean activation at each position, over the prompts that reach it."""
        acts = self._gather(self.task.clean, batch_size)
        pos = torch.arange(self.task.clean.shape[1])
        valid = (pos[None, :] <= self.task.answer_pos[:, None]).to(self.device)  # (batch, pos)
        count = valid.sum(0).clamp(min=1)
        means = {}
        for n, a in acts.items():
            w = valid.reshape(*valid.shape, *([1] * (a.dim() - 2))).to(a.dtype)
            means[n] = (a * w).sum(0) / count.reshape(-1, *([1] * (a.dim() - 2)))
        return means

    def values(self, idx: Tensor, seq: int) -> dict[str, Tensor | None]:
        """Ablated values for examples `idx`, trimmed to `seq` positions."""
        if self.kind == "zero":
            return dict.fromkeys(self.names)
        if self.kind == "mean":
            assert self._cache is not None
            return {n: v[:seq] for n, v in self._cache.items()}
        if self._cache is not None:
            idx_d = idx.to(self.device)
            return {n: v[idx_d, :seq] for n, v in self._cache.items()}
        tokens = self.task.corrupted[idx, :seq].to(self.device)
        return dict(capture(self.model, tokens, self.names))

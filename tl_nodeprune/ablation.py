"""What a closed gate puts in place of a node's output: corrupted, mean or zero activations."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import psutil
import torch
from jaxtyping import Int
from torch import Tensor

from .granularities import SPECS
from .sites import ModelShape, model_device
from .tasks.base import PromptTask

AblationKind = Literal["corrupted", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("corrupted", "mean", "zero")
HookFn = Callable[..., Tensor]
# An ablated value, or a function that makes it when the hook runs (see `Ablation.lazy_values`).
Ablated = Tensor | Callable[[], Tensor] | None
# Corrupted activations are cached up front when they fit in 8 GiB and in half the memory free
# on the model's device: SmolLM2-135M's 800 default training prompts take about 5.6 GiB.
DEFAULT_CACHE_BYTES = 2**33


def check_ablation(kind: str) -> None:
    if kind not in ABLATIONS:
        raise ValueError(f"Unknown ablation {kind!r}; choose from {', '.join(ABLATIONS)}.")


def site_names(shape: ModelShape, granularities: Iterable[str]) -> list[str]:
    """The hooks that gates of `granularities` sit at, in `site_masks`'s order."""
    wanted = set(granularities)
    names = [s.hook_name(layer) for layer in range(shape.n_layers)
             for g, s in SPECS.items() if g in wanted]  # fmt: skip
    return list(dict.fromkeys(names))


def site_masks(
    shape: ModelShape,
    gates: dict[str, Tensor],
    per_example: bool = False,
    positions: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Tensor]:
    """Per hook, the gate tensor that mixes clean and ablated values there.

    A layer's gates broadcast over the activation axes after their unit axes (a head's gate
    over its d_head values); granularities gated at the same hook multiply, coarse first (heads
    and head value dimensions both at `hook_z`: the hierarchy inside one hook). With
    `per_example`, every gate tensor leads with a batch axis (one draw per example), and each
    mask is (batch, 1, units..., 1...): it broadcasts over positions. With `positions` (per
    token, the index of its position), the gate tensors have a position axis before the layer
    axis (after the batch axis) and each mask is (batch, pos, units..., 1...): every token
    takes the gate of its position.
    """
    masks: dict[str, Tensor] = {}
    for layer in range(shape.n_layers):
        for g in SPECS:
            if g not in gates:
                continue
            s = SPECS[g]
            mask = _layer_gate(gates[g], layer, per_example, positions)
            lead = 0 if not (per_example or positions is not None) else 2  # (batch, position)
            units = mask.shape[lead:]
            if lead or units:  # (units...) -> (units..., 1...) against the activation's axes
                pad = [1] * (len(s.activation_axes) - len(units))
                mask = mask.reshape(*mask.shape[:lead], *units, *pad)
            name = s.hook_name(layer)
            masks[name] = mask if name not in masks else masks[name] * mask
    return masks


def _layer_gate(
    gate: Tensor, layer: int, per_example: bool, positions: Tensor | None
) -> Tensor:
    """One layer's gates: (units), (batch, 1, units) per example, (batch, pos, units) by position.

    `gate` is ([batch], [position], layer, units...): the batch axis with `per_example`, the
    position axis with `positions`.
    """
    if positions is None:
        return gate[:, layer, None] if per_example else gate[layer]
    by_position = gate.select(2 if per_example else 1, layer)  # ([batch], position, units...)
    positions = positions.to(gate.device)
    if per_example:
        rows = torch.arange(positions.shape[0], device=gate.device)[:, None]
        return by_position[rows, positions]
    return by_position[positions]


def _mix_hook(mask: Tensor, ablated: Ablated) -> HookFn:
    """a + g * (x - a) as one `torch.lerp`: exactly x when g == 1 and exactly a when g == 0.

    One op instead of four; autograd keeps as much for backward as with
    `x * g + a * (1 - g)` (bench/mixing_memory.py, removed, measured both). The gate and the ablated
    value are moved to the device and dtype of the hook's tensor, so models spread over
    several devices work. A callable `ablated` is called each time the hook runs.
    """

    def hook(x: Tensor, hook: Any) -> Tensor:
        m = mask.to(device=x.device, dtype=x.dtype)
        if ablated is None:
            return x * m
        a = ablated() if callable(ablated) else ablated
        a = a.to(device=x.device, dtype=x.dtype)
        return torch.lerp(a, x, m)

    return hook


def mixing_hooks(masks: dict[str, Tensor], ablated: dict[str, Ablated]) -> list[tuple[str, HookFn]]:
    """`(hook name, fn)` pairs for `model.hooks`, each closure bound to its site's tensors."""
    return [(name, _mix_hook(mask, ablated.get(name))) for name, mask in masks.items()]


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` now: CUDA's own count, psutil's for the host, None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    return int(psutil.virtual_memory().available)


def cache_limit(device: torch.device, cache_bytes: int) -> int:
    """The most a cache may take: `cache_bytes`, and never more than half the free memory.

    Half, because the step that reads the cache needs room of its own; past the limit the
    corrupted activations are recomputed each step, slower but without running out of memory.
    """
    free = free_bytes(device)
    return cache_bytes if free is None else min(cache_bytes, free // 2)


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
    """Ablated values per gated hook for a task.

    Corrupted activations are cached up front when they fit in `cache_limit` (`cache_bytes`, at
    most half the free memory) and recomputed batch by batch otherwise; mean activations are
    accumulated batch by batch, so only one batch of activations is ever alive. Every value
    lives on the device of its own hook.
    """

    def __init__(
        self,
        model: Any,
        task: PromptTask,
        names: list[str],
        kind: AblationKind = "corrupted",
        batch_size: int = 32,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        check_ablation(kind)
        self.model, self.names, self.kind = model, names, kind
        self.device = model_device(model)
        self.task = task.to(self.device)
        self._cache: dict[str, Tensor] | None = None
        if kind == "mean":
            self._cache = self._position_means(batch_size)
        elif kind == "corrupted" and self.cache_size() <= cache_limit(self.device, cache_bytes):
            self._cache = self._gather(self.task.corrupted, batch_size)

    def cache_size(self) -> int:
        """Bytes that caching every corrupted activation at the gated hooks would take."""
        probe = capture(self.model, self.task.corrupted[:1, :1], self.names)
        per_token = sum(v.numel() * v.element_size() for v in probe.values())
        return per_token * self.task.corrupted.numel()

    @property
    def cached(self) -> bool:
        """Whether values come from a cache (False: corrupted runs are recomputed per batch)."""
        return self._cache is not None or self.kind == "zero"

    def _gather(self, tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
        """Activations at every gated hook for all of `tokens`, captured batch by batch.

        Each batch is written into its slot of the finished cache, so only the cache and
        one batch's activations are ever alive (a concatenation would hold two caches).
        """
        out: dict[str, Tensor] = {}
        for i in range(0, len(tokens), batch_size):
            part = capture(self.model, tokens[i : i + batch_size], self.names)
            for n, v in part.items():
                if n not in out:
                    out[n] = v.new_empty((len(tokens), *v.shape[1:]))
                out[n][i : i + len(v)] = v
            del part
        return out

    def _position_means(self, batch_size: int) -> dict[str, Tensor]:
        """Mean clean activation at each position, over the prompts that reach it."""
        clean, answer_pos = self.task.clean, self.task.answer_pos
        pos = torch.arange(clean.shape[1], device=answer_pos.device)
        valid = pos[None, :] <= answer_pos[:, None]  # (batch, pos)
        sums: dict[str, Tensor] = {}
        for i in range(0, len(clean), batch_size):
            acts = capture(self.model, clean[i : i + batch_size], self.names)
            for n, a in acts.items():
                w = valid[i : i + batch_size].to(a.device)
                w = w.reshape(*w.shape, *([1] * (a.dim() - 2))).to(a.dtype)  # (batch, pos, 1..)
                part = (a * w).sum(0)  # (pos, ...)
                sums[n] = part if n not in sums else sums[n] + part
        count = valid.sum(0).clamp(min=1)  # (pos,)
        return {
            n: s / count.to(s.device).reshape(-1, *([1] * (s.dim() - 1))).to(s.dtype)
            for n, s in sums.items()
        }

    def values(self, idx: Int[Tensor, " batch"], seq: int) -> dict[str, Tensor | None]:
        """Ablated values for examples `idx`, trimmed to `seq` positions."""
        if self.kind == "zero":
            return dict.fromkeys(self.names)
        if self.kind == "mean":
            assert self._cache is not None
            return {n: v[:seq] for n, v in self._cache.items()}
        if self._cache is not None:
            return {n: _rows(v, idx, seq) for n, v in self._cache.items()}
        tokens = self.task.corrupted[idx.to(self.device), :seq]
        return dict(capture(self.model, tokens, self.names))

    def lazy_values(self, idx: Int[Tensor, " batch"], seq: int) -> dict[str, Ablated]:
        """`values`, but a cached value is indexed for the batch inside its hook.

        The batch's copy is then made when the hook runs and held only while autograd needs
        it: with checkpointed blocks, one block at a time instead of the whole step.
        """
        if self.kind != "corrupted" or self._cache is None:
            return self.values(idx, seq)
        return {n: functools.partial(_rows, v, idx, seq) for n, v in self._cache.items()}


def _rows(values: Tensor, idx: Tensor, seq: int) -> Tensor:
    """`values[idx, :seq]` (a copy), with `idx` moved to the values' device."""
    return values[idx.to(values.device), :seq]

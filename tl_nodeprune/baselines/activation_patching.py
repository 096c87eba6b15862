"""Activation patching: ablate each head, MLP block (and neuron group) alone; exact node effects."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from torch import Tensor

from ..ablation import AblationKind, check_ablation, mixing_hooks
from ..circuit import Circuit
from ..objectives import answer_logits, kl_divergence
from ..reference_run import ReferenceRun
from ..sites import ModelShape, frozen, hook_name
from ..tasks.base import PromptTask

Effect = Literal["kl", "metric"]


def node_effects(
    model: Any,
    task: PromptTask,
    ablation: AblationKind = "corrupted",
    effect: Effect = "kl",
    neuron_group_size: int | None = None,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Per granularity, the effect of ablating each unit alone (shaped `shape.units(g)`).

    `effect="kl"`: KL(full || ablated) at the answer positions; `"metric"`: the drop of the
    task metric (full minus ablated; negative when ablating helps). With `neuron_group_size`,
    each group of that many consecutive neurons is ablated together and every neuron in it
    gets the group's effect.
    """
    check_ablation(ablation)
    if effect not in ("kl", "metric"):
        raise ValueError(f"effect must be 'kl' or 'metric', got {effect!r}.")
    shape = ModelShape.from_model(model)
    if neuron_group_size is not None and not 0 < neuron_group_size <= max(1, shape.d_mlp):
        raise ValueError(f"neuron_group_size must be in 1..{shape.d_mlp}, got {neuron_group_size}.")
    granularities = ["head", *(["mlp"] if shape.has("mlp") else [])]
    if neuron_group_size is not None and shape.has("mlp"):
        granularities.append("neuron")
    names = [hook_name(g, layer) for g in granularities for layer in range(shape.n_layers)]
    out = {g: torch.zeros(shape.units(g)) for g in granularities}
    ref = ReferenceRun(model, task, names, ablation, batch_size, fast=True)
    abl, fast, full = ref.ablation, ref.fast, ref.full
    with frozen(model):
        full_metric = task.score(full).mean()

        def measure(masks: dict[str, Tensor]) -> float:
            logits = answer_logits(
                model, task, lambda idx, seq: mixing_hooks(masks, abl.values(idx, seq)),
                batch_size, fast,
            )  # fmt: skip
            if effect == "kl":
                return kl_divergence(full, logits).item()
            return (full_metric - task.score(logits).mean()).item()

        for layer, unit, masks in _single_ablations(shape, granularities, abl.device,
                                                    neuron_group_size):  # fmt: skip
            g, index = unit
            out[g][(layer, *index)] = measure(masks)
    return out


def _single_ablations(
    shape: ModelShape, granularities: list[str], device: Any, group: int | None
) -> Any:
    """(layer, (granularity, unit index), masks) for every unit ablated alone."""
    for layer in range(shape.n_layers):
        for h in range(shape.n_heads):
            mask = torch.ones(shape.n_heads, 1, device=device)  # (head, 1) at hook_z
            mask[h] = 0.0
            yield layer, ("head", (h,)), {hook_name("head", layer): mask}
        if "mlp" in granularities:
            zero = torch.zeros((), device=device)
            yield layer, ("mlp", ()), {hook_name("mlp", layer): zero}
        if "neuron" in granularities and group is not None:
            for start in range(0, shape.d_mlp, group):
                mask = torch.ones(shape.d_mlp, device=device)
                mask[start : start + group] = 0.0
                units = slice(start, start + group)
                yield layer, ("neuron", (units,)), {hook_name("neuron", layer): mask}


def activation_patching(
    model: Any,
    task: PromptTask,
    top_k: int | None = None,
    threshold: float | None = 0.01,
    ablation: AblationKind = "corrupted",
    effect: Effect = "kl",
    neuron_group_size: int | None = None,
    batch_size: int = 32,
) -> Circuit:
    """Nodes whose lone ablation matters most: the `top_k` largest |effect| or |effect| > threshold.

    Heads and MLP blocks (and neuron groups) are ranked together; every effect is kept in
    `Circuit.scores`. An attention block is kept when one of its heads is.
    """
    if top_k is None and threshold is None:
        raise ValueError("Give top_k (number of nodes) or threshold (|effect|).")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}.")
    start = time.perf_counter()
    shape = ModelShape.from_model(model)
    scores = node_effects(model, task, ablation, effect, neuron_group_size, batch_size)
    flat = torch.cat([s.abs().flatten() for s in scores.values()])
    if top_k is not None:
        cut = flat.topk(min(top_k, flat.numel())).values[-1].item()
        keep = {g: s.abs() >= cut for g, s in scores.items()}
    else:
        keep = {g: s.abs() > threshold for g, s in scores.items()}
    gates = {g: k.float() for g, k in keep.items()}
    if "neuron" in gates:
        gates["mlp"] = gates["neuron"].amax(1)
    gates["attn"] = gates["head"].amax(1)
    meta = {
        "method": "activation_patching",
        "task": task.name,
        "effect": effect,
        "ablation": ablation,
        "top_k": top_k,
        "threshold": threshold if top_k is None else None,
        "neuron_group_size": neuron_group_size,
        "seconds": time.perf_counter() - start,
    }
    return Circuit(shape, gates, meta=meta, scores=scores)


__all__ = ["activation_patching", "node_effects"]

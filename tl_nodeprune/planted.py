"""Small random models with a planted circuit: the ground truth that discovery must recover.

Every head and neuron outside the planted set gets zero output weights, so ablating it cannot
change anything; attention blocks without planted heads are therefore silent as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from .ablation import capture
from .circuit import Circuit
from .granularities import node_name
from .objectives import forward_answers
from .sites import ModelShape, hook_name
from .tasks.base import PromptTask

Flavour = Literal["hooked", "bridge-native", "bridge-llama"]


def available_flavours() -> tuple[str, ...]:
    """The model flavours the installed TransformerLens can build."""
    flavours = []
    try:
        from transformer_lens import HookedTransformer  # noqa: F401

        flavours.append("hooked")
    except (ImportError, AttributeError):
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge

        if hasattr(TransformerBridge, "boot_native"):
            flavours.append("bridge-native")
        flavours.append("bridge-llama")
    except ImportError:
        pass
    return tuple(flavours)


def tiny_model(
    flavour: str,
    n_layers: int = 2,
    n_heads: int = 4,
    d_head: int = 8,
    d_mlp: int = 32,
    d_vocab: int = 64,
    n_ctx: int = 32,
    seed: int = 0,
    logit_scale: float = 4.0,
    attn_only: bool = False,
) -> Any:
    """A randomly initialised TransformerLens model, in eval mode, built without any download.

    Weights are drawn with std 1/sqrt(d_model) (not the usual 0.02) and the unembedding is
    scaled by `logit_scale`, so logits are far from uniform and single nodes have a clear
    effect on the output distribution.
    """
    # The fields HookedTransformerConfig and TransformerBridgeConfig share.
    common = dict(n_layers=n_layers, d_model=n_heads * d_head, n_heads=n_heads, d_head=d_head,
                  d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu",
                  normalization_type="LN", attn_only=attn_only)  # fmt: skip
    if flavour == "hooked":
        model = _hooked_model(common, seed)
    elif flavour == "bridge-native":
        model = _native_bridge(common)
    elif flavour == "bridge-llama":
        model = _llama_bridge(common, seed)
    else:
        raise ValueError(f"Unknown flavour {flavour!r}; choose from {available_flavours()}.")
    _randomise(model, common["d_model"], seed, logit_scale)
    return model.eval()


def _hooked_model(common: dict[str, Any], seed: int) -> Any:
    """A HookedTransformer of the shared config fields."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer(HookedTransformerConfig(**common, seed=seed))


def _native_bridge(common: dict[str, Any]) -> Any:
    """A TransformerBridge booted natively (no Hugging Face model) from the shared fields."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(
        TransformerBridgeConfig(**common, positional_embedding_type="standard")
    )


def _llama_bridge(common: dict[str, Any], seed: int) -> Any:
    """A TransformerBridge over an in-memory Llama with grouped-query attention (kv = heads/2)."""
    if common["attn_only"]:
        raise ValueError("A llama model cannot be attention-only; use another flavour.")
    # TransformerLens has no public way to bridge a model built in memory.
    from transformer_lens.model_bridge.sources._bridge_builder import (  # noqa: PLC2701
        build_bridge_from_module,
    )
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=common["d_vocab"],
        hidden_size=common["d_model"],
        intermediate_size=common["d_mlp"],
        num_hidden_layers=common["n_layers"],
        num_attention_heads=common["n_heads"],
        num_key_value_heads=max(1, common["n_heads"] // 2),
        max_position_embeddings=common["n_ctx"],
        tie_word_embeddings=False,
    )
    return build_bridge_from_module(
        LlamaForCausalLM(hf_config),
        "LlamaForCausalLM",
        hf_config=hf_config,
        model_name=f"tiny-llama-{seed}",
    )


def _randomise(model: Any, d_model: int, seed: int, logit_scale: float) -> None:
    """Redraw every weight matrix with std 1/sqrt(d_model); scale the unembedding up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / d_model**0.5)
        unembed = getattr(model.unembed, "original_component", None)
        (unembed.weight if isinstance(unembed, nn.Linear) else model.unembed.W_U).mul_(logit_scale)


def output_weights(
    model: Any, layer: int, kind: Literal["attn", "mlp"]
) -> tuple[torch.Tensor, int]:
    """The weight that reads head z (or MLP post) and the axis that indexes its input units."""
    block = model.blocks[layer]
    part = block.attn if kind == "attn" else block.mlp
    bridge_linear = getattr(
        getattr(part, "o" if kind == "attn" else "out", None), "original_component", None
    )
    if isinstance(bridge_linear, nn.Linear):
        return bridge_linear.weight, 1  # (d_model, units)
    weight = part.W_O if kind == "attn" else part.W_out
    return weight, 0  # HookedTransformer: (head, d_head, d_model) or (d_mlp, d_model)


def plant(
    model: Any,
    heads: list[tuple[int, int]],
    neurons: list[tuple[int, int]],
    task: PromptTask | None = None,
    strength: float = 1.0,
) -> Circuit:
    """Zero every head's and neuron's output weights except the planted ones.

    With a `task`, each planted unit's output weights are rescaled, layer by layer, so that its
    mean clean-vs-corrupted change at the answer position writes a vector of norm `strength`
    into the residual stream: every planted unit then matters about equally. Returns the
    circuit discovery should find (planted units and the blocks that hold them). Modifies
    `model` in place.
    """
    shape = ModelShape.from_model(model)
    keep = {"head": torch.zeros(shape.units("head")), "neuron": torch.zeros(shape.units("neuron"))}
    for layer, h in heads:
        keep["head"][layer, h] = 1.0
    for layer, n in neurons:
        keep["neuron"][layer, n] = 1.0
    with torch.no_grad():
        for layer in range(shape.n_layers):
            for g, kind in (("head", "attn"), ("neuron", "mlp")):
                w, axis = output_weights(model, layer, kind)
                scale = keep[g][layer].clone()
                if task is not None and scale.any():
                    scale *= strength / _unit_change(model, task, layer, g, w, axis).clamp(min=1e-6)
                if g == "head":  # one scale per head, repeated over its d_head rows/columns
                    scale = scale.repeat_interleave(w.shape[axis] // shape.n_heads)
                w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))) if axis == 0 else scale)
    gates = {"attn": keep["head"].amax(1), "mlp": keep["neuron"].amax(1), **keep}
    return Circuit(shape, gates, meta={"planted": True})


def _unit_change(
    model: Any, task: PromptTask, layer: int, g: str, w: torch.Tensor, axis: int
) -> torch.Tensor:
    """Per unit: mean norm of what it writes, clean minus corrupted, at the answer position."""
    name = hook_name(g, layer)
    acts = [capture(model, t, [name])[name] for t in (task.clean, task.corrupted)]
    rows = torch.arange(len(task))
    delta = (
        acts[0][rows, task.answer_pos] - acts[1][rows, task.answer_pos]
    )  # (batch, unit[, d_head])
    if axis == 1:  # nn.Linear weight (d_model, units): unit u's output vector is column u
        w = w.T
    if g == "head":  # (head, d_head, d_model): write = delta_z @ W_O[h]
        w = w.reshape(delta.shape[1], delta.shape[2], -1)
        writes = torch.einsum("bhd,hdm->bhm", delta, w)
    else:
        writes = delta[..., None] * w[None]  # (batch, neuron, d_model)
    return writes.norm(dim=-1).mean(0)


@dataclass
class PlantedProblem:
    """A model with a planted circuit, the circuit itself and a task that exercises it."""

    model: Any
    circuit: Circuit
    task: PromptTask


def planted_problem(
    flavour: str = "bridge-native",
    seed: int = 0,
    n_layers: int = 3,
    n_heads: int = 4,
    d_mlp: int = 32,
    heads_per_layer: int = 1,
    neurons_per_layer: int = 3,
    silent_layer: int | None = 0,
    n_prompts: int = 64,
    seq: int = 8,
    strength: float = 1.0,
    **model_kwargs: Any,
) -> PlantedProblem:
    """Build a tiny model, plant random heads and neurons, and pair random prompts.

    `silent_layer`'s attention block gets no planted head, so it must be pruned as a block.
    """
    model = tiny_model(
        flavour, n_layers=n_layers, n_heads=n_heads, d_mlp=d_mlp, seed=seed, **model_kwargs
    )
    gen = torch.Generator().manual_seed(seed + 1)
    heads, neurons = [], []
    for layer in range(n_layers):
        if layer != silent_layer:
            heads += [
                (layer, int(h)) for h in torch.randperm(n_heads, generator=gen)[:heads_per_layer]
            ]
        neurons += [
            (layer, int(n)) for n in torch.randperm(d_mlp, generator=gen)[:neurons_per_layer]
        ]
    d_vocab = model.cfg.d_vocab
    clean = torch.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    corrupted = torch.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    # placeholders until the planted model answers (own_answers)
    task = PromptTask.from_tokens(clean, corrupted, [0] * n_prompts, [1] * n_prompts,
                                  name="planted")  # fmt: skip
    circuit = plant(model, sorted(heads), sorted(neurons), task, strength)
    return PlantedProblem(model, circuit, own_answers(model, task))


def own_answers(model: Any, task: PromptTask) -> PromptTask:
    """`task` with the answers `model` itself gives: correct is its top token on each clean
    prompt, incorrect its top token on the corrupted one (the clean prompt's second when the
    two agree). Random prompts have no right answer; these make the task metric measure how
    much of the model's own clean-vs-corrupted preference a circuit keeps, as on a real task
    (so faithfulness, and a faithfulness target, mean something on planted models)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        clean, corrupted = (
            forward_answers(model, tokens.to(device), task.answer_pos, fast=False).cpu()
            for tokens in (task.clean, task.corrupted)
        )
    top2 = clean.topk(2, dim=-1).indices
    correct = top2[:, 0]
    incorrect = corrupted.argmax(-1)
    incorrect = torch.where(incorrect == correct, top2[:, 1], incorrect)
    return replace(task, correct=correct[:, None], incorrect=incorrect[:, None])


def add_distractors(
    problem: PlantedProblem,
    per_layer: int = 2,
    strength: float = 0.05,
    seed: int = 0,
    kinds: tuple[str, ...] = ("head", "neuron"),
) -> PlantedProblem:
    """Give `per_layer` unplanted units of each of `kinds` per layer small but real outputs.

    Each distractor writes a mean clean-vs-corrupted change of norm `strength` into the
    residual stream at the answer position (planted units write about `plant`'s strength, 1
    by default), along a random direction. Ablating one therefore changes the output a little:
    discovery must prune them on their small effect, not because they are silent, which tests
    its precision. The distractors' names go into `problem.circuit.meta["distractors"]`; the
    circuit itself (the ground truth) is unchanged. Modifies `problem.model` in place.
    """
    model, task, truth = problem.model, problem.task, problem.circuit
    shape = ModelShape.from_model(model)
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(shape.n_layers):  # in order: a layer's change depends on earlier ones
            for g, kind in (("head", "attn"), ("neuron", "mlp")):
                if g not in kinds:
                    continue
                free = (~truth.own_kept(g)[layer]).nonzero().flatten()
                pick = free[torch.randperm(len(free), generator=gen)[:per_layer]]
                units = torch.zeros(shape.units(g)[1], dtype=torch.bool)
                units[pick] = True
                chosen.setdefault(g, torch.zeros(shape.units(g), dtype=torch.bool))[layer] = units
                w, axis = output_weights(model, layer, kind)
                per_row = w.shape[axis] // len(units)  # d_head rows per head, 1 per neuron
                rows = units.repeat_interleave(per_row)
                rows = rows.reshape(-1, *([1] * (w.dim() - 1))) if axis == 0 else rows
                noise = torch.randn(w.shape, generator=gen) / shape.d_model**0.5
                w.copy_(torch.where(rows, noise.to(w.dtype), w))
                change = _unit_change(model, task, layer, g, w, axis).clamp(min=1e-6)
                scale = torch.where(units, strength / change, torch.ones_like(change))
                scale = scale.repeat_interleave(per_row)
                w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))) if axis == 0 else scale)
    names = [node_name(g, unit) for g, m in chosen.items() for unit in m.nonzero().tolist()]
    truth.meta.update(distractors=names, distractor_strength=strength)
    return problem

"""Planted circuits whose units interact: a chain, an AND-like pair and two duplicate heads.

`tl_nodeprune.planted` plants units that act on the answer independently. Here some planted
units only matter through others, which is where a gate optimiser can lose a node for good:

- chain: head (0, a) writes a direction that neuron (1, n) reads;
- AND-like pair: neuron (2, m) reads head (1, b) *and* neuron (1, n), and fires only when both
  write what they write on clean prompts (GELU models: a negative bias; gated models:
  gate reads one writer, up-projection the other, so the product needs both);
- duplicates: heads (1, b) and (1, c) have identical weights, so they have equal effect.

Every planted unit is rescaled to equal strength and every other unit writes nothing, so the
planted set is the circuit and has faithfulness 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .ablation import capture
from .circuit import Circuit
from .granularities import node_name
from .planted import PlantedProblem, output_weights, own_answers, plant, tiny_model
from .sites import hook_name
from .tasks.base import PromptTask


def _unit_writes(model: Any, tokens: Tensor, pos: Tensor, g: str, layer: int, unit: int) -> Tensor:
    """What one head or neuron writes into the residual stream at `pos`: (prompt, d_model)."""
    name = hook_name(g, layer)
    act = capture(model, tokens, [name])[name][torch.arange(len(tokens)), pos]
    w, axis = output_weights(model, layer, "attn" if g == "head" else "mlp")
    if axis == 1:  # nn.Linear (d_model, units) -> (units, d_model)
        w = w.T
    if g == "head":
        d_head = act.shape[-1]
        w_unit = w.reshape(-1, d_head, w.shape[-1])[unit]  # (d_head, d_model)
        return act[:, unit] @ w_unit
    return act[:, unit, None] * w[unit][None]


def _top_direction(writes: Tensor) -> Tensor:
    """Unit vector along which a writer's output varies most across prompts."""
    centred = writes - writes.mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[0]


def _mlp_input(model: Any, tokens: Tensor, pos: Tensor, layer: int) -> Tensor:
    """The (normalised) residual stream the MLP of `layer` reads at `pos`: (prompt, d_model)."""
    name = f"blocks.{layer}.mlp.hook_in"
    if name not in model.hook_dict:  # HookedTransformer: the LayerNorm's output (weight 1, bias 0)
        name = f"blocks.{layer}.ln2.hook_normalized"
    return capture(model, tokens, [name])[name][torch.arange(len(tokens)), pos]


def _input_linears(model: Any, layer: int) -> list[tuple[Tensor, Tensor | None, int]]:
    """(weight, bias, unit axis) of each linear map that feeds the MLP neurons of `layer`."""
    mlp = model.blocks[layer].mlp
    out = []
    for part in ("gate", "in"):  # a gated MLP: gate first, then the up-projection
        linear = getattr(getattr(mlp, part, None), "original_component", None)
        if isinstance(linear, nn.Linear):
            out.append((linear.weight, linear.bias, 0))  # (d_mlp, d_model)
    if not out:  # HookedTransformer: W_in (d_model, d_mlp), b_in (d_mlp,)
        out.append((mlp.W_in, mlp.b_in, 1))
    return out


def _wire_neuron(
    model: Any, task: PromptTask, layer: int, neuron: int, directions: list[Tensor], spread: float
) -> None:
    """Make `neuron` read the given residual directions (AND-like when there are two)."""
    tokens = torch.cat([task.clean, task.corrupted])
    pos = torch.cat([task.answer_pos, task.answer_pos])
    x = _mlp_input(model, tokens, pos, layer)
    linears = _input_linears(model, layer)
    gated = len(linears) == 2
    with torch.no_grad():
        for i, (weight, bias, axis) in enumerate(linears):
            # gated: the gate reads the first writer, the up-projection the last one
            reads = [directions[0] if i == 0 else directions[-1]] if gated else directions
            row = torch.zeros(weight.shape[1 - axis])
            for d in reads:
                proj = x @ d
                row += d * spread / proj.std().clamp(min=1e-6)
            pre = x @ row
            offset = 0.0
            if len(reads) == 2 and bias is not None:  # GELU: open only when both are high
                clean_pre = pre[: len(task)]
                offset = -float(clean_pre.quantile(0.25))
            # orient so that clean prompts sit on the active side of the nonlinearity
            sign = 1.0 if pre[: len(task)].mean() >= pre[len(task) :].mean() else -1.0
            if axis == 0:
                weight[neuron] = sign * row
            else:
                weight[:, neuron] = sign * row
            if bias is not None:
                bias[neuron] = offset * sign if len(reads) == 2 else 0.0


def interacting_problem(
    flavour: str = "bridge-native",
    seed: int = 0,
    n_heads: int = 4,
    d_mlp: int = 16,
    n_prompts: int = 64,
    seq: int = 8,
    strength: float = 1.0,
    spread: float = 2.0,
) -> PlantedProblem:
    """A 3-layer model with a chain, an AND-like pair and two duplicate heads (see module)."""
    model = tiny_model(flavour, n_layers=3, n_heads=n_heads, d_mlp=d_mlp, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    a = int(torch.randint(n_heads, (1,), generator=gen))
    b = int(torch.randint(n_heads, (1,), generator=gen))
    c = b ^ 1  # b's neighbour: the two share keys and values under grouped-query attention
    n1, n2, m = (int(u) for u in torch.randperm(d_mlp, generator=gen)[:3])
    d_vocab = model.cfg.d_vocab
    clean = torch.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    corrupted = torch.randint(0, d_vocab, (n_prompts, seq), generator=gen)
    # placeholders until the planted model answers (own_answers)
    task = PromptTask.from_tokens(clean, corrupted, [0] * n_prompts, [1] * n_prompts,
                                  name="planted-interacting")  # fmt: skip
    _duplicate_head(model, 1, b, c)
    heads = sorted([(0, a), (1, b), (1, c)])
    neurons = sorted([(1, n1), (1, n2), (2, m)])
    plant(model, heads, neurons, task, strength)
    tokens = torch.cat([task.clean, task.corrupted])
    pos = torch.cat([task.answer_pos, task.answer_pos])
    head_a = _top_direction(_unit_writes(model, tokens, pos, "head", 0, a))
    _wire_neuron(model, task, 1, n1, [head_a], spread)  # the chain a -> n1
    plant(model, heads, neurons, task, strength)  # equal strength again after rewiring
    from_b = _top_direction(_unit_writes(model, tokens, pos, "head", 1, b))
    from_n1 = _top_direction(_unit_writes(model, tokens, pos, "neuron", 1, n1))
    _wire_neuron(model, task, 2, m, [from_b, from_n1], spread)  # m needs b and n1
    circuit: Circuit = plant(model, heads, neurons, task, strength)
    head, neuron = (lambda *i: node_name("head", i)), (lambda *i: node_name("neuron", i))
    circuit.meta.update(chain=[head(0, a), neuron(1, n1)], and_pair=[head(1, b), neuron(1, n1)],
                        duplicates=[head(1, b), head(1, c)], reader=neuron(2, m))  # fmt: skip
    return PlantedProblem(model, circuit, own_answers(model, task))


def _duplicate_head(model: Any, layer: int, src: int, dst: int) -> None:
    """Copy head `src`'s query, key, value and output weights onto head `dst`."""
    attn = model.blocks[layer].attn
    d_head = model.cfg.d_head
    with torch.no_grad():
        for part in ("q", "k", "v", "o"):
            linear = getattr(getattr(attn, part, None), "original_component", None)
            if isinstance(linear, nn.Linear):
                kv = part in ("k", "v") and linear.weight.shape[0] < model.cfg.d_model
                if kv:  # grouped-query attention: heads share keys and values; nothing to copy
                    continue
                s, d = (slice(h * d_head, (h + 1) * d_head) for h in (src, dst))
                if part == "o":
                    linear.weight[:, d] = linear.weight[:, s]
                else:
                    linear.weight[d] = linear.weight[s]
                    if linear.bias is not None:
                        linear.bias[d] = linear.bias[s]
            else:
                w = getattr(attn, f"W_{part.upper()}")
                w[dst] = w[src]
                if part != "o":
                    bias = getattr(attn, f"b_{part.upper()}")
                    bias[dst] = bias[src]

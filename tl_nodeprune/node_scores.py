"""One node list and every method's importance score on it, so that methods compare node by node.

`NodeList` orders every node of a model: attention blocks, MLP blocks, heads, neurons (named by
`granularities.node_name`). `method_scores` gives one float per node of that list (a
`pd.Series`, higher = more important) for node pruning, EAP and EAP-IG at the nodes, activation
patching, edge pruning projected to nodes, and random; `tl_nodeprune.curves` ranks and ablates
by these scores.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import pandas as pd
import torch
from torch import Tensor

from .ablation import AblationKind, capture, mixing_hooks, site_names
from .baselines import edge_pruning, node_effects
from .circuit import Circuit, parse_edge, parse_node
from .granularities import SPECS, node_name, spec
from .objectives import answer_logits, forward_answers, kl_divergence
from .pruner import NodePruner, PruneConfig, PruneResult
from .reference_run import ReferenceRun
from .sites import ModelShape, frozen, hook_name
from .tasks.base import PromptTask

Method = Literal["node_pruning", "eap", "eap_ig", "activation_patching", "edge_pruning", "random"]
METHODS: tuple[str, ...] = get_args(Method)
NODE_GRANULARITIES: tuple[str, ...] = ("attn", "mlp", "head", "neuron")
EMBED_HOOK = "blocks.0.hook_resid_pre"  # the input EAP-IG interpolates


@dataclass(frozen=True)
class NodeList:
    """Every attention block, MLP block, head and neuron of a model shape, in that order.

    A model without MLPs has no MLP blocks and no neurons. Within a granularity nodes follow
    index order (layer, then unit), so `tensors(series(t)) == t`.
    """

    shape: ModelShape

    @classmethod
    def from_model(cls, model: Any) -> NodeList:
        return cls(ModelShape.from_model(model))

    @property
    def granularities(self) -> tuple[str, ...]:
        return tuple(g for g in NODE_GRANULARITIES if self.shape.has(g))

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(name for g in self.granularities for name in self.names_of(g))

    def names_of(self, granularity: str) -> list[str]:
        """The names of one granularity's nodes, in index order."""
        ranges = [range(n) for n in self.shape.units(granularity)]
        return [node_name(granularity, idx) for idx in itertools.product(*ranges)]

    def series(self, tensors: dict[str, Tensor], name: str = "score") -> pd.Series:
        """One float per node from one tensor per granularity (shaped `shape.units(g)`)."""
        missing = [g for g in self.granularities if g not in tensors]
        if missing:
            raise ValueError(f"No scores for {missing}; every granularity of the list needs them.")
        values = torch.cat(
            [tensors[g].detach().double().cpu().flatten() for g in self.granularities]
        )
        return pd.Series(values.numpy(), index=pd.Index(self.names, name="node"), name=name)

    def tensors(self, scores: pd.Series) -> dict[str, Tensor]:
        """The inverse of `series`: one tensor per granularity (a KeyError for missing nodes)."""
        out = {}
        for g in self.granularities:
            values = torch.tensor(scores.loc[self.names_of(g)].to_numpy(), dtype=torch.float32)
            out[g] = values.reshape(self.shape.units(g))
        return out


def method_scores(
    model: Any,
    task: PromptTask,
    method: Method,
    result: PruneResult | Circuit | None = None,
    seed: int = 0,
    ablation: AblationKind = "corrupted",
    exact_neurons: bool = False,
    batch_size: int = 16,
    **settings: Any,
) -> pd.Series:
    """Every node's importance by `method`, over `NodeList.from_model(model).names`.

    `result`: a finished `PruneResult` (node pruning) or edge `Circuit` (edge pruning) to score
    instead of running the method; `settings` go to the method's config. EAP and EAP-IG score
    |attribution| at the nodes (`attribution_scores`); activation patching is exact for blocks
    and heads and for neurons only with `exact_neurons` (else by attribution). `attrs` holds
    the method, how neurons were scored, and seconds (near 0 when `result` is given). Edge
    pruning always trains against corrupted activations; `ablation` applies to the others.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    nodes = NodeList.from_model(model)
    start = time.perf_counter()
    neurons = "own"
    if method == "node_pruning":
        tensors = _pruning_scores(model, task, result, seed, {"ablation": ablation, **settings})
    elif method in ("eap", "eap_ig"):
        steps = 1 if method == "eap" else settings.pop("ig_steps", 5)
        signed = attribution_scores(model, task, steps, ablation, batch_size, **settings)
        tensors = {g: t.abs() for g, t in signed.items()}
    elif method == "activation_patching":
        tensors, neurons = _patching_scores(model, task, ablation, exact_neurons, batch_size)
    elif method == "edge_pruning":
        circuit = result if isinstance(result, Circuit) else edge_pruning(
            model, task, seed=seed, progress=False, **settings
        )  # fmt: skip
        tensors, neurons = edge_node_scores(circuit), "inherited from the MLP block"
    else:
        gen = torch.Generator().manual_seed(seed)
        tensors = {g: torch.rand(nodes.shape.units(g), generator=gen) for g in nodes.granularities}
    scores = nodes.series(tensors, name=method)
    scores.attrs.update(method=method, neurons=neurons, seconds=time.perf_counter() - start)
    return scores


def _pruning_scores(
    model: Any, task: PromptTask, result: Any, seed: int, settings: dict[str, Any]
) -> dict[str, Tensor]:
    """Node pruning's log_alpha, a child's combined with its parent's by min (see below).

    min(own, parent) ranks a head inside a closing block no higher than the block, the way the
    effective gate (own gate x parent gate) would. An ungated parent takes the max of its
    children; an ungated child its parent's value; both ungated: +inf (never pruned).
    """
    if not isinstance(result, PruneResult):
        config = PruneConfig(**{"progress": False, "seed": seed, **settings})
        result = NodePruner(model, config).fit(task)
    shape = ModelShape.from_model(model)
    own = {}
    for g, la in result.log_alpha.items():
        la = la.float()
        own[g] = la.amax(0) if la.dim() > len(shape.units(g)) else la  # position-aware: best
    out: dict[str, Tensor] = {}
    for g in NodeList(shape).granularities:  # parents come first
        parent = spec(g).parent
        if parent is not None:
            up = out[parent].reshape(*out[parent].shape, 1)  # (layer, 1) against (layer, unit)
            out[g] = torch.minimum(own[g], up) if g in own else up.expand(shape.units(g)).clone()
        elif g in own:
            out[g] = own[g]
        else:
            children = [own[c].amax(1) for c, s in SPECS.items() if s.parent == g and c in own]
            out[g] = (torch.stack(children).amax(0) if children
                      else torch.full(shape.units(g), float("inf")))  # fmt: skip
    return out


def attribution_scores(
    model: Any,
    task: PromptTask,
    ig_steps: int = 1,
    ablation: AblationKind = "corrupted",
    batch_size: int = 16,
    corrupted_gradient: bool = False,
) -> dict[str, Tensor]:
    """Signed first-order effect of each node: (clean - ablated) . d metric / d activation.

    Read at the hooks our gates sit at, summed over the node's own axes and every token,
    averaged over prompts: the linear estimate of metric(full) - metric(node ablated at every
    position), as a closed gate does. EAP takes the gradient on the clean run; EAP-IG
    (`ig_steps` > 1) averages it over inputs whose first residual stream runs from the
    ablated one to the clean one (alpha = 1/n ... 1); `corrupted_gradient` takes it at alpha 0
    (TransformerLens's "denoising" attribution patching).
    """
    if not (isinstance(ig_steps, int) and ig_steps >= 1):
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}.")
    shape = ModelShape.from_model(model)
    grans = NodeList(shape).granularities
    names = site_names(shape, grans)
    alphas = [0.0] if corrupted_gradient else [s / ig_steps for s in range(1, ig_steps + 1)]
    interpolate = alphas != [1.0]
    ref = ReferenceRun(model, task, [*names, EMBED_HOOK], ablation, batch_size, fast=True,
                       full_logits=False)  # fmt: skip
    totals = {n: torch.zeros(0) for n in names}
    with frozen(model):
        for start in range(0, len(ref.task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(ref.task)))
            part = ref.task.subset(idx)
            seq = part.clean.shape[1]
            clean = capture(model, part.clean, [*names, EMBED_HOOK])
            ablated = {
                n: clean[n] * 0 if v is None else v
                for n, v in ref.ablation.values(idx.to(ref.ablation.device), seq).items()
            }
            grads = {n: torch.zeros_like(clean[n]) for n in names}
            for alpha in alphas:
                start_value = ablated[EMBED_HOOK] + alpha * (
                    clean[EMBED_HOOK] - ablated[EMBED_HOOK]
                )
                found = _gradients(model, part, names, start_value if interpolate else None,
                                   ref.fast)  # fmt: skip
                for n in names:
                    grads[n] += found[n] / len(alphas)
            for n in names:  # (batch, pos, *axes) -> summed over batch and pos
                contribution = ((clean[n] - ablated[n]) * grads[n]).sum((0, 1)).cpu()
                totals[n] = contribution if not totals[n].numel() else totals[n] + contribution
    return _per_granularity(shape, grans, {n: t / len(task) for n, t in totals.items()})


def _gradients(
    model: Any, part: PromptTask, names: list[str], start: Tensor | None, fast: bool
) -> dict[str, Tensor]:
    """d sum(metric) / d activation at each hook in `names`, read from zero probes added there.

    `start`, if given, replaces the first residual stream (EAP-IG's interpolated input).
    """
    probes: dict[str, Tensor] = {}

    def probe(name: str, x: Tensor, hook: Any) -> Tensor:
        probes[name] = torch.zeros_like(x, requires_grad=True)
        return x + probes[name]

    hooks: list[tuple[str, Callable[..., Tensor]]] = [
        (n, functools.partial(probe, n)) for n in names
    ]
    if start is not None:
        hooks.insert(0, (EMBED_HOOK, lambda x, hook: start.to(x.dtype)))
    with torch.enable_grad():
        logits = forward_answers(model, part.clean, part.answer_pos, hooks, fast)
        metric = part.score(logits).sum()
        found = torch.autograd.grad(metric, [probes[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(probes[n]) if g is None else g
            for n, g in zip(names, found, strict=True)}  # fmt: skip


def _per_granularity(
    shape: ModelShape, grans: tuple[str, ...], by_hook: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Per-hook sums (activation axes) -> one tensor per granularity (layer, unit axes)."""
    out = {}
    for g in grans:
        s = spec(g)
        keep = len(s.unit_axes)
        layers = []
        for layer in range(shape.n_layers):
            t = by_hook[s.hook_name(layer)]  # (*activation axes)
            layers.append(t.sum(tuple(range(keep, t.dim()))) if t.dim() > keep else t)
        out[g] = torch.stack(layers)
    return out


def _patching_scores(
    model: Any, task: PromptTask, ablation: AblationKind, exact_neurons: bool, batch_size: int
) -> tuple[dict[str, Tensor], str]:
    """|drop of the task metric| when one node is ablated alone; neurons by attribution unless
    `exact_neurons` (one pass per neuron). Attribution estimates the same drop, in the same units.
    """
    shape = ModelShape.from_model(model)
    group = 1 if exact_neurons and shape.has("neuron") else None
    effects = node_effects(model, task, ablation, "metric", group, batch_size)
    out = {g: t.abs() for g, t in effects.items()}
    out["attn"] = attention_block_effects(model, task, ablation, batch_size).abs()
    how = "exact" if group else "attribution"
    if shape.has("neuron") and not group:
        out["neuron"] = attribution_scores(model, task, 1, ablation, batch_size)["neuron"].abs()
    return out, how


def attention_block_effects(
    model: Any,
    task: PromptTask,
    ablation: AblationKind = "corrupted",
    batch_size: int = 16,
    effect: Literal["kl", "metric"] = "metric",
) -> Tensor:
    """Per layer, the effect of ablating its whole attention block alone (as `node_effects`)."""
    shape = ModelShape.from_model(model)
    names = [hook_name("attn", layer) for layer in range(shape.n_layers)]
    ref = ReferenceRun(model, task, names, ablation, batch_size, fast=True)
    out = torch.zeros(shape.units("attn"))
    with frozen(model):
        full_metric = ref.task.score(ref.full).mean()
        for layer, name in enumerate(names):
            masks = {name: torch.zeros((), device=ref.ablation.device)}
            hooks_for = functools.partial(_ablating, masks, ref)
            logits = answer_logits(model, ref.task, hooks_for, batch_size, ref.fast)
            out[layer] = (
                kl_divergence(ref.full, logits) if effect == "kl"
                else full_metric - ref.task.score(logits).mean()
            ).item()  # fmt: skip
    return out


def _ablating(masks: dict[str, Tensor], ref: ReferenceRun, idx: Tensor, seq: int) -> list:
    return mixing_hooks(masks, ref.ablation.values(idx, seq))


def edge_node_scores(circuit: Circuit, magnitude: bool = False) -> dict[str, Tensor]:
    """Edge scores projected to nodes: a node's score is the max over the edges it writes or reads.

    Under grouped-query attention a `<k>`/`<v>` reader is a shared key/value head and counts
    for no query head. A node with no scored edge gets -inf; an attention block takes its best
    head; a neuron inherits its MLP block's score (edge methods keep or drop MLPs whole).
    `magnitude` ranks by |score| (signed attribution scores such as EAP's).
    """
    if not circuit.edge_scores:
        raise ValueError("The circuit has no edge_scores; pass an edge circuit with scores.")
    shape = circuit.shape
    out = {g: torch.full(shape.units(g), float("-inf")) for g in ("head", "mlp") if shape.has(g)}
    for name, score in circuit.edge_scores.items():
        writer, reader, kind = parse_edge(name, shape)
        ends = [writer] if kind in ("k", "v") and shape.kv_heads != shape.n_heads else [
            writer, reader]  # fmt: skip
        value = abs(score) if magnitude else score
        for end in ends:
            if end not in ("input", "logits"):
                g, index = parse_node(end, shape)
                out[g][index] = max(float(out[g][index]), value)
    out["attn"] = out["head"].amax(1)
    if shape.has("neuron"):
        out["neuron"] = out["mlp"][:, None].expand(shape.units("neuron")).clone()
    return out


__all__ = [
    "METHODS",
    "NodeList",
    "attention_block_effects",
    "attribution_scores",
    "edge_node_scores",
    "method_scores",
]

"""Faithfulness of an edge circuit: every edge outside it patched to its corrupted value."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..ablation import DEFAULT_CACHE_BYTES, Ablation
from ..circuit import Circuit
from ..evaluation import Evaluation
from ..reference_run import ReferenceRun
from ..sites import frozen, model_device
from ..tasks.base import PromptTask
from .graph import EdgeGraph, ProjectionWeights, capture_names, edge_forward


def edge_mask_of(graph: EdgeGraph, edges: tuple[str, ...] | list[str]) -> Float[Tensor, " edges"]:
    """A 0/1 mask over the graph's edges, 1 on `edges` (unknown names raise a KeyError)."""
    mask = torch.zeros(graph.n_edges)
    for name in edges:
        if name not in graph.edge_index:
            raise KeyError(f"Edge {name!r} is not in this model's graph.")
        mask[graph.edge_index[name]] = 1.0
    return mask


def edge_logits(
    model: Any, graph: EdgeGraph, task: PromptTask, mask: Tensor, batch_size: int = 32
) -> Float[Tensor, "batch vocab"]:
    """Answer logits with edges weighted by `mask` (corrupted ablation), without gradient."""
    with frozen(model):
        weights = ProjectionWeights(model, graph.shape)
        ablation = Ablation(model, task, capture_names(graph), "corrupted", batch_size)
        return masked_logits(model, graph, task, mask, ablation, weights, batch_size)


def masked_logits(
    model: Any,
    graph: EdgeGraph,
    task: PromptTask,
    mask: Tensor,
    ablation: Ablation,
    weights: ProjectionWeights,
    batch_size: int = 32,
    fast: bool = True,
) -> Float[Tensor, "batch vocab"]:
    """`edge_logits` from a prebuilt corrupted `ablation` and `weights`, without gradient.

    Building those costs a forward pass and a copy of the weights; callers that score many
    masks on one task (ACDC: one call per edge) build them once and call this.
    """
    device = model_device(model)
    mask = mask.to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            part = task.subset(idx)
            values = ablation.values(idx, part.clean.shape[1])
            out.append(edge_forward(model, graph, part.clean.to(device), part.answer_pos,
                                    mask, values, fast, weights=weights))  # fmt: skip
    return torch.cat(out)


class EdgeEvaluator:
    """Scores many edge circuits on one task from one cache (every edge outside one ablated).

    The corrupted activations, the projection weights, the full model's logits and the empty
    circuit's (every edge ablated) are the same for every circuit, so they are made once; a
    faithfulness curve then costs one masked forward per point instead of a new reference run.
    """

    def __init__(
        self,
        model: Any,
        task: PromptTask,
        batch_size: int = 32,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.model, self.batch_size = model, batch_size
        self.graph = EdgeGraph.from_model(model)
        # The full model and every masked pass on one path (answer positions only where
        # that reproduces the model), so f and KL compare like with like.
        self.reference = ReferenceRun(model, task, capture_names(self.graph),
                                      batch_size=batch_size, cache_bytes=cache_bytes,
                                      fast=True)  # fmt: skip
        self.task, self.full = self.reference.task, self.reference.full
        with frozen(model):
            self.weights = ProjectionWeights(model, self.graph.shape)
        self.empty = self.logits(torch.zeros(self.graph.n_edges))

    def mask(self, edges: Circuit | Tensor) -> Float[Tensor, " edges"]:
        """The flat edge mask of an edge circuit (its `edges`), or `edges` itself if a mask."""
        if isinstance(edges, Circuit):
            if edges.edges is None:
                raise ValueError("This circuit has no edges; use tnp.evaluate for node circuits.")
            edges.check_model(self.model)
            return edge_mask_of(self.graph, edges.edges)
        if edges.shape != (self.graph.n_edges,):
            raise ValueError(
                f"An edge mask needs shape ({self.graph.n_edges},) (EdgeGraph.edge_names "
                f"order), got {tuple(edges.shape)}."
            )
        return edges

    def logits(self, mask: Float[Tensor, " edges"]) -> Float[Tensor, "batch vocab"]:
        """Answer logits with every edge weighted by `mask` (0: ablated), without gradient."""
        with frozen(self.model):
            return masked_logits(self.model, self.graph, self.task, mask, self.reference.ablation,
                                 self.weights, self.batch_size, self.reference.fast)  # fmt: skip

    def __call__(self, edges: Circuit | Tensor) -> Evaluation:
        """Evaluate one edge circuit (or 0/1 edge mask) against the cached full and empty model."""
        kept = self.logits(self.mask(edges))
        return Evaluation.from_logits(self.task, self.full, kept, self.empty, "corrupted (edges)")


def evaluate_edges(
    model: Any, circuit: Circuit, task: PromptTask, batch_size: int = 32
) -> Evaluation:
    """Like `tnp.evaluate`, but ablating edges outside `circuit.edges` instead of nodes.

    One circuit: to score many on one task, build one `EdgeEvaluator` and call it per circuit.
    """
    if circuit.edges is None:
        raise ValueError("This circuit has no edges; use tnp.evaluate for node circuits.")
    circuit.check_model(model)
    return EdgeEvaluator(model, task, batch_size)(circuit)


__all__ = ["EdgeEvaluator", "edge_logits", "edge_mask_of", "evaluate_edges", "masked_logits"]

"""Faithfulness of an edge circuit: every edge outside it patched to its corrupted value."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..ablation import Ablation
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


def evaluate_edges(
    model: Any, circuit: Circuit, task: PromptTask, batch_size: int = 32
) -> Evaluation:
    """Like `tnp.evaluate`, but ablating edges outside `circuit.edges` instead of nodes."""
    if circuit.edges is None:
        raise ValueError("This circuit has no edges; use tnp.evaluate for node circuits.")
    circuit.check_model(model)
    graph = EdgeGraph.from_model(model)
    ref = ReferenceRun(model, task, capture_names(graph), batch_size=batch_size)
    with frozen(model):
        weights = ProjectionWeights(model, graph.shape)
        kept, empty = (
            masked_logits(model, graph, ref.task, mask, ref.ablation, weights, batch_size)
            for mask in (edge_mask_of(graph, circuit.edges), torch.zeros(graph.n_edges))
        )
    return Evaluation.from_logits(ref.task, ref.full, kept, empty, "corrupted (edges)")


__all__ = ["edge_logits", "edge_mask_of", "evaluate_edges", "masked_logits"]

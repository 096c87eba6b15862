"""Edge attribution patching (EAP) and EAP-IG: first-order edge effects from one backward pass.

An edge w -> r scores (clean output of w - corrupted output of w) . d metric / d (input of r),
summed over positions and averaged over prompts. EAP takes the gradient on the clean run;
EAP-IG (Hanna et al. 2024) averages it over `ig_steps` runs whose input embeddings are
interpolated from the corrupted to the clean prompt (alpha = 1/n, 2/n, ..., 1). Gradients at
each reader's input are read from a zero "probe" added to it in the edge-masked forward.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..circuit import Circuit
from ..objectives import forward_answers
from ..reference_run import ReferenceRun
from ..sites import frozen, model_device
from ..tasks.base import PromptTask
from .graph import EdgeGraph, EdgeRun, ProjectionWeights, capture_names


def eap_scores(
    model: Any,
    task: PromptTask,
    ig_steps: int = 1,
    batch_size: int = 16,
    corrupted_gradient: bool = False,
) -> Float[Tensor, " edges"]:
    """Signed EAP (ig_steps=1) or EAP-IG score of every edge, in `EdgeGraph.edge_names` order.

    Positive: moving the edge from corrupted to clean raises the task metric. With
    `corrupted_gradient` (plain EAP only) the gradient is taken on the corrupted run, the
    "denoising" form of TransformerLens's `attribution_patching`.
    """
    if not (isinstance(ig_steps, int) and ig_steps >= 1):
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}.")
    if corrupted_gradient and ig_steps != 1:
        raise ValueError("corrupted_gradient applies to plain EAP only (ig_steps=1).")
    graph = EdgeGraph.from_model(model)
    device = model_device(model)
    total = torch.zeros(graph.n_edges, device=device)
    ones = torch.ones(graph.n_edges, device=device)
    ablation = ReferenceRun(
        model, task, capture_names(graph), batch_size=batch_size, full_logits=False
    ).ablation
    with frozen(model):
        weights = ProjectionWeights(model, graph.shape)
        for start in range(0, len(task), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(task)))
            part = task.subset(idx)
            tokens = part.clean.to(device)
            corr = ablation.values(idx, tokens.shape[1])
            clean = EdgeRun(model, graph, ones, corr, weights=weights)
            with torch.no_grad():
                forward_answers(model, tokens, part.answer_pos, clean.hooks())
            deltas = clean.chunks  # clean minus corrupted output of every writer
            embed_delta = deltas[0][0]
            grads = {key: torch.zeros(len(idx), tokens.shape[1], n, graph.shape.d_model,
                                      device=device) for key, _, n, _ in graph.groups}  # fmt: skip
            for step in range(1, ig_steps + 1):
                alpha = 0.0 if corrupted_gradient else step / ig_steps
                probes = {k: torch.zeros_like(g, requires_grad=True) for k, g in grads.items()}
                run = EdgeRun(
                    model, graph, ones, corr, probes=probes, weights=weights,
                    input_value=corr["blocks.0.hook_resid_pre"] + alpha * embed_delta,
                )  # fmt: skip
                logits = forward_answers(model, tokens, part.answer_pos, run.hooks())
                metric = part.score(logits).sum()
                found = torch.autograd.grad(metric, list(probes.values()))
                for key, g in zip(probes, found, strict=True):
                    grads[key] += g / ig_steps
            total += _edge_products(graph, deltas, grads)
    return total.cpu() / len(task)


def _edge_products(graph: EdgeGraph, deltas: list[Tensor], grads: dict) -> Tensor:
    """Per edge, delta(writer) . grad(reader) summed over batch and positions (flat order)."""
    out = []
    for key, _, _n, up in graph.groups:
        scores, start = [], 0
        for chunk in deltas:
            if start >= up:
                break
            scores.append(torch.einsum("wbpd,bprd->rw", chunk, grads[key]))
            start += chunk.shape[0]
        out.append(torch.cat(scores, dim=1)[:, :up].reshape(-1))
    return torch.cat(out)


def select_edges(
    graph: EdgeGraph, scores: Tensor, top_n: int | None = None, threshold: float | None = None
) -> list[str]:
    """Edge names with the largest |score|: the `top_n` best, or all with |score| > threshold."""
    if (top_n is None) == (threshold is None):
        raise ValueError("Give exactly one of top_n (number of edges) or threshold (|score|).")
    magnitude = scores.abs()
    if top_n is not None:
        if not 0 < top_n <= graph.n_edges:
            raise ValueError(f"top_n must be in 1..{graph.n_edges}, got {top_n}.")
        chosen = magnitude.topk(top_n).indices.sort().values
    else:
        chosen = (magnitude > threshold).nonzero().flatten()
    return [graph.edge_names[i] for i in chosen.tolist()]


def eap(
    model: Any,
    task: PromptTask,
    ig_steps: int = 1,
    top_n: int | None = None,
    threshold: float | None = None,
    batch_size: int = 16,
) -> Circuit:
    """EAP (`ig_steps=1`) or EAP-IG circuit: selected edges, their induced nodes, every score."""
    start = time.perf_counter()
    if top_n is None and threshold is None:
        top_n = max(1, EdgeGraph.from_model(model).n_edges // 20)  # 5% of edges by default
    graph = EdgeGraph.from_model(model)
    scores = eap_scores(model, task, ig_steps, batch_size)
    kept = select_edges(graph, scores, top_n, threshold)
    meta = {
        "method": "eap" if ig_steps == 1 else "eap_ig",
        "ig_steps": ig_steps,
        "task": task.name,
        "top_n": top_n,
        "threshold": threshold,
        "seconds": time.perf_counter() - start,
        "n_edges_total": graph.n_edges,
    }
    edge_scores = dict(zip(graph.edge_names, scores.tolist(), strict=True))
    return Circuit.from_edges(graph.shape, kept, edge_scores=edge_scores, meta=meta)


def eap_ig(model: Any, task: PromptTask, ig_steps: int = 5, **kwargs: Any) -> Circuit:
    """EAP-IG with `ig_steps` interpolation points (5 by default, as in Hanna et al. 2024)."""
    return eap(model, task, ig_steps=ig_steps, **kwargs)


__all__ = ["eap", "eap_ig", "eap_scores", "select_edges"]

"""ACDC (Conmy et al. 2023): remove edges one by one while the KL to the full model stays low.

Readers are visited from the logits backwards (last layer first); each incoming edge is
tried, and removed for good when removing it raises KL(full || circuit) by less than
`threshold`. A writer left without outgoing edges loses its incoming edges untested,
since nothing reads it any more. One forward pass over the task per tested edge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..circuit import Circuit
from ..objectives import kl_divergence
from ..reference_run import ReferenceRun
from ..sites import frozen, model_device
from ..tasks.base import PromptTask
from .edge_eval import masked_logits
from .graph import EdgeGraph, ProjectionWeights, capture_names

DEFAULT_MAX_FORWARD_PASSES = 20_000


def estimate_forward_passes(graph: EdgeGraph, n_prompts: int, batch_size: int) -> int:
    """Upper bound on ACDC's forward passes: every edge tested once, in task batches."""
    return (graph.n_edges + 1) * math.ceil(n_prompts / batch_size)


def acdc(
    model: Any,
    task: PromptTask,
    threshold: float = 0.01,
    batch_size: int = 64,
    max_forward_passes: int = DEFAULT_MAX_FORWARD_PASSES,
    force: bool = False,
) -> Circuit:
    """Edges ACDC keeps at `threshold` (nats of KL); refuses graphs above `max_forward_passes`."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    graph = EdgeGraph.from_model(model)
    estimate = _check_budget(graph, len(task), batch_size, max_forward_passes, force)
    start = time.perf_counter()
    device = model_device(model)
    ref = ReferenceRun(model, task, capture_names(graph), batch_size=batch_size, fast=True)
    ablation, fast, full = ref.ablation, ref.fast, ref.full
    with frozen(model):
        weights = ProjectionWeights(model, graph.shape)

        def kl_of(mask: Tensor) -> float:
            logits = masked_logits(model, graph, task, mask, ablation, weights, batch_size, fast)
            return kl_divergence(full, logits).item()

        sweep = _sweep(graph, kl_of, threshold, torch.ones(graph.n_edges, device=device))
    names = graph.edge_names
    kept = [names[i] for i in sweep.mask.nonzero().flatten().tolist()]
    meta = {
        "method": "acdc",
        "task": task.name,
        "threshold": threshold,
        "final_kl": sweep.kl,
        "forward_passes": sweep.tested * math.ceil(len(task) / batch_size),
        "estimate": estimate,
        "seconds": time.perf_counter() - start,
        "n_edges_total": graph.n_edges,
    }
    return Circuit.from_edges(graph.shape, kept, edge_scores=sweep.scores, meta=meta)


def _check_budget(
    graph: EdgeGraph, n_prompts: int, batch_size: int, max_forward_passes: int, force: bool
) -> int:
    """The forward-pass estimate; raises when it exceeds `max_forward_passes` unless forced."""
    estimate = estimate_forward_passes(graph, n_prompts, batch_size)
    if estimate > max_forward_passes and not force:
        raise ValueError(
            f"ACDC would need up to {estimate:,} forward passes ({graph.n_edges:,} edges x "
            f"{math.ceil(n_prompts / batch_size)} batches of {batch_size} prompts), above "
            f"max_forward_passes={max_forward_passes:,}. Use a smaller model or task, raise "
            "max_forward_passes, or pass force=True."
        )
    return estimate


@dataclass
class _Sweep:
    """ACDC's state: the edge mask, its KL, forward passes so far, each tested edge's KL rise."""

    mask: Tensor
    kl: float
    tested: int
    scores: dict[str, float]


def _sweep(
    graph: EdgeGraph, kl_of: Callable[[Tensor], float], threshold: float, mask: Tensor
) -> _Sweep:
    """Visit readers from the logits backwards and try removing each of their incoming edges."""
    sweep = _Sweep(mask, kl_of(mask), 1, {})
    for key, offset, n, up in reversed(graph.groups):
        for r in range(n):
            reader_node = _reader_node(key, r, graph)
            alive = reader_node is None or _has_outgoing(graph, sweep.mask, reader_node)
            for w in reversed(range(up)):
                i = offset + r * up + w
                if not alive:
                    sweep.mask[i] = 0.0
                    continue
                _try_removing(sweep, i, graph.edge_names[i], kl_of, threshold)
    return sweep


def _try_removing(
    sweep: _Sweep, i: int, name: str, kl_of: Callable[[Tensor], float], threshold: float
) -> None:
    """Remove edge `i` for good if that raises the KL by less than `threshold`; record the rise."""
    sweep.mask[i] = 0.0
    trial = kl_of(sweep.mask)
    sweep.tested += 1
    sweep.scores[name] = trial - sweep.kl
    if trial - sweep.kl < threshold:
        sweep.kl = trial
    else:
        sweep.mask[i] = 1.0


def _reader_node(key: tuple[int, str], r: int, graph: EdgeGraph) -> int | None:
    """Index (in `graph.writers`) of the node a reader belongs to; None for logits and k/v.

    Under grouped-query attention a k/v reader serves several query heads, so it is always
    treated as alive; without it, k and v readers belong to head r like q.
    """
    layer, kind = key
    if kind == "logits":
        return None
    if kind == "mlp":
        return 1 + layer * graph.per_layer + graph.shape.n_heads
    if kind in ("k", "v") and graph.shape.kv_heads != graph.shape.n_heads:
        return None
    return 1 + layer * graph.per_layer + r


def _has_outgoing(graph: EdgeGraph, mask: Tensor, writer: int) -> bool:
    """Whether any kept edge leaves `writer`."""
    spread = graph.node_mask(torch.nn.functional.one_hot(torch.tensor(writer), graph.n_writers))
    return bool((mask.cpu() * spread.float()).sum() > 0)


__all__ = ["acdc", "estimate_forward_passes"]

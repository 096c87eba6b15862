"""ACDC (Conmy et al. 2023): remove edges one by one while the KL to the full model stays low.

Readers are visited from the logits backwards (last layer first); each incoming edge is
tried, and removed for good when removing it raises KL(full || circuit) by less than
`threshold`. A writer left without outgoing edges loses its incoming edges untested,
since nothing reads it any more. One forward pass over the task per tested edge.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from ..ablation import Ablation
from ..circuit import Circuit
from ..objectives import answer_logits, fast_path_matches, kl_divergence
from ..sites import frozen, model_device
from ..tasks.base import PromptTask
from .edge_eval import masked_logits
from .graph import EdgeGraph, _capture_names, _Weights

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
    estimate = estimate_forward_passes(graph, len(task), batch_size)
    if estimate > max_forward_passes and not force:
        raise ValueError(
            f"ACDC would need up to {estimate:,} forward passes ({graph.n_edges:,} edges x "
            f"{math.ceil(len(task) / batch_size)} batches of {batch_size} prompts), above "
            f"max_forward_passes={max_forward_passes:,}. Use a smaller model or task, raise "
            "max_forward_passes, or pass force=True."
        )
    task.check_vocab(graph.shape.d_vocab)
    start = time.perf_counter()
    device = model_device(model)
    with frozen(model):
        weights = _Weights(model, graph.shape)
        ablation = Ablation(model, task, _capture_names(graph), "corrupted", batch_size)
        fast = fast_path_matches(model, task)
        full = answer_logits(model, task, batch_size=batch_size, fast=fast)

        def kl_of(mask: Tensor) -> float:
            logits = masked_logits(model, graph, task, mask, ablation, weights, batch_size, fast)
            return kl_divergence(full, logits).item()

        mask = torch.ones(graph.n_edges, device=device)
        current, tested = kl_of(mask), 1
        scores: dict[str, float] = {}
        for key, offset, n, up in reversed(graph.groups):
            for r in range(n):
                reader_node = _reader_node(key, r, graph)
                alive = reader_node is None or _has_outgoing(graph, mask, reader_node)
                for w in reversed(range(up)):
                    i = offset + r * up + w
                    if not alive:
                        mask[i] = 0.0
                        continue
                    mask[i] = 0.0
                    trial = kl_of(mask)
                    tested += 1
                    scores[graph.edge_names[i]] = trial - current
                    if trial - current < threshold:
                        current = trial
                    else:
                        mask[i] = 1.0
    names = graph.edge_names
    kept = [names[i] for i in mask.nonzero().flatten().tolist()]
    meta = {
        "method": "acdc",
        "task": task.name,
        "threshold": threshold,
        "final_kl": current,
        "forward_passes": tested * math.ceil(len(task) / batch_size),
        "estimate": estimate,
        "seconds": time.perf_counter() - start,
        "n_edges_total": graph.n_edges,
    }
    return Circuit.from_edges(graph.shape, kept, edge_scores=scores, meta=meta)


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

"""Faithfulness curves of edge methods with the edges outside the circuit ablated (issue 19).

`curves.curve` ranks an edge method's scores projected to nodes and ablates nodes. Here the
edge scores are read as the method means them: keep the top round(fraction * E) edges of the
`EdgeGraph` (E edges), patch every other edge to its corrupted value (`EdgeEvaluator`: one
reference run for the whole curve), and count the nodes the kept edges touch (read from or
write to, as `Circuit.from_edges` induces them), so that `curves.size_for` reads "nodes
needed for f >= T" off an edge curve as off a node curve. The x axis of CPR and CMD is the
fraction of *edges* kept (MIB's edge-level convention).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from .baselines.eap import eap_scores
from .baselines.edge_eval import EdgeEvaluator
from .baselines.edge_pruning import edge_pruning
from .baselines.graph import EdgeGraph
from .circuit import Circuit
from .curves import Level, level_nodes, size_for
from .metrics import MIB_FRACTIONS, cmd, cpr
from .node_scores import NodeList
from .sites import ModelShape
from .tasks.base import PromptTask

EdgeMethod = Literal["eap", "eap_ig", "edge_pruning"]
EDGE_METHODS: tuple[str, ...] = ("eap", "eap_ig", "edge_pruning")
EDGES_ABLATED = " (edges ablated)"  # suffix of an edge method's rows that ablate edges


def method_edge_scores(
    model: Any,
    task: PromptTask,
    method: EdgeMethod,
    result: Circuit | None = None,
    ig_steps: int = 5,
    batch_size: int = 16,
    **settings: Any,
) -> pd.Series:
    """Every edge's score by an edge method, indexed by `EdgeGraph.edge_names`, higher = kept
    first.

    EAP and EAP-IG: |signed attribution| (`eap_scores`; an edge that lowers the metric matters
    as much as one that raises it, as `eap.select_edges` ranks). Edge pruning: the learned
    log_alpha of each edge mask, signed, as trained (`result`: its finished edge circuit, reused
    instead of training again; `settings` go to `edge_pruning` otherwise). `attrs` holds the
    method, the ranking and seconds (near 0 when `result` is given).
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"Unknown edge method {method!r}; choose from {', '.join(EDGE_METHODS)}.")
    graph = EdgeGraph.from_model(model)
    start = time.perf_counter()
    if method == "edge_pruning":
        circuit = result if result is not None else edge_pruning(model, task, progress=False,
                                                                 **settings)  # fmt: skip
        if not circuit.edge_scores:
            raise ValueError("Edge pruning's circuit has no edge_scores (its log_alpha).")
        values = [circuit.edge_scores.get(name, -math.inf) for name in graph.edge_names]
        ranking = "log_alpha"
    else:
        steps = 1 if method == "eap" else ig_steps
        values = eap_scores(model, task, steps, batch_size, **settings).abs().tolist()
        ranking = "|attribution|"
    scores = pd.Series(values, index=pd.Index(graph.edge_names, name="edge"), name=method)
    scores.attrs.update(method=method, ranking=ranking, seconds=time.perf_counter() - start)
    return scores


def edge_ends(graph: EdgeGraph) -> tuple[Tensor, Tensor]:
    """Per edge (flat order), the index in `graph.writers` of its writer and of the node it
    reads into (-1 for the logits and, under grouped-query attention, for a key/value head,
    which no query head owns alone; `Circuit.from_edges`'s convention)."""
    writers, readers = [], []
    gqa = graph.shape.kv_heads != graph.shape.n_heads
    for (layer, kind), _, n, up in graph.groups:
        base = 1 + layer * graph.per_layer  # writers index of the layer's first head
        if kind == "q" or (kind in ("k", "v") and not gqa):
            reader = base + torch.arange(n)
        elif kind == "mlp":
            reader = torch.full((n,), base + graph.shape.n_heads)
        else:
            reader = torch.full((n,), -1)
        writers.append(torch.arange(up).repeat(n))  # edges run writer-fastest per reader
        readers.append(reader.repeat_interleave(up))
    return torch.cat(writers), torch.cat(readers)


def touched_counts(graph: EdgeGraph, order: Tensor) -> dict[str, Tensor]:
    """For every k in 0..E, the heads and MLP blocks that the first k edges of `order` touch.

    Returns {"head": (E + 1,), "mlp": (E + 1,)} counts; a node counts from the first kept edge
    it writes or reads (`edge_ends`); the input and the logits are never counted.
    """
    n_edges = graph.n_edges
    writer, reader = edge_ends(graph)
    rank = torch.empty(n_edges, dtype=torch.long)
    rank[order] = torch.arange(n_edges)
    first = torch.full((graph.n_writers,), n_edges, dtype=torch.long)  # n_edges: never touched
    first.scatter_reduce_(0, writer, rank, "amin")
    valid = reader >= 0
    first.scatter_reduce_(0, reader[valid], rank[valid], "amin")
    position = (torch.arange(graph.n_writers) - 1) % graph.per_layer  # input: per_layer - 1
    is_head = position < graph.shape.n_heads
    is_head[0] = False
    kinds = {"head": is_head}
    if graph.has_mlp:
        kinds["mlp"] = ~is_head
        kinds["mlp"][0] = False
    out = {}
    for g, members in kinds.items():
        hist = torch.bincount(first[members], minlength=n_edges + 1)
        out[g] = torch.cat([torch.zeros(1, dtype=torch.long), hist.cumsum(0)[:n_edges]])
    out.setdefault("mlp", torch.zeros(n_edges + 1, dtype=torch.long))
    return out


def level_size(heads: Any, mlp: Any, shape: ModelShape, level: Level) -> Any:
    """Nodes of `level` that heads and MLP blocks make: a touched MLP block runs every neuron."""
    grans = level_nodes(NodeList(shape), level)
    per_mlp = shape.units("neuron")[1] if "neuron" in grans else 1
    return heads + (mlp * per_mlp if shape.has("mlp") else 0)


def ranking(graph: EdgeGraph, scores: pd.Series | Tensor) -> Tensor:
    """Edge indices, best first: descending score, ties to the earlier edge, NaN last.

    A Series is read by edge name (an edge it lacks counts as NaN); a tensor in flat order.
    """
    if isinstance(scores, pd.Series):
        scores = torch.tensor(scores.reindex(graph.edge_names).to_numpy(dtype=float))
    if scores.shape != (graph.n_edges,):
        raise ValueError(f"Expected {graph.n_edges} edge scores, got {tuple(scores.shape)}.")
    values = scores.detach().double().cpu().nan_to_num(nan=-math.inf)
    return torch.sort(values, descending=True, stable=True).indices


def edge_curve(
    model: Any,
    task: PromptTask,
    edge_scores: pd.Series | Tensor,
    fractions: Sequence[float] = MIB_FRACTIONS,
    level: Level = "blocks_heads",
    evaluator: EdgeEvaluator | None = None,
) -> pd.DataFrame:
    """f and KL with the top round(fraction * E) edges kept and every other edge ablated.

    `edge_scores` rank as given, higher first (`method_edge_scores` gives |attribution| for
    EAP and EAP-IG, log_alpha for edge pruning). Returns fraction, n_edges, heads, mlp,
    neurons (the nodes the kept edges touch; a touched MLP block runs all its neurons),
    n_nodes (`level`'s count of them, for `size_for`), faithfulness, kl; `attrs` holds cpr and
    cmd over the fraction of edges.
    """
    evaluator = evaluator or EdgeEvaluator(model, task)
    graph, shape = evaluator.graph, evaluator.graph.shape
    order = ranking(graph, edge_scores)
    counts = touched_counts(graph, order)
    per_mlp = shape.units("neuron")[1] if shape.has("neuron") else 0
    rows = []
    for fraction in fractions:
        if not 0 <= fraction <= 1:
            raise ValueError(f"Fractions must be in [0, 1], got {fraction}.")
        n = int(fraction * graph.n_edges + 0.5)
        mask = torch.zeros(graph.n_edges)
        mask[order[:n]] = 1.0
        result = evaluator(mask)
        heads, mlp = int(counts["head"][n]), int(counts["mlp"][n])
        rows.append({"fraction": fraction, "n_edges": n, "heads": heads, "mlp": mlp,
                     "neurons": mlp * per_mlp, "n_nodes": level_size(heads, mlp, shape, level),
                     "faithfulness": result.faithfulness, "kl": result.kl})  # fmt: skip
    frame = pd.DataFrame(rows)
    if len(frame) >= 2:
        frame.attrs.update(cpr=cpr(frame.fraction, frame.faithfulness),
                           cmd=cmd(frame.fraction, frame.faithfulness))  # fmt: skip
    method = edge_scores.attrs.get("method") if isinstance(edge_scores, pd.Series) else None
    frame.attrs.update(level=level, n_total=graph.n_edges, method=method, ablated="edges")
    return frame


def at_level(curve: pd.DataFrame, shape: ModelShape, level: Level) -> pd.DataFrame:
    """The same measured edge curve with `n_nodes` counted at another level (no new pass)."""
    out = curve.assign(n_nodes=level_size(curve.heads, curve.mlp, shape, level))
    out.attrs = {**curve.attrs, "level": level}
    return out


def edges_within(graph: EdgeGraph, scores: pd.Series | Tensor, n_nodes: int, level: Level) -> int:
    """The most top-ranked edges whose touched nodes at `level` number at most `n_nodes`."""
    counts = touched_counts(graph, ranking(graph, scores))
    sizes = level_size(counts["head"], counts["mlp"], graph.shape, level)  # non-decreasing
    return int((sizes <= n_nodes).sum()) - 1


def first_meeting(curve: pd.DataFrame, n_nodes: int | None, target_f: float) -> pd.Series:
    """The row of fewest edges that touches `n_nodes` nodes and has f >= `target_f` (empty if
    none): several points of an edge curve can touch the same nodes, with different f and KL."""
    if n_nodes is None:
        return pd.Series(dtype=float)
    rows = curve.sort_values("n_edges", kind="stable")
    hits = rows[(rows.n_nodes == n_nodes) & (rows.faithfulness >= target_f)]
    return hits.iloc[0] if len(hits) else pd.Series(dtype=float)


def compare_edge_methods(
    model: Any,
    task: PromptTask,
    edge_scores: Mapping[str, pd.Series],
    fractions: Sequence[float] = MIB_FRACTIONS,
    level: Level = "blocks_heads",
    at_size: int | None = None,
    target_f: float = 0.9,
    max_kl: float | Sequence[float] = (0.3, 0.1),
    evaluator: EdgeEvaluator | None = None,
    curves: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """`curves.compare_methods`' table for edge methods with the edges outside ablated.

    One row per method, named method + " (edges ablated)", with compare_methods' columns: CPR
    and CMD over the fraction of edges; sizes (n_f, n_kl_*) in nodes touched at `level`; f and
    KL at `at_size` nodes are those of the most top edges that touch at most `at_size` nodes.
    `curves` (from another level) are re-counted instead of measured again.
    """
    evaluator = evaluator or EdgeEvaluator(model, task)
    shape = evaluator.graph.shape
    budgets = [max_kl] if isinstance(max_kl, (int, float)) else list(max_kl)
    given = dict(curves or {})
    measured = {m: at_level(given[m], shape, level) if m in given
                else edge_curve(model, task, s, fractions, level, evaluator)
                for m, s in edge_scores.items()}  # fmt: skip
    rows = []
    for m, c in measured.items():
        n_f = size_for(c, target_f=target_f)
        f_at, kl_at = math.nan, math.nan
        if at_size is not None:
            k = edges_within(evaluator.graph, edge_scores[m], at_size, level)
            mask = torch.zeros(evaluator.graph.n_edges)
            mask[ranking(evaluator.graph, edge_scores[m])[:k]] = 1.0
            at = evaluator(mask)
            f_at, kl_at = at.faithfulness, at.kl
        rows.append({
            "method": m + EDGES_ABLATED, "cpr": c.attrs.get("cpr", math.nan),
            "cmd": c.attrs.get("cmd", math.nan), "n_f": n_f,
            "kl_at_n_f": first_meeting(c, n_f, target_f).get("kl", math.nan),
            **{f"n_kl_{k:g}": size_for(c, max_kl=k) for k in budgets},
            "f_at_size": f_at, "kl_at_size": kl_at,
            "seconds": edge_scores[m].attrs.get("seconds", math.nan),
        })  # fmt: skip
    table = pd.DataFrame(rows).set_index("method")
    table.attrs.update(curves=measured, level=level, at_size=at_size, target_f=target_f,
                       max_kl=budgets, fractions=list(fractions), ablated="edges")  # fmt: skip
    return table


__all__ = [
    "EDGES_ABLATED",
    "EDGE_METHODS",
    "at_level",
    "compare_edge_methods",
    "edge_curve",
    "edge_ends",
    "edges_within",
    "first_meeting",
    "method_edge_scores",
    "touched_counts",
]

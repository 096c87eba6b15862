"""Faithfulness curves from node scores: keep each method's top nodes, ablate the rest, measure.

A curve ranks the nodes of one level by a method's scores (`node_scores.method_scores`), keeps
the top round(fraction * N) at each fraction and ablates every other node of that level (the
parents of kept children stay open, as `metrics.top_nodes` does); f and KL come from one
`Evaluator`, so every method is measured on the same prompts and the same ablation cache.
CPR and CMD summarise a curve as MIB does; `size_for` reads the size a target needs off it;
`compare_methods` puts it all in one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import pandas as pd
import torch

from .ablation import AblationKind
from .circuit import Circuit
from .evaluation import Evaluation, Evaluator
from .metrics import MIB_FRACTIONS, cmd, cpr
from .node_scores import METHODS, NodeList, method_scores
from .tasks.base import PromptTask

Level = Literal["blocks_heads", "neurons"]
LEVELS: tuple[str, ...] = get_args(Level)
# The nodes a level ranks: MIB's node level (heads and MLP blocks), or heads and neurons.
LEVEL_NODES: dict[str, tuple[str, ...]] = {
    "blocks_heads": ("head", "mlp"),
    "neurons": ("head", "neuron"),
}


def level_nodes(nodes: NodeList, level: Level) -> tuple[str, ...]:
    """The granularities `level` ranks on this model (an attention-only model: heads only)."""
    if level not in LEVEL_NODES:
        raise ValueError(f"Unknown level {level!r}; choose from {', '.join(LEVELS)}.")
    return tuple(g for g in LEVEL_NODES[level] if g in nodes.granularities)


def keep_top(scores: pd.Series, nodes: NodeList, n: int, level: Level) -> Circuit:
    """The binary circuit of the `n` best-scored nodes of `level`, every other one ablated.

    Ties go to the earlier node of the node list; NaN scores rank last. A kept head opens its
    attention block and a kept neuron its MLP block; at "blocks_heads" a kept MLP block runs
    all its neurons.
    """
    grans = level_nodes(nodes, level)
    names = [name for g in grans for name in nodes.names_of(g)]
    if not 0 <= n <= len(names):
        raise ValueError(f"n must be in 0..{len(names)} ({level} nodes), got {n}.")
    values = torch.tensor(scores.loc[names].to_numpy(dtype=float), dtype=torch.float64)
    values = values.nan_to_num(nan=-math.inf)
    keep = torch.zeros(len(names))
    keep[torch.sort(values, descending=True, stable=True).indices[:n]] = 1.0
    gates, start = {}, 0
    for g in grans:
        size = nodes.shape.count(g)
        gates[g] = keep[start : start + size].reshape(nodes.shape.units(g))
        start += size
    gates["attn"] = gates["head"].amax(1)
    if "neuron" in gates:
        gates["mlp"] = gates["neuron"].amax(1)
    return Circuit(nodes.shape, gates, meta={"top_nodes": n, "level": level})


def curve_evaluator(
    model: Any,
    task: PromptTask,
    level: Level = "blocks_heads",
    ablation: AblationKind = "corrupted",
) -> Evaluator:
    """The one `Evaluator` a level's curves share: it caches the hooks that level gates and
    unembeds only the answer positions (`Evaluator(fast=True)`), since a curve is many passes."""
    nodes = NodeList.from_model(model)
    grans = {"attn", "head", *level_nodes(nodes, level)}
    if "neuron" in grans:
        grans.add("mlp")
    return Evaluator(model, task, ablation, granularities=tuple(sorted(grans)), fast=True)


def curve(
    model: Any,
    task: PromptTask,
    scores: pd.Series,
    fractions: Sequence[float] = MIB_FRACTIONS,
    level: Level = "blocks_heads",
    ablation: AblationKind = "corrupted",
    evaluator: Evaluator | None = None,
) -> pd.DataFrame:
    """f and KL with the top round(fraction * N) nodes of `level` kept, at each fraction.

    N counts `level`'s nodes (heads and MLP blocks, or heads and neurons); rounding is half up.
    Returns fraction, n_nodes, faithfulness, kl; `attrs` holds cpr and cmd.
    """
    nodes = NodeList.from_model(model)
    total = sum(nodes.shape.count(g) for g in level_nodes(nodes, level))
    evaluator = evaluator or curve_evaluator(model, task, level, ablation)
    rows = []
    for fraction in fractions:
        if not 0 <= fraction <= 1:
            raise ValueError(f"Fractions must be in [0, 1], got {fraction}.")
        n = int(fraction * total + 0.5)
        result = evaluator(keep_top(scores, nodes, n, level))
        rows.append({"fraction": fraction, "n_nodes": n, "faithfulness": result.faithfulness,
                     "kl": result.kl})  # fmt: skip
    frame = pd.DataFrame(rows)
    if len(frame) >= 2:
        frame.attrs.update(cpr=cpr(frame.fraction, frame.faithfulness),
                           cmd=cmd(frame.fraction, frame.faithfulness))  # fmt: skip
    frame.attrs.update(level=level, n_total=total, method=scores.attrs.get("method"))
    return frame


def size_for(
    curve: pd.DataFrame, target_f: float | None = None, max_kl: float | None = None
) -> int | None:
    """The smallest measured size whose f >= `target_f` (or whose KL <= `max_kl`); None if none.

    No interpolation: only measured circuits count, since f need not be monotone in size and a
    size between two points was never evaluated. On a curve that reaches the target, dips below
    and reaches it again, this is the first (smallest) size that reaches it. NaN never does.
    """
    if (target_f is None) == (max_kl is None):
        raise ValueError("Give exactly one of target_f (faithfulness) or max_kl (KL budget).")
    ordered = curve.sort_values("n_nodes", kind="stable")
    if target_f is not None:
        meets = ordered.faithfulness >= target_f
    else:
        meets = ordered.kl <= max_kl
    hits = ordered.n_nodes[meets.fillna(False).astype(bool)]
    return int(hits.iloc[0]) if len(hits) else None


def bisect_reaching(reaches: Callable[[int], bool], low: int, hit: int, step: int = 1) -> int:
    """The smallest size found to reach a target between a size `low` that missed and a size
    `hit` that reached it, halving the gap until the two are at most `step` apart."""
    while hit - low > step:
        mid = (low + hit) // 2
        if reaches(mid):
            hit = mid
        else:
            low = mid
    return hit


def refine_size(
    curve: pd.DataFrame,
    measure: Callable[[int], Evaluation],
    target_f: float,
    resolution: float = 0.01,
) -> pd.DataFrame:
    """`curve` with sizes bisected between its first size reaching `target_f` and the measured
    miss below it, until the two are at most `resolution` of the level's nodes apart (and at
    least one node).

    MIB's grid jumps from 20% to 50% of the nodes, so a size read off it says little; this
    measures `measure(n)` (f and KL with the top n nodes kept) at the midpoints. Added rows
    have `refined` True and leave CPR and CMD (over the grid) as they were; rows come sorted
    by size, so `size_for` reads the smallest measured size that reaches the target.
    """
    frame = curve.assign(refined=curve.get("refined", False)).sort_values("n_nodes", kind="stable")
    hit = size_for(frame, target_f=target_f)
    if hit is None:
        return frame.reset_index(drop=True)
    below = frame.n_nodes[frame.n_nodes < hit]
    low = int(below.iloc[-1]) if len(below) else None
    total = int(curve.attrs.get("n_total", frame.n_nodes.max()))
    rows: list[dict[str, Any]] = []

    def reaches(n: int) -> bool:
        result = measure(n)
        rows.append({"fraction": n / total, "n_nodes": n, "faithfulness": result.faithfulness,
                     "kl": result.kl, "refined": True})  # fmt: skip
        return result.faithfulness >= target_f

    if low is not None:
        bisect_reaching(reaches, low, hit, max(1, int(resolution * total)))
    out = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True) if rows else frame
    out = out.sort_values("n_nodes", kind="stable").reset_index(drop=True)
    out.attrs = dict(curve.attrs)
    return out


def compare_methods(
    model: Any,
    task: PromptTask,
    methods: Sequence[str] = METHODS,
    fractions: Sequence[float] = MIB_FRACTIONS,
    level: Level = "blocks_heads",
    at_size: int | None = None,
    target_f: float = 0.9,
    max_kl: float | Sequence[float] = (0.3, 0.1),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    ablation: AblationKind = "corrupted",
    scores: Mapping[str, pd.Series] | None = None,
    refine: float | None = None,
) -> pd.DataFrame:
    """One row per method: CPR, CMD, n for f >= target_f and the KL there, n for KL <= each
    `max_kl` (columns `n_kl_0.3`, ...), f and KL at `at_size` nodes (default: node pruning's n
    for target_f), seconds to score. A size no fraction reached is NaN.

    Every method is scored over one node list (`method_scores(model, task, m, **settings[m])`)
    and measured through one `Evaluator`; the curves are in `attrs["curves"]`. `scores` gives
    a method's scores made beforehand (e.g. on training prompts, measured here on held-out ones).
    `refine` (a share of the level's nodes, e.g. 0.01) bisects each curve's step to target_f
    down to that resolution (`refine_size`); the KL budgets' sizes are read off the same
    measured points, not bisected for.
    """
    settings = settings or {}
    budgets = [max_kl] if isinstance(max_kl, (int, float)) else list(max_kl)
    evaluator = curve_evaluator(model, task, level, ablation)
    nodes = NodeList.from_model(model)
    given = dict(scores or {})
    scores = {m: given[m] if m in given else method_scores(model, task, m, ablation=ablation,
                                                         **settings.get(m, {}))
              for m in methods}  # fmt: skip
    curves = {m: curve(model, task, s, fractions, level, ablation, evaluator)
              for m, s in scores.items()}  # fmt: skip
    if refine is not None:
        curves = {m: refine_size(c, lambda n, m=m: evaluator(keep_top(scores[m], nodes, n, level)),
                                 target_f, refine)
                  for m, c in curves.items()}  # fmt: skip
    if at_size is None and "node_pruning" in curves:
        at_size = size_for(curves["node_pruning"], target_f=target_f)
    rows = []
    for m, c in curves.items():
        n_f = size_for(c, target_f=target_f)
        at = evaluator(keep_top(scores[m], nodes, at_size, level)) if at_size is not None else None
        f_at, kl_at = (at.faithfulness, at.kl) if at else (math.nan, math.nan)
        rows.append({
            "method": m, "cpr": c.attrs.get("cpr", math.nan), "cmd": c.attrs.get("cmd", math.nan),
            "n_f": n_f, "kl_at_n_f": _at(c, n_f, "kl"),
            **{f"n_kl_{k:g}": size_for(c, max_kl=k) for k in budgets},
            "f_at_size": f_at, "kl_at_size": kl_at, "seconds": scores[m].attrs["seconds"],
        })  # fmt: skip
    table = pd.DataFrame(rows).set_index("method")
    table.attrs.update(curves=curves, level=level, at_size=at_size, target_f=target_f,
                       max_kl=budgets, fractions=list(fractions), refine=refine)  # fmt: skip
    return table


def _at(frame: pd.DataFrame, n: int | None, column: str) -> float:
    """`column` at the first row of `n` nodes (NaN when `n` is None)."""
    if n is None:
        return math.nan
    return float(frame.loc[frame.n_nodes == n, column].iloc[0])


__all__ = [
    "LEVELS",
    "bisect_reaching",
    "compare_methods",
    "curve",
    "curve_evaluator",
    "keep_top",
    "level_nodes",
    "refine_size",
    "size_for",
]

"""Faithfulness curves and their MIB summaries (CPR, CMD), completeness and minimality.

Every metric evaluates circuits with `evaluate.Evaluator`: the same held-out prompts, the same
ablation cache, the same f = (m(circuit) - m(empty)) / (m(full) - m(empty)) as `evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .ablation import AblationKind
from .circuit import Circuit
from .evaluation import Evaluator
from .granularities import ancestors, spec
from .tasks.base import PromptTask

# The MIB circuit track's circuit sizes, as fractions of the graph (0.1% ... 100%).
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Node circuits are sized by these units: the heads and MLP blocks (MIB's node set, less input
# and logits, which are always kept).
CURVE_NODES: tuple[str, ...] = ("head", "mlp")


def node_values(circuit: Circuit, granularity: str) -> Tensor:
    """A node's importance: its score if the circuit has one, else its effective gate.

    The effective gate is the node's own gate times its parents' (a head in a half-open block
    counts half); a granularity without gates counts 1 inside kept parents.
    """
    if granularity in circuit.scores:
        return circuit.scores[granularity]
    own = circuit.node_gates().get(granularity)  # position-aware: the largest over positions
    own = own if own is not None else torch.ones(circuit.shape.units(granularity))
    parent_name = spec(granularity).parent
    if parent_name is None:
        return own
    parent = node_values(circuit, parent_name)
    return own * parent.reshape(*parent.shape, *([1] * (own.dim() - parent.dim())))


def top_nodes(circuit: Circuit, n: int, granularities: Sequence[str] = CURVE_NODES) -> Circuit:
    """The binary circuit of the `n` highest-valued nodes over `granularities` (ties: first)."""
    shape = circuit.shape
    grans = [g for g in granularities if shape.has(g)]
    flat = torch.cat([node_values(circuit, g).flatten() for g in grans])
    keep = torch.zeros_like(flat)
    keep[torch.sort(flat, descending=True, stable=True).indices[:n]] = 1.0
    gates, start = {}, 0
    for g in grans:
        size = shape.count(g)
        gates[g] = keep[start : start + size].reshape(shape.units(g))
        start += size
    if "head" in gates:
        gates["attn"] = gates["head"].amax(1)
    return Circuit(shape, gates, meta={"top_nodes": n})


def faithfulness_curve(
    model: Any,
    task: PromptTask,
    circuit: Circuit,
    fractions: Sequence[float] = MIB_FRACTIONS,
    granularities: Sequence[str] = CURVE_NODES,
    ablation: AblationKind = "corrupted",
    evaluator: Evaluator | None = None,
) -> pd.DataFrame:
    """f at each size: keep the round(fraction * N) most important nodes of `circuit`.

    N counts the nodes of `granularities` (default heads and MLP blocks), so the x axis is the
    fraction of *nodes* kept, not of edges as in MIB's edge circuits. Importance is
    `node_values` (scores, else gates). Returns fraction, n_nodes, faithfulness, kl.
    """
    evaluator = evaluator or Evaluator(model, task, ablation, granularities=("attn", "mlp", "head"))
    total = sum(circuit.shape.count(g) for g in granularities if circuit.shape.has(g))
    rows = []
    for fraction in fractions:
        n = int(fraction * total + 0.5)
        result = evaluator(top_nodes(circuit, n, granularities))
        rows.append(
            {"fraction": fraction, "n_nodes": n, "faithfulness": result.faithfulness,
             "kl": result.kl}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"Need matching x and y with >= 2 points, got {len(x)} and {len(y)}.")
    if any(b < a for a, b in zip(x, x[1:], strict=False)):
        raise ValueError("Fractions must be sorted ascending.")
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """CPR = sum_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2: area under f(x), trapezoid, linear x.

    x is the fraction of the graph kept (MIB: 0.001 ... 1); higher is better.
    """
    return _trapezoid(list(fractions), list(faithfulness))


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """CMD = sum_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2: area under |1 - f(x)|.

    Lower is better: 0 means the circuit matches the full model at every size.
    """
    return _trapezoid(list(fractions), [abs(1 - f) for f in faithfulness])


def complement(circuit: Circuit) -> Circuit:
    """The nodes a circuit does not keep, at its finest gated granularities.

    Attention: heads (or head value dimensions) outside the circuit, or whole blocks when only
    blocks are gated; MLPs likewise with neurons or blocks. A gated granularity with a gated
    descendant is opened, so that exactly the complement's leaves run.
    """
    gated = circuit.granularities
    inner = {a for g in gated for a in ancestors(g)}
    gates: dict[str, Tensor] = {}
    for g in gated:
        if g in inner:
            gates[g] = torch.ones(circuit.shape.units(g))
        else:
            gates[g] = (~circuit.kept(g)).float()
            for a in ancestors(g):  # open every parent, gated or not, above a leaf
                gates[a] = torch.ones(circuit.shape.units(a))
    return Circuit(circuit.shape, gates, meta={"complement_of": circuit.meta})


def completeness(
    model: Any, task: PromptTask, circuit: Circuit, ablation: AblationKind = "corrupted"
) -> float:
    """f(complement of C): how much of the behaviour the nodes left out still carry (low = good)."""
    other = complement(circuit)
    return Evaluator(model, task, ablation, granularities=other.granularities)(other).faithfulness


def minimality(
    model: Any,
    task: PromptTask,
    circuit: Circuit,
    granularities: Sequence[str] = ("attn", "mlp", "head"),
    ablation: AblationKind = "corrupted",
) -> pd.DataFrame:
    """Per kept node v: drop = f(C) - f(C without v), v's own gate closed and nothing else.

    A node with drop near 0 (or below) is not needed: the circuit is minimal when every drop
    is clearly positive. Neurons are left out by default (one evaluation per node).
    """
    grans = [g for g in granularities if g in circuit.gates]
    evaluator = Evaluator(model, task, ablation, granularities=circuit.granularities)
    base = evaluator(circuit).faithfulness
    rows = []
    for g in grans:
        for idx in circuit.kept(g).nonzero().tolist():
            gates = {k: v.clone() for k, v in circuit.gates.items()}
            at = () if circuit.positions is None else (slice(None),)  # at every position
            gates[g][(*at, *idx)] = 0.0
            without = evaluator(
                Circuit(circuit.shape, gates, circuit.threshold, positions=circuit.positions)
            ).faithfulness
            name = Circuit(circuit.shape, {g: _one_hot(circuit, g, idx)}).nodes[0]
            rows.append({"node": name, "granularity": g, "faithfulness_without": without,
                         "drop": base - without})  # fmt: skip
    frame = pd.DataFrame(rows, columns=["node", "granularity", "faithfulness_without", "drop"])
    frame.attrs["faithfulness"] = base
    return frame


def _one_hot(circuit: Circuit, g: str, idx: list[int]) -> Tensor:
    t = torch.zeros(circuit.shape.units(g))
    t[tuple(idx)] = 1.0
    return t


__all__ = [
    "CURVE_NODES",
    "MIB_FRACTIONS",
    "cmd",
    "complement",
    "completeness",
    "cpr",
    "faithfulness_curve",
    "minimality",
    "node_values",
    "top_nodes",
]

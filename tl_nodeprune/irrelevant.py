"""Irrelevant neurons: how many of the neurons a coarse circuit runs node pruning needs.

A circuit chosen at the level of heads and MLP blocks (MIB's node level, activation patching,
an edge circuit's nodes) runs every neuron of each MLP block it keeps. Here its heads and
attention blocks stay as they are and every MLP block outside it stays ablated; inside its
kept blocks only the top k neurons by node pruning's neuron scores run (`method_scores(...,
"node_pruning")`, a neuron's log_alpha capped by its block's), the others are ablated. The
neurons node pruning needs is the smallest measured k whose faithfulness reaches the coarse
circuit's own, capped at `target_f`: the same faithfulness, on the same prompts, with the
same heads, so the difference is neurons alone. k is found as the curves find sizes: up
MIB's fractions of the circuit's neurons to the first that reaches the target, then by
bisection between it and the miss below, so k - 1 was measured and missed. Not down from all
of them: node pruning's neuron rankings are not monotone (greater-than: f 0.93-0.97 with the
top 1%, 0.40-0.76 with half, 1.0 with all), and a search from the top stops in that dip.
`resolution` stops the bisection when the two sizes are that share of the circuit's neurons
apart (0: one neuron).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from .circuit import Circuit
from .curves import bisect_reaching, curve_evaluator
from .evaluation import Evaluation, Evaluator
from .metrics import MIB_FRACTIONS
from .node_scores import NodeList
from .tasks.base import PromptTask


@dataclass(frozen=True)
class NeuronsNeeded:
    """One coarse circuit against node pruning's neurons inside its MLP blocks.

    `blocks`: the MLP blocks the coarse circuit keeps; `coarse_f`: its faithfulness running
    all their neurons; `target`: min(coarse_f, target_f); `needed`: the neurons reaching it
    (None when even all of them do not, as when ablating neurons differs from the coarse
    circuit); `per_layer`: of those, how many in each layer; `measured`: k, f and KL of every
    size evaluated.
    """

    blocks: tuple[int, ...]
    d_mlp: int
    coarse_f: float
    target: float
    needed: int | None
    f_needed: float
    kl_needed: float
    per_layer: tuple[int, ...]
    measured: pd.DataFrame

    @property
    def coarse_neurons(self) -> int:
        """Neurons the coarse circuit runs: all of each kept MLP block."""
        return len(self.blocks) * self.d_mlp


def top_neurons(
    circuit: Circuit, nodes: NodeList, neuron_scores: pd.Series, k: int
) -> Circuit:
    """`circuit`'s heads and blocks with, inside its kept MLP blocks, only the top k neurons.

    Ranked by `neuron_scores` (a node list's series; NaN last, ties to the earlier neuron).
    """
    shape = nodes.shape
    blocks = circuit.kept("mlp")  # (layer,)
    names = nodes.names_of("neuron")
    values = torch.tensor(neuron_scores.loc[names].to_numpy(dtype=float), dtype=torch.float64)
    values = values.nan_to_num(nan=-math.inf)  # (layer * neuron,), layer-major
    inside = blocks[:, None].expand(shape.units("neuron")).flatten().nonzero().flatten()
    if not 0 <= k <= len(inside):
        raise ValueError(
            f"k must be in 0..{len(inside)} (neurons of the kept MLP blocks), got {k}."
        )
    keep = torch.zeros(values.numel())
    keep[inside[torch.sort(values[inside], descending=True, stable=True).indices[:k]]] = 1.0
    gates = {
        "attn": circuit.kept("attn").float(),
        "head": circuit.kept("head").float(),
        "mlp": blocks.float(),
        "neuron": keep.reshape(shape.units("neuron")),
    }
    return Circuit(shape, gates, meta={"top_neurons": k})


def neurons_needed(
    model: Any,
    task: PromptTask,
    circuit: Circuit,
    neuron_scores: pd.Series,
    target_f: float = 0.9,
    evaluator: Evaluator | None = None,
    resolution: float = 0.0,
) -> NeuronsNeeded:
    """How many of `circuit`'s MLP neurons node pruning needs for its faithfulness (module doc).

    `evaluator` must gate attention, heads, MLP blocks and neurons (`curve_evaluator(model,
    task, "neurons")`, made here if not given).
    """
    nodes = NodeList.from_model(model)
    if not nodes.shape.has("neuron"):
        raise ValueError("The model has no MLP neurons; there is nothing to count.")
    evaluator = evaluator or curve_evaluator(model, task, "neurons")
    blocks = tuple(circuit.mlp_blocks)
    total = len(blocks) * nodes.shape.d_mlp
    results: dict[int, Evaluation] = {}

    def measure(k: int) -> Evaluation:
        if k not in results:
            results[k] = evaluator(top_neurons(circuit, nodes, neuron_scores, k))
        return results[k]

    coarse_f = measure(total).faithfulness
    target = min(coarse_f, target_f)
    needed = smallest_reaching(measure, total, target, max(1, int(resolution * total)))
    measured = pd.DataFrame(
        [{"k": k, "faithfulness": r.faithfulness, "kl": r.kl} for k, r in sorted(results.items())]
    )
    per_layer = [0] * nodes.shape.n_layers
    if needed is not None:
        kept = top_neurons(circuit, nodes, neuron_scores, needed).kept("neuron").sum(1)
        per_layer = [int(x) for x in kept]
    at = results[needed] if needed is not None else None
    return NeuronsNeeded(
        blocks=blocks, d_mlp=nodes.shape.d_mlp, coarse_f=coarse_f, target=target, needed=needed,
        f_needed=at.faithfulness if at else math.nan, kl_needed=at.kl if at else math.nan,
        per_layer=tuple(per_layer), measured=measured,
    )  # fmt: skip


def smallest_reaching(
    measure: Any,
    total: int,
    target: float,
    step: int = 1,
    fractions: Sequence[float] = MIB_FRACTIONS,
) -> int | None:
    """The smallest measured k reaching `target`, searched from below as the curves are: k = 0,
    then `fractions` of `total` up to the first size that reaches it, then bisect between it and
    the miss below until they are at most `step` apart; None when `total` misses (NaN always
    does). From below, because node pruning's neuron rankings are not monotone: a search down
    from `total` stops in the dip at mid sizes and reports nearly every neuron needed."""
    if not measure(total).faithfulness >= target:
        return None
    sizes = sorted({0, total, *(max(1, round(f * total)) for f in fractions)})
    low = -1
    for k in sizes:
        if measure(k).faithfulness >= target:
            break
        low = k
    if low < 0:
        return 0  # nothing needed
    return bisect_reaching(lambda k: measure(k).faithfulness >= target, low, k, step)


def irrelevant_neurons(
    model: Any,
    task: PromptTask,
    circuits: Mapping[str, Circuit],
    neuron_scores: pd.Series,
    target_f: float = 0.9,
    evaluator: Evaluator | None = None,
    resolution: float = 0.0,
) -> pd.DataFrame:
    """One row per coarse circuit: its MLP blocks and neurons, the neurons node pruning needs
    there for the same faithfulness, and the share of them that are irrelevant.

    Columns mlp_blocks, coarse_neurons, coarse_f, target, needed, f_needed, kl_needed,
    irrelevant (1 - needed / coarse_neurons); `attrs["per_layer"]` is a frame of neurons kept
    per layer (rows "<name>" for the coarse circuit, "<name>: node pruning" for the needed).
    """
    evaluator = evaluator or curve_evaluator(model, task, "neurons")
    rows, layers = [], {}
    for name, circuit in circuits.items():
        found = neurons_needed(model, task, circuit, neuron_scores, target_f, evaluator,
                               resolution)  # fmt: skip
        coarse = found.coarse_neurons
        rows.append({
            "circuit": name, "mlp_blocks": len(found.blocks), "coarse_neurons": coarse,
            "coarse_f": found.coarse_f, "target": found.target,
            "needed": math.nan if found.needed is None else found.needed,
            "f_needed": found.f_needed, "kl_needed": found.kl_needed,
            "irrelevant": (1 - found.needed / coarse) if found.needed is not None and coarse
            else math.nan,
        })  # fmt: skip
        layers[name] = [found.d_mlp if layer in found.blocks else 0
                        for layer in range(len(found.per_layer))]  # fmt: skip
        layers[f"{name}: node pruning"] = list(found.per_layer)
    table = pd.DataFrame(rows).set_index("circuit") if rows else pd.DataFrame()
    table.attrs["per_layer"] = pd.DataFrame.from_dict(layers, orient="index")
    return table


__all__ = [
    "NeuronsNeeded",
    "irrelevant_neurons",
    "neurons_needed",
    "smallest_reaching",
    "top_neurons",
]

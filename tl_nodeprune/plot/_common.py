"""Helpers the figure modules share: gate values per unit, reference classes, colours."""

from __future__ import annotations

import torch
from torch import Tensor

from ..circuit import Circuit
from ..granularities import spec
from ..references import HeadClasses, Reference, as_head_classes

# What a figure's `reference` may be: a shipped `references.Reference` or a plain
# (layer, head) -> class mapping such as {(9, 9): "name mover"}.
PlotReference = Reference | HeadClasses

KEPT_COLOUR = "#d62728"
PRUNED_COLOUR = "#9e9e9e"
# Distinct colours for reference classes (cycled when there are more classes).
CLASS_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#d62728",
)  # fmt: skip
NO_CLASS = "not in reference"


def unit_values(circuit: Circuit, granularity: str) -> tuple[Tensor, bool]:
    """A unit's own gate, or its parent's broadcast when the unit is not gated.

    Returns the values and whether they are the unit's own gates. Without any gate on the unit
    or its parent, the 0/1 kept mask stands in.
    """
    shape = circuit.shape.units(granularity)
    gates = circuit.node_gates()  # a position-aware circuit: each node's largest gate
    if granularity in gates:
        return gates[granularity], True
    parent = spec(granularity).parent
    if parent is not None and parent in gates:
        gate = gates[parent]
        gate = gate.reshape(*gate.shape, *([1] * (len(shape) - gate.dim())))
        return gate.expand(shape).clone(), False
    return circuit.kept(granularity).float(), False


def head_classes(circuit: Circuit, reference: PlotReference | None) -> list[list[str]]:
    """The reference class of every head as a layer x head grid of strings ('' without one)."""
    n_layers, n_heads = circuit.shape.units("head")
    grid = [[""] * n_heads for _ in range(n_layers)]
    for (layer, head), cls in as_head_classes(reference).items():
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"Reference head ({layer}, {head}) is outside {circuit.shape.name!r} "
                f"({n_layers} layers x {n_heads} heads)."
            )
        grid[layer][head] = cls
    return grid


def class_colours(classes: list[str]) -> dict[str, str]:
    """A stable colour per class name, in the order given."""
    return {c: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, c in enumerate(classes)}


def kept_heads(circuit: Circuit) -> Tensor:
    """Kept heads as a (layer, head) bool tensor, hierarchy applied."""
    return circuit.kept("head").to(torch.bool)

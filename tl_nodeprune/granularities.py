"""What a kind of node is: one `GranularitySpec` per granularity, and the node-name grammar.

Everything that depends on a granularity (the hook it is gated at, the gate tensor's shape, the
hierarchy, node names, the default price, how figures draw it) is derived from its spec in
`SPECS`, so a new granularity is one `register_granularity(GranularitySpec(...))` call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

View = Literal["grid", "strip", "block"]


@dataclass(frozen=True)
class GranularitySpec:
    """One kind of node: where it is gated, what its units are, what it is called and costs.

    `unit_axes` and `activation_axes` name `ModelShape` fields: the gate tensor is
    (n_layers, *unit sizes), the hook's activation is (batch, pos, *activation sizes), and the
    unit axes are a prefix of the activation axes (a gate broadcasts over the rest). A node is
    named by `letters` and its indices: ("a", "h") names head 5 of layer 3 `a3.h5`. `price` is
    the default cost of keeping one node, in units of the faithfulness loss (nats for KL).
    `needs` names shape fields that must be positive for a model to have these nodes (MLP
    blocks need d_mlp); a node's parent must be there too. `view` says how figures draw the
    nodes: "block" (one per layer), "grid" (layer x unit heatmap), "strip" (many per layer).
    """

    name: str
    hook: str
    unit_axes: tuple[str, ...]
    activation_axes: tuple[str, ...]
    letters: tuple[str, ...]
    price: float
    parent: str | None = None
    needs: tuple[str, ...] = ()
    default: bool = True
    view: View = "strip"
    noun: str = "unit"

    def __post_init__(self) -> None:
        if "{layer}" not in self.hook:
            raise ValueError(f"GranularitySpec.hook must contain '{{layer}}', got {self.hook!r}.")
        if len(self.letters) != 1 + len(self.unit_axes):
            raise ValueError(
                f"GranularitySpec {self.name!r} needs one name letter for the layer and one per "
                f"unit axis ({1 + len(self.unit_axes)}), got {self.letters!r}."
            )
        if self.activation_axes[: len(self.unit_axes)] != self.unit_axes:
            raise ValueError(
                f"GranularitySpec {self.name!r}: unit axes {self.unit_axes} must be the first "
                f"activation axes {self.activation_axes}, so that a gate broadcasts over the rest."
            )
        if not all(re.fullmatch(r"[a-z]+", x) for x in self.letters):
            raise ValueError(f"GranularitySpec.letters must be lowercase, got {self.letters}.")

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook at which these nodes are gated in `layer`."""
        return self.hook.format(layer=layer)

    def units(self, shape: Any) -> tuple[int, ...]:
        """Shape of the gate tensor: (n_layers, *unit sizes)."""
        return (int(shape.n_layers), *(int(getattr(shape, a)) for a in self.unit_axes))

    def activation(self, shape: Any) -> tuple[int, ...]:
        """The hook's activation shape after (batch, pos)."""
        return tuple(int(getattr(shape, a)) for a in self.activation_axes)

    def count(self, shape: Any) -> int:
        """How many nodes of this kind the model has."""
        return math.prod(self.units(shape))

    def node_name(self, index: Sequence[int]) -> str:
        """`(3, 5)` -> `'a3.h5'` for heads: the first letter carries the layer."""
        first, *rest = self.letters
        units = "".join(f".{x}{i}" for x, i in zip(rest, index[1:], strict=True))
        return f"{first}{index[0]}{units}"


# The built-in granularities, coarse to fine within each branch; parents come before children.
# Prices: a node's worth to a circuit does not depend on how many siblings it has, so the
# default penalty on a granularity's *mean* expected L0 is its price times its number of units;
# the same defaults then work on a 3-layer toy and on a 30-layer model. The head and neuron
# prices are 3 and 2.86 times those first chosen: with 150 steps of 8 on 800 prompts, SmolLM2
# IOI circuits keep 13% of heads and 4.3-4.6% of neurons at held-out f >= 0.94 over seeds 0-2
# (docs/lab/quality.md, section 7). `head_dim` is the finest and most expensive, so it is opt-in.
SPECS: dict[str, GranularitySpec] = {
    s.name: s
    for s in (
        GranularitySpec("attn", "blocks.{layer}.hook_attn_out", (), ("d_model",), ("a",), 0.03,
                        view="block", noun="attention block"),
        GranularitySpec("mlp", "blocks.{layer}.hook_mlp_out", (), ("d_model",), ("m",), 0.03,
                        needs=("d_mlp",), view="block", noun="MLP block"),
        GranularitySpec("head", "blocks.{layer}.attn.hook_z", ("n_heads",), ("n_heads", "d_head"),
                        ("a", "h"), 0.03, parent="attn", view="grid", noun="head"),
        GranularitySpec("neuron", "blocks.{layer}.mlp.hook_post", ("d_mlp",), ("d_mlp",),
                        ("m", "n"), 0.002, parent="mlp", view="strip", noun="neuron"),
        GranularitySpec("head_dim", "blocks.{layer}.attn.hook_z", ("n_heads", "d_head"),
                        ("n_heads", "d_head"), ("a", "h", "d"), 0.0002, parent="head",
                        default=False, view="strip", noun="head value dimension"),
    )
}  # fmt: skip


def register_granularity(spec: GranularitySpec) -> GranularitySpec:
    """Add a granularity: after this call it can be gated, saved, evaluated, compared and drawn.

    Its parent must be registered already, and its name and letters must be new.
    """
    if spec.name in SPECS:
        raise ValueError(f"Granularity {spec.name!r} is already registered.")
    if spec.parent is not None and spec.parent not in SPECS:
        raise ValueError(
            f"Granularity {spec.name!r} has parent {spec.parent!r}, which is not registered; "
            f"choose from {', '.join(SPECS)}."
        )
    if any(s.letters == spec.letters for s in SPECS.values()):
        raise ValueError(f"Node names {spec.letters} are taken; give {spec.name!r} other letters.")
    SPECS[spec.name] = spec
    return spec


def spec(granularity: str) -> GranularitySpec:
    """The spec of `granularity`; a ValueError naming the valid ones when it is unknown."""
    try:
        return SPECS[granularity]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown granularity {granularity!r}; choose from {', '.join(SPECS)}."
        ) from None


def check_granularity(granularity: str) -> None:
    """Raise a ValueError naming the valid granularities when `granularity` is unknown."""
    spec(granularity)


def ancestors(granularity: str) -> tuple[str, ...]:
    """The chain of parents of `granularity`, nearest first."""
    out: list[str] = []
    parent = spec(granularity).parent
    while parent is not None:
        out.append(parent)
        parent = SPECS[parent].parent
    return tuple(out)


def node_name(granularity: str, index: Sequence[int]) -> str:
    """The name of one node: `node_name("head", (3, 5)) == "a3.h5"`."""
    return spec(granularity).node_name([int(i) for i in index])


_NODE = re.compile(r"^([a-z]+)(\d+)((?:\.[a-z]+\d+)*)$")
_PART = re.compile(r"\.([a-z]+)(\d+)")


def parse_node_name(name: str) -> tuple[str, tuple[int, ...]]:
    """`'a3.h5'` -> ('head', (3, 5)): the inverse of `node_name`, without range checks."""
    match = _NODE.match(name) if isinstance(name, str) else None
    if match is not None:
        parts = _PART.findall(match.group(3))
        letters = (match.group(1), *(x for x, _ in parts))
        for s in SPECS.values():
            if s.letters == letters:
                return s.name, (int(match.group(2)), *(int(i) for _, i in parts))
    examples = ", ".join(
        f"{s.node_name([3, 5, 2][: len(s.letters)])} ({s.noun})" for s in SPECS.values()
    )
    raise ValueError(f"Bad node name {name!r}; use {examples}, with indices >= 0.")


__all__ = [
    "SPECS",
    "GranularitySpec",
    "ancestors",
    "check_granularity",
    "node_name",
    "parse_node_name",
    "register_granularity",
    "spec",
]

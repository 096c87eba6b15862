"""Published circuits shipped as data (JSON beside this file), each with its source."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from ..circuit import Circuit, parse_node
from ..sites import ModelShape

# GPT-2 small, the model every shipped reference was found on.
GPT2_SMALL = ModelShape(
    name="gpt2", n_layers=12, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, d_model=768
)
_FILES = {
    "ioi": "ioi_wang2022.json",
    "greater_than": "greater_than_hanna2023.json",
    "greater_than_acdc": "greater_than_acdc.json",
}


# A reference as plain data: (layer, head) -> class name, e.g. {(9, 9): "name mover"}.
HeadClasses = Mapping[tuple[int, int], str]


@dataclass(frozen=True)
class Reference:
    """A published circuit: heads by class, MLP blocks, and which granularities it speaks for.

    A reference only claims membership at its `granularities`: the IOI circuit of Wang et al.
    names heads and says nothing about MLPs, so comparisons leave MLPs out for it.
    """

    name: str
    task: str
    model: str
    source: str
    method: str
    granularities: tuple[str, ...]
    heads: dict[str, tuple[str, ...]]
    mlps: tuple[int, ...]

    @property
    def head_set(self) -> list[tuple[int, int]]:
        """Every reference head as (layer, head), sorted."""
        return sorted({parse_node(h)[1] for hs in self.heads.values() for h in hs})  # type: ignore[misc]

    def head_class(self) -> dict[tuple[int, int], str]:
        """(layer, head) -> class name."""
        return {parse_node(h)[1]: c for c, hs in self.heads.items() for h in hs}  # type: ignore[misc]

    def to_circuit(self, shape: ModelShape = GPT2_SMALL) -> Circuit:
        """The reference as a binary `Circuit` with gates at its granularities."""
        head = torch.zeros(shape.units("head"))
        for layer, h in self.head_set:
            head[layer, h] = 1.0
        gates = {"attn": head.amax(1), "head": head}
        if "mlp" in self.granularities:
            mlp = torch.zeros(shape.units("mlp"))
            mlp[list(self.mlps)] = 1.0
            gates["mlp"] = mlp
        return Circuit(shape, gates, meta={"reference": self.name, "source": self.source})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reference:
        """Build from the JSON layout of the shipped files; KeyError names a missing key."""
        missing = [
            k
            for k in ("name", "task", "model", "source", "granularities", "heads", "mlps")
            if k not in data
        ]
        if missing:
            raise KeyError(f"Reference data lacks keys {missing}.")
        for hs in data["heads"].values():
            for h in hs:
                if parse_node(h)[0] != "head":
                    raise ValueError(f"Reference head {h!r} is not a head name like 'a9.h9'.")
        return cls(
            name=data["name"],
            task=data["task"],
            model=data["model"],
            source=data["source"],
            method=data.get("method", ""),
            granularities=tuple(data["granularities"]),
            heads={c: tuple(hs) for c, hs in data["heads"].items()},
            mlps=tuple(int(m) for m in data["mlps"]),
        )


def as_head_classes(reference: Reference | HeadClasses | None) -> dict[tuple[int, int], str]:
    """(layer, head) -> class name, from a shipped `Reference` or a plain mapping; {} for None.

    Figures and reports take either, so `plot.heads(c, reference=references.load("ioi"))` works.
    """
    if reference is None:
        return {}
    if isinstance(reference, Reference):
        return reference.head_class()
    return dict(reference)


def names() -> tuple[str, ...]:
    """The shipped references."""
    return tuple(_FILES)


def load(name: str) -> Reference:
    """A shipped reference by name: 'ioi', 'greater_than' or 'greater_than_acdc'."""
    if name not in _FILES:
        raise ValueError(f"Unknown reference {name!r}; choose from {', '.join(_FILES)}.")
    text = resources.files(__name__).joinpath(_FILES[name]).read_text()
    return Reference.from_dict(json.loads(text))


__all__ = ["GPT2_SMALL", "HeadClasses", "Reference", "as_head_classes", "load", "names"]

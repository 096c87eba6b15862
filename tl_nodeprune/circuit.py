"""`Circuit`: which nodes are kept, with gate values, at every granularity; JSON save/load."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .granularities import SPECS, check_granularity, parse_node_name, spec
from .sites import ModelShape

FORMAT = "tl_nodeprune.circuit"
VERSION = 2  # 2 added edges and scores; version-1 files still load
READABLE_VERSIONS = (1, 2)


@dataclass
class Circuit:
    """Gate values per granularity (one tensor each, shaped `shape.units(g)`) and a threshold.

    A node is kept when its own gate exceeds `threshold` and its parent is kept (a head
    inside a pruned attention block is pruned). Granularities without gates count as
    fully kept inside their parents. Node names: `a3` attention block 3, `a3.h5` head 5
    of layer 3, `m3` MLP block 3, `m3.n17` neuron 17, `a3.h5.d2` value dimension 2.

    Edge-level methods also fill `edges` (kept edges, named as in EAP-IG and MIB files:
    `input->a0.h1<q>`, `a5.h1->m5`, `m11->logits`) and may give `edge_scores`; any method
    may give `scores`, a node-importance tensor per granularity (higher = more important).
    """

    shape: ModelShape
    gates: dict[str, Tensor]
    threshold: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)
    edges: tuple[str, ...] | None = None
    scores: dict[str, Tensor] = field(default_factory=dict)
    edge_scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, tensors in (("Gates", self.gates), ("Scores", self.scores)):
            for g, t in tensors.items():
                check_granularity(g)
                if tuple(t.shape) != self.shape.units(g):
                    raise ValueError(
                        f"{what} for {g!r} have shape {tuple(t.shape)}, expected "
                        f"{self.shape.units(g)} for this model."
                    )
        self.gates = {g: t.detach().float().cpu() for g, t in self.gates.items()}
        self.scores = {g: t.detach().float().cpu() for g, t in self.scores.items()}
        if self.edges is not None:
            self.edges = tuple(self.edges)
            for name in self.edges:
                parse_edge(name, self.shape)
        self.edge_scores = {k: float(v) for k, v in self.edge_scores.items()}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, shape: ModelShape) -> Circuit:
        """Every block open: the whole model."""
        return cls(shape, {g: torch.ones(shape.units(g)) for g in shape.blocks()})

    @classmethod
    def empty(cls, shape: ModelShape) -> Circuit:
        """Every block closed: only embeddings and unembedding remain."""
        return cls(shape, {g: torch.zeros(shape.units(g)) for g in shape.blocks()})

    @classmethod
    def from_nodes(
        cls, shape: ModelShape, nodes: list[str], granularities: tuple[str, ...]
    ) -> Circuit:
        """A binary circuit from node names, with gates for `granularities` (all else closed)."""
        gates = {g: torch.zeros(shape.units(g)) for g in granularities}
        for name in nodes:
            g, index = parse_node(name, shape)
            if g not in gates:
                raise ValueError(f"Node {name!r} is a {g}, but granularities are {granularities}.")
            gates[g][index] = 1.0
        return cls(shape, gates)

    @classmethod
    def from_edges(
        cls,
        shape: ModelShape,
        edges: Iterable[str],
        edge_scores: Mapping[str, float] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Circuit:
        """An edge circuit with its induced nodes: a node is kept when one of its edges is.

        Heads are induced by their output edges and their query, key and value inputs. Under
        grouped-query attention a `<k>`/`<v>` reader is a key/value head shared by several
        query heads, so it induces no query head on its own. An attention block is kept when
        one of its heads is.
        """
        edges = tuple(dict.fromkeys(edges))
        head = torch.zeros(shape.units("head"))
        mlp = torch.zeros(shape.units("mlp"))
        for name in edges:
            writer, reader, kind = parse_edge(name, shape)
            ends = [writer, reader]
            if kind in ("k", "v") and shape.kv_heads != shape.n_heads:
                ends = [writer]
            for g, index in (parse_node(e) for e in ends if e not in ("input", "logits")):
                (head if g == "head" else mlp)[index] = 1.0
        gates = {"attn": (head.sum(1) > 0).float(), "head": head}
        if shape.has("mlp"):
            gates["mlp"] = mlp
        return cls(
            shape, gates, meta=dict(meta or {}), edges=edges, edge_scores=dict(edge_scores or {})
        )

    # -- membership ---------------------------------------------------------------------
    def own_kept(self, granularity: str) -> Tensor:
        """Nodes whose own gate is open, ignoring their parents (all True if not gated)."""
        check_granularity(granularity)
        if granularity in self.gates:
            return self.gates[granularity] > self.threshold
        return torch.ones(self.shape.units(granularity), dtype=torch.bool)

    def kept(self, granularity: str) -> Tensor:
        """Nodes kept with the hierarchy applied: own gate open and parent kept."""
        own = self.own_kept(granularity)
        parent_name = spec(granularity).parent
        if parent_name is None:
            return own
        parent = self.kept(parent_name)
        return own & parent.reshape(*parent.shape, *([1] * (own.dim() - parent.dim())))

    @property
    def granularities(self) -> tuple[str, ...]:
        return tuple(g for g in SPECS if g in self.gates)

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Kept heads as (layer, head)."""
        return [(int(layer), int(h)) for layer, h in self.kept("head").nonzero().tolist()]

    @property
    def neurons(self) -> dict[int, list[int]]:
        """Kept MLP neurons per layer (layers whose MLP block is kept)."""
        kept = self.kept("neuron")
        return {
            layer: kept[layer].nonzero().flatten().tolist()
            for layer in range(kept.shape[0])
            if kept[layer].any()
        }

    @property
    def attn_blocks(self) -> list[int]:
        return self.kept("attn").nonzero().flatten().tolist()

    @property
    def mlp_blocks(self) -> list[int]:
        return self.kept("mlp").nonzero().flatten().tolist() if self.shape.d_mlp else []

    @property
    def nodes(self) -> list[str]:
        """Names of every kept node at every gated granularity."""
        return [name for g in self.granularities for name in _names(g, self.kept(g))]

    def n_kept(self, granularity: str) -> int:
        return int(self.kept(granularity).sum())

    def fraction(self, granularity: str) -> float:
        """Share of `granularity`'s nodes that are kept (a ValueError if the model has none)."""
        if not self.shape.has(granularity):
            raise ValueError(
                f"{self.shape.name!r} is attention-only: it has no {granularity!r} nodes, so "
                "no fraction of them is kept."
            )
        return self.n_kept(granularity) / self.kept(granularity).numel()

    def summary(self) -> pd.DataFrame:
        """Kept nodes per granularity: count, total and fraction."""
        rows = [
            {
                "granularity": g,
                "kept": self.n_kept(g),
                "total": self.kept(g).numel(),
                "fraction": self.fraction(g),
            }
            for g in SPECS
            if self.shape.has(g) and (g in self.gates or g in self.shape.blocks())
        ]
        return pd.DataFrame(rows).set_index("granularity")

    def to_frame(self) -> pd.DataFrame:
        """One row per gated node: name, granularity, layer, unit index, gate value, kept."""
        frames = []
        for g in self.granularities:
            gate, kept = self.gates[g], self.kept(g)
            index = torch.ones_like(gate, dtype=torch.bool).nonzero()
            frames.append(
                pd.DataFrame(
                    {
                        "name": _names(g, torch.ones_like(kept)),
                        "granularity": g,
                        "layer": index[:, 0].numpy(),
                        "unit": index[:, 1].numpy() if index.shape[1] > 1 else -1,
                        "gate": gate.flatten().numpy(),
                        "kept": kept.flatten().numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    @property
    def n_edges(self) -> int | None:
        """Number of kept edges, or None for a node-level circuit."""
        return None if self.edges is None else len(self.edges)

    def __repr__(self) -> str:
        parts = [f"{g}={self.n_kept(g)}/{self.kept(g).numel()}" for g in self.summary().index]
        if self.edges is not None:
            parts.append(f"edges={len(self.edges)}")
        return f"Circuit({self.shape.name}: {', '.join(parts)})"

    # -- persistence --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.shape.to_dict(),
            "threshold": self.threshold,
            "gates": {g: t.tolist() for g, t in self.gates.items()},
            "meta": self.meta,
        }
        if self.edges is not None:
            data["edges"] = list(self.edges)
        if self.scores:
            data["scores"] = {g: t.tolist() for g, t in self.scores.items()}
        if self.edge_scores:
            data["edge_scores"] = self.edge_scores
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a tl_nodeprune circuit (format={data.get('format')!r}).")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"Circuit format version {data.get('version')} is not one this release reads "
                f"{READABLE_VERSIONS}; upgrade tl_nodeprune."
            )
        shape = ModelShape.from_dict(data["model"])
        tensors = {
            key: {g: torch.tensor(v, dtype=torch.float32) for g, v in data.get(key, {}).items()}
            for key in ("gates", "scores")
        }
        edges = data.get("edges")
        return cls(
            shape,
            tensors["gates"],
            float(data["threshold"]),
            dict(data.get("meta", {})),
            edges=None if edges is None else tuple(edges),
            scores=tensors["scores"],
            edge_scores=dict(data.get("edge_scores", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON (no pickle), carrying the model's shape so loading can check it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_model(self, model: Any) -> None:
        """Raise a ValueError when `model` has another shape than the circuit's model."""
        ModelShape.from_model(model).check_same(self.shape)


def _names(granularity: str, mask: Tensor) -> list[str]:
    """Names of the nodes where `mask` is True, in index order."""
    s = spec(granularity)
    return [s.node_name(idx) for idx in mask.nonzero().tolist()]


def parse_node(name: str, shape: ModelShape | None = None) -> tuple[str, tuple[int, ...]]:
    """`'a3.h5'` -> ('head', (3, 5)); the inverse of the node naming grammar.

    Indices are non-negative integers (`a-1` is refused, not read as the last layer); with
    `shape`, they must also be inside the model.
    """
    kind, index = parse_node_name(name)
    if shape is not None:
        if not shape.has(kind):
            raise ValueError(f"Node {name!r} is a {kind}, but {shape.name!r} has no MLPs.")
        limits = shape.units(kind)
        if any(i >= n for i, n in zip(index, limits, strict=True)):
            raise ValueError(
                f"Node {name!r} is out of range for {shape.name!r}: {kind} indices must be "
                f"below {limits} (layer{', unit' * (len(limits) - 1)})."
            )
    return kind, index


_EDGE = re.compile(r"^(input|a\d+\.h\d+|m\d+)->(logits|m\d+|a\d+\.h\d+<([qkv])>)$")


def parse_edge(name: str, shape: ModelShape | None = None) -> tuple[str, str, str | None]:
    """`'a0.h1->a2.h3<k>'` -> ('a0.h1', 'a2.h3', 'k'); checks ranges against `shape` if given.

    The reader of a `<k>`/`<v>` edge is a key/value head, numbered among `shape.kv_heads`.
    """
    match = _EDGE.match(name)
    if match is None:
        raise ValueError(
            f"Bad edge name {name!r}; use writer->reader with writers input, a3.h5, m3 and "
            "readers a3.h5<q>, a3.h5<k>, a3.h5<v>, m3, logits (e.g. 'input->a0.h1<q>')."
        )
    writer, reader_full, kind = match.groups()
    reader = reader_full.split("<")[0]
    if shape is not None:
        for end, is_kv in ((writer, False), (reader, kind in ("k", "v"))):
            if end in ("input", "logits"):
                continue
            g, index = parse_node(end)
            limits = (shape.n_layers, shape.kv_heads if is_kv else shape.n_heads)
            if g == "mlp" and not shape.has("mlp"):
                raise ValueError(f"Edge {name!r} names an MLP, but {shape.name!r} has none.")
            if any(i >= n for i, n in zip(index, limits, strict=False)):
                raise ValueError(
                    f"Edge {name!r} is out of range for {shape.name!r} ({shape.n_layers} "
                    f"layers, {shape.n_heads} heads, {shape.kv_heads} key/value heads)."
                )
    return writer, reader, kind

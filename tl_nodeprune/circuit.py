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
from .positions import PositionAxis, node_position_name
from .sites import ModelShape

FORMAT = "tl_nodeprune.circuit"
VERSION = 3  # 2 added edges and scores, 3 positions; older files still load
READABLE_VERSIONS = (1, 2, 3)


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

    A position-aware circuit (`positions` set, `tl_nodeprune.positions`) has gates per position
    and node, (len(positions), *units): a node is kept at a position when its gate there is
    open and its parent is kept at that position. `kept` and `nodes` then say which nodes are
    kept at some position, `kept_at` and `node_positions` where.
    """

    shape: ModelShape
    gates: dict[str, Tensor]
    threshold: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)
    edges: tuple[str, ...] | None = None
    scores: dict[str, Tensor] = field(default_factory=dict)
    edge_scores: dict[str, float] = field(default_factory=dict)
    positions: PositionAxis | None = None

    def __post_init__(self) -> None:
        for what, tensors in (("Gates", self.gates), ("Scores", self.scores)):
            for g, t in tensors.items():
                check_granularity(g)
                lead = self._lead if what == "Gates" else ()
                if tuple(t.shape) != (*lead, *self.shape.units(g)):
                    raise ValueError(
                        f"{what} for {g!r} have shape {tuple(t.shape)}, expected "
                        f"{(*lead, *self.shape.units(g))} for this model"
                        + (f" at {lead[0]} positions." if lead else ".")
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
        cls,
        shape: ModelShape,
        nodes: list[str],
        granularities: tuple[str, ...],
        positions: PositionAxis | None = None,
    ) -> Circuit:
        """A binary circuit from node names, with gates for `granularities` (all else closed).

        With `positions`, a name is kept at one position (`a3.h5@END`) or, without `@`, at
        every position.
        """
        lead = () if positions is None else (len(positions),)
        gates = {g: torch.zeros((*lead, *shape.units(g))) for g in granularities}
        for full_name in nodes:
            name, _, where = full_name.partition("@")
            g, index = parse_node(name, shape)
            if g not in gates:
                raise ValueError(f"Node {name!r} is a {g}, but granularities are {granularities}.")
            if positions is None and where:
                raise ValueError(
                    f"Node {full_name!r} names a position, but the circuit is position-blind; "
                    "pass positions=PositionAxis(...) or drop the '@...'."
                )
            if positions is not None and where and where not in positions.names:
                raise ValueError(
                    f"Node {full_name!r}: position {where!r} is not one of {positions.names}."
                )
            at = () if positions is None else (
                slice(None) if not where else positions.names.index(where),
            )
            gates[g][(*at, *index)] = 1.0
        return cls(shape, gates, positions=positions)

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
    @property
    def _lead(self) -> tuple[int, ...]:
        """The position axis of the gate tensors: (len(positions),), or () position-blind."""
        return () if self.positions is None else (len(self.positions),)

    def own_kept_at(self, granularity: str) -> Tensor:
        """Own gate open, parents ignored, per position: (len(positions), *units) (all True if
        not gated); position-blind, the same as `own_kept`."""
        check_granularity(granularity)
        if granularity in self.gates:
            return self.gates[granularity] > self.threshold
        return torch.ones((*self._lead, *self.shape.units(granularity)), dtype=torch.bool)

    def kept_at(self, granularity: str) -> Tensor:
        """Kept per position with the hierarchy applied there: own gate open at the position
        and parent kept at it; position-blind, the same as `kept`."""
        own = self.own_kept_at(granularity)
        parent_name = spec(granularity).parent
        if parent_name is None:
            return own
        parent = self.kept_at(parent_name)
        return own & parent.reshape(*parent.shape, *([1] * (own.dim() - parent.dim())))

    def own_kept(self, granularity: str) -> Tensor:
        """Nodes whose own gate is open (at some position), ignoring their parents."""
        own = self.own_kept_at(granularity)
        return own if self.positions is None else own.any(0)

    def kept(self, granularity: str) -> Tensor:
        """Nodes kept with the hierarchy applied (at some position, if position-aware)."""
        kept = self.kept_at(granularity)
        return kept if self.positions is None else kept.any(0)

    def node_gates(self) -> dict[str, Tensor]:
        """One gate value per node (shaped `shape.units(g)`): its largest over positions."""
        if self.positions is None:
            return self.gates
        return {g: t.amax(0) for g, t in self.gates.items()}

    @property
    def node_positions(self) -> list[str]:
        """Kept nodes at their positions, `a3.h5@END` (position-blind: the plain names)."""
        if self.positions is None:
            return self.nodes
        return [
            node_position_name(name, position)
            for g in self.granularities
            for p, position in enumerate(self.positions.names)
            for name in _names(g, self.kept_at(g)[p])
        ]

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
        """Kept nodes per granularity: count, total and fraction (and, position-aware, the
        node-positions kept)."""
        rows = [
            {
                "granularity": g,
                "kept": self.n_kept(g),
                "total": self.kept(g).numel(),
                "fraction": self.fraction(g),
                **({} if self.positions is None else
                   {"node_positions": int(self.kept_at(g).sum())}),
            }
            for g in SPECS
            if self.shape.has(g) and (g in self.gates or g in self.shape.blocks())
        ]  # fmt: skip
        return pd.DataFrame(rows).set_index("granularity")

    def to_frame(self) -> pd.DataFrame:
        """One row per gated node: name, granularity, layer, unit index, gate value, kept
        (position-aware: one row per node and position, with a `position` column)."""
        frames = []
        for p, position in enumerate((None,) if self.positions is None else self.positions.names):
            for g in self.granularities:
                gate, kept = self.gates[g], self.kept_at(g)
                if position is not None:
                    gate, kept = gate[p], kept[p]
                index = torch.ones_like(gate, dtype=torch.bool).nonzero()
                frame = pd.DataFrame(
                    {
                        "name": _names(g, torch.ones_like(kept)),
                        "granularity": g,
                        "layer": index[:, 0].numpy(),
                        "unit": index[:, 1].numpy() if index.shape[1] > 1 else -1,
                        "gate": gate.flatten().numpy(),
                        "kept": kept.flatten().numpy(),
                    }
                )
                if position is not None:
                    frame.insert(1, "position", position)
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @property
    def n_edges(self) -> int | None:
        """Number of kept edges, or None for a node-level circuit."""
        return None if self.edges is None else len(self.edges)

    def __repr__(self) -> str:
        parts = [f"{g}={self.n_kept(g)}/{self.kept(g).numel()}" for g in self.summary().index]
        if self.edges is not None:
            parts.append(f"edges={len(self.edges)}")
        if self.positions is not None:
            parts.append(f"at {len(self.positions)} {self.positions.kind} positions")
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
        if self.positions is not None:
            data["positions"] = self.positions.to_dict()
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
        positions = data.get("positions")
        return cls(
            shape,
            tensors["gates"],
            float(data["threshold"]),
            dict(data.get("meta", {})),
            edges=None if edges is None else tuple(edges),
            scores=tensors["scores"],
            edge_scores=dict(data.get("edge_scores", {})),
            positions=None if positions is None else PositionAxis.from_dict(positions),
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

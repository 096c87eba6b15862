"""Circuits from other tools: MIB / EAP-IG graph JSON (read and write), edge pruning, ACDC.

Every reader returns a `Circuit` built by `Circuit.from_edges`: the file's kept edges, renamed
to our grammar (`input->a0.h1<q>`, `a5.h1->m5`, `m11->logits`), and the nodes they induce.
Only JSON is read; pickles never are (ACDC's own `save_edges` pickles: convert it first, see
`read_acdc`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .circuit import Circuit, parse_edge, parse_node
from .granularities import node_name
from .sites import ModelShape


class FormatError(ValueError):
    """A circuit file that does not follow its format; the message names the key or entry."""


def _shape_of(model_or_shape: Any) -> ModelShape:
    return model_or_shape if isinstance(model_or_shape, ModelShape) else ModelShape.from_model(
        model_or_shape
    )


def _load_json(path: str | Path) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not JSON (line {err.lineno}, column {err.colno}).") from None


# -- MIB / EAP-IG -----------------------------------------------------------------------------
def graph_edges(shape: ModelShape, parallel_attn_mlp: bool = False) -> Iterator[str]:
    """Every edge of the EAP-IG / MIB graph of a model, in its writer -> reader order.

    Heads read q, k and v from every earlier writer; an MLP also reads its own layer's heads
    unless attention and MLP run in parallel; logits read every writer. Under grouped-query
    attention the k/v readers are the key/value heads.
    """
    writers = ["input"]
    for layer in range(shape.n_layers):
        heads = [node_name("head", (layer, h)) for h in range(shape.n_heads)]
        mlp = node_name("mlp", (layer,))
        for w in writers:
            for kind, n in (("q", shape.n_heads), ("k", shape.kv_heads), ("v", shape.kv_heads)):
                yield from (f"{w}->{node_name('head', (layer, h))}<{kind}>" for h in range(n))
        mlp_reads = writers if parallel_attn_mlp else writers + heads
        writers = writers + heads
        if shape.has("mlp"):
            yield from (f"{w}->{mlp}" for w in mlp_reads)
            writers.append(mlp)
    yield from (f"{w}->logits" for w in writers)


def _node_values(circuit: Circuit) -> dict[str, float]:
    """Per head and MLP node: its score if the circuit has one, else its effective gate."""
    values = {}
    for g in ("head", "mlp"):
        if not circuit.shape.has(g):
            continue
        if g in circuit.scores:
            v = circuit.scores[g]
        else:
            v = circuit.kept(g).float()
            gates = circuit.node_gates()  # position-aware: a node's largest gate over positions
            if g in gates:
                v = gates[g].clone()
                if g == "head" and "attn" in gates:
                    v = v * gates["attn"][:, None]
        for idx in torch.ones_like(v, dtype=torch.bool).nonzero().tolist():
            values[node_name(g, idx)] = float(v[tuple(idx)])
    return values


def to_mib(circuit: Circuit, parallel_attn_mlp: bool = False) -> dict[str, Any]:
    """Our circuit as a MIB / EAP-IG graph dict (every edge listed, `in_graph` marks kept ones).

    Edge circuits keep exactly their edges. A node-only circuit keeps every edge whose two ends
    are kept nodes (input and logits always are; a k/v reader is kept when one of the query
    heads sharing it is): the whole subgraph its nodes induce, which is what ablating the nodes
    leaves running. Edge scores are the circuit's `edge_scores`, else the lower of the two
    ends' node values (scores or gates), so ranking edges ranks nodes. Our MLP neurons have no
    place in the format (MIB's "neurons" are residual dimensions) and are not written. Nor do
    positions: a position-aware circuit is written as the nodes it keeps at some position (the
    format has no per-position nodes), its node values the largest gate over positions.
    """
    shape = circuit.shape
    values = _node_values(circuit)
    top = max(values.values(), default=1.0)
    heads, mlps = circuit.kept("head"), circuit.kept("mlp") if shape.has("mlp") else None
    group = shape.n_heads // shape.kv_heads

    def kept_end(name: str, kind: str | None) -> bool:
        if name in ("input", "logits"):
            return True
        g, idx = parse_node(name)
        if g == "mlp":
            return bool(mlps[idx])
        if kind in ("k", "v"):
            return bool(heads[idx[0], idx[1] * group : (idx[1] + 1) * group].any())
        return bool(heads[idx])

    kept_edges = set(circuit.edges or ())
    edges = {}
    for name in graph_edges(shape, parallel_attn_mlp):
        writer, reader, kind = parse_edge(name)
        if circuit.edges is not None:
            in_graph = name in kept_edges
        else:
            in_graph = kept_end(writer, None) and kept_end(reader, kind)
        ends = [writer] if kind in ("k", "v") and group > 1 else [writer, reader]
        vals = [values[e] for e in ends if e in values]  # a GQA k/v reader is no query head
        score = circuit.edge_scores.get(name, min(vals, default=top))
        edges[name] = {"score": float(score), "in_graph": bool(in_graph)}
    nodes: dict[str, Any] = {"input": {"in_graph": True}}
    for name, value in values.items():
        g, idx = parse_node(name)
        nodes[name] = {"in_graph": bool((heads if g == "head" else mlps)[idx]), "score": value}
    nodes["logits"] = {"in_graph": True}
    cfg = {
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "parallel_attn_mlp": parallel_attn_mlp,
        "d_model": shape.d_model,
    }
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_mib(circuit: Circuit, path: str | Path, parallel_attn_mlp: bool = False) -> Path:
    """Write `to_mib(circuit)` as JSON (readable by EAP-IG's `Graph.from_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_mib(circuit, parallel_attn_mlp)))
    return path


def from_mib(data: Any, shape: ModelShape | None = None, where: str = "MIB graph") -> Circuit:
    """A MIB / EAP-IG graph dict as our `Circuit`: its `in_graph` edges and induced nodes.

    Without `shape`, the model's shape is taken from `cfg` (d_head = d_model / n_heads,
    d_mlp = 4 d_model when the graph has MLP nodes, as in GPT-2). Node scores become
    `Circuit.scores` for heads and MLP blocks.
    """
    if not isinstance(data, dict):
        raise FormatError(f"{where}: top level must be an object with cfg, nodes, edges.")
    for key in ("cfg", "nodes", "edges"):
        if not isinstance(data.get(key), dict):
            raise FormatError(f"{where}: key {key!r} is missing or not an object.")
    cfg = data["cfg"]
    for key in ("n_layers", "n_heads", "d_model"):
        if not isinstance(cfg.get(key), int):
            raise FormatError(f"{where}: key 'cfg.{key}' is missing or not an integer.")
    if shape is None:
        has_mlp = any(re.fullmatch(r"m\d+", n) for n in data["nodes"])
        shape = ModelShape(
            name=f"mib-{cfg['n_layers']}x{cfg['n_heads']}",
            n_layers=cfg["n_layers"],
            n_heads=cfg["n_heads"],
            d_head=cfg["d_model"] // cfg["n_heads"],
            d_mlp=4 * cfg["d_model"] if has_mlp else 0,
            d_vocab=1,
            d_model=cfg["d_model"],
        )
    for key in ("n_layers", "n_heads", "d_model"):
        mine = getattr(shape, key)
        if mine and cfg[key] != mine:
            raise FormatError(f"{where}: key 'cfg.{key}' is {cfg[key]}, the model has {mine}.")
    kept, edge_scores = [], {}
    for name, info in data["edges"].items():
        if not isinstance(info, dict) or not isinstance(info.get("in_graph"), bool):
            raise FormatError(f"{where}: edge {name!r} needs a boolean 'in_graph'.")
        try:
            parse_edge(name, shape)
        except ValueError as err:
            raise FormatError(f"{where}: edge key {name!r}: {err}") from None
        if info["in_graph"]:
            kept.append(name)
        if isinstance(info.get("score"), (int, float)):
            edge_scores[name] = float(info["score"])
    scores = _mib_node_scores(data["nodes"], shape, where)
    circuit = Circuit.from_edges(shape, kept, edge_scores, meta={"source": where, "format": "mib"})
    circuit.scores = scores
    return circuit


def _mib_node_scores(nodes: dict[str, Any], shape: ModelShape, where: str) -> dict[str, Any]:
    out = {g: torch.full(shape.units(g), math.nan) for g in ("head", "mlp") if shape.has(g)}
    seen = set()
    for name, info in nodes.items():
        if name in ("input", "logits"):
            continue
        try:
            g, idx = parse_node(name)
            if g not in out or any(i >= n for i, n in zip(idx, shape.units(g), strict=True)):
                raise ValueError("not a head or MLP of this model")
        except ValueError as err:
            raise FormatError(f"{where}: node key {name!r}: {err}") from None
        if isinstance(info, dict) and isinstance(info.get("score"), (int, float)):
            out[g][idx] = float(info["score"])
            seen.add(g)
    return {g: t for g, t in out.items() if g in seen and not t.isnan().any()}


def read_mib(path: str | Path, model_or_shape: Any = None) -> Circuit:
    """Read a MIB / EAP-IG graph JSON file (`Graph.to_json`) into our `Circuit`."""
    shape = None if model_or_shape is None else _shape_of(model_or_shape)
    return from_mib(_load_json(path), shape, where=str(path))


# -- edge pruning (Bhaskar et al. 2024) -------------------------------------------------------
_EP_WRITER = re.compile(r"^(tok_embeds|pos_embeds|embeds|a\d+\.h\d+|m\d+)$")
_EP_READER = re.compile(r"^(resid_post|m\d+|(a\d+\.h\d+)\.([qkv]))$")


def read_edge_pruning(path: str | Path, model_or_shape: Any) -> Circuit:
    """Read the `edges.json` that edge pruning writes (`get_edges()`: [writer, reader] pairs).

    Its writers are `tok_embeds`, `pos_embeds` (GPT-2) or `embeds` (Llama), all our `input`,
    `a3.h5` and `m3`; its readers are `a3.h5.q|k|v`, `m3` and `resid_post` (our `logits`). On
    Llama models k/v readers number the key/value heads, as ours do. The file names no model
    size, so the model (or its shape) is required.
    """
    shape = _shape_of(model_or_shape)
    data = _load_json(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a list of [writer, reader] pairs.")
    edges = []
    for i, pair in enumerate(data):
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        w = _EP_WRITER.match(pair[0]) if ok else None
        r = _EP_READER.match(pair[1]) if ok else None
        if w is None or r is None:
            raise FormatError(
                f"{path}: entry {i} ({pair!r}) is not a [writer, reader] pair such as "
                "['a0.h1', 'a2.h3.q'] or ['m5', 'resid_post']."
            )
        writer = "input" if pair[0].endswith("embeds") else pair[0]
        if r.group(2):
            reader = f"{r.group(2)}<{r.group(3)}>"
        else:
            reader = "logits" if pair[1] == "resid_post" else pair[1]
        edges.append(_checked(f"{writer}->{reader}", shape, f"{path}: entry {i}"))
    return Circuit.from_edges(shape, edges, meta={"source": str(path), "format": "edge_pruning"})


# -- ACDC (Conmy et al. 2023) -----------------------------------------------------------------
_ACDC_HOOK = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_in|hook_resid_mid|hook_mlp_out|"
    r"hook_[qkv]_input|attn\.hook_result|attn\.hook_[qkv])$"
)


def _acdc_index(index: Any) -> int | None:
    """The head index of an ACDC TorchIndex, written '[:, :, 3]' / '[:]' or [null, null, 3]."""
    if isinstance(index, str):
        parts = [p.strip() for p in index.strip().removeprefix("[").removesuffix("]").split(",")]
        index = [None if p in (":", "COLON", "None") else int(p) for p in parts]
    if not isinstance(index, list):
        raise ValueError(f"bad index {index!r}")
    heads = [x for x in index if x is not None]
    return int(heads[0]) if heads else None


def _acdc_node(hook: str, index: Any, n_layers: int) -> tuple[str, str | None, bool]:
    """(our node name, q/k/v or None, internal?) for an ACDC node."""
    m = _ACDC_HOOK.match(hook)
    if m is None:
        raise ValueError(f"unknown hook {hook!r}")
    layer, kind, head = int(m.group(1)), m.group(2), _acdc_index(index)
    if kind == "hook_resid_pre" and layer == 0:
        return "input", None, False
    if kind == "hook_resid_post" and layer == n_layers - 1:
        return "logits", None, False
    if kind in ("hook_mlp_in", "hook_resid_mid", "hook_mlp_out"):
        return node_name("mlp", (layer,)), None, False
    if head is None:
        raise ValueError(f"{hook} needs a head index like '[:, :, 3]'")
    name = node_name("head", (layer, head))
    if kind.startswith("hook_") and kind.endswith("_input"):
        return name, kind[5], False
    if kind == "attn.hook_result":
        return name, None, False
    if kind.startswith("attn.hook_"):
        return name, kind[-1], True
    raise ValueError(f"{hook} is not a node of ACDC's graph")


def read_acdc(path: str | Path, model_or_shape: Any) -> Circuit:
    """Read ACDC's kept edges from JSON: a list of [child, child_index, parent, parent_index(,
    effect_size)], as in the keys of `TLACDCExperiment.save_edges` (hook names and TorchIndex).

    ACDC pickles that list; convert it once where ACDC runs, e.g.
    `json.dump([[c, str(ci), p, str(pi), s] for (c, ci, p, pi), s in edges], f)`.
    Edges inside one node (a head's q/k/v input to its q/k/v, an MLP's input to its output)
    carry no connectivity and are skipped.
    """
    shape = _shape_of(model_or_shape)
    data = _load_json(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a list of [child, child_index, parent, ...] entries.")
    edges, scores = [], {}
    for i, entry in enumerate(data):
        if not (isinstance(entry, list) and len(entry) in (4, 5)):
            raise FormatError(
                f"{path}: entry {i} must be [child, child_index, parent, parent_index"
                "(, effect_size)]."
            )
        try:
            reader, kind, internal_r = _acdc_node(entry[0], entry[1], shape.n_layers)
            writer, _, internal_w = _acdc_node(entry[2], entry[3], shape.n_layers)
        except (ValueError, TypeError) as err:
            raise FormatError(f"{path}: entry {i}: {err}.") from None
        if internal_r or internal_w or writer == reader:
            continue
        name = f"{writer}->{reader}" + (f"<{kind}>" if kind else "")
        edges.append(_checked(name, shape, f"{path}: entry {i}"))
        if len(entry) == 5 and isinstance(entry[4], (int, float)):
            scores[name] = float(entry[4])
    return Circuit.from_edges(shape, edges, scores, meta={"source": str(path), "format": "acdc"})


def _checked(name: str, shape: ModelShape, where: str) -> str:
    try:
        parse_edge(name, shape)
    except ValueError as err:
        raise FormatError(f"{where}: {err}") from None
    return name


__all__ = [
    "FormatError",
    "from_mib",
    "graph_edges",
    "read_acdc",
    "read_edge_pruning",
    "read_mib",
    "to_mib",
    "write_mib",
]

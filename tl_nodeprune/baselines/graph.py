"""The edge graph of a transformer and a forward pass with every edge masked on its own.

Writers: the input embeddings (`input`), every attention head (`a{L}.h{H}`) and every MLP
(`m{L}`). Readers: every head's query, key and value input (`a{L}.h{H}<q|k|v>`), every MLP's
input (`m{L}`) and the logits. A reader reads every writer of an earlier layer, and an MLP
also reads the heads of its own layer unless attention and MLP run in parallel. GPT-2 small
has 158 nodes and 32,491 edges, the convention of EAP-IG and of MIB's circuit files.

Grouped-query attention (e.g. SmolLM2: 9 query heads, 3 key/value heads): a layer has one
`<k>` and one `<v>` reader per *key/value* head, numbered among the key/value heads, because
several query heads share one key and value projection; a query head's `<q>` reader is its own.

The masked forward rebuilds each reader's input as the corrupted run's residual stream at that
reader plus, for each upstream writer, mask * (writer's output in this run - its corrupted
output): all masks 1 gives the clean residual stream, all masks 0 the corrupted one. Head
outputs come from `hook_z` and `W_O` (`b_O` is a constant in both runs, so it cancels), query,
key and value inputs go through the block's first norm and are injected at `hook_q/k/v`, MLP
inputs replace `hook_resid_mid` and the logits' input replaces the last `hook_resid_post`.
No model setting is changed (a natively booted bridge refuses `set_use_split_qkv_input`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..ablation import capture
from ..granularities import node_name
from ..objectives import forward_answers
from ..sites import ModelShape

QKV = ("q", "k", "v")  # a layer's attention readers, in flat mask order
ReaderKey = tuple[int, str]  # (layer, "q" | "k" | "v" | "mlp"); (n_layers, "logits")
HookList = list[tuple[str, Callable[..., Tensor]]]


@dataclass(frozen=True)
class EdgeGraph:
    """Writers, readers and edges of a model shape; masks are flat tensors in `edge_names` order."""

    shape: ModelShape
    parallel_attn_mlp: bool = False

    @classmethod
    def from_model(cls, model: Any) -> EdgeGraph:
        return cls(ModelShape.from_model(model), bool(getattr(model.cfg, "parallel_attn_mlp", 0)))

    @property
    def has_mlp(self) -> bool:
        return self.shape.has("mlp")

    @property
    def per_layer(self) -> int:
        """Writers per layer: the heads, and the MLP when there is one."""
        return self.shape.n_heads + int(self.has_mlp)

    @cached_property
    def writers(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.shape.n_layers):
            names += [node_name("head", (layer, h)) for h in range(self.shape.n_heads)]
            names += [node_name("mlp", (layer,))] if self.has_mlp else []
        return tuple(names)

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_nodes(self) -> int:
        """Writers plus the logits node (158 for GPT-2 small)."""
        return self.n_writers + 1

    def upstream(self, layer: int, kind: str) -> int:
        """How many writers (a prefix of `writers`) the reader `kind` of `layer` reads."""
        before = 1 + layer * self.per_layer
        if kind == "mlp" and not self.parallel_attn_mlp:
            return before + self.shape.n_heads
        return before

    @cached_property
    def groups(self) -> tuple[tuple[ReaderKey, int, int, int], ...]:
        """(reader key, offset into the flat mask, readers, upstream writers) in flat order."""
        out, offset = [], 0
        counts = {"q": self.shape.n_heads, "k": self.shape.kv_heads, "v": self.shape.kv_heads}
        if self.has_mlp:
            counts["mlp"] = 1
        for layer in range(self.shape.n_layers):
            for kind, n in counts.items():
                up = self.upstream(layer, kind)
                out.append(((layer, kind), offset, n, up))
                offset += n * up
        out.append(((self.shape.n_layers, "logits"), offset, 1, self.n_writers))
        return tuple(out)

    @property
    def n_edges(self) -> int:
        _, offset, n, up = self.groups[-1]
        return offset + n * up

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        names = []
        for (layer, kind), _, n, up in self.groups:
            for r in range(n):
                if kind == "logits":
                    reader = "logits"
                elif kind == "mlp":
                    reader = node_name("mlp", (layer,))
                else:
                    reader = f"{node_name('head', (layer, r))}<{kind}>"
                names += [f"{w}->{reader}" for w in self.writers[:up]]
        return tuple(names)

    @cached_property
    def edge_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.edge_names)}

    def split(self, flat: Float[Tensor, " edges"]) -> dict[ReaderKey, Tensor]:
        """Views of a flat per-edge tensor as (readers, upstream writers) per reader group."""
        if flat.shape[-1] != self.n_edges:
            raise ValueError(f"Expected {self.n_edges} edge values, got {flat.shape[-1]}.")
        return {key: flat[off : off + n * up].view(n, up) for key, off, n, up in self.groups}

    def node_mask(self, writers: Float[Tensor, " writers"]) -> Float[Tensor, " edges"]:
        """Per-edge value of each edge's writer (e.g. a writer-node mask spread onto its edges)."""
        return torch.cat([writers[:up].repeat(n) for _, _, n, up in self.groups])


class ProjectionWeights:
    """Detached projection weights per layer, read once (bridge properties rebuild them)."""

    def __init__(self, model: Any, shape: ModelShape) -> None:
        self.q, self.k, self.v, self.o, self.norm = [], [], [], [], []
        with torch.no_grad():
            for block in model.blocks:
                attn = block.attn
                for kind, store in (("Q", self.q), ("K", self.k), ("V", self.v)):
                    w = getattr(attn, f"_W_{kind}", None)  # HookedTransformer under GQA
                    w = getattr(attn, f"W_{kind}") if w is None else w
                    b = getattr(attn, f"_b_{kind}", None)
                    b = getattr(attn, f"b_{kind}", None) if b is None else b
                    store.append((w.detach(), None if b is None else b.detach()))
                self.o.append(attn.W_O.detach())  # (head, d_head, d_model)
                self.norm.append(block.ln1)
        for kind, store, n in (("K", self.k, shape.kv_heads), ("V", self.v, shape.kv_heads)):
            if store[0][0].shape[0] != n:
                raise ValueError(
                    f"W_{kind} has {store[0][0].shape[0]} heads but the model has {n} key/value "
                    "heads; this model layout is not supported by the edge graph."
                )


def corrupted_values(model: Any, graph: EdgeGraph, tokens: Int[Tensor, "batch pos"]) -> dict:
    """The corrupted run's activations the masked forward needs (no gradient)."""
    return capture(model, tokens, capture_names(graph))


def capture_names(graph: EdgeGraph) -> list[str]:
    """The hooks whose corrupted values a masked forward over `graph` reads, in layer order."""
    n = graph.shape.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)]
    names += [f"blocks.{layer}.attn.hook_z" for layer in range(n)]
    if graph.has_mlp:
        names += [f"blocks.{layer}.hook_resid_mid" for layer in range(n)]
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]
    return [*names, f"blocks.{n - 1}.hook_resid_post"]


class EdgeRun:
    """Hooks for one masked forward; holds each writer's (output - corrupted output) chunk."""

    def __init__(
        self,
        model: Any,
        graph: EdgeGraph,
        edge_mask: Float[Tensor, " edges"],
        corrupted: dict[str, Tensor],
        writer_mask: Float[Tensor, " writers"] | None = None,
        input_value: Tensor | None = None,
        probes: dict[ReaderKey, Tensor] | None = None,
        weights: ProjectionWeights | None = None,
    ) -> None:
        if graph.parallel_attn_mlp and graph.has_mlp:
            raise ValueError(
                "The masked edge forward does not support parallel attention and MLP blocks "
                "(no hook_resid_mid to inject the MLP's input); use a sequential model."
            )
        self.model, self.graph, self.corrupted = model, graph, corrupted
        self.masks = graph.split(edge_mask)
        self.writer_mask = writer_mask
        self.input_value = input_value
        self.probes = probes or {}
        self.w = weights or ProjectionWeights(model, graph.shape)
        self.chunks: list[Tensor] = []  # (writers in chunk, batch, pos, d_model), in order
        self.qkv: tuple[int, Tensor] | None = None  # (layer, its q, k and v inputs together)

    def _push(self, delta: Tensor) -> None:
        """Store one chunk of writer deltas, (writers, batch, pos, d_model), writer-major.

        Writer-major storage lets `reader_input` mix writers with one matrix product on a
        view, so autograd keeps each delta once instead of a permuted copy per reader group.
        """
        start = sum(c.shape[0] for c in self.chunks)
        if self.writer_mask is not None:
            m = self.writer_mask[start : start + delta.shape[0]].to(delta.dtype)
            delta = delta * m[:, None, None, None]
        self.chunks.append(delta.contiguous())

    def reader_input(self, key: ReaderKey, base: Tensor) -> Tensor:
        """`base` (the corrupted residual) plus mask-weighted writer deltas, per reader.

        A layer's query, key and value readers read the same writers, so the first of them
        mixes all three at once (one pass over the writer deltas, not three) and the others
        take their rows of it.
        """
        layer, kind = key
        if kind in QKV:
            if self.qkv is None or self.qkv[0] != layer:
                mask = torch.cat([self.masks[(layer, k)] for k in QKV])
                self.qkv = (layer, self._mix(mask, base))
            rows = [self.masks[(layer, k)].shape[0] for k in QKV]
            start = sum(rows[: QKV.index(kind)])
            out = self.qkv[1][:, :, start : start + rows[QKV.index(kind)]]
        else:
            out = self._mix(self.masks[key], base)
        if key in self.probes:
            out = out + self.probes[key]
        return out

    def _mix(self, mask: Float[Tensor, "readers up"], base: Tensor) -> Tensor:
        """(batch, pos, readers, d_model): `base` plus each reader's mask-weighted deltas."""
        n_readers, up = mask.shape
        mixed, start = None, 0
        for chunk in self.chunks:
            if start >= up:
                break
            width = chunk.shape[0]
            m = mask[:, start : start + width].to(chunk.dtype)  # (readers, writers in chunk)
            flat = chunk.reshape(width, -1)  # (writers in chunk, batch * pos * d_model)
            mixed = m @ flat if mixed is None else torch.addmm(mixed, m, flat)
            start += width
        b, p, d = base.shape
        out = base[:, :, None, :]
        if mixed is not None:
            out = out + mixed.view(n_readers, b, p, d).permute(1, 2, 0, 3)  # (b, p, r, d)
        else:
            out = out.expand(-1, -1, n_readers, -1)
        return out

    def hooks(self) -> HookList:
        n = self.graph.shape.n_layers
        hooks: HookList = [("blocks.0.hook_resid_pre", self._input_hook)]
        for layer in range(n):
            for kind in ("q", "k", "v"):
                hooks.append((f"blocks.{layer}.attn.hook_{kind}", self._qkv_hook(layer, kind)))
            hooks.append((f"blocks.{layer}.attn.hook_z", self._z_hook(layer)))
            if self.graph.has_mlp:
                hooks.append((f"blocks.{layer}.hook_resid_mid", self._mlp_in_hook(layer)))
                hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp_out_hook(layer)))
        hooks.append((f"blocks.{n - 1}.hook_resid_post", self._logits_hook))
        return hooks

    def _input_hook(self, x: Tensor, hook: Any) -> Tensor:
        self.chunks, self.qkv = [], None
        value = x if self.input_value is None else self.input_value.to(x.dtype)
        self._push((value - self.corrupted["blocks.0.hook_resid_pre"])[None])
        return x

    def _qkv_hook(self, layer: int, kind: str) -> Callable[..., Tensor]:
        weight, bias = {"q": self.w.q, "k": self.w.k, "v": self.w.v}[kind][layer]
        norm = self.w.norm[layer]
        base_name = f"blocks.{layer}.hook_resid_pre"

        def hook(x: Tensor, hook: Any) -> Tensor:
            resid = self.reader_input((layer, kind), self.corrupted[base_name])
            out = torch.einsum("bphd,hde->bphe", norm(resid), weight.to(resid.dtype))
            return out if bias is None else out + bias.to(out.dtype)

        return hook

    def _z_hook(self, layer: int) -> Callable[..., Tensor]:
        w_o = self.w.o[layer]
        z_name = f"blocks.{layer}.attn.hook_z"

        def hook(z: Tensor, hook: Any) -> Tensor:
            out = torch.einsum("bphe,hed->hbpd", z, w_o.to(z.dtype))
            corr = torch.einsum("bphe,hed->hbpd", self.corrupted[z_name].to(z.dtype), w_o)
            self._push(out - corr)
            return z

        return hook

    def _mlp_in_hook(self, layer: int) -> Callable[..., Tensor]:
        name = f"blocks.{layer}.hook_resid_mid"
        return lambda x, hook: self.reader_input((layer, "mlp"), self.corrupted[name])[:, :, 0]

    def _mlp_out_hook(self, layer: int) -> Callable[..., Tensor]:
        name = f"blocks.{layer}.hook_mlp_out"

        def hook(x: Tensor, hook: Any) -> Tensor:
            self._push((x - self.corrupted[name])[None])
            return x

        return hook

    def _logits_hook(self, x: Tensor, hook: Any) -> Tensor:
        n = self.graph.shape.n_layers
        base = self.corrupted[f"blocks.{n - 1}.hook_resid_post"]
        return self.reader_input((n, "logits"), base)[:, :, 0]


def edge_forward(
    model: Any,
    graph: EdgeGraph,
    tokens: Int[Tensor, "batch pos"],
    answer_pos: Int[Tensor, " batch"],
    edge_mask: Float[Tensor, " edges"],
    corrupted: dict[str, Tensor],
    fast: bool = True,
    **run_kwargs: Any,
) -> Float[Tensor, "batch vocab"]:
    """Answer logits with every edge mixed: mask * clean-side + (1 - mask) * corrupted."""
    run = EdgeRun(model, graph, edge_mask, corrupted, **run_kwargs)
    return forward_answers(model, tokens, answer_pos, run.hooks(), fast)


__all__ = ["EdgeGraph", "EdgeRun", "corrupted_values", "edge_forward"]

"""Hand-compiled transformers whose circuit is known by construction (issue 20, item 1).

Compiled style, as tracr/RASP programs compile: no LayerNorm; a residual stream of one-hot
subspaces (the token, the position, one scratch subspace of K values per intermediate
feature); saturated attention (a query-key score of `ATTN_SCORE` on one chosen source
position or on a matching token, 0 elsewhere); MLPs as lookup tables (one ReLU neuron per
key with a threshold bias, and AND neurons that fire only when two features are both
present); an unembedding that reads the final feature subspace. Every head and neuron that
the program does not use writes nothing, so the program's heads and blocks are the circuit.

Prompts are `BOS v1 ... v7` with values in 0..K-1; corrupted prompts change exactly the
tokens the circuit reads, and every table is a bijection, so every needed node's corrupted
value changes every answer. The models (`COMPILED`):

- `copy`: one head moves a token to the end; the unembedding reads it.
- `chain`: head (layer 0) -> MLP table (layer 1) -> head (layer 2), through a middle position.
- `and_pair`: two heads of layer 0 each move one token to the end; an AND table in MLP 1 maps
  the pair to the answer (a Latin square, so each head alone leaves the answer wrong).
- `deep`: 4 heads and 5 MLP tables in one chain over 6 layers (the shape of the worst failure
  the issue reports).
- `induction`: a previous-token head and an induction head (content match), then an MLP table.
- `long`: 6 heads and 6 MLP tables, one of each per layer, in one chain over 6 layers.

Each but `copy` also comes as `<name>_soft`: the same program with the answer's logit at
`SOFT_LOGIT_SCALE` instead of `LOGIT_SCALE`, so that removing one needed node costs KL ~0.4
(13x a head's price) instead of ~10: the range where the issue saw needed nodes lost.

Flavours: "hooked" (HookedTransformer) and "bridge-native" (TransformerBridge booted natively),
both with `normalization_type=None`. "bridge-llama" is refused: a Llama always normalises
(RMSNorm) and has no position embedding (rotary), so positional one-hot attention cannot be
written into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .circuit import Circuit
from .granularities import node_name
from .planted import PlantedProblem
from .sites import ModelShape
from .tasks.base import PromptTask

K = 8  # values per feature subspace; tokens 0..K-1 are values, token K is BOS
SEQ = 8  # BOS and seven values
D_HEAD = 8  # >= K (value path) and >= SEQ (positional query-key path)
N_HEADS = 4
D_MLP = K * K  # room for a full AND table
ATTN_SCORE = 20.0  # query-key score after the model's 1/sqrt(d_head): e^-20 leaks elsewhere
LOGIT_SCALE = 10.0  # logit of the answer token; every other token gets 0
SOFT_LOGIT_SCALE = 1.5  # "_soft" models: one wrong answer costs KL ~0.4, as the issue measured
BASE: tuple[str, ...] = ("copy", "chain", "and_pair", "deep", "induction", "long")
COMPILED: tuple[str, ...] = BASE + tuple(f"{n}_soft" for n in BASE if n != "copy")
FLAVOURS: tuple[str, ...] = ("hooked", "bridge-native")
GRANULARITIES = ("attn", "mlp", "head")  # what the truth circuits gate


@dataclass
class Weights:
    """Every weight of a compiled model in HookedTransformer layout; biases other than b_in are 0.

    W_Q/W_K/W_V: (layer, head, d_model, d_head); W_O: (layer, head, d_head, d_model);
    W_in: (layer, d_model, d_mlp); W_out: (layer, d_mlp, d_model); W_U: (d_model, d_vocab).
    """

    n_layers: int
    scratch: Sequence[str]
    d_vocab: int = K + 1
    offsets: dict[str, int] = field(init=False)
    W_E: Tensor = field(init=False)
    W_pos: Tensor = field(init=False)
    W_Q: Tensor = field(init=False)
    W_K: Tensor = field(init=False)
    W_V: Tensor = field(init=False)
    W_O: Tensor = field(init=False)
    W_in: Tensor = field(init=False)
    b_in: Tensor = field(init=False)
    W_out: Tensor = field(init=False)
    W_U: Tensor = field(init=False)
    used_neurons: list[int] = field(init=False)
    heads: list[tuple[int, int]] = field(default_factory=list)
    mlps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        sizes = {"tok": self.d_vocab, "pos": SEQ, **{s: K for s in self.scratch}}
        self.offsets, start = {}, 0
        for name, size in sizes.items():
            self.offsets[name], start = start, start + size
        d, L, H = start, self.n_layers, N_HEADS  # noqa: N806
        self.W_E, self.W_pos = torch.zeros(self.d_vocab, d), torch.zeros(SEQ, d)
        self.W_Q, self.W_K, self.W_V = (torch.zeros(L, H, d, D_HEAD) for _ in range(3))
        self.W_O = torch.zeros(L, H, D_HEAD, d)
        self.W_in, self.b_in = torch.zeros(L, d, D_MLP), torch.zeros(L, D_MLP)
        self.W_out, self.W_U = torch.zeros(L, D_MLP, d), torch.zeros(d, self.d_vocab)
        self.used_neurons = [0] * L
        for t in range(self.d_vocab):
            self.W_E[t, self.at("tok", t)] = 1.0
        for p in range(SEQ):
            self.W_pos[p, self.at("pos", p)] = 1.0
        for v in range(K):  # the unembedding reads the final subspace "out"
            self.W_U[self.at("out", v), v] = LOGIT_SCALE

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    def at(self, space: str, i: int) -> int:
        """Residual coordinate of value `i` of subspace `space`."""
        return self.offsets[space] + i

    def _copy_values(self, layer: int, head: int, src: str, dst: str) -> None:
        """OV circuit: value i of `src` at the attended position -> value i of `dst`."""
        for i in range(K):
            self.W_V[layer, head, self.at(src, i), i] = 1.0
            self.W_O[layer, head, i, self.at(dst, i)] = 1.0
        self.heads.append((layer, head))

    def move(
        self, layer: int, head: int, pairs: Sequence[tuple[int, int]], src: str, dst: str
    ) -> None:
        """A positional head: at each (to, from) pair, attend to position `from`, copy src->dst."""
        q = ATTN_SCORE * D_HEAD**0.5  # the model divides scores by sqrt(d_head)
        for to, frm in pairs:
            self.W_Q[layer, head, self.at("pos", to), frm] = q
            self.W_K[layer, head, self.at("pos", frm), frm] = 1.0
        self._copy_values(layer, head, src, dst)

    def match(self, layer: int, head: int, query: str, key: str, value: str, dst: str) -> None:
        """A content head: attend where `key` equals this position's `query`; copy value->dst."""
        q = ATTN_SCORE * D_HEAD**0.5
        for i in range(K):
            self.W_Q[layer, head, self.at(query, i), i] = q
            self.W_K[layer, head, self.at(key, i), i] = 1.0
        self._copy_values(layer, head, value, dst)

    def _neuron(self, layer: int, reads: Sequence[int], writes: int) -> None:
        """One ReLU neuron: 2 * relu(sum(reads) - len(reads) + 0.5) into coordinate `writes`."""
        n = self.used_neurons[layer]
        self.used_neurons[layer] += 1
        for r in reads:
            self.W_in[layer, r, n] = 1.0
        self.b_in[layer, n] = 0.5 - len(reads)  # fires only when every read feature is 1
        self.W_out[layer, n, writes] = 2.0
        if layer not in self.mlps:
            self.mlps.append(layer)

    def lookup(self, layer: int, src: str, dst: str, table: Sequence[int]) -> None:
        """An MLP table: value i of `src` -> value table[i] of `dst`, one neuron per key."""
        for i in range(K):
            self._neuron(layer, [self.at(src, i)], self.at(dst, table[i]))

    def and_table(self, layer: int, a: str, b: str, dst: str, table: Tensor) -> None:
        """An MLP of AND neurons: values (i, j) of (a, b) -> value table[i, j] of `dst`."""
        for i in range(K):
            for j in range(K):
                self._neuron(layer, [self.at(a, i), self.at(b, j)], self.at(dst, int(table[i, j])))


@dataclass
class Program:
    """A compiled model's weights, the function it computes and how its prompts are drawn.

    `reads` are the positions whose tokens the circuit reads: corruption changes exactly those;
    None means the circuit reads every token (induction), so a corrupted prompt is a fresh one.
    """

    weights: Weights
    answer: Callable[[Tensor], Tensor]  # (batch, seq) tokens -> (batch,) answer ids
    reads: tuple[int, ...] | None = None
    sample: Callable[[int, torch.Generator], Tensor] | None = None


def _perm(gen: torch.Generator) -> Tensor:
    return torch.randperm(K, generator=gen)


def _head(gen: torch.Generator) -> int:
    return int(torch.randint(N_HEADS, (1,), generator=gen))


def _copy(gen: torch.Generator) -> Program:
    """One head of layer 1 moves the token at position 3 to the end; the answer is that token."""
    w = Weights(3, ["out"])
    w.move(1, _head(gen), [(SEQ - 1, 3)], "tok", "out")
    return Program(w, lambda t: t[:, 3], (3,))


def _chain(gen: torch.Generator) -> Program:
    """Head 0 moves token 2 to position 4, MLP 1 maps it through a table, head 2 reads it out."""
    w, table = Weights(4, ["s1", "s2", "out"]), _perm(gen)
    w.move(0, _head(gen), [(4, 2)], "tok", "s1")
    w.lookup(1, "s1", "s2", table.tolist())
    w.move(2, _head(gen), [(SEQ - 1, 4)], "s2", "out")
    return Program(w, lambda t: table[t[:, 2]], (2,))


def _and_pair(gen: torch.Generator) -> Program:
    """Two heads of layer 0 move tokens 2 and 5 to the end; MLP 1's AND table (a Latin square)."""
    w = Weights(3, ["s1", "s2", "out"])
    a, b = (int(h) for h in torch.randperm(N_HEADS, generator=gen)[:2])
    rows, cols, out = _perm(gen), _perm(gen), _perm(gen)
    table = out[(rows[:, None] + cols[None, :]) % K]  # (K, K): a bijection along each axis
    w.move(0, a, [(SEQ - 1, 2)], "tok", "s1")
    w.move(0, b, [(SEQ - 1, 5)], "tok", "s2")
    w.and_table(1, "s1", "s2", "out", table)
    return Program(w, lambda t: table[t[:, 2], t[:, 5]], (2, 5))


def _deep(gen: torch.Generator) -> Program:
    """Token 1 travels 1 -> 2 -> 4 -> 5 -> 7 through heads 0-3, mapped by MLPs 0-4 on the way."""
    w = Weights(6, [f"s{i}" for i in range(1, 9)] + ["out"])
    tables = [_perm(gen) for _ in range(5)]
    route = [(1, 2), (2, 4), (4, 5), (5, SEQ - 1)]
    for layer, (frm, to) in enumerate(route):
        src = "tok" if layer == 0 else f"s{2 * layer}"
        w.move(layer, _head(gen), [(to, frm)], src, f"s{2 * layer + 1}")
        w.lookup(layer, f"s{2 * layer + 1}", f"s{2 * layer + 2}", tables[layer].tolist())
    w.lookup(4, "s8", "out", tables[4].tolist())

    return Program(w, _through(tables), (1,))


def _through(tables: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """The answer of a chain: token 1's value mapped through every table in turn."""

    def answer(t: Tensor) -> Tensor:
        v = t[:, 1]
        for table in tables:
            v = table[v]
        return v

    return answer


def _long(gen: torch.Generator) -> Program:
    """Token 1 travels one position per layer (1 -> 2 -> ... -> 7), mapped by every layer's MLP."""
    n = SEQ - 2  # layers, hops and tables
    w = Weights(n, [f"s{i}" for i in range(1, 2 * n)] + ["out"])
    tables = [_perm(gen) for _ in range(n)]
    for layer in range(n):
        src = "tok" if layer == 0 else f"s{2 * layer}"
        dst = "out" if layer == n - 1 else f"s{2 * layer + 2}"
        w.move(layer, _head(gen), [(layer + 2, layer + 1)], src, f"s{2 * layer + 1}")
        w.lookup(layer, f"s{2 * layer + 1}", dst, tables[layer].tolist())

    return Program(w, _through(tables), (1,))


def _induction(gen: torch.Generator) -> Program:
    """Previous-token head (layer 0), induction head (layer 1), an MLP table (layer 2).

    Prompts hold six distinct values, then repeat the one at a random position r in 1..5;
    the answer is the table's image of the token that followed it (position r + 1).
    """
    w, table = Weights(3, ["prev", "s1", "out"]), _perm(gen)
    w.move(0, _head(gen), [(j, j - 1) for j in range(1, SEQ)], "tok", "prev")
    w.match(1, _head(gen), "tok", "prev", "tok", "s1")
    w.lookup(2, "s1", "out", table.tolist())

    def sample(n: int, g: torch.Generator) -> Tensor:
        values = torch.stack([torch.randperm(K, generator=g)[: SEQ - 2] for _ in range(n)])
        r = torch.randint(0, SEQ - 3, (n,), generator=g)  # index into values: position r + 1
        last = values[torch.arange(n), r]
        return torch.cat([torch.full((n, 1), K), values, last[:, None]], dim=1)

    def answer(t: Tensor) -> Tensor:
        first = (t[:, 1:-1] == t[:, -1:]).float().argmax(1) + 1  # where the last token was
        return table[t[torch.arange(len(t)), first + 1]]

    return Program(w, answer, None, sample)


PROGRAMS: dict[str, Callable[[torch.Generator], Program]] = {
    "copy": _copy, "chain": _chain, "and_pair": _and_pair, "deep": _deep, "induction": _induction,
    "long": _long,
}  # fmt: skip


def _empty_model(flavour: str, w: Weights) -> Any:
    """A LayerNorm-free TransformerLens model of the compiled shape (weights still random)."""
    common = dict(n_layers=w.n_layers, d_model=w.d_model, n_heads=N_HEADS, d_head=D_HEAD,
                  d_mlp=D_MLP, d_vocab=w.d_vocab, n_ctx=SEQ, act_fn="relu",
                  normalization_type=None, positional_embedding_type="standard")  # fmt: skip
    if flavour == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**common))
    if flavour == "bridge-native":
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_native(TransformerBridgeConfig(**common))
    raise ValueError(
        f"Compiled models come in flavours {FLAVOURS}, got {flavour!r} (a Llama bridge always "
        "normalises with RMSNorm and has rotary positions, so it cannot hold a compiled program)."
    )


def _linear(module: Any) -> nn.Module | None:
    """The wrapped torch module of a bridge component (nn.Linear or nn.Embedding), else None."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Linear | nn.Embedding) else None


def write_weights(model: Any, w: Weights) -> None:
    """Zero every parameter of `model`, then write `w` into it, whatever its layout.

    HookedTransformer holds W_Q etc. as (head, d_model, d_head) tensors; a bridge holds
    nn.Linear weights (out_features, in_features) with head h at rows h*d_head:(h+1)*d_head.
    """
    bridge = _linear(model.unembed) is not None
    hd = N_HEADS * D_HEAD
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        if not bridge:
            model.embed.W_E.copy_(w.W_E)
            model.pos_embed.W_pos.copy_(w.W_pos)
            model.unembed.W_U.copy_(w.W_U)
        else:
            _linear(model.embed).weight.copy_(w.W_E)  # (d_vocab, d_model) in both layouts
            _linear(model.pos_embed).weight.copy_(w.W_pos)
            _linear(model.unembed).weight.copy_(w.W_U.T)
        for layer, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            if not bridge:
                for name in ("W_Q", "W_K", "W_V", "W_O"):
                    getattr(attn, name).copy_(getattr(w, name)[layer])
                mlp.W_in.copy_(w.W_in[layer])
                mlp.b_in.copy_(w.b_in[layer])
                mlp.W_out.copy_(w.W_out[layer])
                continue
            for part in ("q", "k", "v"):  # (head, d_model, d_head) -> (head*d_head, d_model)
                weight = getattr(w, f"W_{part.upper()}")[layer].permute(0, 2, 1).reshape(hd, -1)
                _linear(getattr(attn, part)).weight.copy_(weight)
            _linear(attn.o).weight.copy_(w.W_O[layer].reshape(hd, -1).T)  # (d_model, head*d_head)
            _linear(getattr(mlp, "in")).weight.copy_(w.W_in[layer].T)  # (d_mlp, d_model)
            _linear(getattr(mlp, "in")).bias.copy_(w.b_in[layer])
            _linear(mlp.out).weight.copy_(w.W_out[layer].T)  # (d_model, d_mlp)


def _uniform(n: int, gen: torch.Generator) -> Tensor:
    """BOS, then SEQ - 1 values drawn uniformly (repeats allowed)."""
    return torch.cat([torch.full((n, 1), K), torch.randint(K, (n, SEQ - 1), generator=gen)], 1)


def _prompts(program: Program, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Clean prompts and their corrupted pairs, every corrupted answer differing from the clean."""
    draw = program.sample or _uniform
    clean = draw(n, gen)

    def corrupt(rows: Tensor) -> Tensor:
        """Another value at every read position (or a fresh prompt when reads is None)."""
        m = len(rows)
        if program.reads is None:
            return draw(m, gen)
        out = rows.clone()
        for pos in program.reads:
            out[:, pos] = (rows[:, pos] + torch.randint(1, K, (m,), generator=gen)) % K
        return out

    corrupted = corrupt(clean)
    same = program.answer(corrupted) == program.answer(clean)
    while same.any():  # redraw the pairs whose answers agree
        corrupted[same] = corrupt(clean[same])
        same = program.answer(corrupted) == program.answer(clean)
    return clean, corrupted


def compiled_problem(
    name: str, flavour: str = "hooked", seed: int = 0, n_prompts: int = 64
) -> PlantedProblem:
    """A compiled model (one of `COMPILED`), its circuit by construction and a task for it.

    `seed` draws which head of a layer the program uses, its tables and the prompts. The
    circuit gates blocks and heads (`attn`, `mlp`, `head`): a lookup neuron fires on the
    prompts with its key only, so neuron-level truth depends on which keys the prompts hold.
    """
    if name not in COMPILED:
        raise ValueError(f"Unknown compiled model {name!r}; choose from {COMPILED}.")
    gen = torch.Generator().manual_seed(seed)
    program = PROGRAMS[name.removesuffix("_soft")](gen)
    w = program.weights
    if name.endswith("_soft"):
        w.W_U *= SOFT_LOGIT_SCALE / LOGIT_SCALE
    model = _empty_model(flavour, w)
    write_weights(model, w)
    model.eval()
    clean, corrupted = _prompts(program, n_prompts, gen)
    task = PromptTask.from_tokens(
        clean, corrupted, program.answer(clean), program.answer(corrupted), name=f"compiled-{name}"
    )
    shape = ModelShape.from_model(model)
    gates = {g: torch.zeros(shape.units(g)) for g in GRANULARITIES}
    for layer, head in w.heads:
        gates["attn"][layer] = gates["head"][layer, head] = 1.0
    for layer in w.mlps:
        gates["mlp"][layer] = 1.0
    circuit = Circuit(shape, gates, meta={"compiled": name, "flavour": flavour, "seed": seed})
    return PlantedProblem(model, circuit, task)


def differences(truth: Circuit, found: Circuit) -> tuple[list[str], list[str]]:
    """(needed nodes `found` misses, nodes it keeps beyond `truth`), over `GRANULARITIES`.

    Kept masks with the hierarchy applied, so a needed head inside a closed block is missed.
    """
    missed, extra = [], []
    for g in GRANULARITIES:
        want, got = truth.kept(g), found.kept(g)
        missed += [node_name(g, i) for i in (want & ~got).nonzero().tolist()]
        extra += [node_name(g, i) for i in (got & ~want).nonzero().tolist()]
    return missed, extra

"""`certify`: repair a circuit until no single node flip improves its priced objective, and say so.

The objective of a binary circuit C is loss(full || C) (KL by default) plus the price of every
node C keeps. A flip removes one kept node with the nodes inside it, or restores one closed
node whole (with all the nodes inside it) and the closed blocks that hold it. Training leaves
gates closed for good when their samples clip to 0; this pass, on a validation task, puts back
the nodes worth their price and takes out those that are not, until a full sweep finds no
improving flip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .ablation import DEFAULT_CACHE_BYTES, AblationKind, mixing_hooks, site_masks
from .circuit import Circuit
from .evaluation import Evaluation, Evaluator, circuit_logits
from .granularities import ancestors, node_name, spec
from .objectives import Objective, check_objective, faithfulness_loss, forward_answers
from .positions import PositionAxis, node_position_name
from .sites import frozen
from .tasks.base import PromptTask

OPTIMAL = "locally optimal: no single node flip improves the objective by more than its price"
FLIP_COLUMNS = ("round", "node", "granularity", "action", "loss_before", "loss_after",
                "price", "objective_before", "objective_after")  # fmt: skip

Own = dict[str, Tensor]  # granularity -> bool tensor of own gates (hierarchy not applied)
Move = tuple[str, tuple[int, ...], str]  # (granularity, index, "restore" | "remove")


@dataclass
class Certificate:
    """The repaired circuit, the flips that made it, and what was (and was not) checked.

    `flips` has one row per accepted flip (`FLIP_COLUMNS`; loss is KL for objective "kl",
    price is what the flip added or saved). `unchecked` counts, per granularity, the flips
    of the final sweep that were ranked out (see `certify`); `locally_optimal` is True only
    when that sweep checked every flip and none improved the objective.
    """

    circuit: Circuit
    flips: pd.DataFrame
    locally_optimal: bool
    unchecked: dict[str, int]
    statement: str
    objective: float
    loss: float
    rounds: int
    prices: dict[str, float]
    evaluation: Evaluation
    start: str = "circuit"

    def __str__(self) -> str:
        return self.statement


def certify(
    model: Any,
    circuit: Circuit,
    task: PromptTask,
    objective: Objective = "kl",
    price: Mapping[str, float] | None = None,
    granularities: tuple[str, ...] | None = None,
    max_rounds: int = 20,
    batch_size: int = 32,
    max_candidates: int = 512,
    ablation: AblationKind | None = None,
    tolerance: float = 1e-6,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    from_full: bool = False,
) -> Certificate:
    """Flip single nodes of `circuit` while one lowers loss + price on `task`, then certify.

    Run it on a validation task. Each round scores every flip of the current circuit (blocks
    first, then heads, then neurons) and applies the improving ones, best first, each checked
    again on the circuit as it then is; the pass ends when a sweep finds no flip that lowers the
    objective by more than `tolerance`, or after `max_rounds` rounds. A flip removes a node
    with what it holds, or restores it whole with its blocks (a head brings its attention
    block, a block comes back with all its heads or neurons). `price[g]` is the cost of
    one kept node of g (default `spec(g).price`); every gated granularity of `circuit` is
    priced, and `granularities` (default: all of them) are flipped. Where a granularity has
    more than `max_candidates` closed (or kept) nodes, the flips tried are the top
    `max_candidates` by attribution, |d loss / d gate| from one backward pass (largest for
    closed nodes, smallest for kept ones); the rest are counted in `unchecked`. `ablation`
    defaults to the circuit's own, else corrupted. Position-aware: a flip is a node at one of
    P positions (`a3.h5@END`), priced at `price[g] / P`, as training prices it.

    `from_full` runs the same search a second time from the full model (every gated node
    kept) and keeps whichever ends at the lower objective (`start` says which). A chain of
    nodes that work only together (head -> MLP -> head) is a local optimum once broken: no
    single reopening restores it. Removing nodes one at a time from the full model keeps it.
    It costs a removal check per node, so it suits heads and blocks more than neurons.
    """
    check_objective(objective)
    gated = circuit.granularities
    flipped, prices = _settings(gated, granularities, price, max_rounds, max_candidates)
    kind = ablation or circuit.meta.get("ablation", "corrupted")
    evaluator = Evaluator(model, task, kind, batch_size, gated, cache_bytes)
    evaluator(circuit)  # validates the circuit against the model and the cache
    search = _Search(evaluator, objective, prices, circuit.meta, circuit.positions)
    own: Own = {g: circuit.kept_at(g) for g in gated}  # hierarchy applied: one state a circuit
    found = _descend(search, own, flipped, max_rounds, max_candidates, tolerance)
    start = "circuit"
    if from_full:
        full = {g: torch.ones_like(t) for g, t in own.items()}
        other = _descend(search, full, flipped, max_rounds, max_candidates, tolerance)
        if other.objective < found.objective:
            found, start = other, "full model"
    statement = _statement(found.converged, found.unchecked, found.rounds, max_candidates)
    if from_full:
        statement += f" (of two searches, from the circuit and from the full model: the {start}'s)"
    repaired = search.circuit(
        found.own, {**circuit.meta, "ablation": kind, "certificate": statement}
    )
    return Certificate(
        circuit=repaired,
        flips=pd.DataFrame(found.rows, columns=list(FLIP_COLUMNS)),
        locally_optimal=found.converged and sum(found.unchecked.values()) == 0,
        unchecked=dict(found.unchecked),
        statement=statement,
        objective=found.objective,
        loss=found.loss,
        rounds=found.rounds,
        prices=prices,
        evaluation=evaluator(repaired),
        start=start,
    )


@dataclass
class _Descent:
    """Where one search of single flips ended."""

    own: Own
    loss: float
    rows: list[tuple]
    unchecked: dict[str, int]
    converged: bool
    rounds: int
    objective: float  # loss plus the kept nodes' price, at `own`


def _descend(
    search: _Search,
    own: Own,
    flipped: tuple[str, ...],
    max_rounds: int,
    max_candidates: int,
    tolerance: float,
) -> _Descent:
    """Rounds of `_round` from `own` until a sweep improves nothing (or `max_rounds`)."""
    loss, rows, unchecked = search.loss(own), [], dict.fromkeys(flipped, 0)
    converged, rounds = False, 0
    while rounds < max_rounds and not converged:
        rounds += 1
        moves, unchecked = search.candidates(own, flipped, max_candidates)
        own, loss, accepted, improving = _round(search, own, loss, moves, tolerance)
        rows += [(rounds, *row) for row in accepted]
        converged = not improving
    return _Descent(own, loss, rows, unchecked, converged, rounds, search.objective(own, loss))


def _settings(
    gated: tuple[str, ...],
    granularities: tuple[str, ...] | None,
    price: Mapping[str, float] | None,
    max_rounds: int,
    max_candidates: int,
) -> tuple[tuple[str, ...], dict[str, float]]:
    """The granularities to flip, coarse first, and the price of one node of each gated one."""
    if max_rounds < 1 or max_candidates < 1:
        raise ValueError(
            f"max_rounds and max_candidates must be >= 1, got {max_rounds} and {max_candidates}."
        )
    if not gated:
        raise ValueError("The circuit has no gates; build it with Circuit.from_nodes.")
    flipped = tuple(granularities or gated)
    for g in flipped:
        if g not in gated:
            raise ValueError(
                f"granularities names {g!r}, which the circuit does not gate; choose from "
                f"{', '.join(gated)}."
            )
    flipped = tuple(sorted(flipped, key=lambda g: (len(ancestors(g)), gated.index(g))))
    prices = {g: float(spec(g).price) for g in gated}
    for g, p in dict(price or {}).items():
        if g not in prices:
            raise ValueError(f"price names {g!r}; the circuit gates {', '.join(gated)}.")
        prices[g] = float(p)
    return flipped, prices


def _round(
    search: _Search,
    own: Own,
    loss: float,
    moves: list[Move],
    tolerance: float,
) -> tuple[Own, float, list[tuple], bool]:
    """One sweep: score every move, then apply the improving ones best first, each checked
    again on the circuit as it then is. Returns the new state, its loss, the flips made and
    whether any move improved on the sweep's starting circuit."""
    best = search.objective(own, loss)
    scored = []
    for move in moves:
        new = _flip(own, move)
        gain = best - search.objective(new, search.loss(new))
        if gain > tolerance:
            scored.append((gain, move))
    scored.sort(key=lambda x: -x[0])  # stable: blocks before heads before neurons on ties
    accepted = []
    for _, move in scored:
        if search.kept(own, move) != (move[2] == "remove"):
            continue  # an earlier flip this round already changed this node
        new = _flip(own, move)
        new_loss = search.loss(new)
        before, after = search.objective(own, loss), search.objective(new, new_loss)
        if before - after > tolerance:
            saved = abs(search.price(new) - search.price(own))
            accepted.append((search.name(move), move[0], move[2], loss, new_loss,
                             saved, before, after))  # fmt: skip
            own, loss = new, new_loss
    return own, loss, accepted, bool(scored)


class _Search:
    """Loss, price and candidate flips of own-gate states, on one `Evaluator`'s cache."""

    def __init__(
        self,
        evaluator: Evaluator,
        objective: Objective,
        prices: dict[str, float],
        meta: dict[str, Any],
        positions: PositionAxis | None = None,
    ) -> None:
        self.ev, self.objective_fn, self.prices, self.meta = evaluator, objective, prices, meta
        self.shape, self.positions = evaluator.shape, positions
        # A node-position costs a P-th of a node, as in training (the mean over positions).
        self.share = 1.0 if positions is None else 1.0 / len(positions)

    def circuit(self, own: Own, meta: dict[str, Any] | None = None) -> Circuit:
        return Circuit(self.shape, {g: t.float() for g, t in own.items()}, 0.5,
                       meta=dict(meta or self.meta), positions=self.positions)  # fmt: skip

    def name(self, move: Move) -> str:
        """`a3.h5`, or `a3.h5@END` for a node at one position."""
        g, index, _ = move
        if self.positions is None:
            return node_name(g, index)
        return node_position_name(node_name(g, index[1:]), self.positions.names[index[0]])

    def loss(self, own: Own) -> float:
        """The faithfulness loss of the circuit these own gates make."""
        ev, circuit = self.ev, self.circuit(own)
        with frozen(ev.model):
            logits = circuit_logits(ev.model, circuit, ev.task, ev.ablation, ev.batch_size)
        return float(faithfulness_loss(self.objective_fn, logits, ev.full, ev.reference.task))

    def price(self, own: Own) -> float:
        """Sum over kept nodes (hierarchy applied) of their price."""
        circuit = self.circuit(own)
        return sum(p * self.share * int(circuit.kept_at(g).sum()) for g, p in self.prices.items())

    def objective(self, own: Own, loss: float) -> float:
        return loss + self.price(own)

    def kept(self, own: Own, move: Move) -> bool:
        return bool(self.circuit(own).kept_at(move[0])[move[1]])

    def candidates(
        self, own: Own, flipped: tuple[str, ...], max_candidates: int
    ) -> tuple[list[Move], dict[str, int]]:
        """Every flip of `flipped` nodes, coarse first; past `max_candidates`, the best ranked."""
        circuit = self.circuit(own)
        kept = {g: circuit.kept_at(g) for g in flipped}
        crowded = tuple(
            g for g in flipped if max(int(kept[g].sum()), int((~kept[g]).sum())) > max_candidates
        )
        score = _attribution(self.ev, circuit, crowded, self.objective_fn) if crowded else {}
        moves: list[Move] = []
        unchecked: dict[str, int] = {}
        for g in flipped:
            unchecked[g] = 0
            for action, mask in (("restore", ~kept[g]), ("remove", kept[g])):
                index = mask.nonzero()
                if g in score and len(index) > max_candidates:
                    s = score[g][mask]  # same row-major order as nonzero()
                    order = s.argsort(descending=action == "restore", stable=True)
                    unchecked[g] += len(index) - max_candidates
                    index = index[order[:max_candidates]]
                moves += [(g, tuple(int(i) for i in row), action) for row in index.tolist()]
        return moves, unchecked


def _flip(own: Own, move: Move) -> Own:
    """A copy of `own` with one node flipped, whole: with every node inside it, and restored
    with the closed blocks around it (a removed block takes its heads; a restored head brings
    its block; a restored block comes back with all its heads)."""
    g, index, action = move
    out = {k: v.clone() for k, v in own.items()}
    value = action == "restore"
    for d in out:
        if d == g or g in ancestors(d):
            out[d][index] = value
    if value:
        for parent in ancestors(g):
            if parent in out:  # the parent's index: a prefix (position, layer, ...) of the node's
                out[parent][index[: out[parent].dim()]] = True
    return out


def _attribution(
    ev: Evaluator, circuit: Circuit, ranked: tuple[str, ...], objective: Objective
) -> dict[str, Tensor]:
    """|d loss / d gate| per node of `ranked`, from one backward pass over the task.

    Ranked gates sit at the circuit's kept nodes (hierarchy applied) and their parents' gates
    at 1, so a node inside a closed block gets the gradient of reopening it with its block.
    """
    model, task, device = ev.model, ev.reference.task, ev.ablation.device
    lifted = {a for g in ranked for a in ancestors(g)} - set(ranked)
    gates: dict[str, Tensor] = {}
    for g in circuit.granularities:
        kept = circuit.kept_at(g)
        value = torch.ones(kept.shape) if g in lifted else kept.float()
        gates[g] = value.to(device).requires_grad_(g in ranked)
    # Each token's position, once for the task; each batch takes its rows.
    where = None if circuit.positions is None else circuit.positions.index(task)
    seqs = (task.answer_pos.cpu() + 1).tolist()
    n = len(task)
    with frozen(model), torch.enable_grad():
        for start in range(0, n, ev.batch_size):
            stop = min(start + ev.batch_size, n)
            idx = torch.arange(start, stop, device=task.clean.device)
            part = task.take(idx, max(seqs[start:stop]))
            seq = part.clean.shape[1]
            at = None if where is None else where[idx.to(where.device), :seq]
            hooks = mixing_hooks(site_masks(circuit.shape, gates, positions=at),
                                 ev.ablation.values(idx, seq))  # fmt: skip
            logits = forward_answers(model, part.clean, part.answer_pos, hooks, fast=False)
            full = ev.full[idx.to(ev.full.device)]  # the output device, under a device_map
            loss = faithfulness_loss(objective, logits, full, part) * (stop - start) / n
            loss.backward()
    return {g: gates[g].grad.abs().cpu() for g in ranked}  # type: ignore[union-attr]


def _statement(
    converged: bool, unchecked: dict[str, int], rounds: int, max_candidates: int
) -> str:
    """What the pass can claim, in one sentence."""
    if not converged:
        return (
            f"not certified: single node flips still improved the objective after "
            f"max_rounds={rounds} rounds"
        )
    left = {g: n for g, n in unchecked.items() if n}
    if not left:
        return OPTIMAL
    counts = ", ".join(f"{n} {spec(g).noun} flips" for g, n in left.items())
    return (
        f"no checked single node flip improves the objective by more than its price, but "
        f"{sum(left.values())} candidates were not checked ({counts}): they ranked below the "
        f"top {max_candidates} by attribution |d loss / d gate| (max_candidates)"
    )


__all__ = ["OPTIMAL", "Certificate", "certify"]

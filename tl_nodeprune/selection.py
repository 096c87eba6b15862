"""The smallest circuit that meets a faithfulness target, chosen along the learned gate order.

Training leaves one `log_alpha` per node. Keeping the nodes whose `log_alpha` exceeds a
threshold t (jointly over granularities, with the hierarchy applied) gives nested circuits:
the higher t, the smaller the circuit. The default circuit is t = 0 (deterministic gate 0.5).
`select_smallest` scores a grid of thresholds on a validation split and returns the circuit of
the highest t whose faithfulness reaches the target, with the curve it was chosen from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .ablation import DEFAULT_CACHE_BYTES, AblationKind
from .circuit import Circuit
from .evaluation import Evaluator
from .gates import HardConcrete
from .positions import PositionAxis
from .reference_run import faithfulness
from .sites import ModelShape
from .tasks.base import PromptTask

Scorer = Callable[[Circuit], float]
Measure = Literal["metric", "kl"]
MEASURES = ("metric", "kl")


@dataclass
class Selection:
    """The chosen circuit, its threshold on log_alpha, its validation faithfulness, the curve."""

    circuit: Circuit
    threshold: float
    faithfulness: float
    target: float
    curve: pd.DataFrame


def circuit_at(
    shape: ModelShape,
    log_alpha: dict[str, Tensor],
    threshold: float,
    hard_concrete: HardConcrete | None = None,
    meta: dict[str, Any] | None = None,
    positions: PositionAxis | None = None,
) -> Circuit:
    """The circuit of nodes whose log_alpha exceeds `threshold` (0 gives the default circuit);
    `positions` when the log_alphas lead with a position axis."""
    hc = hard_concrete or HardConcrete()
    gates = {
        g: hc.deterministic(la.detach().float().cpu() - threshold) for g, la in log_alpha.items()
    }
    return Circuit(shape, gates, 0.5, meta=dict(meta or {}), positions=positions)


@dataclass(frozen=True)
class Limit:
    """A second measure the selected circuit must keep at or below `bound` (a KL budget beside
    a faithfulness band); the curve has its values in column `name`."""

    name: str
    score: Scorer
    bound: float


def scorers(
    model: Any,
    task: PromptTask,
    granularities: tuple[str, ...] | None = None,
    ablation: AblationKind = "corrupted",
    batch_size: int = 32,
    measure: Measure = "metric",
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> tuple[Scorer, Scorer]:
    """(f, KL) of a circuit on `task`, from one `Evaluator` pass per circuit (both scorers
    read the last circuit's result), so selection and `evaluate` agree by construction.

    f(C) = (metric(C) - metric(empty)) / (metric(full) - metric(empty)); with `measure="kl"`,
    f(C) = 1 - KL(full || C) / KL(full || empty) instead: the share of the output distribution
    the circuit restores, which reaches 1 only when nothing that matters is missing (a task
    metric can reach 1, or overshoot, with parts missing). KL(full || C) is in nats. Circuits
    are gated at `granularities` (default: all the model has).
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}.")
    evaluator = Evaluator(model, task, ablation, batch_size, granularities, cache_bytes)
    last: list[Any] = [None, None]  # [circuit, its result]

    def evaluate(circuit: Circuit) -> Any:
        if last[0] is not circuit:
            last[:] = [circuit, evaluator(circuit)]
        return last[1]

    def f(circuit: Circuit) -> float:
        result = evaluate(circuit)
        if measure == "kl":
            return faithfulness(-result.kl, 0.0, -result.kl_empty)
        return result.faithfulness

    return f, lambda circuit: evaluate(circuit).kl


def _candidates(log_alpha: dict[str, Tensor], max_candidates: int) -> list[float]:
    """Thresholds just below distinct log_alpha values (a spread subset when there are many)."""
    values = torch.cat([la.detach().float().flatten().cpu() for la in log_alpha.values()])
    distinct = values.unique().sort(descending=True).values
    if len(distinct) > max_candidates:  # log-spaced in the number of nodes a threshold keeps
        ranks = torch.logspace(0, math.log10(len(distinct)), max_candidates).round().long() - 1
        distinct = distinct[ranks.unique()]
    gaps = 1e-4 * (1 + distinct.abs())
    return sorted({*(distinct - gaps).tolist(), 0.0}, reverse=True)


def select_smallest(
    log_alpha: dict[str, Tensor],
    shape: ModelShape,
    score: Scorer,
    target: float,
    hard_concrete: HardConcrete | None = None,
    max_candidates: int = 32,
    refine_steps: int = 8,
    meta: dict[str, Any] | None = None,
    positions: PositionAxis | None = None,
    upper: float | None = None,
    limit: Limit | None = None,
    progress: bool = False,
) -> Selection:
    """Score nested circuits (high threshold = small) and keep the smallest reaching `target`
    (and, with `upper`, not above it: a band such as f in [0.9, 1.1]; with `limit`, also with
    `limit.score` at most `limit.bound`, e.g. KL within a budget).

    With more distinct log_alphas than `max_candidates`, the grid is refined by bisection
    between the smallest passing and the next smaller failing threshold. If no threshold
    passes, the circuit on the curve nearest the band is returned (see the curve).
    `progress`: a bar over the circuits scored (each one pass over the validation prompts).
    """
    rows: dict[float, dict[str, Any]] = {}
    ceiling = math.inf if upper is None else upper

    def miss(row: dict[str, Any]) -> float:  # how far outside the band (and limit); 0 inside
        f = row["faithfulness"]
        over = 0.0 if limit is None else row[limit.name] - limit.bound
        return max(target - f, f - ceiling, over, 0.0)

    def visit(t: float) -> dict[str, Any]:
        if t not in rows:
            bar.update()
            c = circuit_at(shape, log_alpha, t, hard_concrete, positions=positions)
            rows[t] = {"threshold": t, **{f"kept_{g}": c.n_kept(g) for g in c.granularities},
                       "nodes": len(c.nodes), "faithfulness": score(c)}  # fmt: skip
            if limit is not None:
                rows[t][limit.name] = limit.score(c)
        return rows[t]

    thresholds = _candidates(log_alpha, max_candidates)
    bar = tqdm(total=len(thresholds) + refine_steps, desc="selecting", disable=not progress)
    for t in thresholds:
        visit(t)
    passing = [t for t in thresholds if miss(visit(t)) == 0]
    if passing:
        best = max(passing)
        higher = [t for t in thresholds if t > best]
        if higher and refine_steps:  # bisection on log_alpha between failing and passing
            lo, hi = best, min(higher)
            for _ in range(refine_steps):
                mid = (lo + hi) / 2
                if miss(visit(mid)) == 0:
                    lo = mid
                else:
                    hi = mid
            best = lo
    else:
        best = min(rows, key=lambda t: (miss(rows[t]), -t))
    bar.close()
    curve = pd.DataFrame(sorted(rows.values(), key=lambda r: -r["threshold"]))
    curve["meets_target"] = [miss(r) == 0 for r in curve.to_dict("records")]
    circuit = circuit_at(shape, log_alpha, best, hard_concrete, meta, positions)
    found = rows[best]["faithfulness"]
    chosen = {"target": target, "log_alpha_threshold": best, "validation_faithfulness": found}
    if upper is not None:
        chosen["upper"] = upper
    if limit is not None:
        chosen[f"validation_{limit.name}"] = rows[best][limit.name]
    circuit.meta["selection"] = chosen
    return Selection(circuit, best, found, target, curve)


__all__ = [
    "MEASURES",
    "Limit",
    "Measure",
    "Selection",
    "circuit_at",
    "scorers",
    "select_smallest",
]

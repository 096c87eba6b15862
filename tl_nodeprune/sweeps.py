"""Sweeps: a family of circuits from one model, scored on held-out prompts by one evaluator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .circuit import Circuit
from .evaluation import Evaluator
from .granularities import spec
from .pruner import NodePruner, PruneConfig, PruneResult
from .sites import ModelShape
from .tasks.base import PromptTask

GRANULARITY_SETS: tuple[tuple[str, ...], ...] = (
    ("attn", "mlp"),
    ("attn", "mlp", "head"),
    ("attn", "mlp", "head", "neuron"),
)


@dataclass
class SweepResult:
    """`frame`: one row per run (sizes, held-out f and KL, seconds); the circuits and runs."""

    frame: pd.DataFrame
    circuits: list[Circuit]
    results: list[PruneResult]


def _row(shape: ModelShape, result: PruneResult, evaluator: Evaluator) -> dict[str, Any]:
    c = result.circuit
    ev = evaluator(c)
    row: dict[str, Any] = {g: c.n_kept(g) for g in shape.available()}
    row.update({f"fraction_{g}": c.fraction(g) for g in shape.available()})
    row.update({"faithfulness": ev.faithfulness, "kl": ev.kl, "seconds": result.seconds})
    return row


def _held_out(task: PromptTask, eval_task: PromptTask | None, seed: int) -> tuple[Any, Any]:
    """Train and held-out tasks: `eval_task` if given, else a 50/50 split of `task`."""
    return (task, eval_task) if eval_task is not None else task.split(0.5, seed=seed)


def sweep(
    model: Any,
    task: PromptTask,
    eval_task: PromptTask | None = None,
    *,
    config: PruneConfig | None = None,
    prices: Sequence[float] | None = None,
    targets: Sequence[float] | None = None,
) -> SweepResult:
    """Learn one circuit per node price or per target sparsity; score each on held-out prompts.

    `prices` scale every granularity's default per-node cost (`GranularitySpec.price` x units
    x price); `targets` hold every trained granularity at that pruned fraction (Lagrangian).
    Give exactly one. Each run starts from `config` (fresh gates, the same seed). The
    evaluation shares one ablation cache and one full/empty forward for all circuits; each
    training run builds its own corrupted cache (one no-grad forward over the prompts).
    """
    if (prices is None) == (targets is None):
        raise ValueError("Give exactly one of prices=[...] or targets=[...].")
    base = config or PruneConfig(progress=False)
    train, held = _held_out(task, eval_task, base.seed)
    shape = ModelShape.from_model(model)
    grans = shape.resolve(base.granularities)
    evaluator = Evaluator(model, held, base.ablation, granularities=grans)
    rows, results = [], []
    for value in prices if prices is not None else targets:  # type: ignore[union-attr]
        if prices is not None:
            if not value >= 0:
                raise ValueError(f"prices must be >= 0, got {value}.")
            penalty = {g: value * spec(g).price * shape.count(g) for g in grans}
            cfg = dataclasses.replace(base, penalty=penalty, target_sparsity=None)
        else:
            cfg = dataclasses.replace(base, target_sparsity=dict.fromkeys(grans, value))
        result = NodePruner(model, cfg).fit(train)
        results.append(result)
        key = "price" if prices is not None else "target_sparsity"
        rows.append({key: value, **_row(shape, result, evaluator)})
    return SweepResult(pd.DataFrame(rows), [r.circuit for r in results], results)


def granularity_sweep(
    model: Any,
    task: PromptTask,
    eval_task: PromptTask | None = None,
    *,
    config: PruneConfig | None = None,
    sets: Sequence[Sequence[str]] = GRANULARITY_SETS,
) -> SweepResult:
    """One run per granularity set (blocks; blocks + heads; blocks + heads + neurons).

    Sizes are counted in every unit, so a blocks-only circuit keeps all heads and neurons of
    its blocks: the table shows how many of a coarse circuit's heads and neurons a finer one
    drops, next to the held-out faithfulness each reaches.
    """
    base = config or PruneConfig(progress=False)
    train, held = _held_out(task, eval_task, base.seed)
    shape = ModelShape.from_model(model)
    evaluator = Evaluator(model, held, base.ablation)
    rows, results = [], []
    for grans in sets:
        resolved = shape.resolve(grans)
        result = NodePruner(model, dataclasses.replace(base, granularities=resolved)).fit(train)
        results.append(result)
        rows.append({"granularities": "+".join(resolved), **_row(shape, result, evaluator)})
    return SweepResult(pd.DataFrame(rows), [r.circuit for r in results], results)


__all__ = ["GRANULARITY_SETS", "SweepResult", "granularity_sweep", "sweep"]

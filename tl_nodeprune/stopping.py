"""Stopping by validation loss: keep the gates of the step whose circuit did best on prompts
the gates are not trained on.

With few training prompts the gates go on fitting those prompts' quirks after the circuit has
stopped improving anywhere else (SmolLM2 IOI, 96 prompts: training KL 0.39, held out 0.64).
`BestOnValidation` scores the deterministic circuit every few steps on the validation split
by the objective training minimises there, KL(full || circuit) plus the price of the kept
nodes, and hands back the log_alphas of the best check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ablation import AblationKind
from .circuit import Circuit
from .evaluation import Evaluator
from .gates import GateSet, kept_fraction
from .positions import PositionAxis
from .sites import ModelShape
from .tasks.base import PromptTask


@dataclass
class Check:
    """One validation check: the step after which it ran and what it measured."""

    step: int
    kl: float
    price: float
    nodes: int

    @property
    def objective(self) -> float:
        """Validation KL plus the price of the kept nodes: what the check minimises."""
        return self.kl + self.price


@dataclass
class BestOnValidation:
    """Scores the circuit on `validation` at each `check` and keeps the best step's gates.

    `prices[g]` is granularity g's weight on its kept fraction, the training penalty, so a
    check weighs nodes against KL as training does.
    """

    evaluator: Evaluator
    shape: ModelShape
    prices: dict[str, float]
    threshold: float
    positions: PositionAxis | None
    checks: list[Check] = field(default_factory=list)
    best: dict[str, Tensor] | None = None

    @classmethod
    def on(
        cls,
        model: Any,
        validation: PromptTask,
        granularities: tuple[str, ...],
        ablation: AblationKind,
        batch_size: int,
        prices: dict[str, float],
        threshold: float,
        positions: PositionAxis | None,
        cache_bytes: int,
    ) -> BestOnValidation:
        """One Evaluator on the validation prompts (their ablated values and the full and empty
        model's logits, made once for every check)."""
        evaluator = Evaluator(model, validation, ablation, batch_size, granularities, cache_bytes)
        return cls(evaluator, evaluator.shape, prices, threshold, positions)

    def check(self, gates: GateSet, step: int) -> Check:
        """Score the deterministic circuit of `gates` now; remember its gates if best so far."""
        det = gates.deterministic()
        circuit = Circuit(self.shape, det, self.threshold, positions=self.positions)
        kept = kept_fraction(det, self.threshold)
        price = sum(self.prices[g] * kept[g].item() for g in det)
        result = Check(step, self.evaluator(circuit).kl, price, len(circuit.nodes))
        if not self.checks or result.objective <= min(c.objective for c in self.checks):
            self.best = {g: la.detach().clone() for g, la in gates.log_alpha.items()}
        self.checks.append(result)
        return result

    def restore(self, gates: GateSet) -> int:
        """Put the best check's log_alphas back into `gates`; the step it was taken after."""
        if self.best is None:
            raise RuntimeError("BestOnValidation.restore before any check.")
        with torch.no_grad():
            for g, la in gates.log_alpha.items():
                la.copy_(self.best[g])
        return self.best_step

    @property
    def best_step(self) -> int:
        return min(self.checks, key=lambda c: (c.objective, -c.step)).step

    def meta(self) -> dict[str, Any]:
        """What the circuit's meta records: the checks and the step whose gates were kept."""
        return {
            "best_step": self.best_step,
            "checks": [
                {"step": c.step, "kl": c.kl, "price": c.price, "nodes": c.nodes}
                for c in self.checks
            ],
        }


__all__ = ["BestOnValidation", "Check"]

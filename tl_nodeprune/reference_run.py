"""The reference run: what every method compares its circuits with, on one model and task.

Frozen model -> answers checked against both vocabularies -> ablated values at the hooks a
method intervenes on -> whether the answer-only unembedding reproduces the model -> the full
model's answer logits; and the faithfulness formula. The pruner, `Evaluator` (and through it
selection, sweeps and metrics) and every baseline build one of these instead of a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .ablation import DEFAULT_CACHE_BYTES, Ablation, AblationKind
from .objectives import answer_logits, fast_path_matches
from .sites import ModelShape, frozen, model_device
from .tasks.base import PromptTask


def faithfulness(circuit: float, full: float, empty: float) -> float:
    """f = (C - E) / (M - E): the share of the full model's metric the circuit recovers.

    NaN when the full and the empty model score the same (the task does not separate them).
    """
    denom = full - empty
    return (circuit - empty) / denom if abs(denom) > 1e-12 else math.nan


class ReferenceRun:
    """Ablated values at `names` and the full model's answer logits on `task`, made once.

    `fast=True` unembeds only the answer positions when `fast_path_matches` says that
    reproduces the model (training does; evaluation unembeds fully, `fast=False`).
    `full_logits=False` skips the full model's logits for methods that never read them.
    """

    def __init__(
        self,
        model: Any,
        task: PromptTask,
        names: Iterable[str],
        ablation: AblationKind = "corrupted",
        batch_size: int = 32,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        fast: bool = False,
        full_logits: bool = True,
    ) -> None:
        shape = ModelShape.from_model(model)
        task.check_vocab(shape.d_vocab, shape.vocab_out)
        with frozen(model):
            self.task = task.to(model_device(model))
            self.ablation = Ablation(model, self.task, list(names), ablation, batch_size,
                                     cache_bytes)  # fmt: skip
            self.fast = fast and fast_path_matches(model, self.task)
            self.full = (
                answer_logits(model, self.task, batch_size=batch_size, fast=self.fast)
                if full_logits
                else None
            )


__all__ = ["ReferenceRun", "faithfulness"]

"""Seed spread: one discovery per seed and how often each node was kept, to report stability."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .pruner import NodePruner, PruneConfig
from .seed_spread import SeedSpread
from .tasks.base import PromptTask


def fit_seeds(
    model: Any,
    task: PromptTask,
    seeds: Iterable[int],
    config: PruneConfig | None = None,
    batched: bool = False,
) -> SeedSpread:
    """Run discovery once per seed with otherwise identical settings (`batched`: all seeds in
    one pass, `NodePruner.fit_seeds`)."""
    return NodePruner(model, config).fit_seeds(task, seeds, batched=batched)


__all__ = ["SeedSpread", "fit_seeds"]

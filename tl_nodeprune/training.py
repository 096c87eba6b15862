"""Training machinery shared by `NodePruner` and edge pruning.

Batch order (every example once per epoch, drawn on the host before the loop), the warm-up
ramp, sparsity terms (fixed penalties or an augmented Lagrangian, optionally scaled to a KL
budget), the cosine learning-rate schedule, and a history that stays on the device and is
read back only at log intervals.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .tasks.base import PromptTask


def ramp(step: int, warmup_steps: int) -> float:
    """Warm-up factor in (0, 1] at `step`: rises linearly to 1 over `warmup_steps` steps."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def batches(gen: torch.Generator, n: int, batch_size: int) -> Iterator[Tensor]:
    """Endless batches: consecutive slices of a fresh seeded permutation each epoch."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size].sort().values


def split(values: list, sizes: list[int]) -> list[list]:
    """`values` cut into consecutive parts of the given sizes."""
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return [values[a : a + n] for a, n in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class BatchPlan:
    """Every step's examples and prompt length, decided on the host before the loop.

    The indices are moved to the device once, so the loop never waits for a host-device copy.
    `rows` holds the same indices as ints (to select prompt strings) when the task has prompts.
    """

    indices: list[Tensor]
    seqs: list[int]
    rows: list[list[int]] | None

    @classmethod
    def draw(
        cls, task: PromptTask, steps: int, batch_size: int, seed: int, device: Any
    ) -> BatchPlan:
        """`steps` batches of `task` in `batches` order (seeded by `seed`)."""
        order = batches(torch.Generator().manual_seed(seed), len(task), batch_size)
        drawn = [next(order) for _ in range(steps)]
        sizes = [len(idx) for idx in drawn]
        flat = torch.cat(drawn)
        ends = [p + 1 for p in task.answer_pos.cpu()[flat].tolist()]
        seqs = [max(part) for part in split(ends, sizes)]
        rows = split(flat.tolist(), sizes) if task.prompts else None
        return cls(list(flat.to(device).split(sizes)), seqs, rows)

    def batch(self, task: PromptTask, step: int) -> tuple[Tensor, int, PromptTask]:
        """Step `step`'s indices, prompt length and examples of `task` (on the plan's device)."""
        idx, seq = self.indices[step], self.seqs[step]
        return idx, seq, task.take(idx, seq, self.rows[step] if self.rows else None)


# Passes over each training prompt above which a run warns that its gates may fit the prompts'
# quirks (150 steps of 8 on 96 prompts is 12.5; on 800, 1.5).
MAX_VIEWS_PER_PROMPT = 10.0


class RepeatedPromptsWarning(UserWarning):
    """A run passes over its training prompts many times (`warn_repeated_prompts`)."""


class FewValidationPromptsWarning(UserWarning):
    """A run selects, certifies or stops on so few held-out prompts that the result is noise."""


# Below this many validation prompts a budget met on them says little about other prompts.
MIN_VALIDATION_PROMPTS = 8


def warn_repeated_prompts(n_prompts: int, steps: int, batch_size: int) -> float:
    """Warn when a run shows each prompt more than `MAX_VIEWS_PER_PROMPT` times; return the
    number of views per prompt."""
    views = steps * batch_size / n_prompts
    if views > MAX_VIEWS_PER_PROMPT:
        warnings.warn(
            f"This run shows each of its {n_prompts} training prompts {views:.1f} times "
            f"({steps} steps of {batch_size}): the gates can fit these prompts' quirks. Train on "
            "more prompts (a few hundred), and judge the circuit on prompts it was not trained "
            "on (tnp.evaluate on a held-out split; PruneConfig(certify=True) holds some out).",
            RepeatedPromptsWarning,
            stacklevel=3,
        )
    return views


def cosine_schedule(optimizer: torch.optim.Optimizer, low: float, steps: int) -> Any:
    """The optimizer's rate times 1 at the first step down to `low` at the last, as a cosine."""
    span = max(1, steps - 1)

    def factor(step: int) -> float:
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(step, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Sparsity:
    """One sparsity term per name (a granularity, or edge pruning's "edges" and "nodes").

    A name with a target kept fraction 1 - `targets[name]` is held to it by an augmented
    Lagrangian, scale * (lambda * gap + rho * gap**2) with gap = expected kept fraction -
    (warmed-up) target kept fraction and lambda raised by gradient ascent (`ascend`); any
    other name pays `penalties[name]` (warmed up) times its expected kept fraction. `scales`
    (default 1) prices a Lagrangian term per unit, as NodePruner's fixed penalties are.
    """

    def __init__(
        self,
        penalties: Mapping[str, float],
        targets: Mapping[str, float],
        *,
        warmup_steps: int,
        lagrangian_lr: float,
        lagrangian_rho: float,
        device: Any,
        scales: Mapping[str, float] | None = None,
    ) -> None:
        self.penalties, self.targets = dict(penalties), dict(targets)
        self.scales = dict(scales or {})
        self.warmup_steps, self.lr, self.rho = warmup_steps, lagrangian_lr, lagrangian_rho
        self.multipliers = {g: torch.zeros((), device=device) for g in self.targets}

    def gap(self, g: str, l0: Tensor, step: int) -> Tensor:
        """Expected kept fraction minus the (warmed-up) target kept fraction."""
        return l0 - (1.0 - self.targets[g] * ramp(step, self.warmup_steps))

    def terms(self, l0: Mapping[str, Tensor], step: int) -> dict[str, Tensor]:
        """`sparsity_{name}` for each name of `l0` (expected kept fractions)."""
        out = {}
        for g, value in l0.items():
            if g in self.targets:
                gap = self.gap(g, value, step)
                out[f"sparsity_{g}"] = self.scales.get(g, 1) * (
                    self.multipliers[g] * gap + self.rho * gap**2
                )
            else:
                out[f"sparsity_{g}"] = self.weight(g, step) * value
        return out

    def ascend(self, l0: Mapping[str, Tensor], step: int) -> None:
        """Gradient ascent on the Lagrange multipliers (in place, on the device)."""
        for g, lam in self.multipliers.items():
            lam += self.lr * self.gap(g, l0[g].detach(), step)

    def weight(self, g: str, step: int) -> Tensor | float:
        """The current multiplier (a device tensor, not read), or the warmed-up penalty."""
        if g in self.multipliers:
            return self.multipliers[g].clone()
        return self.penalties[g] * ramp(step, self.warmup_steps)


class KLBudget:
    """One non-negative multiplier on every sparsity term, held by dual ascent so that
    KL(full || gated) sits at `target` (the smallest circuit within a faithfulness budget).

    It starts at 1; after each step `ascend` adds `lr * gap(value)` and clamps at 0, so the
    pressure to prune grows while the circuit is more faithful than the budget asks and falls
    when it is less. For a KL budget the gap is `target - kl`. The value is that step's, on its
    training batch, not on a validation split: the budget is met on the prompts the gates are
    trained on. Everything stays on the device.
    """

    def __init__(self, target: float, lr: float, device: Any) -> None:
        self.target, self.lr = target, lr
        self.scale = torch.ones((), device=device)

    def gap(self, value: Tensor) -> Tensor:
        """How far the circuit is on the faithful side of the budget (> 0: prune more)."""
        return self.target - value

    def apply(self, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """`terms` each times the current multiplier."""
        return {name: self.scale * value for name, value in terms.items()}

    def ascend(self, value: Tensor) -> None:
        """Dual ascent step on the multiplier: a new device tensor, the old one left as it was
        (a history row may still hold it)."""
        self.scale = (self.scale + self.lr * self.gap(value.detach())).clamp(min=0)


class FaithfulnessBudget(KLBudget):
    """The same multiplier held so that the batch faithfulness f sits in [target, `upper`].

    The gap is min(f - target, upper - f): positive inside the band (prune more, until f comes
    down to the target), negative below it and above `upper` (prune less: a circuit that beats
    the model at the task has left out nodes that work against the answer).
    """

    def __init__(self, target: float, lr: float, device: Any, upper: float) -> None:
        super().__init__(target, lr, device)
        self.upper = upper

    def gap(self, value: Tensor) -> Tensor:
        return torch.minimum(value - self.target, self.upper - value)


class JointBudget(KLBudget):
    """The same multiplier held by a KL budget and a faithfulness band at once: it rises only
    while the circuit has slack on both (the gap is the smaller of the two), so neither is
    traded for the other. `ascend` takes the batch's (KL, f) stacked into one tensor.
    """

    def __init__(self, kl: KLBudget, faithfulness: FaithfulnessBudget) -> None:
        super().__init__(kl.target, kl.lr, kl.scale.device)
        self.kl, self.faithfulness = kl, faithfulness

    def gap(self, value: Tensor) -> Tensor:
        return torch.minimum(self.kl.gap(value[0]), self.faithfulness.gap(value[1]))


class History:
    """Per-step loss, loss terms and other columns, kept on the device until read.

    `add` stacks a step's tensors into one device tensor without reading them (host numbers
    such as the step stay on the host) and, every `log_every` steps, calls `read`: one
    host-device synchronisation for all steps since the last read, raising a
    FloatingPointError on the first non-finite loss among them, naming its step and terms;
    `advice` ends that message.
    """

    def __init__(self, log_every: int, advice: str) -> None:
        self.log_every, self.advice = log_every, advice
        self.columns: list[str] = []
        self.terms: list[str] = []
        self.pending: list[tuple[dict[str, float], Tensor]] = []
        self.rows: list[dict[str, float]] = []

    def add(
        self,
        step: int,
        loss: Tensor,
        terms: Mapping[str, Tensor],
        extra: Mapping[str, Tensor | float] | None = None,
    ) -> None:
        """Record step `step`: columns step, loss, the loss `terms`, then `extra`."""
        values: dict[str, Tensor | float] = {"step": step, "loss": loss, **terms, **(extra or {})}
        self.columns = self.columns or list(values)
        self.terms = self.terms or list(terms)
        host = {k: v for k, v in values.items() if not isinstance(v, Tensor)}
        device = [v.detach().float() for v in values.values() if isinstance(v, Tensor)]
        self.pending.append((host, torch.stack(device)))
        if (step + 1) % self.log_every == 0:
            self.read()  # the one host-device synchronisation of this interval

    def read(self) -> None:
        """Bring the pending rows to the host; raise on the first non-finite loss among them."""
        if not self.pending:
            return
        block = torch.stack([t for _, t in self.pending]).tolist()  # one synchronisation
        names = [c for c in self.columns if c not in self.pending[0][0]]
        for (host, _), values in zip(self.pending, block, strict=True):
            row = {**host, **dict(zip(names, values, strict=True))}
            if not math.isfinite(row["loss"]):
                self._raise_non_finite(row)
            self.rows.append({c: row[c] for c in self.columns})
        self.pending = []

    def frame(self) -> pd.DataFrame:
        """Every step read so far, one row each (call `read` first for the latest steps)."""
        return pd.DataFrame(self.rows, columns=self.columns)

    def _raise_non_finite(self, row: dict[str, float]) -> None:
        raise FloatingPointError(
            f"Loss became {row['loss']} at step {int(row['step'])} ("
            + ", ".join(f"{k}={row[k]:.4g}" for k in self.terms)
            + f"). {self.advice}"
        )


__all__ = [
    "BatchPlan",
    "FaithfulnessBudget",
    "History",
    "JointBudget",
    "KLBudget",
    "Sparsity",
    "batches",
    "cosine_schedule",
    "ramp",
    "split",
]

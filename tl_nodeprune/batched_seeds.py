"""The batched-seeds pass: every seed's gates trained at once, one forward per step over all the
seeds' batches, each seed's gates on its own rows (`NodePruner.fit_seeds(..., batched=True)`).

Seed s follows the arithmetic of `NodePruner(model, replace(config, seed=s)).fit(task)`: its own
validation split, batch plan, generator stream, sparsity terms, budget, optimizer and schedule
(one `PruneRun` per seed, stepped through `draw`, `loss` and `update`); only the forward and
backward are shared. Rows of different seeds never meet inside a transformer, so seed s's loss
depends on its gates alone, and backward on the *sum* of the seeds' losses gives each seed's
gates the gradient its own fit would (a mean would scale every seed's by 1/S, which Adam nearly
cancels but not exactly). Each seed's batch is right-padded to the step's longest: causal
attention keeps padding from reaching an answer. The ablated values and the full model's logits
are made once for every seed; seeds that hold out different validation prompts read the rows
of their own training prompts from one reference made on the whole task.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import trange

from . import distributed
from .ablation import Ablated, Ablation, mixing_hooks, site_masks, site_names
from .checkpoint import blocks_to_checkpoint, checkpointed_blocks
from .objectives import forward_answers
from .reference_run import ReferenceRun
from .tasks.base import PromptTask
from .training import warn_repeated_prompts

if TYPE_CHECKING:
    from .pruner import NodePruner, PruneConfig, PruneResult, PruneRun

# One seed's prepared parts: its training prompts, its validation prompts (None without a
# split) and the rows of the whole task its training prompts are (None: all of them).
_Part = tuple[PromptTask, PromptTask | None, Tensor | None]


def fit_batched_seeds(
    pruner: NodePruner, task: PromptTask, seeds: Sequence[int]
) -> dict[int, PruneResult]:
    """Per seed, the result of its own fit, trained in one batched pass; each result's
    `seconds` counts from the start of the pass (the seeds train together)."""
    cfg = pruner.config
    if distributed.active():
        raise ValueError(
            "fit_seeds(..., batched=True) trains every seed on this process, but a process "
            f"group of {distributed.world()} ranks is initialised, which already deals the "
            "seeds over the ranks: call fit_seeds without batched=True."
        )
    task.check_vocab(pruner.shape.d_vocab, pruner.shape.vocab_out)
    start = time.perf_counter()
    pruners = {s: type(pruner)(pruner.model, replace(cfg, seed=s)) for s in seeds}
    parts = {s: _part(task, p.config) for s, p in pruners.items()}
    for train, _, _ in parts.values():
        warn_repeated_prompts(len(train), cfg.steps, cfg.batch_size)
    shared = _shared_reference(pruner, task, list(parts.values()))
    with contextlib.ExitStack() as stack:
        runs = {s: stack.enter_context(p.training(parts[s][0], _seed_reference(shared, parts[s]),
                                                  parts[s][1]))
                for s, p in pruners.items()}  # fmt: skip
        _check_axes(list(runs.values()))
        for step in trange(cfg.steps, desc=f"pruning {len(seeds)} seeds", disable=not cfg.progress):
            batched_step(list(runs.values()), step)
            for run in runs.values():
                run.validate(step)
        for run in runs.values():
            run.history.read()
    return {s: pruners[s].finish(runs[s], start) for s in seeds}


def batched_step(runs: Sequence[PruneRun], step: int) -> None:
    """Training step `step` of every run: one gated forward and backward over all their
    batches (run i's rows gated by run i's sample), then each run's own update."""
    first = runs[0]
    cfg, model, shape = first.cfg, first.model, first.shape
    draws = [run.draw(step) for run in runs]  # (idx, seq, batch, sampled) per run
    seq = max(d[1] for d in draws)
    sizes = [len(d[0]) for d in draws]
    per_example = cfg.gate_noise == "example"
    gates = {g: torch.cat([sampled[g] if per_example else sampled[g].expand(n, *sampled[g].shape)
                           for (_, _, _, sampled), n in zip(draws, sizes, strict=True)])
             for g in draws[0][3]}  # fmt: skip  # (rows, [position], layer, units...)
    tokens = torch.cat([_pad(batch.clean, seq) for _, _, batch, _ in draws])  # (rows, seq)
    answer_pos = torch.cat([batch.answer_pos for _, _, batch, _ in draws])
    at = None
    if first.axis is not None:  # each token's position, padding at position 0
        at = torch.cat(
            [_pad(run.axis.index(d[2]), seq) for run, d in zip(runs, draws, strict=True)]
        )
    hooks = mixing_hooks(site_masks(shape, gates, True, at), _ablated(runs, draws, seq))
    ckpt = blocks_to_checkpoint(cfg.checkpoint, cfg.checkpoint_budget_bytes, shape,
                                *tokens.shape, first.full.element_size())  # fmt: skip
    # Backward inside the hooks: checkpointed blocks rerun their gated forward there.
    with model.hooks(fwd_hooks=hooks), checkpointed_blocks(model, ckpt):
        logits = forward_answers(model, tokens, answer_pos, fast=first.fast)
        outs = [
            run.loss(step, idx, batch, part)
            for run, (idx, _, batch, _), part in zip(runs, draws, logits.split(sizes), strict=True)
        ]
        for run in runs:
            run.optimizer.zero_grad(set_to_none=True)
        sum(out.loss for out in outs).backward()  # a sum: each seed's gradient is its own
    for run, out in zip(runs, outs, strict=True):
        run.update(step, out)


def _part(task: PromptTask, cfg: PruneConfig) -> _Part:
    """One seed's training and validation prompts, split as its own fit splits them."""
    if not cfg.holds_out:
        return task, None, None
    train, held_out = task.split_indices(1 - cfg.validation_fraction, cfg.seed,
                                         by=cfg.validation_split)  # fmt: skip
    return task.subset(train), task.subset(held_out), train


def _shared_reference(
    pruner: NodePruner, task: PromptTask, parts: list[_Part]
) -> ReferenceRun | None:
    """One reference on the whole task for every seed, or None where each seed needs its own:
    a mean ablation averages over a seed's own training prompts."""
    cfg = pruner.config
    if cfg.ablation == "mean" and any(ids is not None for _, _, ids in parts):
        return None
    names = site_names(pruner.shape, pruner.granularities)
    return ReferenceRun(pruner.model, task, names, cfg.ablation, 2 * cfg.batch_size,
                        cfg.cache_bytes, fast=True)  # fmt: skip


def _seed_reference(shared: ReferenceRun | None, part: _Part) -> ReferenceRun | None:
    """`shared` as one seed sees it: itself when the seed trains on the whole task, else a
    view whose row i is row ids[i] (its ablated values and full logits; nothing recomputed)."""
    train, _, ids = part
    if shared is None or ids is None:
        return shared
    assert shared.full is not None  # made with full_logits=True
    view = copy.copy(shared)
    view.task = train.to(shared.task.clean.device)
    view.full = shared.full[ids.to(shared.full.device)]  # (n_train, vocab): a small copy
    view.ablation = _RowsAblation(shared.ablation, view.task, ids)
    return view


class _RowsAblation(Ablation):
    """Another Ablation's values seen through rows `ids` of its task: row i here is row ids[i]
    there. A view: it captures nothing (and is not used for mean ablation, whose values are
    means over the task's own prompts)."""

    def __init__(self, base: Ablation, task: PromptTask, ids: Tensor) -> None:
        self.__dict__.update(base.__dict__)  # no Ablation.__init__: it would capture again
        self.task, self.base, self.ids = task, base, ids.to(base.device)

    def values(self, idx: Tensor, seq: int) -> dict[str, Tensor | None]:
        return self.base.values(self.ids[idx.to(self.ids.device)], seq)

    def lazy_values(self, idx: Tensor, seq: int) -> dict[str, Ablated]:
        return self.base.lazy_values(self.ids[idx.to(self.ids.device)], seq)


def _ablated(runs: Sequence[PruneRun], draws: list, seq: int) -> dict[str, Ablated]:
    """Per hook, the ablated values of every run's rows, in run order, at `seq` positions."""
    first = runs[0].ablation
    if all(run.ablation is first for run in runs):  # one reference: one lookup for all rows
        return first.lazy_values(torch.cat([d[0] for d in draws]), seq)
    parts = [run.ablation.lazy_values(d[0], seq) for run, d in zip(runs, draws, strict=True)]
    sizes = [len(d[0]) for d in draws]
    mean = first.kind == "mean"
    return {name: None if parts[0][name] is None
            else functools.partial(_joined, [p[name] for p in parts], sizes, seq, mean)
            for name in parts[0]}  # fmt: skip


def _joined(values: list[Ablated], sizes: list[int], seq: int, mean: bool) -> Tensor:
    """The runs' values as one batch, made when the hook runs: each called if lazy, a
    per-position mean repeated over its run's rows, and padded to `seq` positions."""
    rows = []
    for value, n in zip(values, sizes, strict=True):
        value = value() if callable(value) else value
        assert value is not None
        if mean:  # (pos, ...) -> (n, pos, ...)
            value = value.expand(n, *value.shape)
        rows.append(_pad(value, seq))
    return torch.cat(rows)


def _pad(values: Tensor, seq: int) -> Tensor:
    """`values` (rows, pos, ...) with zeros after position `pos` up to `seq` positions; padding
    comes after every prompt's answer, which causal attention never lets it reach."""
    missing = seq - values.shape[1]
    if missing <= 0:
        return values
    return F.pad(values, (0, 0) * (values.dim() - 2) + (0, missing))


def _check_axes(runs: Sequence[PruneRun]) -> None:
    """Refuse position-aware seeds whose training prompts give different position axes (with
    positions='absolute', seeds whose training prompts differ in length)."""
    axes = {run.axis for run in runs}
    if len(axes) > 1:
        raise ValueError(
            "fit_seeds(..., batched=True) needs every seed to gate the same positions, but the "
            f"seeds' training prompts give {len(axes)} position axes "
            f"({', '.join(str(a.names) for a in axes if a is not None)}); use positions='named' "
            "or call fit_seeds without batched=True."
        )


__all__ = ["batched_step", "fit_batched_seeds"]

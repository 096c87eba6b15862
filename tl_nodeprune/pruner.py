"""`NodePruner`: learn hard-concrete node masks for faithfulness plus per-granularity sparsity."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import trange

from .ablation import (
    DEFAULT_CACHE_BYTES,
    Ablation,
    AblationKind,
    capture,
    check_ablation,
    mixing_hooks,
    site_masks,
)
from .checkpoint import CheckpointMode, blocks_to_checkpoint, check_checkpoint, checkpointed_blocks
from .circuit import Circuit
from .gates import GateSet, HardConcrete
from .objectives import (
    Objective,
    answer_logits,
    check_objective,
    faithfulness_loss,
    fast_path_matches,
    forward_answers,
)
from .selection import MEASURES, Measure, Selection, faithfulness_scorer, select_smallest
from .sites import (
    GRANULARITIES,
    ModelShape,
    check_granularity,
    check_sites,
    frozen,
    model_device,
)
from .tasks.base import PromptTask

if TYPE_CHECKING:
    from .seeds import SeedSpread

# Default price of keeping one node, in units of the faithfulness loss (nats for KL). A node's
# worth to a circuit does not depend on how many siblings it has, so the default penalty on
# the *mean* expected L0 is this price times the number of units: the same defaults then work
# on a 3-layer toy and on a 30-layer model. The head and neuron prices are 3 and 2.86 times those
# first chosen: with 150 steps of 8 on 800 prompts, SmolLM2 IOI circuits keep 13% of heads
# and 4.3-4.6% of neurons at held-out f >= 0.94 over seeds 0-2 (docs/quality.md, section 7).
DEFAULT_NODE_COST: dict[str, float] = {
    "attn": 0.03,
    "mlp": 0.03,
    "head": 0.03,
    "neuron": 0.002,
    "head_dim": 0.0002,
}


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a discovery run; the same config and seed give the same circuit.

    `penalty[g]` weighs the mean expected L0 of granularity g; granularities it leaves out
    get `DEFAULT_NODE_COST[g]` times their number of units. Where `target_sparsity[g]`
    (fraction of g's nodes to prune) is given, g is instead held to the target by an
    augmented Lagrangian, units(g) * (lambda * gap + lagrangian_rho * gap**2) with
    gap = expected kept fraction - target kept fraction and lambda trained by gradient ascent
    (rate `lagrangian_lr`); the quadratic term damps the oscillation a bare multiplier shows.
    Penalties and targets ramp up linearly over `warmup_steps`.

    The history stays on the model's device and is read back every `log_every` steps (one
    host-device synchronisation per read; a non-finite loss is reported then, naming its
    step). Corrupted activations are cached when they fit in `cache_bytes` and in half the free
    memory, else recomputed each step.

    `checkpoint` recomputes blocks in backward instead of keeping their activations
    (`tl_nodeprune.checkpoint`): True (every block), False, or "auto" (the fewest blocks that
    bring a step's estimated activation memory under `checkpoint_budget_bytes`); the gradients
    are the same either way.

    With `target_faithfulness`, `fit` trains on all but `validation_fraction` of the prompts
    and returns the smallest circuit along the learned gate order whose faithfulness on those
    validation prompts reaches the target (`tl_nodeprune.selection`; `selection_measure` "kl"
    scores 1 - KL(full || circuit) / KL(full || empty) instead of the task metric); without
    it, the circuit is the nodes whose deterministic gate exceeds `threshold`.

    `lr_final` (off by default) lowers the gates' learning rate from `lr` to `lr_final` along a
    cosine over the run, so that late steps move gates less than early ones.
    """

    steps: int = 150
    lr: float = 0.2
    batch_size: int = 8
    granularities: tuple[str, ...] | None = None
    ablation: AblationKind = "corrupted"
    objective: Objective = "kl"
    penalty: Mapping[str, float] | None = None
    target_sparsity: Mapping[str, float] | None = None
    warmup_steps: int = 0
    lagrangian_lr: float = 0.01
    lagrangian_rho: float = 1.0
    init_log_alpha: float = 3.0
    threshold: float = 0.5
    hard_concrete: HardConcrete = field(default_factory=HardConcrete)
    seed: int = 0
    progress: bool = True
    log_every: int = 25
    cache_bytes: int = DEFAULT_CACHE_BYTES
    checkpoint: CheckpointMode = "auto"
    checkpoint_budget_bytes: int = 2**31
    target_faithfulness: float | None = None
    validation_fraction: float = 0.25
    selection_measure: Measure = "metric"
    log_alpha_bounds: tuple[float, float] | None = None
    lr_final: float | None = None

    def __post_init__(self) -> None:
        if self.target_faithfulness is not None and not 0 < self.target_faithfulness <= 1:
            raise ValueError(
                "PruneConfig.target_faithfulness must be None or in (0, 1], "
                f"got {self.target_faithfulness!r}."
            )
        if self.selection_measure not in MEASURES:
            raise ValueError(
                f"PruneConfig.selection_measure must be one of {MEASURES}, "
                f"got {self.selection_measure!r}."
            )
        if self.log_alpha_bounds is not None and not (
            len(self.log_alpha_bounds) == 2
            and self.log_alpha_bounds[0] < 0 < self.log_alpha_bounds[1]
        ):
            raise ValueError(
                "PruneConfig.log_alpha_bounds must be None or (low, high) with low < 0 < high, "
                f"got {self.log_alpha_bounds!r}."
            )
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                "PruneConfig.validation_fraction must be in (0, 1), "
                f"got {self.validation_fraction}."
            )
        for name in ("steps", "batch_size", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(
                    f"PruneConfig.{name} must be a positive int, got {getattr(self, name)!r}."
                )
        if not (isinstance(self.cache_bytes, int) and self.cache_bytes >= 0):
            raise ValueError(
                f"PruneConfig.cache_bytes must be an int >= 0, got {self.cache_bytes!r}."
            )
        for name in ("lr", "lagrangian_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(
                    f"PruneConfig.{name} must be a finite number > 0, got {getattr(self, name)!r}."
                )
        if self.lr_final is not None and not 0 < self.lr_final <= self.lr:
            raise ValueError(
                f"PruneConfig.lr_final must be None or in (0, lr={self.lr}], got {self.lr_final!r}."
            )
        if not (self.lagrangian_rho >= 0 and math.isfinite(self.lagrangian_rho)):
            raise ValueError(
                "PruneConfig.lagrangian_rho must be a finite number >= 0, got "
                f"{self.lagrangian_rho!r}."
            )
        if not math.isfinite(self.init_log_alpha):
            raise ValueError(
                f"PruneConfig.init_log_alpha must be finite, got {self.init_log_alpha!r}; "
                "3.0 starts every gate almost surely open."
            )
        if self.warmup_steps < 0:
            raise ValueError(f"PruneConfig.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0 < self.threshold < 1:
            raise ValueError(f"PruneConfig.threshold must be in (0, 1), got {self.threshold}.")
        check_ablation(self.ablation)
        check_checkpoint(self.checkpoint, self.checkpoint_budget_bytes)
        check_objective(self.objective)
        if self.granularities is not None:
            if isinstance(self.granularities, str):
                raise ValueError("PruneConfig.granularities must be a tuple, e.g. ('head',).")
            for g in self.granularities:
                check_granularity(g)
        for g, v in (self.penalty or {}).items():
            check_granularity(g)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"PruneConfig.penalty[{g!r}] must be finite and >= 0, got {v}.")
        for g, v in (self.target_sparsity or {}).items():
            check_granularity(g)
            if not 0 <= v < 1:
                raise ValueError(f"PruneConfig.target_sparsity[{g!r}] must be in [0, 1), got {v}.")
        if self.granularities is not None:
            self.check_gated(tuple(self.granularities))

    def check_gated(self, granularities: tuple[str, ...]) -> None:
        """Refuse a penalty or target for a granularity the run does not gate."""
        for name in ("penalty", "target_sparsity"):
            extra = [g for g in (getattr(self, name) or {}) if g not in granularities]
            if extra:
                raise ValueError(
                    f"PruneConfig.{name} names {', '.join(map(repr, extra))}, which this run does "
                    f"not gate (granularities: {', '.join(granularities)}); add it to "
                    f"granularities or drop it from {name}."
                )

    def penalty_for(self, granularity: str, shape: ModelShape) -> float:
        """The weight on `granularity`'s mean expected L0 (given, or the per-node default)."""
        if self.penalty is not None and granularity in self.penalty:
            return float(self.penalty[granularity])
        return DEFAULT_NODE_COST[granularity] * math.prod(shape.units(granularity))

    def ramp(self, step: int) -> float:
        """Warm-up factor in (0, 1] for penalties and targets at `step`."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)


@dataclass
class PruneResult:
    """What `fit` returns: the circuit, the per-step history and the learned log_alphas."""

    circuit: Circuit
    history: pd.DataFrame
    log_alpha: dict[str, Tensor]
    config: PruneConfig
    seconds: float
    selection: Selection | None = None


class NodePruner:
    """Learns which blocks, heads and neurons of `model` a task needs; the model is untouched."""

    def __init__(self, model: Any, config: PruneConfig | None = None) -> None:
        self.model = model
        self.config = config or PruneConfig()
        self.shape = ModelShape.from_model(model)
        self.granularities = self.shape.resolve(self.config.granularities)
        self.config.check_gated(self.granularities)
        check_sites(model, self.shape, self.granularities)

    def fit_seeds(self, task: PromptTask, seeds: Iterable[int] = (0, 1, 2)) -> SeedSpread:
        """One fit per seed (this config otherwise): a `SeedSpread` with a consensus view."""
        from .seeds import fit_seeds

        return fit_seeds(self.model, task, seeds, self.config)

    def fit(self, task: PromptTask) -> PruneResult:
        """Train the gates on `task` and return the circuit of nodes whose gate stays open."""
        cfg, model = self.config, self.model
        task.check_vocab(self.shape.d_vocab, self.shape.vocab_out)
        start = time.perf_counter()
        validation = None
        if cfg.target_faithfulness is not None:
            task, validation = task.split(1 - cfg.validation_fraction, seed=cfg.seed)
        device = model_device(model)
        # Passes without gradient (ablation cache, full logits, selection scores) keep no
        # activations for backward, so they take twice the training batch: fewer passes over
        # the weights for the same prompts.
        nograd = 2 * cfg.batch_size
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        order = _batches(torch.Generator().manual_seed(cfg.seed), len(task), cfg.batch_size)
        # Every step's examples and prompt length, decided on the host before the loop and
        # moved to the device once: the loop then never waits for a host-device copy.
        batches = [next(order) for _ in range(cfg.steps)]
        sizes = [len(idx) for idx in batches]
        flat = torch.cat(batches)
        ends = [p + 1 for p in task.answer_pos.cpu()[flat].tolist()]
        seqs = [max(part) for part in _split(ends, sizes)]
        rows = _split(flat.tolist(), sizes) if task.prompts else None
        on_device = flat.to(device).split(sizes)
        gates = GateSet(
            self.shape, self.granularities, cfg.init_log_alpha, cfg.hard_concrete, device
        )
        sparsity = _Sparsity(cfg, self.shape, self.granularities, device)
        optimizer = torch.optim.Adam(gates.parameters(), lr=cfg.lr)
        schedule = None
        if cfg.lr_final is not None:
            schedule = _cosine(optimizer, cfg.lr_final / cfg.lr, cfg.steps)
        history = _History(cfg)
        with frozen(model):
            names = list(site_masks(self.shape, gates.sample(gen)))
            check_sites(
                model,
                self.shape,
                self.granularities,
                lambda hooks: capture(model, task.clean[:1, :1].to(device), hooks),
            )
            task = task.to(device)
            ablation = Ablation(model, task, names, cfg.ablation, nograd, cfg.cache_bytes)
            fast = fast_path_matches(model, task)
            full = answer_logits(model, task, batch_size=nograd, fast=fast)
            for step in trange(cfg.steps, desc="pruning", disable=not cfg.progress):
                idx, seq = on_device[step], seqs[step]
                batch = task.take(idx, seq, rows[step] if rows else None)
                sampled = gates.sample(gen)
                ablated = ablation.lazy_values(idx, seq)  # indexed inside each hook
                hooks = mixing_hooks(site_masks(self.shape, sampled), ablated)
                ckpt = blocks_to_checkpoint(cfg.checkpoint, cfg.checkpoint_budget_bytes, self.shape,
                                            *batch.clean.shape, full.element_size())  # fmt: skip
                # Backward inside the hooks: checkpointed blocks rerun their gated forward there.
                with model.hooks(fwd_hooks=hooks), checkpointed_blocks(model, ckpt):
                    logits = forward_answers(model, batch.clean, batch.answer_pos, fast=fast)
                    faith = faithfulness_loss(
                        cfg.objective, logits, full[idx.to(full.device)], batch
                    )
                    l0 = gates.expected_l0()
                    terms = {"faithfulness": faith, **sparsity.terms(l0, step)}
                    loss = sum(terms.values())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                if cfg.log_alpha_bounds is not None:
                    gates.clamp_(*cfg.log_alpha_bounds)
                sparsity.ascend(l0, step)
                history.add(step, loss, terms, l0, gates, sparsity)
                if (step + 1) % cfg.log_every == 0:
                    history.read()  # the one host-device synchronisation of this interval
            history.read()
        circuit = Circuit(
            self.shape,
            gates.deterministic(),
            cfg.threshold,
            meta={
                "task": task.name,
                "steps": cfg.steps,
                "seed": cfg.seed,
                "ablation": cfg.ablation,
                "granularities": list(self.granularities),
            },
        )
        log_alpha = {g: la.detach().cpu().clone() for g, la in gates.log_alpha.items()}
        selection = None
        if validation is not None and cfg.target_faithfulness is not None:
            score = faithfulness_scorer(
                model, validation, self.granularities, cfg.ablation, nograd, cfg.selection_measure,
            )  # fmt: skip
            selection = select_smallest(
                log_alpha, self.shape, score, cfg.target_faithfulness, cfg.hard_concrete,
                meta=circuit.meta,
            )  # fmt: skip
            circuit = selection.circuit
        seconds = time.perf_counter() - start
        return PruneResult(circuit, history.frame(), log_alpha, cfg, seconds, selection)


def _cosine(optimizer: torch.optim.Optimizer, low: float, steps: int) -> Any:
    """The optimizer's rate times 1 at the first step down to `low` at the last, as a cosine."""
    span = max(1, steps - 1)

    def factor(step: int) -> float:
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(step, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(gen: torch.Generator, n: int, batch_size: int) -> Iterator[Tensor]:
    """Endless batches: consecutive slices of a fresh seeded permutation each epoch."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size].sort().values


def _split(values: list, sizes: list[int]) -> list[list]:
    """`values` cut into consecutive parts of the given sizes."""
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return [values[a : a + n] for a, n in zip(starts, sizes, strict=True)]


class _Sparsity:
    """One sparsity term per granularity: a fixed penalty, or an augmented Lagrangian."""

    def __init__(
        self, cfg: PruneConfig, shape: ModelShape, granularities: tuple[str, ...], device: Any
    ) -> None:
        self.cfg, self.shape = cfg, shape
        self.penalties = {g: cfg.penalty_for(g, shape) for g in granularities}
        self.targets = {g: t for g, t in (cfg.target_sparsity or {}).items() if g in granularities}
        self.multipliers = {g: torch.zeros((), device=device) for g in self.targets}

    def gap(self, g: str, l0: Tensor, step: int) -> Tensor:
        """Expected kept fraction minus the (warmed-up) target kept fraction."""
        return l0 - (1.0 - self.targets[g] * self.cfg.ramp(step))

    def terms(self, l0: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        out = {}
        for g, value in l0.items():
            if g in self.targets:  # priced per node, like the default penalties
                gap = self.gap(g, value, step)
                out[f"sparsity_{g}"] = math.prod(self.shape.units(g)) * (
                    self.multipliers[g] * gap + self.cfg.lagrangian_rho * gap**2
                )
            else:
                out[f"sparsity_{g}"] = self.weight(g, step) * value
        return out

    def ascend(self, l0: dict[str, Tensor], step: int) -> None:
        """Gradient ascent on the Lagrange multipliers."""
        for g, lam in self.multipliers.items():
            lam += self.cfg.lagrangian_lr * self.gap(g, l0[g].detach(), step)

    def weight(self, g: str, step: int) -> Tensor | float:
        """The current multiplier (a device tensor, not read), or the warmed-up penalty."""
        if g in self.multipliers:
            return self.multipliers[g].clone()
        return self.penalties[g] * self.cfg.ramp(step)


class _History:
    """Per-step loss terms, expected L0s, kept fractions and multipliers, kept on the device.

    `add` stacks a step's tensors into one device tensor without reading them (host numbers
    such as the step and fixed penalties stay on the host); `read` copies the steps since the
    last read to the host at once and raises on the first non-finite loss among them.
    """

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        self.columns: list[str] = []
        self.pending: list[tuple[dict[str, float], Tensor]] = []
        self.rows: list[dict[str, float]] = []

    def add(
        self,
        step: int,
        loss: Tensor,
        terms: dict[str, Tensor],
        l0: dict[str, Tensor],
        gates: GateSet,
        sparsity: _Sparsity,
    ) -> None:
        values: dict[str, Tensor | float] = {"step": step, "loss": loss, **terms}
        det = gates.deterministic()
        for g in GRANULARITIES:
            if g in l0:
                values[f"expected_l0_{g}"] = l0[g]
                values[f"kept_{g}"] = (det[g] > self.cfg.threshold).float().mean()
                values[f"lambda_{g}"] = sparsity.weight(g, step)
        self.columns = self.columns or list(values)
        host = {k: v for k, v in values.items() if not isinstance(v, Tensor)}
        device = [v.detach().float() for v in values.values() if isinstance(v, Tensor)]
        self.pending.append((host, torch.stack(device)))

    def read(self) -> None:
        """Bring the pending rows to the host; raise on the first non-finite loss among them."""
        if not self.pending:
            return
        block = torch.stack([t for _, t in self.pending]).tolist()  # one synchronisation
        names = [c for c in self.columns if c not in self.pending[0][0]]
        for (host, _), values in zip(self.pending, block, strict=True):
            row = {**host, **dict(zip(names, values, strict=True))}
            if not math.isfinite(row["loss"]):
                _raise_non_finite(row, self.cfg.lr)
            self.rows.append({c: row[c] for c in self.columns})
        self.pending = []

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)


def _raise_non_finite(row: dict[str, float], lr: float) -> None:
    terms = {k: v for k, v in row.items() if k == "faithfulness" or k.startswith("sparsity_")}
    raise FloatingPointError(
        f"Loss became {row['loss']} at step {int(row['step'])} ("
        + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        + f"). Run the model in float32, lower PruneConfig.lr (now {lr}), or check that "
        "a custom objective returns finite values."
    )

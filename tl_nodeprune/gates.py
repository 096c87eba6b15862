"""Hard-concrete (L0) gates, one learnable `log_alpha` per node (Louizos et al. 2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .sites import ModelShape


@dataclass(frozen=True)
class HardConcrete:
    """Temperature `beta` and stretch interval (`gamma`, `zeta`) of hard-concrete gates."""

    beta: float = 2 / 3
    gamma: float = -0.1
    zeta: float = 1.1
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"HardConcrete.beta must be > 0, got {self.beta}.")
        if not (self.gamma < 0 < 1 < self.zeta):
            raise ValueError(
                f"HardConcrete needs gamma < 0 and zeta > 1 (got gamma={self.gamma}, "
                f"zeta={self.zeta}) so that gates can reach exactly 0 and 1."
            )

    def _stretch(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(
        self,
        log_alpha: Tensor,
        generator: torch.Generator | None = None,
        batch: int | None = None,
    ) -> Tensor:
        """A noisy gate in [0, 1], differentiable in `log_alpha` (used while training); with
        `batch`, one independent draw per example, stacked on a new leading axis."""
        shape = log_alpha.shape if batch is None else (batch, *log_alpha.shape)
        u = torch.rand(shape, generator=generator, device=log_alpha.device)
        u = u.clamp(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return self._stretch(s)

    def deterministic(self, log_alpha: Tensor) -> Tensor:
        """The noise-free gate used at evaluation; it is above 0.5 exactly when log_alpha > 0."""
        return self._stretch(torch.sigmoid(log_alpha))

    def expected_l0(self, log_alpha: Tensor) -> Tensor:
        """P(gate != 0) per node, in closed form."""
        return torch.sigmoid(log_alpha - self.beta * math.log(-self.gamma / self.zeta))


def kept_fraction(gates: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Per granularity, the share of `gates` (deterministic ones) above `threshold`: what a
    circuit thresholded there keeps (the history's `kept_<g>`, the validation check's price)."""
    return {g: (t > threshold).float().mean() for g, t in gates.items()}


class GateSet(nn.Module):
    """One `log_alpha` tensor per granularity, shaped like `ModelShape.units`; with
    `n_positions`, one per position and node, (n_positions, *units) (`tl_nodeprune.positions`).

    The sparsity terms price a granularity's *mean* expected L0, so a node kept at every
    position costs what it costs position-blind, and one kept at a single position a share.
    """

    def __init__(
        self,
        shape: ModelShape,
        granularities: tuple[str, ...],
        init_log_alpha: float = 3.0,
        hard_concrete: HardConcrete | None = None,
        device: torch.device | str | None = None,
        n_positions: int | None = None,
    ) -> None:
        super().__init__()
        self.granularities = granularities
        self.hard_concrete = hard_concrete or HardConcrete()
        lead = () if n_positions is None else (int(n_positions),)
        self.log_alpha = nn.ParameterDict(
            {
                g: nn.Parameter(
                    torch.full((*lead, *shape.units(g)), float(init_log_alpha), device=device)
                )
                for g in granularities
            }
        )

    def sample(
        self, generator: torch.Generator | None = None, batch: int | None = None
    ) -> dict[str, Tensor]:
        """Noisy gates for one training step: one draw shared by the whole batch, or with
        `batch`, one per example (shape (batch, *units))."""
        return {
            g: self.hard_concrete.sample(la, generator, batch) for g, la in self.log_alpha.items()
        }

    def deterministic(self) -> dict[str, Tensor]:
        """Noise-free gates, detached."""
        with torch.no_grad():
            return {g: self.hard_concrete.deterministic(la) for g, la in self.log_alpha.items()}

    def clamp_(self, low: float, high: float) -> None:
        """Bound every log_alpha in place, so that a closed gate keeps a chance to reopen.

        A hard-concrete gate far below zero samples exactly 0 almost always and then gets no
        gradient from the faithfulness loss: without a bound, one large step closes it for good.
        """
        with torch.no_grad():
            for la in self.log_alpha.values():
                la.clamp_(low, high)

    def expected_l0(self) -> dict[str, Float[Tensor, ""]]:
        """Mean expected L0 per granularity: the fraction of its nodes expected to be open."""
        return {g: self.hard_concrete.expected_l0(la).mean() for g, la in self.log_alpha.items()}

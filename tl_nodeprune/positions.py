"""Token positions as an axis of the gates: a node gated separately where it works in the prompt.

A position-aware run has one gate per (position, node): the gate tensors lead with a position
axis, (n_positions, n_layers, *units). A `PositionAxis` names those positions and maps each
token of a task to one of them:

- "absolute": position i is the i-th token; every prompt must have the same length, so that
  a position means the same thing in every prompt.
- "named": the task labels its tokens (IOI: S1, IO, S2, END, other; greater-than: XX, YY, END,
  other; a user's task through `PromptTask.from_prompts(..., positions=...)`), so prompts of
  different lengths line up by label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from .tasks.base import PromptTask

PositionKind = Literal["absolute", "named"]
POSITION_KINDS: tuple[str, ...] = ("absolute", "named")


def check_position_kind(kind: Any) -> None:
    """Raise a ValueError naming the valid kinds when `kind` is neither None nor one of them."""
    if kind is not None and kind not in POSITION_KINDS:
        raise ValueError(
            f"positions must be None (one gate per node), 'absolute' (one per token index, "
            f"prompts of equal length) or 'named' (one per label the task gives its tokens), "
            f"got {kind!r}."
        )


@dataclass(frozen=True)
class PositionAxis:
    """The positions a position-aware circuit gates at, and how a task's tokens map to them."""

    kind: PositionKind
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        check_position_kind(self.kind)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"PositionAxis needs distinct position names, got {self.names!r}.")
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def for_task(cls, kind: PositionKind, task: PromptTask) -> PositionAxis:
        """The axis a run of `kind` on `task` trains: its token indices or its labels."""
        check_position_kind(kind)
        if kind == "absolute":
            lengths = task.answer_pos.unique()
            if len(lengths) > 1:
                raise ValueError(
                    f"positions='absolute' needs prompts of one length, but these end at "
                    f"{len(lengths)} different positions ({int(lengths.min()) + 1} to "
                    f"{int(lengths.max()) + 1} tokens); use positions='named' with a task whose "
                    "tokens are labelled (tasks.ioi, tasks.greater_than, or "
                    "PromptTask.from_prompts(..., positions=...))."
                )
            return cls("absolute", tuple(str(i) for i in range(int(lengths[0]) + 1)))
        if task.position_names is None:
            raise ValueError(
                "positions='named' needs a task whose tokens carry position labels: build it "
                "with tasks.ioi or tasks.greater_than, or pass positions=... (one label per "
                "token) to PromptTask.from_prompts / from_tokens; or use positions='absolute'."
            )
        return cls("named", tuple(task.position_names))

    def index(self, task: PromptTask) -> Int[Tensor, "batch pos"]:
        """Per token of `task`, the index of its position.

        Padding after a prompt's end maps to position 0: causal attention keeps it from ever
        reaching an answer, so its gate does not matter.
        """
        n, seq = task.clean.shape
        if self.kind == "absolute":
            if seq > len(self.names):
                raise ValueError(
                    f"This circuit gates {len(self.names)} absolute positions, but the prompts "
                    f"have {seq} tokens; evaluate it on prompts of its own length, or find a "
                    "circuit with positions='named'."
                )
            return torch.arange(seq, device=task.clean.device).expand(n, seq)
        return task.position_index(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionAxis:
        return cls(data["kind"], tuple(data["names"]))


def node_position_name(node: str, position: str) -> str:
    """`('a3.h5', 'END')` -> `'a3.h5@END'`: a node at one position."""
    return f"{node}@{position}"


__all__ = [
    "POSITION_KINDS",
    "PositionAxis",
    "PositionKind",
    "check_position_kind",
    "node_position_name",
]

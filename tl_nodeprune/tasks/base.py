"""`PromptTask`: paired clean/corrupted prompts, their answers, and the task metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .labels import check_labels, id_labels, prompt_labels, reindex

Metric = Literal["logit_diff", "prob_diff"]
PAD_ANSWER = -1  # fills answer sets shorter than the longest one


def _ids(values: Any, name: str) -> Tensor:
    """Token ids as a long tensor; floats and booleans are refused rather than truncated."""
    t = torch.as_tensor(values)
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(
            f"{name} must hold integer token ids, got a {t.dtype} tensor; build it with "
            "model.to_tokens(...) or torch.tensor(ids, dtype=torch.long)."
        )
    return t.long()


def _as_2d(ids: Any, name: str) -> Tensor:
    """Answers as a (batch, n_answers) long tensor; a 1-D input is one answer per example."""
    t = _ids(ids, name)
    if t.dim() == 0:  # one prompt, one answer
        t = t.reshape(1, 1)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be 1-D (one id per prompt) or 2-D (batch, n_answers).")
    return t


SplitBy = Literal["prompts", "groups"]


def split_size(n: int, train_fraction: float) -> int:
    """How many of `n` prompts a split by prompts trains on; refuses a split that leaves either
    part empty (the CLI asks this before it loads a model)."""
    n_train = round(n * train_fraction)
    if not 0 < n_train < n:
        raise ValueError(f"Cannot split {n} prompts at {train_fraction}: need more.")
    return n_train


@dataclass(frozen=True, eq=False)
class PromptTask:
    """Clean and corrupted prompts (right-padded), answer ids and where each answer is read.

    `correct` and `incorrect` are (batch, n) id sets padded with -1. The metric is read at
    `answer_pos`, the last real token of each prompt: `logit_diff` is mean logit of the
    correct set minus mean logit of the incorrect set; `prob_diff` is the difference of their
    total probabilities (Hanna et al.'s greater-than metric).

    `position_labels` (optional) names the role of each token: an index into `position_names`
    per token, shaped like `clean` (padding holds 0). The corrupted prompt pairs the clean one
    token for token, so the clean prompt's labels serve both.
    """

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    correct: Int[Tensor, "batch n_correct"]
    incorrect: Int[Tensor, "batch n_incorrect"]
    answer_pos: Int[Tensor, " batch"]
    metric: Metric = "logit_diff"
    name: str = "custom"
    prompts: tuple[str, ...] | None = field(default=None, compare=False)
    position_labels: Int[Tensor, "batch pos"] | None = field(default=None, compare=False)
    position_names: tuple[str, ...] | None = field(default=None, compare=False)
    # Per prompt, the group it was made from (IOI: its template), so that a split can hold out
    # whole groups: `split(..., by="groups")`.
    groups: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("clean", "corrupted", "correct", "incorrect", "answer_pos"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool:
                kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"PromptTask.{name} must be an integer tensor, got {kind}; use "
                    "PromptTask.from_tokens(...) to convert lists of ids."
                )
        n = self.clean.shape[0] if self.clean.dim() == 2 else -1
        if self.clean.dim() != 2 or n == 0:
            raise ValueError("clean must be a non-empty (batch, pos) tensor of token ids.")
        if self.corrupted.shape != self.clean.shape:
            raise ValueError(
                f"clean and corrupted token tensors differ in shape ({tuple(self.clean.shape)} vs "
                f"{tuple(self.corrupted.shape)}); every corrupted prompt must pair one clean "
                "prompt token for token."
            )
        for name in ("correct", "incorrect", "answer_pos"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, expected {n}.")
        if self.metric not in ("logit_diff", "prob_diff"):
            raise ValueError(f"metric must be 'logit_diff' or 'prob_diff', got {self.metric!r}.")
        bad = (self.answer_pos < 0) | (self.answer_pos >= self.clean.shape[1])
        if bad.any():
            raise ValueError(f"answer_pos out of range for prompt {int(bad.nonzero()[0])}.")
        for name in ("correct", "incorrect"):
            empty = (getattr(self, name) == PAD_ANSWER).all(dim=1)
            if empty.any():
                raise ValueError(f"Prompt {int(empty.nonzero()[0])} has no {name} answer.")
        # (batch, n_correct, n_incorrect): an id in both sets cannot separate the answers
        shared = (self.correct[:, :, None] == self.incorrect[:, None, :]) & (
            self.correct[:, :, None] != PAD_ANSWER
        )
        if shared.any():
            i, j, _ = (int(x) for x in shared.nonzero()[0])
            raise ValueError(
                f"Prompt {i}: token {int(self.correct[i, j])} is both a correct and an incorrect "
                "answer; the sets must not overlap."
            )
        check_labels(self.position_labels, self.position_names, self.clean)
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"groups has {len(self.groups)} entries; give one per prompt ({n}).")

    @classmethod
    def from_tokens(
        cls,
        clean: Any,
        corrupted: Any,
        correct: Any,
        incorrect: Any,
        answer_pos: Any | None = None,
        metric: Metric = "logit_diff",
        name: str = "custom",
        positions: Sequence[Sequence[str]] | None = None,
        position_names: Sequence[str] | None = None,
    ) -> PromptTask:
        """Build from token ids; by default every answer is read at the last position.

        `positions` (optional): per prompt, one label string per token, either for the whole
        row or up to and including its answer position (the rest is padding); see
        `from_prompts` for `position_names`.
        """
        clean_t = _ids(clean, "clean")
        corrupted_t = _ids(corrupted, "corrupted")
        if clean_t.dim() == 1:
            clean_t, corrupted_t = clean_t[None], corrupted_t[None]
            if positions is not None and positions and isinstance(positions[0], str):
                positions = [positions]  # type: ignore[list-item]  # one prompt's labels
        if answer_pos is None:
            answer_pos = torch.full((clean_t.shape[0],), clean_t.shape[-1] - 1)
        answer_t = _ids(answer_pos, "answer_pos")
        labels, names = id_labels(positions, position_names, clean_t, answer_t)
        return cls(
            clean=clean_t,
            corrupted=corrupted_t,
            correct=_as_2d(correct, "correct"),
            incorrect=_as_2d(incorrect, "incorrect"),
            answer_pos=answer_t,
            metric=metric,
            name=name,
            position_labels=labels,
            position_names=names,
        )

    @classmethod
    def from_prompts(
        cls,
        model: Any,
        clean: Sequence[str],
        corrupted: Sequence[str],
        correct: Sequence[str],
        incorrect: Sequence[str],
        name: str = "custom",
        positions: Sequence[Sequence[str]] | None = None,
        position_names: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> PromptTask:
        """Tokenize prompt pairs with the model's tokenizer; answers must be single tokens.

        Prompts may differ in length across pairs (they are right-padded and the answer
        position is tracked per example), but a clean prompt and its corrupted partner must
        have the same number of tokens. `positions` (optional) gives each clean prompt one
        label per token as the model tokenizes it (BOS included when the model prepends one;
        `tasks.labels.label_tokens` builds them from character spans), so prompts of different
        lengths line up by label. `position_names` fixes the labels' order (names never used
        are fine); without it they are indexed in order of first appearance. `groups`
        (optional): per pair, the group it comes from (e.g. its template), for
        `split(..., by="groups")`.
        """
        lists = {"clean": clean, "corrupted": corrupted, "correct": correct, "incorrect": incorrect}
        sizes = {k: len(v) for k, v in lists.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Prompt lists differ in length: {sizes}; give one entry per pair.")
        if sizes["clean"] == 0:
            raise ValueError("No prompts given: pass at least one clean/corrupted pair.")
        rows_clean, rows_corr, ids_correct, ids_incorrect = [], [], [], []
        for i, (c, r, a, b) in enumerate(zip(clean, corrupted, correct, incorrect, strict=True)):
            tc, tr = _tokens(model, c), _tokens(model, r)
            if len(tc) != len(tr):
                raise ValueError(
                    f"Pair {i}: clean prompt {c!r} has {len(tc)} tokens but corrupted prompt "
                    f"{r!r} has {len(tr)}; corrupt with words of the same token length."
                )
            rows_clean.append(tc)
            rows_corr.append(tr)
            ids_correct.append(single_token(model, a, f"pair {i} correct answer"))
            ids_incorrect.append(single_token(model, b, f"pair {i} incorrect answer"))
        labels, names = prompt_labels(model, positions, position_names, rows_clean)
        return cls(
            clean=pad_rows(rows_clean),
            corrupted=pad_rows(rows_corr),
            correct=_as_2d(ids_correct, "correct"),
            incorrect=_as_2d(ids_incorrect, "incorrect"),
            answer_pos=torch.tensor([len(t) - 1 for t in rows_clean]),
            name=name,
            prompts=tuple(clean),
            position_labels=labels,
            position_names=names,
            groups=None if groups is None else tuple(groups),
        )

    @classmethod
    def from_frame(cls, model: Any, df: Any, name: str = "custom") -> PromptTask:
        """Build from a DataFrame with columns clean, corrupted, correct, incorrect."""
        missing = [c for c in ("clean", "corrupted", "correct", "incorrect") if c not in df]
        if missing:
            raise ValueError(
                f"DataFrame lacks column(s) {missing}; it needs clean, corrupted, correct, "
                "incorrect."
            )
        return cls.from_prompts(
            model,
            list(df["clean"]),
            list(df["corrupted"]),
            list(df["correct"]),
            list(df["incorrect"]),
            name=name,
        )

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def subset(self, idx: Any) -> PromptTask:
        """The examples at `idx`, trimmed to their longest prompt."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        seq = int(self.answer_pos[idx].max()) + 1
        prompts = None if self.prompts is None else tuple(self.prompts[int(i)] for i in idx)
        groups = None if self.groups is None else tuple(self.groups[int(i)] for i in idx)
        return replace(
            self,
            clean=self.clean[idx, :seq],
            corrupted=self.corrupted[idx, :seq],
            correct=self.correct[idx],
            incorrect=self.incorrect[idx],
            answer_pos=self.answer_pos[idx],
            prompts=prompts,
            position_labels=_rows(self.position_labels, idx, seq),
            groups=groups,
        )

    def take(self, idx: Tensor, seq: int, rows: list[int] | None = None) -> PromptTask:
        """Examples `idx` of this (already validated) task trimmed to `seq`, without checks.

        The training loop calls this every step: `idx` stays on the task's device and nothing
        is read back to the host. `rows` (the same indices as ints) selects `prompts`.
        """
        fields = {
            "clean": self.clean[idx, :seq],
            "corrupted": self.corrupted[idx, :seq],
            "correct": self.correct[idx],
            "incorrect": self.incorrect[idx],
            "answer_pos": self.answer_pos[idx],
            "metric": self.metric,
            "name": self.name,
            "prompts": None
            if self.prompts is None or rows is None
            else tuple(self.prompts[i] for i in rows),
            "position_labels": _rows(self.position_labels, idx, seq),
            "position_names": self.position_names,
            "groups": None
            if self.groups is None or rows is None
            else tuple(self.groups[i] for i in rows),
        }
        return _unchecked(fields)

    def to(self, device: Any) -> PromptTask:
        """The same task with its tensors on `device` (self when they are there already)."""
        if self.clean.device == torch.device(device):
            return self
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for name in ("clean", "corrupted", "correct", "incorrect", "answer_pos"):
            fields[name] = fields[name].to(device)
        if self.position_labels is not None:
            fields["position_labels"] = self.position_labels.to(device)
        return _unchecked(fields)

    def position_index(self, names: Sequence[str]) -> Int[Tensor, "batch pos"]:
        """This task's labels as indices into `names` (a circuit's position names, in any
        order, possibly with more names), on the labels' device.

        Every one of the task's `position_names` must be among `names`, used or not, so the
        answer never depends on which prompts a batch holds.
        """
        if self.position_labels is None or self.position_names is None:
            raise ValueError(
                f"Task {self.name!r} has no position labels: build it with tasks.ioi or "
                "tasks.greater_than, or pass positions=... (one label per token) to "
                "PromptTask.from_prompts / from_tokens."
            )
        return reindex(self.position_labels, self.position_names, names)

    def split(
        self, train_fraction: float = 0.5, seed: int = 0, by: SplitBy = "prompts"
    ) -> tuple[PromptTask, PromptTask]:
        """A seeded random (train, held-out) split, so faithfulness is read on unseen prompts;
        `by="groups"` holds out whole groups (IOI: templates), so on unseen groups too."""
        train, held_out = self.split_indices(train_fraction, seed, by)
        return self.subset(train), self.subset(held_out)

    def split_indices(
        self, train_fraction: float = 0.5, seed: int = 0, by: SplitBy = "prompts"
    ) -> tuple[Tensor, Tensor]:
        """The rows of `split`'s (train, held-out) parts, each sorted."""
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        if by == "groups":
            return self._split_groups(train_fraction, seed)
        if by != "prompts":
            raise ValueError(f"by must be 'prompts' or 'groups', got {by!r}.")
        n_train = split_size(len(self), train_fraction)
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return perm[:n_train].sort().values, perm[n_train:].sort().values

    def _split_groups(self, train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
        """Whole groups held out, in a seeded order, until at least 1 - train_fraction of the
        prompts are (the nearest the groups' sizes allow from above)."""
        if self.groups is None:
            raise ValueError(
                f"Task {self.name!r} has no groups to hold out: split by='prompts', or build it "
                "with tasks.ioi (groups are its templates) or from_prompts(..., groups=...)."
            )
        names = sorted(set(self.groups))
        if len(names) < 2:
            raise ValueError(f"Task {self.name!r} has one group, {names[0]!r}; split by='prompts'.")
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
        want, held = (1 - train_fraction) * len(self), set()
        for i in order[:-1]:  # at least one group stays for training
            held.add(names[i])
            if sum(g in held for g in self.groups) >= want:
                break
        mask = torch.tensor([g in held for g in self.groups])
        return (~mask).nonzero()[:, 0], mask.nonzero()[:, 0]

    def check_vocab(self, d_vocab: int, vocab_out: int | None = None) -> None:
        """Raise a ValueError when a prompt token is outside the input vocabulary (`d_vocab`)
        or an answer id outside the output vocabulary (`vocab_out`, default `d_vocab`)."""
        limits = {"clean": d_vocab, "corrupted": d_vocab}
        limits |= dict.fromkeys(("correct", "incorrect"), vocab_out or d_vocab)
        for name, limit in limits.items():
            t = getattr(self, name)
            valid = t[t != PAD_ANSWER] if name in ("correct", "incorrect") else t
            if valid.numel() and (valid.min() < 0 or valid.max() >= limit):
                worst = int(valid.max() if valid.max() >= limit else valid.min())
                which = "input" if name in ("clean", "corrupted") else "output"
                raise ValueError(
                    f"{name} holds token id {worst} outside the model's {which} vocabulary "
                    f"[0, {limit}); build the task with this model's tokenizer."
                )

    def answer_logits(
        self, logits: Float[Tensor, "batch pos vocab"]
    ) -> Float[Tensor, "batch vocab"]:
        """The logits at each example's answer position."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, self.answer_pos.to(logits.device)]

    def score(self, answer_logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
        """The task metric per example, from the logits at the answer position."""
        values = (
            answer_logits.log_softmax(-1).exp() if self.metric == "prob_diff" else answer_logits
        )
        return answer_set_value(values, self.correct, self.metric) - answer_set_value(
            values, self.incorrect, self.metric
        )


def _rows(labels: Tensor | None, idx: Tensor, seq: int) -> Tensor | None:
    """Rows `idx` of optional per-token labels, trimmed to `seq` like the prompts."""
    return None if labels is None else labels[idx.to(labels.device), :seq]


def _unchecked(fields: dict[str, Any]) -> PromptTask:
    """A PromptTask from fields known to be valid, skipping `__post_init__` (no host syncs)."""
    task = object.__new__(PromptTask)
    for name, value in fields.items():
        object.__setattr__(task, name, value)
    return task


def answer_set_value(values: Tensor, ids: Tensor, metric: Metric) -> Tensor:
    """Sum (prob_diff) or mean (logit_diff) of `values` over each row's valid answer ids."""
    ids = ids.to(values.device)
    valid = ids != PAD_ANSWER
    picked = values.gather(1, ids.clamp(min=0)) * valid
    total = picked.sum(1)
    return total if metric == "prob_diff" else total / valid.sum(1)


def pad_rows(rows: list[list[int]], pad_id: int = 0) -> Tensor:
    """Right-pad token lists; causal attention keeps pads from touching real tokens."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _tokens(model: Any, text: str) -> list[int]:
    if not text:
        raise ValueError("Empty prompt: every clean and corrupted prompt needs text.")
    return [int(t) for t in model.to_tokens(text)[0].tolist()]


def single_token(model: Any, text: str, what: str = "answer") -> int:
    """The id of `text` as one token, or a ValueError naming how it splits."""
    if not text:
        raise ValueError(f"Empty {what}: answers must be one token, e.g. ' Mary'.")
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([t]) for t in ids]
        raise ValueError(
            f"The {what} {text!r} is {len(ids)} tokens {pieces} for this tokenizer; "
            "answers must be single tokens (try a leading space, or another word)."
        )
    return int(ids[0])

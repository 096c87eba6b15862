"""Position labels: a name per token (IOI's "S1", "IO", "S2", "END"), so prompts line up by role.

A task's labels are a (batch, pos) tensor of indices into its `position_names`. Prompts of
different lengths then agree on what "S2" means although S2 sits at different token indices.
`label_tokens` turns character spans of a prompt into one label per token of that prompt, as
the model tokenizes it; `fill_template` gives the spans of a template's fields. The rest builds
and checks `PromptTask`'s two label fields.
"""

from __future__ import annotations

import numbers
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

Span = tuple[int, int]  # [start, end) character range of a prompt
SpanSpec = Span | Sequence[Span] | str
Merged = Literal["raise", "last"]


def fill_template(template: str, **values: Any) -> tuple[str, list[tuple[str, int, int]]]:
    """`template.format(**values)` and, per replacement field in order, (field, start, end).

    The text is the one `str.format` gives (conversions and format specs included); the
    ranges say where each field's value landed, which a label needs and `format` hides.
    """
    formatter = string.Formatter()
    parts: list[str] = []
    fields: list[tuple[str, int, int]] = []
    length = 0
    for literal, field, spec, conversion in formatter.parse(template):
        parts.append(literal)
        length += len(literal)
        if field is None:
            continue
        value, _ = formatter.get_field(field, (), values)
        piece = formatter.format_field(formatter.convert_field(value, conversion), spec or "")
        parts.append(piece)
        fields.append((field, length, length + len(piece)))
        length += len(piece)
    return "".join(parts), fields


def label_tokens(
    model: Any,
    text: str,
    spans: Mapping[str, SpanSpec],
    default: str = "other",
    merged: Merged = "raise",
) -> list[str]:
    """One label per token of `text` as `model.to_tokens(text)` gives it (BOS included).

    `spans` maps a label to a [start, end) character range of `text`, a list of ranges, or a
    substring (every occurrence). A token takes the label of the span it lies in, else
    `default`. Boundaries are found by tokenizing each prefix `text[:b]` and checking that it
    agrees with the prompt's own tokens; a start just after whitespace may take the token that
    carries that whitespace (" Mary" for the span "Mary"). A token that straddles any other
    boundary raises a ValueError with `merged="raise"`; with `merged="last"` it takes the label
    of the later span it overlaps (the generators use this, so that no tokenizer fails them).
    """
    if merged not in ("raise", "last"):
        raise ValueError(f"merged must be 'raise' or 'last', got {merged!r}.")
    tokens = _Tokens(model, text)
    labels = [default] * len(tokens.full)
    for start, end, label in _char_ranges(text, spans):
        first = tokens.start(start, label, merged)
        stop, exact = tokens.boundary(end)
        if not exact:
            if merged == "raise":
                raise tokens.merge_error(end, stop, label)
            stop += 1  # the straddling token overlaps the span
        for k in range(first, stop):
            labels[k] = label
    return labels


class _Tokens:
    """A prompt's tokens and, per character offset, where it falls among them (cached)."""

    def __init__(self, model: Any, text: str) -> None:
        self.model, self.text = model, text
        self.full = [int(t) for t in model.to_tokens(text)[0].tolist()]
        self.n_bos = len(self.full) - len(self._ids(text))
        self._cache: dict[int, tuple[int, bool]] = {}

    def _ids(self, prefix: str) -> list[int]:
        if not prefix:
            return []
        return [int(t) for t in self.model.to_tokens(prefix, prepend_bos=False)[0].tolist()]

    def boundary(self, offset: int) -> tuple[int, bool]:
        """(k, True) when token k starts at character `offset`; (k, False) when token k
        straddles it (the first token where the prefix's tokens and the prompt's disagree)."""
        if offset not in self._cache:
            prefix = self._ids(self.text[:offset])
            own = self.full[self.n_bos : self.n_bos + len(prefix)]
            agree = 0
            while agree < len(prefix) and agree < len(own) and prefix[agree] == own[agree]:
                agree += 1
            self._cache[offset] = (self.n_bos + agree, agree == len(prefix))
        return self._cache[offset]

    def start(self, offset: int, label: str, merged: Merged) -> int:
        """The first token of a span starting at `offset` (see `label_tokens` for the rules)."""
        k, exact = self.boundary(offset)
        if exact or merged == "last":
            return k
        trimmed = len(self.text[:offset].rstrip())
        k_trim, exact_trim = self.boundary(trimmed)
        if trimmed < offset and exact_trim and k_trim == k:
            return k  # token k is the whitespace before the span and the span's first part
        raise self.merge_error(offset, k, label)

    def merge_error(self, offset: int, k: int, label: str) -> ValueError:
        pieces = [self.model.tokenizer.decode([t]) for t in self.full]
        return ValueError(
            f"The tokenizer merges across the boundary of span {label!r} at character {offset} "
            f"of {self.text!r}: token {k} ({pieces[k]!r}) covers characters on both sides. "
            f"Tokens: {pieces}. Move the span's boundary to a token boundary, or pass "
            "merged='last' to give such a token the label of the later span."
        )


def _char_ranges(text: str, spans: Mapping[str, SpanSpec]) -> list[tuple[int, int, str]]:
    """The spans as (start, end, label), in text order, after checking they fit and are
    disjoint."""
    out: list[tuple[int, int, str]] = []
    for label, spec in spans.items():
        if isinstance(spec, str):
            found = _occurrences(text, spec)
            if not found:
                raise ValueError(f"Span {label!r}: {spec!r} does not occur in {text!r}.")
            out += [(s, e, label) for s, e in found]
            continue
        ranges = [spec] if len(spec) == 2 and isinstance(spec[0], numbers.Integral) else spec
        for r in ranges:
            start, end = (int(x) for x in r)  # type: ignore[union-attr]
            if not 0 <= start < end <= len(text):
                raise ValueError(
                    f"Span {label!r}: ({start}, {end}) is not a non-empty character range of "
                    f"the {len(text)}-character prompt {text!r}."
                )
            out.append((start, end, label))
    out.sort()
    for (_, end, a), (start, _, b) in zip(out, out[1:], strict=False):
        if start < end:
            raise ValueError(f"Spans {a!r} and {b!r} overlap in {text!r}; make them disjoint.")
    return out


def _occurrences(text: str, sub: str) -> list[Span]:
    """Every non-overlapping occurrence of `sub` in `text`."""
    out, at = [], text.find(sub) if sub else -1
    while at >= 0:
        out.append((at, at + len(sub)))
        at = text.find(sub, at + len(sub))
    return out


def encode_labels(
    rows: Sequence[Sequence[str]], names: Sequence[str] | None
) -> tuple[Int[Tensor, "batch pos"], tuple[str, ...]]:
    """Label strings per prompt as a right-padded (batch, pos) index tensor (padding 0), and
    the names indexed: `names` when given, else the labels in order of first appearance."""
    if names is None:
        names = tuple(dict.fromkeys(label for row in rows for label in row))
    names = tuple(names)
    check_names(names)
    index = {name: i for i, name in enumerate(names)}
    out = torch.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=torch.long)
    for i, row in enumerate(rows):
        unknown = sorted({label for label in row if label not in index})
        if unknown:
            raise ValueError(
                f"Prompt {i} has position label(s) {unknown} missing from position_names "
                f"{list(names)}; add them there, or leave position_names out to take the "
                "labels in order of first appearance."
            )
        out[i, : len(row)] = torch.tensor([index[label] for label in row], dtype=torch.long)
    return out, names


def check_names(names: Any) -> None:
    """Position names are a tuple of distinct non-empty strings; a ValueError says otherwise."""
    if not isinstance(names, tuple) or not names:
        raise ValueError(
            f"position_names must be a non-empty tuple of strings, got {names!r}; e.g. "
            "('S1', 'IO', 'S2', 'END', 'other')."
        )
    bad = [n for n in names if not isinstance(n, str) or not n]
    repeated = sorted({n for n in names if names.count(n) > 1}, key=str)
    if bad or repeated:
        raise ValueError(
            f"position_names must be distinct non-empty strings; got {list(names)} (not "
            f"non-empty strings: {bad}, repeated: {repeated})."
        )


def check_labels(labels: Any, names: Any, clean: Tensor) -> None:
    """`labels` and `names` are both None, or an integer tensor shaped like `clean` holding
    indices into valid `names`; a ValueError says which rule failed and how to fix it."""
    if (labels is None) != (names is None):
        raise ValueError(
            "position_labels and position_names go together: give both (labels index the "
            "names) or neither; PromptTask.from_prompts(..., positions=...) builds both."
        )
    if labels is None:
        return
    check_names(names)
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or (labels.dtype == torch.bool)
    ):
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"position_labels must be an integer tensor, got {kind}.")
    if labels.shape != clean.shape:
        raise ValueError(
            f"position_labels has shape {tuple(labels.shape)} but clean has "
            f"{tuple(clean.shape)}; give one label per token (padding may hold 0)."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(names)):
        worst = int(labels.max() if labels.max() >= len(names) else labels.min())
        raise ValueError(
            f"position_labels holds {worst}, outside [0, {len(names)}): each label indexes "
            f"position_names {list(names)}."
        )


def reindex(
    labels: Int[Tensor, "batch pos"], own: tuple[str, ...], names: Sequence[str]
) -> Int[Tensor, "batch pos"]:
    """`labels` (indices into `own`) as indices into `names`, on the labels' device."""
    where = {name: i for i, name in enumerate(names)}
    missing = [name for name in own if name not in where]
    if missing:
        raise ValueError(
            f"This task's position label(s) {missing} are not among the names asked for "
            f"{list(names)}; the task labels its tokens {list(own)}. Relabel the task, or use "
            "names that cover its labels."
        )
    lookup = torch.tensor([where[name] for name in own], dtype=torch.long, device=labels.device)
    return lookup[labels]


def _padded_labels(
    positions: Sequence[Sequence[str]] | None,
    position_names: Sequence[str] | None,
    shape: tuple[int, ...],
) -> tuple[Tensor | None, tuple[str, ...] | None]:
    """The (labels, names) fields from label strings per prompt, padded to `shape` with 0."""
    if positions is None:
        if position_names is not None:
            raise ValueError(
                "position_names was given without positions: pass positions=... (one label per "
                "token of each clean prompt) too, or neither."
            )
        return None, None
    if len(positions) != shape[0]:
        raise ValueError(
            f"positions has {len(positions)} rows for {shape[0]} prompts; give one sequence "
            "of labels per prompt."
        )
    labels, names = encode_labels(positions, position_names)
    out = torch.zeros(shape, dtype=torch.long)
    width = min(labels.shape[1], shape[1])  # a longer row is refused by the count check
    out[:, :width] = labels[:, :width]
    return out, names


def id_labels(
    positions: Sequence[Sequence[str]] | None,
    position_names: Sequence[str] | None,
    clean: Tensor,
    answer_pos: Tensor,
) -> tuple[Tensor | None, tuple[str, ...] | None]:
    """`PromptTask.from_tokens`' (labels, names) from label strings per prompt: a row's
    labels cover all of its tokens, or those up to and including its answer position."""
    if clean.dim() != 2:  # __post_init__ names the problem with `clean`
        return None, None
    labels, names = _padded_labels(positions, position_names, tuple(clean.shape))
    ends = answer_pos.tolist() if answer_pos.shape == clean.shape[:1] else []
    for i, row in enumerate(positions or ()):
        allowed = (clean.shape[1], *([ends[i] + 1] if ends else []))
        _check_label_count(i, len(row), allowed, str(clean[i].tolist()))
    return labels, names


def prompt_labels(
    model: Any,
    positions: Sequence[Sequence[str]] | None,
    position_names: Sequence[str] | None,
    rows: list[list[int]],
) -> tuple[Tensor | None, tuple[str, ...] | None]:
    """`PromptTask.from_prompts`' (labels, names): one label string per token of each clean
    prompt, tokenized as `rows`; a wrong count shows the prompt's tokens decoded."""
    shape = (len(rows), max(len(r) for r in rows))
    labels, names = _padded_labels(positions, position_names, shape)
    for i, (row, ids) in enumerate(zip(positions or (), rows, strict=False)):
        pieces = [model.tokenizer.decode([t]) for t in ids]
        _check_label_count(i, len(row), (len(ids),), str(pieces))
    return labels, names


def _check_label_count(i: int, n: int, allowed: tuple[int, ...], tokens: str) -> None:
    """A ValueError naming prompt `i`, both counts and its tokens when `n` is not allowed."""
    if n not in allowed:
        counts = " or ".join(str(a) for a in dict.fromkeys(allowed))
        raise ValueError(
            f"Prompt {i} has {n} position labels but {counts} tokens {tokens}; give one "
            "label per token of the clean prompt as the model tokenizes it (BOS included "
            "when the model prepends one)."
        )

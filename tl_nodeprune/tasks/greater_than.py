"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> > 32.

How the answer is posed depends on how the tokenizer writes numbers. Where two-digit strings are
single tokens (GPT-2), the next token is the end year's last two digits: the correct set is
YY+1..99, the incorrect set 00..YY (Hanna et al.). Where numbers split into single digits
(SmolLM2, Llama 2), the next token is the end year's tens digit: correct are digits above the
start year's tens digit, incorrect digits below it (an equal digit could go either way and is in
neither set). Metric in both cases: probability of the correct set minus the incorrect set.
Each token is labelled (`GREATER_THAN_POSITIONS`): "XX" the start year's century, "YY" its last
two digits (one token or two, by tokenizer), "END" the last token, "other" the rest (the end
year's century included, but for its last token, which is END).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Literal

from .base import PAD_ANSWER, PromptTask, pad_rows, single_token
from .ioi import single_token_words
from .labels import fill_template, label_tokens

YearTokens = Literal["two_digit", "one_digit"]
# The position labels of greater-than tokens, in the order a task's `position_names` lists them.
GREATER_THAN_POSITIONS: tuple[str, ...] = ("XX", "YY", "END", "other")
CENTURIES: tuple[int, ...] = tuple(range(11, 18))  # 1100s to 1700s, as in Hanna et al.
NOUNS: tuple[str, ...] = (
    "war", "reign", "dynasty", "expedition", "drought", "famine", "empire", "festival",
    "siege", "plague", "treaty", "rebellion", "revolution", "crisis", "strike", "occupation",
    "voyage", "project", "campaign", "conflict", "partnership", "alliance", "marriage",
    "journey", "tradition", "era", "period", "truce", "boom", "conquest", "exile",
    "construction", "pilgrimage", "embargo", "trial", "tour", "mission", "regime", "monarchy",
    "movement", "battle", "blockade", "depression", "recession", "investigation",
    "exhibition", "season", "renovation", "friendship", "contract", "agreement", "reform",
)  # fmt: skip
_TEMPLATE = "The {noun} lasted from the year {century}{start:02d} to the year {century}"
# A second set, sharing no template or noun with the first, for checking circuits on prompts
# nobody tuned on (`greater_than_independent`). Each ends on the end year's century.
INDEPENDENT_TEMPLATES: tuple[str, ...] = (
    "The {noun} began in {century}{start:02d} and ended in {century}",
    "Records show that the {noun} ran from {century}{start:02d} until {century}",
    "In {century}{start:02d} the {noun} started, and it was over by {century}",
    "The {noun} took place between {century}{start:02d} and {century}",
    "Work on the {noun} started in {century}{start:02d} and stopped in {century}",
)
INDEPENDENT_NOUNS: tuple[str, ...] = (
    "feud", "lease", "quarantine", "scandal", "mandate", "ceasefire", "presidency", "tenure",
    "curfew", "lockout", "colony", "settlement", "railway", "survey", "census", "ministry",
    "drama", "romance", "contest", "auction", "league", "union", "boycott", "riot", "fever",
    "harvest", "migration", "crusade", "inquiry", "council",
)  # fmt: skip


def greater_than(model: Any, n: int = 64, seed: int = 0) -> PromptTask:
    """`n` greater-than prompt pairs (metric prob_diff), corrupted with the start year XX01.

    Two-digit number tokens: YY in 02..98, correct = tokens "YY+1".."99", incorrect = "00".."YY".
    One-digit number tokens: the question is the end year's tens digit, YY in 10..89 (so both
    sets are non-empty), correct = digits > YY // 10, incorrect = digits < YY // 10.
    Nouns are kept where they are one token after a space. The same seed gives the same task.
    """
    return _greater_than(model, n, seed, (_TEMPLATE,), NOUNS)


def greater_than_independent(model: Any, n: int = 64, seed: int = 0) -> PromptTask:
    """Greater-than from five other templates and nouns, none shared with `greater_than`'s.

    The same years, answers and metric: a circuit found with `greater_than` that only fits its
    one template loses faithfulness here.
    """
    return _greater_than(model, n, seed, INDEPENDENT_TEMPLATES, INDEPENDENT_NOUNS)


def _greater_than(
    model: Any, n: int, seed: int, templates: tuple[str, ...], noun_pool: tuple[str, ...]
) -> PromptTask:
    """The prompts of `greater_than`, each from a template of `templates` (drawn only when
    there are several, so one template draws as it always has)."""
    if n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n}.")
    mode = year_tokens(model)
    nouns = single_token_words(model, noun_pool)
    if not nouns:
        raise ValueError("None of the greater-than nouns is a single token for this tokenizer.")
    # Every possible next token, in numeric order: "00".."99" or "0".."9".
    texts = [f"{y:02d}" for y in range(100)] if mode == "two_digit" else [str(d) for d in range(10)]
    ids = [single_token(model, t, "year digit(s)") for t in texts]
    starts = range(2, 99) if mode == "two_digit" else range(10, 90)

    rng = random.Random(seed)
    clean, corrupted, above, below, labels = [], [], [], [], []
    for _ in range(n):
        c, r, start, spans = _sample(model, rng, nouns, starts, mode, templates)
        labels.append(label_tokens(model, c, spans, merged="last"))
        labels[-1][-1] = "END"
        # Above vs at-or-below the start year's last two digits (two-digit tokens), or above
        # vs strictly below its tens digit (one-digit tokens), as indices into `ids`.
        cut = start if mode == "two_digit" else start // 10
        clean.append(c)
        corrupted.append(r)
        above.append(list(range(cut + 1, len(ids))))
        below.append(list(range(cut + 1 if mode == "two_digit" else cut)))

    # from_prompts tokenizes and pads the prompts with one answer each; the full sets then
    # replace those (replace() re-runs PromptTask's validation).
    task = PromptTask.from_prompts(
        model,
        clean,
        corrupted,
        [texts[a[0]] for a in above],
        [texts[b[0]] for b in below],
        name="greater_than",
        positions=labels,
        position_names=GREATER_THAN_POSITIONS,
    )
    return replace(
        task,
        correct=pad_rows([[ids[k] for k in a] for a in above], pad_id=PAD_ANSWER),
        incorrect=pad_rows([[ids[k] for k in b] for b in below], pad_id=PAD_ANSWER),
        metric="prob_diff",
    )


def year_tokens(model: Any) -> YearTokens:
    """Whether this tokenizer writes "00".."99" as one token each, or numbers digit by digit."""
    if all(_n_tokens(model, f"{y:02d}") == 1 for y in range(100)):
        return "two_digit"
    digits = [_n_tokens(model, str(d)) == 1 for d in range(10)]
    if all(digits) and _n_tokens(model, "1732") == 4:
        return "one_digit"
    pieces = [model.tokenizer.decode([t]) for t in model.to_tokens("1732", prepend_bos=False)[0]]
    raise ValueError(
        f"This tokenizer splits '1732' as {pieces}; greater_than needs two-digit number tokens "
        "(GPT-2) or single-digit ones (SmolLM2, Llama 2). Build a PromptTask by hand for others."
    )


def _sample(
    model: Any,
    rng: random.Random,
    nouns: list[str],
    starts: range,
    mode: YearTokens,
    templates: tuple[str, ...],
    tries: int = 100,
) -> tuple[str, str, int, dict[str, tuple[int, int]]]:
    """One (clean, corrupted, start, spans) row whose prompts have the same token length; the
    spans are the characters of the start year's century ("XX") and last two digits ("YY").

    Also checks that the smallest correct answer is what the tokenizer would write next, so the
    answer tokens are the ones the model is asked to predict.
    """
    for _ in range(tries):
        template = rng.choice(templates) if len(templates) > 1 else templates[0]
        noun, century, start = rng.choice(nouns), rng.choice(CENTURIES), rng.choice(starts)
        clean, fields = fill_template(template, noun=noun, century=century, start=start)
        corrupted = template.format(noun=noun, century=century, start=1)
        nxt = f"{start + 1:02d}" if mode == "two_digit" else str(start // 10 + 1)
        clean_ids = model.to_tokens(clean)[0].tolist()
        same_length = len(clean_ids) == model.to_tokens(corrupted).shape[-1]
        continued = model.to_tokens(clean + nxt)[0].tolist()
        continues = continued == clean_ids + [single_token(model, nxt)]
        if same_length and continues:
            # the start year's century is the first "century" field, its digits "start"
            xx_start, xx_end = next((a, b) for f, a, b in fields if f == "century")
            yy_start, yy_end = next((a, b) for f, a, b in fields if f == "start")
            return clean, corrupted, start, {"XX": (xx_start, xx_end), "YY": (yy_start, yy_end)}
    raise ValueError(
        f"No greater-than prompt with equal clean/corrupted token lengths in {tries} tries; "
        "this tokenizer merges years with their neighbours."
    )


def _n_tokens(model: Any, text: str) -> int:
    """Token count without BOS."""
    return int(model.to_tokens(text, prepend_bos=False).shape[-1])

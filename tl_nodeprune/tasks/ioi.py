"""Indirect object identification (Wang et al. 2022) prompt pairs for any tokenizer.

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
IO) rather than " John" (the subject, S). Metric: logit(IO) - logit(S) at the last position.
Each token is labelled (`IOI_POSITIONS`): "IO" and "S1" the two first name mentions, "S2" the
subject's second mention, "END" the last token (where the answer is read), "other" the rest.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any, Literal, get_args

from .base import PromptTask
from .labels import fill_template, label_tokens

Corruption = Literal["abc", "flip"]
CORRUPTIONS: tuple[str, ...] = ("abc", "flip")
# What `ioi_independent` draws from the second sets: templates, words (names, places, objects).
Unseen = Literal["both", "templates", "names"]
UNSEEN: tuple[str, ...] = get_args(Unseen)
# The position labels of IOI tokens, in the order a task's `position_names` lists them.
IOI_POSITIONS: tuple[str, ...] = ("S1", "IO", "S2", "END", "other")

# {A} and {B} introduce the two people, {S} is the subject's second mention; the prompt stops
# right before the indirect object. ABBA fills A=IO, B=S; BABA fills A=S, B=IO.
TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "After {A} and {B} spent the day at the {PLACE}, {S} passed a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Afterwards, {A} and {B} went to the {PLACE}. {S} brought a {OBJECT} to",
    "Then, {A} and {B} had a long talk at the {PLACE}. {S} offered a {OBJECT} to",
    "When {A} and {B} found a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {A} and {B} met at the {PLACE}, {S} showed a {OBJECT} to",
    "The {PLACE} was quiet when {A} and {B} got there. {S} gave a {OBJECT} to",
    "After lunch, {A} and {B} went to the {PLACE}. {S} sent a {OBJECT} to",
    "Yesterday, {A} and {B} walked to the {PLACE}. {S} lent a {OBJECT} to",
    "On Sunday, {A} and {B} visited the {PLACE}. {S} sold a {OBJECT} to",
    "As {A} and {B} were leaving the {PLACE}, {S} returned the {OBJECT} to",
    "Later, {A} and {B} were waiting at the {PLACE}. {S} threw the {OBJECT} to",
    "Once {A} and {B} reached the {PLACE}, {S} gave the {OBJECT} back to",
    "Then, {A} and {B} were cleaning the {PLACE}. {S} tossed a {OBJECT} to",
)
_FIELDS = {"A", "B", "S", "PLACE", "OBJECT"}

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Michael", "David", "Sarah", "Anna", "Emma", "Paul",
    "Mark", "Lisa", "Laura", "Kevin", "Brian", "Jessica", "Jennifer", "Daniel", "Robert",
    "William", "Richard", "Thomas", "Charles", "Joseph", "Christopher", "Matthew", "Andrew",
    "Steven", "Edward", "George", "Peter", "Jason", "Eric", "Adam", "Ryan", "Jacob",
    "Nicholas", "Jonathan", "Samuel", "Benjamin", "Patrick", "Alex", "Sam", "Henry", "Jack",
    "Lucy", "Kate", "Alice", "Rachel", "Rebecca", "Amy", "Emily", "Hannah", "Sophia", "Olivia",
    "Claire", "Helen", "Susan", "Karen", "Nancy", "Linda", "Elizabeth", "Victoria", "Julia",
    "Diana", "Maria", "Monica", "Nina", "Sara", "Tim", "Dan", "Joe", "Mike", "Chris", "Scott",
    "Jeff", "Greg", "Frank", "Carl", "Bob", "Jim", "Ben", "Luke", "Sean", "Ian", "Jose",
    "Carlos", "Anthony", "Martin", "Simon", "Kelly", "Amanda", "Michelle", "Stephanie",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "park", "school", "garden", "restaurant", "office", "station", "hospital",
    "house", "library", "beach", "market", "kitchen", "museum", "cafe", "church", "hotel",
    "airport", "farm", "lake", "mall", "bank", "gym", "theater", "zoo", "bakery", "stadium",
)  # fmt: skip
# Consonant-initial, so the templates' "a {OBJECT}" reads right.
OBJECTS: tuple[str, ...] = (
    "drink", "ring", "bone", "ball", "book", "letter", "pen", "cup", "key", "bag", "hat",
    "gift", "card", "phone", "box", "plate", "coin", "flower", "cake", "map", "note", "ticket",
    "watch", "shirt", "toy", "camera", "bottle", "pencil", "jacket", "basket", "lamp", "guitar",
)  # fmt: skip


# A second, disjoint set for checking circuits on prompts nobody tuned on (`ioi_independent`):
# other sentence frames and verbs, other names, places and objects.
INDEPENDENT_TEMPLATES: tuple[str, ...] = (
    "Last night, {A} and {B} had dinner at the {PLACE}. {S} passed the {OBJECT} over to",
    "Because {A} and {B} were late for the {PLACE}, {S} handed the {OBJECT} to",
    "In the morning {A} and {B} drove to the {PLACE}, and {S} gave a {OBJECT} to",
    "Today, {A} and {B} stood outside the {PLACE}. After a while, {S} gave the {OBJECT} to",
    "At the {PLACE}, {A} and {B} could not stop laughing. {S} handed a {OBJECT} to",
    "Before {A} and {B} left the {PLACE}, {S} mailed a {OBJECT} to",
    "It was raining when {A} and {B} came to the {PLACE}, so {S} lent the {OBJECT} to",
    "During the trip to the {PLACE}, {A} and {B} argued. Then {S} threw a {OBJECT} at",
    "Sadly, {A} and {B} were bored at the {PLACE}. {S} read the {OBJECT} aloud to",
    "On the way to the {PLACE}, {A} and {B} stopped. {S} showed the {OBJECT} to",
)
INDEPENDENT_NAMES: tuple[str, ...] = (
    "Oliver", "Harry", "Charlie", "Noah", "Liam", "Ethan", "Mason", "Logan", "Lucas", "Owen",
    "Tyler", "Kyle", "Aaron", "Nathan", "Justin", "Dylan", "Grace", "Chloe", "Ella", "Mia",
    "Zoe", "Ruby", "Leah", "Eva", "Ava", "Lily", "Holly", "Megan", "Jane", "Ruth", "Rose",
    "Jenny", "Tina", "Wendy", "Fiona", "Dean", "Roy", "Leo", "Max", "Ted", "Fred", "Neil",
    "Phil", "Ray", "Tony", "Larry", "Gary", "Bruce", "Keith", "Roger", "Walter", "Howard",
    "Arthur", "Albert", "Louis", "Victor", "Oscar", "Hugo", "Felix", "Bill", "Ann", "Jean",
    "Joan", "Carol", "Betty",
)  # fmt: skip
INDEPENDENT_PLACES: tuple[str, ...] = (
    "harbor", "bridge", "castle", "village", "forest", "river", "temple", "palace", "barn",
    "tower", "clinic", "studio", "garage", "cinema", "pool", "shop", "club", "court", "camp",
)  # fmt: skip
INDEPENDENT_OBJECTS: tuple[str, ...] = (
    "knife", "vase", "rope", "candle", "blanket", "wallet", "spoon", "hammer", "mirror",
    "pillow", "violin", "towel", "radio", "puzzle", "scarf", "belt", "fork", "cookie", "glove",
    "clock", "sock", "tie", "newspaper", "magazine", "sandwich", "present", "picture",
)  # fmt: skip


def ioi(
    model: Any,
    n: int = 64,
    seed: int = 0,
    corruption: Corruption = "abc",
    templates: Sequence[str] | None = None,
) -> PromptTask:
    """`n` IOI prompt pairs, half ABBA and half BABA over every template, for this tokenizer.

    Names, places and objects are kept only where they are one token after a space, so answers
    are single tokens. `corruption="abc"` (ACDC/EAP-IG) replaces all three name mentions with
    three other names, removing the IOI signal; `"flip"` swaps IO and S everywhere, so the
    corrupted prompt's answer is the clean incorrect one. The same seed gives the same task,
    with the same clean prompts for either corruption. Own `templates` use {A}, {B} (the first
    mentions), {S} (the subject again) and optionally {PLACE}, {OBJECT}; see `TEMPLATES`.
    """
    pools = (NAMES, PLACES, OBJECTS)
    return _ioi(model, n, seed, corruption, TEMPLATES if templates is None else templates, pools)


def ioi_independent(
    model: Any,
    n: int = 64,
    seed: int = 0,
    corruption: Corruption = "abc",
    unseen: Unseen = "both",
) -> PromptTask:
    """IOI from a second set of templates, names, places and objects, none shared with `ioi`'s.

    For checking a circuit (or a default setting) on prompts it was not tuned on: a circuit
    found with `ioi` that only fits `ioi`'s templates or names loses faithfulness here.
    `unseen` says what is new: `"both"` (default), `"templates"` (the second templates filled
    with `ioi`'s names, places and objects) or `"names"` (`ioi`'s templates filled with the
    second names, places and objects), to tell which of the two a circuit fails to carry over.
    """
    if unseen not in UNSEEN:
        raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}.")
    new_words = unseen in ("both", "names")
    pools = (
        (INDEPENDENT_NAMES, INDEPENDENT_PLACES, INDEPENDENT_OBJECTS)
        if new_words
        else (NAMES, PLACES, OBJECTS)
    )
    templates = TEMPLATES if unseen == "names" else INDEPENDENT_TEMPLATES
    return _ioi(model, n, seed, corruption, templates, pools)


def _ioi(
    model: Any,
    n: int,
    seed: int,
    corruption: Corruption,
    templates: Sequence[str],
    pools: tuple[Sequence[str], Sequence[str], Sequence[str]],
) -> PromptTask:
    """The IOI generator over given templates and (names, places, objects) pools."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}.")
    if n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n}.")
    templates = tuple(templates)
    _check_templates(templates)
    names, places, objects = (single_token_words(model, pool) for pool in pools)
    for what, pool, k in (("names", names, 5), ("places", places, 1), ("objects", objects, 1)):
        if len(pool) < k:
            raise ValueError(
                f"Only {len(pool)} of the IOI {what} are single tokens for this tokenizer "
                f"(need {k}); IOI needs a tokenizer with whole-word tokens such as GPT-2's."
            )

    rng = random.Random(seed)
    rows: list[tuple[str, str, str, str, list[str], str]] = []
    order: list[int] = []
    for i in range(n):
        # Pairs of examples share a template, one per order, so both stay balanced.
        pair = i // 2
        if pair % len(templates) == 0 and i % 2 == 0:
            order = rng.sample(range(len(templates)), len(templates))
        template = templates[order[pair % len(templates)]]
        row = _sample(model, rng, template, i % 2 == 0, names, places, objects, corruption)
        rows.append((*row, template))
    rng.shuffle(rows)
    clean, corrupted, correct, incorrect, labels, groups = (
        list(col) for col in zip(*rows, strict=True)
    )
    return PromptTask.from_prompts(
        model,
        clean,
        corrupted,
        correct,
        incorrect,
        name="ioi",
        positions=labels,
        position_names=IOI_POSITIONS,
        groups=groups,  # each prompt's template, so a split can hold out templates
    )


def single_token_words(model: Any, words: Sequence[str]) -> list[str]:
    """The words that are exactly one token with a leading space, in their given order."""
    return [w for w in words if _n_tokens(model, " " + w, prepend_bos=False) == 1]


def _sample(
    model: Any,
    rng: random.Random,
    template: str,
    abba: bool,
    names: list[str],
    places: list[str],
    objects: list[str],
    corruption: Corruption,
    tries: int = 100,
) -> tuple[str, str, str, str, list[str]]:
    """One (clean, corrupted, ' IO', ' S', labels) row, resampled until the pair has equal
    lengths; the labels name each token of the clean prompt (`IOI_POSITIONS`)."""
    for _ in range(tries):
        # Five names either way, so both corruptions share the seed's clean prompts.
        io, s, a, b, c = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        first, second = (io, s) if abba else (s, io)
        clean, fields = fill_template(template, A=first, B=second, S=s, PLACE=place, OBJECT=obj)
        if corruption == "abc":
            corrupted = template.format(A=a, B=b, S=c, PLACE=place, OBJECT=obj)
        else:
            corrupted = template.format(A=second, B=first, S=io, PLACE=place, OBJECT=obj)
        if _n_tokens(model, clean) == _n_tokens(model, corrupted):
            return clean, corrupted, " " + io, " " + s, _labels(model, clean, fields, abba)
    raise ValueError(
        f"Could not find names giving equal-length clean/corrupted prompts for template "
        f"{template!r} in {tries} tries; the tokenizer merges names with their neighbours."
    )


def _labels(model: Any, clean: str, fields: list[tuple[str, int, int]], abba: bool) -> list[str]:
    """IOI_POSITIONS labels per token of `clean`, from where its name fields landed."""
    roles = {"A": "IO" if abba else "S1", "B": "S1" if abba else "IO", "S": "S2"}
    spans = {roles[f]: (start, end) for f, start, end in fields if f in roles}
    labels = label_tokens(model, clean, spans, default="other", merged="last")
    labels[-1] = "END"
    return labels


def _check_templates(templates: tuple[str, ...]) -> None:
    """Each template needs {A}, {B}, {S} once each and may use {PLACE}, {OBJECT}."""
    if not templates:
        raise ValueError("templates is empty: give at least one, e.g. ioi.TEMPLATES[0].")
    for t in templates:
        fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        unknown = set(fields) - _FIELDS
        missing = [f for f in ("A", "B", "S") if fields.count(f) != 1]
        if unknown or missing:
            raise ValueError(
                f"IOI template {t!r}: needs {{A}}, {{B}} and {{S}} exactly once each and only "
                f"the fields {sorted(_FIELDS)} (unknown: {sorted(unknown)}, "
                f"not once: {missing}); the prompt must stop right before the IO name."
            )


def _n_tokens(model: Any, text: str, prepend_bos: bool = True) -> int:
    return int(model.to_tokens(text, prepend_bos=prepend_bos).shape[-1])

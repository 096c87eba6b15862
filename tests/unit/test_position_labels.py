"""Position labels on `PromptTask` without a tokenizer: validation, re-indexing, row alignment.

The tokenizer side (label_tokens, from_prompts, the generators' labels) is tested in
test_task_generators.py, where real tokenizers are built.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tl_nodeprune import PromptTask
from tl_nodeprune.tasks.labels import fill_template

NAMES = ("S1", "IO", "S2", "END", "other")


def _task(n: int = 6, seq: int = 5) -> PromptTask:
    """A task whose label at each token is recomputable from its clean token (id % 10), so a
    row taken from the wrong prompt, or a label column shifted, shows."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (n, seq), generator=g)
    labels = [[f"n{int(t) % 10}" for t in row] for row in clean]
    return PromptTask.from_tokens(
        clean,
        torch.randint(0, 50, (n, seq), generator=g),
        correct=torch.arange(n),
        incorrect=torch.arange(n) + 1,
        answer_pos=[1, 4, 2, 3, 0, 2][:n],
        positions=labels,
        position_names=tuple(f"n{d}" for d in range(10)),
    )


def _aligned(task: PromptTask) -> bool:
    """Every token's label is still the one its own clean token implies."""
    assert task.position_labels is not None
    return torch.equal(task.position_labels, task.clean % 10)


def test_from_tokens_names_in_order_of_first_appearance_unless_given() -> None:
    rows = [["other", "S1", "END"], ["other", "IO", "END"]]
    task = PromptTask.from_tokens(torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3,
                                  dtype=torch.long), [1, 2], [3, 4], positions=rows)  # fmt: skip
    assert task.position_names == ("other", "S1", "END", "IO")
    assert task.position_labels.tolist() == [[0, 1, 2], [0, 3, 2]]
    fixed = PromptTask.from_tokens(
        torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), [1, 2], [3, 4],
        positions=rows, position_names=("unused", *NAMES),
    )  # fmt: skip
    assert fixed.position_names == ("unused", *NAMES)
    assert fixed.position_labels.tolist() == [[5, 1, 4], [5, 2, 4]]
    with pytest.raises(ValueError, match=r"Prompt 1 has position label\(s\) \['IO'\] missing"):
        PromptTask.from_tokens(
            torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), [1, 2],
            [3, 4], positions=rows, position_names=("other", "S1", "END"),
        )  # fmt: skip


def test_from_tokens_labels_cover_the_row_or_the_prompt_up_to_its_answer() -> None:
    clean = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    args = (clean, clean, [1, 2], [3, 4])
    rows = [["a", "b", "END"], ["a", "b", "c", "END"]]
    task = PromptTask.from_tokens(*args, answer_pos=[2, 3], positions=rows)
    assert task.position_labels.tolist() == [[0, 1, 2, 0], [0, 1, 3, 2]]  # padding holds 0
    with pytest.raises(ValueError, match=r"Prompt 1 has 2 position labels but 4 tokens \[5, 6"):
        PromptTask.from_tokens(*args, answer_pos=[2, 3], positions=[["a"] * 3, ["a"] * 2])
    with pytest.raises(ValueError, match=r"Prompt 0 has 2 .* 4 or 3 tokens \[5, 6, 7, 0\]"):
        PromptTask.from_tokens(*args, answer_pos=[2, 3], positions=[["a"] * 2, ["a"] * 4])
    with pytest.raises(ValueError, match="positions has 1 rows for 2 prompts"):
        PromptTask.from_tokens(*args, positions=[["a"] * 4])
    with pytest.raises(ValueError, match="position_names was given without positions"):
        PromptTask.from_tokens(*args, position_names=NAMES)


def test_one_prompt_takes_a_flat_list_of_labels() -> None:
    task = PromptTask.from_tokens(torch.tensor([1, 2, 3]), torch.tensor([1, 4, 3]), 5, 6,
                                  positions=["other", "S2", "END"])  # fmt: skip
    assert task.position_labels.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(
    ("labels", "names", "message"),
    [
        ("ok", None, "go together"),
        (None, NAMES, "go together"),
        ("float", NAMES, "must be an integer tensor, got torch.float32"),
        ("short", NAMES, r"shape \(2, 2\) but clean has \(2, 3\)"),
        ("high", NAMES, r"holds 5, outside \[0, 5\)"),
        ("low", NAMES, r"holds -1, outside \[0, 5\)"),
        ("ok", ("S1", "S1", "END", "other", "IO"), r"repeated: \['S1'\]"),
        ("ok", ("S1", "", "S2", "END", "other"), r"not non-empty strings: \[''\]"),
        ("ok", list(NAMES), "must be a non-empty tuple"),
    ],
)
def test_post_init_refuses_inconsistent_labels(labels: str, names: object, message: str) -> None:
    base = PromptTask.from_tokens(torch.ones(2, 3, dtype=torch.long),
                                  torch.zeros(2, 3, dtype=torch.long), [1, 2], [3, 4])  # fmt: skip
    tensors = {
        "ok": torch.tensor([[4, 0, 3], [4, 1, 3]]),
        "float": torch.zeros(2, 3),
        "short": torch.zeros(2, 2, dtype=torch.long),
        "high": torch.tensor([[4, 0, 5], [4, 1, 3]]),
        "low": torch.tensor([[4, 0, 3], [-1, 1, 3]]),
    }
    with pytest.raises(ValueError, match=message):
        replace(base, position_labels=tensors.get(labels), position_names=names)
    replace(base, position_labels=tensors["ok"], position_names=NAMES)  # the valid case passes


def test_position_index_follows_names_in_another_order_or_with_more_names() -> None:
    rows = [["other", "IO", "S2", "END"], ["other", "S1", "IO", "END"]]
    ids = torch.arange(8).reshape(2, 4)
    task = PromptTask.from_tokens(ids, ids, [1, 2], [3, 4], positions=rows, position_names=NAMES)
    for names in (NAMES, ("END", "IO", "other", "S2", "S1"), ("x", "other", "END", "S2", "IO",
                                                              "y", "S1")):  # fmt: skip
        index = task.position_index(names)
        assert index.dtype == torch.long and index.shape == (2, 4)
        assert [[names[i] for i in row] for row in index.tolist()] == rows
    with pytest.raises(ValueError, match=r"label\(s\) \['S1'\] are not among .*\['IO', 'S2'"):
        task.position_index(("IO", "S2", "END", "other"))
    plain = PromptTask.from_tokens(ids, ids, [1, 2], [3, 4])
    with pytest.raises(ValueError, match="no position labels.*tasks.ioi.*from_prompts"):
        plain.position_index(NAMES)


def test_position_index_stays_on_the_labels_device() -> None:
    task = _task().to("meta")
    assert task.position_labels is not None and task.position_labels.device.type == "meta"
    assert task.position_index([f"n{d}" for d in range(9, -1, -1)]).device.type == "meta"


def test_subset_take_and_split_keep_labels_with_their_prompts() -> None:
    task = _task()
    assert _aligned(task)
    idx = torch.tensor([2, 0, 4])  # answers at 2, 1, 0
    part = task.subset(idx)
    assert part.position_labels.shape == part.clean.shape == (3, 3)  # trimmed like the prompts
    assert _aligned(part) and part.position_names == task.position_names
    taken = task.take(idx, 2)
    assert taken.position_labels.shape == (3, 2) and _aligned(taken)
    assert taken.position_names == task.position_names
    for half in task.split(0.5, seed=1):
        assert _aligned(half)
    plain = replace(task, position_labels=None, position_names=None)
    assert plain.subset(idx).position_labels is None and plain.take(idx, 3).position_names is None


def test_prompts_of_different_lengths_line_up_by_label() -> None:
    """The same label at different token indices maps to the same position index."""
    short = ["bos", "name", "verb", "END"]
    long = ["bos", "adverb", "adverb", "name", "verb", "END"]
    clean = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 5, 6, 2, 3, 4]])
    task = PromptTask.from_tokens(clean, clean, [7, 7], [8, 8], answer_pos=[3, 5],
                                  positions=[short, long])  # fmt: skip
    index = task.position_index(("END", "name", "verb", "bos", "adverb"))
    assert index[0, 1] == index[1, 3] == 1  # "name" at token 1 and at token 3
    assert index[0, task.answer_pos[0]] == index[1, task.answer_pos[1]] == 0  # END at 3 and 5


def test_fill_template_matches_format_and_says_where_fields_landed() -> None:
    template = "{{x}} The {noun} of {century}{start:02d}, to {century}!r {noun!r}"
    values = {"noun": "war", "century": 17, "start": 5}
    text, fields = fill_template(template, **values)
    assert text == template.format(**values)
    assert [f for f, _, _ in fields] == ["noun", "century", "start", "century", "noun"]
    assert [text[s:e] for _, s, e in fields] == ["war", "17", "05", "17", "'war'"]

from dataclasses import replace

import pytest
import torch

from tl_nodeprune import PromptTask


def _zeros(*shape):
    return torch.zeros(*shape, dtype=torch.long)


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.long)


def _task(n=6, seq=5, **kw):
    g = torch.Generator().manual_seed(0)
    return PromptTask.from_tokens(
        torch.randint(0, 20, (n, seq), generator=g),
        torch.randint(0, 20, (n, seq), generator=g),
        correct=torch.arange(n),
        incorrect=torch.arange(n) + 1,
        **kw,
    )


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="differ in shape"):
        PromptTask.from_tokens(_zeros(2, 5), _zeros(2, 4), [1, 2], [3, 4])


def test_same_correct_and_incorrect_is_refused():
    with pytest.raises(ValueError, match="Prompt 1: token 2 is both a correct and an incorrect"):
        PromptTask.from_tokens(_zeros(2, 3), _zeros(2, 3), [1, 2], [3, 2])
    with pytest.raises(ValueError, match="Prompt 0: token 5 is both"):
        PromptTask.from_tokens(_zeros(1, 3), _zeros(1, 3), [[1, 5]], [[5, -1]])


def test_a_single_prompt_with_scalar_answers():
    task = PromptTask.from_tokens(torch.tensor([1, 2, 3]), torch.tensor([1, 4, 3]), 5, 6)
    assert task.correct.tolist() == [[5]] and task.answer_pos.tolist() == [2]


def test_empty_task_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        PromptTask.from_tokens(_zeros(0, 3), _zeros(0, 3), [], [])


def test_answer_outside_vocabulary_is_named():
    task = PromptTask.from_tokens(_zeros(2, 3), _ones(2, 3), [1, 7], [2, 3])
    task.check_vocab(8)
    with pytest.raises(ValueError, match=r"correct holds token id 7 outside .*\[0, 5\)"):
        task.check_vocab(5)


def test_prompts_are_checked_against_the_input_vocab_answers_against_the_output_vocab():
    """A classifier head: 8 input tokens, 3 output classes; answers 1 and 2 are valid classes."""
    task = PromptTask.from_tokens(torch.full((2, 3), 7), _ones(2, 3), [1, 2], [0, 0])
    task.check_vocab(8, vocab_out=3)
    with pytest.raises(ValueError, match=r"clean holds token id 7 outside the model's input"):
        task.check_vocab(7, vocab_out=3)
    with pytest.raises(ValueError, match=r"correct holds token id 2 outside .* output .*\[0, 2\)"):
        task.check_vocab(8, vocab_out=2)
    big = PromptTask.from_tokens(_ones(1, 3), _ones(1, 3), [40], [41])
    big.check_vocab(8, vocab_out=50)  # output vocabulary larger than the input one


@pytest.mark.parametrize("field", ["clean", "correct", "answer_pos"])
def test_float_token_tensors_are_refused_not_truncated(field):
    args = {"clean": _ones(2, 3), "corrupted": _ones(2, 3), "correct": [1, 2], "incorrect": [3, 4]}
    args["answer_pos"] = [2, 2]
    args[field] = torch.as_tensor(args[field]).float() + 0.5
    with pytest.raises(ValueError, match=f"{field} must hold integer token ids.*float32"):
        PromptTask.from_tokens(**args)
    task = _task()
    with pytest.raises(ValueError, match="PromptTask.clean must be an integer tensor"):
        PromptTask(task.clean.float(), task.corrupted, task.correct, task.incorrect,
                   task.answer_pos)  # fmt: skip


def test_take_and_to_give_the_same_rows_as_subset():
    task = _task(n=6, seq=5, answer_pos=[1, 4, 2, 3, 0, 2])
    idx = torch.tensor([1, 3, 4])
    a, b = task.subset(idx), task.take(idx, 5).to("cpu")
    for name in ("clean", "corrupted", "correct", "incorrect", "answer_pos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_split_is_seeded_and_disjoint():
    task = _task(n=10)
    a_train, a_test = task.split(0.6, seed=3)
    b_train, _ = task.split(0.6, seed=3)
    c_train, _ = task.split(0.6, seed=4)
    assert len(a_train) == 6 and len(a_test) == 4
    assert torch.equal(a_train.correct, b_train.correct)
    assert not torch.equal(a_train.correct, c_train.correct)
    assert not set(a_train.correct.flatten().tolist()) & set(a_test.correct.flatten().tolist())


def test_a_split_by_groups_holds_out_whole_groups_and_no_more_than_it_needs():
    groups = tuple("aabbbccceeee")  # groups of 2, 3, 3 and 4 prompts
    task = replace(_task(n=12), groups=groups)
    splits = set()
    for seed in range(8):
        train, held = task.split_indices(0.75, seed=seed, by="groups")
        assert sorted([*train.tolist(), *held.tolist()]) == list(range(12))
        train_groups, held_groups = {groups[i] for i in train}, {groups[i] for i in held}
        assert train_groups and not train_groups & held_groups
        assert len(held) >= 3  # a quarter of the prompts
        # no group more than needed: dropping the largest held-out group leaves under a quarter
        largest = max(sum(g == h for g in groups) for h in held_groups)
        assert len(held) - largest < 3
        splits.add(tuple(held.tolist()))
    assert len(splits) > 1, "the seed chooses the groups"
    a, b = task.split(0.75, seed=5, by="groups"), task.split(0.75, seed=5, by="groups")
    assert a[1].groups == b[1].groups and set(a[0].groups).isdisjoint(a[1].groups)
    assert task.take(torch.tensor([4, 0]), 5, rows=[4, 0]).groups == ("b", "a")


def test_a_split_by_groups_needs_two_groups_and_says_how_to_get_them():
    with pytest.raises(ValueError, match="has no groups to hold out.*tasks.ioi"):
        _task(n=8).split(0.75, by="groups")
    with pytest.raises(ValueError, match="has one group, 'a'; split by='prompts'"):
        replace(_task(n=4), groups=("a",) * 4).split(0.5, by="groups")
    with pytest.raises(ValueError, match="groups has 3 entries; give one per prompt"):
        replace(_task(n=4), groups=("a", "b", "c"))


def test_scores_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    task = PromptTask.from_tokens(_zeros(1, 2), _zeros(1, 2), [1], [2])
    assert task.score(logits).item() == pytest.approx(1.0)
    sets = PromptTask.from_tokens(
        _zeros(1, 2), _zeros(1, 2), [[1, 2]], [[3, -1]], metric="prob_diff"
    )
    p = logits.softmax(-1)[0]
    assert sets.score(logits).item() == pytest.approx((p[1] + p[2] - p[3]).item())


def test_answer_logits_reads_each_examples_position():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    task = PromptTask.from_tokens(
        _zeros(2, 3), _zeros(2, 3), [0, 0], [1, 1], answer_pos=[2, 0]
    )
    assert torch.equal(task.answer_logits(logits), torch.stack([logits[0, 2], logits[1, 0]]))

import pytest
import torch

from tl_nodeprune import PromptTask


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
        PromptTask.from_tokens(torch.zeros(2, 5), torch.zeros(2, 4), [1, 2], [3, 4])


def test_same_correct_and_incorrect_is_refused():
    with pytest.raises(ValueError, match="Prompt 1: token 2 is both a correct and an incorrect"):
        PromptTask.from_tokens(torch.zeros(2, 3), torch.zeros(2, 3), [1, 2], [3, 2])
    with pytest.raises(ValueError, match="Prompt 0: token 5 is both"):
        PromptTask.from_tokens(torch.zeros(1, 3), torch.zeros(1, 3), [[1, 5]], [[5, -1]])


def test_a_single_prompt_with_scalar_answers():
    task = PromptTask.from_tokens(torch.tensor([1, 2, 3]), torch.tensor([1, 4, 3]), 5, 6)
    assert task.correct.tolist() == [[5]] and task.answer_pos.tolist() == [2]


def test_empty_task_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        PromptTask.from_tokens(torch.zeros(0, 3), torch.zeros(0, 3), [], [])


def test_answer_outside_vocabulary_is_named():
    task = PromptTask.from_tokens(torch.zeros(2, 3), torch.ones(2, 3), [1, 7], [2, 3])
    task.check_vocab(8)
    with pytest.raises(ValueError, match=r"correct holds token id 7 outside .*\[0, 5\)"):
        task.check_vocab(5)


def test_split_is_seeded_and_disjoint():
    task = _task(n=10)
    a_train, a_test = task.split(0.6, seed=3)
    b_train, _ = task.split(0.6, seed=3)
    c_train, _ = task.split(0.6, seed=4)
    assert len(a_train) == 6 and len(a_test) == 4
    assert torch.equal(a_train.correct, b_train.correct)
    assert not torch.equal(a_train.correct, c_train.correct)
    assert not set(a_train.correct.flatten().tolist()) & set(a_test.correct.flatten().tolist())


def test_scores_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    task = PromptTask.from_tokens(torch.zeros(1, 2), torch.zeros(1, 2), [1], [2])
    assert task.score(logits).item() == pytest.approx(1.0)
    sets = PromptTask.from_tokens(
        torch.zeros(1, 2), torch.zeros(1, 2), [[1, 2]], [[3, -1]], metric="prob_diff"
    )
    p = logits.softmax(-1)[0]
    assert sets.score(logits).item() == pytest.approx((p[1] + p[2] - p[3]).item())


def test_answer_logits_reads_each_examples_position():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    task = PromptTask.from_tokens(
        torch.zeros(2, 3), torch.zeros(2, 3), [0, 0], [1, 1], answer_pos=[2, 0]
    )
    assert torch.equal(task.answer_logits(logits), torch.stack([logits[0, 2], logits[1, 0]]))

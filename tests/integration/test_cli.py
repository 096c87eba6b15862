"""The command line: discover writes a circuit that evaluate reads back."""

import json

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.cli import main
from tl_nodeprune.planted import planted_problem

PLANTED = ["--model", "planted", "--task", "planted", "--n-prompts", "64"]


def test_discover_then_evaluate_on_the_planted_model(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["discover", *PLANTED, "--steps", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "head" in printed
    circuit = tnp.Circuit.load(out)
    truth = planted_problem("bridge-native", seed=0).circuit
    assert circuit.nodes == truth.nodes
    assert circuit.meta["held_out"]["faithfulness"] > 0.99

    assert main(["evaluate", str(out), *PLANTED]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kl"] < 1e-5 and report["n_prompts"] == 64


def test_bad_penalty_syntax_is_named():
    with pytest.raises(SystemExit, match="G=VALUE"):
        main(["discover", *PLANTED, "--penalty", "head:3"])


def test_discover_with_seeds_prints_the_spread_and_writes_one_circuit_per_seed(tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = ["discover", *PLANTED, "--steps", "100", "--out", str(out), "--seeds", "0", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seeds [0, 1]" in printed and "held_out_faithfulness" in printed
    truth = planted_problem("bridge-native", seed=0).circuit
    for seed in (0, 1):
        circuit = tnp.Circuit.load(tmp_path / f"c.seed{seed}.json")
        assert circuit.meta["seed"] == seed
        assert circuit.nodes == truth.nodes
    every = {line.split()[0]: int(line.split()[1]) for line in printed.splitlines()
             if line.split()[:1] in (["head"], ["neuron"])}  # fmt: skip
    assert every == {"head": 2, "neuron": 9}

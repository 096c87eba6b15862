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
    assert report["kl"] < 1e-5 and report["n_prompts"] == 32  # the held-out half


def test_bad_penalty_syntax_is_named():
    with pytest.raises(SystemExit, match="G=VALUE"):
        main(["discover", *PLANTED, "--penalty", "head:3"])

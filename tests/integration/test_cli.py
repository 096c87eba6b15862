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
    assert report["kl"] < 1e-5 and report["n_prompts"] == 13  # the held-out fifth: 64 - 51


def test_bad_penalty_syntax_is_named():
    with pytest.raises(SystemExit, match="G=VALUE"):
        main(["discover", *PLANTED, "--penalty", "head:3"])


def _no_model_loading(monkeypatch):
    """Fail the test if the CLI gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("tl_nodeprune.planted.planted_problem", refuse)
    monkeypatch.setattr("tl_nodeprune.models.load_model", refuse)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--penalty", "head=abc"], "'abc' is not a number"),
        (["--penalty", "layer=3"], "Unknown granularity 'layer'"),
        (["--granularities", "head", "--penalty", "neuron=1"], "names 'neuron'.*not gate"),
        (["--target-sparsity", "head=1.5"], r"target_sparsity\['head'\] must be in \[0, 1\)"),
    ],
)
def test_bad_options_are_named_before_the_model_loads(monkeypatch, options, message):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        main(["discover", *PLANTED, *options])


@pytest.mark.parametrize(
    "options",
    [["--steps", "0"], ["--steps", "x"], ["--lr", "-1"], ["--train-fraction", "1"],
     ["--n-prompts", "0"], ["--batch-size", "2.5"]],  # fmt: skip
)
def test_bad_numbers_are_refused_by_the_parser(monkeypatch, capsys, options):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["discover", *PLANTED, *options])
    assert exit_info.value.code == 2 and options[0] in capsys.readouterr().err


def test_device_is_honoured_for_planted(monkeypatch, tmp_path):
    import tl_nodeprune.planted as planted

    moved = []
    real = planted.planted_problem

    def spy(*args, **kwargs):
        problem = real(*args, **kwargs)
        original = problem.model.to
        problem.model.to = lambda device: moved.append(device) or original(device)
        return problem

    monkeypatch.setattr(planted, "planted_problem", spy)
    out = tmp_path / "c.json"
    main(["discover", *PLANTED, "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert moved == ["cpu"]


def test_evaluate_scores_the_held_out_prompts_with_the_circuits_own_ablation(tmp_path, capsys):
    problem = planted_problem("bridge-native", seed=0, n_prompts=64)
    circuit = problem.circuit
    circuit.meta.update(ablation="mean", seed=0, n_prompts=64, train_fraction=0.75)
    path = circuit.save(tmp_path / "c.json")
    assert main(["evaluate", str(path), *PLANTED[:4]]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ablation"] == "mean" and report["n_prompts"] == 16
    held_out = problem.task.split(0.75, seed=0)[1]
    expected = tnp.evaluate(problem.model, circuit, held_out, ablation="mean")
    assert report["metric_full"] == pytest.approx(expected.metric_full, abs=1e-6)
    assert main(["evaluate", str(path), *PLANTED[:4], "--all-prompts", "--ablation", "zero"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ablation"] == "zero" and report["n_prompts"] == 64


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

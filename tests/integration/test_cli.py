"""The command line: discover writes a circuit that evaluate reads back."""

import dataclasses
import json

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.cli import NOT_OPTIONS, discover_config, main
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
    assert "held_out_kl" in printed  # KL beside f, always
    truth = planted_problem("bridge-native", seed=0).circuit
    for seed in (0, 1):
        circuit = tnp.Circuit.load(tmp_path / f"c.seed{seed}.json")
        assert circuit.meta["seed"] == seed
        assert circuit.nodes == truth.nodes
    # both seeds found the truth: full agreement, every planted unit kept by every seed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
            if line.split()[:1] in (["head"], ["neuron"])}  # fmt: skip
    assert rows == {"head": ["1.0", "2", "2"], "neuron": ["1.0", "9", "9"]}


def test_batched_seeds_write_the_circuits_the_seeds_give_one_by_one(tmp_path):
    common = ["discover", *PLANTED, "--steps", "12", "--seeds", "0", "1"]
    assert main([*common, "--out", str(tmp_path / "one.json")]) == 0
    assert main([*common, "--out", str(tmp_path / "all.json"), "--batched-seeds"]) == 0
    for seed in (0, 1):
        alone = tnp.Circuit.load(tmp_path / f"one.seed{seed}.json")
        batched = tnp.Circuit.load(tmp_path / f"all.seed{seed}.json")
        assert batched.meta["seed"] == seed and batched.nodes == alone.nodes
        for g in alone.gates:
            assert torch.allclose(batched.gates[g], alone.gates[g], atol=1e-4), (seed, g)
    with pytest.raises(SystemExit, match="name them: --seeds 0 1 2"):
        main(["discover", *PLANTED, "--batched-seeds", "--out", str(tmp_path / "x.json")])


# Every PruneConfig field, written as a `discover` option, and the value it must set. Values
# differ from the defaults (and from each other where two fields share a type), so an option
# that is missing, or wired to the wrong field, changes the wrong entry of the config.
SETTINGS = {
    "steps": (["--steps", "7"], 7),
    "lr": (["--lr", "0.05"], 0.05),
    "batch_size": (["--batch-size", "3"], 3),
    "granularities": (["--granularities", "head", "neuron"], ("head", "neuron")),
    "ablation": (["--ablation", "mean"], "mean"),
    "objective": (["--objective", "logit_diff"], "logit_diff"),
    "penalty": (["--penalty", "head=4", "neuron=0.5"], {"head": 4.0, "neuron": 0.5}),
    "target_sparsity": (["--target-sparsity", "neuron=0.95"], {"neuron": 0.95}),
    "warmup_steps": (["--warmup-steps", "11"], 11),
    "lagrangian_lr": (["--lagrangian-lr", "0.03"], 0.03),
    "lagrangian_rho": (["--lagrangian-rho", "2.5"], 2.5),
    "init_log_alpha": (["--init-log-alpha", "1.5"], 1.5),
    "threshold": (["--threshold", "0.7"], 0.7),
    "seed": (["--seed", "4"], 4),
    "progress": (["--no-progress"], False),
    "log_every": (["--log-every", "9"], 9),
    "cache_bytes": (["--cache-bytes", "1024"], 1024),
    "checkpoint": (["--checkpoint", "false"], False),
    "checkpoint_budget_bytes": (["--checkpoint-budget-bytes", "4096"], 4096),
    "target_faithfulness": (["--target-faithfulness", "0.85"], 0.85),
    "validation_fraction": (["--validation-fraction", "0.4"], 0.4),
    "selection_measure": (["--selection-measure", "kl"], "kl"),
    "log_alpha_bounds": (["--log-alpha-bounds", "-6", "6"], (-6.0, 6.0)),
    "lr_final": (["--lr-final", "0.02"], 0.02),
    "target_kl": (["--target-kl", "0.3"], 0.3),
    "kl_lr": (["--kl-lr", "7.5"], 7.5),
    "faithfulness_lr": (["--faithfulness-lr", "4.5"], 4.5),
    "validate_every": (["--validate-every", "5"], 5),
    "validation_split": (["--validation-split", "groups"], "groups"),
    "gate_noise": (["--gate-noise", "example"], "example"),
    "certify": (["--certify"], True),
    "certify_from_full": (["--certify-from-full"], True),
    "certify_candidates": (["--certify-candidates", "12"], 12),
    "positions": (["--positions", "named"], "named"),
}


def test_every_config_field_but_the_gate_shape_has_a_setting_here():
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(tnp.PruneConfig)} - {
        "hard_concrete"
    }


@pytest.mark.parametrize("name", SETTINGS)
def test_each_option_sets_its_own_field_and_nothing_else(monkeypatch, name):
    _no_model_loading(monkeypatch)
    argv, value = SETTINGS[name]
    assert discover_config(argv) == dataclasses.replace(tnp.PruneConfig(), **{name: value})


def test_all_options_at_once_reach_the_config():
    argv = [word for option, _ in SETTINGS.values() for word in option]
    config = discover_config(argv)
    assert {name: getattr(config, name) for name in SETTINGS} == {
        name: value for name, (_, value) in SETTINGS.items()
    }


def test_none_turns_a_default_budget_off_and_is_refused_where_a_field_needs_a_number():
    config = discover_config(["--target-kl", "none", "--target-faithfulness", "None"])
    assert config.target_kl is None and config.target_faithfulness is None
    assert tnp.PruneConfig().target_kl is not None  # a default that needed turning off
    with pytest.raises(SystemExit):
        discover_config(["--lr", "none"])


def test_no_options_give_the_default_config():
    assert discover_config([]) == tnp.PruneConfig()


def test_objective_logit_diff_reaches_the_pruner(monkeypatch, tmp_path):
    seen = []
    real = tnp.NodePruner.__init__

    def spy(self, model, config=None):
        seen.append(config)
        real(self, model, config)

    monkeypatch.setattr(tnp.NodePruner, "__init__", spy)
    out = tmp_path / "c.json"
    main(["discover", *PLANTED, "--steps", "2", "--objective", "logit_diff", "--out", str(out)])
    assert [config.objective for config in seen] == ["logit_diff"]


@pytest.mark.parametrize(
    ("option", "word", "value"), [("--checkpoint", "true", True), ("--checkpoint", "auto", "auto")]
)
def test_words_map_to_their_values(option, word, value):
    assert discover_config([option, word]).checkpoint == value


@pytest.mark.parametrize(
    "options",
    [["--objective", "l2"], ["--checkpoint", "yes"], ["--selection-measure", "f1"],
     ["--threshold", "1"], ["--log-every", "0"], ["--init-log-alpha", "nan"],
     ["--granularities", "layer"], ["--target-faithfulness", "1.5"]],  # fmt: skip
)
def test_bad_values_of_generated_options_are_refused_by_the_parser(monkeypatch, capsys, options):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["discover", *PLANTED, *options])
    assert exit_info.value.code == 2 and options[0] in capsys.readouterr().err


def test_two_field_checks_are_named_before_the_model_loads(monkeypatch):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=r"lr_final must be None or in \(0, lr=0.2\]"):
        main(["discover", *PLANTED, "--lr-final", "0.5"])
    with pytest.raises(SystemExit, match="checkpoint_budget_bytes must be a positive int"):
        main(["discover", *PLANTED, "--checkpoint-budget-bytes", "0"])


def test_help_is_the_fields_own(capsys):
    with pytest.raises(SystemExit):
        main(["discover", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(tnp.PruneConfig):
        if f.name not in NOT_OPTIONS:
            assert " ".join(f.metadata["help"].split()[:6]) in shown, f.name


def test_the_task_registry_serves_the_cli_and_refuses_unknown_names():
    assert tnp.tasks.get("ioi") is tnp.tasks.ioi
    assert tnp.tasks.get("greater_than") is tnp.tasks.greater_than
    assert set(tnp.tasks.REGISTRY) == {"ioi", "ioi_independent", "greater_than",
                                       "greater_than_independent"}
    with pytest.raises(ValueError, match="Unknown task 'ioi2'; choose from ioi, ioi_independent"):
        tnp.tasks.get("ioi2")


def test_an_unknown_task_is_refused_before_the_model_loads(monkeypatch, capsys):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["discover", "--task", "ioi2"])
    assert exit_info.value.code == 2 and "greater_than" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--n-prompts", "2"], r"--n-prompts 2: .*no held-out prompt\. Ask for more prompts"),
     (["--n-prompts", "3"], r"--n-prompts 3: its 2 training prompts leave none to validate on"
                            r".*all of them: --target-kl none --target-faithfulness none\.$"),
     (["--n-prompts", "3", "--target-kl", "none", "--target-faithfulness", "none",
       "--certify"], r"leave none to validate on .*all of them: --no-certify\.$")],  # fmt: skip
)
def test_too_few_prompts_are_named_before_the_model_loads_with_the_way_out(
    monkeypatch, options, message
):
    _no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match=message):
        main(["discover", *PLANTED, *options])


def test_a_few_prompts_train_without_the_budgets(tmp_path):
    out = tmp_path / "few.json"
    off = ["--target-kl", "none", "--target-faithfulness", "none"]
    assert main(["discover", *PLANTED, "--n-prompts", "3", *off, "--out", str(out)]) == 0
    assert tnp.Circuit.load(out).meta["n_prompts"] == 3

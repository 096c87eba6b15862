"""The comparison study (issue 19): its script end to end, and the irrelevant-neurons count."""

import functools
import json
import math

import pandas as pd
import pytest
import torch

from bench import comparison_study
from tl_nodeprune.circuit import Circuit
from tl_nodeprune.cli import DEFAULT_TRAIN_FRACTION
from tl_nodeprune.curves import compare_methods
from tl_nodeprune.formats import read_mib, write_mib
from tl_nodeprune.irrelevant import irrelevant_neurons, neurons_needed, top_neurons
from tl_nodeprune.node_scores import NodeList, method_scores
from tl_nodeprune.planted import add_distractors, planted_problem
from tl_nodeprune.pruner import NodePruner, PruneConfig

from .test_node_scores import posed

STEPS = 30
COMPARED = ["cpr", "cmd", "n_f", "kl_at_n_f", "n_kl_0.3", "n_kl_0.1", "f_at_size", "kl_at_size"]


def test_the_study_writes_its_files_and_its_table_is_compare_methods_on_the_held_out_split(
    tmp_path,
):
    methods = ["node_pruning", "eap", "random"]
    truth = planted_problem("bridge-native", seed=0, n_prompts=64).circuit
    mib = write_mib(truth, tmp_path / "truth.mib.json")  # another tool's circuit, as a file
    files = comparison_study.main(["--model", "planted", "--seeds", "0", "--steps", str(STEPS),
                                   "--methods", *methods, "--out", str(tmp_path),
                                   "--mib", f"truth={mib}"])  # fmt: skip
    for kind in ("csv", "md", "html", "neurons_csv", "index", "png_curves",
                 "png_neurons per layer"):  # fmt: skip
        assert files[kind].exists() and files[kind].stat().st_size > 0, kind
    md = files["md"].read_text()
    assert "bench/comparison_study.py --model planted --seeds 0" in md.splitlines()[4]
    assert "| node_pruning |" in md and "## Irrelevant neurons" in md
    page = files["html"].read_text()
    assert page.count("Plotly.newPlot") == 2 and 'src="http' not in page  # inlined, offline
    table = pd.read_csv(files["csv"])

    # the same draw, answers, split and scores, made here directly
    torch.manual_seed(0)
    problem = planted_problem("bridge-native", seed=0, n_prompts=64)
    model, task = problem.model, comparison_study.posed(problem.model, problem.task)
    train, held = task.split(DEFAULT_TRAIN_FRACTION, seed=0)
    config = PruneConfig(seed=0, steps=STEPS, progress=False, **comparison_study.NODE_PRUNING)
    fit = NodePruner(model, config).fit(train)
    scores = {m: method_scores(model, train, m, result=fit if m == "node_pruning" else None)
              for m in methods}  # fmt: skip
    scores["mib:truth"] = method_scores(model, train, "edge_pruning", result=read_mib(mib, model))
    # our circuit went out as a MIB file, and reads back as the same nodes
    ours_mib = read_mib(next(tmp_path.glob("mib_*_seed0.json")), model)
    assert ours_mib.heads == fit.circuit.heads and ours_mib.mlp_blocks == fit.circuit.mlp_blocks
    for level in ("blocks_heads", "neurons"):
        direct = compare_methods(model, held, list(scores), level=level, scores=scores,
                                 refine=0.01)  # the study's default bisection  # fmt: skip
        ours = table[table.level == level].set_index("method").loc[list(scores)]
        for column in COMPARED:
            expected = pd.to_numeric(direct[column]).to_numpy(dtype=float)
            got = ours[column].to_numpy(dtype=float)
            assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), (level, column)
        assert (ours.at_size == direct.attrs["at_size"]).all()
    assert table.loc[table.level == "neurons", "n_f"].notna().all()


@functools.cache
def two_per_block():
    """A planted model whose MLP blocks hold 2 needed neurons each of 32, 2 weak distractor
    neurons and heads per layer besides, and node pruning's scores for it."""
    problem = planted_problem("bridge-native", seed=0, neurons_per_layer=2)
    problem = add_distractors(problem, 2, strength=0.01)
    task = posed(problem)
    return problem, task, method_scores(problem.model, task, "node_pruning")


def block_circuit(truth: Circuit, blocks: list[int]) -> Circuit:
    """The planted heads with whole MLP blocks `blocks` (a coarse circuit: no neuron gates)."""
    mlp = torch.zeros(truth.shape.units("mlp"))
    mlp[blocks] = 1.0
    gates = {"attn": truth.gates["attn"], "head": truth.gates["head"], "mlp": mlp}
    return Circuit(truth.shape, gates)


def test_node_pruning_needs_exactly_the_planted_neurons_of_the_coarse_circuits_blocks():
    problem, task, scores = two_per_block()
    coarse = block_circuit(problem.circuit, [0, 1, 2])
    found = neurons_needed(problem.model, task, coarse, scores, target_f=0.99)
    assert found.coarse_f >= 0.99 and found.target == 0.99
    assert found.needed == 6 and found.per_layer == (2, 2, 2)  # 2 of 32 in each block
    assert found.coarse_neurons == 96
    misses = found.measured[found.measured.k == 5].faithfulness
    assert len(misses) == 1 and misses.iloc[0] < 0.99, "one neuron fewer was measured and missed"
    table = irrelevant_neurons(problem.model, task, {"blocks": coarse}, scores, target_f=0.99)
    assert table.loc["blocks", "needed"] == 6
    assert table.loc["blocks", "irrelevant"] == pytest.approx(1 - 6 / 96)
    per_layer = table.attrs["per_layer"]
    assert per_layer.loc["blocks"].tolist() == [32, 32, 32]
    assert per_layer.loc["blocks: node pruning"].tolist() == [2, 2, 2]


def test_a_circuit_without_a_block_gets_no_neurons_there_even_when_they_score_best():
    problem, task, scores = two_per_block()
    coarse = block_circuit(problem.circuit, [1, 2])
    nodes = NodeList.from_model(problem.model)
    boosted = scores.copy()
    boosted[nodes.names_of("neuron")[:32]] = math.inf  # block 0's neurons rank first
    boosted["m1.n0"] = math.nan  # NaN ranks last inside the blocks
    kept = top_neurons(coarse, nodes, boosted, 64).kept("neuron")
    assert kept[0].sum() == 0 and kept[1:].sum() == 64
    assert not top_neurons(coarse, nodes, boosted, 63).kept("neuron")[1, 0]
    found = neurons_needed(problem.model, task, coarse, scores, target_f=0.99)
    # the target is the coarse circuit's own f (0.353 without block 0's planted neurons); the
    # distractors' tiny effects then count too (7 neurons measured), the planted 4 first
    assert found.target == found.coarse_f < 0.99 and found.per_layer[0] == 0
    assert 4 <= found.needed <= 8
    kept = top_neurons(coarse, nodes, scores, found.needed).kept("neuron")
    assert kept[problem.circuit.kept("neuron") & coarse.kept("mlp")[:, None]].all()
    with pytest.raises(ValueError, match="0..64"):
        top_neurons(coarse, nodes, scores, 65)


def test_a_rerun_with_the_cache_scores_nothing_again_and_writes_the_same_table(
    tmp_path, monkeypatch
):
    """--cache: the second run reads every method's scores (node and edge pruning's circuits
    included) instead of computing them, and its table equals the first; other settings miss."""
    argv = ["--model", "planted", "--seeds", "0", "--steps", str(STEPS), "--edge-steps", "20",
            "--methods", "node_pruning", "eap", "edge_pruning", "random", "--no-png",
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    first = comparison_study.main([*argv, "--out", str(tmp_path / "a")])

    def never(*args, **kwargs):
        raise AssertionError("scored again despite the cache")

    for name in ("method_scores", "edge_pruning"):
        monkeypatch.setattr(comparison_study, name, never)
    read_circuit = comparison_study.method_edge_scores  # edge pruning's edges: its circuit's

    def only_from_a_circuit(*args, **kwargs):
        return read_circuit(*args, **kwargs) if kwargs.get("result") is not None else never()

    monkeypatch.setattr(comparison_study, "method_edge_scores", only_from_a_circuit)
    monkeypatch.setattr(NodePruner, "fit", never)
    second = comparison_study.main([*argv, "--out", str(tmp_path / "b")])
    pd.testing.assert_frame_equal(pd.read_csv(first["csv"]), pd.read_csv(second["csv"]))
    assert (tmp_path / "a" / "mib_planted_seed0.json").read_text() == (
        tmp_path / "b" / "mib_planted_seed0.json"
    ).read_text()
    with pytest.raises(AssertionError, match="despite the cache"):  # other settings: no reuse
        comparison_study.main([*argv, "--steps", str(STEPS + 1), "--out", str(tmp_path / "c")])
    # a changed default of node pruning's config is a miss too, not a stale circuit reused
    monkeypatch.setattr(comparison_study, "PruneConfig", functools.partial(PruneConfig, lr=0.3))
    with pytest.raises(AssertionError, match="despite the cache"):
        comparison_study.main([*argv, "--out", str(tmp_path / "d")])


def test_patching_prompts_scores_activation_patching_alone_on_the_first_training_prompts(
    tmp_path, monkeypatch
):
    """--patching-prompts k: activation patching's scores are those of the first k training
    prompts, the other methods' are untouched, and only its cache entry depends on k."""
    argv = ["--model", "planted", "--seeds", "0", "--methods", "random", "activation_patching",
            "--no-edges-ablated", "--cache", str(tmp_path)]  # fmt: skip
    args = comparison_study.parse([*argv, "--patching-prompts", "12"])
    model, train, _ = comparison_study.load(args, 0)
    scored = comparison_study.score_methods(model, train, args, 0)
    first = train.subset(torch.arange(12))
    expected = method_scores(model, first, "activation_patching")
    pd.testing.assert_series_equal(scored.scores["activation_patching"], expected,
                                   check_exact=False, rtol=1e-5, atol=1e-7)  # fmt: skip
    everything = method_scores(model, train, "activation_patching")
    assert not torch.allclose(torch.tensor(everything.values), torch.tensor(expected.values))
    assert scored.scores["activation_patching"].attrs["prompts"] == 12
    assert scored.scores["random"].attrs["prompts"] == len(train)

    calls = []
    real = comparison_study.method_scores
    monkeypatch.setattr(comparison_study, "method_scores",
                        lambda m, t, method, **kw: calls.append((method, len(t))) or
                        real(m, t, method, **kw))  # fmt: skip
    other = comparison_study.parse([*argv, "--patching-prompts", "20"])
    comparison_study.score_methods(model, train, other, 0)
    assert calls == [("activation_patching", 20)]  # random read back from the cache


def test_a_seed_measured_earlier_is_read_back_exactly_and_only_under_the_same_settings(
    tmp_path, monkeypatch
):
    """The seed files in --out let a study that outlives one machine go on: a rerun reads each
    seed's measurements instead of measuring it, and writes byte-identical tables; a seed
    measured under other settings (here other fractions) is measured again."""
    argv = ["--model", "planted", "--seeds", "0", "--steps", str(STEPS), "--edge-steps", "10",
            "--methods", "node_pruning", "eap", "edge_pruning", "random", "--no-png",
            "--out", str(tmp_path)]  # fmt: skip
    first = comparison_study.main(argv)
    assert (tmp_path / "comparison_planted_seed0.json").exists()
    written = {k: first[k].read_bytes() for k in ("csv", "curves_csv", "neurons_csv")}
    layers = (tmp_path / "comparison_planted_neurons_per_layer.csv").read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(comparison_study, "run_seed", never)
    second = comparison_study.main(argv)
    assert {k: second[k].read_bytes() for k in written} == written
    assert (tmp_path / "comparison_planted_neurons_per_layer.csv").read_bytes() == layers
    with pytest.raises(AssertionError, match="measured again"):
        comparison_study.main([*argv, "--fractions", "0.1", "0.5", "1"])
    with pytest.raises(AssertionError, match="measured again"):
        comparison_study.main([*argv, "--no-reuse-seeds"])


def test_a_seed_file_from_the_earlier_irrelevant_search_gets_its_neurons_alone_recomputed(
    tmp_path, monkeypatch
):
    """A seed file measured before the irrelevant-neurons search changed keeps its rows and
    curves; its irrelevant neurons are recomputed from the cached scores (nothing scored or
    trained again) and the file is rewritten under the current settings. Without the cache
    there is nothing to recompute them from: its rows and curves are used, and its stale
    neurons are left out of the tables rather than reported."""
    argv = ["--model", "planted", "--seeds", "0", "--steps", str(STEPS), "--edge-steps", "10",
            "--methods", "node_pruning", "eap", "edge_pruning", "random", "--no-png",
            "--no-edges-ablated", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    first = comparison_study.main(argv)
    seed_file = tmp_path / "out" / "comparison_planted_seed0.json"
    current = json.loads(seed_file.read_text())
    written = {k: first[k].read_bytes() for k in ("csv", "curves_csv", "neurons_csv")}
    assert len(pd.read_csv(first["neurons_csv"])) > 0

    earlier = json.loads(seed_file.read_text())
    del earlier["settings"]["curves"]["irrelevant_search"]
    neurons = earlier["neurons"]
    needed = neurons["columns"].index("needed")
    for row in neurons["data"]:  # what the earlier search reported: every neuron needed
        row[needed] = 10**6
    seed_file.write_text(json.dumps(earlier))

    def never(*args, **kwargs):
        raise AssertionError("measured again")

    for name in ("method_scores", "edge_pruning", "run_seed"):
        monkeypatch.setattr(comparison_study, name, never)
    monkeypatch.setattr(NodePruner, "fit", never)
    second = comparison_study.main(argv)
    assert {k: second[k].read_bytes() for k in written} == written
    assert json.loads(seed_file.read_text()) == current

    seed_file.write_text(json.dumps(earlier))
    third = comparison_study.main([*argv[:-2], "--cache", str(tmp_path / "empty")])
    assert third["csv"].read_bytes() == written["csv"]
    assert "Irrelevant neurons" not in third["md"].read_text()
    assert not first["neurons_csv"].exists()  # not the earlier run's, as if this one's
    assert json.loads(seed_file.read_text()) == earlier  # left to be refreshed with the cache

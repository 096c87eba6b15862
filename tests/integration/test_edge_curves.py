"""Edge curves (issue 19): edge methods measured with the edges outside their top edges ablated."""

import pandas as pd
import pytest
import torch

from bench import comparison_study
from bench.comparison_study import posed
from tl_nodeprune.baselines.edge_eval import EdgeEvaluator, edge_logits, evaluate_edges
from tl_nodeprune.baselines.graph import EdgeGraph
from tl_nodeprune.circuit import Circuit
from tl_nodeprune.curves import size_for
from tl_nodeprune.edge_curves import (
    compare_edge_methods,
    edge_curve,
    edges_within,
    method_edge_scores,
    touched_counts,
)
from tl_nodeprune.evaluation import Evaluation
from tl_nodeprune.metrics import cmd, cpr
from tl_nodeprune.objectives import answer_logits
from tl_nodeprune.planted import PlantedProblem, planted_problem
from tl_nodeprune.sites import ModelShape

from ..conftest import fails_cleanly, hook_count

HAND = ["input->a1.h2<q>", "a1.h2->m2", "m0->a2.h3<k>"]  # ranked in this order


@pytest.fixture(scope="module")
def native():
    # 3 layers x 4 heads, d_mlp 32: planted heads in layers 1 and 2, neurons in every MLP;
    # answered by the model's own top tokens (random answers make f erratic, often >> 1)
    problem = planted_problem("bridge-native", seed=0, n_prompts=16)
    return PlantedProblem(problem.model, problem.circuit, posed(problem.model, problem.task))


def live_edges(problem) -> list[str]:
    """Edges between planted nodes (and the input and logits): every other edge is silent."""
    planted = problem.circuit
    live = {f"a{la}.h{h}" for la, h in planted.heads} | {f"m{la}" for la in planted.mlp_blocks}
    graph = EdgeGraph.from_model(problem.model)
    return [name for name in graph.edge_names
            if name.split("->")[0] in live | {"input"}
            and name.split("->")[1].split("<")[0] in live | {"logits"}]  # fmt: skip


def scores_first(graph: EdgeGraph, edges: list[str]) -> pd.Series:
    """Scores len(edges), ..., 1 on `edges` in order, 0 on every other edge."""
    values = pd.Series(0.0, index=list(graph.edge_names))
    values[edges] = range(len(edges), 0, -1)
    return values


def test_one_evaluator_gives_evaluate_edges_numbers_for_three_circuits(native):
    model, task = native.model, native.task
    graph = EdgeGraph.from_model(model)
    circuits = [
        Circuit.from_edges(graph.shape, live_edges(native)),
        Circuit.from_edges(graph.shape, live_edges(native)[::2]),
        Circuit.from_edges(graph.shape, graph.edge_names[::3]),
    ]
    evaluator = EdgeEvaluator(model, task)  # one cache for all three
    results = [evaluator(c) for c in circuits]
    for circuit, got in zip(circuits, results, strict=True):
        assert got == evaluate_edges(model, circuit, task)  # a fresh reference run each
    assert len({round(r.faithfulness, 2) for r in results}) == 3  # measured 1.0, 0.43, 0.18
    # and the formula by hand, from logits made without any cache
    mask = torch.zeros(graph.n_edges)
    mask[[graph.edge_index[e] for e in HAND]] = 1.0
    by_hand = Evaluation.from_logits(
        task, answer_logits(model, task), edge_logits(model, graph, task, mask),
        edge_logits(model, graph, task, torch.zeros(graph.n_edges)), "corrupted (edges)",
    )  # fmt: skip
    assert evaluator(mask).faithfulness == pytest.approx(by_hand.faithfulness, abs=1e-6)
    assert evaluator(mask).kl == pytest.approx(by_hand.kl, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        evaluator(torch.ones(3))
    assert hook_count(model) == 0


def test_the_planted_edges_ranked_first_recover_the_model_and_random_scores_do_not(native):
    model, task = native.model, native.task
    graph = EdgeGraph.from_model(model)
    live = live_edges(native)
    x = len(live) / graph.n_edges
    evaluator = EdgeEvaluator(model, task)
    planted = edge_curve(model, task, scores_first(graph, live), (0.0, x, 1.0),
                         evaluator=evaluator)  # fmt: skip
    assert planted.n_edges.tolist() == [0, len(live), graph.n_edges]
    assert planted.faithfulness.iloc[1] >= 0.99
    # the live edges touch exactly the planted nodes: 2 heads, 3 MLP blocks of 32 neurons
    assert planted.iloc[1][["heads", "mlp", "neurons", "n_nodes"]].tolist() == [2, 3, 96, 5]
    assert size_for(planted, target_f=0.99) == 5
    gen = torch.Generator().manual_seed(0)
    random = edge_curve(model, task, torch.rand(graph.n_edges, generator=gen), (0.0, x, 1.0),
                        evaluator=evaluator)  # fmt: skip
    assert random.faithfulness.iloc[1] < 0.99
    # CPR and CMD on the curve f = (0, 1, 1) at x = (0, x, 1): by hand, 1 - x/2 and x/2
    assert planted.attrs["cpr"] == pytest.approx(1 - x / 2, abs=2e-3)
    assert planted.attrs["cmd"] == pytest.approx(x / 2, abs=2e-3)
    for frame in (planted, random):
        assert frame.attrs["cpr"] == cpr(frame.fraction, frame.faithfulness)
        assert frame.attrs["cmd"] == cmd(frame.fraction, frame.faithfulness)


def test_nodes_touched_by_a_hand_made_three_edge_set(native):
    graph = EdgeGraph.from_model(native.model)
    scores = scores_first(graph, HAND)
    order = torch.sort(torch.tensor(scores.to_numpy()), descending=True, stable=True).indices
    counts = touched_counts(graph, order)
    # input->a1.h2<q>: a1.h2; a1.h2->m2: + m2; m0->a2.h3<k>: + m0 and a2.h3
    assert counts["head"][:4].tolist() == [0, 1, 1, 2]
    assert counts["mlp"][:4].tolist() == [0, 0, 1, 2]
    # then the zero-scored edges in graph order: the first, input->a0.h0<q>, adds a0.h0
    assert counts["head"][4].item() == 3
    assert [edges_within(graph, scores, n, "blocks_heads") for n in (0, 1, 2, 3, 4)] == [
        0, 1, 2, 2, 3]  # fmt: skip
    assert edges_within(graph, scores, 2 + 2 * 32, "neurons") == 3
    # under grouped-query attention a <k> reader is a key/value head: it touches no query head
    gqa = EdgeGraph(ModelShape("gqa", 2, 4, 8, 16, 10, 32, n_key_value_heads=2))
    first = gqa.edge_index["m0->a1.h1<k>"]
    order = torch.cat([torch.tensor([first]), torch.arange(first),
                       torch.arange(first + 1, gqa.n_edges)])  # fmt: skip
    gqa_counts = touched_counts(gqa, order)
    assert (gqa_counts["head"][1].item(), gqa_counts["mlp"][1].item()) == (0, 1)


def test_compare_edge_methods_sizes_in_nodes_and_reuses_a_curve_across_levels(
    native, monkeypatch
):
    model, task = native.model, native.task
    graph = EdgeGraph.from_model(model)
    live = live_edges(native)
    scores = {"planted": scores_first(graph, live)}
    fractions = (0.0, len(live) / graph.n_edges, 1.0)
    evaluator = EdgeEvaluator(model, task)
    blocks = compare_edge_methods(model, task, scores, fractions, at_size=5, target_f=0.99,
                                  evaluator=evaluator)  # fmt: skip
    row = blocks.loc["planted (edges ablated)"]
    assert row.n_f == 5 and row["n_kl_0.1"] == 5
    assert row.f_at_size >= 0.99  # the live edges touch 5 nodes; one more edge would touch 6
    calls = []
    monkeypatch.setattr(evaluator, "logits", lambda mask: calls.append(mask))
    neurons = compare_edge_methods(model, task, scores, fractions, "neurons", target_f=0.99,
                                   evaluator=evaluator, curves=blocks.attrs["curves"])  # fmt: skip
    assert calls == [] and neurons.loc["planted (edges ablated)", "n_f"] == 2 + 3 * 32
    assert neurons.loc["planted (edges ablated)", "cpr"] == row.cpr


def test_kl_at_n_f_is_the_point_that_reached_the_target_among_those_touching_n_f_nodes(native):
    model, task = native.model, native.task
    graph = EdgeGraph.from_model(model)
    live = live_edges(native)
    # the planted nodes' edges into the logits first: the same 5 nodes touched, but with
    # their inputs ablated they write their corrupted outputs (f 0), until every live edge is in
    outs = [e for e in live if e.endswith("->logits") and not e.startswith("input")]
    ranked = scores_first(graph, outs + [e for e in live if e not in outs])
    fractions = (len(outs) / graph.n_edges, len(live) / graph.n_edges)
    table = compare_edge_methods(model, task, {"m": ranked}, fractions, target_f=0.99,
                                 evaluator=EdgeEvaluator(model, task))  # fmt: skip
    c = table.attrs["curves"]["m"]
    assert c.n_nodes.tolist() == [5, 5] and c.kl.iloc[0] > 1  # measured 6.04
    assert table.loc["m (edges ablated)", "n_f"] == 5
    assert table.loc["m (edges ablated)", "kl_at_n_f"] == pytest.approx(0.0, abs=1e-5)


def test_edge_pruning_scores_are_its_circuits_log_alpha_and_eap_ranks_by_magnitude(native):
    model, task = native.model, native.task
    graph = EdgeGraph.from_model(model)
    log_alpha = {name: float(i % 5) - 2 for i, name in enumerate(graph.edge_names)}
    circuit = Circuit.from_edges(graph.shape, HAND, edge_scores=log_alpha)
    scores = method_edge_scores(model, task, "edge_pruning", result=circuit)
    assert scores.tolist() == list(log_alpha.values())  # signed: -2 ranks below 2
    eap = method_edge_scores(model, task, "eap")
    assert (eap >= 0).all() and eap.max() > 0 and eap.attrs["ranking"] == "|attribution|"


def test_no_hooks_or_changed_settings_after_an_injected_failure():
    problem = planted_problem("bridge-native", seed=1, n_prompts=8)
    model, task = problem.model, problem.task
    scores = torch.rand(EdgeGraph.from_model(model).n_edges)
    fails_cleanly(model, lambda: edge_curve(model, task, scores, (0.5,)), fail_at=1)
    evaluator = EdgeEvaluator(model, task)  # built: the failure now hits a curve's point
    fails_cleanly(model, lambda: edge_curve(model, task, scores, (0.5,), evaluator=evaluator),
                  fail_at=1)  # fmt: skip


def test_the_study_adds_edges_ablated_rows_beside_the_node_projected_ones(tmp_path):
    files = comparison_study.main(["--model", "planted", "--seeds", "0", "--steps", "10",
                                   "--methods", "node_pruning", "eap", "--no-png",
                                   "--out", str(tmp_path)])  # fmt: skip
    table = pd.read_csv(files["csv"])
    for level in ("blocks_heads", "neurons"):
        part = table[table.level == level].set_index("method")
        assert part.loc["eap", "ablated"] == "nodes"
        assert part.loc["eap (edges ablated)", "ablated"] == "edges"
        assert part.loc["eap (edges ablated)", "cpr"] != part.loc["eap", "cpr"]
    blocks = table[table.level == "blocks_heads"].set_index("method")
    neurons = table[table.level == "neurons"].set_index("method")
    # one measured edge curve, counted at both levels
    assert blocks.loc["eap (edges ablated)", "cpr"] == neurons.loc["eap (edges ablated)", "cpr"]
    assert "Rows '<method> (edges ablated)'" in files["md"].read_text()

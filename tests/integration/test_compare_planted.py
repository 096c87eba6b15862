"""compare, metrics, compare_circuits and sweeps on a planted model, where the truth is known."""

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.planted import available_flavours, planted_problem
from tl_nodeprune.sweeps import granularity_sweep

from ..conftest import NO_BUDGETS, hook_count


@pytest.fixture(scope="module")
def problem():
    # seed 0: 3 layers x 4 heads; one head planted in layers 1 and 2, three neurons per layer
    return planted_problem(available_flavours()[0], seed=0)


def _moved(truth: tnp.Circuit) -> tnp.Circuit:
    """The planted circuit with its layer-1 head removed and one silent layer-2 head added."""
    head = truth.gates["head"].clone()
    (l1,) = head[1].nonzero().flatten().tolist()
    (l2,) = head[2].nonzero().flatten().tolist()
    head[1, l1] = 0.0
    head[2, (l2 + 1) % 4] = 1.0
    gates = {**truth.gates, "head": head, "attn": head.amax(1)}
    return tnp.Circuit(truth.shape, gates)


def test_compare_gives_one_for_the_planted_circuit_and_hand_numbers_when_moved(problem):
    truth = problem.circuit
    same = tnp.compare(truth, truth).scores
    assert set(same.index) == {"attn", "mlp", "head", "neuron"}
    assert (same.precision == 1).all() and (same.recall == 1).all()
    moved = tnp.compare(_moved(truth), truth).scores
    # heads: kept {2.a, 2.b}, truth {1.x, 2.a}: tp 1, fp 1, fn 1
    assert tuple(moved.loc["head", ["tp", "fp", "fn"]]) == (1, 1, 1)
    assert moved.loc["head", "precision"] == moved.loc["head", "recall"] == 0.5
    # attention blocks: kept {2}, truth {1, 2}
    assert moved.loc["attn", "precision"] == 1.0 and moved.loc["attn", "recall"] == 0.5
    assert moved.loc["attn", "f1"] == pytest.approx(2 / 3)
    assert moved.loc["neuron", "f1"] == 1.0


def test_compare_circuits_table_holds_evaluation_sizes_and_hand_jaccards(problem):
    truth = problem.circuit
    (h1,) = truth.gates["head"][1].nonzero().flatten().tolist()
    edge = tnp.Circuit.from_edges(truth.shape, [f"input->a1.h{h1}<q>", f"a1.h{h1}->logits"])
    before = hook_count(problem.model)
    table = tnp.compare_circuits(
        {"planted": truth, "full": tnp.Circuit.full(truth.shape), "edge": edge},
        problem.model,
        problem.task,
    )
    assert hook_count(problem.model) == before
    assert table.loc["planted", "faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert table.loc["full", "faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["full", "kl"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["planted", "head"] == 2 and table.loc["full", "neuron"] == 3 * 32
    assert table.loc["edge", "edges"] == 2 and table["edges"].isna().sum() == 2
    assert table.loc["planted", "J_head[full]"] == pytest.approx(2 / 12)
    assert table.loc["planted", "J_neuron[full]"] == pytest.approx(9 / 96)
    assert table.loc["planted", "J_head[edge]"] == pytest.approx(1 / 2)
    assert table.loc["edge", "J_mlp[full]"] == 0.0  # the edge circuit keeps no MLP
    expected = tnp.evaluate(problem.model, truth, problem.task)
    assert table.loc["planted", "kl"] == pytest.approx(expected.kl, abs=1e-6)


def test_faithfulness_curve_completeness_and_minimality_on_the_planted_circuit(problem):
    truth, model, task = problem.circuit, problem.model, problem.task
    # 2 planted heads + 3 MLP blocks rank first among 12 heads + 3 MLPs
    curve = tnp.faithfulness_curve(model, task, truth, fractions=(0.0, 5 / 15, 1.0))
    assert curve.n_nodes.tolist() == [0, 5, 15]
    assert curve.faithfulness.tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-4)
    assert tnp.completeness(model, task, truth) == pytest.approx(0.0, abs=1e-4)
    head = truth.gates["head"].clone()
    (l2,) = head[2].nonzero().flatten().tolist()
    silent = (2, (l2 + 1) % 4)
    head[silent] = 1.0
    padded = tnp.Circuit(truth.shape, {**truth.gates, "head": head})
    drops = tnp.minimality(model, task, padded).set_index("node")["drop"]
    assert len(drops) == 2 + 3 + 3  # kept blocks (2 attn, 3 MLP) and 3 heads
    assert drops[f"a{silent[0]}.h{silent[1]}"] == pytest.approx(0.0, abs=1e-5)
    planted = [f"a{layer}.h{h}" for layer, h in truth.heads]
    assert (drops[planted].abs() > 1e-3).all()


def test_sweep_circuits_shrink_as_the_target_sparsity_grows(problem):
    # The default budgets are off: with them each circuit is the smallest meeting them on the
    # validation prompts, whatever the target sparsity, and the sweep is what is tested here.
    config = tnp.PruneConfig(steps=60, progress=False, **NO_BUDGETS)
    result = tnp.sweep(problem.model, problem.task, config=config, targets=[0.1, 0.95])
    frame = result.frame
    assert frame.target_sparsity.tolist() == [0.1, 0.95]
    for g in ("attn", "mlp", "head", "neuron"):
        assert frame[g].iloc[1] <= frame[g].iloc[0], g
    assert frame[["attn", "mlp", "head", "neuron"]].iloc[1].sum() < (
        frame[["attn", "mlp", "head", "neuron"]].iloc[0].sum()
    )
    assert len(result.circuits) == 2 and (frame.seconds > 0).all()
    with pytest.raises(ValueError, match="exactly one"):
        tnp.sweep(problem.model, problem.task, prices=[1.0], targets=[0.5])


def test_granularity_sweep_counts_heads_a_block_circuit_keeps(problem):
    config = tnp.PruneConfig(steps=40, progress=False)
    result = granularity_sweep(
        problem.model, problem.task, config=config, sets=[("attn", "mlp"), ("attn", "head")]
    )
    frame = result.frame.set_index("granularities")
    blocks = result.circuits[0]
    # a blocks-only circuit keeps every head and neuron of its kept blocks
    assert frame.loc["attn+mlp", "head"] == 4 * len(blocks.attn_blocks)
    assert frame.loc["attn+mlp", "neuron"] == 32 * len(blocks.mlp_blocks)
    assert "neuron" not in result.circuits[1].gates
    assert torch.isfinite(torch.tensor(frame.faithfulness.tolist())).all()

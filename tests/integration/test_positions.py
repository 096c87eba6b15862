"""Position-aware circuits (issue 21): gates per (position, node), checked against ground truth.

The masks are checked against an independent implementation (a loop over tokens that patches
each closed node at each closed position by hand); discovery against compiled models whose
every node works at one known position.
"""

from __future__ import annotations

import pytest
import torch

from tl_nodeprune.ablation import Ablation, site_names
from tl_nodeprune.circuit import Circuit
from tl_nodeprune.compiled import FLAVOURS, compiled_problem
from tl_nodeprune.evaluation import circuit_logits, evaluate
from tl_nodeprune.granularities import SPECS
from tl_nodeprune.planted import available_flavours, tiny_model
from tl_nodeprune.positions import PositionAxis
from tl_nodeprune.pruner import NodePruner, PruneConfig
from tl_nodeprune.sites import ModelShape
from tl_nodeprune.tasks.base import PromptTask

from ..conftest import NO_BUDGETS, hook_count

GRANS = ("attn", "mlp", "head", "neuron")
SEQ = 6


def _task(d_vocab: int = 64, n: int = 5, seed: int = 0) -> PromptTask:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(d_vocab, (n, SEQ), generator=gen)
    corrupted = torch.randint(d_vocab, (n, SEQ), generator=gen)
    return PromptTask.from_tokens(clean, corrupted, [1] * n, [2] * n)


def _by_hand(model, circuit: Circuit, task: PromptTask, where=None) -> torch.Tensor:
    """Answer logits with each node closed at each closed position patched one token at a time
    from the corrupted run (no site_masks, no gathering): the reference for the masks.

    `where[i][t]` is the position (index into the circuit's) of token t of prompt i; default:
    token t is position t.
    """
    _, cache = model.run_with_cache(task.corrupted)
    n, seq = task.clean.shape
    where = where or [list(range(seq))] * n
    hooks = []
    for g in circuit.granularities:
        s = SPECS[g]
        for layer in range(circuit.shape.n_layers):
            name = s.hook_name(layer)

            def patch(x, hook, g=g, layer=layer, name=name):
                x = x.clone()
                for i in range(x.shape[0]):
                    for t in range(x.shape[1]):
                        # (units...): this node closed at this token's position?
                        closed = circuit.gates[g][where[i][t], layer] <= circuit.threshold
                        if closed.dim() == 0:  # a block: the whole output
                            if closed.item():
                                x[i, t] = cache[name][i, t]
                        else:  # the units lead the activation's axes
                            x[i, t, closed] = cache[name][i, t, closed]
                return x

            hooks.append((name, patch))
    with torch.no_grad():
        logits = model.run_with_hooks(task.clean, fwd_hooks=hooks)
    return logits[torch.arange(len(task)), task.answer_pos]


def _random_circuit(shape: ModelShape, seed: int, p_open: float) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    axis = PositionAxis("absolute", tuple(str(i) for i in range(SEQ)))
    gates = {g: (torch.rand((SEQ, *shape.units(g)), generator=gen) < p_open).float()
             for g in GRANS}  # fmt: skip
    return Circuit(shape, gates, positions=axis)


@pytest.mark.parametrize("flavour", available_flavours())
def test_masks_close_each_node_only_where_its_position_gate_is_closed(flavour: str) -> None:
    model = tiny_model(flavour, n_layers=2)
    shape, task = ModelShape.from_model(model), _task()
    ablation = Ablation(model, task, site_names(shape, GRANS))
    full = circuit_logits(model, Circuit.full(shape), task, ablation)
    for seed, p_open in ((0, 0.5), (1, 0.8), (2, 0.2)):
        circuit = _random_circuit(shape, seed, p_open)
        got = circuit_logits(model, circuit, task, ablation)
        assert torch.allclose(got, _by_hand(model, circuit, task), atol=1e-5)
        assert not torch.allclose(got, full, atol=1e-3)  # the circuit changes something
    every = _random_circuit(shape, 0, 1.1)  # every gate open at every position
    assert torch.equal(circuit_logits(model, every, task, ablation), full)
    none = _random_circuit(shape, 0, -0.1)  # every gate closed: the empty circuit
    empty = circuit_logits(model, Circuit.empty(shape), task, ablation)
    assert torch.allclose(circuit_logits(model, none, task, ablation), empty, atol=1e-6)


def test_named_positions_line_up_prompts_of_different_lengths() -> None:
    model = tiny_model("bridge-native", n_layers=2)
    shape = ModelShape.from_model(model)
    gen = torch.Generator().manual_seed(5)
    lengths = [6, 4, 5]
    rows = [torch.randint(64, (2, n), generator=gen).tolist() for n in lengths]
    # "A" at token 1, "END" last, "other" elsewhere: END is token 5, 3 and 4.
    labels = [["other", "A"] + ["other"] * (n - 3) + ["END"] for n in lengths]
    task = PromptTask.from_tokens(
        [r[0] + [0] * (6 - len(r[0])) for r in rows], [r[1] + [0] * (6 - len(r[1])) for r in rows],
        [1, 1, 1], [2, 2, 2], answer_pos=[n - 1 for n in lengths], positions=labels,
    )
    axis = PositionAxis("named", ("END", "A", "other"))  # another order than the task's
    ablation = Ablation(model, task, site_names(shape, GRANS))
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        gates = {g: (torch.rand((3, *shape.units(g)), generator=gen) < 0.6).float()
                 for g in GRANS}  # fmt: skip
        circuit = Circuit(shape, gates, positions=axis)
        where = [[axis.names.index(x) for x in row] + [0] * (6 - len(row)) for row in labels]
        got = circuit_logits(model, circuit, task, ablation)
        assert torch.allclose(got, _by_hand(model, circuit, task, where), atol=1e-5)
    with pytest.raises(ValueError, match="'A'"):  # the circuit lacks a position the task has
        circuit_logits(model, Circuit(shape, {"attn": torch.ones(2, 2)},
                                      positions=PositionAxis("named", ("END", "other"))),
                       task, ablation)  # fmt: skip


def test_named_discovery_on_a_chain_keeps_each_node_at_its_label() -> None:
    problem = compiled_problem("chain", "bridge-native", seed=0)
    task = problem.task
    # The chain reads token 2, carries it at token 4 and answers at token 7 (compiled.py).
    row = ["other", "other", "src", "other", "mid", "other", "other", "END"]
    task = PromptTask.from_tokens(task.clean, task.corrupted, task.correct, task.incorrect,
                                  positions=[row] * len(task))  # fmt: skip
    config = PruneConfig(granularities=("attn", "mlp", "head"), positions="named",
                         gate_noise="example", progress=False)  # fmt: skip
    found = NodePruner(problem.model, config).fit(task).circuit
    assert found.positions.names == ("other", "src", "mid", "END")
    head0, head2 = (n for n in problem.circuit.nodes if ".h" in n)
    assert sorted(found.node_positions) == sorted(
        ["a0@mid", f"{head0}@mid", "m1@mid", "a2@END", f"{head2}@END"]
    )


# Where each layer's nodes work in the compiled programs (tl_nodeprune.compiled): the position
# a head writes to, and the position its layer's lookup table reads.
WORKS_AT = {
    "copy": {1: 7},
    "chain": {0: 4, 1: 4, 2: 7},
    "and_pair": {0: 7, 1: 7},
    "deep": {0: 2, 1: 4, 2: 5, 3: 7, 4: 7},
}


@pytest.mark.parametrize("flavour", [f for f in FLAVOURS if f in available_flavours()])
@pytest.mark.parametrize("name", list(WORKS_AT))
def test_position_aware_discovery_keeps_each_node_only_where_it_works(
    name: str, flavour: str
) -> None:
    for seed in (0, 1, 2):
        problem = compiled_problem(name, flavour, seed=seed)
        truth = [f"{n}@{WORKS_AT[name][int(n[1])]}" for n in problem.circuit.nodes]
        config = PruneConfig(granularities=("attn", "mlp", "head"), positions="absolute",
                             gate_noise="example", seed=seed, progress=False)  # fmt: skip
        found = NodePruner(problem.model, config).fit(problem.task).circuit
        assert sorted(found.node_positions) == sorted(truth), (name, seed)
        # The same nodes as position-blind truth, each at one of its 8 positions only.
        assert sorted(found.nodes) == sorted(problem.circuit.nodes)
        assert evaluate(problem.model, found, problem.task).faithfulness > 0.99


def test_saved_circuit_keeps_its_positions_and_its_numbers(tmp_path) -> None:
    model = tiny_model("bridge-native")
    task = _task()
    circuit = _random_circuit(ModelShape.from_model(model), 3, 0.6)
    circuit.meta["ablation"] = "corrupted"
    before = evaluate(model, circuit, task)
    loaded = Circuit.load(circuit.save(tmp_path / "c.json"))
    assert loaded.positions == circuit.positions
    assert loaded.node_positions == circuit.node_positions
    assert evaluate(model, loaded, task) == before
    # Not the same as the position-blind circuit of the same nodes.
    blind = Circuit(loaded.shape, loaded.node_gates(), meta=loaded.meta)
    assert evaluate(model, blind, task).kl != pytest.approx(before.kl, abs=1e-4)


def test_nodes_named_at_positions_and_the_hierarchy_per_position() -> None:
    shape = ModelShape.from_model(tiny_model("bridge-native"))
    axis = PositionAxis("named", ("S1", "IO", "END"))
    circuit = Circuit.from_nodes(
        shape, ["a0@END", "a0.h1@END", "a0.h2@IO", "m1", "m1.n3@S1"], ("attn", "mlp", "head",
                                                                      "neuron"), axis
    )
    # a0.h2 is kept at IO only if its block is kept there: it is not.
    assert circuit.node_positions == [
        "a0@END", "m1@S1", "m1@IO", "m1@END", "a0.h1@END", "m1.n3@S1"
    ]
    assert circuit.nodes == ["a0", "m1", "a0.h1", "m1.n3"]
    frame = circuit.to_frame()
    assert set(frame["position"]) == {"S1", "IO", "END"}
    assert frame.kept.sum() == len(circuit.node_positions)
    with pytest.raises(ValueError, match="position 'S2' is not one of"):
        Circuit.from_nodes(shape, ["a0@S2"], ("attn",), axis)
    with pytest.raises(ValueError, match="position-blind"):
        Circuit.from_nodes(shape, ["a0@END"], ("attn",))


def test_absolute_positions_refuse_prompts_of_different_lengths() -> None:
    model = tiny_model("bridge-native")
    task = PromptTask.from_tokens([[1, 2, 3, 4], [1, 2, 3, 0]], [[5, 6, 7, 8], [5, 6, 7, 0]],
                                  [1, 1], [2, 2], answer_pos=[3, 2])  # fmt: skip
    before = hook_count(model)
    # The default budgets are off: they would refuse two prompts first (too few to hold out a
    # validation quarter), and the positions' refusals are what is tested here.
    off = {**NO_BUDGETS, "steps": 2, "progress": False}
    with pytest.raises(ValueError, match="positions='absolute' needs prompts of one length"):
        NodePruner(model, PruneConfig(positions="absolute", **off)).fit(task)
    assert hook_count(model) == before
    with pytest.raises(ValueError, match="positions='named' needs a task whose tokens carry"):
        NodePruner(model, PruneConfig(positions="named", **off)).fit(task)


def test_position_figure_and_report_show_where_each_head_works(tmp_path) -> None:
    from tl_nodeprune import plot
    from tl_nodeprune.reporting import report

    shape = ModelShape.from_model(tiny_model("bridge-native"))
    axis = PositionAxis("named", ("S1", "IO", "END"))
    circuit = Circuit.from_nodes(
        shape, ["a0", "a1@END", "a0.h1@END", "a0.h2@S1", "a1.h3", "m1"],
        ("attn", "mlp", "head"), axis,
    )
    fig = plot.by_position(circuit, reference={(0, 1): "name mover"})
    heatmap, kept = fig.data
    assert list(heatmap.y) == ["a0.h1 (name mover)", "a0.h2", "a1.h3"]
    assert list(heatmap.x) == ["S1", "IO", "END"]
    # a1.h3's own gate is open everywhere, but its block only at END: kept there alone.
    assert heatmap.z.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 1]]
    assert sorted(zip(kept.y, kept.x, strict=True)) == [
        ("a0.h1 (name mover)", "END"), ("a0.h2", "S1"), ("a1.h3", "END")
    ]
    with pytest.raises(ValueError, match="position-blind"):
        plot.by_position(Circuit.full(shape))
    page = report(circuit, tmp_path / "r.html").read_text()
    assert "3 heads kept at 3 node-positions" in page


def test_compare_scores_nodes_and_node_positions() -> None:
    from tl_nodeprune.comparison import compare

    shape = ModelShape.from_model(tiny_model("bridge-native"))
    grans = ("attn", "head")
    found = Circuit.from_nodes(shape, ["a0", "a0.h1@END", "a0.h2@IO"], grans,
                               PositionAxis("named", ("IO", "END")))  # fmt: skip
    truth = Circuit.from_nodes(shape, ["a0", "a0.h1@END", "a0.h2@S2"], grans,
                               PositionAxis("named", ("S2", "END")))  # fmt: skip
    scores = compare(found, truth).scores
    assert scores.loc["head", ["tp", "fp", "fn"]].tolist() == [2, 0, 0]  # same heads
    # At positions: a0.h1@END shared; a0.h2@IO extra; a0.h2@S2 missed (no S2 in `found`).
    assert scores.loc["head@position", ["tp", "fp", "fn"]].tolist() == [1, 1, 1]


def test_certify_in_fit_cuts_an_unconverged_run_to_each_node_at_its_position() -> None:
    # 3 steps leave every gate open; the certificate on the validation quarter removes every
    # node-position that is not worth its share of the price.
    problem = compiled_problem("chain", "bridge-native", seed=0)
    config = PruneConfig(granularities=("attn", "mlp", "head"), positions="absolute", steps=3,
                         certify=True, progress=False)  # fmt: skip
    result = NodePruner(problem.model, config).fit(problem.task)
    truth = [f"{n}@{WORKS_AT['chain'][int(n[1])]}" for n in problem.circuit.nodes]
    assert sorted(result.circuit.node_positions) == sorted(truth)
    assert all("@" in node for node in result.certificate.flips.node)

"""The certificate: after `certify` no single node flip improves loss + price (brute force)."""

from dataclasses import replace

import pytest
import torch

from tl_nodeprune.certificate import OPTIMAL, certify
from tl_nodeprune.circuit import Circuit
from tl_nodeprune.compiled import compiled_problem
from tl_nodeprune.evaluation import Evaluator
from tl_nodeprune.granularities import ancestors, parse_node_name, spec
from tl_nodeprune.planted import add_distractors, planted_problem
from tl_nodeprune.pruner import NodePruner, PruneConfig


@pytest.fixture(scope="module")
def problem():
    return planted_problem("bridge-native", seed=0, n_prompts=64)


@pytest.fixture(scope="module")
def distracted():
    # distractors of strength 0.1 cost 0.004-0.07 nats each when removed: some are worth their
    # price (0.03 a head, 0.002 a neuron) and some are not, so the optimum is not the truth
    problem = planted_problem("bridge-native", seed=0, n_prompts=64)
    return add_distractors(problem, per_layer=1, strength=0.1)


def objective(evaluator: Evaluator, circuit: Circuit) -> float:
    """KL plus the default price of every kept node, computed here independently of certify."""
    price = sum(spec(parse_node_name(n)[0]).price for n in circuit.nodes)
    return evaluator(circuit).kl + price


def single_flips(circuit: Circuit) -> list[list[str]]:
    """Node lists one flip away: a node removed with what it holds, or restored whole with
    its blocks (a head with its attention block, a block with all its heads or neurons)."""
    shape = circuit.shape
    every = Circuit(shape, {g: torch.ones(shape.units(g)) for g in circuit.granularities})
    kept = set(circuit.nodes)
    out = []
    for node in every.nodes:
        inside = {n for n in every.nodes if n.startswith(node + ".")} | {node}
        if node in kept:
            out.append(sorted(kept - inside))
        else:
            out.append(sorted(kept | inside | {node.split(".")[0]}))
    return out


def test_no_single_flip_improves_the_certified_circuit_by_brute_force(distracted):
    truth = distracted.circuit
    cert = certify(distracted.model, truth, distracted.task)
    assert cert.locally_optimal and cert.statement == OPTIMAL
    assert sum(cert.unchecked.values()) == 0
    assert len(cert.flips) > 0, "the distractors worth their price must be restored"
    evaluator = Evaluator(distracted.model, distracted.task, granularities=truth.granularities)
    best = objective(evaluator, cert.circuit)
    assert best == pytest.approx(cert.objective, abs=1e-5)
    flips = single_flips(cert.circuit)
    assert len(flips) == 3 + 3 + 12 + 96  # every block, head and neuron of the tiny model
    for nodes in flips:
        other = Circuit.from_nodes(truth.shape, nodes, truth.granularities)
        assert objective(evaluator, other) > best - 1e-6, f"flip to {nodes} improves"


@pytest.mark.parametrize("kind", ["head", "neuron"])
def test_a_damaged_circuit_is_repaired(problem, kind):
    truth = problem.circuit
    lost = next(n for n in truth.nodes if parse_node_name(n)[0] == kind)
    damaged = Circuit.from_nodes(
        truth.shape, [n for n in truth.nodes if n != lost], truth.granularities
    )
    cert = certify(problem.model, damaged, problem.task)
    assert cert.circuit.nodes == truth.nodes
    assert cert.locally_optimal
    assert cert.flips[["node", "action"]].values.tolist() == [[lost, "restore"]]
    row = cert.flips.iloc[0]
    assert row.loss_before > row.price > row.loss_after


def test_ranked_neurons_still_find_the_lost_one_and_say_what_was_not_checked(problem):
    truth = problem.circuit
    lost = next(n for n in truth.nodes if parse_node_name(n)[0] == "neuron")
    damaged = Circuit.from_nodes(
        truth.shape, [n for n in truth.nodes if n != lost], truth.granularities
    )
    # 89 closed neurons, 4 tried: only a ranking by attribution finds the lost one
    cert = certify(problem.model, damaged, problem.task, granularities=("neuron",),
                   max_candidates=4)  # fmt: skip
    assert cert.circuit.nodes == truth.nodes
    assert not cert.locally_optimal
    assert cert.unchecked == {"neuron": (96 - 9 - 4) + (9 - 4)}
    assert "88 candidates were not checked" in cert.statement


def test_an_unneeded_node_is_removed(problem):
    truth = problem.circuit
    extra = "a0.h2"  # layer 0's attention is silent: neither the head nor its block is needed
    padded = Circuit.from_nodes(truth.shape, [*truth.nodes, "a0", extra], truth.granularities)
    cert = certify(problem.model, padded, problem.task)
    assert cert.circuit.nodes == truth.nodes
    assert cert.locally_optimal
    assert set(cert.flips.action) == {"remove"}
    assert cert.flips.price.sum() == pytest.approx(0.06)


def test_fit_with_certify_repairs_an_unconverged_run_on_its_validation_split(problem):
    # 3 steps leave every gate open: without the certificate the circuit is the whole model.
    # The default budgets are off: with them the selection along the gate order, not the
    # certificate, would pick the circuit.
    config = PruneConfig(progress=False, steps=3, certify=True, certify_candidates=128,
                         target_kl=None, target_faithfulness=None)  # fmt: skip
    result = NodePruner(problem.model, config).fit(problem.task)
    assert result.certificate is not None and result.certificate.locally_optimal
    assert result.circuit.nodes == problem.circuit.nodes
    assert result.circuit.meta["certificate"] == OPTIMAL
    # the pass ran on the held-out quarter, not on the prompts the gates were trained on
    assert result.certificate.evaluation.n_prompts == 16
    uncertified = NodePruner(problem.model, replace(config, certify=False)).fit(problem.task)
    assert uncertified.certificate is None and len(uncertified.circuit.nodes) > 100


def test_position_aware_certificate_by_brute_force_over_node_positions(distracted):
    """Every node at every position flipped alone (removed with what it holds there, or restored
    with its blocks there) does not beat the certified circuit's KL + price, where a node at one
    of P positions costs a P-th of its price, as in training."""
    from tl_nodeprune.positions import PositionAxis

    model, task = distracted.model, distracted.task
    n = task.clean.shape[1]
    labels = [["early"] * (n // 2) + ["late"] * (n - n // 2 - 1) + ["END"]] * len(task)
    task = replace(task, prompts=None)
    task = type(task).from_tokens(task.clean, task.corrupted, task.correct, task.incorrect,
                                  task.answer_pos, positions=labels)  # fmt: skip
    axis = PositionAxis("named", ("early", "late", "END"))
    truth = distracted.circuit  # every planted node at every position: far from optimal here
    start = Circuit(truth.shape, {g: t.expand(3, *t.shape).clone() for g, t in truth.gates.items()},
                    positions=axis)  # fmt: skip
    cert = certify(model, start, task)
    assert cert.locally_optimal and len(cert.flips) > 0
    assert any("@" in node for node in cert.flips.node)
    evaluator = Evaluator(model, task, granularities=truth.granularities)

    def cost(c: Circuit) -> float:
        per = {g: spec(g).price / 3 for g in c.granularities}
        return evaluator(c).kl + sum(p * int(c.kept_at(g).sum()) for g, p in per.items())

    best = cost(cert.circuit)
    assert best == pytest.approx(cert.objective, abs=1e-5)
    kept = {g: cert.circuit.kept_at(g) for g in truth.granularities}
    flips = 0
    for g in truth.granularities:
        for index in torch.ones_like(kept[g]).nonzero().tolist():
            gates = {d: t.clone().float() for d, t in kept.items()}
            value = float(not kept[g][tuple(index)])
            for d in gates:  # the node with everything inside it, at this position
                if d == g or g in ancestors(d):
                    gates[d][tuple(index)] = value
            if value:  # restored with its blocks, at this position
                for a in ancestors(g):
                    gates[a][tuple(index[: gates[a].dim()])] = 1.0
            other = Circuit(truth.shape, gates, positions=axis)
            assert cost(other) > best - 1e-6, f"flipping {g} {index} improves"
            flips += 1
    assert flips == 3 * (3 + 3 + 12 + 96)


@pytest.mark.parametrize("name", ["deep", "deep_soft"])
def test_a_broken_chain_no_single_flip_mends_is_found_again_from_the_full_model(name):
    # compiled chain head -> MLP -> head ...: with two of its heads closed, no single reopening
    # restores the chain, so the search from the circuit stays broken (or empties it); the
    # second search removes nodes one at a time from the full model and keeps the chain
    problem = compiled_problem(name, "bridge-native", seed=0)
    truth = problem.circuit
    heads = [n for n in truth.nodes if parse_node_name(n)[0] == "head"]
    broken = Circuit.from_nodes(
        truth.shape, [n for n in truth.nodes if n not in heads[:2]], truth.granularities
    )
    alone = certify(problem.model, broken, problem.task)
    assert alone.locally_optimal and alone.start == "circuit"
    assert not set(heads) <= set(alone.circuit.nodes)
    both = certify(problem.model, broken, problem.task, from_full=True)
    assert both.start == "full model" and both.circuit.nodes == truth.nodes
    assert both.objective < alone.objective and both.evaluation.kl < 1e-3
    assert "from the full model: the full model's" in both.statement
    kept = certify(problem.model, truth, problem.task, from_full=True)  # truth wins its own start
    assert kept.start == "circuit" and kept.circuit.nodes == truth.nodes and kept.flips.empty

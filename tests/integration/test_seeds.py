"""Seed spread: per-seed circuits and a consensus view whose counts match them."""

import pandas as pd
import pytest

import tl_nodeprune as tnp
from tl_nodeprune.planted import planted_problem
from tl_nodeprune.seeds import SeedSpread
from tl_nodeprune.sites import ModelShape

SHAPE = ModelShape(name="toy", n_layers=2, n_heads=4, d_head=8, d_mlp=16, d_vocab=64)
GRANS = ("attn", "mlp", "head", "neuron")
NODES = {
    0: ["a0", "a0.h1", "a0.h2", "m1", "m1.n3"],
    1: ["a0", "a0.h1", "m1", "m1.n3", "m1.n7"],
    5: ["a0", "a0.h1", "a1", "a1.h0", "m1", "m1.n7"],
}


def _spread() -> SeedSpread:
    results = {}
    for seed, nodes in NODES.items():
        circuit = tnp.Circuit.from_nodes(SHAPE, nodes, GRANS)
        config = tnp.PruneConfig(seed=seed)
        results[seed] = tnp.PruneResult(circuit, pd.DataFrame(), {}, config, 1.0)
    return SeedSpread(results)


def test_consensus_counts_match_the_per_seed_circuits():
    frame = _spread().consensus().set_index("node")
    expected_counts = {"a0": 3, "a0.h1": 3, "m1": 3, "m1.n3": 2, "m1.n7": 2, "a0.h2": 1,
                       "a1": 1, "a1.h0": 1}  # fmt: skip
    assert frame["kept"].to_dict() == expected_counts
    assert frame.loc["m1.n7", "share"] == 2 / 3
    assert frame.loc["m1.n7"][["seed_0", "seed_1", "seed_5"]].tolist() == [False, True, True]
    assert frame.loc["a1.h0", "granularity"] == "head"
    assert frame["kept"].is_monotonic_decreasing
    assert sorted(_spread().stable()) == ["a0", "a0.h1", "m1"]
    assert sorted(_spread().stable(0.5)) == ["a0", "a0.h1", "m1", "m1.n3", "m1.n7"]
    summary = _spread().summary()
    assert summary.loc[5, "head"] == 2 and summary.loc[1, "neuron"] == 2


def test_fit_seeds_runs_each_seed_and_its_consensus_matches(flavour):
    problem = planted_problem(flavour, seed=0)
    config = tnp.PruneConfig(progress=False, steps=20)
    spread = tnp.NodePruner(problem.model, config).fit_seeds(problem.task, seeds=(2, 0, 2))
    assert spread.seeds == [2, 0]
    assert [r.config.seed for r in spread.results.values()] == [2, 0]
    per_seed = {s: set(r.circuit.nodes) for s, r in spread.results.items()}
    frame = spread.consensus().set_index("node")
    for node, row in frame.iterrows():
        assert row["kept"] == sum(node in kept for kept in per_seed.values())
    assert set(frame.index) == set().union(*per_seed.values())


def test_stability_is_the_mean_pairwise_jaccard_per_granularity():
    frame = _spread().stability()
    # heads {h1, h2}, {h1}, {h1, a1.h0}: Jaccard 1/2, 1/3, 1/2; neurons {n3}, {n3, n7}, {n7}:
    # 1/2, 0, 1/2; attention blocks {a0}, {a0}, {a0, a1}: 1, 1/2, 1/2; MLP blocks all {m1}
    expected = {"attn": 2 / 3, "mlp": 1.0, "head": (1 / 2 + 1 / 3 + 1 / 2) / 3, "neuron": 1 / 3}
    assert frame["jaccard"].to_dict() == pytest.approx(expected)
    assert frame.loc["head", "every_seed"] == 1 and frame.loc["head", "some_seed"] == 3
    assert frame.loc["neuron", "every_seed"] == 0 and frame.loc["neuron", "some_seed"] == 2

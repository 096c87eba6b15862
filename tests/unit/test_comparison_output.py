"""The comparison study's summary table, which the README quotes."""

import argparse
import math

import pandas as pd

from bench.comparison_output import SUMMARY, markdown, neurons_figure, summary_table


def _row(method, level, seed, n_f, **more):
    row = {"method": method, "level": level, "seed": seed, "cpr": 0.7 + 0.1 * seed, "n_f": n_f,
           "heads_f": n_f - 30, "mlp_f": 30, "kl_at_n_f": 0.1, "f_at_size": 0.9,
           "kl_at_size": 0.2, "seconds": 300.0 + seed, "peak_mib": 1024.0 * (7 + seed)}  # fmt: skip
    return row | more


def test_the_summary_reads_each_column_at_its_level_and_spans_the_seeds():
    table = pd.DataFrame([
        _row("node_pruning", "blocks_heads", 0, 80), _row("node_pruning", "neurons", 0, 2_000),
        _row("node_pruning", "blocks_heads", 1, 60), _row("node_pruning", "neurons", 1, 40_000),
        _row("random", "blocks_heads", 0, math.nan, cpr=0.25),
        _row("random", "neurons", 0, 42_366, cpr=0.2),
    ])  # fmt: skip
    lines = summary_table(table).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["method", *(heading for _, _, heading, _ in SUMMARY)]
    ours, rnd = ({h: c.strip() for h, c in zip(head, line.strip("|").split("|"), strict=True)}
                 for line in lines[2:])  # fmt: skip
    assert ours["method"] == "node_pruning" and rnd["method"] == "random"
    # block-level n from the block rows, neuron-level n from the neuron rows: mean [min, max]
    assert ours["n for f >= T"] == "70 [60, 80]"
    assert ours["n for f >= T, neuron level"] == "21,000 [2,000, 40,000]"
    assert ours["CPR"] == "0.75 [0.70, 0.80]"  # the block level's CPR, not the neurons'
    assert ours["peak GiB"] == "7.5 [7.0, 8.0]"
    # one seed: the value alone; a size never reached: '-'
    assert rnd["CPR"] == "0.25" and rnd["n for f >= T"] == "-"
    assert rnd["n for f >= T, neuron level"] == "42,366"


def test_the_irrelevant_neurons_say_which_seeds_they_span_when_not_all(tmp_path):
    """A seed left out of the irrelevant neurons (its file from an earlier search, no cache to
    recompute it) is named in the page, so a mean over fewer seeds is not read as all."""
    more = {"cmd": 0.1, "neurons_f": 0, "n_kl_0.3": 90, "n_kl_0.1": 100, "at_size": 80}
    table = pd.DataFrame([_row("node_pruning", "blocks_heads", s, 80, **more) for s in (0, 1, 2)])
    neurons = pd.DataFrame({"circuit": ["eap", "eap"], "mlp_blocks": [20, 21],
                            "coarse_neurons": [30_720, 32_256], "coarse_f": [0.95, 0.93],
                            "target": [0.9, 0.9], "needed": [464, 500], "f_needed": [0.93, 0.92],
                            "kl_needed": [0.1, 0.2], "irrelevant": [0.98, 0.98],
                            "seed": [1, 2]})  # fmt: skip
    args = argparse.Namespace(
        seeds=[0, 1, 2], task="ioi", model="m", target_f=0.9, n_prompts=10, steps=None,
        train_fraction=0.8, fractions=[0.5, 1.0], refine=0.0, patching_prompts=None,
        methods=["node_pruning"],
    )
    page = markdown(args, "cmd", table, neurons, {})
    assert "Seeds 1 2 only" in page
    args.seeds = [1, 2]
    assert "only:" not in markdown(args, "cmd", table[table.seed > 0], neurons, {})


def test_the_neurons_figure_draws_each_seed_not_their_mean():
    """On greater-than node pruning needs 1% of a circuit's neurons on one seed and all of
    them on another: the figure draws each seed's panel, so neither is hidden in a mean."""
    layers = pd.DataFrame(
        [[1536, 0, 1536, 1], [20, 0, 30, 1], [1536, 1536, 0, 2], [1536, 1536, 0, 2]],
        columns=["0", "1", "2", "seed"],
        index=pd.Index(["eap", "eap: node pruning"] * 2, name="circuit"),
    )
    fig = neurons_figure(layers)
    drawn = {(t.hovertemplate.split("<br>")[0]): list(t.y) for t in fig.data}
    assert drawn == {"eap, seed 1": [1536, 0, 1536], "eap: node pruning, seed 1": [20, 0, 30],
                     "eap, seed 2": [1536, 1536, 0],
                     "eap: node pruning, seed 2": [1536, 1536, 0]}  # fmt: skip
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["eap, seed 1: runs 3,072, NP needs 50",
                      "eap, seed 2: runs 3,072, NP needs 3,072"]  # fmt: skip

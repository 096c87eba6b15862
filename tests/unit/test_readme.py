"""The README quotes the code's defaults; this keeps them equal."""

import re
from pathlib import Path

from tl_nodeprune.evaluation import OVERSHOOT
from tl_nodeprune.pruner import DEFAULT_NODE_COST, PruneConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_node_prices_are_the_codes():
    text = " ".join(README.read_text().split())
    match = re.search(
        r"a block ([\d.]+), a head ([\d.]+), a neuron ([\d.]+), a head value dimension ([\d.]+)",
        text,
    )
    assert match, "the README no longer quotes the node prices in the expected sentence"
    quoted = [float(x) for x in match.groups()]
    code = [DEFAULT_NODE_COST[g] for g in ("attn", "head", "neuron", "head_dim")]
    assert DEFAULT_NODE_COST["attn"] == DEFAULT_NODE_COST["mlp"]
    assert quoted == code


def test_readme_default_budgets_are_the_codes():
    text = " ".join(README.read_text().split())
    match = re.search(
        r"holds the circuit to a KL budget of ([\d.]+) nats and a faithfulness band of "
        r"\[([\d.]+), ([\d.]+)\]",
        text,
    )
    assert match, "the README no longer quotes the default budgets in the expected sentence"
    config = PruneConfig()
    code = [config.target_kl, config.target_faithfulness, OVERSHOOT]
    assert [float(x) for x in match.groups()] == code

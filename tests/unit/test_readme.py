"""The README quotes the code's defaults; this keeps them equal."""

import re
from pathlib import Path

import pytest

from bench.comparison_output import SUMMARY_HEADING
from tl_nodeprune.evaluation import OVERSHOOT
from tl_nodeprune.pruner import DEFAULT_NODE_COST, PruneConfig

README = Path(__file__).resolve().parents[2] / "README.md"
GENERATED = README.parent / "docs" / "generated"


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


@pytest.mark.parametrize("task", ["ioi", "greater_than"])
def test_readme_comparison_tables_are_the_generated_ones(task):
    """The README's baselines tables are the comparison study's summaries as they stand in
    docs/generated: a rerun that changes a number fails here until the README follows."""
    md = (GENERATED / f"comparison_{task}.md").read_text()
    assert SUMMARY_HEADING in md, f"comparison_{task}.md has no summary: rerun the study"
    section = md.split(SUMMARY_HEADING, 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table.count("\n") > 2
    assert table in README.read_text(), f"the README's {task} table is not the study's"

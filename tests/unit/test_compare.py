"""compare, ROC/AUC, CPR/CMD and shipped references, checked against hand-computed numbers."""

import math

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.metrics import MIB_FRACTIONS, complement
from tl_nodeprune.references import GPT2_SMALL

ONE_LAYER = tnp.ModelShape("one", n_layers=1, n_heads=4, d_head=2, d_mlp=4, d_vocab=8, d_model=8)


def test_shipped_references_load_with_their_published_sizes_and_sources():
    assert tnp.references.names() == ("ioi", "greater_than", "greater_than_acdc")
    ioi = tnp.references.load("ioi")
    assert len(ioi.head_set) == 26 and len(ioi.heads) == 7
    assert ioi.heads["name mover"] == ("a9.h9", "a9.h6", "a10.h0")
    assert "Wang" in ioi.source and "mlp" not in ioi.granularities
    gt = tnp.references.load("greater_than").to_circuit()
    assert gt.heads == [(5, 1), (5, 5), (6, 9), (7, 10), (8, 8), (8, 11), (9, 1)]
    assert gt.mlp_blocks == [8, 9, 10, 11]
    acdc = tnp.references.load("greater_than_acdc")
    assert len(acdc.head_set) == 9 and acdc.mlps == (0, 1, 2, 3, 8, 9, 10, 11)
    assert "Conmy" in acdc.source
    with pytest.raises(ValueError, match="greater_than_acdc"):
        tnp.references.load("docstring")


def test_compare_with_ioi_reference_gives_hand_computed_scores_and_class_table():
    head = torch.zeros(12, 12)
    for layer, h in [(9, 9), (9, 6), (10, 0), (1, 1), (1, 2)]:  # name movers + 2 outsiders
        head[layer, h] = 1.0
    circuit = tnp.Circuit(GPT2_SMALL, {"attn": head.amax(1), "head": head})
    result = tnp.compare(circuit, tnp.references.load("ioi"))
    heads = result.scores.loc["head"]
    assert (heads.tp, heads.fp, heads.fn) == (3, 2, 23)
    assert heads.precision == pytest.approx(3 / 5) and heads.recall == pytest.approx(3 / 26)
    assert heads.f1 == pytest.approx(2 * 3 / (5 + 26))
    assert "mlp" not in result.scores.index  # Wang et al. make no claim about MLPs
    # blocks: circuit {1, 9, 10}; reference {0, 2, ..., 11} (11 blocks, none in layer 1)
    assert result.scores.loc["attn"].precision == pytest.approx(2 / 3)
    assert result.scores.loc["attn"].recall == pytest.approx(2 / 11)
    table = result.by_class
    assert table.loc["name mover", "kept"] == 3 and table.loc["name mover", "recall"] == 1.0
    assert table.loc["induction", "kept"] == 0 and table.loc["induction", "missed"] == (
        "5.5 5.8 5.9 6.9"
    )
    assert table.loc["not in reference", "kept"] == 2


def test_compare_refuses_a_reference_from_another_model_shape():
    with pytest.raises(ValueError, match="12 layers"):
        tnp.compare(tnp.Circuit.full(ONE_LAYER), tnp.references.load("ioi"))


def test_roc_from_scores_matches_hand_computed_curve_and_auc():
    ref = tnp.Circuit(ONE_LAYER, {"head": torch.tensor([[1.0, 1, 0, 0]])})
    scored = tnp.Circuit(
        ONE_LAYER, {"head": torch.ones(1, 4)}, scores={"head": torch.tensor([[0.9, 0.1, 0.8, 0.0]])}
    )
    curve = tnp.roc(scored, ref, "head")
    # ranking: h0 (T), h2 (F), h1 (T), h3 (F)
    assert list(zip(curve.fpr, curve.tpr, strict=True)) == [
        (0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)
    ]  # fmt: skip
    assert tnp.auc(curve) == pytest.approx(0.75)  # = P(score of a pos > score of a neg) = 3/4


def test_roc_over_a_sweep_uses_one_point_per_circuit():
    ref = tnp.Circuit(ONE_LAYER, {"head": torch.tensor([[1.0, 1, 0, 0]])})
    sweep = [tnp.Circuit(ONE_LAYER, {"head": torch.tensor([g])}) for g in
             ([1.0, 0, 0, 0], [1.0, 1, 1, 0])]  # fmt: skip
    curve = tnp.roc(sweep, ref, "head")
    assert list(zip(curve.fpr, curve.tpr, strict=True)) == [
        (0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)
    ]  # fmt: skip
    assert tnp.auc(curve) == pytest.approx(0.5 * (0.5 + 1) / 2 + 0.5 * (1 + 1) / 2)


def test_roc_ranks_heads_by_effective_gate_when_no_scores():
    shape = tnp.ModelShape("t", n_layers=2, n_heads=2, d_head=2, d_mlp=3, d_vocab=8, d_model=4)
    ref = tnp.Circuit(shape, {"head": torch.tensor([[0.0, 0], [1, 1]])})
    gates = {"attn": torch.tensor([0.1, 1.0]), "head": torch.tensor([[0.9, 0.2], [0.5, 0.3]])}
    # effective gates 0.09, 0.02 | 0.5, 0.3 rank both reference heads first; raw gates would not
    assert tnp.auc(tnp.roc(tnp.Circuit(shape, gates), ref)) == pytest.approx(1.0)


def test_cpr_and_cmd_match_hand_computed_curves():
    assert tnp.cpr([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.25 + 0.5)
    assert tnp.cmd([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.25)
    assert tnp.cmd([0, 1], [0.5, 1.5]) == pytest.approx(0.5)  # |1 - f| counts overshoot
    assert tnp.cpr([0, 1], [0.5, 1.5]) == pytest.approx(1.0)
    ones = [1.0] * len(MIB_FRACTIONS)
    assert tnp.cpr(MIB_FRACTIONS, ones) == pytest.approx(0.999)
    assert tnp.cmd(MIB_FRACTIONS, ones) == 0.0
    with pytest.raises(ValueError, match="ascending"):
        tnp.cpr([0.5, 0.1], [1, 1])


def test_complement_keeps_exactly_the_leaves_a_circuit_drops():
    shape = tnp.ModelShape("t", n_layers=2, n_heads=2, d_head=2, d_mlp=3, d_vocab=8, d_model=4)
    gates = {"attn": torch.tensor([1.0, 0]), "head": torch.tensor([[1.0, 0], [1, 1]])}
    c = tnp.Circuit(shape, {**gates, "mlp": torch.tensor([0.0, 1])})
    other = complement(c)
    assert other.heads == [(0, 1), (1, 0), (1, 1)]  # block 1 was closed: all its heads return
    assert other.mlp_blocks == [0]
    assert not (other.kept("head") & c.kept("head")).any()
    assert math.isclose(other.fraction("head") + c.fraction("head"), 1.0)

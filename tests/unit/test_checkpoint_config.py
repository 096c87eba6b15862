"""Checkpoint settings: validation, the activation estimate and the 'auto' decision."""

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.checkpoint import activation_bytes, blocks_to_checkpoint
from tl_nodeprune.sites import ModelShape

GPT2_SMALL = ModelShape("gpt2-shape", n_layers=12, n_heads=12, d_head=64, d_mlp=3072,
                        d_vocab=50257, d_model=768)  # fmt: skip


@pytest.mark.parametrize("bad", ["yes", 1, None, "Auto"])
def test_checkpoint_mode_is_validated(bad):
    with pytest.raises(ValueError, match="PruneConfig.checkpoint must be"):
        tnp.PruneConfig(checkpoint=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5e9])
def test_checkpoint_budget_is_validated(bad):
    with pytest.raises(ValueError, match="checkpoint_budget_bytes"):
        tnp.PruneConfig(checkpoint="auto", checkpoint_budget_bytes=bad)


def test_auto_checkpoints_above_the_budget_and_not_below():
    estimate = activation_bytes(GPT2_SMALL, batch=8, seq=64)
    assert blocks_to_checkpoint("auto", estimate, GPT2_SMALL, 8, 64) == 0
    assert blocks_to_checkpoint("auto", estimate - 1, GPT2_SMALL, 8, 64) > 0
    # The same budget decides differently for a larger step: on at 32x64, off at 8x64.
    assert blocks_to_checkpoint("auto", 4 * estimate - 1, GPT2_SMALL, 32, 64) > 0
    assert blocks_to_checkpoint("auto", 4 * estimate - 1, GPT2_SMALL, 8, 64) == 0
    # bfloat16 halves the estimate.
    assert blocks_to_checkpoint("auto", estimate - 1, GPT2_SMALL, 8, 64, element_size=2) == 0
    # A budget below even the all-checkpointed footprint still checkpoints every block.
    assert blocks_to_checkpoint("auto", 1, GPT2_SMALL, 8, 64) == 12


def test_auto_checkpoints_only_as_many_blocks_as_the_budget_needs():
    estimate = activation_bytes(GPT2_SMALL, batch=8, seq=64)
    half = blocks_to_checkpoint("auto", estimate // 2, GPT2_SMALL, 8, 64)
    third = blocks_to_checkpoint("auto", estimate // 3, GPT2_SMALL, 8, 64)
    assert 0 < half < third < 12
    # Half the memory needs about half the blocks (one more: backward recomputes one block).
    assert 6 <= half <= 8


def test_explicit_modes_ignore_the_budget():
    assert blocks_to_checkpoint(True, 2**62, GPT2_SMALL, 1, 1) == 12
    assert blocks_to_checkpoint(False, 1, GPT2_SMALL, 1024, 1024) == 0


def test_estimate_grows_linearly_in_batch_and_faster_than_linearly_in_sequence():
    base = activation_bytes(GPT2_SMALL, 8, 64)
    assert activation_bytes(GPT2_SMALL, 32, 64) == 4 * base
    assert activation_bytes(GPT2_SMALL, 8, 128) > 2 * base  # attention patterns: seq^2
    # GPT-2 small at 8x64 in fp32 keeps a few hundred MB for backward, not KB or GB.
    assert 2**28 < base < 2**30

"""Checkpoint settings: validation, the activation estimate and the 'auto' decision."""

import pytest

import tl_nodeprune as tnp
from tl_nodeprune.checkpoint import activation_bytes, use_checkpoint
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


def test_auto_turns_checkpointing_on_above_the_budget_and_off_below():
    estimate = activation_bytes(GPT2_SMALL, batch=8, seq=64)
    assert use_checkpoint("auto", estimate - 1, GPT2_SMALL, 8, 64)
    assert not use_checkpoint("auto", estimate, GPT2_SMALL, 8, 64)
    # The same budget decides differently for a larger step: on at 32x64, off at 8x64.
    budget = 4 * estimate - 1
    assert use_checkpoint("auto", budget, GPT2_SMALL, 32, 64)
    assert not use_checkpoint("auto", budget, GPT2_SMALL, 8, 64)
    # bfloat16 halves the estimate.
    assert not use_checkpoint("auto", estimate - 1, GPT2_SMALL, 8, 64, element_size=2)


def test_explicit_modes_ignore_the_budget():
    assert use_checkpoint(True, 2**62, GPT2_SMALL, 1, 1)
    assert not use_checkpoint(False, 1, GPT2_SMALL, 1024, 1024)


def test_estimate_grows_linearly_in_batch_and_faster_than_linearly_in_sequence():
    base = activation_bytes(GPT2_SMALL, 8, 64)
    assert activation_bytes(GPT2_SMALL, 32, 64) == 4 * base
    assert activation_bytes(GPT2_SMALL, 8, 128) > 2 * base  # attention patterns: seq^2
    # GPT-2 small at 8x64 in fp32 keeps a few hundred MB for backward, not KB or GB.
    assert 2**28 < base < 2**30

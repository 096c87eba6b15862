"""Each bad input is refused with an error that names the problem (issue 10)."""

import math
import warnings

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.circuit import parse_node
from tl_nodeprune.sites import ModelShape, check_sites

SHAPE = ModelShape("m", n_layers=2, n_heads=4, d_head=8, d_mlp=16, d_vocab=64, d_model=32)
ATTN_ONLY = ModelShape("ao", n_layers=2, n_heads=4, d_head=8, d_mlp=0, d_vocab=64, d_model=32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_log_alpha": math.nan}, "init_log_alpha must be finite"),
        ({"init_log_alpha": math.inf}, "init_log_alpha must be finite"),
        ({"threshold": math.nan}, "threshold must be in"),
        ({"lagrangian_rho": math.nan}, "lagrangian_rho must be a finite number"),
        ({"lagrangian_rho": -1.0}, "lagrangian_rho must be a finite number >= 0"),
        ({"lr": math.inf}, "lr must be a finite number > 0"),
        ({"penalty": {"head": math.inf}}, r"penalty\['head'\] must be finite"),
        ({"log_every": 0}, "log_every must be a positive int"),
        ({"cache_bytes": -1}, "cache_bytes must be an int >= 0"),
        ({"granularities": ("head",), "penalty": {"neuron": 1.0}}, "names 'neuron'.*not gate"),
        ({"granularities": ("attn", "head"), "target_sparsity": {"mlp": 0.5}}, "names 'mlp'"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tnp.PruneConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [("d_model", 64), ("d_vocab", 65), ("d_vocab_out", 2), ("n_key_value_heads", 2)],
)
def test_check_same_compares_every_size_a_circuit_depends_on(field, value):
    other = ModelShape(**{**SHAPE.to_dict(), field: value})
    with pytest.raises(ValueError, match="does not fit model"):
        SHAPE.check_same(other)


def test_sizes_unknown_in_old_files_are_not_compared_and_a_name_is_only_a_warning():
    old = ModelShape(**{**SHAPE.to_dict(), "d_model": 0, "d_vocab_out": 0, "n_key_value_heads": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SHAPE.check_same(old)
    renamed = ModelShape(**{**SHAPE.to_dict(), "name": "other"})
    with pytest.warns(UserWarning, match="found on 'other'.*same sizes"):
        SHAPE.check_same(renamed)


@pytest.mark.parametrize("name", ["a-1", "a0.h-1", "m-2.n3", "a1.x2", "a", "a1.h"])
def test_malformed_or_negative_node_names_are_refused(name):
    with pytest.raises(ValueError, match="Bad node name.*indices >= 0"):
        parse_node(name)


@pytest.mark.parametrize("name", ["a2", "a1.h4", "m0.n16", "a0.h0.d8"])
def test_node_names_out_of_range_are_refused(name):
    with pytest.raises(ValueError, match="out of range for 'm'"):
        parse_node(name, SHAPE)
    with pytest.raises(ValueError, match="out of range"):
        tnp.Circuit.from_nodes(SHAPE, [name], ("attn", "mlp", "head", "neuron", "head_dim"))


def test_attention_only_models_refuse_neurons_and_their_fraction():
    with pytest.raises(ValueError, match="has no MLPs"):
        parse_node("m0.n1", ATTN_ONLY)
    circuit = tnp.Circuit.from_nodes(ATTN_ONLY, ["a0", "a0.h1"], ("attn", "head"))
    assert circuit.fraction("head") == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="attention-only.*no 'neuron' nodes"):
        circuit.fraction("neuron")


class _FakeModel:
    """Stands in for a model whose hooks are named or shaped differently."""

    def __init__(self, names):
        self.hook_dict = dict.fromkeys(names)


def test_a_missing_gated_hook_is_named_with_its_likely_cause():
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(2)]
    with pytest.raises(ValueError, match=r"no hook 'blocks.0.mlp.hook_post'.*compatibility"):
        check_sites(_FakeModel(names), SHAPE, ("head", "neuron"))
    with pytest.raises(TypeError, match="no hook_dict"):
        check_sites(object(), SHAPE, ("head",))


def test_a_hook_of_unexpected_shape_is_named():
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(2)]

    def probe(hooks):  # hook_z flattened to (batch, pos, head * d_head), as on some bridges
        return {n: torch.zeros(1, 1, 32) for n in hooks}

    with pytest.raises(ValueError, match=r"'blocks.0.attn.hook_z' gives .*\(1, 1, 32\).*4, 8"):
        check_sites(_FakeModel(names), SHAPE, ("head",), probe)
    right = {n: torch.zeros(1, 1, 4, 8) for n in names}
    check_sites(_FakeModel(names), SHAPE, ("head",), lambda hooks: right)

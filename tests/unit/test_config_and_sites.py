import pytest

from tl_nodeprune import ModelShape, PruneConfig

SHAPE = ModelShape("toy", n_layers=2, n_heads=3, d_head=4, d_mlp=5, d_vocab=11)
ATTN_ONLY = ModelShape("attn-only", n_layers=2, n_heads=3, d_head=4, d_mlp=0, d_vocab=11)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"ablation": "resample"}, "corrupted, mean, zero"),
        ({"objective": "l2"}, "kl, logit_diff"),
        ({"granularities": ("heads",)}, "attn, mlp, head, neuron, head_dim"),
        ({"granularities": "head"}, "tuple"),
        ({"penalty": {"head": -1.0}}, "penalty"),
        ({"target_sparsity": {"neuron": 1.5}}, "target_sparsity"),
        ({"threshold": 1.0}, "threshold"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_granularities_default_to_what_the_model_has():
    assert SHAPE.resolve(None) == ("attn", "mlp", "head", "neuron")
    assert ATTN_ONLY.resolve(None) == ("attn", "head")
    assert SHAPE.resolve(("neuron", "head_dim", "attn")) == ("attn", "neuron", "head_dim")


def test_attention_only_model_has_no_mlp_granularity():
    with pytest.raises(ValueError, match="attention-only"):
        ATTN_ONLY.resolve(("head", "neuron"))


def test_default_penalty_is_a_price_per_node():
    cfg = PruneConfig(penalty={"head": 5.0})
    assert cfg.penalty_for("head", SHAPE) == 5.0
    small = cfg.penalty_for("neuron", SHAPE)
    big = cfg.penalty_for("neuron", ModelShape("b", 2, 3, 4, 50, 11))
    assert big == pytest.approx(10 * small)

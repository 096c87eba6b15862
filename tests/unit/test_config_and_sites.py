import dataclasses

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
        ({"batch_size": 2.5}, r"batch_size must be a positive int, got 2.5\."),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0, got -1\."),
        ({"lagrangian_lr": 0.0}, r"lagrangian_lr must be a finite number > 0, got 0.0\."),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \(0, 1\), got 1.0\."),
        ({"target_faithfulness": 1.5}, r"target_faithfulness must be None or in \(0, 1\], got"),
        ({"selection_measure": "f1"}, r"selection_measure must be one of \('metric', 'kl'\)"),
        ({"log_alpha_bounds": (1.0, 2.0)}, r"log_alpha_bounds must be None or \(low, high\)"),
        ({"lr_final": 0.5}, r"lr_final must be None or in \(0, lr=0.2\], got 0.5\."),
        ({"checkpoint": "sometimes"}, "checkpoint must be False, True or 'auto'"),
        ({"penalty": {"layer": 1.0}}, "Unknown granularity 'layer'"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_every_field_carries_its_help():
    for f in dataclasses.fields(PruneConfig):
        assert len(f.metadata.get("help", "").split()) >= 3, f.name


def test_a_fields_own_check_is_the_one_post_init_runs():
    by_name = {f.name: f for f in dataclasses.fields(PruneConfig)}
    by_name["steps"].metadata["check"]("steps", 1)
    with pytest.raises(ValueError, match=r"PruneConfig.steps must be a positive int, got 0\."):
        by_name["steps"].metadata["check"]("steps", 0)
    with pytest.raises(ValueError, match=r"PruneConfig.steps must be a positive int, got 0\."):
        PruneConfig(steps=0)


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

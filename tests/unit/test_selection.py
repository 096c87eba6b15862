"""`select_smallest`: the smallest nested circuit that reaches a faithfulness target."""

import pytest
import torch

from tl_nodeprune.selection import circuit_at, select_smallest
from tl_nodeprune.sites import ModelShape

SHAPE = ModelShape(name="toy", n_layers=2, n_heads=4, d_head=8, d_mlp=16, d_vocab=64)
# heads in gate order: (0,1) first, then (1,2), (1,0), (0,3); every other head far below
ORDER = [(0, 1), (1, 2), (1, 0), (0, 3)]
WORTH = {(0, 1): 0.5, (1, 2): 0.3, (1, 0): 0.1, (0, 3): 0.1}


def _log_alpha() -> dict[str, torch.Tensor]:
    la = torch.full((2, 4), -5.0)
    for rank, (layer, h) in enumerate(ORDER):
        la[layer, h] = 4.0 - rank
    return {"head": la}


def _additive_score(circuit) -> float:
    """A model where each kept head adds its worth: faithfulness rises as heads are added."""
    return sum(WORTH.get(tuple(h), 0.0) for h in circuit.heads)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.5, ORDER[:1]), (0.75, ORDER[:2]), (0.85, ORDER[:3]), (0.95, ORDER)],
)
def test_chooses_the_smallest_circuit_that_meets_the_target(target, expected):
    chosen = select_smallest(_log_alpha(), SHAPE, _additive_score, target)
    assert sorted(chosen.circuit.heads) == sorted(expected)
    assert chosen.faithfulness == pytest.approx(sum(WORTH[h] for h in expected))
    curve = chosen.curve
    assert curve.faithfulness.is_monotonic_increasing  # rows go from small to large circuits
    smaller = curve[curve.kept_head < len(expected)]
    assert not smaller.meets_target.any()


def test_unreachable_target_returns_the_most_faithful_circuit_and_says_so():
    chosen = select_smallest(_log_alpha(), SHAPE, lambda c: min(0.6, _additive_score(c)), 0.9)
    assert not chosen.curve.meets_target.any()
    assert chosen.faithfulness == pytest.approx(0.6)
    assert sorted(chosen.circuit.heads) == sorted(ORDER[:2])  # the smallest of the best


def _overshooting_score(circuit) -> float:
    """Heads (0,1) and (1,2) alone beat the model (f 1.3); (1,0) works against the answer's
    overshoot and brings f to 1.05; (0,3) takes it to 0.98, where the heads below leave it."""
    return {0: 0.0, 1: 0.6, 2: 1.3, 3: 1.05}.get(len(circuit.heads), 0.98)


def test_a_band_skips_circuits_that_beat_the_model_and_the_nearest_wins_when_none_is_in_it():
    chosen = select_smallest(_log_alpha(), SHAPE, _overshooting_score, 0.9)
    assert sorted(chosen.circuit.heads) == sorted(ORDER[:2])  # no ceiling: the overshoot
    chosen = select_smallest(_log_alpha(), SHAPE, _overshooting_score, 0.9, upper=1.1)
    assert sorted(chosen.circuit.heads) == sorted(ORDER[:3])
    assert chosen.faithfulness == pytest.approx(1.05)
    assert chosen.circuit.meta["selection"]["upper"] == 1.1
    curve = chosen.curve.groupby("kept_head").meets_target.all()
    assert not curve[2] and curve[3] and curve[4]
    # no circuit within [0.99, 1.01]: the one nearest the band (0.98, 0.01 below it)
    chosen = select_smallest(_log_alpha(), SHAPE, _overshooting_score, 0.99, upper=1.01)
    assert not chosen.curve.meets_target.any()
    assert sorted(chosen.circuit.heads) == sorted(ORDER)


def test_threshold_zero_is_the_default_circuit():
    la = _log_alpha()["head"]
    circuit = circuit_at(SHAPE, {"head": la}, 0.0)
    assert circuit.kept("head").equal(la > 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("target_faithfulness", 1.5), ("target_faithfulness", 0.0), ("validation_fraction", 1.0),
     ("selection_measure", "accuracy")],
)  # fmt: skip
def test_config_rejects_bad_selection_settings_by_name(field, value):
    from tl_nodeprune import PruneConfig

    with pytest.raises(ValueError, match=field):
        PruneConfig(**{field: value})


@pytest.mark.parametrize("bounds", [(1.0, 6.0), (-4.0, -1.0), (-4.0,)])
def test_config_rejects_bad_log_alpha_bounds(bounds):
    from tl_nodeprune import PruneConfig

    with pytest.raises(ValueError, match="log_alpha_bounds"):
        PruneConfig(log_alpha_bounds=bounds)


@pytest.mark.parametrize("progress", [True, False])
def test_the_selection_bar_counts_every_circuit_it_scores_and_stays_quiet_when_asked(
    progress, capsys
):
    scored = []

    def score(circuit) -> float:
        scored.append(len(circuit.heads))
        return _additive_score(circuit)

    select_smallest(_log_alpha(), SHAPE, score, 0.85, progress=progress)
    err = capsys.readouterr().err
    if progress:  # a minutes-long pass after training's bar ends: it shows how far it is
        assert "selecting" in err and f"{len(scored)}/" in err.replace("\r", "\n").splitlines()[-1]
    else:
        assert "selecting" not in err

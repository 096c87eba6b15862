import pytest
import torch

from tl_nodeprune.gates import GateSet, HardConcrete
from tl_nodeprune.sites import ModelShape

HC = HardConcrete()


def test_deterministic_gate_is_open_exactly_when_log_alpha_positive():
    la = torch.tensor([-5.0, -0.01, 0.01, 5.0])
    gate = HC.deterministic(la)
    assert ((gate > 0.5) == (la > 0)).all()
    assert gate[0] == 0.0 and gate[-1] == 1.0  # the stretch reaches the ends exactly


def test_expected_l0_matches_monte_carlo():
    la = torch.tensor([-2.0, 0.0, 1.5]).repeat(20000, 1)
    samples = HC.sample(la, torch.Generator().manual_seed(0))
    assert samples.min() >= 0 and samples.max() <= 1
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, HC.expected_l0(la[0]), atol=0.015)


def test_sample_is_differentiable_and_seeded():
    la = torch.zeros(50, requires_grad=True)
    a = HC.sample(la, torch.Generator().manual_seed(1))
    b = HC.sample(la, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    a.sum().backward()
    assert la.grad is not None and la.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"gamma": 0.1}, {"zeta": 0.9}])
def test_bad_hard_concrete_parameters_raise(kwargs):
    with pytest.raises(ValueError, match="HardConcrete"):
        HardConcrete(**kwargs)


def test_gateset_shapes_follow_the_model():
    shape = ModelShape("m", n_layers=3, n_heads=4, d_head=8, d_mlp=16, d_vocab=10)
    gates = GateSet(shape, ("attn", "head", "neuron", "head_dim"), init_log_alpha=2.0)
    sampled = gates.sample(torch.Generator().manual_seed(0))
    assert {g: tuple(t.shape) for g, t in sampled.items()} == {
        "attn": (3,),
        "head": (3, 4),
        "neuron": (3, 16),
        "head_dim": (3, 4, 8),
    }
    # the closed form agrees with the share of sampled gates that are open
    with torch.no_grad():
        draws = [gates.sample(torch.Generator().manual_seed(i)) for i in range(300)]
    for g, expected in gates.expected_l0().items():
        open_share = torch.stack([(d[g] > 0).float().mean() for d in draws]).mean()
        assert open_share.item() == pytest.approx(expected.item(), abs=0.01), g


def test_clamp_bounds_every_log_alpha_and_keeps_a_closed_gate_reopenable():
    from tl_nodeprune.gates import GateSet
    from tl_nodeprune.sites import ModelShape

    shape = ModelShape(name="toy", n_layers=2, n_heads=4, d_head=8, d_mlp=16, d_vocab=64)
    gates = GateSet(shape, ("head", "neuron"), init_log_alpha=3.0)
    with torch.no_grad():
        gates.log_alpha["head"].fill_(-17.0)
        gates.log_alpha["neuron"].fill_(9.0)
    gen = torch.Generator().manual_seed(0)
    never = torch.stack([gates.sample(gen)["head"] for _ in range(200)])
    assert (never == 0).all(), "at -17 a gate samples 0 and so gets no gradient"
    gates.clamp_(-4.0, 6.0)
    assert (gates.log_alpha["head"] == -4.0).all() and (gates.log_alpha["neuron"] == 6.0).all()
    samples = torch.stack([gates.sample(gen)["head"] for _ in range(200)])
    assert (samples > 0).float().mean() > 0.02, "at the bound some samples open again"


def test_per_example_draws_are_independent_rows_with_the_shared_draws_distribution():
    hc = HardConcrete()
    log_alpha = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    rows = hc.sample(log_alpha, torch.Generator().manual_seed(0), batch=100_000)
    assert rows.shape == (100_000, 3)
    assert not torch.equal(rows[0], rows[1])
    shared = torch.stack([hc.sample(log_alpha, torch.Generator().manual_seed(s))
                          for s in range(5_000)])  # fmt: skip
    torch.testing.assert_close(rows.mean(0), shared.mean(0), atol=0.025, rtol=0)
    torch.testing.assert_close((rows > 0).float().mean(0), hc.expected_l0(log_alpha).detach(),
                               atol=0.01, rtol=0)  # fmt: skip
    rows.sum().backward()
    assert (log_alpha.grad > 0).all()

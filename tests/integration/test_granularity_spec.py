"""A granularity is one spec: a toy one registered here, and nothing else, works end to end.

The toy granularity gates the MLP's output dimensions (`blocks.{l}.hook_mlp_out`, one gate per
residual dimension, named `m3.o5`), which the method's authors also gate. Nothing in the
package names it: if a module kept its own table of granularities (hooks, shapes, names,
parents, prices), one of these steps would miss it.
"""

from __future__ import annotations

import pytest
import torch

import tl_nodeprune as tnp
from tl_nodeprune.circuit import parse_node
from tl_nodeprune.cli import discover_config
from tl_nodeprune.granularities import SPECS, GranularitySpec, node_name
from tl_nodeprune.planted import planted_problem

TOY = GranularitySpec(
    name="mlp_out_dim",
    hook="blocks.{layer}.hook_mlp_out",
    unit_axes=("d_model",),
    activation_axes=("d_model",),
    letters=("m", "o"),
    price=0.03,
    parent="mlp",
    default=False,
    view="strip",
    noun="MLP output dimension",
)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> GranularitySpec:
    monkeypatch.setitem(SPECS, TOY.name, TOY)
    return TOY


@pytest.fixture
def problem(flavour):
    return planted_problem(flavour, seed=0, n_prompts=64)


def test_names_units_and_hierarchy_derive_from_the_spec(toy, problem):
    shape = tnp.ModelShape.from_model(problem.model)
    assert shape.units(toy.name) == (shape.n_layers, shape.d_model)
    assert node_name(toy.name, (1, 7)) == "m1.o7"
    assert parse_node("m1.o7", shape) == (toy.name, (1, 7))
    with pytest.raises(ValueError, match="out of range"):
        parse_node(f"m0.o{shape.d_model}", shape)
    argv = ["--granularities", "mlp", toy.name, "--penalty", f"{toy.name}=2"]
    assert discover_config(argv).granularities == ("mlp", toy.name)
    gates = {"mlp": torch.tensor([1.0] + [0.0] * (shape.n_layers - 1)),
             toy.name: torch.ones(shape.units(toy.name))}  # fmt: skip
    circuit = tnp.Circuit(shape, gates)
    # a dimension inside a pruned MLP block is pruned
    assert circuit.kept(toy.name).sum(1).tolist() == [shape.d_model] + [0] * (shape.n_layers - 1)


def test_closing_every_output_dimension_is_closing_the_block(toy, problem):
    """The gates reach the hook: all dimensions closed = the MLP block closed, exactly."""
    model, task = problem.model, problem.task
    shape = tnp.ModelShape.from_model(model)
    evaluator = tnp.Evaluator(model, task, granularities=("attn", "mlp", toy.name))
    full_blocks = {"attn": torch.ones(shape.n_layers), "mlp": torch.ones(shape.n_layers)}
    mlp_closed = {**full_blocks, "mlp": torch.zeros(shape.n_layers)}
    dims_closed = {**full_blocks, toy.name: torch.zeros(shape.units(toy.name))}
    dims_open = {**full_blocks, toy.name: torch.ones(shape.units(toy.name))}
    by_block = evaluator(tnp.Circuit(shape, mlp_closed))
    by_dims = evaluator(tnp.Circuit(shape, dims_closed))
    assert by_dims.kl == pytest.approx(by_block.kl, abs=1e-6)
    assert by_dims.kl > 1e-3, "closing every MLP must change this planted model's output"
    assert evaluator(tnp.Circuit(shape, dims_open)).kl == pytest.approx(0.0, abs=1e-6)


def test_fit_save_load_evaluate_compare_plot_and_report(toy, problem, tmp_path):
    model, task = problem.model, problem.task
    config = tnp.PruneConfig(
        progress=False, granularities=("attn", "mlp", toy.name)
    )
    result = tnp.NodePruner(model, config).fit(task)
    circuit = result.circuit
    shape = circuit.shape
    assert set(circuit.gates) == {"attn", "mlp", toy.name}
    # the default price reached the loss: unit count x price on the mean expected L0
    expected = toy.price * shape.n_layers * shape.d_model
    assert config.penalty_for(toy.name, shape) == pytest.approx(expected)
    assert f"sparsity_{toy.name}" in result.history.columns
    assert f"kept_{toy.name}" in result.history.columns
    kept = circuit.n_kept(toy.name)
    assert 0 < kept < shape.n_layers * shape.d_model, "the price must prune some dimensions"
    assert all(parse_node(n)[0] in circuit.gates for n in circuit.nodes)
    assert any(n.count(".o") == 1 for n in circuit.nodes)

    loaded = tnp.Circuit.load(circuit.save(tmp_path / "toy.json"))
    assert loaded.nodes == circuit.nodes
    assert torch.equal(loaded.gates[toy.name], circuit.gates[toy.name])

    before, after = tnp.evaluate(model, circuit, task), tnp.evaluate(model, loaded, task)
    assert before.kl == pytest.approx(after.kl, abs=1e-9)
    no_dims = tnp.Circuit(shape, {**circuit.gates, toy.name: torch.zeros(shape.units(toy.name))})
    assert tnp.evaluate(model, no_dims, task).kl > before.kl, "kept dimensions must matter"

    table = tnp.compare_circuits({"toy": circuit, "blocks": tnp.Circuit.full(shape)}, model, task)
    assert table.loc["toy", toy.name] == kept
    assert f"J_{toy.name}[blocks]" in table.columns

    fig = tnp.plot.units(circuit, toy.name)
    assert f"{kept}/{shape.n_layers * shape.d_model} kept" in fig.layout.title.text
    page = tnp.report(result, tmp_path / "toy.html").read_text()
    assert "MLP output dimensions:" in page


def test_register_granularity_adds_one_and_refuses_clashes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("tl_nodeprune.granularities.SPECS", dict(SPECS))
    from tl_nodeprune import granularities

    granularities.register_granularity(TOY)
    assert granularities.spec(TOY.name) is TOY
    assert granularities.parse_node_name("m2.o4") == (TOY.name, (2, 4))
    with pytest.raises(ValueError, match="already registered"):
        granularities.register_granularity(TOY)
    with pytest.raises(ValueError, match="are taken"):  # m3.n5 would name two kinds of node
        granularities.register_granularity(
            GranularitySpec("neuron_copy", "blocks.{layer}.mlp.hook_pre", ("d_mlp",), ("d_mlp",),
                            ("m", "n"), 0.002, parent="mlp")  # fmt: skip
        )
    with pytest.raises(ValueError, match="not registered"):
        granularities.register_granularity(
            GranularitySpec("orphan", "blocks.{layer}.hook_resid_post", (), ("d_model",), ("r",),
                            0.03, parent="residual")  # fmt: skip
        )
    with pytest.raises(ValueError, match="first activation axes"):
        GranularitySpec("bad", "blocks.{layer}.attn.hook_z", ("d_head",), ("n_heads", "d_head"),
                        ("a", "x"), 0.01)  # fmt: skip

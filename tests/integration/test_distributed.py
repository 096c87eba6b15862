"""Data parallel and seeds across ranks on torch.distributed: two gloo processes on CPU.

Each test spawns two processes (torch.multiprocessing, a free local port, one thread each)
that train on a planted model and save what they learned; the parent compares it with the
same runs in one process. Tolerance: float32 sums of two half-batch gradients differ from
one full-batch sum in the last bits, and Adam carries that over the steps; 1e-4 on
log_alpha (which moves by ~0.2 per step) is far below any change of the circuit.
"""

from __future__ import annotations

import contextlib
import io
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tl_nodeprune as tnp
from tests.conftest import hook_count
from tl_nodeprune import cli, distributed
from tl_nodeprune.objectives import kl_divergence
from tl_nodeprune.planted import planted_problem

TOLERANCE = 1e-4
STEPS = 30
CONFIGS: dict[str, dict[str, Any]] = {
    "penalties": {},
    "target_sparsity": {"target_sparsity": {"head": 0.75, "neuron": 0.9}, "warmup_steps": 10},
    "target_kl_logit_diff": {"objective": "logit_diff", "target_kl": 0.2},
    # one noise draw per prompt, drawn for the global batch: each rank keeps its rows
    "gate_noise_example": {"gate_noise": "example"},
}


def _config(**overrides: Any) -> tnp.PruneConfig:
    settings = {"steps": STEPS, "batch_size": 8, "progress": False, "log_every": 10}
    return tnp.PruneConfig(**(settings | overrides))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: str, out: Path) -> None:
    """Run `job` on two gloo ranks; each saves its findings to out/rank{r}.pt."""
    mp.spawn(_worker, args=(2, _free_port(), job, str(out)), nprocs=2, join=True)


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    """One rank: join the group, run `job`, save what it returns."""
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting by a regression fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        found = JOBS[job](Path(out) / "cli") if job == "cli" else JOBS[job]()
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fits() -> dict[str, Any]:
    """Every config of CONFIGS on the planted problem: log_alphas, nodes, history, meta."""
    problem = planted_problem("bridge-native", seed=0)
    found = {}
    for name, overrides in CONFIGS.items():
        result = tnp.NodePruner(problem.model, _config(**overrides)).fit(problem.task)
        found[name] = {
            "log_alpha": result.log_alpha,
            "nodes": sorted(result.circuit.nodes),
            "history": result.history,
            "meta": dict(result.circuit.meta),
        }
    try:
        tnp.NodePruner(problem.model, _config(batch_size=7)).fit(problem.task)
    except distributed.RankFailed as error:
        found["odd_batch"] = str(error)
    return found


class _FailsOnRankOne:
    """A KL objective that raises on rank 1 at its fourth call (step 3)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, circuit: torch.Tensor, full: torch.Tensor, task: Any) -> torch.Tensor:
        self.calls += 1
        if distributed.rank() == 1 and self.calls == 4:
            raise ValueError("planted failure")
        return kl_divergence(full, circuit)


def _failing() -> dict[str, Any]:
    """A fit whose rank 1 raises midway: the error each rank sees and its hooks after."""
    problem = planted_problem("bridge-native", seed=0)
    config = _config(objective=_FailsOnRankOne())
    try:
        tnp.NodePruner(problem.model, config).fit(problem.task)
        error = None
    except distributed.RankFailed as caught:
        error = f"{type(caught).__name__}: {caught}"
    return {"error": error, "hooks": hook_count(problem.model)}


def _seeds() -> dict[str, Any]:
    """fit_seeds over three seeds, dealt over the ranks."""
    problem = planted_problem("bridge-native", seed=0)
    spread = tnp.NodePruner(problem.model, _config()).fit_seeds(problem.task, seeds=(3, 1, 2))
    return {
        "consensus": spread.consensus(),
        "log_alpha": {s: r.log_alpha for s, r in spread.results.items()},
        "ranks": distributed.world(),
    }


def _cli(out: Path) -> dict[str, Any]:
    """`tl-nodeprune discover` on the planted model, each rank told to write under its own
    folder of `out`: what it printed and which files it wrote."""
    folder = out / f"rank{distributed.rank()}"
    folder.mkdir()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(["discover", "--model", "planted", "--task", "planted", "--n-prompts", "64",
                  "--steps", "10", "--no-progress", "--out", str(folder / "c.json")])  # fmt: skip
    return {"printed": printed.getvalue(), "files": sorted(p.name for p in folder.iterdir())}


JOBS = {"fits": _fits, "failing": _failing, "seeds": _seeds, "cli": _cli}


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """The fits on two ranks (rank 0, rank 1) and in this one process."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fits")
    _spawn("fits", out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks[0], ranks[1], _fits()


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[g] - b[g]).abs().max().item() for g in a)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_learn_what_one_process_learns_on_the_same_global_batch(fits, name):
    rank0, rank1, single = (f[name] for f in fits)
    # Identical on every rank: each applied the same reduced gradients.
    assert _max_gap(rank0["log_alpha"], rank1["log_alpha"]) == 0.0
    gap = _max_gap(rank0["log_alpha"], single["log_alpha"])
    print(f"{name}: max |log_alpha(2 ranks) - log_alpha(1 process)| = {gap:.3g}")
    assert gap < TOLERANCE
    moved = _max_gap(single["log_alpha"], {g: torch.full_like(t, 3.0)
                                           for g, t in single["log_alpha"].items()})  # fmt: skip
    assert moved > 1.0  # the gates did train, so equality is not trivial
    assert rank0["nodes"] == single["nodes"] and single["nodes"]
    # The history records the global batch's loss and terms, not one shard's.
    assert list(rank0["history"].columns) == list(single["history"].columns)
    torch.testing.assert_close(
        torch.tensor(rank0["history"].to_numpy()),
        torch.tensor(single["history"].to_numpy()),
        rtol=1e-4,
        atol=1e-5,
    )
    assert rank0["meta"]["ranks"] == 2 and "ranks" not in single["meta"]


def test_a_shard_alone_learns_something_else(fits):
    """Guards the test above: without the reduction, one rank's half batch would differ."""
    single = fits[2]
    problem = planted_problem("bridge-native", seed=0)
    half = tnp.NodePruner(problem.model, _config(batch_size=4)).fit(problem.task)
    assert _max_gap(half.log_alpha, single["penalties"]["log_alpha"]) > 100 * TOLERANCE


def test_a_rank_that_fails_midway_is_named_on_every_rank_and_leaves_no_hooks(tmp_path):
    _spawn("failing", tmp_path)
    for r in range(2):
        seen = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert seen["error"] == "RankFailed: rank 1 failed at step 3: ValueError: planted failure"
        assert seen["hooks"] == 0


def test_seeds_across_two_ranks_give_the_spread_of_the_seeds_one_after_another(tmp_path):
    torch.set_num_threads(1)
    _spawn("seeds", tmp_path)
    problem = planted_problem("bridge-native", seed=0)
    alone = tnp.NodePruner(problem.model, _config()).fit_seeds(problem.task, seeds=(3, 1, 2))
    for r in range(2):
        seen = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert seen["ranks"] == 2
        assert list(seen["log_alpha"]) == [3, 1, 2]
        for seed, result in alone.results.items():
            assert _max_gap(seen["log_alpha"][seed], result.log_alpha) == 0.0
        assert seen["consensus"].equals(alone.consensus())


def test_odd_batches_are_refused_on_every_rank(fits):
    for found in fits[:2]:
        assert found["odd_batch"].startswith(
            "every rank (2) failed at step 0: ValueError: PruneConfig.batch_size (7) must divide "
            "by the number of ranks (2)"
        )


def test_under_torchrun_the_cli_writes_the_circuit_on_rank_zero_only(tmp_path):
    (tmp_path / "cli").mkdir()
    _spawn("cli", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert rank0["files"] == ["c.json"] and rank1["files"] == []
    assert rank0["printed"].startswith("data parallel over 2 ranks (gloo)\n")
    assert "wrote" in rank0["printed"] and rank1["printed"] == ""
    circuit = tnp.Circuit.load(tmp_path / "cli" / "rank0" / "c.json")
    assert circuit.meta["ranks"] == 2 and circuit.meta["steps"] == 10

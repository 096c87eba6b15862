"""Discovery on torch.distributed: data parallel over prompts, and seeds across ranks.

Under an initialised process group (torchrun sets one up for `tl-nodeprune discover`; gloo
between CPU processes, NCCL between GPUs) every rank holds the model, the gates and the
reference run, and draws the same global batch and the same gate noise as one process
would; `shard_plan` keeps rank r's slice of each batch. After `backward`, `sync_step`
replaces each gate gradient and the faithfulness loss by their example-weighted mean over
the ranks (one all-reduce of the gates' size), so every rank applies the same Adam step and
keeps identical gates: N processes give one process's circuit for the same global batch.
The Lagrange multipliers follow the (identical) gates and need nothing; a KL budget's KL
is a batch statistic and goes through `mean_over_ranks`.

Every collective of a run carries a failure flag: a rank whose step raises sends the flag
instead of its gradients (`guard`), and every rank then raises `RankFailed` naming the rank
and its error, unwinding the hooks as any exception does, instead of waiting forever.
That one flag is read on the host once per step (a synchronisation a single process skips).

`map_seeds` runs whole discoveries (one seed each) on separate ranks, without communication
inside a run (`local`), and gathers them on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
_LOCAL: ContextVar[bool] = ContextVar("tl_nodeprune_local", default=False)


@dataclass
class _Session:
    """A guarded training run: the size every collective pads to, and steps synchronised."""

    size: int
    device: torch.device
    steps: int = 0


_SESSION: ContextVar[_Session | None] = ContextVar("tl_nodeprune_session", default=None)


class RankFailed(RuntimeError):
    """One or more ranks of a distributed run raised; the message names each and its error."""


def active() -> bool:
    """True under an initialised process group of several ranks, outside `local`."""
    return (
        not _LOCAL.get()
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def world() -> int:
    """The number of ranks a run here trains on (1 outside a process group or in `local`)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank among `world()` (0 outside a process group or in `local`)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes results and prints progress (rank 0)."""
    return rank() == 0


def meta() -> dict[str, int]:
    """What a circuit's meta records about the ranks it was trained on ({} for one)."""
    return {"ranks": world()} if active() else {}


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Runs inside train on this rank alone (seeds across ranks), whatever the process group."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


@contextlib.contextmanager
def launched(device: str | None) -> Iterator[str | None]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), and
    yield the device this rank should use: its own GPU under NCCL, else `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if gpu else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def shard_plan(plan: T) -> T:
    """A `training.BatchPlan` cut to this rank's slice of each global batch (contiguous,
    rank 0 first; sizes differ by at most one where an epoch's last batch does not divide)."""
    n, r = world(), rank()
    if n == 1:
        return plan
    sizes = [len(idx) for idx in plan.indices]  # type: ignore[attr-defined]
    if max(sizes) % n or min(sizes) < n:
        raise ValueError(
            f"PruneConfig.batch_size ({max(sizes)}) must divide by the number of ranks ({n}), "
            f"and every batch must hold at least {n} examples (smallest: {min(sizes)})."
        )
    indices = [idx.tensor_split(n)[r] for idx in plan.indices]  # type: ignore[attr-defined]
    rows = plan.rows  # type: ignore[attr-defined]
    if rows is not None:
        rows = [_slice(row, n, r) for row in rows]
    return replace(plan, indices=indices, rows=rows)  # type: ignore[type-var]


def shard_rows(values: Tensor) -> Tensor:
    """This rank's rows of a tensor drawn for the whole global batch (per-example gate noise),
    cut as `shard_plan` cuts the batch, so every rank sees the draws one process would."""
    n = world()
    return values if n == 1 else values.tensor_split(n)[rank()]


def _slice(values: Sequence[int], n: int, r: int) -> list[int]:
    """Part r of n of `values`, cut as `Tensor.tensor_split` cuts."""
    q, extra = divmod(len(values), n)
    start = r * q + min(r, extra)
    return list(values[start : start + q + (r < extra)])


@contextlib.contextmanager
def guard(n_gates: int, device: Any) -> Iterator[None]:
    """A distributed training run of `n_gates` gate values on `device`: a rank that raises
    inside tells the others, and every rank raises `RankFailed`; a clean exit ends with a
    handshake, so that a late failure on one rank still reaches the others."""
    if not active():
        yield
        return
    session = _Session(n_gates + 2, torch.device(device))
    token = _SESSION.set(session)
    try:
        try:
            yield
        except RankFailed:
            raise
        except Exception as error:
            _exchange(torch.zeros(0), failed=error)
            raise  # not reached: _exchange raises RankFailed from `error`
        _exchange(torch.zeros(0))
    finally:
        _SESSION.reset(token)


def _exchange(payload: Tensor, failed: BaseException | None = None) -> Tensor:
    """Sum `payload` over the ranks, padded to the session's size, with a failure flag."""
    session = _SESSION.get()
    size = payload.numel() if session is None else session.size
    device = payload.device if session is None else session.device
    buffer = torch.zeros(size + 1, device=device)
    buffer[: payload.numel()] = payload.to(device)
    buffer[-1] = failed is not None
    dist.all_reduce(buffer)
    if buffer[-1].item() > 0:  # the one host read per collective
        _raise_failure(failed, session.steps if session else None)
    return buffer[:-1]


def _raise_failure(failed: BaseException | None, step: int | None) -> None:
    """Gather every failed rank's error and raise it, on every rank."""
    mine = None if failed is None else f"{type(failed).__name__}: {failed}"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    where = "" if step is None else f" at step {step}"
    if len(set(gathered)) == 1:  # the same error everywhere, e.g. a bad setting
        raise RankFailed(f"every rank ({len(gathered)}) failed{where}: {mine}") from failed
    lines = [f"rank {r} failed{where}: {m}" for r, m in enumerate(gathered) if m is not None]
    raise RankFailed("; ".join(lines)) from failed


def sync_step(
    params: Iterable[Tensor], loss: Tensor, faith: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """After `backward` on this rank's `n` examples: every gate gradient and the faithfulness
    loss become their means over the global batch, on every rank (an objective must be a
    mean over examples, as the built-in ones are). Returns the loss and faithfulness the
    history records; a no-op on one rank."""
    if not active():
        return loss, faith
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    weight = float(n)
    payload = torch.cat([g.detach().flatten() * weight for g in grads]
                        + [faith.detach().float().reshape(1) * weight,
                           torch.full((1,), weight, device=faith.device)])  # fmt: skip
    total = _exchange(payload)
    session = _SESSION.get()
    if session is not None:
        session.steps += 1
    count = total[payload.numel() - 1]
    mean = total[: payload.numel()] / count
    start = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = mean[start : start + g.numel()].view_as(g).to(g.dtype)
        start += g.numel()
    mean_faith = mean[start].to(faith.dtype)
    return loss.detach() - faith.detach() + mean_faith, mean_faith


def mean_over_ranks(value: Tensor, n: int) -> Tensor:
    """The example-weighted mean over the ranks of a per-rank batch mean (`n` examples here)."""
    if not active():
        return value
    total = _exchange(torch.stack([value.detach().float() * n, value.new_tensor(float(n)).float()]))
    return (total[0] / total[1]).to(value.dtype)


def map_seeds(fit: Callable[[int], T], seeds: Sequence[int]) -> dict[int, T]:
    """`fit(seed)` for each seed, the seeds dealt round-robin over the ranks (each run on its
    own rank, `local`), gathered on every rank in the order of `seeds`."""
    if not active():
        return {s: fit(s) for s in seeds}
    failed: Exception | None = None
    try:
        with local():
            mine: Any = {s: fit(s) for s in seeds[rank() :: world()]}
    except Exception as error:  # told to every rank below, then raised
        failed, mine = error, f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world()
    dist.all_gather_object(gathered, mine)
    errors = [f"rank {r} failed: {m}" for r, m in enumerate(gathered) if isinstance(m, str)]
    if errors:
        raise RankFailed("; ".join(errors)) from failed
    merged = {s: result for part in gathered for s, result in part.items()}
    return {s: merged[s] for s in seeds}


__all__ = [
    "RankFailed",
    "active",
    "guard",
    "is_main",
    "launched",
    "local",
    "map_seeds",
    "mean_over_ranks",
    "meta",
    "rank",
    "shard_plan",
    "sync_step",
    "world",
]

"""Data-parallel discovery: step time and memory per rank with 1 and 2 gloo processes.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/distributed.py [--steps 10] [--batch 64]

Each point is a fresh group of processes (torch.multiprocessing, one thread each, gloo on
CPU) training the same global batch on a planted model (`tl_nodeprune.planted`, all four
granularities) through `NodePruner.training` and `PruneRun.step`, the code `fit` runs, so
that rank r trains on its slice of every batch and the gate gradients are all-reduced.
Step time is the median over the steps after the first two, in wall-clock seconds and in
this process's CPU seconds (which other jobs sharing the cores do not inflate); memory is
each rank's peak resident set while training over what it held once the model and task
were loaded (Linux VmHWM, reset then); allreduce_ms times that step's one all-reduce alone,
after training. Bytes per step are the all-reduced buffer: every gate's gradient, the
faithfulness loss, the example count and the failure flag, in float32 (a ring all-reduce
sends about 2(N-1)/N of it per rank); the activations never travel.
Writes docs/generated/distributed.md and .csv, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import GENERATED, pipe_table, reset_peak_rss, status_bytes

MIB = 2**20
# The planted model grown so that a step is mostly model work rather than Python overhead.
MODEL = dict(n_layers=4, n_heads=8, d_mlp=512, d_head=32, d_vocab=2000)  # d_model 256


def rank_point(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank of one point: join the group (if several), train, save this rank's numbers."""
    import torch
    import torch.distributed as dist

    import tl_nodeprune as tnp
    from tl_nodeprune.planted import planted_problem

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    problem = planted_problem(
        "bridge-native", seed=0, n_prompts=args.prompts, seq=args.seq, **MODEL
    )
    config = tnp.PruneConfig(
        steps=args.steps, batch_size=args.batch, progress=False, checkpoint=False
    )
    reset_peak_rss()
    loaded = status_bytes("VmRSS")
    pruner = tnp.NodePruner(problem.model, config)
    times, cpu = [], []
    with pruner.training(problem.task) as run:
        for step in range(args.steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            run.step(step)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        n_gates = sum(p.numel() for p in run.gates.parameters())
    row = {
        "ranks": world, "rank": rank, "batch_per_rank": args.batch // world,
        "step_s": round(statistics.median(times[2:]), 4),
        "step_cpu_s": round(statistics.median(cpu[2:]), 4),
        "extra_mib": round((status_bytes("VmHWM") - loaded) / MIB, 1),
        "peak_rss_mib": round(status_bytes("VmHWM") / MIB, 1),
        "bytes_per_step": 0 if world == 1 else (n_gates + 3) * 4,
        "gates": n_gates,
        "allreduce_ms": _allreduce_ms(n_gates + 3) if world > 1 else 0.0,
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def _allreduce_ms(size: int, repeats: int = 50) -> float:
    """Median milliseconds of one all-reduce of `size` float32 values, the step's buffer."""
    import torch
    import torch.distributed as dist

    buffer, times = torch.zeros(size), []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def measure(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every rank's row for `world` processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_point, args=(world, port, args, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown page and the CSV under `args.out`; returns the table."""
    columns = list(rows[0])
    table = pipe_table(columns, [[row[c] for c in columns] for row in rows])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.csv").write_text(
        "\n".join([",".join(columns), *(",".join(str(r[c]) for c in columns) for r in rows)]) + "\n"
    )
    shape = ", ".join(f"{k} {v}" for k, v in MODEL.items())
    (out / "distributed.md").write_text(
        "<!-- written by bench/distributed.py; do not edit by hand -->\n"
        "# Data-parallel discovery: 1 and 2 gloo processes on CPU\n\n"
        f"Planted model ({shape}), all four granularities, global batch {args.batch} of "
        f"{args.seq} tokens, {args.steps} steps (median over the steps after the first two), "
        f"one thread per process; the machine's load average was {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores when the table was written:\n\n"
        f"`PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/distributed.py "
        f"--steps {args.steps} --batch {args.batch}`\n\n{table}\n"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="global batch (even)")
    parser.add_argument("--seq", type=int, default=32, help="prompt length (at most 32)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--out", default=str(GENERATED))
    args = parser.parse_args()
    rows = measure(1, args) + measure(2, args)
    print(write(rows, args))


if __name__ == "__main__":
    main()

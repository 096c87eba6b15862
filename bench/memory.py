"""Memory and step time: node pruning vs edge pruning vs the floor, each point in a fresh process.

    PYTHONPATH=. python bench/memory.py [--device cpu|cuda] [--threads 2] [--limit-gib 18]

Methods, each one training step on a random GPT-2-small-shaped model (fp32), KL objective on
the answer position, corrupted ablation with the corrupted activations cached up front:
  node:  NodePruner's own step (`NodePruner.training(task)`, then `PruneRun.step`, the code
         `fit` runs: hooks, ablation, KL, sparsity terms, history) with attention-block,
         MLP-block, head and neuron gates and `PruneConfig(checkpoint=False)`;
  node-ckpt: the same step with every block checkpointed (`PruneConfig(checkpoint=True)`);
  edge:  edge pruning's step (a hard-concrete mask on every edge, each reader's input rebuilt
         from every writer, `tl_nodeprune.baselines.graph`);
  floor: a frozen forward and backward with one hard-concrete mask per head.
Memory is the peak over the loaded model and task (RSS high-water mark on CPU, reset after
loading; `torch.cuda.max_memory_allocated` on a GPU): everything the run creates counts,
the corrupted cache included. Time is the median of the timed steps after one warm-up step.
Points whose memory, extrapolated from a smaller point of the same method, would pass
`--limit-gib` are skipped and marked. Writes docs/generated/benchmark{_cuda}.md and .csv, and
nothing else: the prose about them is docs/benchmark.md. `--rows` with that CSV rewrites the
tables without measuring anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    GENERATED,
    GIB,
    pipe_table,
    read_rows,
    reset_peak_rss,
    run_fresh,
    status_bytes,
)

MAIN = [(12, 8, 64), (12, 32, 64)]  # (n_layers, batch, seq)
SCALING = [(12, 8, 32), (12, 8, 128), (6, 8, 64), (24, 8, 64)]
METHODS = ("floor", "node", "node-ckpt", "edge")
NODE_GRANULARITIES = ("attn", "mlp", "head", "neuron")


def run_point(method: str, n_layers: int, batch: int, seq: int, device: str, steps: int) -> dict:
    """One measurement, in this process (call it in a fresh one)."""
    import torch

    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.pruner import NodePruner, PruneConfig
    from tl_nodeprune.sites import frozen
    from tl_nodeprune.tasks.base import PromptTask

    model = tiny_model("bridge-native", n_layers=n_layers, n_heads=12, d_head=64, d_mlp=3072,
                       d_vocab=50257, n_ctx=max(1024, seq)).to(device)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (2, batch, seq), generator=gen)
    answers = torch.randint(0, 50257, (2, batch), generator=gen)
    task = PromptTask.from_tokens(tokens[0], tokens[1], answers[0], (answers[0] + 1) % 50257)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = status_bytes("VmRSS")

    def timed(step_fn, step: int) -> float:
        start = time.perf_counter()
        step_fn(step)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if method.startswith("node"):  # the step `NodePruner.fit` runs, through its own code
        config = PruneConfig(steps=steps + 1, batch_size=batch, granularities=NODE_GRANULARITIES,
                             checkpoint=method == "node-ckpt", progress=False)  # fmt: skip
        with NodePruner(model, config).training(task) as run:
            times = [timed(run.step, step) for step in range(steps + 1)]
    else:
        with frozen(model):
            step_fn = _baseline_step(method, model, task, device)
            times = [timed(step_fn, step) for step in range(steps + 1)]
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    return {
        "method": method,
        "n_layers": n_layers,
        "batch": batch,
        "seq": seq,
        "device": device,
        "extra_gib": (peak - base) / GIB,
        "step_s": statistics.median(times[1:]),
        "status": "ok",
    }


def _baseline_step(method: str, model, task, device: str):
    """One step of the floor or of edge pruning, built here (the model frozen by the caller)."""
    import torch

    from tl_nodeprune.ablation import Ablation, mixing_hooks, site_masks
    from tl_nodeprune.baselines.edge_pruning import EdgeMasks, EdgePruneConfig
    from tl_nodeprune.baselines.graph import (
        EdgeGraph,
        ProjectionWeights,
        capture_names,
        edge_forward,
    )
    from tl_nodeprune.checkpoint import checkpointed_blocks
    from tl_nodeprune.gates import GateSet
    from tl_nodeprune.objectives import answer_logits, forward_answers, kl_divergence
    from tl_nodeprune.sites import ModelShape, hook_name

    shape = ModelShape.from_model(model)
    batch, seq = task.clean.shape
    idx = torch.arange(batch)
    clean = task.clean.to(device)
    sample_gen = torch.Generator(device=device).manual_seed(0)
    full = answer_logits(model, task, batch_size=batch, fast=True)
    if method == "edge":
        graph = EdgeGraph.from_model(model)
        params = EdgeMasks(graph, EdgePruneConfig(), device)
        weights = ProjectionWeights(model, shape)
        ablation = Ablation(model, task, capture_names(graph), "corrupted", batch)

        def loss_fn():
            edge_mask, _ = params.sample(sample_gen)
            logits = edge_forward(model, graph, clean, task.answer_pos, edge_mask,
                                  ablation.values(idx, seq), weights=weights)  # fmt: skip
            gap = params.expected_l0()["edges"] - 0.05
            return kl_divergence(full, logits) + gap + gap**2

        hooks = contextlib.nullcontext
    else:
        params = GateSet(shape, ("head",), 3.0, device=device)
        names = [hook_name("head", layer) for layer in range(shape.n_layers)]
        ablation = Ablation(model, task, names, "corrupted", batch)

        def loss_fn():
            logits = forward_answers(model, clean, task.answer_pos, fast=True)
            return kl_divergence(full, logits) + sum(params.expected_l0().values())

        def hooks():  # entered around forward and backward, as NodePruner's step does
            masks = site_masks(shape, params.sample(sample_gen))
            return model.hooks(fwd_hooks=mixing_hooks(masks, ablation.lazy_values(idx, seq)))

    optimizer = torch.optim.Adam(params.parameters(), lr=0.1)

    def step(_: int) -> None:
        with hooks(), checkpointed_blocks(model, 0):
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--limit-gib", type=float, default=18.0)
    p.add_argument("--out", default=str(GENERATED))
    p.add_argument("--quick", action="store_true", help="only the 8x64 point (for a smoke run)")
    p.add_argument("--machine-gib", type=float, default=24.0, help="for the largest-batch table")
    p.add_argument("--rows", help="points measured before (CSV or JSON lines): reused, not re-run")
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_point(**json.loads(args.point), device=args.device,
                                   steps=args.steps)))  # fmt: skip
        return
    points = MAIN[:1] if args.quick else MAIN + SCALING
    rows: list[dict] = []
    kept = read_rows(Path(args.rows)) if args.rows else []
    for n_layers, batch, seq in sorted(points, key=lambda s: s[0] ** 2 * s[1] * s[2]):
        for method in METHODS:
            row = {"method": method, "n_layers": n_layers, "batch": batch, "seq": seq,
                   "device": args.device}  # fmt: skip
            same = [r for r in kept if all(r[k] == row[k] for k in row)]
            if same:  # measured by an earlier run of this script (--rows)
                rows.append(same[0])
                continue
            predicted = _predict(rows, row)
            if predicted is not None and predicted > args.limit_gib:
                rows.append({**row, "extra_gib": None, "step_s": None,
                             "status": f"skipped: predicted {predicted:.1f} GiB"})  # fmt: skip
                print(rows[-1], flush=True)
                continue
            point = json.dumps({k: row[k] for k in ("method", "n_layers", "batch", "seq")})
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--point", point, "--device", args.device,
                   "--threads", str(args.threads), "--steps", str(args.steps)]  # fmt: skip
            try:
                rows.append(run_fresh(cmd, env))
            except subprocess.CalledProcessError as done:
                tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                rows.append({**row, "extra_gib": None, "step_s": None,
                             "status": f"failed ({done.returncode}): {tail[0][:80]}"})  # fmt: skip
            print(rows[-1], flush=True)
    write(rows, Path(args.out), args)


def _predict(rows: list[dict], row: dict) -> float | None:
    """A method's memory at `row`, scaled from each measured point; the largest such estimate.

    Tokens scale memory linearly and layers linearly (edges: quadratically). The largest
    estimate is taken because RSS peaks depend on the allocator (glibc returns large blocks to
    the system at once but keeps smaller ones), so one point can read low. Points of the
    same depth are used when there are any.
    """
    done = [r for r in rows if r["method"] == row["method"] and r["status"] == "ok"]
    if not done:
        return None
    done = [r for r in done if r["n_layers"] == row["n_layers"]] or done  # nearest shape first
    power = 2 if row["method"] == "edge" else 1
    return max(
        ref["extra_gib"]
        * (row["batch"] * row["seq"])
        / (ref["batch"] * ref["seq"])
        * (row["n_layers"] / ref["n_layers"]) ** power
        for ref in done
    )


def write(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    df = pd.DataFrame(rows)
    df.to_csv(out / f"benchmark{suffix}.csv", index=False)
    lines = [
        f"# Memory and step time: node pruning vs edge pruning ({args.device})",
        "",
        f"Regenerate: `PYTHONPATH=. python bench/memory.py {' '.join(sys.argv[1:])}` (each "
        "point in a fresh process; see the script's docstring for what each step holds).",
        "",
        "Random GPT-2-small-shaped model (12 heads of 64, d_mlp 3072, vocabulary 50,257), fp32. "
        "`extra GiB`: peak memory over the loaded model and task, corrupted cache included. "
        "`step s`: median of the timed steps.",
        "",
    ]
    points = []
    for r in rows:
        gib = "" if r["extra_gib"] is None else f"{r['extra_gib']:.2f}"
        sec = "" if r["step_s"] is None else f"{r['step_s']:.2f}"
        points.append((r["n_layers"], f"{r['batch']}x{r['seq']}", r["method"], gib, sec,
                       r["status"]))  # fmt: skip
    lines.append(pipe_table(("layers", "batch x seq", "method", "extra GiB", "step s", "status"),
                            points))  # fmt: skip
    lines += ["", "## Ratios (node pruning against edge pruning and the floor)", ""]
    ratios = []
    ok = df[df.status == "ok"].set_index(["n_layers", "batch", "seq", "method"])
    for key in sorted({(r["n_layers"], r["batch"], r["seq"]) for r in rows}):
        get = lambda m, col, key=key: ok[col].get((*key, m))  # noqa: E731
        edge, floor = get("edge", "extra_gib"), get("floor", "step_s")
        cells = []
        for m in ("node", "node-ckpt"):
            v = get(m, "extra_gib")
            cells.append(f"{v / edge:.3f}" if v is not None and edge else "n/a")
        for m in ("node", "node-ckpt"):
            v = get(m, "step_s")
            cells.append(f"{v / floor:.2f}" if v is not None and floor else "n/a")
        ratios.append((key[0], f"{key[1]}x{key[2]}", *cells))
    columns = ("layers", "batch x seq", "node/edge memory", "node-ckpt/edge memory",
               "node/floor time", "node-ckpt/floor time")  # fmt: skip
    lines.append(pipe_table(columns, ratios))
    lines += _largest_batches(rows, args.machine_gib)
    (out / f"benchmark{suffix}.md").write_text("\n".join(lines) + "\n")


RESERVED_GIB = 2.0  # the loaded model (about 1.1 GiB for GPT-2 small here), Python and the OS


def _largest_batches(rows: list[dict], machine_gib: float) -> list[str]:
    """Largest batch per measured sequence length (12 layers) that fits `machine_gib`.

    Extrapolated linearly in tokens from the largest per-token reading of the method at that
    sequence length or a shorter one (the conservative choice, see `_predict`).
    """
    ok = [r for r in rows if r["status"] == "ok" and r["n_layers"] == 12]
    seqs = sorted({r["seq"] for r in ok})
    budget = machine_gib - RESERVED_GIB
    lines = ["", f"## Largest batch that fits {machine_gib:g} GiB (12 layers, extrapolated)", "",
             f"Budget {budget:g} GiB of extra memory ({RESERVED_GIB:g} GiB kept for the loaded "
             "model, Python and the OS); per-token memory as in `_largest_batches`.",
             ""]  # fmt: skip
    table = []
    for seq in seqs:
        cells = []
        for m in METHODS:
            per_token = [r["extra_gib"] / (r["batch"] * r["seq"]) for r in ok
                         if r["method"] == m and r["seq"] <= seq]  # fmt: skip
            cells.append(str(int(budget // (max(per_token) * seq))) if per_token else "n/a")
        table.append((seq, *cells))
    return [*lines, pipe_table(("seq", *METHODS), table)]


if __name__ == "__main__":
    main()

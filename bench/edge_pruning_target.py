"""Edge pruning run until it meets its target edge sparsity (or a step cap): steps and cost.

    PYTHONPATH=. python bench/edge_pruning_target.py planted:6:8 --max-steps 3000
    PYTHONPATH=. python bench/edge_pruning_target.py smollm2-135m --batch 8 --max-steps 3
    PYTHONPATH=. python bench/edge_pruning_target.py --rows   # rewrite the page only

MODEL is `smollm2-135m` (IOI, 64 prompts, seed 0) or `planted:LAYERS:HEADS`, a planted
llama-shaped model (grouped-query attention, as SmolLM2; `planted_problem("bridge-llama")`, one
planted head per layer but the first, d_head 16, d_mlp 64, 64 prompts of 8 tokens).
`EdgePruneConfig(until_target=True, steps=MAX_STEPS)` with the other settings at their
defaults unless given: the run stops at the first step after the warm-up whose circuit keeps
at most 1 - target of the edges. Each run appends one JSON line to
docs/generated/edge_pruning_target.jsonl (steps run, whether the kept fraction of edges met
the target, seconds per step, peak RSS, the KL and kept fraction every `log_every` steps) and
rewrites docs/generated/edge_pruning_target.md from every line. Run one point per process,
with OMP_NUM_THREADS=1 for comparable times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import GENERATED, GIB, pipe_table, read_rows, reset_peak_rss, status_bytes

ROWS = GENERATED / "edge_pruning_target.jsonl"
PAGE = GENERATED / "edge_pruning_target.md"


def load(spec: str) -> tuple[Any, Any, str, Any]:
    """Model, training task, a one-line description for MODEL (see the module docstring) and
    prompts it was not trained on (SmolLM2: IOI from unseen templates and names; planted:
    none, its prompts are all of one kind)."""
    if spec.startswith("planted:"):
        from tl_nodeprune.planted import planted_problem

        _, layers, heads = spec.split(":")
        problem = planted_problem("bridge-llama", seed=0, n_layers=int(layers),
                                  n_heads=int(heads), d_head=16, d_mlp=64)  # fmt: skip
        what = f"planted, {len(problem.circuit.heads)} heads"
        return problem.model, problem.task, what, None
    import tl_nodeprune as tnp

    model = tnp.load_model(spec)
    unseen = tnp.tasks.ioi_independent(model, n=64, seed=1)
    return model, tnp.tasks.ioi(model, n=64, seed=0), "IOI, 64 prompts", unseen


def run_point(spec: str, settings: dict[str, Any], save: Path | None = None) -> dict[str, Any]:
    """One run until the target (or the cap), in this process: its steps, time, memory and its
    circuit's faithfulness with the other edges ablated (the circuit saved to `save`)."""
    import torch

    from tl_nodeprune.baselines.edge_pruning import EdgePruneConfig, edge_pruning
    from tl_nodeprune.baselines.graph import EdgeGraph

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, task, what, unseen = load(spec)
    cfg = EdgePruneConfig(until_target=True, progress=False, **settings)
    reset_peak_rss()
    circuit = edge_pruning(model, task, cfg)
    peak = status_bytes("VmHWM") / GIB
    meta = circuit.meta
    if save is not None:
        circuit.save(save)
    from tl_nodeprune.baselines.edge_eval import evaluate_edges

    scored = evaluate_edges(model, circuit, task)  # the other edges ablated
    held = None if unseen is None else evaluate_edges(model, circuit, unseen)
    return {
        "model": spec,
        "task": what,
        "n_edges": EdgeGraph.from_model(model).n_edges,
        "batch_size": cfg.batch_size,
        "target_edge_sparsity": cfg.target_edge_sparsity,
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.steps,
        "steps": meta["steps"],
        "reached_target": meta["reached_target"],
        "kept_edges": circuit.n_edges / meta["n_edges_total"],
        "final_kl": meta["final_kl"],
        "seconds": meta["seconds"],  # after loading, the reference run included
        "s_per_step": meta["seconds_per_step"],  # the steps alone, the first (slower) included
        "peak_rss_gib": peak,
        "edge_f": scored.faithfulness,
        "edge_kl": scored.kl,
        "unseen_f": None if held is None else held.faithfulness,
        "unseen_kl": None if held is None else held.kl,
        "threads": torch.get_num_threads(),
        "trace": meta["trace"],
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} PYTHONPATH=. "
        "python " + shlex.join(sys.argv),
    }


def scores(row: dict[str, Any], prompts: str = "edge") -> str:
    """Faithfulness and KL of the circuit with the other edges ablated, where measured, on the
    training prompts (`edge`) or the unseen ones (`unseen`)."""
    f = row.get(f"{prompts}_f")
    return "" if f is None else f"{f:.3f} ({row[f'{prompts}_kl']:.3f})"


def kept_at(trace: list[dict[str, float]], steps: int) -> str:
    """The kept fraction of edges logged at `steps` (or the last one before it)."""
    rows = [r for r in trace if r["steps"] <= steps]
    return f"{rows[-1]['kept_edges']:.3f}" if rows and steps <= trace[-1]["steps"] else ""


def costs(rows: list[dict[str, Any]], steps: tuple[int, ...] = (300, 1000, 3000)) -> list[str]:
    """SmolLM2's measured seconds per step times step counts (3,000: the paper's default)."""
    smol = [r for r in rows if r["model"].startswith("smollm2")]
    lines = ["", "SmolLM2 on this CPU: measured s/step x steps", ""] if smol else []
    for r in smol:
        hours = ", ".join(f"{n:,} steps {r['s_per_step'] * n / 3600:.1f} h" for n in steps)
        note = f" ({r['note']})" if r.get("note") else ""
        threads = r.get("threads", 1)
        lines.append(f"- batch {r['batch_size']}, {threads} thread{'s' * (threads > 1)} "
                     f"({r['s_per_step']:.2f} s/step): {hours}{note}")
    return lines


def write_page(rows: list[dict[str, Any]]) -> None:
    """docs/generated/edge_pruning_target.md: one table row per run, then their commands."""
    cols = ["model", "task", "edges", "batch", "target kept", "warm-up", "steps run (cap)",
            "met target", "kept at warm-up end", "kept at 300", "kept at 1000", "kept at end",
            "expected kept at end", "batch KL at end", "f (KL), training prompts",
            "f (KL), unseen templates and names", "s / step",
            "peak RSS GiB", "note"]  # fmt: skip
    table = [
        [r["model"], r["task"], f"{r['n_edges']:,}", r["batch_size"],
         f"{1 - r['target_edge_sparsity']:.2f}", r["warmup_steps"],
         f"{r['steps']} ({r['max_steps']})", "yes" if r["reached_target"] else "no",
         kept_at(r["trace"], r["warmup_steps"]), kept_at(r["trace"], 300),
         kept_at(r["trace"], 1000), f"{r['kept_edges']:.3f}",
         f"{r['trace'][-1]['expected_edges']:.3f}", f"{r['final_kl']:.3f}", scores(r),
         scores(r, "unseen"),
         f"{r['s_per_step']:.2f}", f"{r['peak_rss_gib']:.1f}", r.get("note", "")]
        for r in rows
    ]  # fmt: skip
    lines = [
        "# Edge pruning until its target edge sparsity",
        "",
        "Written by `bench/edge_pruning_target.py` (prose: docs/baselines.md). CPU, one thread",
        "unless the row's note says otherwise.",
        "Kept: the fraction of edges whose deterministic gate is above the threshold (the",
        "circuit's edges); the run stops at the first step where it is at most the target.",
        "The target counts once the warm-up is over. Expected kept: the mean P(gate != 0),",
        "which the Lagrangian holds to the target. Batch KL: the last step's training batch,",
        "masks sampled. f (KL): the circuit scored with the edges outside it ablated",
        "(`evaluate_edges`), on its training prompts and (SmolLM2) on 64 IOI prompts from",
        "templates and names it never saw (`ioi_independent`, seed 1); blank in rows run",
        "before it was measured. Kept at N: logged every 25 steps,"
        "the last logged at or before N (blank past the steps run). s / step: the steps alone,",
        "the first",
        "(slower) one included. Peak RSS: the process's high-water mark from just before the",
        "run (reference run included). glibc keeps the freed blocks of the step's many",
        "temporaries, so it is well above the live tensors: with MALLOC_MMAP_THRESHOLD_=131072",
        "(large blocks returned at once, ~2.5x slower) a SmolLM2 step at batch 8 peaked at",
        "0.5 GiB over the loaded model and its reference run.",
        "",
        pipe_table(cols, table),
        *costs(rows),
        "",
        "Commands, in row order:",
        "",
        *[f"    {r['command']}" for r in rows],
        "",
    ]
    PAGE.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="planted:6:8")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--target", type=float, default=None, help="target_edge_sparsity")
    p.add_argument("--settings", default="{}", help="JSON of further EdgePruneConfig fields")
    p.add_argument("--note", default="", help="a remark for this run's row")
    p.add_argument("--rows", action="store_true", help="rewrite the page from the saved rows")
    p.add_argument("--save", type=Path, default=None, help="write the circuit here (JSON)")
    args = p.parse_args()
    if not args.rows:
        settings = {"steps": args.max_steps, "batch_size": args.batch, "log_every": 25,
                    **json.loads(args.settings)}  # fmt: skip
        if args.target is not None:
            settings["target_edge_sparsity"] = args.target
        start = time.perf_counter()
        row = run_point(args.model, settings, args.save)
        row["wall_s"], row["note"] = time.perf_counter() - start, args.note
        GENERATED.mkdir(parents=True, exist_ok=True)
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}))
    write_page(read_rows(Path(ROWS)))


if __name__ == "__main__":
    main()

"""Wall time and peak memory of S seeds fitted one after another against one batched pass.

    PYTHONPATH=. python bench/batched_seeds.py [--threads 1] [--seeds 3] [--steps 3]
        [--points 8x32]

Each point runs in a fresh process: `NodePruner.fit_seeds(task, seeds, batched=...)` (the code
users call) on a random GPT-2-small-shaped model (12 layers, 12 heads of 64, d_mlp 3072,
vocabulary 50,257, fp32), attention-block, MLP-block, head and neuron gates, corrupted
ablation cached up front, no checkpointing, fixed penalties (no validation split), on
`--prompts` random prompt pairs. Separate fits build the reference (ablation cache, full
logits) once per seed and run S x steps forwards of `batch` rows; the batched pass builds it
once and runs `steps` forwards of S x batch rows. Time is the whole call; memory the peak RSS
over the loaded model and task. Writes docs/generated/batched_seeds.md and .csv (never edit
them by hand).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import (
    GENERATED,
    GIB,
    gpt2_small_problem,
    pipe_table,
    reset_peak_rss,
    run_points,
    status_bytes,
)

MODES = ("separate", "batched")


def run_point(mode: str, batch: int, seq: int, seeds: int, steps: int, prompts: int) -> dict:
    """One measurement in this process (call it in a fresh one)."""
    from tl_nodeprune.pruner import NodePruner, PruneConfig

    model, task = gpt2_small_problem(prompts, seq)
    reset_peak_rss()
    base = status_bytes("VmRSS")
    config = PruneConfig(steps=steps, batch_size=batch, checkpoint=False, progress=False,
                         granularities=("attn", "mlp", "head", "neuron"))  # fmt: skip
    start = time.perf_counter()
    spread = NodePruner(model, config).fit_seeds(task, range(seeds), batched=mode == "batched")
    seconds = time.perf_counter() - start
    assert len(spread.results) == seeds
    return {"mode": mode, "seeds": seeds, "batch": batch, "seq": seq, "steps": steps,
            "prompts": prompts, "extra_gib": (status_bytes("VmHWM") - base) / GIB,
            "seconds": seconds}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps per seed")
    p.add_argument("--prompts", type=int, default=32, help="prompt pairs in the task")
    p.add_argument("--points", nargs="+", default=["8x32"], help="batch x seq")
    p.add_argument("--out", default=str(GENERATED))
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args()
    common = {"seeds": args.seeds, "steps": args.steps, "prompts": args.prompts}
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_point(**json.loads(args.point), **common)))
        return
    extra = ["--seeds", str(args.seeds), "--steps", str(args.steps), "--prompts", str(args.prompts)]
    rows = run_points(__file__, args.points, MODES, args.threads, extra)
    write(rows, Path(args.out), args.threads)


def write(rows: list[dict], out: Path, threads: int) -> None:
    """The table, with each batched pass's ratios to the separate fits of the same point."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "batched_seeds.csv", index=False)
    separate = {(r["batch"], r["seq"]): r for r in rows if r["mode"] == "separate"}
    table = []
    for r in rows:
        s = separate[(r["batch"], r["seq"])]
        time_ratio, memory_ratio = r["seconds"] / s["seconds"], r["extra_gib"] / s["extra_gib"]
        table.append((f"{r['batch']}x{r['seq']}", r["seeds"], r["steps"], r["prompts"],
                      r["mode"], f"{r['seconds']:.1f}", f"{time_ratio:.2f}",
                      f"{r['extra_gib']:.2f}", f"{memory_ratio:.2f}"))  # fmt: skip
    lines = [
        "# Batched seeds: S seeds in one pass against S separate fits",
        "",
        f"Regenerate: `PYTHONPATH=. python bench/batched_seeds.py {' '.join(sys.argv[1:])}` "
        f"({threads} thread(s); each point in a fresh process; the script's docstring says "
        "what a point runs).",
        "",
        pipe_table(("batch x seq", "seeds", "steps", "prompts", "mode", "seconds", "x separate",
                    "extra GiB", "x separate"), table),  # fmt: skip
    ]
    (out / "batched_seeds.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

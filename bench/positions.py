"""Memory and step time of position-aware gates against position-blind ones, side by side.

    PYTHONPATH=. python bench/positions.py [--threads 2] [--steps 3] [--points 8x32 8x64]

Each point runs in a fresh process: one `PruneRun.step` (the code `fit` runs) on a random
GPT-2-small-shaped model (12 layers, 12 heads of 64, d_mlp 3072, vocabulary 50,257, fp32),
attention-block, MLP-block, head and neuron gates, corrupted ablation cached up front, without
checkpointing, for `positions` = None (one gate per node), "named" (5 labels, as IOI's) and
"absolute" (one per token). Memory is the peak RSS over the loaded model and task (the
corrupted cache included); time the median of the timed steps after one warm-up step. Writes
docs/generated/positions.md and .csv (never edit them by hand).
"""

from __future__ import annotations

import argparse
import json
import statistics
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

MODES = ("blind", "named", "absolute")
LABELS = ("S1", "IO", "S2", "END", "other")


def run_point(mode: str, batch: int, seq: int, steps: int) -> dict:
    """One measurement in this process (call it in a fresh one)."""
    import dataclasses

    import torch

    from tl_nodeprune.pruner import NodePruner, PruneConfig

    model, task = gpt2_small_problem(batch, seq)
    # IOI-like labels: S1, IO and S2 at three fixed tokens, END last, the rest "other".
    labels = torch.full((batch, seq), LABELS.index("other"))
    for name, at in (("S1", 2), ("IO", 4), ("S2", seq // 2), ("END", seq - 1)):
        labels[:, at] = LABELS.index(name)
    task = dataclasses.replace(task, position_labels=labels, position_names=LABELS)
    reset_peak_rss()
    base = status_bytes("VmRSS")
    config = PruneConfig(steps=steps + 1, batch_size=batch, checkpoint=False, progress=False,
                         granularities=("attn", "mlp", "head", "neuron"),
                         positions=None if mode == "blind" else mode)  # fmt: skip
    times = []
    with NodePruner(model, config).training(task) as run:
        for step in range(steps + 1):
            start = time.perf_counter()
            run.step(step)
            times.append(time.perf_counter() - start)
    n_gates = sum(la.numel() for la in run.gates.log_alpha.values())
    return {"mode": mode, "batch": batch, "seq": seq, "gates": n_gates,
            "extra_gib": (status_bytes("VmHWM") - base) / GIB,
            "step_s": statistics.median(times[1:])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--points", nargs="+", default=["8x32", "8x64"], help="batch x seq")
    p.add_argument("--out", default=str(GENERATED))
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_point(**json.loads(args.point), steps=args.steps)))
        return
    rows = run_points(__file__, args.points, MODES, args.threads, ["--steps", str(args.steps)])
    write(rows, Path(args.out))


def write(rows: list[dict], out: Path) -> None:
    """The table and the ratios to the position-blind run of the same point."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "positions.csv", index=False)
    blind = {(r["batch"], r["seq"]): r for r in rows if r["mode"] == "blind"}
    table = []
    for r in rows:
        b = blind[(r["batch"], r["seq"])]
        table.append((f"{r['batch']}x{r['seq']}", r["mode"], f"{r['gates']:,}",
                      f"{r['extra_gib']:.2f}", f"{r['extra_gib'] / b['extra_gib']:.2f}",
                      f"{r['step_s']:.2f}", f"{r['step_s'] / b['step_s']:.2f}"))  # fmt: skip
    lines = [
        "# Position-aware gates: memory and step time against position-blind ones",
        "",
        f"Regenerate: `PYTHONPATH=. python bench/positions.py {' '.join(sys.argv[1:])}` (each "
        "point in a fresh process; the script's docstring says what a step holds).",
        "",
        pipe_table(("batch x seq", "positions", "gates", "extra GiB", "x blind", "step s",
                    "x blind"), table),  # fmt: skip
    ]
    (out / "positions.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""The smallest circuits along a learned gate order that are faithful on held-out prompts *and*
on independent templates: how far a run's order is from the trust goal, one JSON line per point.

    PYTHONPATH=. python bench/trust_frontier.py --tag def --seeds 0 1 2 [--n-train 96] \
        [--dir out/s26] [--points 12]

Reads the log_alphas `bench/quality_smollm2.py --tag TAG` saved (`quality_TAG_ioi_N.pt`),
redraws that run's held-out prompts (same seed, same split) and as many `ioi_independent`
prompts, and scores nested circuits "every node whose log_alpha exceeds t" (hierarchy applied,
`selection.circuit_at`) on both, at `--points` thresholds spread over the order plus a
bisection between the smallest circuit in the band f in [0.9, 1.1] on both sets and the next
smaller one. This *looks at the independent prompts to choose*: it measures what a gate order
offers, it is not a way to pick a circuit (selection on validation prompts is).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tl_nodeprune as tnp
from tl_nodeprune.cli import DEFAULT_PROMPTS, DEFAULT_TRAIN_FRACTION
from tl_nodeprune.evaluation import Evaluator
from tl_nodeprune.selection import circuit_at

BAND = (0.9, 1.1)


def held_out(model, seed: int, n_train: int | None) -> tnp.PromptTask:
    """The held-out prompts `quality_smollm2.py` drew for this seed."""
    if n_train is None:
        task = tnp.tasks.ioi(model, n=DEFAULT_PROMPTS, seed=seed)
        return task.split(DEFAULT_TRAIN_FRACTION, seed=seed)[1]
    task = tnp.tasks.ioi(model, n=n_train + 200, seed=seed)
    return task.split(n_train / len(task), seed=seed)[1]


def frontier(model, log_alpha: dict, seed: int, n_train: int | None, points: int) -> list[dict]:
    """Scores of nested circuits on held-out and independent prompts, smallest first."""
    shape = tnp.sites.ModelShape.from_model(model)
    tests = {"held_out": held_out(model, seed, n_train)}
    tests["independent"] = tnp.tasks.ioi_independent(model, n=len(tests["held_out"]), seed=seed)
    evaluators = {k: Evaluator(model, t, batch_size=32) for k, t in tests.items()}
    rows: dict[float, dict] = {}

    def visit(t: float) -> bool:
        if t not in rows:
            c = circuit_at(shape, log_alpha, t)
            row = {"seed": seed, "threshold": round(t, 4), "heads": c.n_kept("head"),
                   "neurons": c.n_kept("neuron"), "nodes": len(c.nodes)}  # fmt: skip
            for name, ev in evaluators.items():
                e = ev(c)
                row[f"f_{name}"], row[f"kl_{name}"] = round(e.faithfulness, 4), round(e.kl, 4)
            row["in_band"] = all(BAND[0] <= row[f"f_{k}"] <= BAND[1] for k in tests)
            rows[t] = row
            print(json.dumps(row), flush=True)
        return rows[t]["in_band"]

    values = torch.cat([la.flatten().float() for la in log_alpha.values()]).sort().values
    # thresholds that keep log-spaced shares of the nodes, from 0.1% to all of them
    shares = torch.logspace(-3, 0, points).tolist()
    grid = [values[int((1 - s) * (len(values) - 1))].item() - 1e-4 for s in shares]
    passing = [t for t in sorted(set(grid), reverse=True) if visit(t)]
    if passing:
        lo, hi = max(passing), min([t for t in rows if t > max(passing)], default=None)
        for _ in range(4 if hi is not None else 0):  # bisection toward the smaller circuit
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if visit(mid) else (lo, mid)
    return sorted(rows.values(), key=lambda r: r["nodes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--dir", default="out")
    p.add_argument("--points", type=int, default=12)
    p.add_argument("--out", default=None, help="JSON lines (default: DIR/frontier_TAG.jsonl)")
    args = p.parse_args()
    model = tnp.load_model("smollm2-135m")
    out = Path(args.out or Path(args.dir) / f"frontier_{args.tag}.jsonl")
    for seed in args.seeds:
        log_alpha = torch.load(Path(args.dir) / f"quality_{args.tag}_ioi_{seed}.pt")
        rows = frontier(model, log_alpha, seed, args.n_train, args.points)
        with out.open("a") as fh:
            for row in rows:
                fh.write(json.dumps({"tag": args.tag, **row}) + "\n")
        best = next((r for r in rows if r["in_band"]), None)
        print("smallest in band on both:", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()

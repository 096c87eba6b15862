"""Planted-circuit recovery: precision and recall per granularity, steps and wall time.

    .venv/bin/python bench/planted_recovery.py [--seeds 5] [--steps 300]

Runs discovery with default settings on tiny random models of every flavour the installed
TransformerLens builds, each with a planted circuit (see `tl_nodeprune.planted`).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import tl_nodeprune as tnp
from tl_nodeprune.planted import available_flavours, planted_problem

SHAPES = {
    "3L-4H-32N": {},
    "4L-2H-16N": {"n_layers": 4, "n_heads": 2, "d_mlp": 16, "silent_layer": 2},
    "2L-8H-64N": {"n_layers": 2, "n_heads": 8, "d_mlp": 64, "heads_per_layer": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=tnp.PruneConfig.steps)
    args = parser.parse_args()
    rows = []
    for flavour in available_flavours():
        for shape_name, shape in SHAPES.items():
            for seed in range(args.seeds):
                problem = planted_problem(flavour, seed=seed, **shape)
                start = time.perf_counter()
                config = tnp.PruneConfig(steps=args.steps, progress=False)
                found = tnp.NodePruner(problem.model, config).fit(problem.task).circuit
                row = {
                    "flavour": flavour,
                    "shape": shape_name,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - start, 1),
                }
                for g in ("attn", "mlp", "head", "neuron"):
                    kept, truth = found.kept(g), problem.circuit.kept(g)
                    hits = int((kept & truth).sum())
                    row[f"P_{g}"] = hits / max(1, int(kept.sum()))
                    row[f"R_{g}"] = hits / int(truth.sum())
                row["exact"] = found.nodes == problem.circuit.nodes
                rows.append(row)
                print(row, flush=True)
    frame = pd.DataFrame(rows)
    print(f"\nsteps={args.steps}")
    print(frame.groupby(["flavour", "shape"]).mean(numeric_only=True).round(3).to_string())
    print(f"exact recoveries: {int(frame.exact.sum())}/{len(frame)}")


if __name__ == "__main__":
    main()

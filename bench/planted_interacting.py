"""Interacting planted circuits: exact recovery per seed, the nodes missed and their log_alpha.

    .venv/bin/python bench/planted_interacting.py [--flavour bridge-native] [--seeds 0 1 2]
        [--strength 0.15] [--lr 0.2] [--bounds -4 6]
"""

from __future__ import annotations

import argparse
import time

import tl_nodeprune as tnp
from tl_nodeprune.circuit import parse_node
from tl_nodeprune.planted_interacting import interacting_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flavour", default="bridge-native")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strength", type=float, default=0.15)
    parser.add_argument("--lr", type=float, default=tnp.PruneConfig.lr)
    parser.add_argument("--bounds", type=float, nargs=2, default=None)
    args = parser.parse_args()
    for seed in args.seeds:
        problem = interacting_problem(args.flavour, seed=seed, strength=args.strength)
        bounds = tuple(args.bounds) if args.bounds else None
        config = tnp.PruneConfig(progress=False, seed=seed, lr=args.lr, log_alpha_bounds=bounds)
        start = time.perf_counter()
        result = tnp.NodePruner(problem.model, config).fit(problem.task)
        found = result.circuit
        ev = tnp.evaluate(problem.model, found, problem.task)
        missing = sorted(set(problem.circuit.nodes) - set(found.nodes))
        extra = sorted(set(found.nodes) - set(problem.circuit.nodes))
        where = {n: round(result.log_alpha[g][idx].item(), 2)
                 for n in missing for g, idx in [parse_node(n)]}  # fmt: skip
        print(f"seed {seed}: exact {not missing and not extra}, faithfulness "
              f"{ev.faithfulness:.3f}, missing {where}, extra {extra}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

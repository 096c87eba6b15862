"""SmolLM2 IOI: a node-price sweep (three circuit sizes), compared on held-out prompts.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/compare_smollm2.py \
        [--prices 0.3 1 3] [--steps 300] [--out out/compare]

Learns one circuit per price on 100 prompts, evaluates all on 100 others with one evaluator,
then prints the sweep frontier, the `compare_circuits` table, the middle circuit's faithfulness
curve at MIB's sizes (fraction of heads + MLP blocks) with CPR and CMD, and its completeness.
Extra circuit files (MIB JSON from other tools) join the table with `--extra name=path`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tl_nodeprune as tnp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prices", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--steps", type=int, default=tnp.PruneConfig.steps)
    parser.add_argument("--n-prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/compare"))
    parser.add_argument("--extra", nargs="*", default=[], help="name=path of a MIB graph JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    model = tnp.load_model("smollm2-135m")
    task = tnp.tasks.ioi(model, n=args.n_prompts, seed=args.seed)
    train, held = task.split(0.5, seed=args.seed)
    config = tnp.PruneConfig(steps=args.steps, seed=args.seed)
    result = tnp.sweep(model, train, held, config=config, prices=args.prices)
    print("## sweep frontier (held-out)\n" + result.frame.round(4).to_string(index=False))
    result.frame.to_csv(args.out / "sweep.csv", index=False)

    circuits = {f"node pruning, price {p:g}": c for p, c in zip(args.prices, result.circuits,
                                                                 strict=True)}  # fmt: skip
    for c, p in zip(result.circuits, args.prices, strict=True):
        c.save(args.out / f"circuit_price{p:g}.json")
        tnp.write_mib(c, args.out / f"circuit_price{p:g}.mib.json")
    for spec in args.extra:
        name, path = spec.split("=", 1)
        circuits[name] = tnp.read_mib(path, model)
    table = tnp.compare_circuits(circuits, model, held)
    print("\n## compare_circuits (held-out)\n" + table.round(3).T.to_string())
    table.to_csv(args.out / "compare_circuits.csv")

    middle = result.circuits[len(result.circuits) // 2]
    curve = tnp.faithfulness_curve(model, held, middle)
    print("\n## faithfulness curve, middle circuit's gates ranking heads + MLP blocks\n"
          + curve.round(4).to_string(index=False))  # fmt: skip
    print(f"CPR {tnp.cpr(curve.fraction, curve.faithfulness):.4f}  "
          f"CMD {tnp.cmd(curve.fraction, curve.faithfulness):.4f}  "
          f"completeness f(complement) {tnp.completeness(model, held, middle):.4f}")  # fmt: skip
    curve.to_csv(args.out / "curve.csv", index=False)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

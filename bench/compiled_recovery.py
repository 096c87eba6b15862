"""Default discovery on the hand-compiled models (tl_nodeprune.compiled): exact or not, per seed.

    python -m bench.compiled_recovery [--models copy deep] [--seeds 0 1 2 3 4]
        [--flavour hooked] [--n-prompts 64] [--set lr=0.05 --set log_alpha_bounds="(-3.0,3.0)"]

Each `--set key=value` overrides a PruneConfig field (the value parsed by ast.literal_eval; a
bare word is taken as a string). Granularities default to blocks and heads, what the truth
circuits gate. "hooked" needs TransformerLens < 4 (.venv-tl3); "bridge-native" runs on both.
Columns: heads and blocks are needed ones kept / needed; `extra` counts kept nodes outside the
truth; f and KL score the found circuit; `missed` gives each missed needed node's final log_alpha.
"""

from __future__ import annotations

import argparse
import ast
import time
from typing import Any

import pandas as pd

import tl_nodeprune as tnp
from tl_nodeprune.circuit import parse_node
from tl_nodeprune.compiled import COMPILED, GRANULARITIES, compiled_problem, differences


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["lr=0.05", "warmup_steps=50"]` -> {"lr": 0.05, "warmup_steps": 50}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


def run_one(name: str, seed: int, flavour: str, n_prompts: int, sets: dict[str, Any]) -> dict:
    """Fit one compiled model with one seed; the row of the table."""
    problem = compiled_problem(name, flavour, seed=seed, n_prompts=n_prompts)
    gate = {k.split(".", 1)[1]: v for k, v in sets.items() if k.startswith("hard_concrete.")}
    sets = {k: v for k, v in sets.items() if not k.startswith("hard_concrete.")}
    if gate:  # --set hard_concrete.beta=0.5: a field of the gates' HardConcrete
        sets["hard_concrete"] = tnp.HardConcrete(**gate)
    config = tnp.PruneConfig(
        **{"progress": False, "seed": seed, "granularities": GRANULARITIES, **sets}
    )
    start = time.perf_counter()
    result = tnp.NodePruner(problem.model, config).fit(problem.task)
    seconds = time.perf_counter() - start
    truth, found = problem.circuit, result.circuit
    missed, extra = differences(truth, found)
    ev = tnp.evaluate(problem.model, found, problem.task)
    needed = {g: truth.kept(g) for g in GRANULARITIES}
    kept = {g: int((found.kept(g) & needed[g]).sum()) for g in GRANULARITIES}
    blocks = ("attn", "mlp")
    return {
        "model": name,
        "seed": seed,
        "exact": not missed and not extra,
        "heads": f"{kept['head']}/{int(needed['head'].sum())}",
        "blocks": f"{sum(kept[g] for g in blocks)}/{sum(int(needed[g].sum()) for g in blocks)}",
        "extra": len(extra),
        "f": round(ev.faithfulness, 3),
        "kl": round(ev.kl, 3),
        "missed": {
            n: round(float(result.log_alpha[g][idx]), 1)
            for n in missed
            for g, idx in [parse_node(n)]
            if g in result.log_alpha
        },
        "s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(COMPILED), choices=COMPILED)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--flavour", default="hooked")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sets = parse_sets(args.set)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            rows.append(run_one(name, seed, args.flavour, args.n_prompts, sets))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(table.to_string(index=False))
    exact = table.groupby("model", sort=False)["exact"].sum()
    print(f"exact: {int(table['exact'].sum())}/{len(table)}; per model: {exact.to_dict()}")


if __name__ == "__main__":
    main()

"""Run one baseline on SmolLM2-135M IOI and score it on held-out prompts.

    PYTHONPATH=. python bench/baselines_smollm2.py edge_pruning --kwargs '{"steps": 300}'

The prompts and the held-out half are those `make discover` used under its earliest defaults
(200 IOI prompts, seed 0, split 0.5), so every baseline is scored on the prompts the README's
node-pruning row (the defaults of that time) is.
`--train-prompts K` gives the method only the first K training prompts (for the costly ones).
Writes `out/baselines/<method>.json` (the circuit) and `out/baselines/<method>_eval.json`
(held-out faithfulness with nodes ablated, and with edges ablated for edge circuits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tl_nodeprune as tnp
from tl_nodeprune.baselines import BASELINES
from tl_nodeprune.baselines.edge_eval import evaluate_edges


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=sorted(BASELINES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--train-prompts", type=int, default=None)
    p.add_argument("--out", default="out/baselines")
    p.add_argument("--kwargs", default="{}", help="JSON of keyword arguments for the method")
    args = p.parse_args()
    model = tnp.load_model(args.model)
    task = tnp.tasks.ioi(model, n=args.n, seed=0)
    train, held_out = task.split(0.5, seed=0)
    if args.train_prompts:
        train = train.subset(torch.arange(min(args.train_prompts, len(train))))
    start = time.perf_counter()
    circuit = BASELINES[args.method](model, train, **json.loads(args.kwargs))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    circuit.save(out / f"{args.method}.json")
    result = {
        "method": args.method,
        "model": args.model,
        "seconds": seconds,
        "kwargs": json.loads(args.kwargs),
        "train_prompts": len(train),
        "held_out_prompts": len(held_out),
        "summary": circuit.summary().reset_index().to_dict(orient="records"),
        "n_edges": circuit.n_edges,
        "nodes_ablated": tnp.evaluate(model, circuit, held_out).to_dict(),
    }
    if circuit.edges is not None:
        result["edges_ablated"] = evaluate_edges(model, circuit, held_out, batch_size=16).to_dict()
    (out / f"{args.method}_eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

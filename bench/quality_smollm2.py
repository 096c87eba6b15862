"""Discovery quality on SmolLM2-135M: held-out faithfulness and size per seed, one JSON line each.

    PYTHONPATH=. python bench/quality_smollm2.py --task ioi --seeds 0 1 2 \
        [--cfg '{"lr_final": 0.02}'] [--tag cos] [--out out/quality.jsonl]

Per seed N, as `tl-nodeprune discover --seed N` does: `--n-prompts` (1,000) prompts drawn with
seed N, split at `--train-fraction` (0.8: 800 to train, 200 held out), then
`NodePruner(model, PruneConfig(seed=N, **cfg))`. Prints and appends kept nodes per granularity,
held-out faithfulness and KL (the same on up to 200 of the training prompts and, for IOI, on
as many `ioi_independent` prompts as are held out: new templates and names, new templates
only, new names only; for greater-than, `greater_than_independent`), and the training time;
saves the learned log_alphas and the circuit beside the output (`out/quality_TAG_TASK_N.pt`,
`.json`) for later studies. `--saved out/quality_TAG_TASK_N.pt ...` scores those instead of
fitting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tl_nodeprune as tnp
from bench.common import saved_circuit, saved_runs
from tl_nodeprune.cli import DEFAULT_PROMPTS, DEFAULT_TRAIN_FRACTION

# ioi_independent's `unseen` -> the JSON key of its scores
UNSEEN_KEYS = {"both": "independent", "templates": "unseen_templates", "names": "unseen_names"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="ioi", choices=tuple(tnp.tasks.REGISTRY))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cfg", default="{}", help="JSON of PruneConfig overrides")
    p.add_argument("--n-prompts", type=int, default=DEFAULT_PROMPTS, help="generated per seed")
    p.add_argument(
        "--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION, help="the rest is held out"
    )
    p.add_argument(
        "--n-train", type=int, default=None,
        help="train on this many prompts instead (e.g. 96), holding out --n-held-out more",
    )
    p.add_argument("--n-held-out", type=int, default=200)
    p.add_argument("--tag", default="run")
    p.add_argument("--out", default="out/quality.jsonl")
    p.add_argument("--saved", nargs="*", default=[], metavar="quality_TAG_TASK_N.pt",
                   help="score the circuits (gates above 0) of log_alphas an earlier run saved, "
                        "on the prompts it drew (seed N from the name; give its prompt options), "
                        "instead of fitting")  # fmt: skip
    args = p.parse_args()
    overrides = json.loads(args.cfg)
    model = tnp.load_model("smollm2-135m")
    make = tnp.tasks.get(args.task)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed, saved in saved_runs(args.saved) or [(seed, None) for seed in args.seeds]:
        torch.manual_seed(seed)
        if args.n_train is None:
            task = make(model, n=args.n_prompts, seed=seed)
            train, held_out = task.split(args.train_fraction, seed=seed)
        else:
            task = make(model, n=args.n_train + args.n_held_out, seed=seed)
            train, held_out = task.split(args.n_train / len(task), seed=seed)
        seconds = None  # no fit when scoring a saved run
        if saved is None:
            config = tnp.PruneConfig(seed=seed, progress=False, **overrides)
            start = time.perf_counter()
            result = tnp.NodePruner(model, config).fit(train)
            seconds = time.perf_counter() - start
            circuit = result.circuit
            torch.save(result.log_alpha, out.with_name(f"quality_{args.tag}_{args.task}_{seed}.pt"))
            circuit.save(out.with_name(f"quality_{args.tag}_{args.task}_{seed}.json"))
        else:
            circuit = saved_circuit(model, saved)
        evaluation = tnp.evaluate(model, circuit, held_out)
        # The same circuit on its training prompts (the generalisation gap) and on templates
        # (and, for IOI, names) it was not tuned on.
        on_train = tnp.evaluate(model, circuit, train.subset(range(min(len(train), 200))))
        extra = {"f_train": round(on_train.faithfulness, 4), "kl_train": round(on_train.kl, 4)}
        for key, other in _unseen(model, args.task, len(held_out), seed).items():
            on_other = tnp.evaluate(model, circuit, other)
            extra |= {f"f_{key}": round(on_other.faithfulness, 4),
                      f"kl_{key}": round(on_other.kl, 4)}  # fmt: skip
        row = {
            "tag": args.tag, "task": args.task, "seed": seed, "cfg": overrides, "saved": saved,
            "n_prompts": args.n_prompts, "n_train": len(train), "n_held_out": len(held_out),
            "fit_s": seconds and round(seconds, 1), **_sizes(circuit),
            "f": round(evaluation.faithfulness, 4), "kl": round(evaluation.kl, 4), **extra,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _unseen(model: object, task: str, n: int, seed: int) -> dict[str, tnp.PromptTask]:
    """The prompt sets nobody tuned on, by JSON key: IOI's new templates and words, then each
    alone; greater-than's new templates and nouns; none for other tasks."""
    if task == "ioi":
        return {key: tnp.tasks.ioi_independent(model, n=n, seed=seed, unseen=unseen)
                for unseen, key in UNSEEN_KEYS.items()}  # fmt: skip
    if task == "greater_than":
        return {"independent": tnp.tasks.greater_than_independent(model, n=n, seed=seed)}
    return {}


def _sizes(circuit: tnp.Circuit) -> dict[str, object]:
    """Kept nodes per granularity; position-aware, also node-positions and heads per position."""
    summary = circuit.summary()
    out: dict[str, object] = {"kept": {g: int(summary.loc[g, "kept"]) for g in summary.index}}
    if "node_positions" in summary:
        out["node_positions"] = {g: int(summary.loc[g, "node_positions"]) for g in summary.index}
    out["heads_at"] = _heads_at(circuit)
    return out


def _heads_at(circuit: tnp.Circuit) -> dict[str, int] | None:
    """Kept heads per position of a position-aware circuit (None position-blind)."""
    if circuit.positions is None:
        return None
    kept = circuit.kept_at("head")  # (positions, layer, head)
    return {p: int(kept[i].sum()) for i, p in enumerate(circuit.positions.names)}


if __name__ == "__main__":
    main()

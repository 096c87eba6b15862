"""`tl-nodeprune`: discover a circuit from the shell, or evaluate a saved one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .circuit import Circuit
from .evaluate import evaluate
from .pruner import NodePruner, PruneConfig
from .sites import GRANULARITIES

TASKS = ("ioi", "greater_than")
PLANTED = "planted"


def _model_and_task(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and build the task; `planted` gives a toy model with a known circuit."""
    if args.model == PLANTED or args.task == PLANTED:
        if not args.model == args.task == PLANTED:
            raise SystemExit("--model planted goes with --task planted (and only with it).")
        from .planted import planted_problem

        problem = planted_problem("bridge-native", seed=args.seed, n_prompts=args.n_prompts)
        return problem.model, problem.task
    from . import tasks
    from .models import load_model

    model = load_model(args.model, device=args.device)
    make = {"ioi": tasks.ioi, "greater_than": tasks.greater_than}[args.task]
    return model, make(model, n=args.n_prompts, seed=args.seed)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (offline), a TransformerLens name such as gpt2, or planted",
    )
    p.add_argument("--task", default="ioi", choices=(*TASKS, PLANTED))
    p.add_argument("--n-prompts", type=int, default=200, help="prompts generated for the task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--ablation", default="corrupted", choices=("corrupted", "mean", "zero"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-nodeprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("discover", help="learn node masks and write the circuit as JSON")
    _common(d)
    d.add_argument("--out", type=Path, default=Path("circuit.json"))
    d.add_argument("--steps", type=int, default=PruneConfig.steps)
    d.add_argument("--lr", type=float, default=PruneConfig.lr)
    d.add_argument("--batch-size", type=int, default=PruneConfig.batch_size)
    d.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=None)
    d.add_argument(
        "--penalty",
        nargs="+",
        default=[],
        metavar="G=LAMBDA",
        help="weight on the mean expected L0 of a granularity, e.g. head=3",
    )
    d.add_argument(
        "--target-sparsity",
        nargs="+",
        default=[],
        metavar="G=FRACTION",
        help="fraction of a granularity to prune, e.g. neuron=0.9",
    )
    d.add_argument("--warmup-steps", type=int, default=0)
    d.add_argument(
        "--target-faithfulness",
        type=float,
        default=None,
        help="return the smallest circuit (along the gate order) whose faithfulness on a "
        "validation quarter of the training prompts reaches this",
    )
    d.add_argument(
        "--train-fraction",
        type=float,
        default=0.5,
        help="share of prompts to train on; the rest measure faithfulness",
    )
    d.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train once per seed (same prompts and split) and print the spread; writes "
        "OUT with .seedN before the suffix for each",
    )
    e = sub.add_parser("evaluate", help="faithfulness of a saved circuit on a task")
    e.add_argument("circuit", type=Path)
    _common(e)
    return parser


def _pairs(items: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} expects G=VALUE pairs such as head=3, got {item!r}.")
        out[key] = float(value)
    return out


def _summary(circuit: Circuit) -> str:
    frame = circuit.summary()
    return "\n".join(
        f"  {g:8s} {int(r.kept):6d} / {int(r.total):<6d} ({r.fraction:6.1%})"
        for g, r in frame.iterrows()
    )


def discover(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, task = _model_and_task(args)
    train, held_out = task.split(args.train_fraction, seed=args.seed)
    config = PruneConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        granularities=tuple(args.granularities) if args.granularities else None,
        ablation=args.ablation,
        penalty=_pairs(args.penalty, "--penalty") or None,
        target_sparsity=_pairs(args.target_sparsity, "--target-sparsity") or None,
        warmup_steps=args.warmup_steps,
        target_faithfulness=args.target_faithfulness,
    )
    if args.seeds:
        return _discover_seeds(args, model, train, held_out, config)
    result = NodePruner(model, config).fit(train)
    evaluation = evaluate(model, result.circuit, held_out, ablation=args.ablation)
    result.circuit.meta.update(
        model=args.model, held_out=evaluation.to_dict(), seconds=round(result.seconds, 1)
    )
    result.circuit.save(args.out)
    print(f"circuit for {task.name} on {args.model} ({result.seconds:.0f} s, {args.steps} steps):")
    print(_summary(result.circuit))
    print(f"held-out ({len(held_out)} prompts): {evaluation}")
    print(f"wrote {args.out}")
    return {"circuit": result.circuit, "evaluation": evaluation}


def _discover_seeds(
    args: argparse.Namespace, model: Any, train: Any, held_out: Any, config: PruneConfig
) -> dict[str, Any]:
    """One discovery per seed; print each circuit's size and held-out faithfulness, and the
    nodes every seed kept."""
    spread = NodePruner(model, config).fit_seeds(train, args.seeds)
    table = spread.summary()
    for seed, result in spread.results.items():
        evaluation = evaluate(model, result.circuit, held_out, ablation=args.ablation)
        table.loc[seed, "held_out_faithfulness"] = round(evaluation.faithfulness, 3)
        result.circuit.meta.update(
            model=args.model, held_out=evaluation.to_dict(), seconds=round(result.seconds, 1)
        )
        result.circuit.save(args.out.with_name(f"{args.out.stem}.seed{seed}{args.out.suffix}"))
    consensus = spread.consensus()
    print(f"circuits for {train.name} on {args.model}, seeds {spread.seeds}:")
    print(table.to_string())
    print("nodes kept by every seed / by some seed, per granularity:")
    counts = consensus.groupby("granularity")["share"].agg(
        every=lambda s: int((s >= 1).sum()), some="count"
    )
    print(counts.to_string())
    return {"spread": spread, "table": table}


def evaluate_saved(args: argparse.Namespace) -> dict[str, Any]:
    circuit = Circuit.load(args.circuit)
    model, task = _model_and_task(args)
    evaluation = evaluate(model, circuit, task, ablation=args.ablation)
    print(_summary(circuit))
    print(evaluation)
    print(json.dumps(evaluation.to_dict()))
    return {"circuit": circuit, "evaluation": evaluation}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    {"discover": discover, "evaluate": evaluate_saved}[args.command](args)
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tl-nodeprune`: discover a circuit from the shell, or evaluate a saved one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .ablation import ABLATIONS
from .circuit import Circuit
from .evaluate import evaluate
from .pruner import NodePruner, PruneConfig
from .sites import GRANULARITIES

TASKS = ("ioi", "ioi_independent", "greater_than")
PLANTED = "planted"
# 800 of 1,000 prompts to train on: 150 steps of 8 see each at most twice, so a circuit fits
# the task rather than its training prompts, and 200 prompts are held out (docs/quality.md,
# sections 5 to 7).
DEFAULT_PROMPTS = 1000
DEFAULT_TRAIN_FRACTION = 0.8


def _model_and_task(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and build the task; `planted` gives a toy model with a known circuit."""
    if args.model == PLANTED or args.task == PLANTED:
        if not args.model == args.task == PLANTED:
            raise SystemExit("--model planted goes with --task planted (and only with it).")
        from .planted import planted_problem

        problem = planted_problem("bridge-native", seed=args.seed, n_prompts=args.n_prompts)
        if args.device is not None:
            problem.model.to(args.device)
        return problem.model, problem.task
    from . import tasks
    from .models import load_model

    model = load_model(args.model, device=args.device)
    make = {"ioi": tasks.ioi, "ioi_independent": tasks.ioi_independent,
            "greater_than": tasks.greater_than}[args.task]  # fmt: skip
    return model, make(model, n=args.n_prompts, seed=args.seed)


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False) -> Any:
    """An argparse type: a `kind` number in [low, high) (or (low, high)), checked at parse time."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        below = value <= low if low_open else value < low
        if below or (high is not None and not value < high) or value != value:
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


POSITIVE = _number(int, 1)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (offline), a TransformerLens name such as gpt2, or planted",
    )
    p.add_argument("--task", default="ioi", choices=(*TASKS, PLANTED))
    p.add_argument(
        "--n-prompts",
        type=POSITIVE,
        default=None,
        help=f"prompts generated for the task ({DEFAULT_PROMPTS})",
    )
    p.add_argument("--seed", type=_number(int, 0), default=None, help="seed (0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-nodeprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("discover", help="learn node masks and write the circuit as JSON")
    _common(d)
    d.add_argument("--ablation", default="corrupted", choices=ABLATIONS)
    d.add_argument("--out", type=Path, default=Path("circuit.json"))
    d.add_argument(
        "--report",
        nargs="?",
        const=True,
        default=None,
        type=Path,
        metavar="HTML",
        help="also write a self-contained HTML report (default: --out with .html)",
    )
    d.add_argument("--steps", type=POSITIVE, default=PruneConfig.steps)
    d.add_argument("--lr", type=_number(float, 0, low_open=True), default=PruneConfig.lr)
    d.add_argument("--batch-size", type=POSITIVE, default=PruneConfig.batch_size)
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
    d.add_argument("--warmup-steps", type=_number(int, 0), default=0)
    d.add_argument(
        "--target-faithfulness",
        type=float,
        default=None,
        help="return the smallest circuit (along the gate order) whose faithfulness on a "
        "validation quarter of the training prompts reaches this",
    )
    d.add_argument(
        "--train-fraction",
        type=_number(float, 0, 1, low_open=True),
        default=DEFAULT_TRAIN_FRACTION,
        help="share of prompts to train on; the rest measure faithfulness "
        f"({DEFAULT_TRAIN_FRACTION})",
    )
    d.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train once per seed (same prompts and split) and print the spread; writes "
        "OUT with .seedN before the suffix for each",
    )
    e = sub.add_parser(
        "evaluate",
        help="faithfulness of a saved circuit on the held-out prompts of its task",
        description="Scores a saved circuit on the prompts its discovery held out (same task, "
        "seed, prompt count and split, read from the circuit file) with the ablation it was "
        "found with, unless the options below say otherwise.",
    )
    e.add_argument("circuit", type=Path)
    _common(e)
    e.add_argument(
        "--ablation", default=None, choices=ABLATIONS, help="default: the circuit's own"
    )
    e.add_argument(
        "--all-prompts", action="store_true", help="score every prompt, training ones included"
    )
    return parser


def _pairs(items: list[str], flag: str) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} expects G=VALUE pairs such as head=3, got {item!r}.")
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"{flag} {item!r}: {value!r} is not a number (e.g. head=3).") from None
    return out


def _summary(circuit: Circuit) -> str:
    frame = circuit.summary()
    return "\n".join(
        f"  {g:8s} {int(r.kept):6d} / {int(r.total):<6d} ({r.fraction:6.1%})"
        for g, r in frame.iterrows()
    )


def _config(args: argparse.Namespace) -> PruneConfig:
    """The run's PruneConfig, built (and so validated) before any model is loaded."""
    try:
        return PruneConfig(
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
    except ValueError as error:
        raise SystemExit(f"Bad option: {error}") from None


def discover(args: argparse.Namespace) -> dict[str, Any]:
    args.seed = 0 if args.seed is None else args.seed
    args.n_prompts = args.n_prompts or DEFAULT_PROMPTS
    config = _config(args)
    torch.manual_seed(args.seed)
    model, task = _model_and_task(args)
    train, held_out = task.split(args.train_fraction, seed=args.seed)
    if args.seeds:
        return _discover_seeds(args, model, train, held_out, config)
    result = NodePruner(model, config).fit(train)
    evaluation = evaluate(model, result.circuit, held_out, ablation=args.ablation)
    result.circuit.meta.update(
        model=args.model,
        held_out=evaluation.to_dict(),
        seconds=round(result.seconds, 1),
        n_prompts=args.n_prompts,
        train_fraction=args.train_fraction,
    )
    result.circuit.save(args.out)
    print(f"circuit for {task.name} on {args.model} ({result.seconds:.0f} s, {args.steps} steps):")
    print(_summary(result.circuit))
    print(f"held-out ({len(held_out)} prompts): {evaluation}")
    print(f"wrote {args.out}")
    if args.report:
        from .report import report

        path = args.out.with_suffix(".html") if args.report is True else args.report
        report(result, path, evaluation=evaluation, settings={"cli": _cli_settings(args)})
        print(f"wrote {path}")
    return {"circuit": result.circuit, "evaluation": evaluation}


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's own arguments, for the report's settings table."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


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
    """Score a saved circuit; by default on its own held-out prompts, with its own ablation."""
    circuit = Circuit.load(args.circuit)
    meta = circuit.meta
    args.seed = meta.get("seed", 0) if args.seed is None else args.seed
    args.n_prompts = args.n_prompts or meta.get("n_prompts", DEFAULT_PROMPTS)
    model, task = _model_and_task(args)
    if not args.all_prompts:
        task = task.split(meta.get("train_fraction", DEFAULT_TRAIN_FRACTION), seed=args.seed)[1]
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

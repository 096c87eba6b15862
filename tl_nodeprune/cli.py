"""`tl-nodeprune`: discover a circuit from the shell, or evaluate a saved one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch

from . import distributed, tasks
from .ablation import ABLATIONS
from .circuit import Circuit
from .evaluation import evaluate
from .granularities import SPECS
from .pruner import NodePruner, PruneConfig
from .tasks.base import split_size

PLANTED = "planted"
# 800 of 1,000 prompts to train on: 150 steps of 8 see each at most twice, so a circuit fits
# the task rather than its training prompts, and 200 prompts are held out (docs/lab/quality.md,
# sections 5 to 7).
DEFAULT_PROMPTS = 1000
DEFAULT_TRAIN_FRACTION = 0.8
# PruneConfig fields without a generated `discover` option: `--seed` is shared with `evaluate`
# (`_common`), and the hard-concrete gate shape is a nested dataclass, set from Python.
NOT_OPTIONS = ("seed", "hard_concrete")
# What a field's annotation does not say about writing it in the shell.
_METAVARS: dict[str, str | tuple[str, ...]] = {
    "penalty": "G=LAMBDA",
    "target_sparsity": "G=FRACTION",
    "log_alpha_bounds": ("LOW", "HIGH"),
}


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
    from .models import load_model

    model = load_model(args.model, device=args.device)
    return model, tasks.get(args.task)(model, n=args.n_prompts, seed=args.seed)


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


def _form(hint: Any) -> tuple[str, Any]:
    """How a PruneConfig annotation is written in the shell, and the annotation without None:
    "flag" (bool), "pairs" (G=VALUE per granularity), "tuple", "words" (a Literal's values,
    true/false where bool is allowed too), "number", or "" (no shell form)."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        rest = tuple(a for a in get_args(hint) if a is not type(None))
        hint = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 (a runtime union)
    origin = get_origin(hint)
    if hint is bool:
        return "flag", hint
    if origin is Mapping:
        return "pairs", hint
    if origin is tuple:
        return "tuple", hint
    if _words(hint):
        return "words", hint
    return ("number" if hint in (int, float) else ""), hint


def _words(hint: Any) -> dict[str, Any]:
    """The shell words for a Literal annotation, or a Union holding one (bool adds true, false)."""
    members = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    words: dict[str, Any] = {}
    for member in members:
        if get_origin(member) is Literal:
            words |= {str(v): v for v in get_args(member)}
        elif member is bool:
            words |= {"true": True, "false": False}
    return words


def _word(words: dict[str, Any]) -> Callable[[str], Any]:
    """An argparse type: one of `words`, turned into the value it stands for."""

    def parse(text: str) -> Any:
        if text not in words:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(words)}, got {text!r}")
        return words[text]

    return parse


def _checked(kind: type, f: dataclasses.Field[Any], optional: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` number that passes the field's own check, at parse time
    (`none` gives None where the field allows it: `--target-kl none` turns a default off)."""
    check = f.metadata.get("check")

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if check is not None:
            try:
                check(f.name, value)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def _option(f: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    """argparse keywords for one PruneConfig field: shape from its annotation, default and help
    from the field."""
    form, kind = _form(hint)
    text = f.metadata["help"].replace("%", "%%")
    # A flag's default is left out: some argparse versions append it to a flag's help.
    if f.default is not None and form != "flag":
        text += f" (default: {f.default})"
    option: dict[str, Any] = {"default": f.default, "help": text}
    if form == "flag":
        return option | {"action": argparse.BooleanOptionalAction}
    if form == "pairs":
        return option | {"nargs": "+", "default": [], "metavar": _METAVARS.get(f.name, "G=VALUE")}
    if form == "tuple":
        args = get_args(kind)
        count = "+" if args[-1] is Ellipsis else len(args)
        # granularities: every registered one, read when the parser is built
        choices = tuple(SPECS) if f.name == "granularities" else None
        option |= {"nargs": count, "type": args[0], "choices": choices}
        return option | ({"metavar": _METAVARS[f.name]} if f.name in _METAVARS else {})
    if form == "words":
        words = _words(kind)
        return option | {"type": _word(words), "metavar": "{" + ",".join(words) + "}"}
    if form == "number":
        optional = type(None) in get_args(hint)
        return option | {"type": _checked(kind, f, optional),
                         **({"metavar": "{NUMBER,none}"} if optional else {})}  # fmt: skip
    raise TypeError(
        f"PruneConfig.{f.name} ({hint}) has no command-line form; teach cli._form one, or add "
        "it to cli.NOT_OPTIONS."
    )


def _config_options(p: argparse.ArgumentParser) -> None:
    """One option per PruneConfig field but NOT_OPTIONS: `--steps` sets `steps`, and so on."""
    hints = get_type_hints(PruneConfig)
    for f in dataclasses.fields(PruneConfig):
        if f.name not in NOT_OPTIONS:
            p.add_argument(_flag(f.name), **_option(f, hints[f.name]))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (offline), a TransformerLens name such as gpt2, or planted",
    )
    p.add_argument("--task", default="ioi", choices=(*tasks.REGISTRY, PLANTED))
    p.add_argument(
        "--n-prompts",
        type=POSITIVE,
        default=None,
        help=f"prompts generated for the task ({DEFAULT_PROMPTS})",
    )
    p.add_argument("--seed", type=_number(int, 0), default=None, help="seed (0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _discover_options(d: argparse.ArgumentParser) -> None:
    _common(d)
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
    _config_options(d)
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
    d.add_argument(
        "--batched-seeds",
        action="store_true",
        help="with --seeds: train every seed at once, one forward per step over all their "
        "batches (the same circuits, fewer passes; not under torchrun)",
    )


def _evaluate_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("circuit", type=Path)
    _common(e)
    e.add_argument(
        "--ablation", default=None, choices=ABLATIONS, help="default: the circuit's own"
    )
    e.add_argument(
        "--all-prompts", action="store_true", help="score every prompt, training ones included"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-nodeprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _discover_options(
        sub.add_parser(
            "discover",
            help="learn node masks and write the circuit as JSON",
            description="Learns node masks on the task's training prompts, scores the circuit "
            "on the held-out rest and writes it as JSON. Every PruneConfig field has an option "
            "(--seed also draws the prompts and their split) except hard_concrete, which is "
            "set from Python.",
        )
    )
    _evaluate_options(
        sub.add_parser(
            "evaluate",
            help="faithfulness of a saved circuit on the held-out prompts of its task",
            description="Scores a saved circuit on the prompts its discovery held out (same "
            "task, seed, prompt count and split, read from the circuit file) with the ablation "
            "it was found with, unless the options below say otherwise.",
        )
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
    """The run's PruneConfig from the options named after its fields, built (and so validated)
    before any model is loaded."""
    hints = get_type_hints(PruneConfig)
    values = {}
    for f in dataclasses.fields(PruneConfig):
        if f.name in vars(args):
            value, form = getattr(args, f.name), _form(hints[f.name])[0]
            if form == "pairs":
                value = _pairs(value, _flag(f.name)) or None
            elif form == "tuple" and value is not None:
                value = tuple(value)
            values[f.name] = value
    try:
        return PruneConfig(**values)
    except ValueError as error:
        raise SystemExit(f"Bad option: {error}") from None


def discover_config(argv: list[str]) -> PruneConfig:
    """The PruneConfig that `tl-nodeprune discover ARGV...` would train with; loads nothing."""
    args = _parser().parse_args(["discover", *argv])
    args.seed = 0 if args.seed is None else args.seed
    return _config(args)


def _check_prompt_count(args: argparse.Namespace, config: PruneConfig) -> None:
    """Refuse, before a model loads, a prompt count too small for discover's split (training
    and held-out prompts) or for fit's (a validation share of the training prompts)."""
    n = args.n_prompts
    try:
        n_train = split_size(n, args.train_fraction)
    except ValueError:
        raise SystemExit(
            f"--n-prompts {n}: at --train-fraction {args.train_fraction} that leaves no training "
            "or no held-out prompt. Ask for more prompts (a few hundred)."
        ) from None
    if config.holds_out and config.validation_split == "prompts":
        try:
            split_size(n_train, 1 - config.validation_fraction)
        except ValueError:
            off = [f"--no-{_flag(name)[2:]}" if value is False else f"{_flag(name)} none"
                   for name, value in config.held_out_for.items()]  # fmt: skip
            raise SystemExit(
                f"--n-prompts {n}: its {n_train} training prompts leave none to validate on "
                f"(fit holds out --validation-fraction {config.validation_fraction} of them to "
                "select, certify or stop on). Ask for more prompts (a few hundred), or train on "
                f"all of them: {' '.join(off)}."
            ) from None


def discover(args: argparse.Namespace) -> dict[str, Any]:
    args.seed = 0 if args.seed is None else args.seed
    args.n_prompts = args.n_prompts or DEFAULT_PROMPTS
    if args.batched_seeds and not args.seeds:
        raise SystemExit("--batched-seeds trains several seeds at once; name them: --seeds 0 1 2.")
    config = _config(args)
    _check_prompt_count(args, config)
    torch.manual_seed(args.seed)
    model, task = _model_and_task(args)
    train, held_out = task.split(args.train_fraction, seed=args.seed)
    if distributed.is_main() and distributed.world() > 1:  # under torchrun
        how = "seeds dealt over" if args.seeds else "data parallel over"
        print(f"{how} {distributed.world()} ranks ({torch.distributed.get_backend()})")
    if args.seeds:
        return _discover_seeds(args, model, train, held_out, config)
    result = NodePruner(model, config).fit(train)
    if not distributed.is_main():  # rank 0 evaluates, writes and prints
        return {"circuit": result.circuit}
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
        from .reporting import report

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
    spread = NodePruner(model, config).fit_seeds(train, args.seeds, batched=args.batched_seeds)
    if not distributed.is_main():  # every rank holds the spread; rank 0 writes it
        return {"spread": spread}
    table = spread.summary()
    for seed, result in spread.results.items():
        evaluation = evaluate(model, result.circuit, held_out, ablation=args.ablation)
        table.loc[seed, "held_out_faithfulness"] = round(evaluation.faithfulness, 3)
        table.loc[seed, "held_out_kl"] = round(evaluation.kl, 3)
        result.circuit.meta.update(
            model=args.model, held_out=evaluation.to_dict(), seconds=round(result.seconds, 1)
        )
        result.circuit.save(args.out.with_name(f"{args.out.stem}.seed{seed}{args.out.suffix}"))
    print(f"circuits for {train.name} on {args.model}, seeds {spread.seeds}:")
    print(table.to_string())
    print("agreement between seeds per granularity (mean pairwise Jaccard of node sets; nodes "
          "kept by every seed / by some seed):")
    print(spread.stability().round(3).to_string())
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
    # Under torchrun (WORLD_SIZE > 1): join the process group; each GPU rank uses its own GPU.
    with distributed.launched(args.device) as device:
        args.device = device
        {"discover": discover, "evaluate": evaluate_saved}[args.command](args)
    print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

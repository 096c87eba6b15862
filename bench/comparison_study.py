"""Every method on the same prompts, at equal faithfulness and at equal size (issue 19).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/comparison_study.py \
        --model smollm2-135m --task ioi --seeds 0 1 2 [--n-prompts 1000] [--steps 150] \
        [--methods node_pruning eap ...] [--edge-steps 300] [--edge-target 0.95] \
        [--out docs/generated] [--cache out/compare_cache]

Per seed, the prompts and split of `tl-nodeprune discover --seed N`: `--n-prompts` drawn with
seed N, split at `--train-fraction` with seed N (`--model planted`: its planted model and
prompts, answered by the model's own top tokens, `posed`). Node pruning trains with the current
defaults (`--steps` overrides its steps) on the training prompts; every method is scored there
(`node_scores.method_scores`), and its curves are measured on the held-out prompts at MIB's node
level (heads and MLP blocks) and at neuron level (`curves.compare_methods`). Per method and
seed: CPR, CMD, the heads, MLP blocks and neurons of the smallest measured circuit with f >=
`--target-f` and its KL, the sizes for KL <= 0.3 and 0.1, f and KL at node pruning's size,
seconds to score and peak memory (RSS high-water mark; on a GPU `max_memory_allocated`).
Each edge method (EAP, EAP-IG, edge pruning) also gets rows "<method> (edges ablated)"
(`--no-edges-ablated`: none): its top edges kept and every other edge ablated
(`edge_curves.compare_edge_methods`), sizes counted in the nodes those edges touch.
Irrelevant neurons (`tl_nodeprune.irrelevant`): for each method's heads-and-blocks circuit at
its f >= target size, and edge pruning's own circuit, the neurons node pruning needs inside
their MLP blocks for the same faithfulness. Writes comparison_<task>.md (tables, with this
command at the top), comparison_<task>.csv (one row per level, method and seed),
comparison_<task>_neurons.csv, the figures as PNGs, one self-contained HTML page (plotly inlined
once), comparison.md (an index of every task's page in `--out`) and node pruning's circuit per
seed as a MIB graph file (mib_<task>_seed<N>.json, for the MIB circuit track); `--mib NAME=PATH`
adds circuits from other tools' MIB files as rows. `--cache DIR` keeps each method's scores
per seed as JSON and reuses them when rerun with the same settings: on two CPU cores one
SmolLM2 seed takes hours (activation patching alone ~45 s a node on 800 prompts), so the study
can stop and go on. Each finished seed's measurements go to `--out` as
comparison_<task>_seed<N>.json with the settings they were measured under; a rerun with the
same settings reads them instead of measuring again (`--no-reuse-seeds`: measure every seed);
one whose irrelevant neurons came from an earlier search (`IRRELEVANT_SEARCH`) gets those alone
recomputed from `--cache` (without the scores there, they are left out of the tables).
The method cache is large and stays on its machine; the seed files are small and committed, so
a study spread over several machines adds a seed at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.common import GENERATED, reset_peak_rss, status_bytes
from bench.comparison_output import write_outputs
from tl_nodeprune import tasks
from tl_nodeprune.baselines import edge_pruning
from tl_nodeprune.baselines.edge_eval import EdgeEvaluator
from tl_nodeprune.baselines.edge_pruning import EdgePruneConfig
from tl_nodeprune.circuit import Circuit
from tl_nodeprune.cli import DEFAULT_PROMPTS, DEFAULT_TRAIN_FRACTION
from tl_nodeprune.curves import LEVELS, compare_methods, curve_evaluator, keep_top
from tl_nodeprune.edge_curves import (
    EDGE_METHODS,
    EDGES_ABLATED,
    compare_edge_methods,
    first_meeting,
    method_edge_scores,
)
from tl_nodeprune.formats import read_mib, write_mib
from tl_nodeprune.irrelevant import irrelevant_neurons
from tl_nodeprune.metrics import MIB_FRACTIONS
from tl_nodeprune.node_scores import METHODS, NodeList, method_scores
from tl_nodeprune.pruner import NodePruner, PruneConfig
from tl_nodeprune.sites import model_device
from tl_nodeprune.tasks.base import PromptTask

PLANTED = "planted"
PLANTED_PROMPTS = 64
# The coarse circuits whose MLP blocks the irrelevant-neurons analysis opens (random: no).
COARSE = ("node_pruning", "eap", "eap_ig", "activation_patching", "edge_pruning")
EDGE_OWN = "edge_pruning (own circuit)"
# Node pruning's settings here: the penalties alone, one noise draw per batch. The study scores
# every method by its ranking of the nodes (curves over the same fractions, the size each
# needs for f >= 0.9), so a budget's own cut on the ranking is not what it compares; fixed
# settings also keep the seeds measured so far valid whatever fit's defaults become.
NODE_PRUNING = {"target_kl": None, "target_faithfulness": None, "gate_noise": "batch"}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a load_model name, or 'planted'")
    p.add_argument("--task", default="ioi", choices=tuple(tasks.REGISTRY),
                   help="ignored with --model planted (its own task)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-prompts", type=int, default=None,
                   help=f"per seed ({DEFAULT_PROMPTS}; planted {PLANTED_PROMPTS})")  # fmt: skip
    p.add_argument("--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION)
    p.add_argument("--steps", type=int, default=None, help="node pruning's steps (its default)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--edge-steps", type=int, default=EdgePruneConfig.steps)
    p.add_argument("--edge-target", type=float, default=EdgePruneConfig.target_edge_sparsity,
                   help="edge pruning's target edge sparsity")  # fmt: skip
    p.add_argument("--ig-steps", type=int, default=5, help="EAP-IG's interpolation steps")
    p.add_argument("--patching-prompts", type=int, default=None,
                   help="score activation patching on the first N training prompts (default: "
                        "all); one exact pass per head and block makes it the slowest method "
                        "on a CPU")  # fmt: skip
    p.add_argument("--fractions", type=float, nargs="+", default=list(MIB_FRACTIONS))
    p.add_argument("--refine", type=float, default=0.01,
                   help="bisect each node curve's step to --target-f down to this share of the "
                        "level's nodes (MIB's grid jumps from 20%% to 50%%), and the irrelevant "
                        "neurons' search to this share of a circuit's neurons; 0: the grid, "
                        "and one neuron")  # fmt: skip
    p.add_argument("--edges-ablated", action=argparse.BooleanOptionalAction, default=True,
                   help="also give each edge method (eap, eap_ig, edge_pruning) rows with its "
                   "top edges kept and every other edge ablated, beside its node-projected "
                   "rows")  # fmt: skip
    p.add_argument("--target-f", type=float, default=0.9)
    p.add_argument("--mib", nargs="*", default=[], metavar="NAME=PATH",
                   help="circuits from MIB / EAP-IG graph files, scored on this model as further "
                   "rows 'mib:NAME' (their edge scores projected to nodes, as edge pruning's)")
    p.add_argument("--device", default=None, help="the model's device (load_model's default)")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                   help="write the figures as PNGs too (kaleido)")  # fmt: skip
    p.add_argument("--out", type=Path, default=GENERATED)
    p.add_argument("--cache", type=Path, default=None,
                   help="keep each method's scores here (JSON) and reuse them on a rerun with "
                        "the same settings, so a long study can stop and go on")  # fmt: skip
    p.add_argument("--reuse-seeds", action=argparse.BooleanOptionalAction, default=True,
                   help="read a seed's measurements from --out/comparison_TASK_seedN.json when "
                        "it was measured under the same settings, instead of measuring it "
                        "again (--no-reuse-seeds: measure every seed)")  # fmt: skip
    args = p.parse_args(argv)
    if args.model == PLANTED:
        args.task = PLANTED
    args.n_prompts = args.n_prompts or (PLANTED_PROMPTS if args.model == PLANTED else
                                        DEFAULT_PROMPTS)  # fmt: skip
    return args


def load(args: argparse.Namespace, seed: int, model: Any = None) -> tuple[Any, Any, Any]:
    """(model, train, held_out) for `seed`, drawn and split as `tl-nodeprune discover` does.

    A planted model is built per seed (as `discover --model planted --seed N`); a hub model
    is loaded once and passed back in.
    """
    torch.manual_seed(seed)
    if args.model == PLANTED:
        from tl_nodeprune.planted import planted_problem

        problem = planted_problem("bridge-native", seed=seed, n_prompts=args.n_prompts)
        model, task = problem.model, posed(problem.model, problem.task)
        if args.device is not None:
            model.to(args.device)
    else:
        if model is None:
            from tl_nodeprune.models import load_model

            model = load_model(args.model, device=args.device)
        task = tasks.get(args.task)(model, n=args.n_prompts, seed=seed)
    train, held_out = task.split(args.train_fraction, seed=seed)
    return model, train, held_out


def posed(model: Any, task: PromptTask) -> PromptTask:
    """The planted prompts with answers the model separates: its top token on the clean prompt
    against its top token on the corrupted one (the planted task's random answers make f
    erratic, often far above 1)."""
    with torch.no_grad():
        clean, corrupted = model(task.clean)[:, -1], model(task.corrupted)[:, -1]
    good, bad = clean.argmax(-1), corrupted.argmax(-1)
    bad = torch.where(bad == good, clean.topk(2).indices[:, 1], bad)
    return PromptTask.from_tokens(task.clean, task.corrupted, good, bad, name=task.name)


@contextlib.contextmanager
def peak_memory(model: Any, into: dict[str, float]) -> Iterator[None]:
    """Peak memory (MiB) and seconds of the block into `into`: the GPU's allocated peak on a
    CUDA model, else this process's resident-set high-water mark."""
    cuda = model_device(model).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    start = time.perf_counter()
    yield
    into["seconds"] = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    into["peak_mib"] = peak / 2**20


@dataclass
class Scored:
    """Every method's node scores on one seed's training prompts, with what each cost."""

    scores: dict[str, pd.Series] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    edge_circuit: Circuit | None = None
    node_circuit: Circuit | None = None
    edge_scores: dict[str, pd.Series] = field(default_factory=dict)  # edge methods, per edge


def score_methods(model: Any, train: Any, args: argparse.Namespace, seed: int) -> Scored:
    """Score every method of `args.methods` on `train`; node and edge pruning are timed whole
    (training included), the others by `method_scores`."""
    out = Scored()
    for method in args.methods:
        hit = read_cached(args, seed, method)
        if hit is not None:
            take_cached(out, method, hit)
            continue
        cost: dict[str, float] = {}
        with peak_memory(model, cost):
            if method == "node_pruning":
                config = PruneConfig(seed=seed, progress=False, **NODE_PRUNING,
                                     **({"steps": args.steps} if args.steps else {}))  # fmt: skip
                result: Any = NodePruner(model, config).fit(train)
                out.node_circuit = result.circuit
            elif method == "edge_pruning":
                result = out.edge_circuit = edge_pruning(
                    model, train, seed=seed, progress=False, steps=args.edge_steps,
                    target_edge_sparsity=args.edge_target,
                )  # fmt: skip
            else:
                result = None
            extra = {"ig_steps": args.ig_steps} if method == "eap_ig" else {}
            prompts = train
            if method == "activation_patching" and args.patching_prompts:
                prompts = train.subset(torch.arange(min(args.patching_prompts, len(train))))
            scores = method_scores(model, prompts, method, result=result, seed=seed, **extra)
            scores.attrs["prompts"] = len(prompts)
        scores.attrs["seconds"] = cost["seconds"]
        out.scores[method], out.costs[method] = scores, cost
        own = {"node_pruning": out.node_circuit, "edge_pruning": out.edge_circuit}.get(method)
        write_cached(args, seed, method, scores, cost, own)
    for spec in args.mib:  # other tools' circuits, read from MIB files (issue 19, item 6)
        name, _, path = spec.partition("=")
        scores = method_scores(model, train, "edge_pruning", result=read_mib(path, model))
        scores.attrs["seconds"] = math.nan  # made elsewhere
        out.scores[f"mib:{name}"] = scores
        out.costs[f"mib:{name}"] = {"seconds": math.nan, "peak_mib": math.nan}
    if args.edges_ablated:
        score_edges(model, train, args, seed, out)
    return out


def take_cached(
    out: Scored, method: str, hit: tuple[pd.Series, dict[str, float], Circuit | None]
) -> None:
    """One method's cached (scores, cost, own circuit) into `out`."""
    out.scores[method], out.costs[method], circuit = hit
    if method == "node_pruning":
        out.node_circuit = circuit
    elif method == "edge_pruning":
        out.edge_circuit = circuit


def score_edges(
    model: Any, train: Any, args: argparse.Namespace, seed: int, out: Scored
) -> None:
    """Each edge method's scores per edge into `out.edge_scores` (`method_edge_scores`).

    Edge pruning's are its trained circuit's log_alpha (no new run; its cost is the training
    run's). EAP and EAP-IG score edges in a pass of their own: their node scores come from
    attributions at the nodes, which no edge score replaces for neurons.
    """
    for method in (m for m in args.methods if m in EDGE_METHODS):
        name = method + EDGES_ABLATED
        if method == "edge_pruning":
            scores = method_edge_scores(model, train, method, result=out.edge_circuit)
            out.costs[name] = dict(out.costs[method])
        elif (hit := read_cached(args, seed, name)) is not None:
            scores, out.costs[name], _ = hit
        else:
            out.costs[name] = cost = {}
            with peak_memory(model, cost):
                scores = method_edge_scores(model, train, method, ig_steps=args.ig_steps)
            write_cached(args, seed, name, scores, cost)
        scores.attrs["seconds"] = out.costs[name]["seconds"]
        out.edge_scores[method] = scores


# The settings a method's scores depend on: a cached file made under others is not reused.
CACHE_KEYS = ("model", "task", "n_prompts", "train_fraction", "steps", "edge_steps",
              "edge_target", "ig_steps", "device")  # fmt: skip


def _cache_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    settings = {k: getattr(args, k) for k in CACHE_KEYS}
    if method == "activation_patching":  # the one method scored on fewer prompts
        settings["patching_prompts"] = args.patching_prompts
    elif method in ("node_pruning", "edge_pruning"):  # a changed default must not be reused
        config = PruneConfig(**NODE_PRUNING) if method == "node_pruning" else EdgePruneConfig()
        fields = {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in ("seed", "progress", "steps")}  # fmt: skip
        settings["config"] = json.loads(json.dumps(fields, default=str))
    return settings


def _cache_path(args: argparse.Namespace, seed: int, method: str) -> Path:
    return args.cache / f"{args.task}_seed{seed}_{method.replace(' ', '_')}.json"


def read_if_same(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON at `path` (the method cache's or a seed file) when it was written under
    `settings`, compared as JSON reads them back (tuples as lists); else None."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if data["settings"] == json.loads(json.dumps(settings)) else None


def read_cached(
    args: argparse.Namespace, seed: int, method: str
) -> tuple[pd.Series, dict[str, float], Circuit | None] | None:
    """(scores, cost, the method's own circuit) from `--cache`, or None when `--cache` is off,
    the file is missing or it was made under other settings."""
    if args.cache is None:
        return None
    data = read_if_same(_cache_path(args, seed, method), _cache_settings(args, method))
    if data is None:
        return None
    scores = pd.Series(data["values"], index=pd.Index(data["index"], name=data["index_name"]),
                       name=data["name"], dtype=float)  # fmt: skip
    scores.attrs.update(data["attrs"])
    circuit = None if data["circuit"] is None else Circuit.from_dict(data["circuit"])
    return scores, data["cost"], circuit


def write_cached(args: argparse.Namespace, seed: int, method: str, scores: pd.Series,
                 cost: dict[str, float], circuit: Circuit | None = None) -> None:
    """Keep one method's scores (and node or edge pruning's circuit) as JSON in `--cache`."""
    if args.cache is None:
        return
    data = {"settings": _cache_settings(args, method), "name": scores.name,
            "index_name": scores.index.name, "index": [str(i) for i in scores.index],
            "values": [float(v) for v in scores], "attrs": scores.attrs, "cost": cost,
            "circuit": None if circuit is None else circuit.to_dict()}  # fmt: skip
    path = _cache_path(args, seed, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def seed_rows(
    model: Any, held_out: Any, scored: Scored, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame]]:
    """Rows of both levels' `compare_methods` tables on the held-out prompts, with the heads,
    MLP blocks and neurons of each method's f >= target circuit; and the curves by level."""
    nodes = NodeList.from_model(model)
    rows, curves = [], {}
    edges: dict[str, Any] = {}  # one edge evaluator and one measured curve per method
    for level in LEVELS:
        table = compare_methods(model, held_out, list(scored.scores), args.fractions, level,
                                target_f=args.target_f, scores=scored.scores,
                                refine=args.refine or None)  # fmt: skip
        curves[level] = pd.concat(
            [c.assign(method=m) for m, c in table.attrs["curves"].items()], ignore_index=True
        )
        for method, row in table.iterrows():
            n_f = row["n_f"]
            counts: dict[str, float] = dict.fromkeys(("heads_f", "mlp_f", "neurons_f"), math.nan)
            if n_f is not None and not pd.isna(n_f):
                kept = keep_top(scored.scores[method], nodes, int(n_f), level)
                counts = {"heads_f": kept.n_kept("head"), "mlp_f": kept.n_kept("mlp"),
                          "neurons_f": kept.n_kept("neuron")}  # fmt: skip
            rows.append({"level": level, "method": method, **row.to_dict(), **counts,
                         "ablated": "nodes", "at_size": table.attrs["at_size"],
                         "peak_mib": scored.costs[method]["peak_mib"]})  # fmt: skip
        more, edge_curves = edge_rows(model, held_out, scored, args, level,
                                      table.attrs["at_size"], edges)  # fmt: skip
        rows += more
        curves[level] = pd.concat([curves[level], *edge_curves], ignore_index=True)
    return rows, curves


def edge_rows(
    model: Any,
    held_out: Any,
    scored: Scored,
    args: argparse.Namespace,
    level: str,
    at_size: int | None,
    cache: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """The edge methods' rows at `level` with every edge outside their top edges ablated
    (`compare_edge_methods`), and their curves; `cache` keeps the evaluator and the measured
    curves across levels (a level only re-counts nodes)."""
    if not scored.edge_scores:
        return [], []
    cache.setdefault("evaluator", EdgeEvaluator(model, held_out))
    table = compare_edge_methods(model, held_out, scored.edge_scores, args.fractions, level,
                                 at_size, args.target_f, evaluator=cache["evaluator"],
                                 curves=cache.get("curves"))  # fmt: skip
    cache["curves"] = table.attrs["curves"]
    rows = []
    for name, row in table.iterrows():
        frame = cache["curves"][str(name).removesuffix(EDGES_ABLATED)]
        n_f = None if row["n_f"] is None or pd.isna(row["n_f"]) else int(row["n_f"])
        hit = first_meeting(frame, n_f, args.target_f)
        counts = {k: hit.get(c, math.nan) for k, c in
                  (("heads_f", "heads"), ("mlp_f", "mlp"), ("neurons_f", "neurons"))}  # fmt: skip
        rows.append({"level": level, "method": name, **row.to_dict(), **counts,
                     "ablated": "edges", "at_size": at_size,
                     "peak_mib": scored.costs[str(name)]["peak_mib"]})  # fmt: skip
    return rows, [c.assign(method=m + EDGES_ABLATED) for m, c in cache["curves"].items()]


def coarse_circuits(
    model: Any, scored: Scored, rows: list[dict[str, Any]]
) -> dict[str, Circuit]:
    """Each method's heads-and-blocks circuit at its f >= target size, and edge pruning's own."""
    nodes = NodeList.from_model(model)
    out = {}
    for row in rows:
        n_f = row["n_f"]
        if row["level"] == "blocks_heads" and row["method"] in COARSE and not pd.isna(n_f):
            out[row["method"]] = keep_top(scored.scores[row["method"]], nodes, int(n_f),
                                          "blocks_heads")  # fmt: skip
    if scored.edge_circuit is not None:
        out[EDGE_OWN] = scored.edge_circuit
    return out


def run_seed(args: argparse.Namespace, seed: int, model: Any) -> tuple[Any, ...]:
    """One seed of the study: (model, comparison rows, curves by level, irrelevant neurons,
    neurons kept per layer)."""
    model, train, held_out = load(args, seed, None if args.model == PLANTED else model)
    scored = score_methods(model, train, args, seed)
    if scored.node_circuit is not None:  # our circuit for the MIB circuit track (item 6)
        write_mib(scored.node_circuit, args.out / f"mib_{args.task}_seed{seed}.json")
    rows, curves = seed_rows(model, held_out, scored, args)
    edge = scored.edge_circuit
    for row in rows:
        row["seed"] = seed
        if row["method"] == "edge_pruning" and edge is not None:
            row["edge_sparsity"] = 1 - len(edge.edges or ()) / edge.meta["n_edges_total"]
    return model, rows, curves, *seed_irrelevant(model, held_out, scored, rows, args, seed)


def seed_irrelevant(model: Any, held_out: Any, scored: Scored, rows: list[dict[str, Any]],
                    args: argparse.Namespace, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One seed's irrelevant neurons and neurons kept per layer (empty frames when node
    pruning is not compared or the model has no neurons)."""
    if "node_pruning" not in scored.scores or not NodeList.from_model(model).shape.has("neuron"):
        return pd.DataFrame(), pd.DataFrame()
    evaluator = curve_evaluator(model, held_out, "neurons")
    neurons = irrelevant_neurons(model, held_out, coarse_circuits(model, scored, rows),
                                 scored.scores["node_pruning"], args.target_f,
                                 evaluator, args.refine)  # fmt: skip
    per_layer = neurons.attrs.pop("per_layer").assign(seed=seed)
    return neurons.reset_index().assign(seed=seed), per_layer


def refresh_irrelevant(args: argparse.Namespace, seed: int, model: Any,
                       rows: list[dict[str, Any]]) -> tuple[Any, ...] | None:  # fmt: skip
    """(model, irrelevant neurons, per layer) of a seed file measured under an earlier
    irrelevant-neurons search, recomputed from every method's cached scores (minutes, where
    the whole seed takes hours); None when `--cache` lacks a method's."""
    hits = {method: read_cached(args, seed, method) for method in args.methods}
    if missing := [method for method, hit in hits.items() if hit is None]:
        print(f"seed {seed}: its irrelevant neurons come from an earlier search and --cache "
              f"lacks {', '.join(missing)}'s scores to recompute them; its rows and curves are "
              "used, its irrelevant neurons left out (--no-reuse-seeds: measure it again)")
        return None
    print(f"seed {seed}: recomputing its irrelevant neurons (an earlier search) from --cache",
          flush=True)  # fmt: skip
    model, _, held_out = load(args, seed, None if args.model == PLANTED else model)
    scored = Scored()
    for method, hit in hits.items():
        take_cached(scored, method, hit)  # type: ignore[arg-type]
    return model, *seed_irrelevant(model, held_out, scored, rows, args, seed)


def _seed_path(args: argparse.Namespace, seed: int) -> Path:
    return args.out / f"comparison_{args.task}_seed{seed}.json"


# The irrelevant-neurons search (`irrelevant.smallest_reaching`) the seed files record. Files
# without it were measured by halving down from all neurons, which stops in the dip of node
# pruning's non-monotone neuron curves; `refresh_irrelevant` recomputes their neurons alone.
IRRELEVANT_SEARCH = "up the fractions, then bisect below the first hit"


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What one seed's measurements depend on: every method's scoring settings (as `--cache`
    keys them) and the curves' own."""
    curves = {k: getattr(args, k) for k in ("fractions", "refine", "edges_ablated", "target_f",
                                            "mib")}  # fmt: skip
    curves["irrelevant_search"] = IRRELEVANT_SEARCH
    return {"methods": {m: _cache_settings(args, m) for m in args.methods}, "curves": curves}


def _earlier_search(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a file of the earlier irrelevant-neurons search would hold them."""
    curves = {k: v for k, v in settings["curves"].items() if k != "irrelevant_search"}
    return {**settings, "curves": curves}


def _frame_json(frame: pd.DataFrame) -> dict[str, Any]:
    """A frame as exact JSON: full-precision floats, column labels and index kept as they are."""
    return {"columns": frame.columns.tolist(), "index": frame.index.tolist(),
            "index_name": frame.index.name,
            "data": frame.astype(object).to_numpy().tolist()}  # fmt: skip


def _json_frame(data: dict[str, Any]) -> pd.DataFrame:
    index = pd.Index(data["index"], name=data["index_name"])
    frame = pd.DataFrame(data["data"], columns=data["columns"], index=index)
    return frame.infer_objects()


def _plain(value: Any) -> Any:
    """numpy scalars (np.int64, np.bool_) as the Python values json writes."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def write_seed(args: argparse.Namespace, seed: int, rows: list[dict[str, Any]],
               curves: dict[str, pd.DataFrame], neurons: pd.DataFrame,
               per_layer: pd.DataFrame) -> Path:  # fmt: skip
    """Keep one seed's measurements beside the study's files (`--out`), with the settings they
    were measured under, so a later run (another session, another machine) reads them instead
    of spending hours measuring them again."""
    data = {"settings": study_settings(args), "rows": rows,
            "curves": {level: _frame_json(c) for level, c in curves.items()},
            "neurons": _frame_json(neurons), "per_layer": _frame_json(per_layer)}  # fmt: skip
    path = _seed_path(args, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, default=_plain))
    return path


def read_seed(args: argparse.Namespace, seed: int) -> tuple[Any, ...] | None:
    """(rows, curves by level, irrelevant neurons, neurons per layer) of a seed measured earlier
    under the same settings, or None; irrelevant neurons and per layer are None when only the
    irrelevant-neurons search was an earlier one."""
    path = _seed_path(args, seed)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    settings = json.loads(json.dumps(study_settings(args)))
    earlier = data["settings"] == _earlier_search(settings)
    if data["settings"] != settings and not earlier:
        print(f"seed {seed}: {path} was measured under other settings; measuring again")
        return None
    curves = {level: _json_frame(c) for level, c in data["curves"].items()}
    if earlier:
        return data["rows"], curves, None, None
    return (data["rows"], curves, _json_frame(data["neurons"]),
            _json_frame(data["per_layer"]))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the study and write its files; returns them by kind."""
    args = parse(argv)
    command = "OMP_NUM_THREADS=1 PYTHONPATH=. python bench/comparison_study.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    model, rows, curves, neurons, layers = None, [], [], [], []
    for seed in args.seeds:
        measured = read_seed(args, seed) if args.reuse_seeds else None
        if measured is not None and measured[2] is None:  # an earlier irrelevant search
            refreshed = refresh_irrelevant(args, seed, model, measured[0])
            if refreshed is None:  # the file stays as it is, to be refreshed with the cache
                measured = (*measured[:2], pd.DataFrame(), pd.DataFrame())
            else:
                model, neurons_now, per_layer_now = refreshed
                measured = (*measured[:2], neurons_now, per_layer_now)
                write_seed(args, seed, *measured)
        if measured is None:
            model, *measured = run_seed(args, seed, model)
            write_seed(args, seed, *measured)
        else:
            print(f"seed {seed}: read from {_seed_path(args, seed)}", flush=True)
        seed_table, seed_curves, seed_neurons, per_layer = measured
        rows += seed_table
        curves += [c.assign(level=level, seed=seed) for level, c in seed_curves.items()]
        if len(seed_neurons):
            neurons.append(seed_neurons)
            layers.append(per_layer)
        print(f"seed {seed} done", flush=True)
    return write_outputs(
        args, command, pd.DataFrame(rows), pd.concat(curves, ignore_index=True),
        pd.concat(neurons, ignore_index=True) if neurons else pd.DataFrame(),
        pd.concat(layers) if layers else pd.DataFrame(),
    )  # fmt: skip


if __name__ == "__main__":
    main()

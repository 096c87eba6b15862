"""Peak memory of one gated forward+backward, by mixing formula; one fresh process per point.

    python bench/mixing_memory.py [--repeats 3] [--batch 64] [--seq 64]

The mixing hook puts `g * clean + (1 - g) * ablated` in place of a node's output. `old`
computes `x * m + a * (1 - m)` (the formula before issue 10), `sub` computes
`a + m * (x - a)`, `lerp` computes the same as one `torch.lerp(a, x, m)` (what
`tl_nodeprune.ablation` uses now). Each point runs in a new Python process and reports the
growth of its peak resident set (ru_maxrss) over one gated step on a tiny random model with
every head and neuron gated, corrupted values cached, and (exactly, without allocator noise)
the bytes of the distinct tensors autograd keeps for backward.

    python bench/mixing_memory.py --ablation-memory [--n-prompts 512]

measures instead the peak growth while `Ablation(kind="mean")` is built (run it with
PYTHONPATH at two checkouts to compare them; before issue 10 it gathered every clean
activation, now it sums batch by batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from statistics import median
from typing import Any

import torch

FORMULAS = ("old", "sub", "lerp")


def _formula(kind: str):
    def mix(mask: torch.Tensor, ablated: torch.Tensor | None):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            m = mask.to(device=x.device, dtype=x.dtype)
            if ablated is None:
                return x * m
            a = ablated.to(device=x.device, dtype=x.dtype)
            if kind == "old":
                return x * m + a * (1 - m)
            if kind == "sub":
                return a + m * (x - a)
            return torch.lerp(a, x, m)

        return hook

    return mix


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model_and_task(args: argparse.Namespace):
    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.tasks.base import PromptTask

    model = tiny_model("bridge-native", n_layers=4, n_heads=8, d_head=32, d_mlp=1024,
                       d_vocab=256, n_ctx=args.seq)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (2, args.n_prompts, args.seq), generator=gen)
    task = PromptTask.from_tokens(toks[0], toks[1], [1] * args.n_prompts, [2] * args.n_prompts)
    return model, task


def one_point(args: argparse.Namespace) -> dict[str, float]:
    """One gated forward+backward with the chosen formula; peak RSS growth in MiB."""
    torch.set_num_threads(1)
    import tl_nodeprune.ablation as ablation
    from tl_nodeprune.gates import GateSet
    from tl_nodeprune.objectives import forward_answers
    from tl_nodeprune.sites import ModelShape, frozen

    model, task = _model_and_task(args)
    shape = ModelShape.from_model(model)
    gates = GateSet(shape, ("head", "neuron"))
    with frozen(model):
        masks = ablation.site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
        idx = torch.arange(args.batch)
        values = ablation.Ablation(model, task, list(masks)).values(idx, args.seq)
        hooks = [(n, _formula(args.formula)(m, values[n])) for n, m in masks.items()]
        saved: dict[int, int] = {}  # storage address -> bytes, of tensors kept for backward
        alive = {v.untyped_storage().data_ptr() for v in values.values() if v is not None}

        def pack(t: torch.Tensor) -> torch.Tensor:  # ablated values are alive anyway: skip them
            if t.untyped_storage().data_ptr() not in alive:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        before = _peak_mib()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = forward_answers(model, task.clean[: args.batch],
                                     task.answer_pos[: args.batch], hooks)  # fmt: skip
        logits.logsumexp(-1).sum().backward()
    return {"peak_growth_mib": _peak_mib() - before, "saved_mib": sum(saved.values()) / 2**20}


def ablation_point(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS growth while mean-ablation values are built for every head and neuron hook."""
    torch.set_num_threads(1)
    import tl_nodeprune
    from tl_nodeprune.ablation import Ablation, site_masks
    from tl_nodeprune.gates import GateSet
    from tl_nodeprune.sites import ModelShape, frozen

    model, task = _model_and_task(args)
    shape = ModelShape.from_model(model)
    names = list(site_masks(shape, GateSet(shape, ("head", "neuron")).deterministic()))
    with frozen(model):
        before = _peak_mib()
        Ablation(model, task, names, "mean", batch_size=32)
    return {"peak_growth_mib": _peak_mib() - before, "package": tl_nodeprune.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--n-prompts", type=int, default=128)
    parser.add_argument("--formula", choices=FORMULAS, default=None)
    parser.add_argument("--ablation-memory", action="store_true")
    args = parser.parse_args()
    if args.ablation_memory and args.repeats == 0:
        print(json.dumps(ablation_point(args)))
        return
    if args.formula is not None:
        print(json.dumps(one_point(args)))
        return
    base = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq),
            "--n-prompts", str(args.n_prompts)]  # fmt: skip
    points = (
        {"mean ablation": ["--ablation-memory", "--repeats", "0"]}
        if args.ablation_memory
        else {f: ["--formula", f] for f in FORMULAS}
    )
    # Every allocation of 64 KiB or more is its own mapping, returned on free: the peak
    # resident set then follows the live tensors instead of the allocator's caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for label, extra in points.items():
        runs = [
            json.loads(subprocess.run(base + extra, check=True, capture_output=True, env=env,
                                      text=True).stdout.strip().splitlines()[-1])  # fmt: skip
            for _ in range(args.repeats)
        ]
        peaks = [r["peak_growth_mib"] for r in runs]
        kept = runs[0].get("saved_mib")
        saved = "" if kept is None else f"; kept for backward {kept:.1f} MiB"
        print(f"{label:14s} peak growth MiB: median {median(peaks):.1f}  runs {peaks}{saved}")


if __name__ == "__main__":
    main()

"""Host reads of tensor values per training step of `NodePruner.fit`, counted on CPU.

    PYTHONPATH=<checkout> python bench/syncs_per_step.py [--steps 50 100] [--ablation corrupted]

On a GPU every such read (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `float(t)`, `.cpu()`,
`.numpy()` of a device tensor) waits for all queued work: it is a host-device
synchronisation. This script counts the calls made from tl_nodeprune's own code during two
runs of different length on a planted model and prints the marginal count per step (setup
excluded). Run it with PYTHONPATH pointing at two checkouts to compare them. Host-to-device
copies are not counted here (on CPU there are none to see); the loop's are listed in the
report that quotes these numbers.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def count_reads(run, package: str = "tl_nodeprune") -> Counter:
    """Call `run()` with tensor reads patched to count those made from `package`'s files."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"/{package}/" in caller:
                counts[name] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, nargs=2, default=(50, 100))
    parser.add_argument("--ablation", default="corrupted")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import tl_nodeprune as tnp
    from tl_nodeprune.planted import planted_problem

    problem = planted_problem("bridge-native", seed=0, n_prompts=32)
    totals = []
    for steps in args.steps:
        cfg = tnp.PruneConfig(steps=steps, ablation=args.ablation, progress=False)
        pruner = tnp.NodePruner(problem.model, cfg)
        totals.append(count_reads(lambda p=pruner: p.fit(problem.task)))
    short, long = args.steps
    per_step = {k: (totals[1][k] - totals[0][k]) / (long - short) for k in READS}
    print(f"tl_nodeprune from {tnp.__file__}")
    print(f"reads in fit: {dict(totals[0])} ({short} steps), {dict(totals[1])} ({long} steps)")
    print(
        "per step: "
        + ", ".join(f"{k}={v:g}" for k, v in per_step.items() if v)
        + f"; total {sum(per_step.values()):g}"
    )


if __name__ == "__main__":
    main()

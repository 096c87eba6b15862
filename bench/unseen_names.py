"""Which unseen part breaks an IOI circuit: new templates or new names? One JSON line per seed.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/unseen_names.py --seeds 0 1 2 [--n-train 96] \
        [--names ioi|wide] [--cfg '{"granularities": ["attn", "mlp", "head"]}'] [--tag hb]

Per seed N: `--n-train` + 200 IOI prompts drawn with seed N (`--names wide`: from `tasks.ioi`'s
names plus the WIDER ones below, none of them `ioi_independent`'s), split with seed N, a fit
with `PruneConfig(seed=N, **cfg)`, and the circuit's f and KL on the 200 held-out prompts, on
200 prompts of the independent templates with ioi's words (`unseen="templates"`, seed 1234),
200 of ioi's templates with the independent words (`unseen="names"`, seed 1234) and 200
`ioi_independent` prompts (both new, seed N). Appends to out/unseen_names.jsonl and saves the
log_alphas beside it. `--saved out/quality_TAG_ioi_N.pt ...` scores the circuits (gates above
0) of log_alphas `bench/quality_smollm2.py` saved instead of fitting, seed N from the name and
held-out prompts as that run drew them (give its `--n-train`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

import tl_nodeprune as tnp
from bench.common import saved_circuit, saved_runs

ioi_module = importlib.import_module("tl_nodeprune.tasks.ioi")  # `tasks.ioi` is the function

# First names in neither `tasks.ioi`'s pool nor `ioi_independent`'s (--names wide).
WIDER = (
    "Aiden Brandon Caleb Cameron Carter Colin Connor Derek Dominic Douglas Dustin Elliot Evan "
    "Gavin Gordon Grant Harold Isaac Ivan Jared Jeremy Jesse Joel Jordan Julian Kenneth Kurt "
    "Lance Lewis Marcus Mitchell Nate Norman Omar Patrick Philip Randy Ralph Russell Shane "
    "Spencer Stanley Stuart Terry Travis Trevor Vincent Wade Warren Wayne Wesley Zach Abby "
    "Alexis Allison Andrea Angela Ashley Audrey Barbara Beth Brenda Brooke Caroline Cathy Cindy "
    "Courtney Daisy Dana Deborah Denise Donna Doris Erin Faith Gloria Heather Irene Jackie Janet "
    "Jasmine Joyce Judy Kathy Katie Kim Kristen Lauren Lindsay Lori Maggie Marie Martha Melissa "
    "Molly Natalie Nicole Paige Pam Patricia Peggy Sally Sandra Sharon Shirley Sophie Stella "
    "Tara Teresa Tracy Vanessa Vicky Violet"
).split()
SETS_SEED = 1234  # the unseen-templates and unseen-names prompts, the same for every run


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--names", choices=("ioi", "wide"), default="ioi")
    p.add_argument("--cfg", default="{}", help="JSON of PruneConfig overrides")
    p.add_argument("--tag", default="run")
    p.add_argument("--out", type=Path, default=Path("out/unseen_names.jsonl"))
    p.add_argument("--saved", nargs="*", default=[], help="score these saved log_alphas")
    args = p.parse_args()
    cfg = json.loads(args.cfg)
    model = tnp.load_model("smollm2-135m")
    names = ioi_module.NAMES
    if args.names == "wide":
        names = tuple(n for n in dict.fromkeys((*names, *WIDER))
                      if n not in ioi_module.INDEPENDENT_NAMES)  # fmt: skip
    pools = (names, ioi_module.PLACES, ioi_module.OBJECTS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed, saved in saved_runs(args.saved) or [(seed, None) for seed in args.seeds]:
        torch.manual_seed(seed)
        task = ioi_module._ioi(model, args.n_train + 200, seed, "abc", ioi_module.TEMPLATES, pools)
        train, held_out = task.split(args.n_train / len(task), seed=seed)
        start = time.perf_counter()
        if saved is None:  # the fit's own circuit (a budget's selection, if any)
            result = tnp.NodePruner(model, tnp.PruneConfig(seed=seed, progress=False, **cfg)).fit(
                train
            )
            torch.save(result.log_alpha, args.out.with_name(f"unseen_names_{args.tag}_{seed}.pt"))
            c = result.circuit
        else:
            c = saved_circuit(model, saved)
        seconds = time.perf_counter() - start
        unseen = tnp.tasks.ioi_independent
        sets = {
            "held_out": held_out,
            "unseen_templates": unseen(model, 200, SETS_SEED, unseen="templates"),
            "unseen_names": unseen(model, 200, SETS_SEED, unseen="names"),
            "independent": unseen(model, 200, seed),
        }
        row = {"tag": args.tag, "saved": saved, "seed": seed, "n_train": len(train),
               "names": args.names, "cfg": cfg, "fit_s": round(seconds), "heads": c.n_kept("head"),
               "mlp": c.n_kept("mlp"), "neurons": c.n_kept("neuron")}  # fmt: skip
        for name, prompts in sets.items():
            e = tnp.evaluate(model, c, prompts)
            row[f"f_{name}"], row[f"kl_{name}"] = round(e.faithfulness, 3), round(e.kl, 3)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

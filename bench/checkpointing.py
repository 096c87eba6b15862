"""Node pruning with and without block checkpointing: extra memory, step time, largest batch.

    PYTHONPATH=. .venv/bin/python bench/checkpointing.py [--steps 2] [--cap-gib 16] [--check 16,128]

Every point runs in a fresh subprocess: a random GPT-2-small-shaped model (12 layers, 12 heads,
d_model 768, d_mlp 3072, vocab 50257; fp32, CPU, one thread), a task of `batch` random prompt
pairs of `seq` tokens, and `NodePruner.fit` with all four granularities for `--steps` steps.
Extra memory is the peak resident set during `fit` minus the resident set once the model and
task are loaded (Linux VmHWM, reset after loading); step time is the median over the steps
after the first. The largest batch x sequence under `--cap-gib` (model included) comes from
a least-squares fit extra = a + b*tokens + c*tokens*seq to the measured points, checked on
one more measured point; it is an extrapolation wherever it exceeds the measured range.
Writes docs/generated/checkpointing.md and .csv, and nothing else: the prose about these
numbers is docs/lab/checkpointing.md. `--assemble docs/generated/checkpointing.csv` rewrites
the page from the saved rows without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import (
    GENERATED,
    GIB,
    pipe_table,
    read_rows,
    reset_peak_rss,
    run_fresh,
    status_bytes,
)

GPT2_SMALL = dict(n_layers=12, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024)
GRANULARITIES = ("attn", "mlp", "head", "neuron")
MEASURED = [(8, 64), (32, 64), (8, 256)]  # (batch, seq); the scaling fit uses these
SEQS = (64, 128, 256, 512, 1024)
# Corrupted activations cached at the gated hooks, per token: attn_out, mlp_out and z
# (d_model wide each) and mlp.hook_post (d_mlp wide), in every layer, fp32.
ABLATED_BYTES_PER_TOKEN = GPT2_SMALL["n_layers"] * (3 * 768 + GPT2_SMALL["d_mlp"]) * 4


def point(batch: int, seq: int, checkpoint: bool, steps: int, flavour: str) -> dict:
    """One measurement in this process (run it in a fresh one): memory and step times."""
    import torch

    import tl_nodeprune as tnp
    from tl_nodeprune.checkpoint import activation_bytes
    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.sites import ModelShape

    torch.set_num_threads(1)
    model = tiny_model(flavour, **GPT2_SMALL)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 50257, (batch, seq), generator=gen) for _ in range(2)]
    answers = [torch.randint(0, 50257, (batch,), generator=gen) for _ in range(2)]
    task = tnp.PromptTask.from_tokens(*tokens, *answers, name="random")
    loaded = status_bytes("VmRSS")
    reset_peak_rss()
    starts: list[tuple[float, float]] = []  # (wall, process CPU) at each embedding call
    model.embed.register_forward_pre_hook(
        lambda *_: starts.append((time.perf_counter(), time.process_time()))
    )
    config = tnp.PruneConfig(steps=steps, batch_size=batch, granularities=GRANULARITIES,
                             checkpoint=checkpoint, progress=False)  # fmt: skip
    tnp.NodePruner(model, config).fit(task)
    end = (time.perf_counter(), time.process_time())
    peak = status_bytes("VmHWM")
    marks = [*starts[-steps:], end]  # one embedding call per training step, after the setup
    wall = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:], strict=True)][1:]
    cpu = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:], strict=True)][1:]
    return {
        "batch": batch,
        "seq": seq,
        "checkpoint": checkpoint,
        "model_gib": round(loaded / GIB, 3),
        "extra_gib": round((peak - loaded) / GIB, 3),
        "step_s": round(statistics.median(wall), 2),
        "step_cpu_s": round(statistics.median(cpu), 2),
        "estimate_gib": round(activation_bytes(ModelShape.from_model(model), batch, seq) / GIB, 3),
    }


def saved_for_backward(batch: int, seq: int, flavour: str) -> dict:
    """MiB that autograd keeps after one gated forward, checkpoint off and on (no allocator)."""
    import torch

    from tl_nodeprune.ablation import capture, mixing_hooks, site_masks
    from tl_nodeprune.checkpoint import checkpointed_blocks
    from tl_nodeprune.gates import GateSet, HardConcrete
    from tl_nodeprune.objectives import forward_answers
    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.sites import ModelShape, frozen

    torch.set_num_threads(1)
    model = tiny_model(flavour, **GPT2_SMALL)
    shape = ModelShape.from_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0))
    out = {}
    for count in (0, None):
        saved: dict[int, int] = {}  # storage -> bytes; weights and the ablated cache excluded

        def pack(t, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with frozen(model):
            gates = GateSet(shape, GRANULARITIES, 3.0, HardConcrete(), "cpu")
            masks = site_masks(shape, gates.sample(torch.Generator().manual_seed(0)))
            ablated = capture(model, tokens, list(masks))
            cached = {v.untyped_storage().data_ptr() for v in ablated.values()}
            with model.hooks(fwd_hooks=mixing_hooks(masks, ablated)):
                with checkpointed_blocks(model, count):
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        forward_answers(model, tokens, torch.full((batch,), seq - 1))
        mib = sum(v for k, v in saved.items() if k not in cached) / 2**20
        out["checkpoint on" if count is None else "checkpoint off"] = round(mib, 1)
    return {"batch": batch, "seq": seq, "saved_for_backward_mib": out}


def run_point(batch: int, seq: int, checkpoint: bool, steps: int, flavour: str) -> dict:
    cmd = [sys.executable, __file__, "--point", f"{batch},{seq},{int(checkpoint)}",
           "--steps", str(steps), "--flavour", flavour]  # fmt: skip
    row = run_fresh(cmd, {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    print(row, flush=True)
    return row


def fit_scaling(rows: list[dict]) -> list[float]:
    """Least squares extra_gib = a + b*tokens + c*tokens*seq (tokens = batch*seq)."""
    import numpy as np

    x = np.array([[1.0, r["batch"] * r["seq"], r["batch"] * r["seq"] ** 2] for r in rows])
    y = np.array([r["extra_gib"] for r in rows])
    return [float(v) for v in np.linalg.lstsq(x, y, rcond=None)[0]]


def predict(coef: list[float], batch: int, seq: int) -> float:
    a, b, c = coef
    return a + b * batch * seq + c * batch * seq**2


def largest_batch(coef: list[float], seq: int, budget_gib: float) -> int:
    """The largest batch whose predicted extra memory fits `budget_gib`."""
    a, b, c = coef
    per_example = b * seq + c * seq**2
    return max(0, int((budget_gib - a) // per_example)) if per_example > 0 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument("--flavour", default="bridge-native")
    parser.add_argument("--point", help="batch,seq,checkpoint: measure one point and print it")
    parser.add_argument("--check", default="16,128", help="batch,seq measured against the fit")
    parser.add_argument("--saved", help="batch,seq: print the MiB autograd keeps, off and on")
    parser.add_argument("--assemble", help="write the tables from saved rows (CSV or JSON lines)")
    parser.add_argument("--out", default=str(GENERATED))
    args = parser.parse_args()
    if args.point:
        batch, seq, ckpt = (int(v) for v in args.point.split(","))
        print(json.dumps(point(batch, seq, bool(ckpt), args.steps, args.flavour)))
        return
    if args.saved:
        batch, seq = (int(v) for v in args.saved.split(","))
        print(json.dumps(saved_for_backward(batch, seq, args.flavour)))
        return
    check = tuple(int(v) for v in args.check.split(","))
    if args.assemble:  # rows measured earlier
        rows = read_rows(Path(args.assemble))
    else:
        rows = [
            run_point(b, s, c, args.steps, args.flavour)
            for b, s in [*MEASURED, check]
            for c in (False, True)
        ]
    write(rows, check, args)


def markdown(frame) -> str:
    """A data frame as a Markdown pipe table."""
    return pipe_table(frame.columns, frame.itertuples(index=False))


def write(rows: list[dict], check: tuple[int, int], args: argparse.Namespace) -> None:
    import pandas as pd

    by = {(r["batch"], r["seq"], r["checkpoint"]): r for r in rows}
    coefs = {  # None where a mode misses one of the points the fit needs
        c: fit_scaling([by[b, s, c] for b, s in MEASURED])
        if all((b, s, c) in by for b, s in MEASURED)
        else None
        for c in (False, True)
    }
    checks = [r for r in rows if (r["batch"], r["seq"]) == check and coefs[r["checkpoint"]]]
    for r in checks:
        r["predicted_gib"] = round(predict(coefs[r["checkpoint"]], *check), 3)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "checkpointing.csv", index=False)
    model_gib = max(r["model_gib"] for r in rows)
    budget = args.cap_gib - model_gib
    fits = pd.DataFrame(
        [{"seq": s, **{f"largest batch, checkpoint {'on' if c else 'off'}":
                       largest_batch(coefs[c], s, budget) if coefs[c] else "not fitted"
                       for c in (False, True)}}
         for s in SEQS]
    )  # fmt: skip
    ratio = []
    for b, s in [*MEASURED, check]:
        if (b, s, False) not in by or (b, s, True) not in by:
            continue
        off, on = by[b, s, False], by[b, s, True]
        ratio.append({"batch x seq": f"{b}x{s}", "extra GiB off": off["extra_gib"],
                      "extra GiB on": on["extra_gib"],
                      "memory on/off": round(on["extra_gib"] / off["extra_gib"], 2),
                      "ablated values GiB": round(b * s * ABLATED_BYTES_PER_TOKEN / GIB, 3),
                      "step CPU s off": off["step_cpu_s"], "step CPU s on": on["step_cpu_s"],
                      "CPU time on/off": round(on["step_cpu_s"] / off["step_cpu_s"], 2),
                      "wall on/off": round(on["step_s"] / off["step_s"], 2)})  # fmt: skip
    lines = [
        "# Block checkpointing: memory and step time of node pruning",
        "",
        "Command: `PYTHONPATH=. .venv/bin/python bench/checkpointing.py "
        f"--steps {args.steps} --cap-gib {args.cap_gib:g} --flavour {args.flavour} "
        f"--check {args.check}`"
        + (
            " (here each point ran in its own process via `--point batch,seq,checkpoint --steps "
            f"{args.steps}`, the subprocess that command starts, and the rows were written with "
            "`--assemble rows.jsonl`)"
            if args.assemble
            else ""
        ),
        "",
        f"Random GPT-2-small-shaped model ({args.flavour}), fp32, CPU, one thread, "
        f"granularities {', '.join(GRANULARITIES)}; each point a fresh process. Extra = peak "
        "RSS during `NodePruner.fit` minus RSS with model and task loaded "
        f"(model: {model_gib:.2f} GiB); step time = median over steps 2..{args.steps}, in "
        "process CPU seconds (robust to other jobs on a shared machine) and wall seconds.",
        "",
        markdown(pd.DataFrame(ratio)),
        "",
        "`ablated values` is computed, not measured: the corrupted activations cached at the "
        "gated hooks for the task (here one batch); each step also indexes a copy for its "
        "batch, so about twice this is held whether or not blocks are checkpointed.",
        "",
        "All points (estimate = `checkpoint.activation_bytes`, what 'auto' compares with "
        "`checkpoint_budget_bytes`):",
        "",
        markdown(table),
        "",
        f"## Largest batch per sequence length under {args.cap_gib:g} GiB (model included)",
        "",
        "Extrapolated from a least-squares fit extra = a + b*tokens + c*tokens*seq over the "
        f"points {', '.join(f'{b}x{s}' for b, s in MEASURED)}; "
        + (
            "the fit predicted "
            + "; ".join(
                f"{r['predicted_gib']} GiB at {r['batch']}x{r['seq']} with checkpoint "
                f"{'on' if r['checkpoint'] else 'off'} (measured {r['extra_gib']})"
                for r in checks
            )
            if checks
            else "no point was measured to check the fit"
        )
        + ". Points beyond the measured range were not run (the machine is shared).",
        "",
        markdown(fits),
        "",
    ]
    (out / "checkpointing.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

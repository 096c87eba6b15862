"""Memory per device of node pruning on Llama-3.1-8B and 70B shapes split over N devices.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/memory_model.py [--batch 8] [--seq 128]
        [--prompts 800] [--devices 1 2 4 8]

A formula, not a measurement of those models: per device, the bf16 weights of its share of the
blocks (the embedding on the first device, the final norm and unembedding on the last), the
cached corrupted activations at the gated hooks of its blocks (hook_attn_out, hook_mlp_out,
hook_z: d_model each; mlp.hook_post: d_mlp; for every cached prompt token), the activations
autograd keeps for backward in one training step (all of its blocks, or with block
checkpointing each block's input plus one block's insides), and on the first device the gates
(float32 log_alpha, its gradient and two Adam moments). The per-token activation count is a
Llama block's (`llama_saved_elements`), scaled by a factor calibrated here against what
autograd really keeps in a gated step of small Llama-shaped bridges (float32, CPU,
saved-tensor hooks, which see no allocator slack); the table states the factor and its error on
a second shape. Writes docs/generated/memory_model.md, and nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import GENERATED, GIB, pipe_table

# name: (n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab)
LLAMA = {
    "Llama-3.1-8B": (32, 4096, 32, 8, 14336, 128256),
    "Llama-3.1-70B": (80, 8192, 64, 8, 28672, 128256),
}
# Small Llama shapes measured here: (n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab).
FIT_SHAPE = (2, 256, 8, 4, 688, 512)
CHECK_SHAPE = (2, 384, 6, 2, 1024, 512)


def llama_saved_elements(shape: tuple[int, ...], seq: int) -> int:
    """Elements one Llama block keeps for backward per token, gates at all four hooks.

    Two RMSNorms (input, normalised output: 4 d_model), the residual sums (2 d_model), q and k
    before and after rotary and v (GQA: k, v have n_kv heads), attention scores and pattern
    (2 heads x seq, eager attention), z, SwiGLU's gate, up, activation and product (4 d_mlp),
    and the mixed copies at hook_attn_out, hook_mlp_out, hook_z and mlp.hook_post.
    """
    _, d_model, heads, kv, d_mlp, _ = shape
    d_head = d_model // heads
    attention = 2 * heads * d_head + 3 * kv * d_head + 2 * heads * seq + heads * d_head
    gated = 3 * d_model + d_mlp
    return 6 * d_model + attention + 4 * d_mlp + gated


def measure_saved(shape: tuple[int, ...], batch: int, seq: int) -> int:
    """Bytes autograd keeps in one gated forward of a random Llama bridge of `shape` (fp32),
    weights and the ablated cache left out."""
    import torch

    from tl_nodeprune.ablation import capture, mixing_hooks, site_masks
    from tl_nodeprune.gates import GateSet, HardConcrete
    from tl_nodeprune.objectives import forward_answers
    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.sites import ModelShape, frozen

    layers, d_model, heads, _, d_mlp, vocab = shape
    model = tiny_model("bridge-llama", n_layers=layers, n_heads=heads, d_head=d_model // heads,
                       d_mlp=d_mlp, d_vocab=vocab, n_ctx=seq)  # fmt: skip
    tl_shape = ModelShape.from_model(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with frozen(model):
        gates = GateSet(tl_shape, tl_shape.resolve(None), 3.0, HardConcrete(), "cpu")
        masks = site_masks(tl_shape, gates.sample(torch.Generator().manual_seed(0)))
        ablated = capture(model, tokens, list(masks))
        cached = {v.untyped_storage().data_ptr() for v in ablated.values()}
        with model.hooks(fwd_hooks=mixing_hooks(masks, ablated)):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward_answers(model, tokens, torch.full((batch,), seq - 1))
    return sum(v for k, v in saved.items() if k not in cached)


def calibrate(batch: int = 4, seq: int = 64) -> tuple[float, float]:
    """Measured / formula on FIT_SHAPE (the factor), and the factor's error on CHECK_SHAPE."""

    def formula(shape: tuple[int, ...]) -> int:
        return shape[0] * batch * seq * llama_saved_elements(shape, seq) * 4

    factor = measure_saved(FIT_SHAPE, batch, seq) / formula(FIT_SHAPE)
    check = measure_saved(CHECK_SHAPE, batch, seq)
    return factor, factor * formula(CHECK_SHAPE) / check - 1


def per_device(
    shape: tuple[int, ...], n_dev: int, batch: int, seq: int, prompts: int, factor: float
) -> list[dict[str, float]]:
    """GiB per device (bf16 weights and activations): weights, cache, backward, gates."""
    layers, d_model, heads, kv, d_mlp, vocab = shape
    d_head, bf16 = d_model // heads, 2
    # q, k, v (GQA), o and SwiGLU's three matrices
    block = d_model * (heads + 2 * kv) * d_head + heads * d_head * d_model + 3 * d_model * d_mlp
    counts = [layers // n_dev + (i < layers % n_dev) for i in range(n_dev)]
    per_layer_act = factor * llama_saved_elements(shape, seq) * batch * seq * bf16
    cache_per_layer = (3 * d_model + d_mlp) * prompts * seq * bf16
    gates = (layers * (2 + heads + d_mlp)) * 4 * 4  # log_alpha, grad, two Adam moments
    rows = []
    for i, n in enumerate(counts):
        weights = n * block * bf16 + (vocab * d_model * bf16 if i in (0, n_dev - 1) else 0)
        if n_dev == 1:
            weights += vocab * d_model * bf16  # embedding and unembedding on the one device
        ckpt = n * batch * seq * d_model * bf16 + (per_layer_act if n else 0)
        rows.append({"weights": weights / GIB, "cache": n * cache_per_layer / GIB,
                     "backward": n * per_layer_act / GIB, "backward_ckpt": ckpt / GIB,
                     "gates": (gates if i == 0 else 0) / GIB})  # fmt: skip
    return rows


def table(args: argparse.Namespace, factor: float, error: float) -> str:
    """The Markdown page: one row per model and device count, the busiest device's GiB."""
    lines = [
        "# Node pruning memory per device on Llama-3.1 shapes (predicted)",
        "",
        f"Written by `bench/memory_model.py --batch {args.batch} --seq {args.seq} --prompts "
        f"{args.prompts}`: bf16 weights and activations, all four granularities gated, the "
        f"corrupted activations of {args.prompts} prompts x {args.seq} tokens cached. Per-token "
        f"activations: the Llama block count times {factor:.3f}, fitted on a measured "
        f"{FIT_SHAPE} (layers, d_model, heads, kv heads, d_mlp, vocab) bridge; on "
        f"{CHECK_SHAPE} the fitted formula is off by {100 * error:+.1f}%. The busiest device "
        "is shown (the first or the last: they add the embedding or the unembedding). Total "
        "= weights + cache + backward (+ gates); with checkpointing the backward column is "
        "replaced by the checkpointed one. A cache larger than PruneConfig.cache_bytes (8 GiB "
        "by default, checked against the first device's free memory) is not built: the "
        "corrupted activations are then recomputed each step and the cache column drops out.",
        "",
    ]
    cols = ["model", "devices", "weights", "cache", "backward", "backward ckpt", "gates",
            "total", "total ckpt"]  # fmt: skip
    body = []
    for name, shape in LLAMA.items():
        for n_dev in args.devices:
            rows = per_device(shape, n_dev, args.batch, args.seq, args.prompts, factor)
            r = max(rows, key=lambda x: x["weights"] + x["cache"] + x["backward"])
            base = r["weights"] + r["cache"] + r["gates"]
            parts = [f"{r[k]:.2f}" for k in ("weights", "cache", "backward", "backward_ckpt")]
            totals = [f"{base + r['backward']:.1f}", f"{base + r['backward_ckpt']:.1f}"]
            body.append([name, n_dev, *parts, f"{r['gates']:.2f}", *totals])
    return "\n".join([*lines, pipe_table(cols, body), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=800, help="prompts in the ablation cache")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default=str(GENERATED))
    args = parser.parse_args()
    factor, error = calibrate()
    print(f"calibration factor {factor:.3f}, error on the check shape {100 * error:+.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_model.md").write_text(table(args, factor, error))
    print((out / "memory_model.md").read_text())


if __name__ == "__main__":
    main()

"""Per-rank memory and time of SoCo's learn stage for a 70B Llama on 8 GPUs with ZeRO-3,
derived from the model's shapes (docs/scaling.md explains each line).

    .venv/bin/python bench/zero70b.py [--ratio 0.4] [--coarse-ratio C]
"""
from __future__ import annotations

import argparse

from soco.ranks import candidate_rank, coarse_ratio

# Llama-3-70B shapes
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 8192, 28672, 80, 64, 8, 128256
HEAD_DIM = HIDDEN // HEADS


def linear_shapes() -> list[tuple[int, int]]:
    kv = KV_HEADS * HEAD_DIM
    return [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
            (HIDDEN, INTER)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.4, help="target removal ratio")
    ap.add_argument("--coarse-ratio", type=float, default=None,
                    help="candidates' coarse ratio; default as soco.coarse_ratio: 1 - 2(1 - ratio)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=2048, help="one window of 2048 tokens per rank and step")
    ap.add_argument("--bytes", type=int, default=2, help="bytes per frozen factor element (bf16)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="H100 dense bf16 peak")
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--link-gbps", type=float, default=300.0, help="effective all-gather bandwidth per GPU, GB/s")
    a = ap.parse_args()
    GB = 1e9
    c = coarse_ratio(a.coarse_ratio, a.ratio)
    dense_linear = LAYERS * sum(m * n for m, n in linear_shapes())
    coarse = LAYERS * sum(candidate_rank(m, n, c) * (m + n) for m, n in linear_shapes())
    scores = LAYERS * sum(candidate_rank(m, n, c) for m, n in linear_shapes())
    per_layer_coarse = coarse / LAYERS
    emb = 2 * VOCAB * HIDDEN  # untied input and output embeddings
    rows = []
    part = (coarse + emb) * a.bytes / a.ranks
    rows.append(("frozen factors + embeddings, partitioned /%d" % a.ranks, part))
    rows.append(("scores + Adam moments + grads (fp32, partitioned)", scores * 4 * 4 / a.ranks))
    rows.append(("ZeRO-3 gather buffers (current + prefetched layer)", 2 * per_layer_coarse * a.bytes))
    t = a.tokens_per_rank
    rows.append(("checkpointed layer inputs (bf16, all layers)", LAYERS * t * HIDDEN * 2))
    rows.append(("activations of the layer being recomputed (~34 s h bytes)", 34 * t * HIDDEN))
    rows.append(("logits, log-softmax and their grads (fp32, 3 copies)", 3 * t * VOCAB * 4))
    rows.append(("teacher top-64 targets of the step", t * 64 * 8))
    total = sum(v for _, v in rows)
    flops_token = 2 * coarse  # forward through the low-rank path
    # backward: input gradients only (factors frozen) ~= forward, plus recompute of checkpointed layers
    step_flops = 3 * flops_token * t * a.ranks
    compute_s = step_flops / (a.ranks * a.gpu_tflops * 1e12 * a.mfu)
    gather_s = 3 * coarse * a.bytes * (a.ranks - 1) / a.ranks / (a.link_gbps * GB)  # fwd, recompute, bwd
    print(f"dense decoder linears: {dense_linear / 1e9:.1f}B parameters; target r={a.ratio}, candidate factors at "
          f"coarse ratio {c:.2f}: {coarse / 1e9:.1f}B; scores: {scores / 1e6:.2f}M")
    print("| per rank | GB |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v / GB:.2f} |")
    print(f"| **total** | **{total / GB:.1f}** |")
    print(f"step: {step_flops / 1e15:.2f} PFLOP over {a.ranks} ranks -> compute {compute_s:.2f} s at "
          f"{a.mfu:.0%} MFU; ZeRO-3 all-gathers {gather_s:.2f} s if not overlapped")


if __name__ == "__main__":
    main()

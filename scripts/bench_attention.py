"""Benchmark the attention kernels of hybrid models on packed rows (GPU): the fused path (flex_attention with the
document block mask, model/ops/fused.py) against its pure-torch twin (SDPA with the dense document mask,
model/ops/reference.py's sdpa_attention), forward + backward, bf16. Also prints SDPA's is_causal path on the same
rows without document masking (flash attention: what mamba_ssm's MHA runs, leaking across documents) as the
speed of light, and the FLOPs/s of each from model/flops.py's count (allowed pairs only).

Default shapes: mamba2attn-2.7b's attention (30 heads of 128, no GQA), seq 2048, 4 documents per row cut at random
positions, 8 rows.

Run (GPU):  python3 scripts/bench_attention.py [--seqlen 2048 --docs 4 --rows 8 --heads 30 --kv-heads 30
                                                 --head-dim 128 --iters 20]
Prints one line per kernel (ms per forward+backward, TFLOP/s) and the speed-up of flex over SDPA-with-mask.
"""

from __future__ import annotations

import argparse
import sys

import torch


def _time(fn, iters: int, warmup: int = 3) -> float:
    """Milliseconds per call (CUDA events; the first calls compile and are not counted)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--docs", type=int, default=4, help="documents per row")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=30)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: error: needs CUDA", file=sys.stderr)
        return 2

    from mamba_dist.model.flops import attention_context
    from mamba_dist.model.ops import fused, reference
    from mamba_dist.model.packing import doc_lengths, random_packed_batches

    dev = torch.device("cuda")
    B, L, H, Hkv, Dh = args.rows, args.seqlen, args.heads, args.kv_heads, args.head_dim
    _, _, seq_idx = random_packed_batches(1, B, L, 2, args.docs, device=dev, seed=args.seed)[0]
    g = torch.Generator(dev).manual_seed(args.seed)
    q = torch.randn(B, L, H, Dh, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(B, L, Hkv, Dh, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(B, L, Hkv, Dh, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(B, L, H, Dh, generator=g, device=dev, dtype=torch.bfloat16)

    def step(fn, s, fresh_mask=False):
        def run():
            q.grad = k.grad = v.grad = None
            # fresh_mask: a new seq_idx object each call, so the block mask is rebuilt (in training it is built
            # once per batch and reused by every attention layer)
            fn(q, k, v, s.clone() if fresh_mask else s, True, None).backward(grad)
        return run

    # forward + backward FLOPs of the allowed pairs: 4 * q_dim * context per token forward, x3 with backward
    masked_ctx = attention_context(L, doc_lengths(seq_idx))
    flops = {"masked": 3 * 4 * H * Dh * masked_ctx * B * L, "causal": 3 * 4 * H * Dh * attention_context(L) * B * L}
    rows = [("sdpa + dense document mask (reference twin)", step(reference.sdpa_attention, seq_idx), "masked"),
            ("flex_attention + document block mask (fused)", step(fused.attention, seq_idx), "masked"),
            ("  the same, block mask rebuilt every call", step(fused.attention, seq_idx, True), "masked"),
            ("sdpa is_causal, no document mask (leaks; flash)", step(reference.sdpa_attention, None), "causal")]
    print(f"attention fwd+bwd, bf16: {B} rows x {L} tokens, {args.docs} documents per row (mean keys per query "
          f"{masked_ctx:.0f} masked, {attention_context(L):.0f} causal), {H} heads ({Hkv} kv) of {Dh}; "
          f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    times = {}
    for name, fn, kind in rows:
        ms = times[name] = _time(fn, args.iters)
        print(f"  {name:<50s} {ms:8.3f} ms   {flops[kind] / ms / 1e9:7.1f} TFLOP/s")
    sdpa, flex = times[rows[0][0]], times[rows[1][0]]
    print(f"flex / sdpa-with-mask speed-up: {sdpa / flex:.2f}x ({'faster' if flex < sdpa else 'NOT faster'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

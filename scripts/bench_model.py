"""Forward+backward throughput (tokens/s) and peak memory of the Mamba LM per kernel backend.

Backends: `reference` (ours, pure PyTorch; always), `fused` (mamba_ssm / causal_conv1d kernels; when CUDA and they
import) and `hf` (HF transformers' MambaForCausalLM / Mamba2ForCausalLM torch path with the same weights, for
comparison; on CPU by default). Each backend runs in a fresh process, so peak memory is its own:
CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS growth over the process's RSS before the first step.
A step is: logits = model(ids[, seq_idx]); cross-entropy; backward. Columns: tokens/s and ms/step by wall time
(median step), cpu-s/step (process CPU time, all threads: steadier on a shared machine), and speed relative to
`hf` by wall and by CPU time.

Run (CPU, both mixers, default small model):
    python scripts/bench_model.py
    python scripts/bench_model.py --mixer mamba2 --d-model 512 --n-layer 4 --seqlen 2048 --batch 1
    python scripts/bench_model.py --device cuda --dtype bf16 --d-model 768 --n-layer 24 --seqlen 2048 --batch 8
    python scripts/bench_model.py --backends reference --packed      # with seq_idx resets (8 documents per row)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F


def build_config(args, mixer: str):
    from mamba_dist.model import MambaConfig

    if mixer == "mamba1":
        ssm = {"layer": "Mamba1", "d_state": args.d_state or 16, "expand": args.expand}
    else:
        ssm = {"layer": "Mamba2", "d_state": args.d_state or 64, "expand": args.expand, "headdim": args.headdim,
               "ngroups": args.ngroups, "chunk_size": args.chunk_size}
    return MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab, ssm_cfg=ssm)


def build_hf(cfg, ours):
    """HF's model with our weights (the only rename is HF's own: embedding -> embeddings)."""
    import transformers

    mixer = ours.backbone.layers[0].mixer
    common = dict(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  state_size=mixer.d_state, expand=mixer.expand, conv_kernel=mixer.d_conv, layer_norm_epsilon=1e-5,
                  residual_in_fp32=True, tie_word_embeddings=True, use_cache=False)
    if cfg.mixer == "Mamba1":
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(
            **common, time_step_rank=mixer.dt_rank, use_mambapy=False, use_associative_scan=False))
    else:
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **common, num_heads=mixer.nheads, head_dim=mixer.headdim, n_groups=mixer.ngroups,
            chunk_size=mixer.chunk_size))
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd)
    return hf


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args, mixer: str, backend: str, out_q) -> None:
    try:
        out_q.put(_run_one(args, mixer, backend))
    except Exception as e:  # report, keep the table going
        out_q.put({"error": f"{type(e).__name__}: {e}"})


def _run_one(args, mixer: str, backend: str) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from mamba_dist.model import MambaLMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = build_config(args, mixer)
    model = MambaLMHeadModel(cfg, backend="reference" if backend == "hf" else backend)
    if backend == "hf":
        model = build_hf(cfg, model)
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seqlen + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    seq_idx = None
    if args.packed and backend != "hf":
        doc = max(1, args.seqlen // 8)
        seq_idx = (torch.arange(args.seqlen, device=device) // doc).to(torch.int32).expand(args.batch, -1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        with autocast:
            logits = model(inputs, seq_idx=seq_idx) if backend != "hf" else model(inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = rss_bytes()
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t = sorted(times)[len(times) // 2]  # median
    return {"tokens_per_s": args.batch * args.seqlen / t, "ms": t * 1e3, "cpu_s": min(cpu), "peak_mb": peak / 2**20,
            "params_m": n_params / 1e6}


def _wait(proc, q, limit: float) -> dict:
    """The child's result; an error row if it dies or runs past `limit` seconds (then it is terminated)."""
    import queue

    t0 = time.monotonic()
    while True:
        try:
            res = q.get(timeout=1.0)
            proc.join()
            return res
        except queue.Empty:
            if not proc.is_alive():
                return {"error": f"benchmark process exited with code {proc.exitcode}"}
            if limit and time.monotonic() - t0 > limit:
                proc.terminate()
                proc.join()
                return {"error": f"over the time limit of {limit:.0f} s"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixer", choices=["mamba1", "mamba2", "both"], default="both")
    p.add_argument("--backends", default=None,
                   help="comma list of reference,fused,hf (default: reference,hf on CPU; reference,fused on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024, help="small by default so the mixers, not the head, dominate")
    p.add_argument("--d-state", type=int, default=0, help="default 16 (Mamba-1) / 64 (Mamba-2)")
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--packed", action="store_true", help="pass seq_idx with 8 documents per row (ours only)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds per backend run before it is stopped and reported as such (0: none)")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    backends = (args.backends or ("reference,fused" if cuda else "reference,hf")).split(",")
    mixers = ["mamba1", "mamba2"] if args.mixer == "both" else [args.mixer]
    ctx = mp.get_context("spawn")
    rows = []
    print(f"device={args.device} dtype={args.dtype} d_model={args.d_model} n_layer={args.n_layer} "
          f"batch={args.batch} seqlen={args.seqlen} vocab={args.vocab} packed={args.packed} "
          f"threads={args.threads or torch.get_num_threads()}", flush=True)
    for mixer in mixers:
        for backend in backends:
            q = ctx.Queue()
            proc = ctx.Process(target=run_one, args=(args, mixer, backend, q))
            proc.start()
            res = _wait(proc, q, args.time_limit)
            rows.append({"mixer": mixer, "backend": backend, **res})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    # cpu-s/step: process CPU time of a step (all threads); a steadier figure than wall time on a shared machine
    # vs hf: speed relative to HF's torch path by wall time, and by CPU time
    print(f"\n{'mixer':<8} {'backend':<10} {'params(M)':>9} {'tokens/s':>10} {'ms/step':>9} {'cpu-s/step':>10} "
          f"{'peak MB':>9} {'vs hf':>7} {'(cpu)':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['mixer']:<8} {r['backend']:<10} unavailable: {r['error']}")
            continue
        hf = next((h for h in rows if h["mixer"] == r["mixer"] and h["backend"] == "hf" and "error" not in h), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.1f}x" if hf else "-"
        ratio_cpu = f"{hf['cpu_s'] / r['cpu_s']:.1f}x" if hf else "-"
        print(f"{r['mixer']:<8} {r['backend']:<10} {r['params_m']:>9.2f} {r['tokens_per_s']:>10.0f} "
              f"{r['ms']:>9.1f} {r['cpu_s']:>10.2f} {r['peak_mb']:>9.0f} {ratio:>7} {ratio_cpu:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

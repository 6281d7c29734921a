"""Training-step throughput and peak memory of the trainer's step on one device: DeepSpeed ZeRO vs the plain torch
path, bf16 autocast, fused kernels, TP=1.

The step is the trainer's own (`mamba_dist.train.train_step` on `build_training`) on a config from configs/:
forward under autocast, loss, backward, clipping, AdamW, LR schedule. Batches are synthetic (random tokens, 4 packed documents per row, so the
kernels run with seq_idx resets) and already on the device: the figures leave data loading out. Every
(config, mode) row runs in a fresh process, so its peak memory is its own. Modes: `zero1`/`zero2`/`zero3`
(DeepSpeed ZeRO on a one-rank process group; on one GPU only the engine's overhead and bucketed reductions differ
from the plain path) and `plain` (the trainer's torch path; at one rank DDP adds nothing, so none is wrapped).

Run on a GPU (mamba_ssm, causal_conv1d, deepspeed and megatron-core importable), from the repository root:
    python scripts/bench_train_gpu.py                                    # mamba-130m + mamba2-130m, zero2 + plain
    python scripts/bench_train_gpu.py --configs configs/mamba-370m.yaml --modes zero2 --steps 40 --micro-batch 4
    python scripts/bench_train_gpu.py --json bench.json
Small CPU smoke run of the script itself (reference kernels):
    python scripts/bench_train_gpu.py --device cpu --backend reference --dtype fp32 --seqlen 128 --micro-batch 2 \
        --warmup 1 --steps 2 --set model.d_model=64 model.n_layer=2
Prints one line per row: tokens/s and ms/step over the timed steps, peak memory (torch.cuda.max_memory_allocated
over warmup + timed steps; on CPU peak RSS), MFU, and a phase breakdown (forward, backward, optimizer) from a few
extra steps synchronized between phases.
--autotune-configs N keeps only the first N Triton configurations of each mamba_ssm kernel (as the GPU tests do,
tests/_gpu_autotune.py): full autotuning of the Mamba-2 kernels compiles for minutes per shape; trimmed, the
figures are a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ["configs/mamba-130m.yaml", "configs/mamba2-130m.yaml"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--modes", nargs="+", default=["zero2", "plain"], choices=["zero1", "zero2", "zero3", "plain"])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel compilation, autotuning)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--backend", default="fused", choices=["fused", "reference", "auto"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--docs-per-row", type=int, default=4)
    p.add_argument("--profile-steps", type=int, default=3, help="extra steps timed phase by phase (after the rest)")
    p.add_argument("--autotune-configs", type=int, default=0, help="0: full Triton autotuning")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--row", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)  # worker mode
    return p


def run_row(args, config: str, mode: str) -> dict:
    """One (config, mode): build exactly what the trainer builds, time `steps` steps after `warmup`."""
    import torch

    sys.path.insert(0, REPO)
    from mamba_dist import train as T
    from mamba_dist.config import load_config, validate_runtime
    from mamba_dist.metrics import memory_gb
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.model.packing import random_packed_batches
    from mamba_dist.model.flops import flops_per_token, peak_flops_for
    from mamba_dist.parallel.dims import ParallelDims

    zero = int(mode[-1]) if mode.startswith("zero") else 0
    tokens_per_step = args.micro_batch * args.seqlen * args.grad_accum
    cfg = load_config(os.path.join(REPO, config), [
        "data.path=synthetic", f"data.seq_len={args.seqlen}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_tokens={tokens_per_step}", f"train.max_steps={args.warmup + args.steps}",
        "train.max_tokens=0", "schedule.warmup_steps=0", f"model.backend={args.backend}",
        f"precision.dtype={args.dtype}", f"parallel.zero_stage={zero}", f"train.device={args.device}",
        "train.deterministic=false", *args.set])
    derived = validate_runtime(cfg, 1)
    device = T._setup_torch(cfg)
    dims = ParallelDims.from_env(cfg.parallel).build(single_rank_group=zero > 0)
    try:
        torch.manual_seed(cfg.seed)
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend=cfg.model.backend)
        backend = model.backend
        if args.autotune_configs > 0 and backend == "fused":
            sys.path.insert(0, os.path.join(REPO, "tests"))
            os.environ["MAMBA_DIST_GPU_AUTOTUNE_CONFIGS"] = str(args.autotune_configs)
            from _gpu_autotune import limit_triton_autotune

            limit_triton_autotune()
        n_params = sum(p.numel() for p in model.parameters())
        training = T.build_training(model, cfg, derived, dims, device)
        fused_ce = T.use_fused_ce(cfg, dims, device)
        amp = cfg.precision.dtype == "bf16"
        batches = random_packed_batches(4 * derived.grad_accum, cfg.train.micro_batch_size, cfg.data.seq_len,
                           cfg.model.vocab_size, args.docs_per_row, device)
        cuda = device.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def step(i: int):
            micro = [batches[(i * derived.grad_accum + m) % len(batches)] for m in range(derived.grad_accum)]
            return T.train_step(training, micro, dims, amp, fused_ce)[0]

        training.model.train()
        t0 = time.perf_counter()
        for i in range(args.warmup):
            first_loss = step(i)
        sync()
        warmup_s = time.perf_counter() - t0
        times = []
        for i in range(args.warmup, args.warmup + args.steps):
            t = time.perf_counter()
            last_loss = step(i)
            sync()
            times.append(time.perf_counter() - t)
        total = sum(times)
        tok_s = tokens_per_step * args.steps / total
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else memory_gb(device)["rss_gb"]
        phases = profile_phases(args, training, dims, batches, derived, amp, fused_ce, sync)
        peak = peak_flops_for(torch.cuda.get_device_name(device), cfg.precision.dtype) if cuda else None
        flops = flops_per_token(cfg.model.mamba_config_dict(), cfg.data.seq_len).train()
        return {
            "config": os.path.basename(config), "mode": mode, "backend": backend, "dtype": cfg.precision.dtype,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "params_M": n_params / 1e6,
            "micro_batch": cfg.train.micro_batch_size, "seqlen": cfg.data.seq_len, "grad_accum": derived.grad_accum,
            "tokens_per_s": tok_s, "ms_per_step": 1e3 * total / args.steps,
            "ms_per_step_median": 1e3 * statistics.median(times), "warmup_s": warmup_s,
            "peak_mem_gb": peak_gb, **phases,
            "reserved_gb": (torch.cuda.max_memory_reserved(device) / 2**30) if cuda else None,
            "mfu": (flops * tok_s / peak) if peak else None,
            "loss_first": float(first_loss), "loss_last": float(last_loss), "fused_ce": fused_ce,
            "autotune_configs": args.autotune_configs or "all",
        }
    finally:
        dims.destroy()


def profile_phases(args, training, dims, batches, derived, amp, fused_ce, sync) -> dict:
    """Mean ms of each phase over a few more steps, synchronizing between phases (so not part of the timed steps):
    forward + loss, backward (DeepSpeed: engine.backward + engine.step, i.e. also the ZeRO reduction, clipping and
    AdamW at the boundary), and the optimizer step (torch: clipping + AdamW + schedule)."""
    import torch

    from mamba_dist import train as T

    n = max(1, args.profile_steps)
    acc = {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0}
    for _ in range(n):
        for micro in range(derived.grad_accum):
            ids, labels, seq_idx = batches[micro % len(batches)]
            sync()
            t0 = time.perf_counter()
            with training.no_sync(last=micro == derived.grad_accum - 1):
                with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = T.forward_loss(training.model, ids, labels, seq_idx, dims, fused_ce)
                sync()
                t1 = time.perf_counter()
                training.backward(loss, derived.grad_accum)
                sync()
            acc["fwd_ms"] += 1e3 * (t1 - t0)
            acc["bwd_ms"] += 1e3 * (time.perf_counter() - t1)
        t2 = time.perf_counter()
        training.step()
        sync()
        acc["opt_ms"] += 1e3 * (time.perf_counter() - t2)
    return {k: v / n for k, v in acc.items()}


def _fmt(r: dict) -> str:
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "   n/a"
    mem = f"{r['peak_mem_gb']:6.2f}" if r.get("peak_mem_gb") is not None else "   n/a"
    return (f"{r['config']:<20} {r['mode']:<6} {r['backend']:<9} {r['dtype']:<5} "
            f"{r['micro_batch']:>3}x{r['seqlen']:<5} "
            f"{r['tokens_per_s']:>12,.0f} {r['ms_per_step']:>9.1f} {mem:>8} {mfu:>6}   "
            f"fwd/bwd/opt {r['fwd_ms']:.1f}/{r['bwd_ms']:.1f}/{r['opt_ms']:.1f} ms   "
            f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(run_row(args, *args.row)), flush=True)
        return 0
    # one fresh process per row (its own peak memory, CUDA context and process group)
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows, failed = [], []
    print(f"{'config':<20} {'mode':<6} {'backend':<9} {'dtype':<5} {'batch':<9} {'tokens/s':>12} {'ms/step':>9} "
          f"{'peak GiB':>8} {'MFU':>6}", flush=True)
    for config in args.configs:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--row", config, mode]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            got = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if proc.returncode != 0 or not got:
                failed.append((config, mode))
                print(f"{os.path.basename(config):<20} {mode:<6} FAILED (rc {proc.returncode}):\n"
                      + "\n".join(proc.stderr.strip().splitlines()[-15:]), flush=True)
                continue
            rows.append(json.loads(got[-1]))
            print(_fmt(rows[-1]), flush=True)
    if rows:
        print(f"device: {rows[0]['device']}; {args.warmup} warmup + {args.steps} timed steps per row; "
              f"peak = torch.cuda.max_memory_allocated over the whole row; Triton autotuning: "
              f"{rows[0]['autotune_configs']} configs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

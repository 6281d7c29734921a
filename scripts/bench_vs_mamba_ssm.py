"""Our training step beside mamba_ssm's own, in one process on one GPU, per model size.

The anchor is a plain loop around mamba_ssm's `MambaLMHeadModel` as a user would write it: fp32 parameters, bf16
autocast, F.cross_entropy on the fp32 logits, clipping at 1.0, fused torch AdamW, random tokens, no document resets
(its Mamba-1 cannot reset). Ours is the trainer's own step (`mamba_dist.train.train_step` on `build_training`,
as `mamba-dist train` runs it) on the same batch shape, with 4 documents packed per row, so every layer resets its
state at real document boundaries. Both use the recipe of configs/<model>.yaml (AdamW betas, weight decay, clip).

Per row it prints tokens/s, ms/step, peak memory (torch.cuda.max_memory_allocated, reset between the two), TFLOP/s
on the 6N basis (6 x parameters per token) and with the SSM terms (mamba_dist/model/flops.py), MFU against a bf16
matmul peak measured at the start of the same run, and ours / anchor.

Run on a GPU with mamba_ssm, causal_conv1d and megatron-core importable (device tool: stage the kernels with
`../shared/gpu/stage-kernels train`, carry .kernels, then):
    source .kernels/use-kernels; python scripts/bench_vs_mamba_ssm.py                       # all six sizes
    python scripts/bench_vs_mamba_ssm.py --sizes m1-130m m2-130m --steps 15 --json out.json
    python scripts/bench_vs_mamba_ssm.py --sizes m1-130m --set model.fused_ce=false           # one lever off
Triton autotuning runs in full during the untimed warm-up (the Mamba-2 kernels: minutes on first use of a shape;
TRITON_CACHE_DIR keeps the compiled kernels between runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mamba_dist.model.packing import random_packed_batches  # noqa: E402

SIZES = {  # name -> config
    "m1-130m": "configs/mamba-130m.yaml", "m2-130m": "configs/mamba2-130m.yaml",
    "m1-370m": "configs/mamba-370m.yaml", "m2-370m": "configs/mamba2-370m.yaml",
    "m1-1.4b": "configs/mamba-1.4b.yaml", "m2-1.3b": "configs/mamba2-1.3b.yaml",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--docs-per-row", type=int, default=4)
    p.add_argument("--warmup", type=int, default=6, help="untimed steps (compilation, full Triton autotuning)")
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--only", choices=["both", "anchor", "ours"], default="both")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides for our step")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile 3 steps per row (torch.profiler): kernel table + category split "
                        "written to DIR/<size>-<who>.txt, a one-line summary printed")
    return p


def measure_matmul_peak(n: int = 8192, reps: int = 30) -> float:
    """bf16 dense matmul FLOP/s of this GPU, measured (best of a few timed batches)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def _time(step, n_warmup: int, n_steps: int) -> tuple[list, float]:
    import torch

    t0 = time.perf_counter()
    for i in range(n_warmup):
        step(i)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    times = []
    for i in range(n_steps):
        t = time.perf_counter()
        step(n_warmup + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times, warm


# kernel-name patterns -> category of the profile summary (first match wins)
_CATEGORIES = [
    ("scan", r"selective_scan|chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd"),
    ("conv", r"causal_conv1d"),
    ("norm", r"layer_norm|rms_norm|_layer_norm"),
    ("matmul", r"gemm|cutlass|nvjet|sm90_|xmma|cublas|matmul"),
    ("optim", r"adam|multi_tensor|foreach"),
    ("copy/transpose", r"copy|transpose|cat|index|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|softmax|cross_entropy|log_softmax|fill"),
]


def _profile(step, first: int, n: int, path: str) -> str:
    """Profile n steps; write the kernel table to path; return a one-line summary (per step)."""
    import re

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t = time.perf_counter()
        for i in range(n):
            step(first + i)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / n / 1e3  # ms per step
    launches = sum(e.count for e in kernels) / n
    cats: dict = {}
    for e in kernels:
        name = e.key.lower()
        cat = next((c for c, pat in _CATEGORIES if re.search(pat, name)), "other")
        cats[cat] = cats.get(cat, 0.0) + e.self_device_time_total / n / 1e3
    split = " ".join(f"{c} {v:.1f}" for c, v in sorted(cats.items(), key=lambda kv: -kv[1]))
    line = (f"wall {1e3 * wall:.1f} ms/step, GPU kernels {total:.1f} ms ({100 * total / (1e3 * wall):.0f}% busy), "
            f"{launches:.0f} kernels/step; ms: {split}")
    with open(path, "w") as f:
        f.write(line + "\n\n")
        for key, rows, by_shape in (("self_device_time_total", 60, False), ("cpu_time_total", 40, False),
                                    ("self_device_time_total", 80, True)):
            try:
                f.write(prof.key_averages(group_by_input_shape=by_shape).table(
                    sort_by=key, row_limit=rows, max_name_column_width=60, max_shapes_column_width=80) + "\n")
            except Exception as e:  # the sort keys' names moved between torch versions
                f.write(f"(table by {key}: {e})\n")
    return line


def _config(name: str, args):
    from mamba_dist.config import load_config, validate_runtime

    tokens = args.batch * args.seqlen
    cfg = load_config(os.path.join(REPO, SIZES[name]), [
        "data.path=synthetic", f"data.seq_len={args.seqlen}", f"train.micro_batch_size={args.batch}",
        f"train.global_batch_tokens={tokens}", f"train.max_steps={args.warmup + args.steps}", "train.max_tokens=0",
        "schedule.warmup_steps=0", "precision.dtype=bf16", "train.device=cuda", "train.deterministic=false",
        "train.ac_fraction=0", "parallel.zero_stage=0", "model.backend=fused", *args.set])
    return cfg, validate_runtime(cfg, 1)


def run_anchor(cfg, args) -> dict:
    """mamba_ssm's MambaLMHeadModel in a plain loop (no resets)."""
    import torch
    import torch.nn.functional as F
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(cfg.seed)
    model = MambaLMHeadModel(MambaConfig(**cfg.model.mamba_config_dict()), device="cuda")
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=True)
    batches = random_packed_batches(4, args.batch, args.seqlen, cfg.model.vocab_size, 1, "cuda")

    def step(i):
        ids, labels, _ = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    times, warm = _time(step, args.warmup, args.steps)
    row = {"n_params": n_params, "times": times, "warmup_s": warm,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    if args.profile:
        row["profile"] = _profile(step, args.warmup + args.steps, 3,
                                  os.path.join(args.profile, f"{args.name}-anchor.txt"))
    del model, opt, batches
    return row


def run_ours(cfg, derived, args) -> dict:
    """The trainer's step: build_training + train_step, exactly as mamba-dist train runs it (bf16, fused)."""
    import torch

    from mamba_dist import train as T
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.parallel.dims import ParallelDims

    device = T._setup_torch(cfg)
    dims = ParallelDims.from_env(cfg.parallel).build()
    try:
        torch.manual_seed(cfg.seed)
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend=cfg.model.backend)
        n_params = sum(p.numel() for p in model.parameters())
        training = T.build_training(model, cfg, derived, dims, device)
        fused_ce = T.use_fused_ce(cfg, dims, device)
        batches = random_packed_batches(4, args.batch, args.seqlen, cfg.model.vocab_size, args.docs_per_row,
                                        "cuda")
        training.model.train()

        def step(i):
            return T.train_step(training, [batches[i % len(batches)]], dims, True, fused_ce)

        times, warm = _time(step, args.warmup, args.steps)
        from mamba_dist.model.ops.fused_mamba1 import compile_failures

        # what the auto switches picked, and whether any compiled helper fell back to eager (printed with the row)
        levers = T.describe_levers(training, fused_ce, device)
        if compile_failures():
            levers += f"; torch.compile failed for {', '.join(compile_failures())} (eager)"
        row = {"n_params": n_params, "times": times, "warmup_s": warm,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "fused_ce": fused_ce, "levers": levers}
        if args.profile:
            row["profile"] = _profile(step, args.warmup + args.steps, 3,
                                      os.path.join(args.profile, f"{args.name}-ours.txt"))
        del training, model, batches
        return row
    finally:
        dims.destroy()


def _summary(name: str, who: str, r: dict, cfg, args, peak: float) -> dict:
    from mamba_dist.model.flops import flops_per_token

    tokens = args.batch * args.seqlen
    total = sum(r["times"])
    tok_s = tokens * len(r["times"]) / total
    ssm = flops_per_token(cfg.model.mamba_config_dict(), args.seqlen).train()
    return {"size": name, "who": who, "tokens_per_s": tok_s, "ms_per_step": 1e3 * total / len(r["times"]),
            "ms_median": 1e3 * statistics.median(r["times"]), "peak_gib": r["peak_gib"],
            "tflops_6n": 6 * r["n_params"] * tok_s / 1e12, "tflops_ssm": ssm * tok_s / 1e12,
            "mfu": ssm * tok_s / peak, "params_M": r["n_params"] / 1e6, "warmup_s": r["warmup_s"],
            **({"profile": r["profile"]} if "profile" in r else {}),
            **({"fused_ce": r["fused_ce"]} if "fused_ce" in r else {}),
            **({"levers": r["levers"]} if "levers" in r else {})}


def _fmt(s: dict) -> str:
    return (f"{s['size']:<8} {s['who']:<7} {s['tokens_per_s']:>10,.0f} {s['ms_per_step']:>8.1f} "
            f"{s['peak_gib']:>8.2f} {s['tflops_6n']:>8.1f} {s['tflops_ssm']:>9.1f} {100 * s['mfu']:>6.1f}%"
            + (f" {s['ratio']:>6.2f}x {s['mem_ratio']:>5.2f}x" if "ratio" in s else ""))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_vs_mamba_ssm: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    peak = measure_matmul_peak()
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s; batch "
          f"{args.batch} x {args.seqlen}; ours {args.docs_per_row} documents per row (resets on), anchor none; "
          f"{args.warmup} warm-up + {args.steps} timed steps; overrides: {' '.join(args.set) or 'none'}", flush=True)
    print(f"{'size':<8} {'who':<7} {'tokens/s':>10} {'ms/step':>8} {'peak GiB':>8} {'TF/s 6N':>8} {'TF/s SSM':>9} "
          f"{'MFU':>7} {'ours/anchor':>7} {'mem':>5}", flush=True)
    rows = []
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for name in args.sizes:
        args.name = name
        cfg, derived = _config(name, args)
        got = {}
        for who, fn in (("anchor", lambda: run_anchor(cfg, args)), ("ours", lambda: run_ours(cfg, derived, args))):
            if args.only not in ("both", who):
                continue
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                got[who] = _summary(name, who, fn(), cfg, args, peak)
            except Exception as e:  # one failing row must not lose the others
                print(f"{name:<8} {who:<7} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                continue
            if who == "ours" and "anchor" in got:
                got[who]["ratio"] = got[who]["tokens_per_s"] / got["anchor"]["tokens_per_s"]
                got[who]["mem_ratio"] = got[who]["peak_gib"] / got["anchor"]["peak_gib"]
            print(_fmt(got[who]), flush=True)
            if "levers" in got[who]:
                print(f"{'':<8} {who:<7} {got[who]['levers']}", flush=True)
            if "profile" in got[who]:
                print(f"{'':<8} {who:<7} profile: {got[who]['profile']}", flush=True)
            rows.append(got[who])
            if args.json:  # after every row: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"peak_flops": peak, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

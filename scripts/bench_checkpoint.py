"""Cost of a checkpoint save on the training loop: synchronous vs `checkpoint.async=true` (issue 14).

The trainer's own pieces on one device: `build_training` + `train_step` on synthetic batches (bench_train_gpu.py's),
the trainer's checkpoint files (`state_files()`: model, optimizer + schedule), written with
`checkpoint.save_checkpoint` (sync) or `AsyncCheckpointer` (snapshot to pinned CPU memory, background writer,
commit polled each step). Each mode trains `--steps` steps and saves twice, after steps `--steps // 8` and
`5 * --steps // 8` (far enough apart for the first write to finish: the second save is what every save after the
first costs, with async's host buffers kept from the first); it prints the median step time without a save, the
wall time of each saving step (step + save call: the loop's stall), and the loop's total extra time over the
median across all steps (async: the snapshots plus the writer thread's interference). The async drain (waiting
for the writer at the end) is reported separately.

Run on a GPU from the repository root (put --dir on the storage checkpoints go to):
    python scripts/bench_checkpoint.py --config configs/mamba-370m.yaml --dir /tmp/ckpt-bench
CPU smoke run of the script itself:
    python scripts/bench_checkpoint.py --device cpu --backend reference --dtype fp32 --seqlen 64 --micro-batch 2 \\
        --steps 8 --set model.d_model=64 model.n_layer=2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mamba-370m.yaml")
    p.add_argument("--dir", default="/tmp/mamba-dist-ckpt-bench", help="checkpoint directory (removed first)")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="fused")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, REPO)
    from mamba_dist import checkpoint as ckpt
    from mamba_dist import train as T
    from mamba_dist.async_checkpoint import AsyncCheckpointer
    from mamba_dist.config import load_config, validate_runtime
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.model.packing import random_packed_batches
    from mamba_dist.parallel.dims import ParallelDims

    cfg = load_config(os.path.join(REPO, args.config), [
        "data.path=synthetic", f"data.seq_len={args.seqlen}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_tokens={args.micro_batch * args.seqlen}", "train.max_steps=1000", "train.max_tokens=0",
        f"model.backend={args.backend}", f"precision.dtype={args.dtype}", f"train.device={args.device}",
        "train.deterministic=false", *args.set])
    derived = validate_runtime(cfg, 1)
    device = T._setup_torch(cfg)
    dims = ParallelDims.from_env(cfg.parallel).build()
    torch.manual_seed(cfg.seed)
    model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend=cfg.model.backend)
    training = T.build_training(model, cfg, derived, dims, device)
    amp, fused_ce = cfg.precision.dtype == "bf16", T.use_fused_ce(cfg, dims, device)
    batches = random_packed_batches(4, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size, 4, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.config}: {n_params / 1e6:.0f}M parameters on {device}, {args.micro_batch}x{args.seqlen} tokens/step")

    step_no = 0

    def step():
        nonlocal step_no
        T.train_step(training, [batches[step_no % len(batches)]], dims, amp, fused_ce)
        step_no += 1

    for _ in range(args.warmup):
        step()
    sync()
    save_at = (args.steps // 8, 5 * args.steps // 8)
    for mode in ("sync", "async"):
        shutil.rmtree(args.dir, ignore_errors=True)
        saver = AsyncCheckpointer(args.dir, 0, ckpt.local_sync) if mode == "async" else None
        times, size = [], 0
        for i in range(args.steps):
            t = time.perf_counter()
            step()
            if i in save_at:
                files, meta = training.state_files(), {"tokens": 0, "world_size": 1}
                if saver is None:
                    sync()
                    ckpt.save_checkpoint(args.dir, step_no, 0, lambda tmp: training.save(tmp), meta)
                else:
                    saver.start(step_no, files, meta)
            elif saver is not None:
                saver.poll()
            sync()
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        if saver is not None:
            saver.wait()
        drain = time.perf_counter() - t
        latest = ckpt.latest_checkpoint(args.dir)
        size = sum(ckpt.verify(latest)["files"].values())
        median = statistics.median(t for i, t in enumerate(times) if i not in save_at)
        extra = sum(times) - median * len(times)
        print(f"{mode:>5}: checkpoint {size / 1e9:.2f} GB; step {median * 1e3:.1f} ms (median), saving steps "
              f"{times[save_at[0]] * 1e3:.0f} ms (first) and {times[save_at[1]] * 1e3:.0f} ms (second), loop's "
              f"extra time over {args.steps} steps {extra * 1e3:.0f} ms"
              + (f", drain at the end {drain * 1e3:.0f} ms" if saver is not None else ""))
    shutil.rmtree(args.dir, ignore_errors=True)
    dims.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())

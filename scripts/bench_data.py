"""Data pipeline throughput: whole `prepare` vs the tokenizer's own `encode_batch`, side by side; then the loader.

Run:
    python scripts/bench_data.py                      # built-in corpus, GPT-NeoX-20B, seq_len 2048
    python scripts/bench_data.py --repeat 5 --inputs builtin --seq-len 1024 --loader-workers 0 2

What is timed:
  encode_batch  `tokenizers.Tokenizer.encode_batch(all documents)` in this process with the library's default
                thread pool (all cores); the documents are read into memory first, untimed.
  prepare       the whole `mamba_dist.data.prepare.prepare()` call: reading the inputs, worker start-up,
                tokenizing, packing, zstd, tar writing, sha256, manifest, rename. Inputs and tokenizer are in the
                cache already (fetched before timing).
The two alternate, `--repeat` times each; the medians and their ratio are printed (goal: ratio >= 0.80).
  loader        one pass over the train split with `build_loader` (global shuffle on), per num_workers value,
                counting input tokens (micro_batch x seq_len per batch); worker start-up included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only torch-free modules at the top: prepare's spawned workers re-import this script.
from mamba_dist.data.corpus import resolve_inputs  # noqa: E402
from mamba_dist.data.prepare import prepare  # noqa: E402
from mamba_dist.data.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", nargs="+", default=["builtin"])
    p.add_argument("--tokenizer", default="gpt-neox-20b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workers", type=int, default=None, help="prepare's tokenizer processes (default: cores)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()

    tok = load_tokenizer(args.tokenizer)
    sources = resolve_inputs(args.inputs)  # downloads/caches the corpus, untimed
    docs = [t for s in sources for b in s.batches(1 << 30) for t in b.texts()]
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"corpus {' '.join(args.inputs)}: {len(docs):,} documents, {n_bytes / 1e6:.1f} MB; tokenizer {tok.name}; "
          f"{len(os.sched_getaffinity(0))} CPU cores; load average {os.getloadavg()[0]:.1f}")

    enc_rates, prep_rates = [], []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        out = Path(tmp) / "prepared"
        for r in range(args.repeat):
            if tok._tok is not None:
                t0 = time.perf_counter()
                enc = tok._tok.encode_batch(docs, add_special_tokens=False)
                dt = time.perf_counter() - t0
                n_enc = sum(len(e.ids) for e in enc)
                del enc
                enc_rates.append(n_enc / dt)
            t0 = time.perf_counter()
            m = prepare(args.inputs, out, tok, args.seq_len, workers=args.workers, overwrite=True, progress=False)
            dt = time.perf_counter() - t0
            n_prep = sum(s["stream_tokens"] for s in m["splits"].values())
            prep_rates.append(n_prep / dt)
            line = f"  run {r + 1}: prepare {n_prep / dt / 1e3:8.0f}k tok/s ({dt:.2f} s)"
            if enc_rates:
                line += f"   encode_batch {enc_rates[-1] / 1e3:8.0f}k tok/s ({n_enc / enc_rates[-1]:.2f} s)"
            print(line, flush=True)
        prep = statistics.median(prep_rates)
        print(f"prepare       {prep / 1e3:10.0f}k tok/s  (median of {args.repeat}; {n_prep:,} tokens incl. EOS, "
              f"workers={args.workers if args.workers is not None else 'cores'})")
        if enc_rates:
            enc = statistics.median(enc_rates)
            print(f"encode_batch  {enc / 1e3:10.0f}k tok/s  (median of {args.repeat}; {n_enc:,} tokens)")
            print(f"ratio prepare / encode_batch = {prep / enc:.2f}  (goal >= 0.80)")

        from mamba_dist.data.loader import build_loader

        tr = m["splits"]["train"]
        for nw in args.loader_workers:
            t0 = time.perf_counter()
            loader = build_loader(out, "train", args.micro_batch, args.seq_len, num_workers=nw, seed=0)
            t_build = time.perf_counter() - t0
            n = 0
            t0 = time.perf_counter()
            for batch in loader:
                n += batch["input_ids"].numel()
            dt = time.perf_counter() - t0
            print(f"loader        {n / dt / 1e6:10.2f}M tok/s  (num_workers={nw}, micro_batch={args.micro_batch}, "
                  f"{len(loader)} batches, {tr['rows']:,} rows in {len(tr['shards'])} shard(s); build+verify "
                  f"{t_build:.2f} s)")
            del loader


if __name__ == "__main__":
    main()

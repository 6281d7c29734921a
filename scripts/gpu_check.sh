#!/usr/bin/env bash
# GPU acceptance of the fused backend (issue 3): the `gpu` tests (fused vs reference, packed vs per-document,
# ours vs mamba_ssm's MambaLMHeadModel), then the forward+backward benchmark of both backends.
#
# Needs CUDA and importable mamba_ssm + causal_conv1d. Through the device tool, from the repository root:
#   here:       bash ../shared/gpu/stage-kernels mamba conv        # wheels into .kernels/ (git-ignored)
#   device run: source .kernels/use-kernels; bash scripts/gpu_check.sh [tests|bench|all]    carry: [".kernels"]
# Options (environment): GPU_TEST_K (pytest -k expression), GPU_TEST_TIMEOUT (s, default 540),
# MAMBA_DIST_GPU_AUTOTUNE_CONFIGS (Triton configs kept per kernel in the tests, default 2, min 2, 0 = all; see
# tests/_gpu_autotune.py), GPU_BENCH_ROWS (which benchmark rows, default "m1 m2"), GPU_BENCH_TIMEOUT (s, default 540).
# Logs and the error tables go to $OUT (the device tool's output folder), else ./gpu_check_out.
set -uo pipefail
what=${1:-all}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rc=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, mamba_ssm, causal_conv1d; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', \
causal_conv1d.__version__)" || exit 1

if [[ $what == tests || $what == all ]]; then
  # IEEE fp32 in Triton's dot products, so the fp32 checks measure the algorithms, not tf32 (see the tests)
  # (the first use of each Triton kernel shape autotunes for minutes; the time guard keeps the log coming back)
  TRITON_F32_DEFAULT=ieee timeout "${GPU_TEST_TIMEOUT:-540}" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    --durations=0 ${GPU_TEST_K:+-k "$GPU_TEST_K"} tests/test_gpu_mamba_ssm.py tests/test_gpu_fused.py 2>&1 \
    | tee "$out/pytest.log"
  rc=$?
  grep -oE '(ERR|BF16) [|].*' "$out/pytest.log" > "$out/errors.txt"
  # the largest error of each test, against its bound
  python3 scripts/gpu_worst.py "$out/errors.txt" 48 > "$out/worst.txt"
  echo "== worst error per test (err / bound) =="; cat "$out/worst.txt"
fi

if [[ $what == bench || $what == all ]]; then
  # bf16 autocast, fp32 weights; the 130M-size model (d_model 768, 24 layers, vocab 50277); fused at batch 8 x 2048
  # unpacked and packed (8 documents per row), both backends at batch 1 (the reference backend's memory allows it).
  # Mamba-2's fused rows autotune the Triton kernels first (minutes; warmup steps, not timed).
  # the benchmark's spawned workers import mamba_dist: the repository root goes on PYTHONPATH (no install there)
  bench() { PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/bench_model.py --device cuda --dtype bf16 --vocab 50277 --seqlen 2048 --d-model 768 \
              --n-layer 24 "$@" 2>>"$out/bench.jsonl"; }
  export out rows=${GPU_BENCH_ROWS:-m1 m2}
  export -f bench
  timeout "${GPU_BENCH_TIMEOUT:-540}" bash -c '
    for r in $rows; do case $r in
      m1)  bench --mixer mamba1 --batch 8 --backends fused --warmup 2 --iters 5
           bench --mixer mamba1 --batch 8 --backends fused --warmup 2 --iters 5 --packed
           bench --mixer mamba1 --batch 1 --backends reference,fused --warmup 1 --iters 3 --packed ;;
      m2ref) bench --mixer mamba2 --batch 1 --backends reference --warmup 1 --iters 3 --packed --d-state 128 ;;
      m2)  bench --mixer mamba2 --batch 8 --backends fused --warmup 2 --iters 5 --d-state 128
           bench --mixer mamba2 --batch 8 --backends fused --warmup 2 --iters 5 --d-state 128 --packed
           bench --mixer mamba2 --batch 1 --backends reference,fused --warmup 1 --iters 3 --packed --d-state 128 ;;
    esac; done' 2>&1 | tee "$out/bench.log"
fi
exit $rc

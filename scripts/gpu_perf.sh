#!/usr/bin/env bash
# GPU speed (issue 10) in one device call: the fused-kernel GPU tests of the speed levers (optional), then
# scripts/bench_vs_mamba_ssm.py (our trainer step beside mamba_ssm's, per size).
#
# Through the device tool, from the repository root:
#   here:       bash ../shared/gpu/stage-kernels train      # mamba-ssm, causal-conv1d, megatron-core into .kernels/
#   device run: source .kernels/use-kernels; bash scripts/gpu_perf.sh        carry: [".kernels", ".triton-autotune"]
# Environment: GPU_TEST_K (pytest -k of the tests to run first; empty: none), GPU_TESTS (their files; default the
# speed levers' tests/test_gpu_fused*.py, tests/test_gpu_train_step.py and the CE kernel's tests/test_cross_entropy.py), GPU_TEST_TIMEOUT (s, default 240),
# BENCH_ARGS (extra arguments of bench_vs_mamba_ssm.py, e.g. "--sizes m1-130m m2-130m"), BENCH_TIMEOUT (s, 480).
# Triton autotuning results are kept (TRITON_CACHE_AUTOTUNING=1) and come back as $OUT/autotune.tgz; unpacked
# into .triton-autotune/ here, the next call reuses them instead of autotuning the Mamba-2 kernels for minutes.
# .triton-autotune/autotune.tgz is tracked in git (16 KB), so a fresh checkout starts from the last results.
set -uo pipefail
out=${OUT:-gpu_perf_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$TRITON_CACHE_DIR"
[ -f .triton-autotune/autotune.tgz ] && tar xzf .triton-autotune/autotune.tgz -C "$TRITON_CACHE_DIR" \
  && echo "autotune results restored: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) kernels"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rc=0
if [[ -n ${GPU_TEST_K:-} ]]; then
  TRITON_F32_DEFAULT=ieee timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
    -k "$GPU_TEST_K" ${GPU_TESTS:-$(ls tests/test_gpu_fused*.py tests/test_gpu_train_step.py tests/test_cross_entropy.py)} \
    2>&1 | tee "$out/pytest.log" \
    | grep -E "^(ERR|BF16|TIME) |passed|failed|error|Error|FAILED" | grep -vE "^TIME"
  rc=${PIPESTATUS[0]}
  echo "pytest rc $rc"
fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-480}" python3 scripts/bench_vs_mamba_ssm.py --json "$out/bench.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$out/bench.log" | grep -vE "Warning|warn\(|^\s*$"
# profiles (bench --profile $OUT/prof): one archive, since a call returns only so many files
[ -d "$out/prof" ] && tar czf "$out/prof.tgz" -C "$out" prof && rm -rf "$out/prof"
tgz=$(realpath "$out")/autotune.tgz
(cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar czf "$tgz" -T -) || true
exit $rc

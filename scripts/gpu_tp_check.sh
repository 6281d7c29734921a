#!/usr/bin/env bash
# GPU acceptance of tensor parallelism with the fused kernels per shard (issue 16): tests/test_gpu_tp_shard.py.
# TP = 2 (+- sequence parallelism) == TP = 1 for Mamba-1 and Mamba-2 (fused, packed rows, fp32), and 5 ZeRO-2 steps
# at TP = 2 x DP = 1 == the plain TP = 1 run. Two ranks: NCCL with >= 2 GPUs, else both on the one GPU over gloo.
#
# Needs CUDA, mamba_ssm + causal_conv1d + megatron-core; the ZeRO part also deepspeed (skipped without it).
# Through the device tool, from the repository root:
#   here:       bash ../shared/gpu/stage-kernels train             # mamba-ssm + causal-conv1d + megatron (60 MiB)
#               bash scripts/gpu_tp_check.sh stage-zero            # optional: deepspeed and its needs (2.8 MiB)
#   device run: source .kernels/use-kernels; bash scripts/gpu_tp_check.sh [tp|zero|all]    carry: [".kernels"]
# The wheel sets do not fit in one carry with causal-conv1d (train 60 MiB + py 12.4 MiB > 64 MiB), so `stage-zero`
# packs deepspeed without its C++/CUDA op sources (read only by a JIT build; ZeRO with torch's AdamW builds none)
# plus hjson, pydantic(-core), annotated-types, typing-inspection, typing-extensions into
# .kernels/zero-deps.tar.xz; this script unpacks it to /tmp/zero-deps on the device. Without it only `tp` runs.
# Options (environment): GPU_TEST_K (pytest -k expression), GPU_TEST_TIMEOUT (s, default 540),
# MAMBA_DIST_GPU_AUTOTUNE_CONFIGS (Triton configs kept per kernel, default 2; see tests/_gpu_autotune.py),
# SHARED_WHEELS (stage-zero's wheel folder, default ../shared/wheels/py312).
# Logs and the error tables go to $OUT (the device tool's output folder), else ./gpu_check_out.
set -uo pipefail
what=${1:-all}

if [[ $what == stage-zero ]]; then
  set -e
  wheels=${SHARED_WHEELS:-../shared/wheels/py312}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for w in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
    f=$(ls "$wheels"/"$w"-[0-9]*.whl)
    python3 -m zipfile -e "$f" "$tmp"
  done
  rm -rf "$tmp"/deepspeed/ops/csrc "$tmp"/*.dist-info/RECORD
  find "$tmp"/deepspeed \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.hip' \) -delete
  exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
  mkdir -p .kernels "$(dirname "$exclude")"
  grep -qx '/.kernels/' "$exclude" 2>/dev/null || echo '/.kernels/' >> "$exclude"
  tar -C "$tmp" -cf - . | xz -9e -T2 > .kernels/zero-deps.tar.xz
  du -b .kernels/zero-deps.tar.xz; du -sh .kernels
  # what a call carrying .kernels sends: the tracked and untracked-not-ignored files plus .kernels (limit 64 MiB)
  total=$( { git ls-files -z --cached --others --exclude-standard; find .kernels -type f -print0; } \
           | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}')
  echo "working tree + .kernels: ${total} MiB of 64 MiB"
  exit 0
fi

out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# the spawned ranks import mamba_dist from the repository (no install on the device machine)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -f .kernels/zero-deps.tar.xz ]]; then
  mkdir -p /tmp/zero-deps && tar -C /tmp/zero-deps -xJf .kernels/zero-deps.tar.xz
  export PYTHONPATH="$PYTHONPATH:/tmp/zero-deps"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'PY' || exit 1
import torch, triton, mamba_ssm, causal_conv1d, megatron.core
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "triton",
      triton.__version__, "mamba_ssm", mamba_ssm.__version__, "causal_conv1d", causal_conv1d.__version__,
      "megatron-core", megatron.core.__version__)
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as e:  # the ZeRO tests skip
    print("deepspeed not importable:", type(e).__name__, e)
PY

case $what in
  tp) k="equals_tp1 or matches_reference" ;;
  zero) k="zero2" ;;
  all) k="" ;;
  *) echo "unknown part: $what (tp, zero, all, stage-zero)" >&2; exit 2 ;;
esac
[[ -n ${GPU_TEST_K:-} ]] && k="${k:+($k) and }($GPU_TEST_K)"

# IEEE fp32 in Triton's dot products, so the fp32 checks measure the layouts, not tf32 (see the test's docstring)
TRITON_F32_DEFAULT=ieee timeout "${GPU_TEST_TIMEOUT:-540}" python3 -m pytest -q -s -p no:cacheprovider -m gpu \
  -rs --durations=0 ${k:+-k "$k"} tests/test_gpu_tp_shard.py 2>&1 | tee "$out/pytest.log"
rc=$?
grep -oE '(ERR|INFO) [|].*' "$out/pytest.log" > "$out/errors.txt"
# the largest error of each test, against its bound
python3 scripts/gpu_worst.py "$out/errors.txt" 56 > "$out/worst.txt"
echo "== errors (ERR | test | tensor | err | bound) =="; grep '^ERR' "$out/errors.txt"
echo "== worst error per test (err / bound) =="; cat "$out/worst.txt"
exit $rc

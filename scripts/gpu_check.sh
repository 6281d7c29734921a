#!/usr/bin/env bash
# GPU acceptance of the fused backend (issue 3): the `gpu` tests (fused vs reference, packed vs per-document,
# ours vs mamba_ssm's MambaLMHeadModel), then the forward+backward benchmark of both backends.
#
# Needs CUDA and importable mamba_ssm + causal_conv1d. Through the device tool, from the repository root:
#   here:       bash ../shared/gpu/stage-kernels mamba conv        # wheels into .kernels/ (git-ignored)
#   device run: source .kernels/use-kernels; bash scripts/gpu_check.sh [tests|bench|all]    carry: [".kernels"]
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
    --durations=0 tests/test_gpu_mamba_ssm.py tests/test_gpu_fused.py 2>&1 | tee "$out/pytest.log"
  rc=$?
  grep -oE '(ERR|BF16) [|].*' "$out/pytest.log" > "$out/errors.txt"
  # the largest error of each test, against its bound
  python3 - "$out/errors.txt" > "$out/worst.txt" <<'PY'
import sys
worst = {}
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split("|")]
    if f[0] == "ERR":
        err, bound = float(f[3]), float(f[4])
        if f[1] not in worst or err / bound > worst[f[1]][0]:
            worst[f[1]] = (err / bound, f[2], err, bound)
for test, (r, name, err, bound) in sorted(worst.items()):
    print(f"{test:<48} {name:<44} {err:.2e} / {bound:.1e} = {r:.3f}")
PY
  echo "== worst error per test (err / bound) =="; cat "$out/worst.txt"
fi

if [[ $what == bench || $what == all ]]; then
  bench() { python3 scripts/bench_model.py --device cuda --dtype bf16 --vocab 50277 --seqlen 2048 \
              --warmup 2 --iters 5 "$@" 2>>"$out/bench.jsonl"; }
  {
    echo "== 130M-size (d_model 768, 24 layers), batch 8 x 2048, bf16 autocast: fused, unpacked and packed =="
    bench --mixer mamba1 --d-model 768 --n-layer 24 --batch 8 --backends fused
    bench --mixer mamba1 --d-model 768 --n-layer 24 --batch 8 --backends fused --packed
    bench --mixer mamba2 --d-model 768 --n-layer 24 --batch 8 --backends fused --d-state 128
    bench --mixer mamba2 --d-model 768 --n-layer 24 --batch 8 --backends fused --d-state 128 --packed
    echo "== same model, batch 1 x 2048 (the reference backend's memory allows this), both backends, packed =="
    bench --mixer mamba1 --d-model 768 --n-layer 24 --batch 1 --backends reference,fused --packed
    bench --mixer mamba2 --d-model 768 --n-layer 24 --batch 1 --backends reference,fused --packed --d-state 128
  } 2>&1 | tee "$out/bench.log"
fi
exit $rc

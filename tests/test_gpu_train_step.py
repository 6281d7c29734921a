"""GPU: the trainer's step (mamba_dist.train.train_step on build_training) with the speed levers on equals it with
them off: CUDA graphs (train.cuda_graphs, Mamba-2 and Mamba-1) and the fused lm_head + loss (model.fused_ce),
fp32, packed rows whose documents change between micro-batches, gradient accumulation 2 (the graph accumulates into
static gradient buffers) and 1 (the graph writes the gradients as its own outputs), over 5 optimizer steps. Run
through the device tool (scripts/gpu_perf.sh)."""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # fp32 Triton dot products (see test_gpu_fused.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from mamba_dist.model.backend import fused_unavailable_reason  # noqa: E402

_why = fused_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"fused kernels unavailable: {_why}")]

SEQ, ROWS, ACCUM, STEPS = 128, 2, 2, 5


@pytest.fixture(scope="module", autouse=True)
def _short_autotune():
    from _gpu_autotune import limit_triton_autotune
    limit_triton_autotune()


def _losses(mixer, overrides, accum=ACCUM):
    from mamba_dist import train as T
    from mamba_dist.config import load_config, validate_runtime
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.model.packing import seq_idx_from_lengths
    from mamba_dist.parallel.dims import ParallelDims

    ssm = "{d_state: 16}" if mixer == "Mamba1" else "{d_state: 32, headdim: 16, ngroups: 2, chunk_size: 32}"
    cfg = load_config(None, [
        f"model.mixer={mixer}", "model.d_model=64", "model.n_layer=2", "model.vocab_size=100",
        f"model.ssm_cfg={ssm}", "model.backend=fused", "data.path=synthetic", f"data.seq_len={SEQ}",
        f"train.micro_batch_size={ROWS}", f"train.global_batch_tokens={ROWS * SEQ * accum}",
        f"train.max_steps={STEPS}", "train.device=cuda", "train.deterministic=false", "optim.lr=3e-3",
        "schedule.warmup_steps=1", *overrides])
    derived = validate_runtime(cfg, 1)
    device = T._setup_torch(cfg)
    dims = ParallelDims.from_env(cfg.parallel).build()
    try:
        torch.manual_seed(0)
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="fused")
        training = T.build_training(model, cfg, derived, dims, device)
        fused_ce = T.use_fused_ce(cfg, dims, device)
        g = torch.Generator().manual_seed(1)
        # documents change from micro-batch to micro-batch (a captured graph replays on new packings); the last
        # step's has more starts than the first one's packing holds (Mamba-1 captures again, bigger)
        layouts = [[[1, 40, 87], [64, 1, 63]], [[SEQ], [3, 3, SEQ - 6]], [[2, 30, 96], [SEQ // 2] * 2]]
        out = []
        for step in range(STEPS):
            micro = []
            for i in range(accum):
                last = step == STEPS - 1 and i == accum - 1
                lay = [[1] * SEQ, [2] * (SEQ // 2)] if last else layouts[(2 * step + i) % 3]
                seq_idx = seq_idx_from_lengths(lay, device="cuda")
                ids = torch.randint(0, 100, (ROWS, SEQ + 1), generator=g).cuda()
                micro.append((ids[:, :-1], ids[:, 1:], seq_idx))
            loss, norm, applied = T.train_step(training, micro, dims, False, fused_ce)
            out.append((loss.item(), norm.item()))
        params = {n: p.detach().clone() for n, p in T.unwrap(training.model).named_parameters()}
        return type(training).__name__, out, params
    finally:
        dims.destroy()


@pytest.mark.parametrize("mixer,levers,accum", [
    ("Mamba2", ["train.cuda_graphs=true", "model.fused_ce=true"], ACCUM),
    ("Mamba2", ["train.cuda_graphs=true", "model.fused_ce=false"], ACCUM),
    ("Mamba2", ["train.cuda_graphs=true", "model.fused_ce=true"], 1),
    ("Mamba1", ["train.cuda_graphs=false", "model.fused_ce=true"], ACCUM),
    # Mamba-1 captured through its StaticPacking (document starts and conv fix-ups in fixed device buffers)
    ("Mamba1", ["train.cuda_graphs=true", "model.fused_ce=true"], ACCUM),
    # one micro-batch per step: the last step's packing overflows, a capture with the previous gradients stale
    ("Mamba1", ["train.cuda_graphs=true", "model.fused_ce=true"], 1),
])
def test_levers_keep_the_training(mixer, levers, accum):
    base_kind, base, base_p = _losses(mixer, ["train.cuda_graphs=false", "model.fused_ce=false"], accum)
    kind, got, got_p = _losses(mixer, levers, accum)
    assert base_kind == "TorchPath"
    assert kind == ("CudaGraphPath" if "train.cuda_graphs=true" in levers else "TorchPath")
    worst = 0.0
    for (l0, n0), (l1, n1) in zip(base, got):
        worst = max(worst, abs(l1 - l0) / abs(l0), abs(n1 - n0) / abs(n0))
    pw = max(((got_p[k] - base_p[k]).norm() / base_p[k].norm()).item() for k in base_p)
    print(f"ERR | train_step {mixer} {' '.join(levers)} accum {accum} | losses+norms | {worst:.3e} | 1e-5")
    print(f"ERR | train_step {mixer} {' '.join(levers)} accum {accum} | params after {STEPS} steps | {pw:.3e} | 1e-5")
    assert worst <= 1e-5 and pw <= 1e-5, (base, got)

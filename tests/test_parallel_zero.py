"""DeepSpeed ZeRO (composed with TP) and torch DDP x TP equal single-process AdamW (CPU, gloo, spawned ranks, fp32).

- ZeRO-1, -2, -3 at TP=1 x DP=2 and TP=2 x DP=2, gradient clipping off and on (a clip value below every step's
  gradient norm, so clipping is active): 5 steps give the single-process AdamW losses within 1e-5, and DeepSpeed's
  gradient norm equals the single-process norm (TP-replicated parameters counted once). The norm is checked
  directly as well: with megatron's default tags (a weight built with perform_initialization=False carries no
  `tensor_model_parallel` flag, so DeepSpeed counts it on TP rank 0 only) DeepSpeed's norm is off
  by 38% and the clipped losses drift by 3.4e-3 (the "ZeRO-3 + TP + clipping drift" once seen by a probe).
  ZeRO-3 runs also use sequence parallelism and recomputation. ZeRO-3 gathers a weight only around its own
  module's forward; the model uses module calls for every submodule weight, so no
  `register_external_parameter` is needed (a direct read would see an empty placeholder and fail).
- A TP=2 x DP=2 ZeRO-2 checkpoint resumes exactly: the losses after loading equal the uninterrupted run's.
- DDP over the DP group x TP=2 with sequence parallelism, activation recomputation and our TP-aware
  clip_grad_norm_ equals single-process AdamW.
- Hybrids (attention layers among Mamba-1 / Mamba-2 layers) under ZeRO-1/2/3 at TP=2 x DP=2 (ZeRO-3 with SP and
  recomputation), clipping active, equal single-process AdamW over 5 steps.
- precision=bf16 under DeepSpeed (torch_autocast) keeps A_log, D and dt biases in fp32 and tracks the fp32 losses.

One spawn per world size (module-scoped fixtures) serves all cases: DeepSpeed builds further engines in the same
processes in well under a second, while a spawn costs ~8 s.
"""

import copy
import math
import os

import pytest
import torch

from _dist_utils import run_ranks
from _parallel_models import batch, build_model

pytestmark = pytest.mark.slow

TOL = 1e-5
STEPS = 5
MBS = 2  # rows per DP rank per step
LR, WD = 1e-2, 0.1
CLIP = 0.05  # below every step's gradient norm for these models (asserted)
STAGES = (1, 2, 3)


def _global_batch(model, step: int, dp: int):
    return batch(model, seed=100 + step, rows=MBS * dp)


def _reference(base, dp: int, clip: float, steps: int = STEPS):
    """Single-process AdamW on the global batch: (losses, pre-clip grad norms)."""
    import torch.nn.functional as F

    from mamba_dist.parallel import adamw_param_groups

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(adamw_param_groups(model, WD), lr=LR)
    losses, norms = [], []
    for s in range(steps):
        ids, labels, seq_idx = _global_batch(base, s, dp)
        loss = F.cross_entropy(model(ids, seq_idx=seq_idx).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms


def _local(base, step, dims):
    ids, labels, seq_idx = _global_batch(base, step, dims.dp)
    sl = slice(dims.dp_rank * MBS, (dims.dp_rank + 1) * MBS)
    return ids[sl], labels[sl], seq_idx[sl]


def _dp_mean(x: float, dims) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=dims.dp_group)
    return t.item() / dims.dp


def _engine(base, dims, stage, clip, precision="fp32", ac_fraction=0.0):
    from mamba_dist.parallel import build_deepspeed_engine, parallelize

    model = parallelize(copy.deepcopy(base), dims, ac_fraction=ac_fraction, zero_stage=stage)
    return build_deepspeed_engine(model, {"lr": LR, "weight_decay": WD, "betas": (0.9, 0.999), "eps": 1e-8}, dims,
                                  zero_stage=stage, precision=precision, grad_clip=clip, micro_batch_size=MBS)


def _train(engine, base, dims, steps, first_step=0):
    from mamba_dist.parallel import loss_fn

    losses, norms = [], []
    for s in range(first_step, first_step + steps):
        ids, labels, seq_idx = _local(base, s, dims)
        loss = loss_fn(engine(ids, seq_idx=seq_idx), labels, dims)
        engine.backward(loss)
        engine.step()
        losses.append(_dp_mean(loss.item(), dims))
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def _max_rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _zero_worker(rank, world, tp, kind, ckpt_dir, extras):
    from mamba_dist.parallel import ParallelDims

    base = build_model(kind)
    out = {}
    for clip in (0.0, CLIP):
        dp = world // tp
        out[("ref", clip)] = ref_losses, ref_norms = _reference(base, dp, clip)
        for stage in STAGES:
            # ZeRO-3 runs at TP=2 also exercise sequence parallelism and activation recomputation
            dims = ParallelDims(tp=tp, sequence_parallel=stage == 3, world_size=world).build()
            engine = _engine(base, dims, stage, clip, ac_fraction=0.5 if stage == 3 else 0.0)
            if stage == 3:  # really partitioned: outside a module's forward its weights are empty placeholders
                assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())
                # ... so the fused Mamba-1 inner function, which reads submodule weights directly, is off
                assert not any(getattr(m, "use_inner_fn", False) for m in engine.module.modules())
            losses, norms = _train(engine, base, dims, STEPS)
            out[(stage, clip)] = {"loss": _max_rel(losses, ref_losses), "norm": _max_rel(norms, ref_norms),
                                  "losses": losses}
            del engine
    dims = ParallelDims(tp=tp, world_size=world).build()
    if "resume" in extras:
        out["resume"] = _resume(base, dims, ckpt_dir)
    if "ddp" in extras:
        out["ddp"] = _ddp_sp(base, world, kind)
    if "bf16" in extras:
        out["bf16"] = _bf16(base, dims)
    return out


def _resume(base, dims, ckpt_dir):
    from mamba_dist.parallel import load_engine_checkpoint, save_engine_checkpoint

    full, _ = _train(_engine(base, dims, 2, CLIP), base, dims, STEPS)
    first = _engine(base, dims, 2, CLIP)
    _train(first, base, dims, 3)
    save_engine_checkpoint(first, ckpt_dir, "step3", client_state={"step": 3})
    errors = []
    try:  # an existing tag is refused on every rank (nobody is left waiting at a barrier)
        save_engine_checkpoint(first, ckpt_dir, "step3")
    except FileExistsError as e:
        errors.append(str(e))
    try:
        load_engine_checkpoint(first, os.path.join(ckpt_dir, "nowhere"))
    except FileNotFoundError as e:
        errors.append(str(e))
    del first
    resumed = _engine(_perturbed(base, seed=7), dims, 2, CLIP)  # different weights: the load must replace them
    state = load_engine_checkpoint(resumed, ckpt_dir)
    after, _ = _train(resumed, base, dims, STEPS - 3, first_step=3)
    return {"full": full[3:], "resumed": after, "client_state": state.get("step"), "errors": errors,
            "files": sorted(os.listdir(ckpt_dir))}


def _perturbed(base, seed):
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _ddp_sp(base, world, kind):
    """torch path: DDP over the DP group x TP=2 with sequence parallelism, AC on every block, TP-aware clipping."""
    from mamba_dist.parallel import ParallelDims, adamw_param_groups, clip_grad_norm_, loss_fn, parallelize

    dims = ParallelDims(tp=2, sequence_parallel=True, world_size=world).build()
    ref_losses, ref_norms = _reference(base, dims.dp, CLIP, steps=3)
    model = parallelize(copy.deepcopy(base), dims, ac_fraction=1.0, zero_stage=0)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    opt = torch.optim.AdamW(adamw_param_groups(model.module, WD), lr=LR)
    losses, norms = [], []
    for s in range(3):
        ids, labels, seq_idx = _local(base, s, dims)
        loss = loss_fn(model(ids, seq_idx=seq_idx), labels, dims)
        opt.zero_grad()
        loss.backward()
        norms.append(clip_grad_norm_(model.parameters(), CLIP, dims).item())
        opt.step()
        losses.append(_dp_mean(loss.item(), dims))
    return {"loss": _max_rel(losses, ref_losses), "norm": _max_rel(norms, ref_norms)}


def _bf16(base, dims):
    engine = _engine(base, dims, 2, 0.0, precision="bf16")
    dtypes = {n: p.dtype for n, p in engine.module.named_parameters()}
    losses, _ = _train(engine, base, dims, 3)
    ref_losses, _ = _reference(base, dims.dp, 0.0, steps=3)
    return {"dtypes": dtypes, "loss": _max_rel(losses, ref_losses)}


# ------------------------------------------------------------------------------------------------ fixtures/tests


def _merge_ranks(per_rank):
    # every rank computes the same dp-averaged numbers; keep rank 0's and check the others agree
    for other in per_rank[1:]:
        for key, val in other.items():
            if isinstance(key, tuple) and key[0] != "ref":
                assert val["losses"] == per_rank[0][key]["losses"], key
    return per_rank[0]


@pytest.fixture(scope="module")
def zero_tp1(tmp_path_factory):
    return _merge_ranks(run_ranks(_zero_worker, 2, 1, "mamba2", str(tmp_path_factory.mktemp("z1")), ()))


@pytest.fixture(scope="module")
def zero_tp2(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    return _merge_ranks(run_ranks(_zero_worker, 4, 2, "mamba1", ckpt, ("resume", "ddp", "bf16")))


@pytest.mark.parametrize("clip", [0.0, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", ["tp1xdp2", "tp2xdp2"])
def test_zero_equals_adamw(request, layout, stage, clip):
    res = request.getfixturevalue("zero_tp1" if layout == "tp1xdp2" else "zero_tp2")
    ref_losses, ref_norms = res[("ref", clip)]
    if clip:
        assert min(ref_norms) > clip, "clipping must be active in this test"
    r = res[(stage, clip)]
    assert r["loss"] <= TOL, (r, ref_losses)
    assert r["norm"] <= TOL, r
    assert ref_losses[-1] < ref_losses[0]  # it trains


def test_zero2_tp2_resume_is_exact(zero_tp2):
    r = zero_tp2["resume"]
    assert r["client_state"] == 3
    assert r["resumed"] == r["full"], r
    assert r["files"] == ["latest", "step3", "zero_to_fp32.py", "zero_to_torch.py"]  # no temporary left
    assert len(r["errors"]) == 2 and all("\n" not in e for e in r["errors"]), r["errors"]
    assert "already exists" in r["errors"][0] and "no DeepSpeed checkpoint" in r["errors"][1]


def test_ddp_tp_sequence_parallel_ac_clip(zero_tp2):
    r = zero_tp2["ddp"]
    assert r["loss"] <= TOL and r["norm"] <= TOL, r


def test_deepspeed_bf16_keeps_ssm_params_fp32(zero_tp2):
    r = zero_tp2["bf16"]
    ssm = {n: d for n, d in r["dtypes"].items() if n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")
           or n.endswith("dt_proj.bias")}
    assert ssm and all(d == torch.float32 for d in ssm.values()), ssm
    assert 1e-6 < r["loss"] <= 2e-2, r  # bf16 matmuls ran (not bit-equal to fp32) and track the fp32 run


# ------------------------------------------------------------------------------------------------ hybrid models
HYBRID_KINDS = ("hybrid1", "hybrid2")


def _zero_hybrid_worker(rank, world, tp):
    """Hybrids (attention at 2 of 4 layers, _parallel_models.py) under ZeRO-1, -2 and -3 (+ SP + recomputation)
    at TP=2 x DP=2, clipping active: 5 steps equal single-process AdamW."""
    from mamba_dist.parallel import ParallelDims

    out = {}
    for kind in HYBRID_KINDS:
        base = build_model(kind)
        dp = world // tp
        out[(kind, "ref")] = ref_losses, ref_norms = _reference(base, dp, CLIP)
        for stage in STAGES:
            dims = ParallelDims(tp=tp, sequence_parallel=stage == 3, world_size=world).build()
            engine = _engine(base, dims, stage, CLIP, ac_fraction=0.5 if stage == 3 else 0.0)
            losses, norms = _train(engine, base, dims, STEPS)
            out[(kind, stage)] = {"loss": _max_rel(losses, ref_losses), "norm": _max_rel(norms, ref_norms)}
            del engine
    return out


@pytest.fixture(scope="module")
def zero_hybrid():
    return run_ranks(_zero_hybrid_worker, 4, 2)[0]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_zero_hybrid_equals_adamw(zero_hybrid, kind, stage):
    ref_losses, ref_norms = zero_hybrid[(kind, "ref")]
    assert min(ref_norms) > CLIP, "clipping must be active in this test"
    r = zero_hybrid[(kind, stage)]
    assert r["loss"] <= TOL, (r, ref_losses)
    assert r["norm"] <= TOL, r
    assert ref_losses[-1] < ref_losses[0]

"""GPU: tensor parallelism with the fused kernels on every shard (issue 16). Run through the device tool with
scripts/gpu_tp_check.sh; skipped without CUDA and the kernels.

On CPU, TP = 2/4 equals TP = 1 with the reference kernels (tests/test_parallel_tp.py). Here the `fused` backend
(causal_conv1d, mamba_ssm's selective scan and Triton SSD / gated RMSNorm) runs on each TP shard: local sizes
(d_inner / tp channels, nheads / tp heads, ngroups / tp groups), strided slices of the column-parallel in_proj
output, and packed rows (seq_idx resets on), through megatron's CUDA linear autograd functions.

- At these sizes the fused TP = 1 forward matches the reference kernels (logits, loss; 1e-4, test_gpu_fused.py's
  fp32 bound), so TP = 1 is a trustworthy baseline.
- TP = 2 forward + backward equals TP = 1 (both fused) for Mamba-1 and Mamba-2, with and without sequence
  parallelism: the gathered logits, the loss and every parameter gradient gathered back to full shape, fp32,
  within 1e-5 relative to each tensor's largest entry (the CPU TP test's measure).
- 5 AdamW steps under DeepSpeed ZeRO-2 at TP = 2 x DP = 1 give the losses (and gradient norms) of the plain
  single-process TP = 1 run within 1e-5 (fp32). Needs deepspeed (skipped without it).

Process group: with two or more visible GPUs each rank gets its own GPU and NCCL, the normal choice for CUDA
tensors (and what the trainer uses). With one GPU the two ranks share it, and NCCL cannot run two ranks of one
communicator on the same device ("Duplicate GPU detected"), so the ranks use gloo, which runs collectives on CUDA
tensors by staging them through host memory. The collectives this path issues and gloo's CUDA support for them
(torch >= 2.3): all_reduce (megatron's mappings, its linear's input-gradient all-reduce, the vocab-parallel
cross-entropy, the sequence-parallel norm-gradient hook, DeepSpeed's norm and overflow checks) and list all_gather
(gathering gradients/logits) have CUDA implementations; all_gather_into_tensor (our sequence-parallel gather) is
gloo's list all_gather on chunks of the output; reduce_scatter_tensor (our sequence-parallel reduce-scatter) is an
all_reduce of a copy, then this rank's chunk; DeepSpeed's reduce and broadcast over the one-rank DP group have
CUDA implementations (its parameter all-gather is skipped at DP = 1). Gloo is slower, not different: every
collective sums in a fixed order over two ranks, so the numbers equal NCCL's up to fp32 rounding.

Errors are `ERR | test | tensor | err | bound` lines (as tests/test_gpu_fused.py prints): per tensor group (a
parameter name with the layer index removed), the worst over layers and ranks.
"""

import copy
import math
import os
import re
import time

_T0 = time.perf_counter()
# IEEE fp32 in Triton's dot products (else tf32, ~1e-3): set before any Triton kernel compiles; spawned ranks
# inherit it
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402
import torch  # noqa: E402

from _dist_utils import run_ranks  # noqa: E402
from mamba_dist.model.backend import fused_unavailable_reason  # noqa: E402
from mamba_dist.model.packing import seq_idx_from_lengths  # noqa: E402

_why = fused_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"fused kernels unavailable: {_why}")]

WORLD = 2  # TP = 2 (x DP = 1)
TOL = 1e-5
TOL_ANCHOR = 1e-4  # fused vs reference kernels in fp32 (different summation orders), test_gpu_fused.py's bound
TIMEOUT = 540.0  # per spawn: CUDA start, imports and Triton compilation (trimmed autotuning) in both ranks

VOCAB = 100  # padded to 104: 52 rows of the embedding per rank
SEQ, CHUNK = 256, 32
# document lengths per row: 1-token documents, a document starting exactly on a chunk border (32), documents
# crossing chunk borders and the sequence-parallel shard border (128), a row that is one document
DOCS = [[1, 31, 1, 70, 64, 89], [100, 1, 155], [SEQ]]
# Sizes valid for the fused kernels at TP = 1 and on a TP = 2 shard. causal_conv1d's seq_idx path needs a
# channel-last input with channels and strides multiples of 8; the mixers hand it a slice of in_proj's output:
#   Mamba-1: d_inner 128 -> 64 channels per shard, in_proj width 2 * 64 = 128 (stride) per shard;
#   Mamba-2: d_ssm 512, headdim 32 -> 16 heads (8 per shard), ngroups 2 (1 per shard), d_state 32;
#            conv channels 512 + 2*2*32 = 640 -> 320 per shard; in_proj width 2*512 + 128 + 16 = 1168 -> 584.
MODELS = {
    "Mamba1": {"d_model": 64, "ssm_cfg": {"layer": "Mamba1", "d_state": 16}},
    "Mamba2": {"d_model": 256, "ssm_cfg": {"layer": "Mamba2", "d_state": 32, "headdim": 32, "ngroups": 2,
                                           "chunk_size": CHUNK}},
}
N_LAYER = 2

# ZeRO-2 run (as tests/test_parallel_zero.py). lr 3e-3: both models learn visibly in 5 steps (Mamba-2 from 4.7 to
# 0.9) without the fast descent that amplifies fp32 rounding (at lr 1e-2 the CPU dry run of this test drifted the
# Mamba-2 losses by 2e-6 between layouts by step 4; at 3e-3 by 2e-7).
STEPS, LR, WD = 5, 3e-3, 0.1
# Also checked: DeepSpeed's (TP-aware) gradient norm against the TP = 1 model's, at 1e-5 too (a shard counted on
# one rank only is off by ~1e-1). The reference norm is summed in fp64: torch's fp32 clip_grad_norm_ itself was
# 1.6e-6 off the exact norm for this Mamba-2 model in the CPU dry run, DeepSpeed's 1.6e-8.


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the tensor's largest entry, as tests/test_parallel_tp.py)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _group(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name)


def _process_group_backend() -> str:
    """NCCL with one GPU per rank when there are enough GPUs; gloo when the ranks must share one (docstring)."""
    return "nccl" if torch.cuda.device_count() >= WORLD else "gloo"


def _loopback_for_gloo() -> None:
    """All ranks are on this host: let gloo bind the loopback interface instead of whatever the host name
    resolves to (in a sandbox that may be an address it cannot connect to). Inherited by the spawned ranks."""
    import socket

    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return
    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in names:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


# ------------------------------------------------------------------------------------------------ in the ranks


def _setup_rank(rank: int) -> torch.device:
    import torch.distributed as dist

    from _gpu_autotune import limit_triton_autotune

    device = torch.device("cuda", rank % torch.cuda.device_count())  # one GPU per rank, or all on cuda:0
    torch.cuda.set_device(device)
    # DeepSpeed takes LOCAL_RANK as the device index of the rank (cuda:LOCAL_RANK); ranks sharing one GPU need 0
    os.environ["LOCAL_RANK"] = str(device.index)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls in fp32 (the torch default, made explicit)
    torch.backends.cudnn.allow_tf32 = False
    assert dist.get_backend() == _process_group_backend()
    limit_triton_autotune()
    return device


def _build(mixer: str, device: torch.device):
    """The TP = 1 model, initialised on CPU from a fixed seed (the same weights on every rank and any GPU), moved to
    the GPU, fused backend."""
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    cfg = MambaConfig(n_layer=N_LAYER, vocab_size=VOCAB, pad_vocab_size_multiple=8, **copy.deepcopy(MODELS[mixer]))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, backend="reference").to(device)
    model.set_backend("fused")
    return model


def _batch(device: torch.device, seed: int = 1):
    """(input_ids, labels, seq_idx) of shape (len(DOCS), SEQ): arithmetic token sequences (random start and stride
    per row, so a few AdamW steps lower the loss), labels in the real vocab, packed documents."""
    g = torch.Generator().manual_seed(seed)
    rows = len(DOCS)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return ids[:, :-1].to(device), ids[:, 1:].to(device), seq_idx_from_lengths(DOCS, device=device)


def _check_shard_layout(model, mixer: str) -> dict:
    """Every kernel-dispatching module of the TP model runs the fused backend, with the local sizes the layout
    above promises (so the shard's conv input takes causal_conv1d's native channel-last seq_idx path)."""
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"fused"}, backends
    m = model.backbone.layers[0].mixer
    width = m.in_proj.weight.shape[0]  # local in_proj output width = the conv input's time stride
    conv = m.conv1d.weight.shape[0]
    assert width % 8 == 0 and conv % 8 == 0, (width, conv)
    if mixer == "Mamba1":
        assert m.d_inner == 64, m.d_inner
        return {"d_inner": m.d_inner, "in_proj": width, "conv": conv}
    assert (m.nheads, m.ngroups, m.d_ssm) == (8, 1, 256), (m.nheads, m.ngroups, m.d_ssm)
    return {"nheads": m.nheads, "ngroups": m.ngroups, "in_proj": width, "conv": conv}


def _tp_worker(rank, world, mixers):
    import torch.nn.functional as F

    from mamba_dist.parallel import ParallelDims, apply_tp, full_grad_dict, gather_tp_tensor, loss_fn

    device = _setup_rank(rank)
    out = {"device": str(device), "gpus": torch.cuda.device_count()}
    for mixer in mixers:
        base = _build(mixer, device)
        ids, labels, seq_idx = _batch(device)
        ref = copy.deepcopy(base)
        ref_logits = ref(ids, seq_idx=seq_idx)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        ref_loss.backward()
        ref_grads = {n: p.grad.detach().cpu() for n, p in ref.named_parameters()}
        ref_logits = ref_logits.detach().cpu()
        # anchor: at these sizes the fused TP = 1 forward matches the reference kernels (as in test_gpu_fused.py)
        truth = copy.deepcopy(base)
        truth.set_backend("reference")
        with torch.no_grad():
            truth_logits = truth(ids, seq_idx=seq_idx)
            truth_loss = F.cross_entropy(truth_logits.flatten(0, 1), labels.flatten())
        out[(mixer, "reference")] = {"logits": _rel(ref_logits, truth_logits),
                                     "loss": abs(ref_loss.item() - truth_loss.item()) / abs(truth_loss.item())}
        del truth
        for sp in (False, True):
            dims = ParallelDims(tp=world, sequence_parallel=sp, world_size=world).build()
            model = apply_tp(copy.deepcopy(base), dims)
            layout = _check_shard_layout(model, mixer)
            logits = model(ids, seq_idx=seq_idx)
            assert logits.shape[-1] == ref_logits.shape[-1] // world  # vocab-sharded
            full_logits = gather_tp_tensor(logits.detach().clone(), dims)  # loss_fn overwrites logits
            loss = loss_fn(logits, labels, dims)
            loss.backward()
            grads = full_grad_dict(model, dims)
            assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)
            errors = {"logits": _rel(full_logits, ref_logits),
                      "loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
            for name in ref_grads:
                key = f"grad {_group(name)}"
                errors[key] = max(errors.get(key, 0.0), _rel(grads[name], ref_grads[name]))
            out[(mixer, sp)] = {"errors": errors, "n_grads": len(grads), "layout": layout,
                                "grad_max": max(g.abs().max().item() for g in ref_grads.values())}
            del model
    return out


def _reference_adamw(base, device):
    """The plain single-process TP = 1 run: torch AdamW, no DeepSpeed; (losses, fp64 gradient norms)."""
    import torch.nn.functional as F

    from mamba_dist.parallel import adamw_param_groups

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(adamw_param_groups(model, WD), lr=LR)
    losses, norms = [], []
    for s in range(STEPS):
        ids, labels, seq_idx = _batch(device, seed=100 + s)
        loss = F.cross_entropy(model(ids, seq_idx=seq_idx).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        norms.append(math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters())))
        opt.step()
        losses.append(loss.item())
    return losses, norms


def _zero_worker(rank, world, mixers):
    from mamba_dist.parallel import ParallelDims, build_deepspeed_engine, loss_fn, parallelize

    device = _setup_rank(rank)
    out = {"device": str(device), "gpus": torch.cuda.device_count()}
    for mixer in mixers:
        base = _build(mixer, device)
        ref_losses, ref_norms = _reference_adamw(base, device)
        dims = ParallelDims(tp=world, world_size=world).build()  # TP = 2 x DP = 1
        model = parallelize(copy.deepcopy(base), dims, zero_stage=2)
        _check_shard_layout(model, mixer)
        engine = build_deepspeed_engine(model, {"lr": LR, "weight_decay": WD, "betas": (0.9, 0.999), "eps": 1e-8},
                                        dims, zero_stage=2, precision="fp32", grad_clip=0.0,
                                        micro_batch_size=len(DOCS))
        assert next(engine.module.parameters()).device == device
        losses, norms = [], []
        for s in range(STEPS):
            ids, labels, seq_idx = _batch(device, seed=100 + s)
            loss = loss_fn(engine(ids, seq_idx=seq_idx), labels, dims)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
        out[mixer] = {"losses": losses, "ref_losses": ref_losses, "norms": norms, "ref_norms": ref_norms}
        del engine
    return out


# ------------------------------------------------------------------------------------------------ tests


def _report(test: str, errors: dict, bound: float) -> None:
    print(f"TIME | {test} | {time.perf_counter() - _T0:.0f} s since import")
    for name, err in errors.items():
        print(f"ERR | {test} | {name} | {err:.3e} | {bound:.3e}")


def _spawn(worker, mixers):
    backend = _process_group_backend()
    if backend == "gloo":
        _loopback_for_gloo()
    per_rank = run_ranks(worker, WORLD, mixers, timeout=TIMEOUT, backend=backend)
    print(f"INFO | {WORLD} ranks, process group {backend}, devices {[r['device'] for r in per_rank]} "
          f"({per_rank[0]['gpus']} GPU(s) visible)")
    return per_rank


@pytest.fixture(scope="module")
def tp_results():
    per_rank = _spawn(_tp_worker, tuple(MODELS))
    merged = {}
    for res in per_rank:  # worst over ranks
        for key, val in res.items():
            if not isinstance(key, tuple):
                continue
            cur = merged.setdefault(key, copy.deepcopy(val))
            errors, cur_errors = (val, cur) if key[1] == "reference" else (val["errors"], cur["errors"])
            for name, err in errors.items():
                cur_errors[name] = max(cur_errors[name], err)
    return merged


@pytest.mark.parametrize("mixer", list(MODELS))
def test_fused_tp1_matches_reference_kernels(tp_results, mixer):
    errors = tp_results[(mixer, "reference")]
    _report(f"{mixer} fused vs reference tp1 fp32 (forward)", errors, TOL_ANCHOR)
    assert all(v <= TOL_ANCHOR for v in errors.values()), errors  # NaN fails


@pytest.fixture(scope="module")
def zero_results():
    pytest.importorskip("deepspeed")
    per_rank = _spawn(_zero_worker, tuple(MODELS))
    for mixer in MODELS:  # the loss is TP-replicated: every rank must report the same numbers
        assert per_rank[1][mixer]["losses"] == per_rank[0][mixer]["losses"], mixer
    return per_rank[0]


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("mixer", list(MODELS))
def test_fused_tp2_equals_tp1(tp_results, mixer, sp):
    r = tp_results[(mixer, sp)]
    test = f"{mixer} fused {'tp2-sp' if sp else 'tp2'} vs tp1 fp32"
    print(f"INFO | {test} | shard {r['layout']} | {r['n_grads']} gradients")
    _report(test, r["errors"], TOL)
    assert r["n_grads"] > 10 and r["grad_max"] > 0
    bad = {k: v for k, v in r["errors"].items() if not v <= TOL}  # NaN fails
    assert not bad, f"{test}: over the bound {TOL}: {bad}"


@pytest.mark.parametrize("mixer", list(MODELS))
def test_zero2_tp2_equals_plain_tp1(zero_results, mixer):
    r = zero_results[mixer]
    test = f"{mixer} fused zero2 tp2xdp1 vs plain tp1 fp32, {STEPS} steps"
    print(f"INFO | {test} | losses {[f'{x:.6f}' for x in r['losses']]} | plain {[f'{x:.6f}' for x in r['ref_losses']]}")
    errors = {f"loss step {s + 1}": abs(a - b) / abs(b)
              for s, (a, b) in enumerate(zip(r["losses"], r["ref_losses"]))}
    norm_errors = {f"grad norm step {s + 1}": abs(a - b) / abs(b)
                   for s, (a, b) in enumerate(zip(r["norms"], r["ref_norms"]))}
    errors.update(norm_errors)
    _report(test, errors, TOL)
    assert r["ref_losses"][-1] < r["ref_losses"][0]  # it trains
    bad = {k: v for k, v in errors.items() if not v <= TOL}  # NaN fails
    assert not bad, f"{test}: over the bound {TOL}: {bad}"

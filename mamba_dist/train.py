"""Train a Mamba LM: the one training loop.

Run:
    mamba-dist train --config configs/tiny.yaml [key=value ...]
    python -m mamba_dist.train --config configs/tiny.yaml train.max_steps=200 optim.lr=1e-3
    torchrun --nproc_per_node 8 -m mamba_dist.train --config configs/mamba-130m.yaml data.path=/data/pile
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 --nproc_per_node 8 -m mamba_dist.train ...
    deepspeed --num_gpus 8 --module mamba_dist.train --config ... parallel.zero_stage=2      (or launch/*.sh)

One process, or one per device under torchrun or the deepspeed launcher (launch/ has torchrun, deepspeed and slurm
scripts): data parallel through torch DDP (gloo on CPU, nccl on GPU), or DeepSpeed ZeRO 1-3 with
parallel.zero_stage=1|2|3 (also on a single process); tensor (+ sequence) parallelism with parallel.tp.
Configuration is defaults <- YAML <- key=value overrides (mamba_dist/config.py); the resolved config is written to
<logging.run_dir>/config.yaml, metrics to <run_dir>/metrics.jsonl and <run_dir>/tensorboard, checkpoints to
<run_dir>/checkpoints (checkpoint.dir). `checkpoint.resume=auto` (default) continues from the latest complete
checkpoint there, bit-exactly on CPU.

`build_training` composes parallelism, AdamW and the schedule into one small object per path (`TorchPath`, or
`DeepSpeedPath` for ZeRO): it holds what differs between them (backward, optimizer step, checkpoint files).
`train_step` is the one training step; the loop below, the benchmarks (scripts/bench_*.py) and the tests call it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from mamba_dist import checkpoint as ckpt
from mamba_dist import faults, watchdog
from mamba_dist.config import Config, ConfigError, Derived, load_config, save_config, validate_runtime
from mamba_dist.metrics import MetricsLogger, measure_cpu_matmul_flops, memory_gb, read_jsonl
from mamba_dist.model.flops import flops_per_token, peak_flops_for

log = logging.getLogger("mamba_dist.train")


# ============================================================================================ setup (no process group)
def prepare_config(config_path: Optional[str], overrides: list[str],
                   world_size: int) -> tuple[Config, Derived, Optional[tuple[str, dict]]]:
    """Load and validate everything that can be checked before a process group exists: the config, the launch
    size, the prepared data's manifest, the parallel layout, and the checkpoint to resume from (if any).
    Returns (config, derived sizes, (checkpoint path, its meta) or None). Raises ConfigError or CheckpointError
    (one line, naming the field or file)."""
    cfg = load_config(config_path, overrides)
    derived = validate_runtime(cfg, world_size)
    _check_data(cfg, derived.dp_size)
    from mamba_dist.parallel.dims import ParallelLayoutError, check_model_layout

    try:
        check_model_layout(cfg.model.mamba_config_dict(), cfg.parallel.tp)
    except ParallelLayoutError as e:
        raise ConfigError(f"parallel.tp: {e}") from None
    if cfg.model.fused_ce is True and cfg.parallel.tp > 1:
        raise ConfigError("model.fused_ce: true needs parallel.tp=1 (under TP the loss is megatron's vocab-parallel "
                          "cross-entropy); use model.fused_ce=auto")
    if cfg.parallel.zero_stage > 0 and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"parallel.zero_stage: {cfg.parallel.zero_stage} needs DeepSpeed, which is not installed "
                          f"(pip install deepspeed, or use parallel.zero_stage=0 for DDP)")
    path = ckpt.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir)
    if path is None:
        return cfg, derived, None
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(path, meta, cfg.to_dict())
    zero_partitions = cfg.parallel.zero_stage > 0 and not meta.get("weights_only")  # weights only: any layout
    if zero_partitions and meta.get("world_size", world_size) != world_size:
        raise ckpt.CheckpointError(f"checkpoint {path} holds ZeRO partitions of {meta['world_size']} processes; "
                                   f"this run has {world_size} (resume a ZeRO run with the same number)")
    return cfg, derived, (path, meta)


def _check_data(cfg: Config, dp_size: int) -> None:
    from mamba_dist.data.loader import ManifestError, read_manifest
    from mamba_dist.data.mixture import data_sources

    sources = data_sources(cfg.data)
    mixture = bool(cfg.data.sources)
    need = cfg.train.micro_batch_size * max(1, dp_size)
    first, val_ok = None, False
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]" if mixture else "data.path"
        name = f"{key} ({src.name})" if mixture else key
        try:
            manifest = read_manifest(src.path)
        except ManifestError as e:
            raise ConfigError(f"{name}: {e}") from None
        if manifest["seq_len"] != cfg.data.seq_len:
            raise ConfigError(f"{name + ': ' if mixture else ''}data.seq_len: {cfg.data.seq_len} but {src.path} was "
                              f"prepared with seq_len={manifest['seq_len']} (set data.seq_len={manifest['seq_len']} "
                              f"or re-run prepare)")
        if first is not None and manifest["tokenizer"]["sha256"] != first[1]["tokenizer"]["sha256"]:
            raise ConfigError(f"{name}: prepared with tokenizer {manifest['tokenizer']['name']!r}, but "
                              f"{first[0]} with {first[1]['tokenizer']['name']!r}: all sources must share one")
        first = first or (name, manifest)
        vocab = manifest["tokenizer"].get("vocab_size", 0)
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the vocabulary of the "
                              f"data's tokenizer {manifest['tokenizer'].get('name')!r} ({vocab})")
        val_rows = manifest["splits"].get("val", {}).get("rows", 0)
        val_ok |= val_rows >= need
        if cfg.train.val_tokens and not mixture and val_rows < need:
            raise ConfigError(f"train.val_tokens: the val split of {src.path} has {val_rows} rows, fewer than one "
                              f"batch ({need}); set train.val_tokens=0 or prepare with a larger --val-fraction")
    if cfg.train.val_tokens and not val_ok:
        raise ConfigError(f"train.val_tokens: no data source has a val split of one batch ({need} rows); set "
                          f"train.val_tokens=0 or prepare with a larger --val-fraction")


def _setup_torch(cfg: Config) -> torch.device:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch sees no GPU")
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic mode
        torch.use_deterministic_algorithms(True, warn_only=use_cuda)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ============================================================================================ parallel hooks
def parallelize_model(model: torch.nn.Module, dims, cfg: Config, device: torch.device,
                      ddp: Optional[bool] = None) -> torch.nn.Module:
    """Tensor/sequence parallelism, activation recomputation and the DDP wrapper (mamba_dist.parallel's
    `parallelize`; ddp=False leaves it off: the path then averages the gradients itself). Returns the module to
    call in the loop."""
    from mamba_dist.parallel import parallelize

    return parallelize(model.to(device), dims, cfg, ddp=ddp)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from mamba_dist.parallel import unwrap as _unwrap

    return _unwrap(model)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on every parameter except the model's no_weight_decay() set."""
    from mamba_dist.parallel.zero import adamw_param_groups

    groups = adamw_param_groups(unwrap(model), cfg.optim.weight_decay)
    # on CUDA the fused kernel: a few launches for all parameters instead of a few per tensor (the foreach path
    # took 44 ms a step at 1.4B on an H200); ZeRO steps its own flat partitions with the default implementation
    fused = cfg.parallel.zero_stage == 0 and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             fused=fused or None)


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of optim.lr at optimizer step s (0-based): linear warmup, then decay to min_lr_ratio."""
    warmup, floor, kind = cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio, cfg.schedule.decay

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config,
                    derived: Derived, dims):
    """parallel.zero_stage 1-3: wrap model + AdamW + LR schedule in a DeepSpeed ZeRO engine, which then owns data
    parallelism, gradient accumulation (it divides the loss by grad_accum), clipping (optim.grad_clip, counting
    TP-replicated parameters once) and stepping the schedule. precision=bf16 is DeepSpeed's torch_autocast: fp32
    master weights and SSM parameters, bf16 matmuls. The schedule stays a LambdaLR over the client optimizer,
    whose param_group dicts ZeRO keeps, so both paths follow the same learning rates."""
    from mamba_dist.parallel import build_deepspeed_engine

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat our startup log per rank
    # DeepSpeed calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated in torch 2.13
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return build_deepspeed_engine(model, optimizer, dims, zero_stage=cfg.parallel.zero_stage,
                                  precision=cfg.precision.dtype, grad_clip=cfg.optim.grad_clip,
                                  micro_batch_size=cfg.train.micro_batch_size, grad_accum=derived.grad_accum,
                                  lr_scheduler=scheduler)


def _model_files(dims) -> tuple[str, str]:
    if dims.tp > 1:  # each TP rank holds a different shard
        return f"model-tp{dims.tp_rank:02d}.pt", f"optim-tp{dims.tp_rank:02d}.pt"
    return "model.pt", "optim.pt"


def load_weights(path: str, model, dims) -> None:
    """The model weights of a weights-only checkpoint (this TP rank's file), into the not yet wrapped model."""
    model_file, _ = _model_files(dims)
    ckpt.load_state_dict_strict(unwrap(model), ckpt.load_file(path, model_file), path)


class TorchPath:
    """The plain torch path (one process, or DDP over the DP group): the loop's backward, optimizer step and
    checkpoint files. The trainer clips (TP-aware), steps AdamW and the schedule itself."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: Config, dims):
        self.model, self.optimizer, self.scheduler, self.cfg, self.dims = model, optimizer, scheduler, cfg, dims

    def forward_backward(self, batch: tuple, grad_accum: int, amp: bool, fused_ce: bool) -> torch.Tensor:
        """Forward (bf16 autocast when amp) + loss + backward of one micro-batch (input_ids, labels, seq_idx);
        returns its mean loss (detached)."""
        ids, labels, seq_idx = batch
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=self.autocast_cache):
            loss = forward_loss(self.model, ids, labels, seq_idx, self.dims, fused_ce)
        if self.loss_fault is not None:  # test hook (faults.inject_test_faults): NaN or a spike
            loss = loss * self.loss_fault
        self.backward(loss, grad_accum)
        return loss.detach()

    autocast_cache = True  # autocast keeps bf16 weight copies within a forward (not allowed in a CUDA graph)
    loss_fault = None
    loss_limit = math.inf  # the loss-spike guard's bound for this step (faults.NonFiniteGuard.loss_limit)
    # data parallel without a DDP wrapper (CUDA graphs): step() averages the gradients over the DP group first
    reduce_in_step = False

    def no_sync(self, last: bool):
        """DDP skips the gradient all-reduce on the non-final micro-batches of an accumulation."""
        if last or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """Accumulate the gradient of one micro-batch's mean loss into the step's mean over grad_accum."""
        (loss / grad_accum).backward()

    def step(self, loss: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, bool]:
        """Clip, step, advance the schedule. Returns (grad norm before clipping, whether the step was applied): a
        non-finite gradient norm, or a non-finite loss (train_step's mean over the DP ranks, so non-finite on one
        rank is non-finite on all), skips the update (the loop counts and logs it) rather than poisoning the
        weights. Both are the same on every rank."""
        from mamba_dist.parallel.loss import clip_grad_norm_

        params = list(unwrap(self.model).parameters())
        if self.reduce_in_step:
            from mamba_dist.parallel.grads import all_reduce_grads_

            all_reduce_grads_(params, self.dims.dp_group, self.dims.dp)
        norm = clip_grad_norm_(params, self.cfg.optim.grad_clip, self.dims)
        finite = torch.isfinite(norm)
        if loss is not None:  # an inf loss can have finite gradients; train_step's is the DP mean: ranks agree
            finite = finite & torch.isfinite(loss.detach()).all() & (loss.detach() <= self.loss_limit).all()
        applied = bool(finite)
        if applied:
            self.optimizer.step()
        self.clear_grads()
        self.scheduler.step()
        return norm, applied

    def clear_grads(self) -> None:
        """After the update: the next backward starts from no gradient."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_files(self) -> dict:
        """{file name: state} this rank writes. Every DP replica holds the same state, so DP rank 0 (of each TP
        rank) writes it. (The state references the live tensors: checkpoint.async snapshots it.)"""
        if self.dims.dp_rank != 0:
            return {}
        model_file, optim_file = _model_files(self.dims)
        return {model_file: unwrap(self.model).state_dict(),
                optim_file: {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}}

    def save(self, tmp_dir: str) -> None:
        for name, state in self.state_files().items():
            ckpt.save_file(state, os.path.join(tmp_dir, name))

    def load(self, path: str) -> None:
        model_file, optim_file = _model_files(self.dims)
        ckpt.load_state_dict_strict(unwrap(self.model), ckpt.load_file(path, model_file), path)
        state = ckpt.load_file(path, optim_file)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit the optimizer: {e}") from None


DEEPSPEED_TAG = "zero"  # <checkpoint>/zero/: DeepSpeed's own sharded files (zero_to_fp32.py beside it reads them)


class DeepSpeedPath(TorchPath):
    """parallel.zero_stage 1-3: the DeepSpeed engine (`model`) owns data parallelism, accumulation, clipping,
    the optimizer and the schedule; every rank writes its partition."""

    state_files = None  # DeepSpeed writes its own files (collectively): no async save

    def no_sync(self, last: bool):
        return contextlib.nullcontext()  # the engine decides (its no_sync() refuses ZeRO-2/3)

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """engine.step() belongs after every engine.backward(): it counts micro-batches and runs the optimizer
        (reduce-scatter, clipping, AdamW, schedule) only at the accumulation boundary, after the last one."""
        self.model.backward(loss)
        self.model.step()

    def step(self, loss: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, bool]:
        norm = self.model.get_global_grad_norm()  # stepped in the last backward(); it skips non-finite steps
        return torch.as_tensor(float("nan") if norm is None else float(norm)), self.model.was_step_applied()

    def save(self, tmp_dir: str) -> None:
        """The engine's model-parallel / ZeRO partitions (optimizer and schedule included) under tmp_dir/zero; the
        trainer's atomic rename of tmp_dir covers them like any other file."""
        from mamba_dist.parallel import save_engine_checkpoint

        save_engine_checkpoint(self.model, tmp_dir, DEEPSPEED_TAG)  # ends with a barrier: every shard is written
        # DeepSpeed writes its shards itself (no writer to wrap), so they are hashed by reading them back, split
        # over the ranks (the same sorted list on every rank: shared filesystem)
        shards = sorted(os.path.join(r, n) for r, _, ns in os.walk(os.path.join(tmp_dir, DEEPSPEED_TAG)) for n in ns)
        ckpt.record_files(tmp_dir, shards[self.dims.rank::self.dims.world_size])

    def load(self, path: str) -> None:
        from mamba_dist.parallel import load_engine_checkpoint

        try:
            load_engine_checkpoint(self.model, path, tag=DEEPSPEED_TAG)
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ckpt.CheckpointError(f"checkpoint {path}: cannot load its DeepSpeed state ({first})") from None


class CudaGraphPath(TorchPath):
    """train.cuda_graphs: the plain path with each micro-batch's forward + loss + backward replayed as one CUDA
    graph, so the hundreds of small kernel launches of the Mamba-2 mixers (mamba_ssm's Triton SSD kernels, norms)
    cost no CPU time: at the 130M size the eager step leaves the GPU idle about half the time.

    Captured on the first micro-batch, after a few warm-up passes on a side stream (Triton autotuning, cuBLAS
    workspaces) whose gradients are discarded. Inputs are copied into static buffers. With one micro-batch per step
    the gradients are captured as the backward's own outputs, allocated from the graph's memory pool: each replay
    writes them afresh, with no zeroing and no accumulating pass over every parameter (at 1.4B those two passes
    move ~22 GB a step). With gradient accumulation they are static buffers the graph accumulates into (zeroed,
    not freed, after each update).
    The optimizer step, clipping and validation stay eager. Needs fixed shapes (the loader's are), no host sync
    in the forward (Mamba-2: none; fused Mamba-1: its packing (document starts, conv fix-up columns) lives in
    fixed-capacity device buffers, a StaticPacking, filled on the host before each replay and captured again,
    bigger, when a batch has more documents than it holds) and tp == 1 (see use_cuda_graphs). Several
    data-parallel replicas run without the DDP wrapper (its reducer hooks cannot be captured): step() averages the
    gradients over the DP group once per step (reduce_in_step)."""

    autocast_cache = False
    WARMUP = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph, self.static_batch, self.static_loss, self.key = None, None, None, None
        self.packing = None  # fused Mamba-1 only
        self.graph_writes_grads = False  # one micro-batch per step: the replay overwrites the gradients

    def clear_grads(self) -> None:
        # the buffers stay (the graph writes into them); zeroed only where the graph accumulates into them
        if not self.graph_writes_grads:
            self.optimizer.zero_grad(set_to_none=False)

    def forward_backward(self, batch: tuple, grad_accum: int, amp: bool, fused_ce: bool) -> torch.Tensor:
        key = (tuple(tuple(x.shape) for x in batch), grad_accum, amp, fused_ce)
        fits = self.graph is not None and key == self.key and (self.packing is None or self.packing.fill_(batch[2]))
        if not fits:
            self._capture(batch, grad_accum, amp, fused_ce)
            self.key = key
        for buf, x in zip(self.static_batch, batch):
            buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_loss.clone()  # the buffer is overwritten by the next replay

    def _capture(self, batch: tuple, grad_accum: int, amp: bool, fused_ce: bool) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # one micro-batch per step: every capture comes first in its step, so nothing is mid-accumulation (the
        # buffers may hold the previous replay's gradients: stale); with accumulation the sums so far are kept
        self.graph_writes_grads = grad_accum == 1
        kept = [] if self.graph_writes_grads else [p.grad.clone() if p.grad is not None else None for p in params]
        self.static_batch = [x.clone() for x in batch]
        from mamba_dist.model.ops.fused_mamba1 import static_packing_for

        self.packing = static_packing_for(self.model, self.static_batch[2])
        if self.packing is not None:
            self.packing.fill_(batch[2])  # sized for this batch: it fits
            self.packing.bind(self.static_batch[2])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                TorchPath.forward_backward(self, self.static_batch, grad_accum, amp, fused_ce)
        torch.cuda.current_stream().wait_stream(side)
        if self.graph_writes_grads:  # captured as the backward's outputs (AccumulateGrad takes them as .grad)
            for p in params:
                p.grad = None
        for p, g in zip(params, kept):  # the graph accumulates into these buffers; start from the kept sums
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(g) if g is not None else p.grad.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = TorchPath.forward_backward(self, self.static_batch, grad_accum, amp, fused_ce)


def use_cuda_graphs(cfg: Config, dims, device: torch.device, backend: str) -> bool:
    """train.cuda_graphs: auto = on with the fused kernels on CUDA, one data-parallel rank and tp == 1 (Mamba-2, and
    Mamba-1 through mamba1_inner's StaticPacking: on an H200 they gave Mamba-1 130M +29% and 370M +15%, 1.4B even);
    true forces it where it can run, false is eager."""
    ssm = cfg.model.ssm_cfg
    d_inner = int(ssm.get("expand", 2) * cfg.model.d_model)
    possible = (device.type == "cuda" and cfg.parallel.zero_stage == 0 and not dims.tp_enabled
                # Mamba-1's op-by-op path looks its document starts up on the host: only mamba1_inner captures,
                # and only within its kernels' limits (Mamba.forward takes the op-by-op path outside them)
                and (cfg.model.mixer == "Mamba2" or (ssm.get("use_fast_path", True) and d_inner % 8 == 0
                                                      and 2 <= ssm.get("d_conv", 4) <= 4)))
    if cfg.train.cuda_graphs == "auto":
        # several replicas: true captures too (gradients averaged once per step, no overlap with the backward);
        # auto waits for that to be measured on a multi-GPU machine
        possible = possible and not (dims.distributed and dims.dp > 1)
        # (recomputation inside a captured graph is not yet checked on a GPU: auto leaves that case eager)
        # hybrids stay eager too: flex_attention builds its block mask from each batch's seq_idx
        return possible and backend == "fused" and cfg.train.ac_fraction == 0 and not cfg.model.attn_layer_idx
    if cfg.train.cuda_graphs and not possible:
        log.warning("train.cuda_graphs=true needs CUDA, zero_stage 0, tp 1 and (Mamba-1) ssm_cfg.use_fast_path "
                    "with d_inner % 8 == 0 and d_conv 2..4; eager step")
    return bool(cfg.train.cuda_graphs) and possible


def build_training(model: torch.nn.Module, cfg: Config, derived: Derived, dims, device: torch.device,
                   init_weights: Optional[str] = None) -> TorchPath:
    """parallelize (-> the weights of a weights-only checkpoint `init_weights`) -> AdamW -> LR schedule
    (-> DeepSpeed engine): the path object the step runs on."""
    backend = getattr(model, "backend", None)
    graphs = use_cuda_graphs(cfg, dims, device, backend)  # never under ZeRO (its engine owns the step)
    replicas = dims.distributed and dims.dp > 1
    # a captured backward cannot run DDP's hooks: graphs over several replicas average the gradients in step()
    model = parallelize_model(model, dims, cfg, device, ddp=False if graphs and replicas else None)
    if init_weights is not None:
        load_weights(init_weights, model, dims)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, derived.total_steps))
    if cfg.parallel.zero_stage > 0:
        engine = build_deepspeed(model, optimizer, scheduler, cfg, derived, dims)
        return DeepSpeedPath(engine, optimizer, scheduler, cfg, dims)
    path = (CudaGraphPath if graphs else TorchPath)(model, optimizer, scheduler, cfg, dims)
    path.reduce_in_step = graphs and replicas
    return path


# ============================================================================================ the step
def describe_levers(training, fused_ce: bool, device: torch.device) -> str:
    """One line of the speed levers this run uses (logged at start): the step path, the loss, the mixers' fused
    functions. What the auto switches picked is then in the run's log, not to be guessed from the config."""
    from mamba_dist.model.mamba1 import Mamba
    from mamba_dist.model.mamba2 import Mamba2
    from mamba_dist.model.ops import xent_kernel

    model = unwrap(training.model)
    parts = [f"step {type(training).__name__}"]
    if fused_ce:
        parts.append("chunked lm_head + CE" + (" (Triton kernel)" if xent_kernel.available_on(device) else ""))
    else:
        parts.append("lm_head + CE on full logits")
    fused = [m for m in model.modules() if isinstance(m, (Mamba, Mamba2)) and m.backend == "fused"]
    inner = sum(1 for m in fused if m.use_inner_fn)
    if fused:
        name = "mamba1_inner" if isinstance(fused[0], Mamba) else "mamba_split_conv1d_scan_combined"
        parts.append(f"{name} in {inner} of {len(fused)} mixers")
        if inner:
            from mamba_dist.model.ops import fused_mamba2
            from mamba_dist.model.ops.fused_mamba1 import compile_enabled

            if isinstance(fused[0], Mamba2):
                parts.append("conv " + ("without seq_idx + fix-ups" if fused_mamba2.enabled() else "with seq_idx"))
            if isinstance(fused[0], Mamba) or fused_mamba2.enabled():
                parts.append("reset bookkeeping " + ("torch.compile'd" if compile_enabled(device) else "eager"))
    return "levers: " + ", ".join(parts)


def use_fused_ce(cfg: Config, dims, device: torch.device) -> bool:
    """model.fused_ce: auto = on with CUDA at tp == 1 (TP has megatron's vocab-parallel loss instead)."""
    if cfg.model.fused_ce == "auto":
        return device.type == "cuda" and not dims.tp_enabled
    return bool(cfg.model.fused_ce)


def forward_loss(model, ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor, dims,
                 fused_ce: bool) -> torch.Tensor:
    """Mean token loss of one micro-batch: the lm_head fused with the loss, or logits then (vocab-parallel) CE."""
    if fused_ce:
        return model(ids, seq_idx=seq_idx, labels=labels)
    from mamba_dist.parallel.loss import loss_fn

    return loss_fn(model(ids, seq_idx=seq_idx), labels, dims)


def mean_over_dp(x: torch.Tensor, dims) -> torch.Tensor:
    """The mean of a tensor over the data-parallel ranks (itself on one rank)."""
    if dims.distributed and dims.dp > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=dims.dp_group)
        x /= dims.dp
    return x


def train_step(path: TorchPath, micro_batches: list, dims, amp: bool,
               fused_ce: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step: forward (bf16 autocast when amp) + loss + backward over each (input_ids, labels,
    seq_idx) micro-batch on the device, then clip + update + schedule. The one step of the loop, the benchmarks
    and the tests. Returns (mean loss over the step's micro-batches and the DP ranks (device tensor), grad norm,
    whether the update was applied)."""
    n = len(micro_batches)
    loss_sum = None
    for i, batch in enumerate(micro_batches):
        with path.no_sync(last=i == n - 1):
            loss = path.forward_backward(batch, n, amp, fused_ce).float()
        loss_sum = loss if loss_sum is None else loss_sum + loss
    loss = mean_over_dp(loss_sum / n, dims)  # one reduction: the skip decision and the logged loss share it
    grad_norm, applied = path.step(loss)
    return loss, grad_norm, applied


# ============================================================================================ the loop
@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all ranks)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm


class StopRequest:
    """SIGTERM / SIGUSR1 (a scheduler's preemption notice, or torchrun passing one on): finish the current step,
    save a checkpoint and return. Ranks may receive the signal at different steps, so they agree on it with an
    all-reduce each step before anyone starts the (collective) save."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, dims, device: torch.device) -> bool:
        if not dims.distributed:
            return bool(self.received)
        import torch.distributed as dist

        flag = torch.tensor([float(bool(self.received))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def restore(path: str, meta: dict, training: TorchPath, train_loader, dims, world_size: int) -> Progress:
    """Load a checkpoint into the built model, optimizer, schedule and loader; returns the progress it records."""
    training.load(path)
    if meta["world_size"] == world_size:
        rank_state = ckpt.load_rank_state(path, dims.rank)
        ckpt.set_rng_state(rank_state["rng"])
    else:
        # Another number of data-parallel ranks: the loader position is global (every rank's file holds the same
        # one); per-rank RNG streams cannot be mapped and stay as seeded (training draws no random numbers).
        rank_state = ckpt.load_rank_state(path, 0)
        if dims.rank == 0:
            log.warning("checkpoint written by %d processes, resuming on %d: RNG states are not restored",
                        meta["world_size"], world_size)
    try:
        train_loader.load_state_dict(rank_state["loader"])
    except ValueError as e:
        raise ckpt.CheckpointError(f"checkpoint {path}: {e}") from None
    return Progress(step=meta["step"], tokens=meta["tokens"], skipped=meta.get("skipped", 0))


def _forever(loader) -> Iterator[dict]:
    """The loader's batches across epochs (it moves to the next epoch by itself at the end of one)."""
    while True:
        yield from loader


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb = device.type == "cuda"
    return (batch["input_ids"].to(device, non_blocking=nb), batch["labels"].to(device, non_blocking=nb),
            batch["seq_idx"].to(device, non_blocking=nb))


def _packed_attention_flops(flops, host_batches: list, cfg: Config):
    """Attention layers' FLOPs depend on the documents packed into each row (the mask's share): count them at this
    step's rows (this rank's, read from the host copies of seq_idx). Pure-Mamba models: unchanged."""
    if not cfg.model.attn_layer_idx:
        return flops
    from mamba_dist.model.flops import attention_context
    from mamba_dist.model.packing import doc_lengths

    rows = [n for b in host_batches for n in doc_lengths(b["seq_idx"])]
    return flops.with_attention_context(attention_context(cfg.data.seq_len, rows,
                                                          cfg.model.attn_cfg.get("causal", True)))


@torch.no_grad()
def evaluate(model, loader, start_state: dict, n_batches: int, dims, device, amp: bool, fused_ce: bool) -> float:
    """Mean validation loss over the same first `n_batches` batches of the val split every time."""
    model.eval()
    loader.load_state_dict(start_state)
    total = torch.zeros((), device=device)
    n = 0
    for batch in loader:
        ids, labels, seq_idx = _to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total += forward_loss(model, ids, labels, seq_idx, dims, fused_ce).float()
        n += 1
        if n >= n_batches:
            break
    model.train()
    return mean_over_dp(total / max(n, 1), dims).item()


def _peak_flops(cfg: Config, device: torch.device) -> Optional[float]:
    if cfg.logging.peak_flops > 0:
        return cfg.logging.peak_flops
    if device.type == "cuda":
        peak = peak_flops_for(torch.cuda.get_device_name(device), cfg.precision.dtype)
        if peak is None:
            log.warning("no peak FLOP/s known for %s: set logging.peak_flops to log MFU",
                        torch.cuda.get_device_name(device))
        return peak
    return measure_cpu_matmul_flops()


def train(cfg: Config, derived: Derived, resume: Optional[tuple[str, dict]] = None) -> dict:
    """Run training to the end, from scratch or from `resume` = (checkpoint dir, its meta) as checked by
    prepare_config; returns a summary (first/last validation loss, steps, paths)."""
    from mamba_dist.data.mixture import build_train_loader, build_val_loaders
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.parallel.ac import selected_layers
    from mamba_dist.parallel.dims import ParallelDims

    device = _setup_torch(cfg)
    backend = None if cfg.parallel.dist_backend == "auto" else cfg.parallel.dist_backend
    run_dir, ckpt_dir = cfg.logging.run_dir, cfg.checkpoint_dir
    # beats before the process group exists; watches the ring neighbours once it does (hangs: a named rank, exit 4)
    heartbeat = watchdog.start(run_dir, cfg.parallel.timeout_s, cfg.parallel.heartbeat)
    dims = ParallelDims.from_env(cfg.parallel).build(backend=backend, timeout_minutes=cfg.parallel.timeout_s / 60,
                                                     single_rank_group=cfg.parallel.zero_stage > 0)
    rank0 = dims.rank == 0
    metrics, peers_lost = None, False
    stop_request = StopRequest()
    try:
        watchdog.arm_collectively(heartbeat)
        if rank0 and (left := ckpt.remove_leftovers(ckpt_dir)):  # an earlier attempt was killed mid-save
            log.info("removed %s left in %s by an interrupted save", ", ".join(left), ckpt_dir)
        if rank0:
            save_config(cfg, os.path.join(run_dir, "config.yaml"))
        _seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend=cfg.model.backend)
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(cfg.model.mamba_config_dict(), cfg.data.seq_len)
        n_recomputed = len(selected_layers(cfg.model.n_layer, cfg.train.ac_fraction))
        init_from = None
        if resume is not None and resume[1].get("weights_only"):
            # `mamba-dist convert import|reshard` output: weights for a new run, loaded into the parallelized
            # model before the optimizer and DeepSpeed see the parameters; optimizer, schedule and data order
            # start fresh
            init_from, resume = resume[0], None
        training = build_training(model, cfg, derived, dims, device, init_weights=init_from)
        model, optimizer = training.model, training.optimizer
        amp = cfg.precision.dtype == "bf16"
        fused_ce = use_fused_ce(cfg, dims, device)

        loader_kw = dict(micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                         dp_rank=dims.dp_rank, dp_size=dims.dp, seed=cfg.seed, tokenizer=cfg.data.tokenizer,
                         skip_corrupt=cfg.data.skip_corrupt)
        train_loader = build_train_loader(cfg.data, num_workers=cfg.data.num_workers, **loader_kw)
        # (name, weight, loader, start state) per source; a mixture logs val/<name>/loss and their weighted mean
        val_loaders = (build_val_loaders(cfg.data, cfg.train.micro_batch_size * dims.dp, **loader_kw)
                       if derived.val_batches else [])

        resume_from, meta = resume or (None, None)
        prog = Progress()
        if resume_from is not None:
            prog = restore(resume_from, meta, training, train_loader, dims, derived.world_size)

        metrics = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.jsonl, enabled=rank0,
                                resume_step=prog.step if resume_from else None)
        peak = _peak_flops(cfg, device) if rank0 else None
        if rank0:
            log.info("model: %s, %.2fM parameters, backend %s; %d ranks (dp %d, tp %d), grad accumulation %d, "
                     "%d steps of %d tokens; %.3g training GFLOPs/token", cfg.model.mixer, n_params / 1e6,
                     getattr(unwrap(model), "backend", "?"), derived.world_size, dims.dp, dims.tp,
                     derived.grad_accum, derived.total_steps, cfg.train.global_batch_tokens, flops.train() / 1e9)
            log.info("%s", describe_levers(training, fused_ce, device))
            if resume_from:
                log.info("resumed from %s (step %d, %d tokens)", resume_from, prog.step, prog.tokens)
                metrics.event(prog.step, "resume", checkpoint=resume_from)
            elif init_from:
                log.info("initialised from the weights in %s (no optimizer state: the optimizer, LR schedule and "
                         "data order start fresh)", init_from)
                metrics.event(0, "start", world_size=derived.world_size, params=n_params, init_from=init_from)
            else:
                metrics.event(0, "start", world_size=derived.world_size, params=n_params)

        def validate():
            if not val_loaders:
                return None
            per = {name: (w, evaluate(model, ld, start, derived.val_batches, dims, device, amp, fused_ce))
                   for name, w, ld, start in val_loaders}
            v = sum(w * x for w, x in per.values()) / sum(w for w, _ in per.values())
            metrics.log(prog.step, "val", {"val_loss": v, **({f"{n}/loss": x for n, (_, x) in per.items()}
                                                              if cfg.data.sources else {})})
            return v

        sync = faults.sync_any(dims, device)
        guard = faults.guard_for(cfg.train, meta)  # skipped-step counts (and the loss-spike window) continue
        saver = None
        if cfg.checkpoint.async_ and training.state_files is None:
            log.warning("checkpoint.async=true is not supported under DeepSpeed ZeRO; checkpoints are synchronous")
        elif cfg.checkpoint.async_:
            from mamba_dist.async_checkpoint import AsyncCheckpointer

            saver = AsyncCheckpointer(ckpt_dir, dims.rank, sync, cfg.checkpoint.keep_last)

        def write(tmp):
            training.save(tmp)
            ckpt.fault_point(f"checkpoint_write_{prog.step}")  # crash tests: model saved, rest not yet
            ckpt.save_rank_state(tmp, dims.rank, train_loader.state_dict())

        def save():
            faults.check_before_save(training.optimizer, sync, prog.step, ckpt_dir)  # never save NaNs
            meta = {"tokens": prog.tokens, "skipped": prog.skipped, **guard.state(),
                    "world_size": derived.world_size, "config": cfg.to_dict()}
            if saver is not None:  # snapshot now, write in the background, commit in a later poll()
                files = {**training.state_files(), ckpt.rank_file(dims.rank): ckpt.rank_state(
                    train_loader.state_dict())}
                return finish_save(lambda: saver.start(prog.step, files, meta))
            finish_save(lambda: ckpt.save_checkpoint(ckpt_dir, prog.step, dims.rank, write, meta, sync,
                                                     cfg.checkpoint.keep_last))

        def finish_save(commit):
            """Run a save or an async commit; log its outcome; a failure follows checkpoint.on_error."""
            step = saver.pending_step if saver is not None and saver.pending_step is not None else prog.step
            try:
                path = commit()
            except ckpt.CheckpointWriteError as e:
                metrics.event(step, "checkpoint_failed", error=str(e))
                faults.handle_save_error(e, cfg.checkpoint.on_error)
                return
            if path is not None:
                metrics.event(step, "checkpoint", path=path)

        from tqdm import tqdm

        bar = tqdm(total=derived.total_steps, initial=prog.step, unit="step", dynamic_ncols=True,
                   disable=not (rank0 and cfg.logging.progress), desc="train")
        last_val = validate() if prog.step == 0 else None
        batches = _forever(train_loader)
        model.train()
        while prog.step < derived.total_steps:
            heartbeat.step = prog.step  # steps done (its file says where a silent rank stopped)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # this step's (DeepSpeed advances it inside the last backward)
            host_batches = [next(batches) for _ in range(derived.grad_accum)]
            micro_batches = [_to_device(b, device) for b in host_batches]
            faults.inject_test_faults(training, prog.step + 1)
            training.loss_limit = guard.loss_limit()  # inf unless train.spike_factor
            loss, grad_norm, applied = train_step(training, micro_batches, dims, amp, fused_ce)
            prog.step += 1
            prog.tokens += cfg.train.global_batch_tokens
            prog.skipped += not applied
            loss_val = loss.item()  # already the mean over DP ranks
            dt = time.perf_counter() - t0
            tok_s = cfg.train.global_batch_tokens / dt
            if rank0 and (prog.step % cfg.logging.log_every == 0 or prog.step == derived.total_steps):
                rec = {"loss": loss_val, "lr": lr, "grad_norm": grad_norm.item(), "tokens": prog.tokens,
                       "skipped": not applied, "skipped_total": prog.skipped,
                       "tokens_per_s": tok_s, "step_time_s": dt, **memory_gb(device)}
                if hasattr(train_loader, "source_epochs"):  # a mixture: the epoch each source is in
                    rec.update({f"{n}/epoch": e for n, e in train_loader.source_epochs().items()})
                if peak:
                    step_flops = _packed_attention_flops(flops, host_batches, cfg)
                    rec["mfu"] = step_flops.train() * tok_s / (peak * derived.world_size)
                    rec["hfu"] = step_flops.hardware(n_recomputed) * tok_s / (peak * derived.world_size)
                metrics.log(prog.step, "train", rec)
            guard.update(prog.step, applied, loss_val, grad_norm.item(), prog.skipped,
                         training.loss_limit)  # raises RunHalted
            if saver is not None:
                finish_save(saver.poll)  # commits the async save in flight once every rank has written it
            ckpt.fault_point(f"after_step_{prog.step}")
            end = prog.step == derived.total_steps
            stop = stop_request.agreed(dims, device)
            if (cfg.train.val_every and prog.step % cfg.train.val_every == 0) or (end and not stop):
                last_val = validate()
            if (cfg.checkpoint.every and prog.step % cfg.checkpoint.every == 0) or end or stop:
                save()
            bar.set_postfix_str(f"loss {loss_val:.4f}" + (f" val {last_val:.4f}" if last_val is not None else "")
                                + f" {tok_s:,.0f} tok/s", refresh=False)
            bar.update(1)
            if stop and not end:
                log.warning("stopping at step %d on a termination signal; checkpoint saved, run again to resume",
                            prog.step)
                break
        if saver is not None:
            finish_save(saver.wait)  # the last checkpoint is complete before train() returns
        bar.close()
        summary = {"run_dir": run_dir, "steps": prog.step, "tokens": prog.tokens, "checkpoint_dir": ckpt_dir,
                   "tensorboard": metrics.tb_dir if cfg.logging.tensorboard else None}
        if rank0 and cfg.logging.jsonl:
            vals = read_jsonl(metrics.jsonl_path, "val", last_run=True)
            if vals:
                summary.update(first_val=(vals[0]["step"], vals[0]["val_loss"]),
                               last_val=(vals[-1]["step"], vals[-1]["val_loss"]))
        return summary
    except RuntimeError as e:
        if watchdog.is_collective_failure(e):  # a peer died, stopped or hangs: one line naming it, exit code 4
            peers_lost = True
            raise watchdog.collective_failure(e, heartbeat, cfg.parallel.timeout_s) from None
        raise
    finally:
        stop_request.restore()
        if metrics is not None:
            metrics.close()
        heartbeat.stop()
        dims.destroy(barrier=not peers_lost)


# ============================================================================================ entry point
def _user_errors() -> tuple:
    """Exceptions that mean bad input (config, data, checkpoint), reported as one line without a traceback."""
    from mamba_dist.data.loader import ManifestError, ShardError
    from mamba_dist.data.tokenizer import TokenizerError
    from mamba_dist.parallel.dims import ParallelLayoutError

    return (ConfigError, ckpt.CheckpointError, ManifestError, ShardError, TokenizerError, ParallelLayoutError)


def _setup_logging(rank: int) -> None:
    """Our INFO messages on rank 0 only; other libraries stay at their (WARNING) default."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S"))
    pkg = logging.getLogger("mamba_dist")
    pkg.handlers[:] = [handler]
    pkg.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    pkg.propagate = False
    # megatron-core warns at import that optional CUDA extensions are absent; irrelevant to this loop.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-dist train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides are dotted config keys, e.g. optim.lr=3e-4 train.max_steps=1000 "
                                       "model.ssm_cfg.d_state=32 checkpoint.resume=none")
    p.add_argument("--config", "-c", default=None, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the YAML")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same, so it is ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    _setup_logging(rank)
    user_errors = _user_errors()
    try:
        cfg, derived, resume = prepare_config(args.config, args.overrides, int(os.environ.get("WORLD_SIZE", 1)))
        summary = train(cfg, derived, resume)
    except watchdog.PeerFailure:  # each surviving rank has said what it saw; the launcher may restart the job
        return watchdog.PEER_EXIT_CODE
    except faults.RunHalted as e:  # every rank raises it; one line per node
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"mamba-dist train: error: {e}", file=sys.stderr)
        return faults.HALT_EXIT_CODE
    except user_errors as e:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"mamba-dist train: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"{'done' if summary['steps'] == derived.total_steps else 'stopped early'}: {summary['steps']} steps, "
              f"{summary['tokens']:,} tokens; run dir {summary['run_dir']}")
        if "first_val" in summary:
            (s0, v0), (s1, v1) = summary["first_val"], summary["last_val"]
            print(f"validation loss: first {v0:.4f} (step {s0}), last {v1:.4f} (step {s1})")
        if summary["tensorboard"]:
            print(f"TensorBoard logs: {summary['tensorboard']}  (view: tensorboard --logdir {summary['tensorboard']})")
        print(f"checkpoints: {summary['checkpoint_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

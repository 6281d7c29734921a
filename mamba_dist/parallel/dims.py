"""ParallelDims: the one object that owns the parallel degrees (tp x dp) and their process groups.

Ranks are laid out as megatron-core lays them out ("tp-cp-ep-dp-pp" order): the tp ranks of one model replica
are consecutive global ranks, so under torchrun / the deepspeed launcher a TP group stays inside one node whenever
tp divides the number of processes per node. The process groups themselves come from megatron-core's
`parallel_state.initialize_model_parallel`, which runs on CPU/gloo as well as on NCCL.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class ParallelLayoutError(ValueError):
    """An impossible parallel layout; the message is one line naming the offending sizes."""


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> "dist.Store":
    """The launcher's TCP store (what init_process_group's env:// would connect to), with keys prefixed by the
    restart attempt. torchrun's agent keeps one store for the whole job (static rendezvous; c10d too while it shares
    its store), so after `--max-restarts` a new attempt's ranks could read the gloo/NCCL addresses the killed
    attempt published under the same keys, and fail to connect (pytorch/pytorch#135712, seen here on one node).
    The restart count is the same on every rank of a node's attempt (one agent restarts them together)."""
    addr, port, rank = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 29500), _env_int("RANK", 0)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent hosts it; every rank is a client
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"mamba-dist/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@dataclass
class ParallelDims:
    """Parallel degrees. `dp=-1` means "whatever is left": world_size // tp.

    `sequence_parallel` shards the hidden states along the sequence between blocks (needs tp > 1 to matter).
    Construct with `ParallelDims(tp=2, world_size=4)` or `ParallelDims.from_env(cfg)`, then `.build()` to create
    the process groups. Sizes are validated in `__post_init__`, before any process group exists.
    """

    tp: int = 1
    dp: int = -1
    sequence_parallel: bool = False
    world_size: int = 1
    # filled by build()
    tp_group: Any = field(default=None, repr=False, compare=False)
    dp_group: Any = field(default=None, repr=False, compare=False)
    built: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ParallelLayoutError(f"parallel.tp must be a positive integer, got {self.tp!r}")
        if self.world_size < 1:
            raise ParallelLayoutError(f"world size must be >= 1, got {self.world_size}")
        if self.world_size % self.tp != 0:
            raise ParallelLayoutError(f"world size {self.world_size} is not divisible by tp={self.tp}")
        if self.dp == -1:
            self.dp = self.world_size // self.tp
        if self.dp < 1 or self.dp * self.tp != self.world_size:
            raise ParallelLayoutError(
                f"tp={self.tp} x dp={self.dp} = {self.tp * self.dp} does not equal the world size {self.world_size}")
        if self.sequence_parallel and self.tp == 1:
            log.warning("sequence_parallel has no effect at tp=1; disabling it")
            self.sequence_parallel = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_env(cls, cfg: Any = None, **overrides) -> "ParallelDims":
        """Degrees from a config section (attributes `tp`, `dp`, `sequence_parallel`; any missing take defaults)
        and the world size from the initialized process group or the launcher's WORLD_SIZE (torchrun and the
        deepspeed launcher set it; 1 without a launcher)."""
        vals = {k: getattr(cfg, k) for k in ("tp", "dp", "sequence_parallel") if cfg is not None and hasattr(cfg, k)}
        vals.update(overrides)
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        else:
            world = _env_int("WORLD_SIZE", 1)
        return cls(world_size=world, **vals)

    def build(self, backend: Optional[str] = None, timeout_minutes: float = 30,
              single_rank_group: bool = False) -> "ParallelDims":
        """Initialize torch.distributed (if the launcher has not) and the megatron-core TP/DP groups.

        With a single process nothing is initialized (the model runs unchanged) unless `single_rank_group`:
        DeepSpeed needs a process group even for one process (ZeRO on a single GPU), so one is made from an
        in-process store (no launcher, no port).
        """
        if self.built:
            return self
        initialized = dist.is_available() and dist.is_initialized()
        if self.world_size == 1 and not initialized and not single_rank_group:
            self.built = True
            return self
        if not initialized:
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
            timeout = datetime.timedelta(minutes=timeout_minutes)
            if self.world_size == 1 and "MASTER_ADDR" not in os.environ:
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)
            elif "TORCHELASTIC_RESTART_COUNT" in os.environ and "MASTER_ADDR" in os.environ:
                dist.init_process_group(backend=backend, store=_attempt_store(self.world_size, timeout),
                                        rank=_env_int("RANK", 0), world_size=self.world_size, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout)
        if dist.get_world_size() != self.world_size:
            raise ParallelLayoutError(
                f"process group has {dist.get_world_size()} ranks but ParallelDims was built for {self.world_size}")
        local = _env_int("LOCAL_WORLD_SIZE", self.world_size)
        if self.tp > local:
            log.warning("tp=%d spans more than one node (%d processes per node): TP collectives cross the network",
                        self.tp, local)
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        # gloo duplicates of the groups are only used by megatron's own distributed optimizer, which we don't use.
        ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, create_gloo_process_groups=False,
                                     distributed_timeout_minutes=timeout_minutes)  # a timedelta: fractions are fine
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.built = True
        return self

    def destroy(self, barrier: bool = True) -> None:
        """Tear down groups and the process group. The barrier first keeps ranks from exiting while a peer is
        still inside a collective (gloo ranks sometimes abort otherwise); barrier=False after a failed collective
        (a lost peer would make the barrier fail or wait out the timeout)."""
        if dist.is_available() and dist.is_initialized():
            from megatron.core import parallel_state as ps

            if barrier:
                dist.barrier()
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()
        self.tp_group = self.dp_group = None
        self.built = False

    # ---------------------------------------------------------------- queries
    @property
    def distributed(self) -> bool:
        return self.tp_group is not None

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group) if self.distributed else 0

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group) if self.distributed else 0

    # ---------------------------------------------------------------- model layout checks
    def check_model(self, model_config: Any) -> None:
        """Raise a one-line ParallelLayoutError if `model_config` (a MambaConfig or its dict) cannot be split
        over tp ranks. Callable before any process group exists (the trainer's config validation)."""
        check_model_layout(model_config, self.tp)


def _cfg_get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def check_model_layout(model_config: Any, tp: int) -> None:
    """Divisibility rules for tensor parallelism, from the model config alone (mamba_ssm defaults for missing
    ssm_cfg keys). The TP code re-checks the same rules on the built mixers' attributes."""
    if tp == 1:
        return
    d_model = _cfg_get(model_config, "d_model")
    vocab = _cfg_get(model_config, "vocab_size")
    mult = _cfg_get(model_config, "pad_vocab_size_multiple", 8) or 1
    padded = vocab + (-vocab % mult)
    if padded % tp:
        raise ParallelLayoutError(
            f"padded vocab size {padded} is not divisible by tp={tp}; set pad_vocab_size_multiple to a multiple of {tp}")
    ssm = dict(_cfg_get(model_config, "ssm_cfg", None) or {})
    layer = ssm.get("layer", "Mamba1")
    expand = ssm.get("expand", 2)
    d_inner = expand * d_model
    if layer == "Mamba1":
        check_mamba1_tp(d_inner, tp)
    elif layer == "Mamba2":
        headdim = ssm.get("headdim", 64)
        ngroups = ssm.get("ngroups", 1)
        d_ssm = ssm.get("d_ssm") or d_inner
        check_mamba2_tp(d_ssm, d_ssm // headdim, ngroups, tp)
    else:
        raise ParallelLayoutError(f"ssm_cfg.layer={layer!r} is not Mamba1 or Mamba2")
    d_intermediate = _cfg_get(model_config, "d_intermediate", 0) or 0
    if d_intermediate:
        hidden = -(-d_intermediate // 128) * 128  # GatedMLP rounds its hidden size up to a multiple of 128
        if hidden % tp:
            raise ParallelLayoutError(f"tp={tp} does not divide the MLP hidden size {hidden}")
    if _cfg_get(model_config, "attn_layer_idx", None):
        attn = dict(_cfg_get(model_config, "attn_cfg", None) or {})
        num_heads = attn.get("num_heads", 1)
        num_heads_kv = attn.get("num_heads_kv") or num_heads
        check_attention_tp(num_heads, num_heads_kv, -(-attn.get("mlp_dim", 0) // 256) * 256, tp)


def check_attention_tp(num_heads: int, num_heads_kv: int, mlp_dim: int, tp: int) -> None:
    """Attention layers split by head: every TP rank holds whole kv heads and the query heads that read them."""
    if num_heads_kv % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide the attention layers' num_heads_kv={num_heads_kv} "
                                  f"(model.attn_cfg.num_heads_kv: each rank holds whole kv heads)")
    if num_heads % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide the attention layers' num_heads={num_heads}")
    if (mlp_dim // 2) % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide the attention layers' MLP width {mlp_dim // 2}")


def check_mamba1_tp(d_inner: int, tp: int) -> None:
    if d_inner % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide Mamba-1 d_inner={d_inner}")


def check_mamba2_tp(d_ssm: int, nheads: int, ngroups: int, tp: int) -> None:
    if ngroups % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide Mamba-2 ngroups={ngroups}")
    if nheads % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide Mamba-2 nheads={nheads}")
    if d_ssm % tp:
        raise ParallelLayoutError(f"tp={tp} does not divide Mamba-2 d_ssm={d_ssm}")


# --------------------------------------------------------------------------------------------- megatron-free helpers
# (here rather than in layers.py / tp.py, which import megatron-core: a tp == 1 run never needs it)

def is_tp_sharded(param) -> bool:
    """Whether a parameter is a tensor-parallel shard (layers.mark_tp sets the attribute megatron reads)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def unwrap(model):
    """The model under DDP / DeepSpeed wrappers."""
    import torch.nn as nn

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


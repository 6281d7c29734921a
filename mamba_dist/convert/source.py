"""Read any training checkpoint as the single-process (TP=1, mamba_ssm-named) model: plain or DDP, TP = 1/2/4/...,
DeepSpeed ZeRO stage 1/2/3 over any DP.

ZeRO partitions are merged by DeepSpeed's own consolidation (deepspeed.utils.zero_to_fp32). Its public entry point
handles one model-parallel rank only (it counts every `*_optim_states.pt` file of the directory as a DP
partition), so under TP it is run once per TP rank on a directory holding that rank's files (symlinks); the TP
shards are then joined by the layout of `layout.shard_specs`. The AdamW moments (for `reshard --keep-optimizer`)
sit in the same flat partitions as the fp32 weights; they are unflattened by the same DeepSpeed functions, handed
the moment partitions in place of the weight partitions.

Memory: checkpoint files are memory-mapped (torch.load(mmap=True)) and tensors are produced one at a time, so a
conversion holds at most one full copy of the model (its output) in memory.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from mamba_dist import checkpoint as ckpt
from mamba_dist.model import MambaConfig

from . import layout

ZERO_TAG = "zero"  # train.DEEPSPEED_TAG (not imported: train.py pulls in the whole trainer)


class ConvertError(ValueError):
    """Input a conversion cannot use; the message is one line naming the problem."""


@dataclass
class Checkpoint:
    path: str  # the step directory
    meta: dict
    config: Any  # mamba_dist.config.Config (defaults for what the checkpoint does not record)
    model_config: MambaConfig
    tp: int
    zero_stage: int

    @property
    def is_zero(self) -> bool:
        return os.path.isdir(os.path.join(self.path, ZERO_TAG))

    @property
    def weights_only(self) -> bool:
        return bool(self.meta.get("weights_only"))


def open_checkpoint(path: str) -> Checkpoint:
    """A step directory, or a checkpoint directory (its latest complete step)."""
    from mamba_dist.config import ConfigError, config_from_dict

    if not os.path.isdir(path):
        raise ConvertError(f"checkpoint {path} does not exist")
    if not os.path.isfile(os.path.join(path, ckpt.META)):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ConvertError(f"{path} is neither a checkpoint step directory (no {ckpt.META}) nor a checkpoint "
                               f"directory holding a complete step_* checkpoint")
        path = latest
    try:
        meta = ckpt.read_meta(path)
    except ckpt.CheckpointError as e:
        raise ConvertError(str(e)) from None
    try:
        cfg = config_from_dict(meta.get("config", {}), validate=False)
    except ConfigError as e:
        raise ConvertError(f"checkpoint {path}: its recorded config is invalid ({e})") from None
    return Checkpoint(path, meta, cfg, cfg.model.to_mamba_config(), int(cfg.parallel.tp),
                      int(cfg.parallel.zero_stage))


# --------------------------------------------------------------------------------------------- per-TP-rank dicts
def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip/pickle errors have many types; all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"cannot read {path} ({first})") from None


def _plain_model_file(ck: Checkpoint, r: int) -> str:
    return os.path.join(ck.path, f"model-tp{r:02d}.pt" if ck.tp > 1 else "model.pt")


@contextlib.contextmanager
def _one_mp_rank(ck: Checkpoint, r: int):
    """A temporary checkpoint directory `<tmp>/zero/` holding (as symlinks) only TP rank r's DeepSpeed files, the
    layout zero_to_fp32 reads."""
    src = os.path.join(ck.path, ZERO_TAG)
    files = [f for f in os.listdir(src) if re.search(rf"(^|_)mp_rank_{r:02d}_", f)]
    if not files:
        raise ConvertError(f"checkpoint {ck.path}: no DeepSpeed files of TP rank {r} in {ZERO_TAG}/")
    with tempfile.TemporaryDirectory(prefix="mamba-dist-zero-") as tmp:
        os.makedirs(os.path.join(tmp, ZERO_TAG))
        for f in files:
            os.symlink(os.path.join(os.path.abspath(src), f), os.path.join(tmp, ZERO_TAG, f))
        yield tmp


def _quiet():
    """zero_to_fp32 prints a report per call on stdout (which `generate` uses for its text)."""
    return contextlib.redirect_stdout(io.StringIO())


def _zero_rank_state(ck: Checkpoint, r: int) -> dict:
    from mamba_dist.parallel.zero import _import_deepspeed

    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _one_mp_rank(ck, r) as tmp, _quiet():
        try:
            # lazy: ZeRO-3 parameters stay views into the (memory-mapped) partitions until asked for
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ZERO_TAG, lazy_mode=True)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConvertError(f"checkpoint {ck.path}: DeepSpeed cannot consolidate TP rank {r} ({first})") from None


def _rank_states(ck: Checkpoint) -> list[dict]:
    if ck.is_zero:
        return [_zero_rank_state(ck, r) for r in range(ck.tp)]
    return [_load(_plain_model_file(ck, r)) for r in range(ck.tp)]


def _materialize(t) -> torch.Tensor:
    return t.contiguous() if not torch.is_tensor(t) else t  # DeepSpeed's lazy GatheredTensor -> tensor


def iter_full_state(ck: Checkpoint, progress: bool = True, desc: str = "consolidate",
                    ranks: Optional[list] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32/saved-dtype tensor) for every tensor of the model, in state-dict order, one at a time.
    `ranks`: the per-TP-rank state dicts, when a caller reads the checkpoint several times (`reader`)."""
    from tqdm import tqdm

    specs = layout.shard_specs(ck.model_config)
    shapes = layout.full_shapes(ck.model_config)
    ranks = _rank_states(ck) if ranks is None else ranks
    tied = ck.model_config.tie_embeddings
    for name in tqdm(list(specs), desc=desc, unit="tensor", disable=not progress, leave=False):
        key = "backbone.embedding.weight" if (tied and name == "lm_head.weight") else name
        if any(key not in sd for sd in ranks):
            raise ConvertError(f"checkpoint {ck.path}: tensor {name} is missing")
        full = layout.unshard([_materialize(sd[key]) for sd in ranks], specs[name])
        if tuple(full.shape) != shapes[name]:
            raise ConvertError(f"checkpoint {ck.path}: {name} has shape {tuple(full.shape)}, the model config "
                               f"says {shapes[name]}")
        yield name, full


def reader(ck: Checkpoint, progress: bool = True, desc: str = "consolidate"):
    """A callable giving a fresh `iter_full_state` each time, over per-rank dicts loaded once (memory-mapped
    files; DeepSpeed's merged ZeRO partitions), for writers that make one pass per output shard."""
    ranks = _rank_states(ck)
    return lambda: iter_full_state(ck, progress, desc, ranks)


def full_state_dict(ck: Checkpoint, progress: bool = True) -> dict[str, torch.Tensor]:
    """The consolidated state dict (tied lm_head.weight the same tensor as the embedding)."""
    out = {}
    for name, t in iter_full_state(ck, progress):
        if ck.model_config.tie_embeddings and name == "lm_head.weight":
            t = out["backbone.embedding.weight"]
        out[name] = t.clone() if t.is_shared() or not t.is_contiguous() else t
    return out


# --------------------------------------------------------------------------------------------- optimizer
def _param_names(config: MambaConfig, weight_decay: float) -> list[list[str]]:
    """Parameter names per AdamW group, in the trainer's order (parallel.zero.adamw_param_groups; TP keeps names
    and order, so the TP model's groups list the same names)."""
    from mamba_dist.parallel.zero import adamw_param_groups

    model = layout.meta_model(config)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in adamw_param_groups(model, weight_decay)]


@dataclass
class FullOptimizer:
    """AdamW state keyed by parameter name at full (TP=1) shape, the groups' hyper-parameters, the LR schedule."""
    state: dict  # name -> {"step": tensor, "exp_avg": tensor, "exp_avg_sq": tensor}
    groups: list  # [{hyper-parameters..., "params": [names]}]
    scheduler: Optional[dict]


def _plain_optimizer(ck: Checkpoint) -> FullOptimizer:
    names = _param_names(ck.model_config, ck.config.optim.weight_decay)
    flat = [n for g in names for n in g]
    specs = layout.shard_specs(ck.model_config)
    files = [os.path.join(ck.path, f"optim-tp{r:02d}.pt" if ck.tp > 1 else "optim.pt") for r in range(ck.tp)]
    per_rank = [_load(f) for f in files]
    opt0 = per_rank[0]["optimizer"]
    if len(opt0["param_groups"]) != len(names) or sum(len(g["params"]) for g in opt0["param_groups"]) != len(flat):
        raise ConvertError(f"checkpoint {ck.path}: its optimizer groups do not match the model's parameters")
    state = {}
    for i, name in enumerate(flat):
        if i not in opt0["state"]:
            continue
        st = {}
        for k, v in opt0["state"][i].items():
            if torch.is_tensor(v) and v.dim() > 0:
                v = layout.unshard([r["optimizer"]["state"][i][k] for r in per_rank], specs[name])
            st[k] = v
        state[name] = st
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": n}
              for g, n in zip(opt0["param_groups"], names)]
    return FullOptimizer(state, groups, per_rank[0].get("scheduler"))


def _zero_moments(ck: Checkpoint, r: int) -> tuple[dict, list, dict]:
    """TP rank r's AdamW moments per parameter name (TP-local shapes), group hyper-parameters and steps."""
    from mamba_dist.parallel.zero import _import_deepspeed

    _import_deepspeed()
    from deepspeed.utils import zero_to_fp32 as z

    with _one_mp_rank(ck, r) as tmp, _quiet():
        d = os.path.join(tmp, ZERO_TAG)
        model_states = z.parse_model_states(z.get_model_state_files(d))
        optim = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
                 for f in z.get_optim_files(d)]
        stage = optim[0]["zero_stage"]
        world = optim[0]["partition_count"]
        world = max(world) if isinstance(world, list) else world
        # the torch optimizer's own state_dict over the flat partitions (key name differs between stages)
        bases = [o.get("base_optimizer_state", o.get("optimizer_state_dict")) for o in optim]
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = [[b["state"][g][key] for g in sorted(b["state"])] for b in bases]
            if stage <= 2:
                sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat, model_states, False,
                                                                  optim[0].get("param_alignment_paddings"))
            else:
                sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, False)
            moments[key] = {n: _materialize(t) for n, t in sd.items()}
        b0 = bases[0]
        steps = [b0["state"][g]["step"] for g in sorted(b0["state"])]
        return moments, b0["param_groups"], {"steps": steps}


def _zero_optimizer(ck: Checkpoint) -> FullOptimizer:
    names = _param_names(ck.model_config, ck.config.optim.weight_decay)
    specs = layout.shard_specs(ck.model_config)
    per_rank = [_zero_moments(ck, r) for r in range(ck.tp)]
    hyper = per_rank[0][1]
    steps = per_rank[0][2]["steps"]
    if len(hyper) != len(names):
        raise ConvertError(f"checkpoint {ck.path}: {len(hyper)} DeepSpeed optimizer groups, the trainer makes "
                           f"{len(names)}")
    if len(steps) != len(names):
        raise ConvertError(f"checkpoint {ck.path}: ZeRO sub-groups do not map onto the optimizer's parameter "
                           f"groups ({len(steps)} vs {len(names)}); --keep-optimizer cannot convert it")
    state = {}
    for gi, group in enumerate(names):
        for name in group:
            st = {"step": steps[gi].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = layout.unshard([m[0][key][name] for m in per_rank], specs[name]).clone()
            state[name] = st
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": n} for g, n in zip(hyper, names)]
    model_states = glob.glob(os.path.join(ck.path, ZERO_TAG, "*mp_rank_00_model_states.pt"))
    sched = torch.load(sorted(model_states)[0], map_location="cpu", weights_only=False).get("lr_scheduler")
    return FullOptimizer(state, groups, sched)


def full_optimizer(ck: Checkpoint) -> FullOptimizer:
    if ck.weights_only:
        raise ConvertError(f"checkpoint {ck.path} holds weights only (no optimizer state to keep)")
    return _zero_optimizer(ck) if ck.is_zero else _plain_optimizer(ck)

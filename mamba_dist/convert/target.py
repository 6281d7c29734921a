"""Write a trainer checkpoint at a chosen TP size from full (TP=1) tensors: the plain-torch layout the trainer
saves (`model.pt` / `model-tpNN.pt`, `optim.pt` / `optim-tpNN.pt`, `rank00000.pt`, `meta.json` last), so
`mamba-dist train checkpoint.resume=OUT` loads it with its own code.

Two kinds:
- weights only (`import`, `reshard` without --keep-optimizer): meta.json says `weights_only: true` and records the
  model config and parallel.tp only. The trainer loads the weights into the freshly built model and starts a new
  run from them (step 0, fresh AdamW, schedule and data order), under any ZeRO stage.
- full (`reshard --keep-optimizer`): the source's step, tokens, data position and config (parallel.tp set to the
  new size, parallel.zero_stage 0: the plain-torch layout), AdamW moments re-sharded, the LR schedule copied; the
  run continues where the source stopped.

Atomic like the trainer's checkpoints: everything goes to `OUT/.tmp-step_N/` and is renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable, Optional, Union

import torch

from mamba_dist import checkpoint as ckpt
from mamba_dist.model import MambaConfig

from . import layout
from .source import ConvertError, FullOptimizer


def model_config_dict(config: MambaConfig, backend: str = "auto") -> dict:
    """The `model` section of a training config for a mamba_ssm MambaConfig."""
    d = config.to_dict()
    ssm = dict(d.pop("ssm_cfg"))
    mixer = ssm.pop("layer", "Mamba1")
    return {"mixer": mixer, **d, "ssm_cfg": ssm, "backend": backend}


def write_checkpoint(out: str, config: MambaConfig, tp: int,
                     tensors: Union[Callable[[], Iterable[tuple[str, torch.Tensor]]], Iterable], *,
                     step: int = 0, train_config: Optional[dict] = None, optimizer: Optional[FullOptimizer] = None,
                     rank_state_file: Optional[str] = None, tokens: int = 0, skipped: int = 0,
                     extra_meta: Optional[dict] = None, extra_files: Optional[dict] = None) -> str:
    """Write OUT/step_<step>/ holding `tensors` (full shapes, any order) sharded over `tp` ranks. Returns the step
    directory. `tensors` is a callable returning a fresh iterator (then one pass per TP rank, so that only one
    rank's shards, 1/tp of the model, are in memory at a time, beside the memory-mapped source) or an iterable
    (read once; every rank's shards are built in that pass)."""
    layout.check_tp(config, tp)
    specs = layout.shard_specs(config)
    shapes = layout.full_shapes(config)
    tmp = os.path.join(out, ".tmp-" + ckpt.step_dir_name(step))
    final = os.path.join(out, ckpt.step_dir_name(step))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    passes = [list(range(tp))] if not callable(tensors) else [[r] for r in range(tp)]
    for ranks in passes:
        per_rank = {r: {} for r in ranks}
        seen = set()
        for name, full in (tensors() if callable(tensors) else tensors):
            if name not in specs:
                raise ConvertError(f"tensor {name} is not part of the model")
            if tuple(full.shape) != shapes[name]:
                raise ConvertError(f"{name} has shape {tuple(full.shape)}, the model config says {shapes[name]}")
            seen.add(name)
            if config.tie_embeddings and name == "lm_head.weight":
                continue  # the embedding, set below
            for r in ranks:
                per_rank[r][name] = layout.shard(full, specs[name], r, tp).clone()
        missing = sorted(set(specs) - seen - ({"lm_head.weight"} if config.tie_embeddings else set()))
        if missing:
            raise ConvertError(f"{len(missing)} tensors of the model are missing (e.g. {missing[0]})")
        for r, sd in per_rank.items():
            if config.tie_embeddings:  # one tensor under both names, as the model's own state_dict has it
                sd["lm_head.weight"] = sd["backbone.embedding.weight"]
            ckpt.save_file(sd, os.path.join(tmp, f"model-tp{r:02d}.pt" if tp > 1 else "model.pt"))
        del per_rank

    if optimizer is not None:
        for r in range(tp):
            ckpt.save_file(_local_optimizer(optimizer, specs, r, tp),
                           os.path.join(tmp, f"optim-tp{r:02d}.pt" if tp > 1 else "optim.pt"))
    copied = []
    for name, src in (extra_files or {}).items():  # e.g. the tokenizer.json of an imported model
        copied.append(shutil.copyfile(src, os.path.join(tmp, name)))
    if rank_state_file is not None:
        copied.append(shutil.copyfile(rank_state_file, os.path.join(tmp, ckpt.rank_file(0))))
    ckpt.record_files(tmp, copied)  # copied, not written through save_file: checksummed by reading back

    if train_config is None:  # weights only: what check_compatible compares is the model and the TP size
        train_config = {"model": model_config_dict(config), "parallel": {"tp": tp}}
    meta = {"tokens": tokens, "skipped": skipped, "world_size": 1, "config": train_config, **(extra_meta or {})}
    if optimizer is None:
        meta["weights_only"] = True
    return ckpt.commit_save(out, tmp, step, meta, rank=0)


def _local_optimizer(opt: FullOptimizer, specs: dict, rank: int, tp: int) -> dict:
    """TP rank `rank`'s torch.optim.AdamW state_dict + LR schedule, indices in the trainer's parameter order."""
    state, groups, i = {}, [], 0
    for g in opt.groups:
        idx = []
        for name in g["params"]:
            if name in opt.state:
                state[i] = {k: layout.shard(v, specs[name], rank, tp).clone() if torch.is_tensor(v) and v.dim() > 0
                            else (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[name].items()}
            idx.append(i)
            i += 1
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": idx})
    return {"optimizer": {"state": state, "param_groups": groups}, "scheduler": opt.scheduler}


def resharded_train_config(train_config: dict, tp: int) -> dict:
    """The source's config at the new TP size, on the plain-torch path (the layout this module writes)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in train_config.items()}
    cfg["parallel"] = {**cfg.get("parallel", {}), "tp": tp, "zero_stage": 0, "dp": -1}
    return cfg


__all__ = ["write_checkpoint", "model_config_dict", "resharded_train_config"]

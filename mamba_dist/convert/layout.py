"""Tensor-parallel layout of a model's state dict, known offline (no process group): which tensors are sharded,
along which dim, in which independently-sharded segments -- the same rules `parallel/tp.py` applies when it
builds a TP model (a test checks both agree, parameter by parameter), so checkpoints can be unsharded and
re-sharded in one process.

A spec is None (replicated: every TP rank holds the full tensor) or (dim, segments): each segment of the full
tensor along `dim` is cut into tp equal parts and rank r holds part r of every segment (`layers.shard_tensor`).
"""

from __future__ import annotations

from typing import Optional

import torch

from mamba_dist.model import MambaConfig, MambaLMHeadModel

Spec = Optional[tuple[int, tuple[int, ...]]]


def meta_model(config: MambaConfig) -> MambaLMHeadModel:
    """The full (TP=1) model on the meta device: shapes and attributes, no memory."""
    with torch.device("meta"):
        return MambaLMHeadModel(config, backend="reference")


def _nonzero(*segments: int) -> tuple[int, ...]:
    return tuple(int(s) for s in segments if s)


def shard_specs(config: MambaConfig) -> dict[str, Spec]:
    """{state-dict name: spec} for every tensor of the model (lm_head.weight included when tied)."""
    model = meta_model(config)
    V = model.backbone.embedding.weight.shape[0]
    specs: dict[str, Spec] = {name: None for name in model.state_dict()}
    specs["backbone.embedding.weight"] = (0, (V,))
    specs["lm_head.weight"] = (0, (V,))
    for i, layer in enumerate(model.backbone.layers):
        m, pre = layer.mixer, f"backbone.layers.{i}.mixer."
        if hasattr(m, "nheads"):  # Mamba-2
            d_ssm, H, GN = m.d_ssm, m.nheads, m.ngroups * m.d_state
            d_mlp = (m.in_proj.weight.shape[0] - 2 * d_ssm - 2 * GN - H) // 2
            col = (0, _nonzero(d_mlp, d_mlp, d_ssm, d_ssm, GN, GN, H))
            specs.update({pre + "in_proj.weight": col, pre + "conv1d.weight": (0, (d_ssm, GN, GN)),
                          pre + "A_log": (0, (H,)), pre + "dt_bias": (0, (H,)), pre + "D": (0, (m.D.shape[0],)),
                          pre + "out_proj.weight": (1, _nonzero(d_mlp, d_ssm))})
            if m.in_proj.bias is not None:
                specs[pre + "in_proj.bias"] = col
            if m.conv1d.bias is not None:
                specs[pre + "conv1d.bias"] = (0, (d_ssm, GN, GN))
            if getattr(m, "norm", None) is not None:
                specs[pre + "norm.weight"] = (0, (d_ssm,))
        elif hasattr(m, "num_heads_kv"):  # attention (MHA): by head, as parallel/tp.py's _tp_attention
            H, Hkv, Dh = m.num_heads, m.num_heads_kv, m.head_dim
            qkv = (H * Dh, Hkv * Dh, Hkv * Dh)
            mlp = m.in_proj.weight.shape[0] - sum(qkv)
            col = (0, _nonzero(*qkv, mlp // 2, mlp // 2))
            specs.update({pre + "in_proj.weight": col, pre + "out_proj.weight": (1, _nonzero(H * Dh, mlp // 2))})
            if m.in_proj.bias is not None:
                specs[pre + "in_proj.bias"] = col
            if getattr(m, "conv1d", None) is not None:
                specs[pre + "conv1d.weight"] = (0, qkv)
                specs[pre + "conv1d.bias"] = (0, qkv)
        else:  # Mamba-1
            di = m.d_inner
            specs.update({pre + "in_proj.weight": (0, (di, di)), pre + "conv1d.weight": (0, (di,)),
                          pre + "x_proj.weight": (1, (di,)), pre + "dt_proj.weight": (0, (di,)),
                          pre + "dt_proj.bias": (0, (di,)), pre + "A_log": (0, (di,)), pre + "D": (0, (di,)),
                          pre + "out_proj.weight": (1, (di,))})
            if m.in_proj.bias is not None:
                specs[pre + "in_proj.bias"] = (0, (di, di))
            if m.conv1d.bias is not None:
                specs[pre + "conv1d.bias"] = (0, (di,))
        if layer.mlp is not None:
            hidden = layer.mlp.fc2.weight.shape[1]
            pre = f"backbone.layers.{i}.mlp."
            specs[pre + "fc1.weight"] = (0, (hidden, hidden))
            if layer.mlp.fc1.bias is not None:
                specs[pre + "fc1.bias"] = (0, (hidden, hidden))
            specs[pre + "fc2.weight"] = (1, (hidden,))
    return specs


def full_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}


def check_tp(config: MambaConfig, tp: int) -> None:
    """One-line ParallelLayoutError when tp does not divide a sharded dimension."""
    from mamba_dist.parallel.dims import ParallelLayoutError, check_model_layout

    check_model_layout(config.to_dict(), tp)
    for name, spec in shard_specs(config).items():
        if spec is not None:
            bad = [s for s in spec[1] if s % tp]
            if bad:
                raise ParallelLayoutError(f"tp={tp} does not divide {name} (a segment of size {bad[0]})")


def shard(full: torch.Tensor, spec: Spec, rank: int, tp: int) -> torch.Tensor:
    if spec is None or tp == 1:
        return full
    from mamba_dist.parallel.layers import shard_tensor

    return shard_tensor(full, spec[0], spec[1], rank, tp)


def unshard(shards: list[torch.Tensor], spec: Spec) -> torch.Tensor:
    if spec is None or len(shards) == 1:
        return shards[0]
    from mamba_dist.parallel.layers import unshard_tensors

    return unshard_tensors(shards, spec[0], spec[1])

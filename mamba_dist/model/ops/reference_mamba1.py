"""Pure-PyTorch twin of ops/fused_mamba1.py `mamba1_inner` (same signature): the Mamba-1 mixer from in_proj to
out_proj built from ops/reference.py's kernels, with true document resets. The fused function is tested against
it (tests/test_fused_mamba1_cpu.py with emulated kernels, tests/test_gpu_fused_mamba1.py on CUDA)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def mamba1_inner(hidden: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor], conv_weight: Tensor,
                 conv_bias: Optional[Tensor], x_proj_weight: Tensor, dt_proj_weight: Tensor,
                 dt_proj_bias: Optional[Tensor], out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], A: Tensor,
                 D: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None) -> Tensor:
    """hidden (B, L, d_model) -> (B, L, d_model): in_proj -> [x, z]; x -> causal conv + SiLU -> x_proj ->
    (dt_low, B, C); dt = softplus(dt_proj_weight dt_low + dt_proj_bias); scan with D skip; * silu(z); out_proj."""
    from . import reference as ref  # here: ops/reference.py re-exports this function

    xz = F.linear(hidden, in_proj_weight, in_proj_bias)
    d = xz.shape[-1] // 2
    x, z = xz.split([d, d], dim=-1)
    u = ref.causal_conv1d(x.transpose(1, 2), conv_weight.reshape(d, conv_weight.shape[-1]), conv_bias, seq_idx,
                          "silu")  # (B, D, L)
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)  # (B, L, R + 2 N)
    r, N = dt_proj_weight.shape[1], A.shape[1]
    dt_low, B, C = x_dbl.split([r, N, N], dim=-1)
    delta = F.linear(dt_low, dt_proj_weight)  # the bias goes in as delta_bias, as in the fused function
    y = ref.selective_scan(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                           z.transpose(1, 2), dt_proj_bias, True, seq_idx)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


__all__ = ["mamba1_inner"]

"""Mamba-1 (S6) mixer, parameter-for-parameter mamba_ssm 2.3's `Mamba` (modules/mamba_simple.py)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .backend import kernels
from .conv import CausalConv1d


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, **factory) -> torch.Tensor:
    """A bias b with softplus(b) log-uniform in [dt_min, dt_max] (floored at dt_init_floor), as mamba_ssm does."""
    dt = torch.exp(torch.rand(n, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class Mamba(nn.Module):
    """in_proj -> [x, z]; x -> causal conv + SiLU -> x_proj -> (dt_low, B, C); dt = softplus(dt_proj(dt_low));
    selective scan with D skip, gated by SiLU(z) -> out_proj.

    Inner sizes are read from the attributes d_inner, dt_rank, d_state (a tensor-parallel shard sets local sizes).
    dt_proj is called with its bias and the scan gets delta_bias=None: softplus(W dt_low + b), the same value
    mamba_ssm computes with delta_bias=b, and it keeps every weight behind a module call."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: Optional[int] = None, backend: str = "reference", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.backend = backend
        self.activation = "silu"
        # use_fast_path (mamba_ssm: mamba_inner_fn) switches our own equivalent, ops.mamba1_inner: the whole
        # mixer, in_proj to out_proj, as one function. It reads every submodule's weight directly,
        # which tensor parallelism (swaps those submodules) and ZeRO-3 (gathers a weight only around its own
        # module's forward) cannot see: both set use_inner_fn = False and get the op-by-op path.
        self.use_inner_fn = bool(use_fast_path)

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = CausalConv1d(self.d_inner, d_conv, bias=conv_bias, activation="silu", backend=backend,
                                   **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj: weight keeps variance at init, bias puts softplus(bias) log-uniform in [dt_min, dt_max]
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, **factory))
        self.dt_proj.bias._no_reinit = True  # _init_weights zeroes every other Linear bias

        # S4D-real init A = -(1..N) per channel; A_log and D stay fp32 whatever the model dtype
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states (B, L, d_model), seq_idx (B, L) int32 or None -> (B, L, d_model)."""
        ops = kernels(self.backend)
        A = -torch.exp(self.A_log.float())
        if self.use_inner_fn and self.d_inner % 8 == 0 and 2 <= self.d_conv <= 4:  # the fused kernels' limits
            return ops.mamba1_inner(hidden_states, self.in_proj.weight, self.in_proj.bias, self.conv1d.weight,
                                    self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias,
                                    self.out_proj.weight, self.out_proj.bias, A, self.D.float(), seq_idx)
        xz = self.in_proj(hidden_states)
        x, z = torch.split(xz, [self.d_inner, self.d_inner], dim=-1)
        x = self.conv1d(x.transpose(1, 2), seq_idx)  # (B, d_inner, L), SiLU applied
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2 d_state)
        dt_low, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low)  # (B, L, d_inner), bias included
        y = ops.selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                               z.transpose(1, 2), None, True, seq_idx)
        return self.out_proj(y.transpose(1, 2))

    # ----------------------------------------------------------------------------------- recurrent inference
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, dtype=None):
        """(conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state) fp32): all the memory the recurrent
        step needs, whatever the sequence length (max_seqlen is accepted for mamba_ssm's signature only)."""
        device = self.A_log.device
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                           dtype=dtype or self.conv1d.weight.dtype)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden_states (B, 1, d_model) -> (B, 1, d_model); both states are updated in place."""
        ops = kernels(self.backend)
        xz = self.in_proj(hidden_states.squeeze(1))
        x, z = torch.split(xz, [self.d_inner, self.d_inner], dim=-1)
        x = self.conv1d.step(x, conv_state)
        dt_low, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low)  # bias included, as in forward
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(ssm_state, x, dt, A, B, C, self.D.float(), z=z, dt_bias=None,
                                       dt_softplus=True)
        return self.out_proj(y).unsqueeze(1)

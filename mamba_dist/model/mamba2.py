"""Mamba-2 (SSD) mixer, parameter-for-parameter mamba_ssm 2.3's `Mamba2` (modules/mamba2.py), and its gated
RMSNorm."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import kernels
from .conv import CausalConv1d
from .mamba1 import inverse_softplus_dt


class RMSNormGated(nn.Module):
    """mamba_ssm's layernorm_gated.RMSNorm: rmsnorm over groups of `group_size` channels of x * silu(z)
    (norm_before_gate=False), times weight. `group_size` is d_ssm / ngroups and stays fixed under tensor
    parallelism, so a shard normalises whole groups."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False, backend: str = "reference", device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kernels(self.backend).rms_norm_gated(x, z, self.weight, self.eps, self.group_size,
                                                    self.norm_before_gate)


class Mamba2(nn.Module):
    """in_proj -> [z0, x0 (gated MLP part, d_mlp), z, xBC, dt]; xBC -> causal conv + SiLU -> x, B, C; SSD scan
    (per head dt, A, D); gated RMSNorm with z; out_proj.

    Inner sizes are read from the attributes d_ssm, nheads, ngroups, headdim, d_state (a tensor-parallel shard sets
    local sizes); d_mlp is inferred from in_proj's output width, as mamba_ssm does."""

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: Optional[float] = None,
                 expand: int = 2, headdim: int = 64, d_ssm: Optional[int] = None, ngroups: int = 1,
                 A_init_range=(1, 16), D_has_hdim: bool = False, rmsnorm: bool = True, norm_before_gate: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit=(0.0, float("inf")), bias: bool = False, conv_bias: bool = True, chunk_size: int = 256,
                 use_mem_eff_path: bool = True, layer_idx: Optional[int] = None, backend: str = "reference",
                 process_group=None, sequence_parallel: bool = True, device=None, dtype=None):
        if process_group is not None:  # accepted for config compatibility only
            raise ValueError("Mamba2: process_group is not supported here; tensor parallelism is applied from "
                             "outside (mamba_dist.parallel.apply_tp)")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} is not divisible by headdim={headdim}")
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={self.nheads} is not divisible by ngroups={ngroups}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        # use_mem_eff_path (mamba_ssm: mamba_split_conv1d_scan_combined) switches the fused backend's
        # ops.mamba2_inner: everything after in_proj as one function that recomputes the conv and norm outputs in
        # backward. It reads the conv / norm / out_proj weights directly, which tensor parallelism (swaps those
        # submodules) and ZeRO-3 (gathers a weight only around its own module's forward) cannot see: both set
        # use_inner_fn = False, as does the reference backend (its op-by-op path is the twin).
        self.use_inner_fn = bool(use_mem_eff_path)
        self.layer_idx = layer_idx
        self.backend = backend

        # output order [z0, x0, z, x, B, C, dt] (z0, x0 empty when d_ssm == d_inner)
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = CausalConv1d(conv_dim, d_conv, bias=conv_bias, activation="silu", backend=backend, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt_bias: softplus(dt_bias) log-uniform in [dt_min, dt_max]; dt_bias, A_log, D kept fp32
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device=device))
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True

        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, group_size=self.d_ssm // ngroups,
                                     norm_before_gate=norm_before_gate, backend=backend, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states (B, L, d_model), seq_idx (B, L) int32 or None -> (B, L, d_model)."""
        ops = kernels(self.backend)
        batch, seqlen, _ = hidden_states.shape
        d_ssm, G, N, H, P = self.d_ssm, self.ngroups, self.d_state, self.nheads, self.headdim
        zxbcdt = self.in_proj(hidden_states)
        if self.use_inner_fn and self.backend == "fused":
            return ops.mamba2_inner(
                zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
                self.D.view(H, P) if self.D_has_hdim else self.D, self.chunk_size, seq_idx, self.dt_limit,
                self.norm.weight if self.rmsnorm else None, self.norm.eps if self.rmsnorm else 1e-6,
                self.norm_before_gate, self.out_proj.weight, self.out_proj.bias,
                None if self.D_has_hdim else self.headdim, self.ngroups)
        d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * G * N - H) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * G * N, H], dim=-1)
        xBC = self.conv1d(xBC.transpose(1, 2), seq_idx).transpose(1, 2)  # SiLU applied
        x, B, C = torch.split(xBC, [d_ssm, G * N, G * N], dim=-1)
        A = -torch.exp(self.A_log.float())
        D = self.D.view(H, P) if self.D_has_hdim else self.D
        extra = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
        y = ops.ssd_scan(x.reshape(batch, seqlen, H, P), dt, A, B.reshape(batch, seqlen, G, N),
                         C.reshape(batch, seqlen, G, N), self.chunk_size, D,
                         None if self.rmsnorm else z.reshape(batch, seqlen, H, P), self.dt_bias, True, seq_idx,
                         **extra)
        y = y.reshape(batch, seqlen, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    # ----------------------------------------------------------------------------------- recurrent inference
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, dtype=None):
        """(conv_state (B, d_ssm + 2 G N, d_conv), ssm_state (B, nheads, headdim, d_state) fp32): all the memory
        the recurrent step needs, whatever the sequence length (max_seqlen: mamba_ssm's signature only)."""
        device = self.A_log.device
        conv = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device,
                           dtype=dtype or self.conv1d.weight.dtype)
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden_states (B, 1, d_model) -> (B, 1, d_model); both states are updated in place.
        dt is clamped to dt_limit as in forward (mamba_ssm's own step skips that clamp)."""
        ops = kernels(self.backend)
        batch = hidden_states.shape[0]
        d_ssm, G, N, H, P = self.d_ssm, self.ngroups, self.d_state, self.nheads, self.headdim
        zxbcdt = self.in_proj(hidden_states.squeeze(1))
        d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * G * N - H) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * G * N, H], dim=-1)
        xBC = self.conv1d.step(xBC, conv_state)
        x, B, C = torch.split(xBC, [d_ssm, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        A = -torch.exp(self.A_log.float())
        D = self.D.float().view(H, P) if self.D_has_hdim else self.D.float()[:, None].expand(H, P)
        # per-head dt and A as stride-0 expansions over headdim (mamba_ssm's kernel then computes one decay per head)
        y = ops.selective_state_update(ssm_state, x.reshape(batch, H, P), dt[:, :, None].expand(batch, H, P),
                                       A[:, None, None].expand(H, P, N), B.reshape(batch, G, N),
                                       C.reshape(batch, G, N), D,
                                       z=None if self.rmsnorm else z.reshape(batch, H, P), dt_bias=None,
                                       dt_softplus=False)
        y = y.reshape(batch, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y).unsqueeze(1)

"""Attention mixer for hybrid models, parameter-for-parameter mamba_ssm 2.3's `MHA` (modules/mha.py), with
document masking.

in_proj -> [q (H*Dh) | k (Hkv*Dh) | v (Hkv*Dh) | mlp up | mlp gate] (the mlp part only when mlp_dim > 0);
optional depthwise causal conv over q|k|v (d_conv > 0, no activation: mamba_ssm's choice); rotary on the first
rotary_emb_dim channels of q and k (GPT-NeoX halves, or interleaved pairs); attention with GQA (each group of
H / Hkv query heads shares one kv head); out_proj over [context | up * silu(gate)].

Packed rows (seq_idx, as the Mamba mixers take it) are handled as if each document were alone: a token attends
only to earlier tokens of its own document, rotary positions restart at 0 at each document start, and the conv
window restarts there. mamba_ssm's MHA does none of the three (on packed rows its attention leaks across
documents); `mask_documents = False` on an instance reproduces that behaviour (tests use it as the leak guard).

`causal` defaults to True here. mamba_ssm's default is False: a mamba_ssm attn_cfg without "causal" builds a
bidirectional attention, which silently trains a language model on the future. Export writes the key explicitly.

Inner sizes are read from the attributes num_heads, num_heads_kv, head_dim (the mlp width is inferred from
in_proj's output width), so a tensor-parallel shard is an MHA whose attributes hold the local head counts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import kernels
from .conv import CausalConv1d


def positions_in_document(seq_idx: Optional[torch.Tensor], batch: int, seqlen: int, device) -> torch.Tensor:
    """(B, L) long: each token's position within its own document (0 at every document start); without seq_idx
    the plain 0..L-1."""
    t = torch.arange(seqlen, device=device)
    if seq_idx is None:
        return t.expand(batch, seqlen)
    start = torch.zeros_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(start, t, 0).cummax(dim=1).values  # first token of each token's document
    return t - first


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of x (B, L, heads, Dh) at `positions` (B, L), on its first rotary_dim channels (the rest
    passes through), as flash_attn's RotaryEmbedding (which mamba_ssm's MHA uses): inv_freq =
    base^(-2i/rotary_dim), non-interleaved = rotate the two halves of the rotated part (GPT-NeoX), interleaved =
    rotate pairs (x0, x1), (x2, x3), ... Computed in fp32, returned in x's dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, L, rotary_dim / 2)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


class MHA(nn.Module):
    """Multi-head (GQA) causal self-attention with mamba_ssm's MHA parameters: `in_proj` (q, k, v [, mlp]),
    `conv1d` (d_conv > 0), `out_proj`. forward(hidden_states (B, L, D), seq_idx (B, L) int32 | None)."""

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None,
                 head_dim: Optional[int] = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: Optional[float] = None, causal: bool = True,
                 layer_idx: Optional[int] = None, d_conv: int = 0, rotary_emb_dim: int = 0,
                 rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 backend: str = "reference", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if num_heads < 1 or self.num_heads_kv < 1 or num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads={num_heads} must be a positive multiple of "
                             f"num_heads_kv={self.num_heads_kv}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MHA: num_heads={num_heads} does not divide d_model={embed_dim} (set head_dim)")
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim={rotary_emb_dim} must be even and <= head_dim={self.head_dim}")
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256  # mamba_ssm rounds it up to a multiple of 256
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = float(rotary_emb_base)
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.mask_documents = True
        self.backend = backend

        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            # mamba_ssm: nn.Conv1d(qkv_dim, qkv_dim, d_conv, groups=qkv_dim, padding=d_conv-1), bias on, no activation
            self.conv1d = CausalConv1d(qkv_dim, d_conv, bias=True, activation=None, backend=backend, **factory)
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory)

    @staticmethod
    def _qkv_and_mlp(proj: torch.Tensor, qkv_width: int):
        """in_proj's output -> (q|k|v, the in-attention gated MLP's activation or None); the MLP part is whatever
        lies past q, k and v (its local width under tensor parallelism)."""
        mlp = proj.shape[-1] - qkv_width
        if mlp <= 0:
            return proj, None
        qkv, x_mlp = proj.split([qkv_width, mlp], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        return qkv, up * F.silu(gate)

    def forward(self, hidden_states: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seqlen, _ = hidden_states.shape
        H, Hkv, Dh = self.num_heads, self.num_heads_kv, self.head_dim
        q_dim, kv_dim = H * Dh, Hkv * Dh
        docs = seq_idx if self.mask_documents else None
        qkv, x_mlp = self._qkv_and_mlp(self.in_proj(hidden_states), q_dim + 2 * kv_dim)
        if self.d_conv > 0:
            qkv = self.conv1d(qkv.transpose(1, 2), docs).transpose(1, 2)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.reshape(batch, seqlen, H, Dh)
        k = k.reshape(batch, seqlen, Hkv, Dh)
        v = v.reshape(batch, seqlen, Hkv, Dh)
        if self.rotary_emb_dim > 0:
            pos = positions_in_document(docs, batch, seqlen, hidden_states.device)
            q = apply_rotary(q, pos, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
            k = apply_rotary(k, pos, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        context = kernels(self.backend).attention(q, k, v, docs, self.causal, self.softmax_scale)
        context = context.reshape(batch, seqlen, q_dim)
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)

    # ----------------------------------------------------------------------------------- recurrent inference
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, dtype=None):
        """(conv_state (B, qkv channels, d_conv) (empty without a conv), kv (B, T, 2, Hkv, Dh), n_seen (1,) long):
        the KV cache holds max_seqlen positions (default 256) and grows by doubling (in place) when full. Unlike
        the Mamba layers' states it grows with the sequence: O(length) memory per attention layer."""
        dtype = dtype or self.out_proj.weight.dtype
        device = self.out_proj.weight.device
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        conv = torch.zeros(batch_size, qkv_dim if self.d_conv else 0, self.d_conv, device=device, dtype=dtype)
        kv = torch.zeros(batch_size, max_seqlen or 256, 2, self.num_heads_kv, self.head_dim, device=device,
                         dtype=dtype)
        return conv, kv, torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, kv: torch.Tensor,
             n_seen: torch.Tensor) -> torch.Tensor:
        """One token: hidden_states (B, 1, D) -> (B, 1, D), attending to every earlier token of the row; the conv
        window, the KV cache and the position counter are updated in place."""
        if not self.causal:
            raise ValueError(f"layer {self.layer_idx}: token-by-token generation needs causal attention")
        batch = hidden_states.shape[0]
        H, Hkv, Dh = self.num_heads, self.num_heads_kv, self.head_dim
        q_dim, kv_dim = H * Dh, Hkv * Dh
        qkv, x_mlp = self._qkv_and_mlp(self.in_proj(hidden_states.squeeze(1)), q_dim + 2 * kv_dim)
        if self.d_conv > 0:
            qkv = self.conv1d.step(qkv, conv_state)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q, k, v = q.reshape(batch, 1, H, Dh), k.reshape(batch, 1, Hkv, Dh), v.reshape(batch, 1, Hkv, Dh)
        t = int(n_seen.item())
        if self.rotary_emb_dim > 0:
            pos = torch.full((batch, 1), t, device=q.device, dtype=torch.long)
            q = apply_rotary(q, pos, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
            k = apply_rotary(k, pos, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        if t >= kv.shape[1]:  # full: double it, in place (the cache dict keeps the same tensor object)
            kv.set_(torch.cat([kv, torch.zeros_like(kv)], dim=1))
        kv[:, t, 0], kv[:, t, 1] = k[:, 0].to(kv.dtype), v[:, 0].to(kv.dtype)
        n_seen += 1
        # one query against all t+1 cached keys: nothing to mask (is_causal would align the square top-left)
        context = kernels(self.backend).attention(q, kv[:, :t + 1, 0].to(q.dtype), kv[:, :t + 1, 1].to(q.dtype),
                                                  None, False, self.softmax_scale)
        context = context.reshape(batch, q_dim)
        if x_mlp is not None:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context).unsqueeze(1)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_heads_kv}, head_dim={self.head_dim}, "
                f"causal={self.causal}, rotary={self.rotary_emb_dim}, d_conv={self.d_conv}, backend={self.backend}")

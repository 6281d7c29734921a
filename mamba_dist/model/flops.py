"""FLOPs per token of a Mamba LM, for MFU. Pure arithmetic on the config (a MambaConfig, its dict, or anything with
the same attributes); no torch.

Counting rules (a multiply-add is 2 FLOPs; per token; forward pass):

  Matmuls (all layers):      2 * (inputs x outputs) of every Linear:
    Mamba-1  in_proj  d_model -> 2*d_inner            x_proj  d_inner -> dt_rank + 2*d_state
             dt_proj  dt_rank -> d_inner              out_proj d_inner -> d_model
    Mamba-2  in_proj  d_model -> 2*d_inner + 2*ngroups*d_state + nheads          out_proj d_inner -> d_model
    GatedMLP (d_intermediate > 0) fc1 d_model -> 2*d_intermediate, fc2 d_intermediate -> d_model
    lm_head  d_model -> padded vocab (the embedding lookup is free)
  Depthwise causal conv:     2 * channels * d_conv   (channels = d_inner, or d_inner + 2*ngroups*d_state for Mamba-2)
  Mamba-1 selective scan:    9 * d_inner * d_state, the count mamba_ssm's own benchmarks use
                             (`flops_selective_scan_fn`): per (channel, state) dA = exp(dt*A) 2, dt*B*u 2,
                             h = dA*h + dBu 2, y += C*h 2, +1 for the D skip / z gate folded in.
  Mamba-2 SSD (chunk Q = min(chunk_size, seq_len), H heads of P = headdim, G groups, N = d_state):
      intra-chunk scores  C B^T per group:                  2 * Q * G * N
      intra-chunk output  (scores . decay) @ x per head:    2 * Q * H * P
      chunk states        B^T x per head:                   2 * H * P * N
      state passing       between chunks:                   2 * H * P * N / Q
      state output        C . state per head:               2 * H * P * N
    The kernels compute the full Q x Q diagonal blocks, causal mask included, so they are counted in full.
  Attention layers (attn_layer_idx, if any; H query heads, Hkv kv heads of head_dim Dh, q_dim = H * Dh):
      projections         in_proj d_model -> (H + 2 Hkv) Dh + mlp_dim, out_proj q_dim + mlp_dim/2 -> d_model
      conv (d_conv > 0)   2 * (H + 2 Hkv) Dh * d_conv
      scores QK^T + AV    4 * q_dim * c, c = the mean number of keys a query attends to: only pairs the mask
                          allows count (useful work, the FlashAttention / PaLM convention), so causal is half the
                          square, (L + 1) / 2 for one document per row; with packed documents (seq_idx)
                          c = sum_d l_d (l_d + 1) / 2 / L, the document mask's share (`attention_context`).
                          `flops_per_token(..., doc_lengths=...)` or `FlopCount.with_attention_context(c)` apply it.
  Not counted: elementwise work (norms, activations, softplus, gating, residual adds) and the softmax/loss,
  O(d) per token, under 1% at the released sizes (PaLM appendix B makes the same choice for transformers).

Training FLOPs per token:  model = 3 * forward  (backward = 2 * forward), the quantity MFU uses;
                           hardware = model + forward of the recomputed blocks (activation recomputation), for HFU.
MFU = model FLOPs/token * tokens/s / (peak FLOP/s per device * devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclass
class FlopCount:
    """Forward FLOPs per token, split by where they go (whole model, all layers)."""

    matmul: float  # in/out/x/dt projections, MLPs, attention projections
    conv: float
    scan: float  # SSM scan terms (and attention scores)
    lm_head: float
    per_layer: list  # forward FLOPs/token of each block (for recomputation)
    attn_scores: dict = field(default_factory=dict)  # {attention layer: its QK^T + AV FLOPs/token (in scan)}
    attn_context: float = 0.0  # the mean keys per query those scores were counted at

    def with_attention_context(self, context: float) -> "FlopCount":
        """The same count with the attention scores at another mean context (keys per query), e.g. the one of
        the packed batches actually trained (`attention_context`)."""
        if not self.attn_scores:
            return self
        k = context / self.attn_context
        per_layer = list(self.per_layer)
        for i, flops in self.attn_scores.items():
            per_layer[i] += flops * (k - 1)
        return FlopCount(matmul=self.matmul, conv=self.conv, scan=self.scan + sum(self.attn_scores.values()) * (k - 1),
                         lm_head=self.lm_head, per_layer=per_layer,
                         attn_scores={i: f * k for i, f in self.attn_scores.items()}, attn_context=context)

    @property
    def forward(self) -> float:
        return self.matmul + self.conv + self.scan + self.lm_head

    def train(self) -> float:
        """Model FLOPs per trained token: forward + backward (2x forward)."""
        return 3.0 * self.forward

    def hardware(self, recomputed_layers: int = 0) -> float:
        """Model FLOPs plus one more forward of each recomputed block."""
        return self.train() + sum(self.per_layer[:recomputed_layers])


def _mamba1_layer(d_model: int, ssm: dict) -> tuple[float, float, float]:
    d_state = ssm.get("d_state", 16)
    d_conv = ssm.get("d_conv", 4)
    d_inner = ssm.get("expand", 2) * d_model
    dt_rank = ssm.get("dt_rank", "auto")
    if dt_rank == "auto":
        dt_rank = math.ceil(d_model / 16)
    matmul = 2 * (d_model * 2 * d_inner + d_inner * (dt_rank + 2 * d_state) + dt_rank * d_inner + d_inner * d_model)
    conv = 2 * d_inner * d_conv
    scan = 9 * d_inner * d_state
    return matmul, conv, scan


def _mamba2_layer(d_model: int, ssm: dict, seq_len: int) -> tuple[float, float, float]:
    d_state = ssm.get("d_state", 128)
    d_conv = ssm.get("d_conv", 4)
    d_inner = ssm.get("expand", 2) * d_model
    headdim = ssm.get("headdim", 64)
    ngroups = ssm.get("ngroups", 1)
    d_ssm = ssm.get("d_ssm") or d_inner
    nheads = d_ssm // headdim
    chunk = min(ssm.get("chunk_size", 256), seq_len)
    d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads
    matmul = 2 * (d_model * d_in_proj + d_inner * d_model)
    conv = 2 * (d_ssm + 2 * ngroups * d_state) * d_conv
    hpn = nheads * headdim * d_state
    scan = 2 * chunk * ngroups * d_state + 2 * chunk * nheads * headdim + 4 * hpn + 2 * hpn / chunk
    return matmul, conv, scan


def _mlp_layer(d_model: int, d_intermediate: int) -> float:
    return 2 * (d_model * 2 * d_intermediate + d_intermediate * d_model) if d_intermediate > 0 else 0.0


def _attn_layer(d_model: int, attn: dict) -> tuple[float, float, float]:
    """(projections, conv, scores per unit of context) FLOPs/token of one attention layer."""
    num_heads = attn["num_heads"]
    num_heads_kv = attn.get("num_heads_kv") or num_heads
    head_dim = attn.get("head_dim") or d_model // num_heads
    mlp_dim = math.ceil((attn.get("mlp_dim") or 0) / 256) * 256  # as MHA rounds it
    q, kv = num_heads * head_dim, num_heads_kv * head_dim
    proj = 2 * (d_model * (q + 2 * kv + mlp_dim) + (q + mlp_dim // 2) * d_model)
    conv = 2 * (q + 2 * kv) * (attn.get("d_conv") or 0)
    return proj, conv, 4 * q


def attention_context(seq_len: int, doc_lengths=None, causal: bool = True) -> float:
    """Mean number of keys a query attends to: doc_lengths is a list of rows, each a list of document lengths
    summing to seq_len (None: one document per row). Causal: sum_d l_d (l_d + 1) / 2 / L; else sum_d l_d^2 / L."""
    rows = doc_lengths if doc_lengths else [[seq_len]]
    pairs = sum(n * (n + 1) / 2 if causal else n * n for row in rows for n in row)
    return pairs / sum(sum(row) for row in rows)


def padded_vocab(cfg) -> int:
    vocab = _get(cfg, "vocab_size")
    mult = _get(cfg, "pad_vocab_size_multiple", 8) or 1
    return vocab + (-vocab % mult)


def flops_per_token(cfg, seq_len: int, doc_lengths=None) -> FlopCount:
    """Forward FLOPs per token of the model described by `cfg` (mamba_ssm MambaConfig fields) at `seq_len`;
    attention layers at the context of `doc_lengths` (rows of document lengths; None: one document per row)."""
    d_model = _get(cfg, "d_model")
    n_layer = _get(cfg, "n_layer")
    ssm = dict(_get(cfg, "ssm_cfg", None) or {})
    layer = ssm.pop("layer", "Mamba1")
    attn_idx = set(_get(cfg, "attn_layer_idx", None) or [])
    attn_cfg = dict(_get(cfg, "attn_cfg", None) or {})
    mlp = _mlp_layer(d_model, _get(cfg, "d_intermediate", 0) or 0)
    context = attention_context(seq_len, doc_lengths, attn_cfg.get("causal", True)) if attn_idx else 0.0
    matmul = conv = scan = 0.0
    per_layer, attn_scores = [], {}
    for i in range(n_layer):
        if i in attn_idx:
            m, c, per_key = _attn_layer(d_model, attn_cfg)
            s = attn_scores[i] = per_key * context  # scores count with the sequence-mixing terms
        elif layer == "Mamba2":
            m, c, s = _mamba2_layer(d_model, ssm, seq_len)
        elif layer == "Mamba1":
            m, c, s = _mamba1_layer(d_model, ssm)
        else:
            raise ValueError(f"unknown mixer layer {layer!r}")
        m += mlp
        matmul, conv, scan = matmul + m, conv + c, scan + s
        per_layer.append(m + c + s)
    lm_head = 2.0 * d_model * padded_vocab(cfg)
    return FlopCount(matmul=matmul, conv=conv, scan=scan, lm_head=lm_head, per_layer=per_layer,
                     attn_scores=attn_scores, attn_context=context)


# Dense peak FLOP/s per device (vendor datasheets, SXM parts, no sparsity). fp32 means plain FP32 (no TF32).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
}


def peak_flops_for(device_name: str, dtype: str):
    """Table lookup by a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'); None when unknown."""
    for key, vals in PEAK_FLOPS.items():
        if key in device_name.upper():
            return vals[dtype]
    return None

"""Mamba language model with mamba_ssm 2.3's structure and state_dict names (models/mixer_seq_simple.py):
embedding -> n_layer x Block(norm -> mixer [-> norm2 -> GatedMLP]) with an fp32 residual stream -> norm_f -> tied
lm_head. The mixer is Mamba / Mamba2, or MHA (attention, with document masking) at the attn_layer_idx layers."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import kernels, resolve_backend
from .config import MambaConfig
from .mamba1 import Mamba
from .mamba2 import Mamba2, RMSNormGated
from .mha import MHA
from .ops.cross_entropy import linear_cross_entropy

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm: statistics in fp32 whatever the input dtype; output in the weight's dtype (reference
    backend) or the input's (fused: mamba_ssm's Triton kernel, whose output feeds a bf16 matmul either way).

    forward(x, residual=None, prenorm=False, residual_in_fp32=False) as mamba_ssm's: with prenorm, first
    residual = x + residual (fp32 when residual_in_fp32) and returns (norm(residual), residual). The fused backend
    does the add, the cast and the norm in one kernel, forward and backward."""

    is_rms_norm = True

    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "reference", device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        out, residual = kernels(self.backend).add_norm(x, residual, self.weight, self.bias, self.eps,
                                                       residual_in_fp32, self.is_rms_norm)
        return (out, residual) if prenorm else out


class LayerNorm(RMSNorm):
    """LayerNorm computed in fp32 (mamba_ssm's rms_norm=False option), with the same residual-add interface."""

    is_rms_norm = False

    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "reference", device=None, dtype=None):
        super().__init__(hidden_size, eps, backend, device, dtype)
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))


class LMHead(nn.Linear):
    """lm_head: logits, or with labels the mean cross-entropy fused with the projection (chunked, so the
    (tokens x vocab) logits never exist at once; model/ops/cross_entropy.py). The loss runs inside this module's
    forward so that ZeRO-3 has the (tied) weight gathered around it."""

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        if self.bias is not None:
            raise ValueError("LMHead: the fused loss has no bias term")
        return linear_cross_entropy(x, self.weight, labels)


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP (used when d_intermediate > 0): fc2(y * silu(gate)), [y, gate] = fc1(x)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(nn.Module):
    """Add -> norm -> mixer (-> add -> norm2 -> mlp), returning (hidden_states, residual) like mamba_ssm's Block
    with fused_add_norm: the residual is the running sum of the layer outputs, fp32 when residual_in_fp32."""

    def __init__(self, dim: int, mixer: nn.Module, norm_cls, mlp: Optional[nn.Module] = None,
                 residual_in_fp32: bool = True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(dim)
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp
        else:
            self.mlp = None

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None):
        hidden_states, residual = self.norm(hidden_states, residual, prenorm=True,
                                            residual_in_fp32=self.residual_in_fp32)
        hidden_states = self.mixer(hidden_states, seq_idx=seq_idx)
        if self.mlp is not None:
            hidden_states, residual = self.norm2(hidden_states, residual, prenorm=True,
                                                 residual_in_fp32=self.residual_in_fp32)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def step(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor], *states: torch.Tensor):
        """forward for one token (B, 1, d_model) through the mixer's recurrent step; `states` are the mixer's
        (Mamba: conv_state, ssm_state; attention: conv_state, kv cache, position)."""
        hidden_states, residual = self.norm(hidden_states, residual, prenorm=True,
                                            residual_in_fp32=self.residual_in_fp32)
        hidden_states = self.mixer.step(hidden_states, *states)
        if self.mlp is not None:
            hidden_states, residual = self.norm2(hidden_states, residual, prenorm=True,
                                                 residual_in_fp32=self.residual_in_fp32)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """mamba_ssm's _init_weights: zero Linear biases (except those marked _no_reinit), embeddings N(0, 0.02),
    and out_proj / fc2 re-initialised (kaiming uniform, a=sqrt(5)) and scaled by 1/sqrt(n_residuals * n_layer)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    """The backbone: embedding, blocks, final norm."""

    def __init__(self, config: MambaConfig, backend: str, initializer_cfg: Optional[dict] = None, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = config.residual_in_fp32
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **factory)
        norm_cls = partial(RMSNorm if config.rms_norm else LayerNorm, eps=1e-5, backend=backend, **factory)
        ssm_cfg = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}
        mixer_cls = Mamba2 if config.mixer == "Mamba2" else Mamba
        attn_layers = set(config.attn_layer_idx)
        layers = []
        for i in range(config.n_layer):
            try:
                if i in attn_layers:
                    mixer = MHA(d, layer_idx=i, backend=backend, **config.attn_cfg, **factory)
                else:
                    mixer = mixer_cls(d, layer_idx=i, backend=backend, **ssm_cfg, **factory)
            except TypeError as e:
                raise ValueError(f"{'attn_cfg' if i in attn_layers else 'ssm_cfg for ' + config.mixer}: {e}") \
                    from None
            mlp = (GatedMLP(d, hidden_features=config.d_intermediate, out_features=d, **factory)
                   if config.d_intermediate > 0 else None)
            block = Block(d, mixer, norm_cls, mlp, residual_in_fp32=config.residual_in_fp32)
            block.layer_idx = i
            layers.append(block)
        self.layers = nn.ModuleList(layers)
        if attn_layers:
            log.info("attention at layers %s: %s", sorted(attn_layers),
                     "flex_attention with a document block mask (fused backend)" if backend == "fused"
                     else "SDPA with a dense document mask (reference backend)")
        self.norm_f = norm_cls(d)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=1 if config.d_intermediate == 0 else 2))

    def forward(self, input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, seq_idx=seq_idx)
        return self.norm_f(hidden_states, residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)

    def step(self, input_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """input_ids (B, 1) -> final hidden states (B, 1, d_model); cache[i] = the states of layer i's mixer."""
        hidden_states = self.embedding(input_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer.step(hidden_states, residual, *cache[i])
        return self.norm_f(hidden_states, residual, prenorm=False, residual_in_fp32=self.residual_in_fp32)


def _check_inputs(input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    if seq_idx is None:
        return None
    if seq_idx.shape != input_ids.shape:
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if seq_idx.is_floating_point() or seq_idx.is_complex() or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor (int32), got {seq_idx.dtype}")
    # only where the check costs no device sync
    if seq_idx.device.type == "cpu" and seq_idx.shape[1] > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along each row (one id per document, in order)")
    return seq_idx.to(torch.int32)


class MambaLMHeadModel(nn.Module):
    """mamba_ssm's MambaLMHeadModel (same config fields, parameter names and initialisation), with packed-row
    resets: forward(input_ids (B, L), seq_idx (B, L) int32 | None) -> logits (B, L, padded_vocab).

    backend: "auto" | "reference" | "fused" (see backend.resolve_backend); `.backend` holds the resolved one.
    Weights are initialised on `device`. "auto" picks the fused kernels when CUDA and mamba_ssm/causal_conv1d are
    usable and `device` is not a non-CUDA device, so a model built with device=None and moved to CUDA runs them;
    a fused model fed CPU tensors raises (set_backend("reference") switches)."""

    def __init__(self, config: Union[MambaConfig, dict], backend: str = "auto", device=None, dtype=None,
                 initializer_cfg: Optional[dict] = None):
        super().__init__()
        if isinstance(config, dict):
            config = MambaConfig.from_dict(config)
        self.config = config
        self.backend = resolve_backend(backend, device)
        factory = {"device": device, "dtype": dtype}
        self.backbone = MixerModel(config, self.backend, initializer_cfg=initializer_cfg, **factory)
        self.lm_head = LMHead(config.d_model, config.padded_vocab_size, bias=False, **factory)
        # mamba_ssm applies _init_weights a second time at this level (n_residuals_per_layer=1): this pass decides
        # the final scale of out_proj / fc2, 1/sqrt(n_layer)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def set_backend(self, backend: str) -> None:
        """Switch every kernel-dispatching submodule to another backend (resolved and logged)."""
        self.backend = resolve_backend(backend)
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = self.backend

    def forward(self, input_ids: torch.Tensor, seq_idx: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """logits (B, L, padded_vocab); with `labels` (B, L) long instead the mean cross-entropy over the labels
        that are not -100, fused with lm_head (no logits materialized; lm_head must be an LMHead, i.e. tp == 1)."""
        seq_idx = _check_inputs(input_ids, seq_idx)
        if self.backend == "fused" and input_ids.device.type != "cuda":
            raise RuntimeError(f"model backend 'fused' needs CUDA inputs, got input_ids on {input_ids.device}; "
                               "use backend='reference' (or model.set_backend('reference')) on this device")
        hidden = self.backbone(input_ids, seq_idx=seq_idx)
        if labels is None:
            return self.lm_head(hidden)
        if not isinstance(self.lm_head, LMHead):
            raise ValueError(f"labels= (the fused loss) needs the model's own LMHead, not "
                             f"{type(self.lm_head).__name__} (tensor parallelism has its own vocab-parallel loss)")
        return self.lm_head(hidden, labels=labels)

    # ----------------------------------------------------------------------------------- recurrent inference
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, dtype=None) -> dict:
        """{layer index: the mixer's states}: the whole state of the recurrent step. A Mamba layer's (conv_state,
        ssm_state) has a size independent of the sequence length; an attention layer's KV cache (hybrids) starts
        at max_seqlen positions (default 256) and grows with the sequence."""
        return {i: layer.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
                for i, layer in enumerate(self.backbone.layers)}

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token per row through the recurrent step: input_ids (B,) or (B, 1) -> logits (B, padded_vocab);
        the cache (allocate_inference_cache) is updated in place. Constant time and memory per token for Mamba
        layers; attention layers (hybrids) read their KV cache, which grows by one position per token."""
        if input_ids.dim() == 1:
            input_ids = input_ids[:, None]
        if self.backend == "fused" and input_ids.device.type != "cuda":
            raise RuntimeError(f"model backend 'fused' needs CUDA inputs, got input_ids on {input_ids.device}")
        return self.lm_head(self.backbone.step(input_ids, cache))[:, 0]

    def no_weight_decay(self) -> set:
        """Names of parameters trained without weight decay: A_log, D, dt biases (marked _no_weight_decay),
        every bias, every norm weight."""
        norms = (RMSNorm, nn.LayerNorm, RMSNormGated)
        names = set()
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if getattr(p, "_no_weight_decay", False) or p_name.endswith("bias") or isinstance(mod, norms):
                    names.add(full)
        return names

"""Release formats: Hugging Face transformers (MambaForCausalLM / Mamba2ForCausalLM, safetensors) and mamba_ssm
(`MambaLMHeadModel.save_pretrained`'s config.json + pytorch_model.bin), both ways.

HF config mapping. Every field of transformers' MambaConfig / Mamba2Config that describes the model is written
from our MambaConfig (mixer defaults resolved first, so nothing silently falls back to an HF default):
  Mamba-1: hidden_size, num_hidden_layers, vocab_size (padded), state_size, expand, conv_kernel, time_step_rank
           (dt_rank "auto" resolved), use_bias, use_conv_bias, layer_norm_epsilon, residual_in_fp32,
           tie_word_embeddings, time_step_{scale,min,max,floor,init_scheme}.
  Mamba-2: the same (minus time_step_rank/scale/init_scheme) plus num_heads (d_ssm / headdim), head_dim,
           n_groups (from the mixer config itself; HF's own converter reads it from the wrong level and gets 1),
           chunk_size, time_step_limit.
What HF's classes cannot represent is refused in one line: an MLP after the mixer (d_intermediate > 0), LayerNorm
instead of RMSNorm, attention layers, and for Mamba-2 d_ssm != d_inner, D_has_hdim, rmsnorm=False,
norm_before_gate=True. HF has no field for the model's unpadded vocabulary size, the padding multiple or the
init-only mixer settings (A_init_range, conv_init, dt_init ...); config.json keeps our whole MambaConfig under
`mamba_ssm_config` (HF keeps unknown keys as attributes), so an import restores the exact config.
Norm epsilon: our RMSNorms (and mamba_ssm's) use 1e-5. `rescale_prenorm_residual` stays False (HF's default): an
init-only switch, but transformers 5 applies it to out_proj *after* loading the weights, changing the model.

Weights: the same names as ours except HF's `backbone.embeddings.weight`; a tied lm_head is not stored (HF ties it
on load). Tensors are read and written one at a time (safetensors' safe_open on import).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterator, Optional

import torch

from mamba_dist.model import MambaConfig
from mamba_dist.model.config import resolved_ssm_cfg

from .source import ConvertError

log = logging.getLogger(__name__)

NORM_EPS = 1e-5  # RMSNorm / gated RMSNorm epsilon of our model and mamba_ssm's
HF_EMB = "backbone.embeddings.weight"
OUR_EMB = "backbone.embedding.weight"
MAMBA_SSM_KEY = "mamba_ssm_config"


class RefusedError(ConvertError):
    """The target format cannot represent the model."""


# --------------------------------------------------------------------------------------------- mamba_ssm config
def mamba_ssm_config_dict(config: MambaConfig) -> dict:
    """config.json for mamba_ssm: our MambaConfig's fields, with attn_cfg's `causal` always written out (mamba_ssm's
    MHA defaults to causal=False, ours to True: leaving it out would load a bidirectional attention there)."""
    d = config.to_dict()
    if d["attn_layer_idx"]:
        d["attn_cfg"] = {**d["attn_cfg"], "causal": config.resolved_attn_cfg()["causal"]}
    return d


def mamba_ssm_config(d: dict) -> MambaConfig:
    """Our MambaConfig for a mamba_ssm config.json dict. A hybrid whose attn_cfg leaves `causal` out is
    bidirectional in mamba_ssm; that is kept (the checkpoint was trained so), with a warning."""
    d = dict(d)
    if d.get("attn_layer_idx") and "causal" not in (d.get("attn_cfg") or {}):
        log.warning("config.json: attn_cfg has no 'causal'; mamba_ssm's default (causal=false: the attention sees "
                    "later tokens) is kept. Set model.attn_cfg.causal=true to train a language model from it")
        d["attn_cfg"] = {**d["attn_cfg"], "causal": False}
    return MambaConfig.from_dict(d)


# --------------------------------------------------------------------------------------------- HF config
def _refuse(cond: bool, what: str, target: str) -> None:
    if cond:
        raise RefusedError(f"{target} cannot represent this model: {what}")


def hf_config(config: MambaConfig, special_ids: Optional[dict] = None, dtype: str = "float32"):
    """transformers.MambaConfig / Mamba2Config for our MambaConfig (RefusedError if it has no field for it)."""
    import transformers

    ssm = resolved_ssm_cfg(config.ssm_cfg)
    mixer = ssm["layer"]
    target = "MambaForCausalLM" if mixer == "Mamba1" else "Mamba2ForCausalLM"
    _refuse(config.d_intermediate > 0, f"d_intermediate={config.d_intermediate} (an MLP after each mixer)", target)
    _refuse(not config.rms_norm, "rms_norm=False (LayerNorm; HF's Mamba blocks use RMSNorm)", target)
    _refuse(bool(config.attn_layer_idx), f"a hybrid with attention layers {config.attn_layer_idx} (no HF class "
            f"loads mamba_ssm's hybrid layout; use export-mamba-ssm)", target)
    d = config.d_model
    common = dict(vocab_size=config.padded_vocab_size, hidden_size=d, num_hidden_layers=config.n_layer,
                  state_size=ssm["d_state"], expand=ssm["expand"], conv_kernel=ssm["d_conv"],
                  use_bias=bool(ssm["bias"]), use_conv_bias=bool(ssm["conv_bias"]), layer_norm_epsilon=NORM_EPS,
                  residual_in_fp32=config.residual_in_fp32, tie_word_embeddings=config.tie_embeddings,
                  time_step_min=ssm["dt_min"], time_step_max=ssm["dt_max"], time_step_floor=ssm["dt_init_floor"],
                  hidden_act="silu", **(special_ids or {}))
    _refuse(int(ssm["expand"] * d) != ssm["expand"] * d or not float(ssm["expand"]).is_integer(),
            f"expand={ssm['expand']} (HF's expand is an integer)", target)
    common["expand"] = int(ssm["expand"])
    if mixer == "Mamba1":
        dt_rank = math.ceil(d / 16) if ssm["dt_rank"] == "auto" else int(ssm["dt_rank"])
        cfg = transformers.MambaConfig(**common, time_step_rank=dt_rank, time_step_scale=ssm["dt_scale"],
                                       time_step_init_scheme=ssm["dt_init"], use_mambapy=False)
    else:
        d_inner = int(ssm["expand"] * d)
        d_ssm = ssm["d_ssm"] or d_inner
        _refuse(d_ssm != d_inner, f"d_ssm={d_ssm} != d_inner={d_inner} (a gated MLP inside the mixer)", target)
        _refuse(bool(ssm["D_has_hdim"]), "D_has_hdim=True (HF's D is one value per head)", target)
        _refuse(not ssm["rmsnorm"], "rmsnorm=False (HF's Mamba-2 mixer always has the gated RMSNorm)", target)
        _refuse(bool(ssm["norm_before_gate"]), "norm_before_gate=True (HF gates before the norm)", target)
        cfg = transformers.Mamba2Config(**common, num_heads=d_ssm // ssm["headdim"], head_dim=ssm["headdim"],
                                        n_groups=ssm["ngroups"], chunk_size=ssm["chunk_size"],
                                        time_step_limit=tuple(float(x) for x in ssm["dt_limit"]))
    cfg.architectures = [target]
    cfg.dtype = dtype
    setattr(cfg, MAMBA_SSM_KEY, config.to_dict())
    return cfg


def _lists(v):
    if isinstance(v, dict) and set(v) == {"__float__"}:  # transformers 5 writes inf as {"__float__": "Infinity"}
        return float(v["__float__"])
    return [_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_from_hf(d: dict, vocab_hint: Optional[int] = None) -> MambaConfig:
    """Our MambaConfig from an HF config.json dict: the stored mamba_ssm_config when it agrees with the HF fields
    (our own exports), else the HF fields (a model exported elsewhere). vocab_hint: the tokenizer's vocabulary
    size, to recover the unpadded vocab_size and its padding multiple."""
    kind = d.get("model_type")
    if kind not in ("mamba", "mamba2"):
        raise ConvertError(f"config.json has model_type {kind!r}, not 'mamba' or 'mamba2'")
    ssm = {"layer": "Mamba1" if kind == "mamba" else "Mamba2", "d_state": d["state_size"],
           "d_conv": d.get("conv_kernel", 4), "expand": d.get("expand", 2), "bias": d.get("use_bias", False),
           "conv_bias": d.get("use_conv_bias", True), "dt_min": d.get("time_step_min", 0.001),
           "dt_max": d.get("time_step_max", 0.1), "dt_init_floor": d.get("time_step_floor", 1e-4)}
    if kind == "mamba":
        ssm.update(dt_rank=d.get("time_step_rank", "auto"), dt_scale=d.get("time_step_scale", 1.0),
                   dt_init=d.get("time_step_init_scheme", "random"))
    else:
        ssm.update(headdim=d["head_dim"], ngroups=d["n_groups"], chunk_size=d.get("chunk_size", 256),
                   dt_limit=_lists(d.get("time_step_limit", [0.0, float("inf")])))
        if d["num_heads"] * d["head_dim"] != int(ssm["expand"] * d["hidden_size"]):
            raise ConvertError(f"config.json: num_heads x head_dim = {d['num_heads'] * d['head_dim']} is not "
                               f"expand x hidden_size = {int(ssm['expand'] * d['hidden_size'])}")
    eps = d.get("layer_norm_epsilon", NORM_EPS)
    if abs(eps - NORM_EPS) > 1e-12:
        raise RefusedError(f"this model cannot represent layer_norm_epsilon={eps} (its norms use {NORM_EPS})")
    padded = d["vocab_size"]
    vocab, mult = padded, 1
    if vocab_hint and vocab_hint <= padded:  # smallest power-of-two multiple that pads the tokenizer's vocab
        for m in (1, 2, 4, 8, 16, 32, 64, 128):
            if vocab_hint + (-vocab_hint % m) == padded:
                vocab, mult = vocab_hint, m
                break
    derived = MambaConfig(d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=vocab,
                          ssm_cfg=ssm, residual_in_fp32=d.get("residual_in_fp32", True),
                          pad_vocab_size_multiple=mult, tie_embeddings=d.get("tie_word_embeddings", True))
    stored = d.get(MAMBA_SSM_KEY)
    if isinstance(stored, dict):
        try:
            ours = MambaConfig.from_dict(stored)
        except (ValueError, TypeError):
            ours = None
        if ours is not None and _same_model(ours, derived):
            return ours
    return derived


def _same_model(a: MambaConfig, b: MambaConfig) -> bool:
    keys = ("d_model", "n_layer", "residual_in_fp32", "tie_embeddings")
    if any(getattr(a, k) != getattr(b, k) for k in keys) or a.padded_vocab_size != b.padded_vocab_size:
        return False
    ra, rb = resolved_ssm_cfg(a.ssm_cfg), resolved_ssm_cfg(b.ssm_cfg)
    return all(_lists(ra.get(k)) == _lists(rb.get(k)) for k in b.ssm_cfg if k != "dt_rank") and \
        (a.mixer == b.mixer)


# --------------------------------------------------------------------------------------------- HF weights
def to_hf_name(name: str) -> str:
    return HF_EMB if name == OUR_EMB else name


def from_hf_name(name: str) -> str:
    return OUR_EMB if name == HF_EMB else name


def _hf_weight_files(src: str) -> list[str]:
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(src, v) for v in json.load(f)["weight_map"].values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(src, name)):
            return [os.path.join(src, name)]
    raise ConvertError(f"{src}: no model.safetensors(.index.json) or pytorch_model.bin")


def iter_hf_tensors(src: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) from an HF directory, one tensor at a time."""
    for path in _hf_weight_files(src):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    yield from_hf_name(k), f.get_tensor(k)
        else:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for k, v in sd.items():
                yield from_hf_name(k), v


def is_hf_dir(src: str) -> bool:
    try:
        with open(os.path.join(src, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} does not exist") from None
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None


def checked_tensors(config: MambaConfig, tensors: Iterator[tuple[str, torch.Tensor]], src: str):
    """Check names and shapes against the model config while streaming; a tied lm_head is dropped (it is the
    embedding). Raises at the end if a tensor was missing."""
    from . import layout

    shapes = layout.full_shapes(config)
    need = set(shapes) - ({"lm_head.weight"} if config.tie_embeddings else set())
    for name, t in tensors:
        if name not in shapes:
            raise ConvertError(f"{src}: tensor {name} is not part of a {config.mixer} model of this config")
        if tuple(t.shape) != shapes[name]:
            raise ConvertError(f"{src}: {name} has shape {tuple(t.shape)}, the config says {shapes[name]}")
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        need.discard(name)
        yield name, t
    if need:
        raise ConvertError(f"{src}: {len(need)} tensors are missing (e.g. {sorted(need)[0]})")

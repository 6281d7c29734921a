"""MambaConfig: the fields of mamba_ssm.models.config_mamba.MambaConfig (2.x), so a released config.json maps 1:1."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

MIXERS = ("Mamba1", "Mamba2")


@dataclass
class MambaConfig:
    d_model: int = 2560
    d_intermediate: int = 0  # > 0 adds a GatedMLP after each mixer (mamba_ssm's Block with mlp)
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)  # {"layer": "Mamba1"|"Mamba2", **mixer kwargs}
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for compatibility; the result is the same either way
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"MambaConfig.d_intermediate must be an integer >= 0, got {self.d_intermediate!r}")
        if not isinstance(self.ssm_cfg, dict):
            raise ValueError(f"MambaConfig.ssm_cfg must be a dict, got {type(self.ssm_cfg).__name__}")
        if self.mixer not in MIXERS:
            raise ValueError(f"MambaConfig.ssm_cfg['layer'] must be one of {MIXERS}, got {self.mixer!r}")
        if not isinstance(self.attn_layer_idx, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in self.attn_layer_idx):
            raise ValueError(f"MambaConfig.attn_layer_idx must be layer indices in [0, {self.n_layer}), "
                             f"got {self.attn_layer_idx!r}")
        if not isinstance(self.attn_cfg, dict):
            raise ValueError(f"MambaConfig.attn_cfg must be a dict, got {type(self.attn_cfg).__name__}")
        if self.attn_layer_idx and "num_heads" not in self.attn_cfg:
            raise ValueError("MambaConfig.attn_cfg: num_heads is required when attn_layer_idx is set")

    @property
    def mixer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size + (-self.vocab_size % self.pad_vocab_size_multiple)

    def resolved_ssm_cfg(self) -> dict:
        """ssm_cfg with the mixer's defaults filled in (tuples as lists): two configs that build the same mixer
        compare equal, however many default-valued keys each spells out."""
        return resolved_ssm_cfg(self.ssm_cfg)

    def resolved_attn_cfg(self) -> dict:
        """attn_cfg with MHA's defaults filled in (causal: true, explicitly, see model/mha.py)."""
        return resolved_attn_cfg(self.attn_cfg)

    def to_dict(self) -> dict:
        """The mamba_ssm config.json dict."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        """From a mamba_ssm config.json dict; unknown keys are an error (a typo would otherwise be ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MambaConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**copy.deepcopy(dict(d)))


_NOT_CONFIG = {"self", "d_model", "layer_idx", "backend", "device", "dtype", "process_group", "sequence_parallel"}


def resolved_ssm_cfg(ssm_cfg: dict) -> dict:
    """See MambaConfig.resolved_ssm_cfg."""
    import inspect

    from .mamba1 import Mamba
    from .mamba2 import Mamba2

    cfg = dict(ssm_cfg or {})
    layer = cfg.pop("layer", "Mamba1")
    cls = Mamba2 if layer == "Mamba2" else Mamba
    params = inspect.signature(cls.__init__).parameters
    out = {"layer": layer, **{k: p.default for k, p in params.items() if k not in _NOT_CONFIG
                              and p.default is not inspect.Parameter.empty}, **cfg}

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in out.items()}


_NOT_ATTN_CONFIG = {"self", "embed_dim", "layer_idx", "backend", "device", "dtype"}


def resolved_attn_cfg(attn_cfg: dict) -> dict:
    """attn_cfg with MHA's defaults filled in. `causal` is always present: mamba_ssm's MHA defaults to False
    (bidirectional), ours to True, so a config that leaves it out means different models in the two."""
    import inspect

    from .mha import MHA

    params = inspect.signature(MHA.__init__).parameters
    return {**{k: p.default for k, p in params.items() if k not in _NOT_ATTN_CONFIG
               and p.default is not inspect.Parameter.empty}, **dict(attn_cfg or {})}

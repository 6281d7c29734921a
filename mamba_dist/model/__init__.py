"""Mamba-1 / Mamba-2 language models (pure math: no torch.distributed, deepspeed or megatron here)."""

from .backend import resolve_backend
from .config import MambaConfig
from .conv import CausalConv1d
from .lm import Block, GatedMLP, MambaLMHeadModel, MixerModel, RMSNorm
from .mamba1 import Mamba
from .mamba2 import Mamba2, RMSNormGated

__all__ = ["Block", "CausalConv1d", "GatedMLP", "Mamba", "Mamba2", "MambaConfig", "MambaLMHeadModel",
           "MixerModel", "RMSNorm", "RMSNormGated", "resolve_backend"]

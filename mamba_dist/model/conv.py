"""Depthwise causal conv1d as a module, so that tensor parallelism can shard it in place and ZeRO-3 gathers its
weight around its own forward."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .backend import kernels


class CausalConv1d(nn.Conv1d):
    """Depthwise causal convolution over (B, C, L) with per-document restarts (seq_idx).

    Subclasses nn.Conv1d only for its parameters (weight (C, 1, W), bias (C,): mamba_ssm's `conv1d.*` keys) and
    its initialisation; forward runs the backend's kernel instead of F.conv1d, fusing the activation."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, activation: Optional[str] = "silu",
                 backend: str = "reference", device=None, dtype=None):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias,
                         device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kernels(self.backend).causal_conv1d(x, self.weight[:, 0, :], self.bias, seq_idx, self.activation)

    def step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        """One recurrent step: x (B, C) is the newest input; conv_state (B, C, W) holds the last W inputs and is
        shifted in place. Returns (B, C), the activation applied; computed in fp32 like the reference kernel."""
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        y = (conv_state.float() * self.weight[:, 0, :].float()).sum(-1)
        if self.bias is not None:
            y = y + self.bias.float()
        if self.activation == "silu":
            y = torch.nn.functional.silu(y)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"

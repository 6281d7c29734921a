"""Kernel backend choice: `reference` (pure PyTorch, any device) or `fused` (mamba_ssm / causal_conv1d CUDA
kernels). `resolve_backend("auto")` picks fused when CUDA is available and both packages import, else reference,
and logs the choice and the reason."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "fused")
# what the fused backend needs; mamba_ssm does not even import without its CUDA extension
_FUSED_MODULES = ("causal_conv1d", "mamba_ssm.ops.selective_scan_interface", "mamba_ssm.ops.triton.ssd_combined")


def fused_unavailable_reason(device: Optional[Union[str, torch.device]] = None) -> Optional[str]:
    """None if the fused backend can run (on `device`, if given), else why not."""
    if device is not None and torch.device(device).type != "cuda":
        return f"the model is on {torch.device(device).type}, the fused kernels need CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    for name in _FUSED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or an OSError/RuntimeError from a broken CUDA extension
            return f"cannot import {name} ({type(e).__name__}: {e})"
    return None


def resolve_backend(name: str = "auto", device: Optional[Union[str, torch.device]] = None) -> str:
    """"auto" | "reference" | "fused" -> "reference" | "fused"; logged. A requested but unusable "fused" raises."""
    if name not in BACKENDS:
        raise ValueError(f"model backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "reference":
        log.info("model backend: reference (requested)")
        return "reference"
    why = fused_unavailable_reason(device)
    if name == "fused":
        if why is not None:
            raise RuntimeError(f"model backend 'fused' is not usable: {why}")
        log.info("model backend: fused (requested)")
        return "fused"
    if why is None:
        log.info("model backend: fused (auto: CUDA and mamba_ssm/causal_conv1d are available)")
        return "fused"
    log.info("model backend: reference (auto: %s)", why)
    return "reference"


def kernels(backend: str) -> ModuleType:
    """The ops module of a resolved backend; ops.fused is imported only here, only when asked for."""
    if backend == "fused":
        return importlib.import_module("mamba_dist.model.ops.fused")
    if backend == "reference":
        return importlib.import_module("mamba_dist.model.ops.reference")
    raise ValueError(f"unresolved model backend {backend!r}; call resolve_backend() first")

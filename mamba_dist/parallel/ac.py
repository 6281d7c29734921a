"""Activation recomputation per block.

torch.utils.checkpoint with use_reentrant=False, not deepspeed.checkpointing: DeepSpeed's (reentrant) version
returns no parameter gradients for a block whose input does not require grad, and the first block's input (an
embedding output under ZeRO-3 partitioning, or any frozen prefix) is exactly that case.

The block's forward is replaced on the instance rather than wrapping the block in another module, so parameter
names (and therefore no-weight-decay sets, checkpoints and mamba_ssm compatibility) stay unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def selected_layers(n_layer: int, fraction: float) -> list[int]:
    """Indices of the layers to recompute: the first round(fraction * n_layer) (megatron's "block" method; which
    blocks does not change the memory saved, and the first ones hold their activations longest)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"activation recomputation fraction must be in [0, 1], got {fraction}")
    return list(range(int(round(fraction * n_layer))))


def _checkpointed_forward(orig_forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig_forward(*args, **kwargs)
    return checkpoint(orig_forward, *args, use_reentrant=False, **kwargs)


def apply_ac(model: torch.nn.Module, fraction: float) -> list[int]:
    """Recompute the activations of `fraction` of the blocks in `model.backbone.layers` during backward.
    Returns the indices wrapped. Idempotent per block."""
    layers = model.backbone.layers
    chosen = selected_layers(len(layers), fraction)
    for i in chosen:
        block = layers[i]
        if getattr(block, "_ac_enabled", False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._ac_enabled = True
    return chosen

"""Softmax cross-entropy and its logits gradient in one Triton kernel, written over the logits in place.

ops/cross_entropy.py computes each chunk's logits (tokens x 50k vocabulary, bf16) and needs, per row, the loss
lse - logit[target] and the gradient scale * (softmax - onehot). In torch's own kernels that is three passes:
log_softmax reads the bf16 logits and writes fp32 (twice their size), exp_ reads and writes that, one multiply reads
it and writes the bf16 gradient: about 20 bytes moved per logit, ~17 GB a step at 8 x 2048 tokens and a 50k
vocabulary. Here one program per row reads the row twice (an online max / sum of exponentials, then the gradient)
and writes it once, in the logits' own dtype: 6 bytes per logit (~5 GB), no fp32 buffer. The arithmetic is fp32
as in the torch path; the two differ only in rounding (the sum's order), which tests/test_cross_entropy.py bounds.

liger-kernel's LigerCrossEntropyFunction does the same per-row work (it also writes the gradient over its input).
It is not used because the device image does not have it (one more carried wheel, and CPU CI would pull Triton for
nothing), its positional arguments changed between releases (label smoothing, reduction, softcap, z-loss), and its
reductions normalise per call where the chunks here need one scale from the whole batch's token count; the kernel
is forty lines. The pure-torch path in ops/cross_entropy.py is its twin and runs wherever Triton does not (CPU);
TRITON_INTERPRET=1 runs the kernel itself on CPU tensors (tests/test_cross_entropy.py, where Triton is installed)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch twin runs instead
    triton = None

_BLOCK = 4096  # vocabulary entries per iteration: 8 KB of bf16 per load, 13 iterations at a 50k vocabulary


def available_on(device: torch.device) -> bool:
    """Whether the kernel runs on this device (CUDA with Triton, or the Triton interpreter on CPU)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def available(logits: Tensor) -> bool:
    """Whether the kernel can run on these logits (its device, and rows of unit stride)."""
    return logits.dim() == 2 and logits.stride(1) == 1 and available_on(logits.device)


if triton is not None:
    @triton.jit
    def _xent_rows(logits_ptr, row_stride, target_ptr, scale_ptr, loss_ptr, V, WRITE_GRAD: tl.constexpr,
                   BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(target_ptr + row).to(tl.int64)
        # pass 1: the row's max and sum of exp(x - max), carried online so the row is read once
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - tl.load(base + target).to(tl.float32))
        if WRITE_GRAD:
            # pass 2: scale * (softmax - onehot), over the logits in their own dtype
            scale = tl.load(scale_ptr + row)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(cols == target, g - 1.0, g) * scale
                # fp32 -> bf16 rounds to nearest even on the GPU, as torch's cast (Triton's interpreter truncates)
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def xent_rows_(logits: Tensor, target: Tensor, scale: Tensor, write_grad: bool = True) -> Tensor:
    """Per-row loss logsumexp(logits[i]) - logits[i, target[i]] in fp32, (n,). With write_grad, logits (n, V) is
    overwritten with scale[i] * (softmax(logits[i]) - onehot(target[i])) in its own dtype. target (n,) integer in
    [0, V) (ignored rows: any valid index and a zero scale); scale (n,) fp32."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _xent_rows[(n,)](logits, logits.stride(0), target.contiguous(), scale.to(torch.float32).contiguous(), loss,
                         V, WRITE_GRAD=write_grad, BLOCK=_BLOCK, num_warps=8)
    return loss


__all__ = ["available", "xent_rows_"]

"""lm_head fused with the cross-entropy loss, chunked over tokens: the (tokens x vocab) logits never exist at once.

At 8 x 2048 tokens and a 50k vocabulary the plain path holds bf16 logits (1.6 GB), their fp32 copy (3.3 GB) and the
fp32 gradient (3.3 GB). Here each chunk of tokens computes its logits, its loss terms and at once its gradients
(dlogits = softmax - onehot, then dhidden = dlogits W and dW += dlogits^T hidden), and frees the chunk; backward
only scales the stored gradients by the incoming scalar. The same arithmetic as the plain path under autocast
(bf16 matmuls, fp32 softmax), except that dW is summed in fp32 over chunks.

Written here rather than taken from liger-kernel / cut-cross-entropy because it must run on CPU too (the reference
backend, CI) and under autocast with fp32 master weights; it is pure PyTorch, so it is its own twin, and
tests/test_cross_entropy.py compares it with F.cross_entropy on full logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import xent_kernel

IGNORE_INDEX = -100
# fp32 logits per chunk at most this many elements (2^28 x 4 B = 1 GiB): big enough for full-speed matmuls
_CHUNK_ELEMENTS = 1 << 28


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int,
                compute_dtype: torch.dtype, grad_enabled: bool) -> Tensor:
        n, d = hidden.shape
        # gradients are computed here, in forward: only those that will be asked for (none under no_grad)
        need_dh, need_dw = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1).to(acc_dtype)
        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_dw else None
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(compute_dtype)
            y, ok = labels[s:s + chunk], valid[s:s + chunk]
            target = torch.where(ok, y, torch.zeros_like(y))
            logits = h @ w.t()  # in the compute dtype, rounded like autocast's logits
            grads = need_dh or need_dw
            # d(mean loss)/d logits = (softmax - onehot) / count, zero on ignored rows
            scale = ok.to(acc_dtype) / count
            if xent_kernel.available(logits):
                # one Triton kernel: two reads of the chunk and the gradient written over it (xent_kernel.py)
                loss += (xent_kernel.xent_rows_(logits, target, scale, write_grad=grads) * ok).sum()
                g = logits
            else:
                # its twin in three passes (the fewest torch's own kernels allow): log_softmax reads the logits and
                # writes fp32; exp_ turns that into the softmax in place; one multiply writes the scaled gradient
                # back over the logits' buffer in the compute dtype
                logp = torch.log_softmax(logits, dim=-1, dtype=acc_dtype)
                loss -= (logp.gather(1, target[:, None]).squeeze(1) * ok).sum()
                if grads:
                    g = logp.exp_()
                    g.scatter_add_(1, target[:, None], -torch.ones_like(target[:, None], dtype=g.dtype))
                    g = torch.mul(g, scale[:, None], out=logits)
                del logp
            if need_dh:
                dh[s:s + chunk] = (g @ w).to(hidden.dtype)
            if need_dw:
                dw += (g.t() @ h).to(acc_dtype)
            del logits
        ctx.save_for_backward(dh if need_dh else None, dw if need_dw else None)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_tokens: Optional[int] = None) -> Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T against labels, over labels != ignore_index.

    hidden (..., d), weight (V, d), labels (...) long. Matmuls run in the autocast dtype when autocast is on
    (bf16 with fp32 master weights: the weight's gradient comes back fp32), the softmax in fp32."""
    compute_dtype = _compute_dtype(hidden)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {y.shape[0]} labels")
    # with the Triton kernel a chunk holds only its logits in the compute dtype (no fp32 copy): twice the tokens
    # in the same memory, and half the passes that add each chunk's weight gradient into the fp32 sum
    budget = _CHUNK_ELEMENTS * (2 if xent_kernel.available_on(h.device) else 1)
    chunk = chunk_tokens or max(256, budget // max(1, weight.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, y, ignore_index, chunk, compute_dtype, torch.is_grad_enabled())


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The unfused twin: full logits through F.linear (autocast applies), fp32 cross-entropy."""
    logits = F.linear(hidden, weight)
    logits = logits.flatten(0, -2).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.flatten(), ignore_index=ignore_index)


__all__ = ["linear_cross_entropy", "reference_linear_cross_entropy", "IGNORE_INDEX"]

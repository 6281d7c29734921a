"""The chunked lm_head + cross-entropy (model/ops/cross_entropy.py) against F.cross_entropy on full logits."""

import pytest
import torch

from mamba_dist.model.ops.cross_entropy import linear_cross_entropy, reference_linear_cross_entropy


def _case(n=37, d=24, v=101, ignore=(3, 4, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[list(ignore)] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_chunked_equals_full_logits(chunk):
    h, w, y = _case()
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hs, ws, y, chunk_tokens=chunk)
    ref = reference_linear_cross_entropy(hr, wr, y)
    (loss * 1.7).backward()
    (ref * 1.7).backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)
    assert torch.allclose(hs.grad, hr.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(ws.grad, wr.grad, rtol=1e-10, atol=1e-14)
    assert hs.grad[3].abs().max() == 0  # an ignored token gets no gradient


def test_batched_shapes_no_grad_and_all_ignored():
    h, w, y = _case(n=24)
    h3, y3 = h.reshape(2, 12, -1).float(), y.reshape(2, 12)
    ref = reference_linear_cross_entropy(h3, w.float(), y3)
    with torch.no_grad():
        got = linear_cross_entropy(h3, w.float(), y3, chunk_tokens=7)
    assert torch.allclose(got, ref, rtol=1e-5)
    none = torch.full_like(y3, -100)
    assert linear_cross_entropy(h3, w.float(), none).item() == 0.0  # no NaN from 0/0
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h3, w.float(), y3[:, :5])


def test_autocast_bf16_weight_grad_stays_fp32():
    # CPU autocast runs the matmuls in bf16, the softmax in fp32; the fp32 master weight gets an fp32 gradient
    h, w, y = _case(n=64, d=32, v=96)
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    hr, wr = h.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hf, wf, y, chunk_tokens=16)
        ref = reference_linear_cross_entropy(hr, wr, y)
    loss.backward()
    ref.backward()
    assert wf.grad.dtype == torch.float32 and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())  # same bf16 logits, both fp32 softmax
    assert (wf.grad - wr.grad).norm() / wr.grad.norm() < 1e-2  # bf16 rounding of dlogits / dW
    assert (hf.grad - hr.grad).norm() / hr.grad.norm() < 1e-2

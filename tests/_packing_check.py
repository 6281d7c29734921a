"""The packed-equals-separate check shared by tests/test_model_packing.py (pure Mamba) and
tests/test_model_hybrid.py (hybrids): a model run on packed rows (seq_idx) must give each document the logits it
gets alone, and the packed gradient of a weighted sum of the logits must equal the sum of the per-document
gradients, each within `tol` (max|a - b| / max|b|)."""

import torch

from mamba_dist.model.packing import seq_idx_from_lengths


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_packed_equals_separate(model, layouts, seq: int, tol: float) -> dict:
    """Asserts the above for rows laid out as `layouts` (document lengths per row); returns the gradients."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (len(layouts), seq), generator=g)
    weights = torch.randn(len(layouts), seq, model.lm_head.weight.shape[0], generator=g)

    model.zero_grad()
    packed = model(ids, seq_idx_from_lengths(layouts))
    (packed * weights).sum().backward()
    g_packed = grads(model)

    model.zero_grad()
    for r, row in enumerate(layouts):
        start = 0
        for n in row:
            doc = model(ids[r:r + 1, start:start + n])  # alone, no seq_idx
            err = rel_err(packed[r:r + 1, start:start + n].detach(), doc.detach())
            assert err <= tol, f"row {r} doc at {start} (len {n}): logits rel err {err:.3g}"
            (doc * weights[r:r + 1, start:start + n]).sum().backward()  # grads accumulate over documents
            start += n
    g_sep = grads(model)

    assert set(g_packed) == set(g_sep) == {n for n, _ in model.named_parameters()}
    for name in g_sep:
        err = rel_err(g_packed[name], g_sep[name])
        assert err <= tol, f"grad {name}: rel err {err:.3g}"
    return g_sep

"""Packed rows with document resets equal the documents run one by one (reference backend, CPU, fp32):
the logits of every document and every parameter gradient (packed loss = sum of per-document losses, so the
packed gradient must equal the sum of the per-document gradients), each to <= 1e-5 relative
(max|a - b| / max|b|).

Small chunk sizes (8) put chunk borders inside and at the end of documents for both mixers: Mamba-2's SSD chunk,
and the Mamba-1 scan's chunk (ops.reference.CHUNK, patched down from 64)."""

import pytest
import torch
from _packing_check import check_packed_equals_separate, rel_err

from mamba_dist.model import MambaConfig, MambaLMHeadModel
from mamba_dist.model.ops import reference

TOL = 1e-5
SEQ = 32
# document lengths per row (chunk size 8): a 1-token document first and in the middle; a document ending exactly
# on a chunk border (1+7 = 8) and one filling a whole chunk (8..15); documents crossing borders; a full row
LAYOUTS = [
    [1, 7, 8, 1, 15],
    [20, 1, 1, 10],
    [3, 13, 16],
    [SEQ],
]


def build(mixer: str):
    if mixer == "Mamba1":
        ssm = {"layer": "Mamba1", "d_state": 8}
    else:
        ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=ssm)
    torch.manual_seed(0)
    # at init dt is small (0.001..0.1): states decay slowly, so any leak across a document start would be large
    return MambaLMHeadModel(cfg, backend="reference")


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_packed_equals_separate(mixer, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 8)
    model = build(mixer)
    check_packed_equals_separate(model, LAYOUTS, SEQ, TOL)


@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_without_reset_documents_leak(mixer, monkeypatch):
    """Guard for the test above: without seq_idx, later documents do see earlier ones."""
    monkeypatch.setattr(reference, "CHUNK", 8)
    model = build(mixer)
    ids = torch.randint(0, 64, (1, SEQ))
    with torch.no_grad():
        packed = model(ids)
        alone = model(ids[:, 20:])
    assert rel_err(packed[:, 20:], alone) > 1e-3


def test_seq_idx_all_zero_equals_none():
    model = build("Mamba2")
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        assert rel_err(model(ids, torch.zeros(2, 19, dtype=torch.int32)), model(ids)) <= TOL

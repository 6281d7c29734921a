"""Tiny models and packed batches shared by the parallel tests (built identically on every rank)."""

import torch
from mamba_dist.model.packing import seq_idx_from_lengths

D_MODEL, N_LAYER, VOCAB, SEQ, BATCH = 32, 2, 60, 32, 2

# document lengths per row: a 1-token document, documents crossing the SSD chunk border (chunk 8), one exact fit
DOCS = [[5, 1, 18, 8], [16, 16]]


def build_model(kind: str, seed: int = 0):
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    """kind: "mamba1", "mamba2" (ngroups 4, chunk 8), "mamba2-mlp" (with mamba_ssm's GatedMLP after each mixer),
    or a hybrid of 4 layers with attention at 1 and 3 (GQA 8 query / 4 kv heads, rotary, packed-row masking):
    "hybrid1" (Mamba-1; the attention has its conv), "hybrid2" (Mamba-2; in-attention MLP and GatedMLPs)."""
    if kind in ("mamba1", "hybrid1"):
        ssm = {"layer": "Mamba1", "d_state": 8}
    else:
        ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 4, "chunk_size": 8}
    hybrid = {}
    if kind.startswith("hybrid"):
        attn = {"num_heads": 8, "num_heads_kv": 4, "head_dim": 4, "rotary_emb_dim": 4}
        attn.update({"d_conv": 4} if kind == "hybrid1" else {"mlp_dim": 32, "qkv_proj_bias": False})
        hybrid = {"n_layer": 4, "attn_layer_idx": [1, 3], "attn_cfg": attn}
    cfg = MambaConfig(**{"d_model": D_MODEL, "n_layer": N_LAYER, "vocab_size": VOCAB, "ssm_cfg": ssm,
                         "pad_vocab_size_multiple": 8,
                         "d_intermediate": 48 if kind.endswith("-mlp") or kind == "hybrid2" else 0, **hybrid})
    torch.manual_seed(seed)
    return MambaLMHeadModel(cfg, backend="reference")


def seq_idx_from_docs(docs=DOCS) -> torch.Tensor:
    return seq_idx_from_lengths(docs)


def batch(model=None, seed: int = 0, rows: int = BATCH, docs=DOCS):
    """(input_ids, labels, seq_idx) of shape (rows, SEQ): arithmetic token sequences (random start and stride per
    row, so a few optimizer steps visibly lower the loss); labels are in the real (unpadded) vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    seq_idx = seq_idx_from_docs(docs)
    seq_idx = seq_idx.repeat((rows + len(docs) - 1) // len(docs), 1)[:rows]
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), seq_idx

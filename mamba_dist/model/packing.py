"""Packed-row helpers: building the `seq_idx` the model takes from per-row document lengths."""

from __future__ import annotations

from typing import Sequence

import torch


def seq_idx_from_lengths(rows: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """(B, L) int32 document ids from the document lengths of each row, e.g. [[3, 1], [4]] ->
    [[0, 0, 0, 1], [0, 0, 0, 0]]. Every row must have the same total length."""
    ids = [torch.repeat_interleave(torch.arange(len(r), dtype=torch.int32), torch.tensor(r, dtype=torch.long))
           for r in rows]
    if len({len(r) for r in ids}) > 1:
        raise ValueError(f"seq_idx_from_lengths: rows have different lengths {[len(r) for r in ids]}")
    return torch.stack(ids).to(device)


def random_packed_batches(n: int, rows: int, seqlen: int, vocab: int, docs: int, device=None,
                          seed: int = 0) -> list:
    """n synthetic (input_ids, labels, seq_idx) batches for benchmarks: random tokens, `docs` documents per row
    cut at random positions (so every layer resets its state inside the row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, seqlen + 1), generator=g)
        cuts = torch.sort(torch.randint(1, seqlen, (rows, docs - 1), generator=g), dim=1).values
        seq_idx = (torch.arange(seqlen)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32)
        out.append((ids[:, :-1].to(device), ids[:, 1:].to(device), seq_idx.to(device)))
    return out


def doc_lengths(seq_idx: torch.Tensor) -> list:
    """The inverse of seq_idx_from_lengths: per row, the lengths of its documents (runs of equal seq_idx)."""
    return [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in seq_idx.cpu()]

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

"""A weighted mixture of prepared datasets (`data.sources: [{path, weight}, ...]`): deterministic, rank-split,
exactly resumable, memory independent of the number of rows.

Order. Global step j (G = dp_size x micro_batch_size rows) takes from source s the rows at positions
[C_s(j), C_s(j+1)) of that source's own row stream, C_s from `order.MixtureCounts` (within one row of
j * G * w_s, so any window of steps holds each source in its proportion to within 1/G). Source s's row stream
is its train split's epochs one after another, each permuted by `order.epoch_permutation(n_s, seed, e, s + 1)`:
a source that runs out starts its next epoch by itself (`source_epochs()` says where each stands). The G rows of
the step are then put in a keyed order (a permutation of [0, G) keyed by seed and j) and rank r takes its r-th
slice of B rows, so every rank sees the mixture and a step's rows do not depend on how G is split into ranks.

State. `state_dict()` holds the global step counter (plus what identifies the mixture); everything else
follows from it, so resuming is a seek, under any num_workers, and under another dp_size x micro_batch_size
when the rows consumed divide.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .loader import _Reader, _identity, make_batch, open_split
from .order import MixtureCounts, Permutation, epoch_permutation, round_keys


@dataclass
class SourceSpec:
    name: str
    path: str
    weight: float


def source_name(path: str) -> str:
    return os.path.basename(str(path).rstrip("/")) or str(path)


class _MixtureDataset(Dataset):
    def __init__(self, readers: list[_Reader], counts: MixtureCounts, B: int, rank: int, dp: int, seed: int,
                 return_meta: bool):
        self.readers, self.counts, self.B, self.rank, self.dp = readers, counts, B, rank, dp
        self.seed, self.return_meta = seed, return_meta
        self._perms: dict = {}

    def _perm(self, s: int, epoch: int) -> Permutation:
        key = (s, epoch)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 4 * len(self.readers):
                self._perms.clear()
            p = self._perms[key] = epoch_permutation(self.readers[s].n_rows, self.seed, epoch, s + 1)
        return p

    def step_rows(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, row id within the source) of this rank's B rows of global step j."""
        lo, hi = self.counts.before(j), self.counts.before(j + 1)
        src, rows = [], []
        for s, (a, b) in enumerate(zip(lo, hi)):
            t = np.arange(a, b, dtype=np.int64)  # positions in source s's stream of epochs
            n = self.readers[s].n_rows
            ep, pos = t // n, t % n
            r = np.empty_like(t)
            for e in np.unique(ep):
                sel = ep == e
                r[sel] = self._perm(s, int(e))(pos[sel])
            src.append(np.full(len(t), s, np.int64))
            rows.append(r)
        src, rows = np.concatenate(src), np.concatenate(rows)
        G = len(src)
        mine = Permutation(G, round_keys(self.seed, j, 1 << 30))(self.rank * self.B + np.arange(self.B))
        return src[mine], rows[mine]

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        src, rows = self.step_rows(j)
        parts = {}
        for s in np.unique(src):
            sel = np.flatnonzero(src == s)
            parts[int(s)] = (sel, self.readers[int(s)].rows(rows[sel]))
        first = next(iter(parts.values()))[1]
        got = {k: np.empty((self.B,) + v.shape[1:], v.dtype) for k, v in first.items()}
        for sel, part in parts.values():
            for k in got:
                got[k][sel] = part[k]
        batch = make_batch(got)
        if self.return_meta:
            info = get_worker_info()
            batch.update(source=src, row_ids=rows, first_doc=got["first_doc"],
                         worker=np.array(info.id if info else -1), index=np.array([j]))
        return batch

    def __len__(self) -> int:  # a mixture has no end; DataLoader only needs __getitem__
        return 1 << 62


class _StepSampler(Sampler):
    def __init__(self, cursor: dict):
        self.cursor = cursor

    def __iter__(self):
        return itertools.count(self.cursor["position"])


class MixtureLoader:
    """Endless iterable of training batches from several prepared datasets in given proportions (see module
    docstring). Same batch layout as PackedLoader; `return_meta` adds "source" (index into `sources`)."""

    def __init__(self, sources: Sequence[SourceSpec | dict], split: str, micro_batch_size: int, seq_len: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, seed: int = 0, tokenizer=None,
                 skip_corrupt: bool = False, *, return_meta: bool = False, pin_memory: bool = False,
                 verify: str = "full", root=None, cache_bytes: int = 64 << 20, prefetch_factor: int | None = None,
                 tokenizer_cache=None, shard_cache=None, shard_cache_bytes: int = 0):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.sources = [s if isinstance(s, SourceSpec) else
                        SourceSpec(s.get("name") or source_name(s["path"]), s["path"], float(s["weight"]))
                        for s in sources]
        self.split, self.B, self.dp_rank, self.dp_size, self.seed = split, micro_batch_size, dp_rank, dp_size, seed
        readers, first = [], None
        self.skipped_shards = []
        for spec in self.sources:
            m, reader, skipped = open_split(spec.path, split, seq_len, tokenizer, skip_corrupt, verify=verify,
                                            root=root, cache_bytes=cache_bytes // len(self.sources),
                                            tokenizer_cache=tokenizer_cache, shard_cache=shard_cache,
                                            shard_cache_bytes=shard_cache_bytes)
            check_same_data(spec, m, first)
            first = first or (spec, m)
            if reader.n_rows == 0:
                raise ValueError(f"data source {spec.name} ({spec.path}): its {split} split has no rows")
            readers.append(reader)
            self.skipped_shards += skipped
        self.manifest = first[1]
        self.n_rows_per_source = [r.n_rows for r in readers]
        self._counts = MixtureCounts([s.weight for s in self.sources], micro_batch_size * dp_size)
        self._dataset = _MixtureDataset(readers, self._counts, micro_batch_size, dp_rank, dp_size, seed, return_meta)
        self._cursor = {"position": 0}
        self.num_workers, self.pin_memory = num_workers, pin_memory
        kw = {} if num_workers == 0 else {"persistent_workers": True, "prefetch_factor": prefetch_factor or 2}
        self._dl = DataLoader(self._dataset, batch_size=None, sampler=_StepSampler(self._cursor),
                              num_workers=num_workers, collate_fn=_identity, **kw)

    @property
    def position(self) -> int:
        """Global steps handed out so far."""
        return self._cursor["position"]

    @property
    def tokens_per_batch(self) -> int:
        return self.B * self.manifest["seq_len"]

    def source_epochs(self) -> dict[str, int]:
        """Epoch each source's row stream is in at the current position (0 = first pass)."""
        used = self._counts.before(self.position)
        return {s.name: u // n for s, u, n in zip(self.sources, used, self.n_rows_per_source)}

    def __iter__(self):
        for arrays in self._dl:
            batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            self._cursor["position"] += 1
            yield batch

    def _identity(self) -> dict:
        return {"kind": "mixture", "seed": self.seed, "split": self.split,
                "sources": [[s.name, s.weight, n] for s, n in zip(self.sources, self.n_rows_per_source)]}

    def state_dict(self) -> dict[str, Any]:
        g = self.B * self.dp_size
        return {**self._identity(), "position": self.position, "global_batch_rows": g,
                "rows_consumed": self.position * g, "source_epochs": self.source_epochs()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self._identity().items():
            got = state.get(k)
            if k == "sources" and got is not None:
                got = [list(x) for x in got]
            if got != v:
                raise ValueError(f"loader state does not fit this loader: {k}={got!r} in the state, {v!r} here "
                                 f"(different data sources, weights, split or seed)")
        g = self.B * self.dp_size
        if state["rows_consumed"] % g:
            raise ValueError(f"loader state consumed {state['rows_consumed']} rows, not a multiple of this run's "
                             f"dp_size x micro_batch_size = {g}")
        self._cursor["position"] = state["rows_consumed"] // g


def check_same_data(spec: SourceSpec, m: dict, first: tuple[SourceSpec, dict] | None) -> None:
    """All sources of a mixture share one tokenizer and seq_len: ValueError naming the source otherwise."""
    if first is None:
        return
    f_spec, f = first
    if m["tokenizer"]["sha256"] != f["tokenizer"]["sha256"]:
        raise ValueError(f"data source {spec.name} ({spec.path}) was prepared with tokenizer "
                         f"{m['tokenizer']['name']!r}, source {f_spec.name} with {f['tokenizer']['name']!r}: all "
                         f"sources must share one tokenizer")
    if m["seq_len"] != f["seq_len"]:
        raise ValueError(f"data source {spec.name} ({spec.path}) has seq_len {m['seq_len']}, source {f_spec.name} "
                         f"{f['seq_len']}: all sources must share one seq_len")


# ------------------------------------------------------------------------------------------- trainer helpers

def data_sources(data_cfg) -> list[SourceSpec]:
    """The config's datasets: data.sources when set (it replaces data.path), else data.path with weight 1."""
    if data_cfg.sources:
        return [SourceSpec(s.get("name") or source_name(s["path"]), s["path"], float(s.get("weight", 1.0)))
                for s in data_cfg.sources]
    return [SourceSpec(source_name(data_cfg.path), data_cfg.path, 1.0)]


def build_train_loader(data_cfg, **kw):
    """PackedLoader for data.path, MixtureLoader for data.sources."""
    from .loader import build_loader

    common = dict(root=data_cfg.root or None, verify=data_cfg.verify)
    if data_cfg.sources:
        return MixtureLoader(data_sources(data_cfg), "train", **common, **kw)
    return build_loader(data_cfg.path, "train", **common, **kw)


def build_val_loaders(data_cfg, min_rows: int, **kw) -> list[tuple[str, float, Any, dict]]:
    """(name, weight, loader, its start state) per source whose val split holds at least min_rows rows (one batch
    on every rank); a mixture's sources without enough val rows are left out of validation (logged)."""
    import logging

    from .loader import build_loader, read_manifest

    out = []
    for spec in data_sources(data_cfg):
        rows = read_manifest(spec.path)["splits"].get("val", {}).get("rows", 0)
        if rows < min_rows:
            logging.getLogger("mamba_dist.train").warning(
                "data source %s: its val split has %d rows, fewer than one batch (%d); not validated", spec.name,
                rows, min_rows)
            continue
        ld = build_loader(spec.path, "val", root=data_cfg.root or None, verify=data_cfg.verify, num_workers=0, **kw)
        out.append((spec.name, spec.weight, ld, ld.state_dict()))
    return out

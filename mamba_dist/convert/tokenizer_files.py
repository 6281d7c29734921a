"""The data's tokenizer as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), so `AutoTokenizer.from_pretrained(export_dir)` gives the ids training saw.

The byte tokenizer of the demo (id = UTF-8 byte, EOS = 256) has no JSON of its own; `byte_tokenizer_json` builds
one with the `tokenizers` library: a BPE whose vocabulary is the 256 byte-fallback pieces `<0x00>`..`<0xFF>` (ids
0-255, in byte order) with no merges and no pre-tokenizer. No character is in that vocabulary (only the 6-character
`<0x..>` strings are, and with no merges BPE never joins characters), so every character falls back to its UTF-8
bytes: ids == bytes, for any text. `<|endoftext|>` (256) is an added special token. The decoder turns the byte
pieces back into text (ByteFallback + Fuse).

`split_special_tokens=True` in tokenizer_config.json makes a literal "<|endoftext|>" in a text encode as text, as
the trainer's tokenizers do (`encode_special_tokens=True`, see data/tokenizer.py).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from mamba_dist.data.tokenizer import BYTE_EOS, BYTE_NAME, Tokenizer, load_tokenizer

from .source import Checkpoint, ConvertError

BYTE_EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab[BYTE_EOS_TOKEN] = BYTE_EOS
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.add_special_tokens([BYTE_EOS_TOKEN])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok.to_str()


def resolve_tokenizer(ck: Checkpoint, override: Optional[str] = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: --tokenizer, else the tokenizer file an import stored beside
    the weights, else the one the data manifest names (checked against the manifest's fingerprint)."""
    if override:
        return load_tokenizer(override)
    stored = ck.meta.get("tokenizer_file")
    if stored:
        return load_tokenizer(os.path.join(ck.path, stored))
    from mamba_dist.data.loader import ManifestError, read_manifest

    data = ck.config.data
    try:
        ident = read_manifest(data.path)["tokenizer"]
    except (ManifestError, OSError):
        if data.tokenizer:
            return load_tokenizer(data.tokenizer)
        raise ConvertError(f"checkpoint {ck.path}: its data ({data.path!r}) is gone and its config names no "
                           f"tokenizer; pass --tokenizer byte|gpt-neox-20b|PATH") from None
    tok = load_tokenizer(ident["name"])
    if tok.sha256 != ident["sha256"]:
        raise ConvertError(f"tokenizer {ident['name']!r} here differs from the one {data.path} was prepared with "
                           f"(fingerprint {tok.sha256[:12]} vs {ident['sha256'][:12]}); pass --tokenizer PATH")
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    if tok.name == BYTE_NAME and tok.path is None:
        return byte_tokenizer_json()
    with open(tok.path, encoding="utf-8") as f:
        return f.read()


def eos_token(tok: Tokenizer, spec: dict) -> str:
    for t in spec.get("added_tokens", []):
        if t["id"] == tok.eos_id:
            return t["content"]
    vocab = spec.get("model", {}).get("vocab") or {}
    if isinstance(vocab, dict):
        for k, v in vocab.items():
            if v == tok.eos_id:
                return k
    raise ConvertError(f"tokenizer {tok.name}: no token string for EOS id {tok.eos_id}")


def write_tokenizer(tok: Tokenizer, out: str) -> dict:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json into `out`; returns the special ids."""
    text = tokenizer_json(tok)
    spec = json.loads(text)
    eos = eos_token(tok, spec)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    special = {"bos_token": eos, "eos_token": eos, "pad_token": eos}  # GPT-NeoX / released Mamba convention
    config = {**special, "tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": int(1e30)}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}

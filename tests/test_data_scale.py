"""Data at scale (issue 13): O(1)-memory order, parquet inputs, partitioned prepare + merge, mixtures, loss masks,
remote shards over HTTP. Byte tokenizer throughout (no download)."""

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from pydoc_data.topics import topics

from mamba_dist.data import InputError, build_loader
from mamba_dist.data.loader import ShardError
from mamba_dist.data.mixture import MixtureLoader
from mamba_dist.data.order import MixtureCounts, epoch_permutation
from mamba_dist.data.prepare import main, merge, prepare

DOCS = [topics[k] for k in sorted(topics)]
L = 64


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def all_batches(data_dir, B=4, n=None, **kw):
    ld = build_loader(data_dir, "train", B, L, seed=3, return_meta=True, **kw)
    out = []
    for b in ld:
        out.append({k: v.clone() for k, v in b.items() if k != "worker"})
        if n and len(out) == n:
            break
    return out


def same(a, b, skip=()):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x.keys() - set(skip):
            assert torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------------- order

def test_permutation_is_a_bijection_keyed_and_needs_no_table():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        p = epoch_permutation(n, seed=3, epoch=1)
        assert sorted(p(np.arange(n)).tolist()) == list(range(n))
    n = 10_000
    a, b = epoch_permutation(n, 0, 0)(np.arange(n)), epoch_permutation(n, 0, 1)(np.arange(n))
    assert (a != b).mean() > 0.99 and not (a == np.arange(n)).all()
    # random access at 300B-token scale: any position costs the same; nothing per row is stored
    big = epoch_permutation(146_000_000, 0, 0)
    pos = np.array([0, 1, 145_999_999, 77_000_000])
    got = big(pos)
    assert ((got >= 0) & (got < 146_000_000)).all() and len(set(got.tolist())) == 4
    assert sum(v.nbytes for v in vars(big).values() if isinstance(v, np.ndarray)) < 100
    # the first block of positions is spread over the whole range (not a local shuffle)
    first = big(np.arange(1000))
    assert first.min() < 5_000_000 and first.max() > 140_000_000


def test_mixture_counts_follow_weights_exactly():
    c = MixtureCounts([0.6, 0.3, 0.1], 8)
    for j in (0, 1, 7, 999, 123_456):
        got = c.before(j)
        assert sum(got) == 8 * j and all(abs(g - 8 * j * w) <= 1 for g, w in zip(got, (0.6, 0.3, 0.1)))
    steps = [np.subtract(c.before(j + 1), c.before(j)) for j in range(5000)]
    assert all((s >= 0).all() for s in steps)


# ------------------------------------------------------------------------------------------------ parquet

def test_parquet_prepare_equals_jsonl_byte_for_byte(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:120] + [""]  # an empty document is skipped in both
    write_jsonl(tmp_path / "a.jsonl", docs)
    pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), tmp_path / "a.parquet",
                   row_group_size=16)  # several row groups, streamed one record batch at a time
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups >= 4
    kw = dict(tokenizer="byte", seq_len=L, val_fraction=0.05, workers=0, progress=False, shard_tokens=20_000)
    mj = prepare(str(tmp_path / "a.jsonl"), tmp_path / "j", **kw)
    # --text-field names the parquet column; a directory and a glob find .parquet files too
    mp = prepare(str(tmp_path / "*.parquet"), tmp_path / "p", text_field="content", **kw)
    for s in ("train", "val"):
        assert [x["sha256"] for x in mp["splits"][s]["shards"]] == [x["sha256"] for x in mj["splits"][s]["shards"]]
        assert len(mj["splits"][s]["shards"]) >= (3 if s == "train" else 1)
        for x in mj["splits"][s]["shards"]:
            assert (tmp_path / "p" / x["path"]).read_bytes() == (tmp_path / "j" / x["path"]).read_bytes()
    with pytest.raises(InputError, match=r"a.parquet: no column 'text' \(columns: id, content"):
        prepare(str(tmp_path / "a.parquet"), tmp_path / "x", **kw)
    with pytest.raises(InputError, match=r"column 'id' is int64, not a string column"):
        prepare(str(tmp_path / "a.parquet"), tmp_path / "x", text_field="id", **kw)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------- partitioned prepare

@functools.lru_cache(maxsize=None)
def _corpus_files(root: str) -> list[str]:
    """7 JSONL files of different sizes, in a directory."""
    d = Path(root) / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    cuts = [0, 8, 14, 35, 47, 60, 70, len(DOCS)]
    return [str(write_jsonl(d / f"f{i}.jsonl", DOCS[a:b])) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


PART_KW = dict(tokenizer="byte", seq_len=L, val_fraction=0.05, workers=0, progress=False, chunk_bytes=60_000,
               shard_tokens=30_000)


def prepare_parts(tmp_path, n=3):
    files = _corpus_files(str(tmp_path))
    parts = []
    for i in range(n):
        assert main([*files, "--out", str(tmp_path / f"part{i}"), "--tokenizer", "byte", "--seq-len", str(L),
                     "--val-fraction", "0.05", "--workers", "0", "--chunk-bytes", "60000", "--shard-tokens",
                     "30000", "--part", f"{i}/{n}", "-q"]) == 0
        parts.append(str(tmp_path / f"part{i}"))
    return files, parts


def test_partitioned_prepare_and_merge_equal_unpartitioned(tmp_path, capsys):
    files, parts = prepare_parts(tmp_path)
    full = prepare(str(tmp_path / "corpus"), tmp_path / "full", **PART_KW)
    assert full["chunks"] >= 4
    ms = [json.loads((Path(p) / "manifest.json").read_text()) for p in parts]
    assert all(m["splits"]["train"]["rows"] > 0 for m in ms)  # every part did work
    assert [m["part"]["chunks"] for m in ms][0][0] == 0 and ms[-1]["part"]["chunks"][1] == full["chunks"]
    # a part is not trainable on its own
    with pytest.raises(Exception, match="part 0/3 of a partitioned prepare"):
        build_loader(parts[0], "train", 4, L)
    capsys.readouterr()
    assert main(["merge", *parts[::-1], "--out", str(tmp_path / "merged")]) == 0  # any order
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    for s in ("train", "val"):
        for k in ("rows", "tokens", "documents", "stream_tokens", "dropped_tail_tokens"):
            assert merged["splits"][s][k] == full["splits"][s][k], (s, k)
    # no shard was copied: the merged directory holds only the manifest
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["manifest.json"]
    assert all(sh["path"].startswith("../part") for sh in merged["splits"]["train"]["shards"])
    # the same rows in the same order, documents numbered alike, the same shuffled batches
    for shuffle in (False, True):
        same(all_batches(tmp_path / "merged", shuffle=shuffle), all_batches(tmp_path / "full", shuffle=shuffle))
    same(list(build_loader(tmp_path / "merged", "val", 2, L, return_meta=True)),
         list(build_loader(tmp_path / "full", "val", 2, L, return_meta=True)), skip=("worker",))
    # bad merges: one line each, exit 2, nothing written
    assert main(["merge", *parts[:2], "--out", str(tmp_path / "m2")]) == 2
    assert capsys.readouterr().err.strip() == "mamba-dist prepare: error: merge: need parts 0..2 exactly once; missing [2]"
    assert main(["merge", parts[0], parts[0], parts[1], "--out", str(tmp_path / "m2")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["merge", parts[0], str(tmp_path / "full"), "--out", str(tmp_path / "m2")]) == 2
    assert "was prepared without --part" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
    assert main([*files, "--out", str(tmp_path / "x"), "--part", "3/3", "-q"]) == 2
    assert capsys.readouterr().err.strip() == "mamba-dist prepare: error: --part '3/3': needs 0 <= I < N"


def test_prepare_bad_input_one_line_exit_2_no_residue(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:50]) + "{oops\n")
    # progress bar on: it must not leave a line behind before the error
    assert main([str(bad), "--out", str(tmp_path / "o"), "--tokenizer", "byte", "--seq-len", "32"]) == 2
    err = capfd.readouterr().err  # not a terminal: no bar (on a terminal it is erased: leave=False)
    assert err.count("\n") == 1 and err.startswith("mamba-dist prepare: error: ") and "bad.jsonl:51: not valid" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


# ------------------------------------------------------------------------------------------------ masks

def test_loss_masks_from_spans_tokens_and_prompts(tmp_path):
    recs = [{"text": "question? answer!", "skip": [[0, 10]]},  # chars 0..9 ("question? ") do not count
            {"text": "abcdef", "skip": [1, 3]},  # token indices 1 and 3 do not count
            {"text": "plain"},  # no field: everything counts
            {"text": "é€x", "skip": [[1, 2]]}]  # a multi-byte character: all its bytes are left out
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    n_tok = sum(len(r["text"].encode()) + 1 for r in recs)
    m = prepare(str(src), tmp_path / "o", "byte", n_tok - 1, val_fraction=0.0, workers=0, progress=False,
                mask_field="skip")
    assert m["members"][-1] == "loss_mask.npy.zst" and m["loss_mask"]["mask_field"] == "skip"
    b = next(iter(build_loader(tmp_path / "o", "train", 1, n_tok - 1, shuffle=False)))
    stream_keep = np.ones(n_tok, bool)
    stream_keep[0:10] = False
    o = len(recs[0]["text"].encode()) + 1
    stream_keep[[o + 1, o + 3]] = False
    o2 = o + 7 + 6
    stream_keep[o2 + 2: o2 + 5] = False  # "é" is 2 bytes, "€" (char 1) is bytes 2..4
    assert b["loss_mask"][0].tolist() == stream_keep[1:].tolist()
    labels = b["labels"][0]
    assert (labels[~b["loss_mask"][0]] == -100).all() and (labels[b["loss_mask"][0]] >= 0).all()

    # prompt/response: the prompt's tokens never count, the response's and EOS do
    pr = tmp_path / "pr.jsonl"
    pr.write_text(json.dumps({"q": "2+2=", "a": "4"}) + "\n" + json.dumps({"q": "hi ", "a": "there"}) + "\n")
    prepare(str(pr), tmp_path / "pr", "byte", 14, val_fraction=0.0, workers=0, progress=False, text_field="a",
            prompt_field="q")
    b = next(iter(build_loader(tmp_path / "pr", "train", 1, 14, shuffle=False)))
    assert bytes(b["input_ids"][0, :4].tolist()) == b"2+2="
    want = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # targets: "+2=4<eos>hi there<eos>"
    assert b["loss_mask"][0].int().tolist() == want
    with pytest.raises(InputError, match=r"field 'skip' must be a list"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "abc", "skip": "x"}) + "\n")
        prepare(str(bad), tmp_path / "b", "byte", 2, val_fraction=0.0, workers=0, progress=False, mask_field="skip")


# ---------------------------------------------------------------------------------------------- mixtures

@functools.lru_cache(maxsize=None)
def mixture_sources(root: str) -> list[dict]:
    out = []
    for name, (a, b), w in (("web", (0, 45), 0.6), ("code", (45, 70), 0.3), ("math", (70, 72), 0.1)):
        src = write_jsonl(Path(root) / f"{name}.jsonl", DOCS[a:b])
        prepare(str(src), Path(root) / name, "byte", L, val_fraction=0.05, workers=0, progress=False)
        out.append({"path": str(Path(root) / name), "weight": w})
    return out


def test_mixture_shares_epochs_ranks_and_resume(tmp_path_factory):
    srcs = mixture_sources(str(tmp_path_factory.mktemp("mix")))
    B, dp = 2, 2
    loaders = [MixtureLoader(srcs, "train", B, L, dp_rank=r, dp_size=dp, seed=4, return_meta=True)
               for r in range(dp)]
    n_rows = loaders[0].n_rows_per_source
    assert n_rows[2] < 240  # the small source runs out many times over
    steps = 1200
    per_step = np.zeros((steps, 3), int)
    it = [iter(ld) for ld in loaders]
    for j in range(steps):
        for r in range(dp):
            b = next(it[r])
            np.add.at(per_step[j], b["source"].numpy(), 1)
    for start in range(0, steps - 1000 + 1, 100):
        share = per_step[start:start + 1000].sum(0) / (1000 * B * dp)
        assert np.abs(share - [0.6, 0.3, 0.1]).max() < 0.02, share
    epochs = loaders[0].source_epochs()
    want = [int(steps * B * dp * w) // n for w, n in zip((0.6, 0.3, 0.1), n_rows)]
    assert list(epochs.values()) == pytest.approx(want, abs=1) and epochs["math"] >= 2
    # one rank with 2B sees the same rows per step as two ranks with B (a global step does not depend on dp)
    one = MixtureLoader(srcs, "train", B * dp, L, seed=4, return_meta=True)
    r0 = MixtureLoader(srcs, "train", B, L, dp_rank=0, dp_size=dp, seed=4, return_meta=True)
    r1 = MixtureLoader(srcs, "train", B, L, dp_rank=1, dp_size=dp, seed=4, return_meta=True)
    for _, a, x, y in zip(range(20), one, r0, r1):
        pairs = lambda b: sorted(zip(b["source"].tolist(), b["row_ids"].tolist()))  # noqa: E731
        assert pairs(a) == sorted(pairs(x) + pairs(y))
    # a source's rows within one epoch are all different (a permutation per source and epoch)
    ld = MixtureLoader(srcs, "train", 8, L, seed=4, return_meta=True)
    rows = [[], [], []]
    for _, b in zip(range(40), ld):
        for s, row in zip(b["source"].tolist(), b["row_ids"].tolist()):
            rows[s].append(row)
    assert len(set(rows[0])) == len(rows[0])
    # exact resume, also with workers and from another layout
    ref = [b for _, b in zip(range(30), MixtureLoader(srcs, "train", 4, L, seed=4, return_meta=True))]
    head = MixtureLoader(srcs, "train", 4, L, seed=4)
    for _, _b in zip(range(11), head):
        pass
    state = json.loads(json.dumps(head.state_dict()))  # it goes through a checkpoint as plain data
    tail = MixtureLoader(srcs, "train", 4, L, seed=4, return_meta=True, num_workers=2)
    tail.load_state_dict(state)
    got = [{k: v.clone() for k, v in b.items()} for _, b in zip(range(19), tail)]
    same(got, ref[11:], skip=("worker",))
    with pytest.raises(ValueError, match="different data sources, weights"):
        MixtureLoader([{**s, "weight": 1.0} for s in srcs], "train", 4, L, seed=4).load_state_dict(state)


def test_mixture_sources_must_share_tokenizer_and_seq_len(tmp_path_factory, tmp_path):
    srcs = mixture_sources(str(tmp_path_factory.mktemp("mix2")))
    other = write_jsonl(tmp_path / "o.jsonl", DOCS[:20])
    prepare(str(other), tmp_path / "seq32", "byte", 32, val_fraction=0.0, workers=0, progress=False)
    with pytest.raises(ValueError, match=r"seq32 was prepared with seq_len=32 but seq_len=64"):
        MixtureLoader(srcs + [{"path": str(tmp_path / "seq32"), "weight": 1}], "train", 2, L)


# ------------------------------------------------------------------------------------------------ remote

class _Server:
    """A directory over HTTP on 127.0.0.1 that records the paths requested."""

    def __init__(self, root):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    prepare("builtin:pydoc", tmp_path / "www" / "pydoc", "byte", L, val_fraction=0.05, workers=0, progress=False,
            shard_tokens=60_000)
    srv = _Server(tmp_path / "www")
    yield tmp_path, srv
    srv.close()


def test_remote_shards_over_http_equal_local_and_fetch_lazily(served):
    tmp, srv = served
    local = tmp / "www" / "pydoc"
    n_shards = len(json.loads((local / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert n_shards >= 6
    cache = tmp / "cache"
    ld = build_loader(f"{srv.url}/pydoc", "train", 4, L, seed=3, shuffle=False, return_meta=True, shard_cache=cache)
    assert srv.requests == ["/pydoc/manifest.json"]  # start-up reads no shard
    got = [b for _, b in zip(range(5), ld)]  # the first rows: all in shard 0
    assert [r for r in srv.requests if r.endswith(".tar")] == ["/pydoc/train/shard-000000.tar"]
    same(got, all_batches(local, shuffle=False, n=5), skip=("worker",))
    # data.root: a local manifest whose relative shard paths live behind a URL; shuffled reads = local ones
    srv.requests.clear()
    remote = all_batches(local, root=f"{srv.url}/pydoc", shard_cache=tmp / "cache2")
    same(remote, all_batches(local))
    assert len({r for r in srv.requests if r.endswith(".tar")}) == n_shards
    # a shard that does not match the manifest is named when it is opened
    victim = local / "train" / "shard-000000.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    ld = build_loader(f"{srv.url}/pydoc", "train", 4, L, shuffle=False, shard_cache=tmp / "cache3")
    with pytest.raises(ShardError, match=r"corrupt shard http://.*/pydoc/train/shard-000000.tar: sha256"):
        next(iter(ld))
    assert not list((tmp / "cache3").glob("*.tar"))  # nothing unverified is kept


def test_loader_memory_does_not_grow_with_rows(tmp_path):
    """A synthetic manifest of ~50M rows (one real shard listed again and again): building the shuffled loader
    and reading batches from all over the epoch allocates a few MB, not 8 bytes per row (400 MB)."""
    import tracemalloc

    src = write_jsonl(tmp_path / "t.jsonl", ["the quick brown fox " * 2000] * 12)
    m = prepare(str(src), tmp_path / "base", "byte", 8, val_fraction=0.0, workers=0, shard_tokens=1 << 30,
                progress=False)
    shard = m["splits"]["train"]["shards"][0]
    shard["path"] = str((tmp_path / "base" / shard["path"]).resolve())
    k = 50_000_000 // shard["rows"]
    m["splits"]["train"].update(shards=[shard] * k, rows=k * shard["rows"])
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "manifest.json").write_text(json.dumps(m))
    tracemalloc.start()
    ld = build_loader(tmp_path / "big", "train", 16, 8, dp_rank=1, dp_size=4, seed=1, verify="size",
                      cache_bytes=1 << 20, return_meta=True)
    rows = []
    for pos in (0, len(ld) // 3, len(ld) - 1):
        ld._seek(0, pos)
        rows += next(iter(ld))["row_ids"].tolist()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ld.n_rows > 49_000_000 and max(rows) > ld.n_rows // 2
    assert peak < 16 << 20, peak / 2**20

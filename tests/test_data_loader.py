"""Loader: rank x worker split, equal batch counts, seeded shuffle, exact resume (also across shard borders)."""

import numpy as np
import pytest
import torch

from mamba_dist.data import build_loader
from mamba_dist.data.prepare import prepare

L = 256
B = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "pydoc"
    # ~1.8k rows in ~10 shards of 180 rows, 4 rows per tar sample
    prepare("builtin:pydoc", out, "byte", L, val_fraction=0.05, member_bytes=4 * (L + 1) * 2,
            shard_tokens=46_000, workers=0, progress=False)
    return out


def listed(loader):
    # clone: tensors from worker processes live in shared memory, one file descriptor each
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def rows_of(batches):
    return [b["row_ids"].tolist() for b in batches]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x.keys() - {"worker"}:  # which worker made a batch may differ; nothing else may
            assert torch.equal(x[k], y[k]), k


def test_batch_layout(data):
    ld = build_loader(data, "train", B, L, seed=3)
    b = next(iter(ld))
    assert set(b) == {"input_ids", "labels", "seq_idx"}
    assert b["input_ids"].shape == b["labels"].shape == b["seq_idx"].shape == (B, L)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long and b["seq_idx"].dtype == torch.int32
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert (b["seq_idx"][:, 0] == 0).all() and (b["seq_idx"].diff(dim=1) >= 0).all()
    # a row's segments change exactly after EOS tokens (that is where documents start)
    eos_before = torch.zeros_like(b["seq_idx"])
    eos_before[:, 1:] = (b["input_ids"][:, :-1] == 256).int()
    assert torch.equal(b["seq_idx"], eos_before.cumsum(1).int())


def test_two_ranks_two_workers_disjoint_covering_equal(data):
    loaders = [build_loader(data, "train", B, L, dp_rank=r, dp_size=2, num_workers=2, seed=7, return_meta=True)
               for r in range(2)]
    n_rows = loaders[0].n_rows
    assert n_rows > 1500 and len(loaders[0].manifest["splits"]["train"]["shards"]) >= 5
    per_rank = [listed(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) == len(loaders[1]) == n_rows // (2 * B)
    ids = [np.array(rows_of(p)).ravel() for p in per_rank]
    assert len(np.intersect1d(ids[0], ids[1])) == 0
    seen = np.concatenate(ids)
    assert len(np.unique(seen)) == len(seen)  # no row twice, on any rank or worker
    left_out = np.setdiff1d(np.arange(n_rows), seen)
    assert len(left_out) == n_rows % (2 * B)  # covered, but for the deterministic remainder (< dp x B)
    for p in per_rank:  # both workers did work; batches arrive in index order whatever worker made them
        assert [b["worker"].item() for b in p[:4]] == [0, 1, 0, 1]
        assert [b["index"][1].item() for b in p] == list(range(len(p)))
    # worker count changes nothing: same batches as in-process loading
    same_batches(per_rank[1], list(build_loader(data, "train", B, L, dp_rank=1, dp_size=2, seed=7,
                                                return_meta=True, num_workers=0)))
    # a global step is the same set of rows however it is split into ranks
    single = list(build_loader(data, "train", 2 * B, L, seed=7, return_meta=True))
    assert [sorted(a + b) for a, b in zip(rows_of(per_rank[0]), rows_of(per_rank[1]))] == \
        [sorted(x) for x in rows_of(single)]


def test_epochs_shuffle_seeded(data):
    ld = build_loader(data, "train", B, L, seed=1, return_meta=True)
    e0 = rows_of(ld)
    assert ld.epoch == 1
    e1 = rows_of(ld)
    flat = sum(e0, [])
    assert flat != sorted(flat) and e0 != e1  # shuffled, and differently per epoch
    again = build_loader(data, "train", B, L, seed=1, return_meta=True)
    assert rows_of(again) == e0
    assert rows_of(build_loader(data, "train", B, L, seed=2, return_meta=True)) != e0
    val = build_loader(data, "val", 2, L, return_meta=True)  # val: no shuffle by default
    assert sum(rows_of(val), []) == list(range(len(val) * 2))


def _run(data, n, state=None, **kw):
    ld = build_loader(data, "train", B, L, seed=5, return_meta=True, **kw)
    if state is not None:
        ld.load_state_dict(state)
    out = []
    while len(out) < n:
        for b in ld:
            out.append({k: v.clone() for k, v in b.items()})
            if len(out) == n:
                break
    return out, ld.state_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_equals_uninterrupted(data, shuffle):
    ld = build_loader(data, "train", B, L, seed=5, shuffle=shuffle)
    n = len(ld)
    first_row = np.cumsum([0] + [s["rows"] for s in ld.manifest["splits"]["train"]["shards"]])
    border_batch = int(first_row[1]) // B  # with shuffle off this batch straddles shards 0 and 1
    total = n + 40
    full, _ = _run(data, total, shuffle=shuffle)
    if not shuffle:
        rows = full[border_batch]["row_ids"]
        assert rows[0] < first_row[1] <= rows[-1] or rows[0] == first_row[1]
    for s in (0, 1, 17, border_batch, border_batch + 1, n - 1, n, n + 5):
        head, state = _run(data, s, shuffle=shuffle)
        same_batches(head, full[:s])
        tail, _ = _run(data, total - s, state=state, shuffle=shuffle)
        same_batches(tail, full[s:])
    # resuming with workers, from a state saved by an in-process run
    _, state = _run(data, border_batch, shuffle=shuffle)
    tail, _ = _run(data, 30, state=state, shuffle=shuffle, num_workers=2)
    same_batches(tail, full[border_batch:border_batch + 30])


def test_state_dict_round_trip_and_layout_change(data):
    ld = build_loader(data, "train", B, L, dp_rank=0, dp_size=2, seed=9, return_meta=True)
    it = iter(ld)
    for _ in range(4):
        next(it)
    state = ld.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4 and state["rows_consumed"] == 4 * 2 * B
    # dp_size 2 x B -> dp_size 1 x 2B: same global batch, resume continues at global step 4
    one = build_loader(data, "train", 2 * B, L, seed=9, return_meta=True)
    one.load_state_dict(state)
    nxt = next(iter(one))["row_ids"].tolist()
    r0 = next(iter(ld))["row_ids"].tolist()
    r1 = list(build_loader(data, "train", B, L, dp_rank=1, dp_size=2, seed=9, return_meta=True))[4]
    assert sorted(nxt) == sorted(r0 + r1["row_ids"].tolist())
    with pytest.raises(ValueError, match="not a multiple"):
        build_loader(data, "train", 5, L, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=9 in the state, 4 here"):
        build_loader(data, "train", B, L, seed=4).load_state_dict(state)


def test_set_epoch(data):
    ld = build_loader(data, "train", B, L, seed=5, return_meta=True)
    ld.set_epoch(3)
    e3 = rows_of(ld)
    assert (ld.epoch, ld.position) == (4, 0)  # a finished epoch moves on by itself
    ld.set_epoch(3)
    assert rows_of(ld) == e3
    it = iter(ld)
    next(it), next(it)
    del it
    assert (ld.epoch, ld.position) == (4, 2)
    ld.set_epoch(4)  # the current epoch: a resumed position stays
    assert ld.position == 2
    ld.set_epoch(5)
    assert (ld.epoch, ld.position) == (5, 0)

"""Training on data at scale (issue 13), end to end on CPU: a partitioned + merged prepare trains bit-identically
to the unpartitioned one; a 3-source mixture served over HTTP trains like the local one, survives SIGKILL with
bit-identical losses and logs per-source validation; masked loss = hand-computed loss at TP 1 and 2."""

import json
import signal
from pathlib import Path

import pytest
import torch

from _dist_utils import run_ranks
from _train_utils import SEQ, losses, ok, run_train, tiny_args
from test_data_scale import DOCS, _Server, write_jsonl
from mamba_dist.data.prepare import merge, prepare

KW = dict(tokenizer="byte", seq_len=SEQ, val_fraction=0.1, workers=0, progress=False, chunk_bytes=60_000,
          shard_tokens=40_000)


def _args(run, data, **over):
    return tiny_args(run, **{"data.path": str(data), "train.global_batch_tokens": 8 * SEQ, "checkpoint.every": 0,
                             "train.val_every": 0, "train.val_tokens": 4 * SEQ, **over})


@pytest.mark.slow
def test_partitioned_prepare_trains_bit_identically(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    cuts = [0, 8, 14, 35, 47, 60, 70, len(DOCS)]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        write_jsonl(d / f"f{i}.jsonl", DOCS[a:b])
    prepare(str(d), tmp_path / "full", **KW)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        prepare(str(d), p, part=(i, 3), **KW)
    merge(parts, tmp_path / "merged")
    ok(run_train(_args(tmp_path / "a", tmp_path / "full", **{"train.max_steps": 20})))
    ok(run_train(_args(tmp_path / "b", tmp_path / "merged", **{"train.max_steps": 20})))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 21)) and a == b  # bit-identical per-step losses
    assert losses(tmp_path / "a", "val", "val_loss") == losses(tmp_path / "b", "val", "val_loss")


def _sources(root: Path) -> list[dict]:
    out = []
    for name, (a, b), w in (("web", (0, 45), 0.6), ("code", (45, 70), 0.3), ("math", (70, 76), 0.1)):
        src = write_jsonl(root / f"{name}.jsonl", DOCS[a:b])
        prepare(str(src), root / "www" / name, "byte", SEQ, val_fraction=0.3, workers=0, progress=False,
                shard_tokens=40_000)
        out.append({"path": str(root / "www" / name), "weight": w})
    return out


def _mixture(sources) -> str:
    return "[" + ", ".join(f"{{path: '{s['path']}', weight: {s['weight']}}}" for s in sources) + "]"


@pytest.mark.slow
def test_mixture_over_http_resumes_exactly_and_logs_per_source(tmp_path):
    local = _sources(tmp_path)
    steps = 8
    over = {"data.sources": _mixture(local), "train.max_steps": steps, "train.val_every": 4,
            "logging.tensorboard": "true", "checkpoint.every": 2}
    ok(run_train(_args(tmp_path / "ref", "unused-when-sources-are-set", **over)))
    ref = losses(tmp_path / "ref")
    vals = [r for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "val"]
    assert [v["step"] for v in vals] == [0, 4, 8]
    for v in vals:  # overall = the weighted mean of the sources' losses
        per = {n: v[f"{n}/loss"] for n in ("web", "code", "math")}
        assert v["val_loss"] == pytest.approx(0.6 * per["web"] + 0.3 * per["code"] + 0.1 * per["math"], rel=1e-6)
    trains = [r for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    assert trains[-1]["math/epoch"] >= 0 and "web/epoch" in trains[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "ref" / "tensorboard"))
    ea.Reload()
    assert {"val/web/loss", "val/code/loss", "val/math/loss", "val/val_loss"} <= set(ea.Tags()["scalars"])

    srv = _Server(tmp_path / "www")
    try:
        remote = [{**s, "path": f"{srv.url}/{Path(s['path']).name}"} for s in local]
        over_r = {**over, "data.sources": _mixture(remote), "logging.tensorboard": "false"}
        env = {"MAMBA_DIST_CACHE": str(tmp_path / "cache")}
        run = tmp_path / "remote"
        proc = run_train(_args(run, "unused", **over_r), env={**env, "MAMBA_DIST_FAULT": "after_step_5"})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert max(losses(run)) == 5
        ok(run_train(_args(run, "unused", **over_r), env=env))  # resume=auto from step 4
    finally:
        srv.close()
    got = losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == ref[s] for s in ref), (got, ref)  # remote == local, and the resume is exact
    assert losses(run, "val", "val_loss") == losses(tmp_path / "ref", "val", "val_loss")
    assert any(p.suffix == ".tar" for p in (tmp_path / "cache" / "shards").iterdir())


def test_mixture_config_errors_name_the_source(tmp_path):
    local = _sources(tmp_path)
    prepare(str(tmp_path / "web.jsonl"), tmp_path / "seq32", "byte", 32, val_fraction=0.1, workers=0,
            progress=False)
    bad = local[:2] + [{"path": str(tmp_path / "seq32"), "weight": 0.1}]
    proc = run_train(_args(tmp_path / "r", "x", **{"data.sources": _mixture(bad)}))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mamba-dist train: error: data.sources[2] (seq32): data.seq_len: {SEQ} but {tmp_path / 'seq32'} was "
        f"prepared with seq_len=32 (set data.seq_len=32 or re-run prepare)")
    proc = run_train(_args(tmp_path / "r", "x", **{"data.sources": "[{path: a, weight: -1}]"}))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "mamba-dist train: error: data.sources[0].weight: must be a number > 0, got -1"


# ------------------------------------------------------------------------------------------ loss masks

def _masked_loss_worker(rank, world, data_dir):
    import copy

    import torch.nn.functional as F

    from mamba_dist.data import build_loader
    from mamba_dist.model import MambaConfig, MambaLMHeadModel
    from mamba_dist.parallel import ParallelDims, apply_tp, loss_fn

    batch = next(iter(build_loader(data_dir, "train", 4, SEQ, shuffle=False)))
    ids, labels, seq_idx, keep = batch["input_ids"], batch["labels"], batch["seq_idx"], batch["loss_mask"]
    torch.manual_seed(0)
    base = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=257, pad_vocab_size_multiple=8, ssm_cfg={
        "layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16}), backend="reference")
    with torch.no_grad():
        logits = base(ids, seq_idx=seq_idx).float()
        # by hand: mean over the kept positions of -log softmax at the target
        logp = F.log_softmax(logits, -1)
        full_targets = torch.where(keep, labels, torch.zeros_like(labels))
        nll = -logp.gather(-1, full_targets.unsqueeze(-1)).squeeze(-1)
        hand = (nll * keep).sum() / keep.sum()
    out = {"hand": hand.item(), "kept": int(keep.sum()), "total": keep.numel(),
           "tp1": loss_fn(logits, labels).item()}
    for sp in (False, True):
        dims = ParallelDims(tp=world, sequence_parallel=sp, world_size=world).build()
        model = apply_tp(copy.deepcopy(base), dims)
        with torch.no_grad():
            out[f"tp{world}_sp{int(sp)}"] = loss_fn(model(ids, seq_idx=seq_idx), labels, dims).item()
    allmasked = torch.full_like(labels, -100)
    out["all_masked_tp1"] = loss_fn(logits, allmasked).item()
    return out


@pytest.mark.slow
def test_masked_loss_equals_hand_computed_at_tp1_and_tp2(tmp_path):
    import random

    rng = random.Random(0)
    recs = []
    for k in sorted(DOCS)[:12]:
        text = k[:300]
        a = rng.randrange(0, len(text) // 2)
        recs.append({"text": text, "skip": [[a, a + len(text) // 3]]})
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare(str(src), tmp_path / "d", "byte", SEQ, val_fraction=0.0, workers=0, progress=False, mask_field="skip")
    r0, r1 = run_ranks(_masked_loss_worker, 2, str(tmp_path / "d"))
    assert 0 < r0["kept"] < r0["total"] * 0.9  # a real share of the targets is masked out
    for key in ("tp1", "tp2_sp0", "tp2_sp1"):
        assert r0[key] == pytest.approx(r0["hand"], rel=1e-5), key
        assert r1[key] == r0[key]
    assert r0["all_masked_tp1"] == 0.0  # no nan when a micro-batch has nothing to score

"""End-to-end trainer runs (real subprocesses, CPU): outputs of a run, DDP over 2 gloo ranks == 1 process,
activation recomputation changes nothing, bf16 autocast trains."""

import glob
import math
import os

import pytest
import yaml

from _train_utils import losses, ok, run_train, tiny_args
from mamba_dist.config import config_from_dict
from mamba_dist.metrics import read_jsonl


def test_run_writes_config_metrics_tensorboard_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = ok(run_train(tiny_args(run, **{"logging.tensorboard": "true", "checkpoint.keep_last": 2})))

    # resolved config, loadable as a config again
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = config_from_dict(saved)
    assert cfg.model.d_model == 32 and cfg.train.micro_batch_size == 4 and cfg.optim.lr == 3e-3

    train = read_jsonl(run / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "hfu", "rss_gb"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["tokens"] == r["step"] * 16 * 64
        assert 0 < r["mfu"] < 1
    # warmup 2 steps, then cosine from 3e-3 to 3e-4 over the remaining 4
    assert train[0]["lr"] == pytest.approx(1.5e-3) and train[1]["lr"] == pytest.approx(3e-3)
    assert train[-1]["lr"] < train[2]["lr"]
    val = losses(run, "val", "val_loss")
    assert sorted(val) == [0, 3, 6]
    assert val[0] > val[3] > val[6] and val[6] < val[0] - 0.2, val  # it learns (uniform over 257 bytes: 5.55)

    # TensorBoard scalars, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/rss_gb",
            "val/val_loss"} <= tags
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    # checkpoints every 2 steps, the last 2 kept, no temporary leftovers
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["step_00000004", "step_00000006"], names
    assert sorted(os.listdir(run / "checkpoints" / "step_00000006")) == [
        "meta.json", "model.pt", "optim.pt", "rank00000.pt"]
    assert f"validation loss: first {val[0]:.4f} (step 0), last {val[6]:.4f} (step 6)" in proc.stdout
    # what the auto switches picked is logged (CPU: the plain step, the loss on full logits, no fused mixers)
    assert "levers: step TorchPath, lm_head + CE on full logits" in proc.stdout + proc.stderr


def test_ddp_two_ranks_equals_one_process(tmp_path):
    """Same global batch (16 rows): 1 process x 4 micro-batches vs 2 gloo ranks x 2 micro-batches."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"train.max_steps": 5, "checkpoint.every": 0}
    ok(run_train(tiny_args(one, **common)))
    proc = ok(run_train(tiny_args(two, **common), nproc=2))
    assert "2 ranks (dp 2, tp 1), grad accumulation 2" in proc.stderr
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    va, vb = losses(one, "val", "val_loss"), losses(two, "val", "val_loss")
    assert sorted(va) == sorted(vb)
    for s in va:
        assert abs(va[s] - vb[s]) <= 1e-6, (s, va[s], vb[s])


def test_activation_recomputation_gives_the_same_losses(tmp_path):
    base, ac = tmp_path / "base", tmp_path / "ac"
    common = {"train.max_steps": 3, "checkpoint.every": 0, "train.val_tokens": 0}
    ok(run_train(tiny_args(base, **common)))
    ok(run_train(tiny_args(ac, **common, **{"train.ac_fraction": 1.0})))
    a, b = losses(base), losses(ac)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    # MFU counts model FLOPs only; HFU adds the recomputed forward
    rec = read_jsonl(ac / "metrics.jsonl", "train")[-1]
    assert rec["hfu"] > rec["mfu"]


def test_bf16_autocast_trains(tmp_path):
    run = tmp_path / "bf16"
    ok(run_train(tiny_args(run, **{"precision.dtype": "bf16", "train.max_steps": 3, "checkpoint.every": 0,
                                   "train.val_tokens": 0})))
    ls = losses(run)
    assert sorted(ls) == [1, 2, 3] and all(math.isfinite(v) for v in ls.values())
    assert ls[3] < ls[1]
    # parameters stay fp32 under autocast: the checkpoint holds fp32 weights
    import torch

    state = torch.load(glob.glob(str(run / "checkpoints" / "step_*" / "model.pt"))[0], weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_fused_ce_gives_the_same_losses(tmp_path):
    """model.fused_ce=true (lm_head + loss chunked, no logits) trains like the logits path, also with DDP and
    under gradient accumulation; validation goes through it too."""
    base, fused = tmp_path / "base", tmp_path / "fused"
    common = {"train.max_steps": 3, "checkpoint.every": 0}
    ok(run_train(tiny_args(base, **common, **{"model.fused_ce": "false"})))
    ok(run_train(tiny_args(fused, **common, **{"model.fused_ce": "true"})))
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        a, b = losses(base, kind, key), losses(fused, kind, key)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-5 for s in a), (kind, a, b)


def test_tp1_training_needs_no_megatron():
    # a single-GPU run (tp 1) must not import megatron-core: the GPU machines' carry budget leaves it out when the
    # data needs the room, and it costs seconds of import time. Blocked in a fresh interpreter, a step still runs.
    import subprocess
    import sys

    code = """
import sys; sys.modules['megatron'] = None
import torch
from mamba_dist import train as T
from mamba_dist.config import load_config, validate_runtime
from mamba_dist.model import MambaLMHeadModel
from mamba_dist.parallel.dims import ParallelDims
cfg = load_config(None, ['model.d_model=32', 'model.n_layer=2', 'model.vocab_size=64', 'data.path=synthetic',
                         'data.seq_len=32', 'train.micro_batch_size=2', 'train.global_batch_tokens=64',
                         'train.max_steps=2', 'train.device=cpu'])
dims = ParallelDims.from_env(cfg.parallel).build()
tr = T.build_training(MambaLMHeadModel(cfg.model.to_mamba_config(), backend='reference'), cfg,
                      validate_runtime(cfg, 1), dims, torch.device('cpu'))
ids = torch.randint(0, 64, (2, 33))
loss, norm, applied = T.train_step(tr, [(ids[:, :-1], ids[:, 1:], torch.zeros(2, 32, dtype=torch.int32))], dims,
                                   False, False)
assert applied and torch.isfinite(loss)
print('ok', [m for m in sys.modules if m.startswith('megatron')])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok") and "megatron.core" not in out.stdout, out.stdout

"""Conversions of checkpoints written by the real trainer under torchrun (CPU, gloo, fp32, 4 ranks):

- Mamba-1 and Mamba-2 trained at TP=2 x DP=2 under ZeRO-2, Mamba-1 at TP=2 x DP=2 under ZeRO-3 (+ sequence
  parallelism + recomputation) and a plain one-process run: consolidated (DeepSpeed's zero_to_fp32 per TP rank),
  the consolidated model's validation loss equals the one the trainer logged for that step (1e-5), and the HF
  export loaded with AutoModelForCausalLM gives our logits within 1e-5, and HF's greedy generate our tokens.
- Resharding TP 2 -> 4 -> 1 keeps every tensor; a TP 2 x DP 2 ZeRO-2 run resharded at step 4 to TP 4 x DP 1 with
  --keep-optimizer continues with the losses of the run that was not resharded (steps 5, 6; within 1e-6).
- An HF export imported back (weights only) starts a ZeRO run whose first validation loss is the export's.

The trainer runs are shared with test_train_zero.py (`_launch_utils.uninterrupted`, cached per session)."""

import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from _launch_utils import STEPS, losses, ok, uninterrupted, zero_args  # noqa: E402
from _train_utils import run_train, tiny_data  # noqa: E402
from mamba_dist import checkpoint as ckpt  # noqa: E402
from mamba_dist.convert import export_hf, import_model, reshard, source  # noqa: E402
from mamba_dist.convert.generate import generate  # noqa: E402
from mamba_dist.data import build_loader  # noqa: E402
from mamba_dist.metrics import read_jsonl  # noqa: E402
from mamba_dist.model import MambaLMHeadModel  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-5
SP_AC = (("parallel.sequence_parallel", "true"), ("train.ac_fraction", 0.5))  # as in test_train_zero
MAMBA2 = (("model.mixer", "Mamba2"), ("model.ssm_cfg", "{d_state: 8, headdim: 8, ngroups: 2, chunk_size: 16}"))
RUNS = {  # name: uninterrupted(...) arguments
    "mamba1-zero2-tp2xdp2": (2, 2, 4, ()),
    "mamba2-zero2-tp2xdp2": (2, 2, 4, MAMBA2),
    "mamba1-zero3-tp2xdp2-sp-ac": (3, 2, 4, SP_AC),
    "mamba1-plain-one-process": (0, 1, 1, ()),
    "mamba1-plain-tp2": (0, 2, 2, ()),  # the trainer's model-tpNN.pt files
}


def val_loss(model, data: str, rows: int = 8, seq: int = 64) -> float:
    """The trainer's validation loss (train.val_tokens = 2 x 4 x 64 tokens: the first 8 val rows) on one
    process."""
    loader = build_loader(data, "val", micro_batch_size=rows, seq_len=seq, dp_rank=0, dp_size=1, num_workers=0,
                          seed=0)
    batch = next(iter(loader))
    with torch.no_grad():
        logits = model(batch["input_ids"], seq_idx=batch["seq_idx"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten()).item()


def consolidated(step_dir: str) -> MambaLMHeadModel:
    ck = source.open_checkpoint(step_dir)
    model = MambaLMHeadModel(ck.model_config, backend="reference").eval()
    model.load_state_dict(source.full_state_dict(ck, progress=False))
    return model


@pytest.mark.parametrize("run", list(RUNS))
def test_export_hf_from_trainer_checkpoint(tmp_path, run):
    run_dir = uninterrupted(*RUNS[run])
    ck_dir = run_dir / "checkpoints"  # a checkpoint directory: its latest step (6)
    ours = consolidated(str(ck_dir))
    logged = {r["step"]: r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl", "val")}
    assert abs(val_loss(ours, tiny_data()) - logged[STEPS]) <= TOL * logged[STEPS]
    out = export_hf(str(ck_dir), str(tmp_path / "hf"), progress=False)  # tokenizer from the data's manifest
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("def main(argv):\n    return 0", add_special_tokens=False)] * 2)
    with torch.no_grad():
        a, b = ours(ids), hf(ids, use_cache=False).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= TOL
    hf.generation_config.eos_token_id = None
    ref = hf.generate(ids[:1], max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate(ours, ids[0].tolist(), 32, temperature=0) == ref


def test_reshard_2_4_1_and_resume_with_the_optimizer(tmp_path):
    full = uninterrupted(2, 2, 4)
    step4 = str(full / "checkpoints" / ckpt.step_dir_name(4))
    ref = consolidated(step4).state_dict()
    r4 = reshard(step4, str(tmp_path / "tp4"), 4, keep_optimizer=True, progress=False)
    r1 = reshard(r4, str(tmp_path / "tp1"), 1, progress=False)
    for d in (r4, r1):
        sd = source.full_state_dict(source.open_checkpoint(d), progress=False)
        assert all(torch.equal(sd[k], v) for k, v in ref.items()), d
    # logits too (the same tensors give the same model)
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        assert torch.equal(consolidated(r1)(ids), consolidated(step4)(ids))
    # continue TP 4 x DP 1 (plain torch path) from the resharded step 4: steps 5 and 6 as the TP 2 x DP 2 ZeRO-2 run
    run = tmp_path / "continued"
    proc = ok(run_train(zero_args(run, 0, 4, **{"checkpoint.resume": r4}), nproc=4))
    assert "resumed from" in proc.stderr
    got, want = losses(run), losses(full)
    assert sorted(got) == [5, 6]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    g, w = losses(run, "train", "grad_norm"), losses(full, "train", "grad_norm")
    assert all(abs(g[s] - w[s]) <= 1e-5 * w[s] for s in g)


def test_import_starts_a_zero_run_from_the_weights(tmp_path):
    full = uninterrupted(2, 2, 4, MAMBA2)
    out = export_hf(str(full / "checkpoints"), str(tmp_path / "hf"), progress=False)
    imported = import_model(out, str(tmp_path / "imported"), tp=1, progress=False)
    expect = val_loss(consolidated(imported), tiny_data())
    run = tmp_path / "from-import"
    args = zero_args(run, 1, 1, **{"model.mixer": "Mamba2", "model.ssm_cfg": dict(MAMBA2)["model.ssm_cfg"],
                                   "checkpoint.resume": imported, "train.max_steps": 1, "checkpoint.every": 0,
                                   "schedule.warmup_steps": 0})
    proc = ok(run_train(args))
    assert "initialised from the weights" in proc.stderr and "optimizer" in proc.stderr
    first_val = losses(run, "val", "val_loss")[0]
    assert abs(first_val - expect) <= TOL * expect

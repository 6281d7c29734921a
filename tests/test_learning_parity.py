"""scripts/learning_parity.py on CPU: its plumbing (the same initial weights and batches for both loops, the
anchor's plain loop with our optimizer groups and schedule against the trainer's train_step) must give the same
curve when both loops run the same model (--cpu-selfcheck; on the GPU the anchor is mamba_ssm's model), and the
carried batch file must give back exactly the loader's batches."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("learning_parity", os.path.join(REPO, "scripts",
                                                                                  "learning_parity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc64"
    subprocess.run([sys.executable, "-m", "mamba_dist.cli", "prepare", "builtin:pydoc", "--out", str(out),
                    "--tokenizer", "byte", "--seq-len", "64", "--val-fraction", "0.01", "--overwrite"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return str(out)


def test_selfcheck_curves_agree(prepared, tmp_path):
    lp = _script()
    common = ["--steps", "6", "--batch", "2", "--seqlen", "64", "--warmup", "2", "--cpu-selfcheck"]
    assert lp.main(["--data", prepared, *common, "--out", str(tmp_path)]) == 0
    got = json.load(open(tmp_path / "parity.json"))
    assert [r["size"] for r in got["rows"]] == ["m1-130m", "m2-130m"]
    for r in got["rows"]:
        assert r["pass"] and r["rel_diff"] < 1e-6, r
    for name in ("m1-130m", "m2-130m"):
        a, o = got["curves"][f"{name} anchor"], got["curves"][f"{name} ours"]
        assert len(a) == len(o) == 6 and a[-1] < a[0]  # it learns
        assert max(abs(x - y) for x, y in zip(a, o)) < 1e-5
    assert (tmp_path / "parity.png").stat().st_size > 0


def test_selfcheck_repeats_compare_means(prepared, tmp_path):
    # --repeats: every loop runs K times, the means are compared and the anchor's own spread is reported (on CPU
    # the runs are deterministic: a spread of zero)
    lp = _script()
    args = ["--data", prepared, "--steps", "3", "--batch", "2", "--seqlen", "64", "--warmup", "1",
            "--cpu-selfcheck", "--sizes", "m1-130m", "--no-resets-run", "--repeats", "2", "--out", str(tmp_path)]
    assert lp.main(args) == 0
    (row,) = json.load(open(tmp_path / "parity.json"))["rows"]
    assert len(row["finals"]["anchor"]) == len(row["finals"]["ours"]) == 2
    assert row["anchor_spread"] == 0.0 and row["pass"]
    assert row["anchor_final"] == row["finals"]["anchor"][0]


def test_saved_batches_round_trip(prepared, tmp_path):
    lp = _script()
    f = str(tmp_path / "b.xz")
    args = ["--data", prepared, "--steps", "40", "--batch", "4", "--seqlen", "64", "--cpu-selfcheck"]
    assert lp.main([*args, "--save-batches", f]) == 0
    cfg = lp._config("m1-130m", lp._parser().parse_args(args))[0]
    direct, loaded = lp.batches(cfg, 40), lp.load_batches(f, 40)
    assert all(torch.equal(x, y) for p, q in zip(direct, loaded) for x, y in zip(p, q))
    with pytest.raises(ValueError, match="fewer than"):
        lp.load_batches(f, 41)

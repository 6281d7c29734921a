"""Sweep files (mamba_dist/sweep/spec.py): the grid's expansion into resolved run configs, size and LR rules,
one-line errors, and the torchrun / slurm launch scripts. No training here (test_sweep_run.py trains)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from mamba_dist.config import load_config
from mamba_dist.model import MambaLMHeadModel
from mamba_dist.model.flops import flops_per_token
from mamba_dist.sweep import main as sweep_main
from mamba_dist.sweep.spec import SweepError, evaluate, expand, load_sweep, write_runs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "sweeps" / "demo.yaml"


def test_demo_sweep_expands_to_a_valid_grid(tmp_path):
    runs = expand(load_sweep(str(DEMO)), str(tmp_path))
    sizes = sorted({r.d_model for r in runs})
    budgets = sorted({r.budget for r in runs})
    assert len(sizes) >= 4 and len(budgets) >= 3 and len(runs) == len(sizes) * len(budgets)
    write_runs(runs, str(tmp_path))
    for r in runs:
        run_dir = tmp_path / "runs" / r.name
        cfg = load_config(str(run_dir / "config.yaml"))  # the written config is a valid training config
        assert cfg.logging.run_dir == str(run_dir) and cfg.checkpoint.resume == "auto"
        assert cfg.train.max_steps == r.steps and r.tokens == r.steps * cfg.train.global_batch_tokens
        assert cfg.optim.lr == pytest.approx(4e-3 * (64 / r.d_model) ** 0.5)  # the file's LR rule
        assert cfg.schedule.warmup_steps == round(0.05 * r.steps)
        # a FLOP budget becomes whole steps: within half a step of the budget
        fpt = flops_per_token(cfg.model.mamba_config_dict(), cfg.data.seq_len).train()
        assert r.flops == pytest.approx(fpt * r.tokens)
        assert abs(r.flops - r.budget) <= fpt * cfg.train.global_batch_tokens / 2
        # params: non-embedding = all parameters but the (tied) embedding
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="reference", device="meta")
        total = sum(p.numel() for p in model.parameters())
        assert r.params_total == total
        assert r.params == total - cfg.model.padded_vocab_size * r.d_model
        rec = json.loads((run_dir / "run.json").read_text())
        assert rec["params"] == r.params and rec["steps"] == r.steps and rec["name"] == r.name
    # the same compute level gives the small models more tokens
    level = sorted((r for r in runs if r.budget == budgets[0]), key=lambda r: r.params)
    assert [r.tokens for r in level] == sorted((r.tokens for r in level), reverse=True)


def _spec(tmp_path, **over) -> str:
    spec = {"set": {"data.path": str(tmp_path / "data"), "data.seq_len": 64, "model.vocab_size": 257,
                    "model.mixer": "Mamba2", "model.ssm_cfg": {"headdim": 8, "d_state": 8},
                    "train.global_batch_tokens": 256, "train.micro_batch_size": 4, "train.val_tokens": 256},
            "models": {"d_model": [16, 32, 64], "n_layer": "max(1, d_model // 16)"},
            "budgets": {"tokens": [2560, 5120]}}
    spec.update(over)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def test_size_and_lr_rules(tmp_path):
    runs = expand(load_sweep(_spec(tmp_path)), str(tmp_path / "o"))
    assert [(r.d_model, r.n_layer) for r in runs[::2]] == [(16, 1), (32, 2), (64, 4)]
    assert [r.name for r in runs[:2]] == ["d16-l1-t2.56e3", "d16-l1-t5.12e3"]
    assert [r.steps for r in runs[:2]] == [10, 20]
    listed = {"models": [{"d_model": 16, "n_layer": 2, "lr": 1e-3}, {"d_model": 24, "n_layer": 3,
                                                                      "ssm_cfg": {"d_state": 4}}],
              "lr": {16: 5e-3, 24: 2e-3}}
    runs = expand(load_sweep(_spec(tmp_path, **listed)), str(tmp_path / "o2"))
    assert [r.lr for r in runs[::2]] == [1e-3, 2e-3]  # a listed lr wins over the mapping
    assert runs[2].config.model.ssm_cfg == {"headdim": 8, "d_state": 4}
    assert runs[2].config.model.n_layer == 3
    assert evaluate("3e-3 * (64 / d_model) ** 0.5", {"d_model": 16}, "lr") == pytest.approx(6e-3)


@pytest.mark.parametrize("over,needle", [
    ({"sizes": [1]}, "sizes: unknown key"),
    ({"models": {"d_model": [16], "n_layer": "__import__('os').getpid()"}}, "only numbers"),
    ({"models": {"d_model": [16], "n_layer": "d_model // layers"}}, "unknown name 'layers'"),
    ({"models": {"d_model": [16, 32], "n_layer": [1]}}, "2 widths"),
    ({"lr": {16: 1e-3}}, "no learning rate for d_model=32"),
    ({"budgets": {"tokens": [2560, 2560]}}, "two runs would be named"),
    ({"budgets": {"steps": [10]}}, "one of `tokens"),
    ({"budgets": {"tokens": [-5]}}, "positive number"),
    ({"set": {"optim.lrr": 1}}, "optim.lrr: unknown key"),
    ({"set": {"train.val_tokens": 0}}, "val_tokens must be > 0"),
    ({"base": "configs/nope.yaml"}, "no such training config"),
])
def test_bad_sweep_is_one_line_exit_2(tmp_path, capsys, over, needle):
    path = _spec(tmp_path, **over)
    assert sweep_main(["run", path, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-dist sweep run: error: ") and needle in err[0], err


def test_changed_grid_under_existing_runs_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert sweep_main(["run", _spec(tmp_path), "--out", out, "--dry-run"]) == 0
    changed = _spec(tmp_path, set={**yaml.safe_load(Path(tmp_path / "sweep.yaml").read_text())["set"],
                                   "optim.lr": 1e-2})
    capsys.readouterr()
    assert sweep_main(["run", changed, "--out", out, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "exists with a different config (changed: optim.lr)" in err
    # status of a sweep nothing has trained yet: every run pending; --run answers through the exit code
    assert sweep_main(["status", out]) == 0
    assert "0/6 runs finished" in capsys.readouterr().out
    assert sweep_main(["status", out, "--run", "d16-l1-t2.56e3"]) == 1
    assert sweep_main(["status", out, "--run", "nope"]) == 2


def test_launch_scripts(tmp_path):
    spec = _spec(tmp_path, slurm={"nodes": 2, "gpus_per_node": 4, "time": "02:00:00", "partition": "gpu",
                                  "max_parallel": 3})
    out = tmp_path / "o"
    assert sweep_main(["run", spec, "--out", str(out), "--launcher", "torchrun"]) == 0
    tr = out / "launch" / "torchrun.sh"
    assert os.access(tr, os.X_OK)
    text = tr.read_text()
    assert "launch/torchrun.sh --config \"$SWEEP/runs/$RUN/config.yaml\"" in text
    assert text.count("d16-l1-t2.56e3") == 1 and "sweep status" in text and "sweep fit" in text
    assert sweep_main(["run", spec, "--out", str(out), "--launcher", "slurm"]) == 0
    launch = out / "launch"
    array = (launch / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5%3" in array and "#SBATCH --nodes=2" in array and "#SBATCH --gpus-per-node=4" in array
    assert "#SBATCH --partition=gpu" in array and "#SBATCH --signal=USR1@600" in array
    assert "exec bash launch/slurm.sbatch --config" in array
    names = (launch / "runs.txt").read_text().split()
    assert len(names) == 6 and all((out / "runs" / n / "config.yaml").is_file() for n in names)
    assert "--dependency=afterany" in (launch / "submit.sh").read_text()
    assert "sweep collect" in (launch / "collect.sbatch").read_text()
    for script in (tr, launch / "sweep.sbatch", launch / "collect.sbatch", launch / "submit.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell
    # the array task picks its run by SLURM_ARRAY_TASK_ID and skips a finished one: run task 1's lookup
    lookup = subprocess.run(["bash", "-c", 'sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$0"', str(launch / "runs.txt")],
                            env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True, text=True, check=True)
    assert lookup.stdout.strip() == names[1]
    with pytest.raises(SweepError, match="slurm.gpus: unknown key"):
        from mamba_dist.sweep.runner import write_slurm_scripts

        write_slurm_scripts([], str(out), "x.yaml", {"gpus": 8})

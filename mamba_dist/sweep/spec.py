"""Sweep files: a grid of model sizes x budgets expanded into one resolved training config per run.

A sweep file (YAML; see configs/sweeps/demo.yaml):

    base: configs/tiny.yaml            # the training config every run starts from (optional)
    set:                               # dotted overrides applied to every run (after base)
      data.path: data/prepared/demo-byte-256
      train.val_tokens: 16384
    models:                            # sizes: a width list x a depth rule ...
      d_model: [32, 48, 64, 96]
      n_layer: "max(2, d_model // 24)" # an integer, a list as long as d_model, or an expression of d_model
    # models:                          # ... or listed, each with any model.* key (and optionally lr)
    #   - {d_model: 64, n_layer: 4}
    #   - {d_model: 128, n_layer: 6, lr: 1.0e-3, ssm_cfg: {headdim: 32}}
    lr: "3e-3 * (64 / d_model) ** 0.5" # optional: per size, an expression of d_model / n_layer / params, or a
                                       # mapping {d_model: lr}; otherwise the base's optim.lr
    budgets:                           # tokens per run, or training FLOPs per run (model/flops.py's count)
      flops: [2.0e11, 6.0e11, 1.8e12]  # or   tokens: [1.0e5, 4.0e5]
    warmup_fraction: 0.05              # optional: schedule.warmup_steps = this x the run's steps

Each run trains for whole optimizer steps of train.global_batch_tokens: tokens = round(budget / batch) x batch
(a FLOP budget is first divided by the size's training FLOPs per token), and its LR schedule spans exactly its own
steps, as a compute-optimal sweep needs (Chinchilla trains every point with its own cosine). Run names are
`d<d_model>-l<n_layer>-<t|c><budget>`, e.g. `d64-l3-c6e11`.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mamba_dist.config import Config, ConfigError, _override_into, load_config, validate_config

SWEEP_KEYS = ("base", "set", "models", "lr", "budgets", "warmup_fraction", "slurm", "torchrun")


class SweepError(ValueError):
    """A bad sweep file or sweep directory. The message is one line naming the problem."""


# ------------------------------------------------------------------------------------------- size-rule expressions
# The width/depth and LR rules are small arithmetic expressions ("max(2, d_model // 24)"). Python's eval would run
# anything a YAML file holds; the standard library has no safe arithmetic evaluator, so this walks the AST and
# allows numbers, the named variables, + - * / // % **, and a few functions.
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_FUNCS = {"min": min, "max": max, "round": round, "int": int, "float": float, "sqrt": math.sqrt, "log": math.log,
          "log2": math.log2, "exp": math.exp, "abs": abs}


def evaluate(expr: str, variables: dict, where: str) -> float:
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError:
        raise SweepError(f"{where}: {expr!r} is not an arithmetic expression") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                       bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise SweepError(f"{where}: unknown name {node.id!r} in {expr!r} (known: {', '.join(variables)})")
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise SweepError(f"{where}: {expr!r}: only numbers, {', '.join(variables)}, arithmetic and "
                         f"{', '.join(_FUNCS)}() are allowed")

    try:
        return ev(tree)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        raise SweepError(f"{where}: {expr!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ the expanded runs
@dataclass
class Run:
    """One point of the grid: its resolved training config and what the fit needs about it."""

    name: str
    config: Config
    d_model: int
    n_layer: int
    lr: float
    budget_kind: str  # tokens | flops
    budget: float
    steps: int
    tokens: int  # trained tokens (whole steps)
    params: int  # non-embedding parameters
    params_total: int
    flops_per_token: float  # training FLOPs per token (3 x forward, model/flops.py)
    flops: float  # training FLOPs of the run = flops_per_token x tokens
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """run.json: everything `collect` reads besides the run's own metrics and checkpoints."""
        return {"name": self.name, "d_model": self.d_model, "n_layer": self.n_layer, "mixer": self.config.model.mixer,
                "lr": self.lr, "budget_kind": self.budget_kind, "budget": self.budget, "steps": self.steps,
                "tokens": self.tokens, "params": self.params, "params_total": self.params_total,
                "flops_per_token": self.flops_per_token, "flops": self.flops, "config_sha256": config_hash(self.config)}


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def count_params(cfg: Config) -> tuple[int, int]:
    """(non-embedding, total) parameters, counted on the real module built on the meta device (no memory).
    Non-embedding leaves out the token embedding and, when untied, the LM head (Kaplan et al.'s N)."""
    from mamba_dist.model import MambaLMHeadModel

    model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="reference", device="meta")
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embed = {id(model.backbone.embedding.weight), id(model.lm_head.weight)}
    return total - sum(unique[i].numel() for i in embed if i in unique), total


def _fmt_budget(x: float) -> str:
    """2.0e11 -> '2e11', 6.5e5 -> '6.5e5' (run names: short, sortable by eye, no '+')."""
    exp = int(math.floor(math.log10(x)))
    mant = f"{x / 10 ** exp:.3g}"
    if mant == "10":
        mant, exp = "1", exp + 1
    return f"{mant}e{exp}"


def _as_list(v, where: str) -> list:
    if isinstance(v, (list, tuple)):
        if not v:
            raise SweepError(f"{where}: empty list")
        return list(v)
    return [v]


def _num(v, where: str, kind=float) -> float:
    try:
        x = float(str(v).replace("_", "")) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: expected a number, got {v!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise SweepError(f"{where}: must be a positive number, got {v!r}")
    if kind is int:
        if not x.is_integer():
            raise SweepError(f"{where}: expected an integer, got {v!r}")
        return int(x)
    return x


def _sizes(models, where="models") -> list[dict]:
    """models: -> [{d_model, n_layer, (lr), other model keys}]."""
    if isinstance(models, list):
        sizes = []
        for i, m in enumerate(models):
            if not isinstance(m, dict) or "d_model" not in m or "n_layer" not in m:
                raise SweepError(f"{where}[{i}]: each listed size needs d_model and n_layer, got {m!r}")
            sizes.append(dict(m))
        return sizes
    if not isinstance(models, dict) or "d_model" not in models:
        raise SweepError(f"{where}: a list of sizes, or a mapping with a d_model list and an n_layer rule")
    widths = _as_list(models["d_model"], f"{where}.d_model")
    depth = models.get("n_layer")
    if depth is None:
        raise SweepError(f"{where}.n_layer: required (an integer, a list, or an expression of d_model)")
    other = {k: v for k, v in models.items() if k not in ("d_model", "n_layer")}
    if isinstance(depth, list) and len(depth) != len(widths):
        raise SweepError(f"{where}.n_layer: {len(depth)} depths for {len(widths)} widths")
    sizes = []
    for i, w in enumerate(widths):
        w = _num(w, f"{where}.d_model", int)
        if isinstance(depth, list):
            n = depth[i]
        elif isinstance(depth, str):
            n = evaluate(depth, {"d_model": w}, f"{where}.n_layer")
        else:
            n = depth
        n = _num(round(n) if isinstance(n, float) else n, f"{where}.n_layer", int)
        sizes.append({"d_model": w, "n_layer": n, **other})
    return sizes


def load_sweep(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping with models and budgets")
    for k in spec:
        if k not in SWEEP_KEYS:
            raise SweepError(f"{path}: {k}: unknown key (valid keys: {', '.join(SWEEP_KEYS)})")
    for k in ("models", "budgets"):
        if k not in spec:
            raise SweepError(f"{path}: {k}: required")
    return spec


def expand(spec: dict, out_dir: str, where: str = "sweep") -> list[Run]:
    """The grid as runs, each with its resolved config (logging.run_dir = out_dir/runs/<name>, absolute)."""
    from mamba_dist.model.flops import flops_per_token

    base = spec.get("base")
    if base is not None and not Path(base).is_file():
        raise SweepError(f"{where}: base: no such training config: {base}")
    sets = spec.get("set") or {}
    if not isinstance(sets, dict):
        raise SweepError(f"{where}: set: expected a mapping of dotted keys to values")
    budgets = spec["budgets"]
    if not isinstance(budgets, dict) or len(budgets) != 1 or next(iter(budgets)) not in ("tokens", "flops"):
        raise SweepError(f"{where}: budgets: one of `tokens: [...]` or `flops: [...]`")
    kind, values = next(iter(budgets.items()))
    values = [_num(v, f"{where}: budgets.{kind}") for v in _as_list(values, f"budgets.{kind}")]
    warm_frac = spec.get("warmup_fraction")
    if warm_frac is not None and not (isinstance(warm_frac, (int, float)) and 0 <= warm_frac < 1):
        raise SweepError(f"{where}: warmup_fraction: must be in [0, 1), got {warm_frac!r}")
    lr_rule = spec.get("lr")
    runs, names = [], set()
    for size in _sizes(spec["models"]):
        size = dict(size)
        d, n = size.pop("d_model"), size.pop("n_layer")
        lr = size.pop("lr", None)
        try:
            cfg = load_config(base, [], validate=False)
            for key, value in sets.items():
                _override_into(cfg, str(key).split("."), value)
            _override_into(cfg, ["model", "d_model"], d)
            _override_into(cfg, ["model", "n_layer"], n)
            for key, value in size.items():  # listed sizes may set any model key (ssm_cfg, d_intermediate, ...)
                if key == "ssm_cfg" and isinstance(value, dict):
                    cfg.model.ssm_cfg.update(value)
                else:
                    _override_into(cfg, ["model", *str(key).split(".")], value)
        except ConfigError as e:
            raise SweepError(f"{where}: {e}") from None
        params, params_total = count_params(cfg)
        if lr is None and isinstance(lr_rule, dict):
            if d not in lr_rule:
                raise SweepError(f"{where}: lr: no learning rate for d_model={d} (listed: {sorted(lr_rule)})")
            lr = lr_rule[d]
        elif lr is None and lr_rule is not None:
            lr = evaluate(lr_rule, {"d_model": d, "n_layer": n, "params": params}, f"{where}: lr")
        lr = _num(lr, f"{where}: lr") if lr is not None else cfg.optim.lr
        cfg.optim.lr = float(lr)
        fpt = flops_per_token(cfg.model.mamba_config_dict(), cfg.data.seq_len).train()
        batch = cfg.train.global_batch_tokens
        for budget in values:
            tokens_wanted = budget if kind == "tokens" else budget / fpt
            steps = max(1, round(tokens_wanted / batch))
            name = f"d{d}-l{n}-{'t' if kind == 'tokens' else 'c'}{_fmt_budget(budget)}"
            if name in names:
                raise SweepError(f"{where}: two runs would be named {name} (repeated size or budget)")
            names.add(name)
            rc = copy.deepcopy(cfg)
            rc.train.max_steps, rc.train.max_tokens = steps, 0
            if warm_frac is not None:
                rc.schedule.warmup_steps = int(round(warm_frac * steps))
            rc.schedule.warmup_steps = min(rc.schedule.warmup_steps, steps)
            rc.logging.run_dir = os.path.abspath(os.path.join(out_dir, "runs", name))
            rc.checkpoint.dir = ""  # <run_dir>/checkpoints
            if rc.data.path:
                rc.data.path = os.path.abspath(rc.data.path)
            if rc.train.val_tokens <= 0:
                raise SweepError(f"{where}: train.val_tokens must be > 0: the sweep fits the final validation loss")
            try:
                validate_config(rc)
            except ConfigError as e:
                raise SweepError(f"{where}: run {name}: {e}") from None
            runs.append(Run(name=name, config=rc, d_model=d, n_layer=n, lr=float(lr), budget_kind=kind,
                            budget=budget, steps=steps, tokens=steps * batch, params=params,
                            params_total=params_total, flops_per_token=fpt, flops=fpt * steps * batch))
    return runs


# ------------------------------------------------------------------------------------------- the sweep directory
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_runs(runs: list[Run], out_dir: str) -> None:
    """DIR/runs/<name>/config.yaml (the resolved training config) and run.json. A run directory that already
    exists must hold the same config: changing a sweep under finished runs would mix two grids in one fit."""
    for run in runs:
        run_dir = run.config.logging.run_dir
        meta_path = os.path.join(run_dir, "run.json")
        if os.path.isfile(meta_path):
            old = json.loads(Path(meta_path).read_text())
            if old.get("config_sha256") != config_hash(run.config):
                changed = _changed_keys(os.path.join(run_dir, "config.yaml"), run.config)
                raise SweepError(f"{run_dir}: this run exists with a different config (changed: {changed}); "
                                 f"use another --out or delete the run directory")
            continue
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(os.path.join(run_dir, "config.yaml"),
                     yaml.safe_dump(run.config.to_dict(), sort_keys=False, default_flow_style=None))
        write_atomic(meta_path, json.dumps(run.record(), indent=1) + "\n")


def _changed_keys(old_config_path: str, cfg: Config) -> str:
    try:
        old = _flat(yaml.safe_load(Path(old_config_path).read_text()) or {})
    except (OSError, yaml.YAMLError):
        return "unknown"
    new = _flat(cfg.to_dict())
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "") if keys else "unknown"


def read_run(run_dir: str) -> Optional[dict]:
    p = os.path.join(run_dir, "run.json")
    if not os.path.isfile(p):
        return None
    return json.loads(Path(p).read_text())


def run_state(run_dir: str, steps: int) -> tuple[str, Optional[float]]:
    """('done', final val loss) when the run's last complete checkpoint is at its last step and a validation at
    that step was logged; ('partial', None) when it started; ('pending', None) otherwise. Read from the run's own
    files, so runs trained by torchrun or slurm scripts count the same."""
    from mamba_dist.checkpoint import list_checkpoints
    from mamba_dist.metrics import read_jsonl

    ckpts = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    vals = read_jsonl(jsonl, "val") if os.path.isfile(jsonl) else []
    final = [v["val_loss"] for v in vals if v["step"] == steps]
    if ckpts and ckpts[-1][0] >= steps and final:
        return "done", float(final[-1])
    return ("partial" if ckpts or vals else "pending"), None

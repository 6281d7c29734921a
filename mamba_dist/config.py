"""Training configuration: one small dataclass per component, merged as defaults <- YAML <- key=value overrides.

    from mamba_dist.config import load_config
    cfg = load_config("configs/tiny.yaml", ["optim.lr=1e-3", "train.max_steps=50"])

Every mistake (unknown key, wrong type, bad value, missing data) raises `ConfigError` whose message is one line
naming the field, e.g. `optim.lr: expected a float, got 'fast'`. `validate_runtime(cfg, world_size)` adds the
checks that need the launcher's world size (gradient accumulation must be integral); the trainer runs both before
any process group starts.

YAML is parsed with PyYAML's safe loader, which reads `3e-4` as a string (YAML 1.1 wants `3.0e-4`); float and
int fields therefore accept numeric strings too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """An invalid configuration. The message is one line that names the offending field."""


# mamba_ssm mixer keyword arguments accepted in model.ssm_cfg (mamba_ssm 2.x Mamba / Mamba2 constructors).
MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
               "conv_bias", "bias", "use_fast_path"}
MAMBA2_KEYS = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
               "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
               "conv_bias", "chunk_size", "use_mem_eff_path"}
# model.attn_cfg: mamba_ssm's MHA arguments (model/mha.py). causal defaults to true here, false in mamba_ssm.
ATTN_KEYS = {"num_heads", "num_heads_kv", "head_dim", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
             "causal", "qkv_proj_bias", "out_proj_bias", "softmax_scale", "d_conv", "mlp_dim"}


# model.* keys that choose how the model is computed, not what it is (absent from mamba_ssm's config.json; may change
# between a checkpoint and its resume)
RUNTIME_MODEL_KEYS = ("mixer", "backend", "fused_ce")


@dataclass
class ModelConfig:
    """Fields of mamba_ssm's MambaConfig (so a released config.json maps 1:1), plus the mixer and backend choice.
    `mixer` becomes `ssm_cfg["layer"]`; `ssm_cfg` holds the other mixer arguments (d_state, headdim, ...)."""

    mixer: str = "Mamba1"
    d_model: int = 768
    d_intermediate: int = 0
    n_layer: int = 24
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    backend: str = "auto"  # auto | reference | fused
    # the loss fused with lm_head, chunked over tokens so the (tokens x vocab) fp32 logits never exist at once:
    # auto = on at tp == 1 (the vocab-parallel loss under TP has its own), true | false
    fused_ce: Union[bool, str] = "auto"

    def mamba_config_dict(self) -> dict:
        """The mamba_ssm config.json dict of this model (mixer folded into ssm_cfg)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_MODEL_KEYS}
        d["ssm_cfg"] = {"layer": self.mixer, **{k: v for k, v in self.ssm_cfg.items() if k != "layer"}}
        return d

    def to_mamba_config(self):
        from mamba_dist.model.config import MambaConfig

        return MambaConfig(**self.mamba_config_dict())

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple or 1
        return self.vocab_size + (-self.vocab_size % m)


@dataclass
class DataConfig:
    path: str = ""  # directory written by `mamba-dist prepare` (holds manifest.json), or its URL
    # a weighted mixture instead of path: [{path: DIR, weight: W, name: optional (default: DIR's basename)}, ...]
    sources: list = field(default_factory=list)
    root: str = ""  # where the manifests' relative shard paths live (a directory or URL); default: beside manifest
    verify: str = "full"  # full (sha256 of every shard at start) | size | open (each shard when first read)
    seq_len: int = 2048
    num_workers: int = 2
    tokenizer: Optional[str] = None  # if set, must match the tokenizer the data was prepared with
    skip_corrupt: bool = False  # skip (and count) corrupt shards instead of failing


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to the model's no_weight_decay() set (A_log, D, dt bias, norms, biases)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant, from the end of warmup to the last step
    min_lr_ratio: float = 0.1  # final lr = optim.lr * min_lr_ratio


@dataclass
class TrainConfig:
    global_batch_tokens: int = 524288
    micro_batch_size: int = 8
    max_steps: int = 0  # stop after this many optimizer steps (0: no step limit)
    max_tokens: int = 0  # or after this many training tokens (0: no token limit); at least one must be set
    ac_fraction: float = 0.0  # fraction of layers (the first ones) whose activations are recomputed in backward
    val_every: int = 0  # validate every N steps (0: only at the start and the end)
    val_tokens: int = 65536  # validation tokens per evaluation, all ranks together (0: no validation); the same
    #                          rows for any number of ranks when it is a multiple of micro_batch_size*seq_len*dp
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    deterministic: bool = True  # torch.use_deterministic_algorithms (cheap on CPU; bit-exact resume relies on it)
    # replay each micro-batch's forward + backward as a CUDA graph (no launch overhead): auto = on for Mamba-2 with
    # the fused kernels, one GPU process per replica at tp 1 (mamba_dist.train.use_cuda_graphs) | true | false
    cuda_graphs: Union[bool, str] = "auto"
    max_skipped_in_row: int = 10  # non-finite steps skipped in a row before the run halts (exit code 3)
    # loss-spike guard (0: off): skip a step whose loss exceeds spike_factor x the median loss of the last
    # spike_window applied steps (counted like a non-finite skip); torch path only
    spike_factor: float = 0.0
    spike_window: int = 50


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 (bf16 autocast; parameters, grads and optimizer state stay fp32)


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run_dir>/checkpoints
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # complete checkpoints kept (0: keep all)
    resume: str = "auto"  # auto (latest complete checkpoint in dir that verifies, if any) | none | <path>
    on_error: str = "stop"  # a failed save (full disk, permissions): stop (exit code 3) | continue (log, go on)
    # checkpoint.async (a Python keyword, hence the field name): snapshot to (pinned) CPU memory at the step, write
    # in a background thread while training goes on; at most one save in flight (torch path; ZeRO saves stay sync)
    async_: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    jsonl: bool = True  # <run_dir>/metrics.jsonl
    progress: bool = True  # tqdm bar on rank 0
    log_every: int = 1
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = table value for known GPUs, measured on CPU


@dataclass
class ParallelConfig:
    """Passed to `ParallelDims.from_env` (mamba_dist/parallel); its owner documents the fields."""

    tp: int = 1
    dp: int = -1  # -1: world_size // tp
    sequence_parallel: bool = False
    zero_stage: int = 0  # 0: plain torch DDP; 1-3: DeepSpeed ZeRO
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    # a collective that waits longer fails (init_process_group's timeout, gloo and nccl), and a rank whose heartbeat
    # falls silent this long is reported by its neighbours, which exit (code 4) so the launcher restarts the job
    timeout_s: float = 1800.0
    heartbeat: bool = True  # <run_dir>/heartbeat/rank_K files + the watchdog (multi-process runs; mamba_dist/watchdog)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.run_dir, "checkpoints")


# --------------------------------------------------------------------------------------------- parsing + types
KEYWORD_KEYS = {"async": "async_"}  # config keys that are Python keywords -> their dataclass field names
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a float", bool: "true/false", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check/convert one leaf value to the field's type; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)  # 5e5 written in YAML
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. resume: 100 is not a path anyone means, but a dir named "100" is legal
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _apply(obj: Any, values: dict, where: str = "") -> None:
    """Set dataclass fields of `obj` from a (nested) mapping, checking names and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        key = KEYWORD_KEYS.get(key, key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key (valid keys{' in ' + where if where else ''}: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 3e-4 or "3e-4"). The value is parsed as YAML (lists, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides are key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def _override_into(cfg: Config, keys: list[str], value: Any) -> None:
    """Apply one dotted override. Keys inside dict-valued fields (model.ssm_cfg.d_state=64) update that dict."""
    obj: Any = cfg
    for i, k in enumerate(keys):
        path = ".".join(keys[: i + 1])
        if dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
            k = KEYWORD_KEYS.get(k, k)
            if k not in names:
                where = ".".join(keys[:i]) or "config"
                raise ConfigError(f"{path}: unknown key (valid keys in {where}: {', '.join(names)})")
            if i == len(keys) - 1:
                _apply(obj, {k: value}, ".".join(keys[:i]))
                return
            obj = getattr(obj, k)
        elif isinstance(obj, dict):
            if i == len(keys) - 1:
                obj[k] = value
                return
            obj = obj.setdefault(k, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}: is not a mapping")
        else:
            raise ConfigError(f"{path}: {'.'.join(keys[:i])} has no sub-keys")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, validate: bool = True) -> Config:
    """defaults <- YAML file <- key=value overrides, then `validate`."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        _apply(cfg, tree)
    for text in overrides or []:
        keys, value = parse_override(text)
        _override_into(cfg, keys, value)
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(tree: dict, validate: bool = True) -> Config:
    cfg = Config()
    _apply(cfg, tree)
    if validate:
        validate_config(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- validation
def _check(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def _choice(value: str, where: str, choices: tuple) -> None:
    _check(value in choices, where, f"must be one of {', '.join(choices)}; got {value!r}")


def _validate_attn_cfg(m: "ModelConfig") -> None:
    a = m.attn_cfg
    for k in a:
        _check(k in ATTN_KEYS, f"model.attn_cfg.{k}", f"not an argument of the attention layer (valid: "
                                                       f"{', '.join(sorted(ATTN_KEYS))})")

    def positive_int(k, required=False, zero_ok=False):
        if k not in a or (a[k] is None and not required):
            _check(not required, f"model.attn_cfg.{k}", "required when model.attn_layer_idx is set")
            return
        v = a[k]
        _check(isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if zero_ok else v > 0),
               f"model.attn_cfg.{k}", f"must be a {'non-negative' if zero_ok else 'positive'} integer, got {v!r}")

    positive_int("num_heads", required=True)
    for k in ("num_heads_kv", "head_dim"):
        positive_int(k)
    for k in ("rotary_emb_dim", "d_conv", "mlp_dim"):
        positive_int(k, zero_ok=True)
    H = a["num_heads"]
    Hkv = a.get("num_heads_kv") or H
    _check(H % Hkv == 0, "model.attn_cfg.num_heads_kv", f"{Hkv} does not divide num_heads={H}")
    head_dim = a.get("head_dim")
    if head_dim is None:
        _check(m.d_model % H == 0, "model.attn_cfg.num_heads", f"{H} does not divide d_model={m.d_model} "
                                                              f"(or set attn_cfg.head_dim)")
        head_dim = m.d_model // H
    rot = a.get("rotary_emb_dim", 0)
    _check(rot % 2 == 0 and rot <= head_dim, "model.attn_cfg.rotary_emb_dim",
           f"must be even and <= head_dim={head_dim}, got {rot}")
    for k in ("causal", "qkv_proj_bias", "out_proj_bias", "rotary_emb_interleaved"):
        _check(isinstance(a.get(k, True), bool), f"model.attn_cfg.{k}", f"expected true/false, got {a.get(k)!r}")
    if a.get("softmax_scale") is not None:
        v = a["softmax_scale"]
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "model.attn_cfg.softmax_scale",
               f"must be a number > 0 (or null: 1/sqrt(head_dim)), got {v!r}")
    if "rotary_emb_base" in a:
        v = a["rotary_emb_base"]
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "model.attn_cfg.rotary_emb_base",
               f"must be a number > 0, got {v!r}")


def validate_config(cfg: Config) -> None:
    """Value checks that need no launcher or files. Raises ConfigError (one line, naming the field)."""
    m = cfg.model
    _choice(m.mixer, "model.mixer", ("Mamba1", "Mamba2"))
    _choice(m.backend, "model.backend", ("auto", "reference", "fused"))
    _check(m.fused_ce in (True, False, "auto"), "model.fused_ce", f"must be auto, true or false, got {m.fused_ce!r}")
    _check(cfg.train.cuda_graphs in (True, False, "auto"), "train.cuda_graphs",
           f"must be auto, true or false, got {cfg.train.cuda_graphs!r}")
    for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    _check(m.d_intermediate >= 0, "model.d_intermediate", f"must be >= 0, got {m.d_intermediate}")
    allowed = MAMBA1_KEYS if m.mixer == "Mamba1" else MAMBA2_KEYS
    for k, v in m.ssm_cfg.items():
        if k == "layer":
            _check(v == m.mixer, "model.ssm_cfg.layer", f"{v!r} conflicts with model.mixer={m.mixer!r}")
            continue
        _check(k in allowed, f"model.ssm_cfg.{k}",
               f"not an argument of {m.mixer} (valid: {', '.join(sorted(allowed))})")
    for k in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
        if k in m.ssm_cfg:
            v = m.ssm_cfg[k]
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"model.ssm_cfg.{k}",
                   f"must be a positive integer, got {v!r}")
    if m.mixer == "Mamba2":
        d_ssm = m.ssm_cfg.get("d_ssm") or m.ssm_cfg.get("expand", 2) * m.d_model
        headdim = m.ssm_cfg.get("headdim", 64)
        _check(d_ssm % headdim == 0, "model.ssm_cfg.headdim", f"{headdim} does not divide d_ssm={d_ssm}")
        nheads = d_ssm // headdim
        ngroups = m.ssm_cfg.get("ngroups", 1)
        _check(nheads % ngroups == 0, "model.ssm_cfg.ngroups", f"{ngroups} does not divide nheads={nheads}")
    for i in m.attn_layer_idx:
        _check(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < m.n_layer, "model.attn_layer_idx",
               f"{i!r} is not a layer index (0..{m.n_layer - 1})")
    _check(len(set(m.attn_layer_idx)) == len(m.attn_layer_idx), "model.attn_layer_idx",
           f"lists a layer twice: {m.attn_layer_idx}")
    if m.attn_layer_idx:
        _validate_attn_cfg(m)

    d = cfg.data
    _check(bool(d.path) or bool(d.sources), "data.path",
           "required: the directory written by `mamba-dist prepare` (or data.sources for a mixture)")
    names = []
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]"
        _check(isinstance(src, dict) and set(src) <= {"path", "weight", "name"} and "path" in src, where,
               f"expected {{path: DIR, weight: W}}, got {src!r}")
        _check(isinstance(src["path"], str) and bool(src["path"]), f"{where}.path", f"expected a directory, got "
                                                                                    f"{src['path']!r}")
        w = src.get("weight", 1.0)
        _check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0,
               f"{where}.weight", f"must be a number > 0, got {w!r}")
        src["weight"] = float(w)
        names.append(str(src.get("name") or os.path.basename(src["path"].rstrip("/")) or src["path"]))
        _check(names.count(names[-1]) == 1, f"{where}.name",
               f"{names[-1]!r} names two sources (set name: to tell them apart)")
    _choice(d.verify, "data.verify", ("full", "size", "open"))
    _check(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")

    o = cfg.optim
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
           "optim.betas", f"must be two numbers in [0, 1), got {o.betas!r}")
    o.betas = [float(b) for b in o.betas]
    _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")

    s = cfg.schedule
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _choice(s.decay, "schedule.decay", ("cosine", "linear", "constant"))
    _check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")

    t = cfg.train
    _check(t.global_batch_tokens > 0, "train.global_batch_tokens", f"must be > 0, got {t.global_batch_tokens}")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _check(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _check(t.max_tokens >= 0, "train.max_tokens", f"must be >= 0, got {t.max_tokens}")
    _check(t.max_steps > 0 or t.max_tokens > 0, "train.max_steps",
           "set train.max_steps or train.max_tokens (both are 0, so training would never stop)")
    _check(0.0 <= t.ac_fraction <= 1.0, "train.ac_fraction", f"must be in [0, 1], got {t.ac_fraction}")
    _check(t.val_every >= 0, "train.val_every", f"must be >= 0, got {t.val_every}")
    _check(t.val_tokens >= 0, "train.val_tokens", f"must be >= 0, got {t.val_tokens}")
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    _check(t.threads >= 0, "train.threads", f"must be >= 0, got {t.threads}")
    _check(t.max_skipped_in_row >= 0, "train.max_skipped_in_row", f"must be >= 0, got {t.max_skipped_in_row}")
    _check(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor",
           f"must be 0 (off) or > 1, got {t.spike_factor}")
    _check(t.spike_window >= 1, "train.spike_window", f"must be >= 1, got {t.spike_window}")
    _check(t.spike_factor == 0 or cfg.parallel.zero_stage == 0, "train.spike_factor",
           "needs parallel.zero_stage=0 (DeepSpeed applies the update inside its backward, before the step's loss "
           "is known on every rank)")

    _choice(cfg.precision.dtype, "precision.dtype", ("fp32", "bf16"))

    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", f"must be >= 0, got {c.every}")
    _check(c.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0 (0 keeps all), got {c.keep_last}")
    _check(bool(c.resume), "checkpoint.resume", "must be auto, none or a checkpoint path")
    _choice(c.on_error, "checkpoint.on_error", ("stop", "continue"))

    lg = cfg.logging
    _check(bool(lg.run_dir), "logging.run_dir", "required")
    _check(lg.log_every > 0, "logging.log_every", f"must be > 0, got {lg.log_every}")
    _check(lg.peak_flops >= 0, "logging.peak_flops", f"must be >= 0 (0: automatic), got {lg.peak_flops}")

    p = cfg.parallel
    _check(p.tp >= 1, "parallel.tp", f"must be >= 1, got {p.tp}")
    _check(p.dp == -1 or p.dp >= 1, "parallel.dp", f"must be -1 (auto) or >= 1, got {p.dp}")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _choice(p.dist_backend, "parallel.dist_backend", ("auto", "nccl", "gloo"))
    _check(p.timeout_s > 0, "parallel.timeout_s", f"must be > 0 seconds, got {p.timeout_s}")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")


@dataclass
class Derived:
    """Sizes that follow from the config and the launch (world size)."""

    world_size: int
    dp_size: int
    grad_accum: int
    tokens_per_micro_batch: int  # per rank
    total_steps: int
    val_batches: int  # per rank per evaluation


def validate_runtime(cfg: Config, world_size: int) -> Derived:
    """Checks that need the launcher's world size; run before any process group starts."""
    tp = cfg.parallel.tp
    _check(world_size % tp == 0, "parallel.tp", f"{tp} does not divide the world size {world_size}")
    dp = cfg.parallel.dp if cfg.parallel.dp != -1 else world_size // tp
    _check(dp * tp == world_size, "parallel.dp", f"tp={tp} x dp={dp} != world size {world_size}")
    t = cfg.train
    per_micro = t.micro_batch_size * cfg.data.seq_len
    denom = per_micro * dp
    _check(t.global_batch_tokens % denom == 0, "train.global_batch_tokens",
           f"{t.global_batch_tokens} is not a multiple of micro_batch_size x seq_len x dp = "
           f"{t.micro_batch_size} x {cfg.data.seq_len} x {dp} = {denom}, so gradient accumulation is not integral")
    accum = t.global_batch_tokens // denom
    steps = [s for s in (t.max_steps, -(-t.max_tokens // t.global_batch_tokens) if t.max_tokens else 0) if s > 0]
    total = min(steps)
    _check(cfg.schedule.warmup_steps <= total, "schedule.warmup_steps",
           f"{cfg.schedule.warmup_steps} exceeds the number of training steps ({total})")
    return Derived(world_size=world_size, dp_size=dp, grad_accum=accum, tokens_per_micro_batch=per_micro,
                   total_steps=total, val_batches=-(-t.val_tokens // denom))

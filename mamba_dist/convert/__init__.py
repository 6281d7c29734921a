"""`mamba-dist convert`: release a training checkpoint, bring a released model back, change the TP size.

    mamba-dist convert export-hf CHECKPOINT OUT [--dtype fp32|bf16] [--tokenizer NAME]
    mamba-dist convert export-mamba-ssm CHECKPOINT OUT
    mamba-dist convert import SRC OUT [--tp N]
    mamba-dist convert reshard CHECKPOINT OUT --tp N [--keep-optimizer]

CHECKPOINT is a step directory (`.../checkpoints/step_NNNNNNNN`) or a checkpoint directory (its latest complete
step), written under any layout: plain or DDP, TP = 1/2/4/..., DeepSpeed ZeRO stage 1/2/3, any DP.
- export-hf: model.safetensors, config.json (MambaConfig / Mamba2Config), generation_config.json and the data's
  tokenizer (tokenizer.json + tokenizer_config.json); `AutoModelForCausalLM.from_pretrained(OUT)` and
  `AutoTokenizer.from_pretrained(OUT)` load it.
- export-mamba-ssm: config.json (mamba_ssm MambaConfig fields only) + pytorch_model.bin, as
  `MambaLMHeadModel.save_pretrained` writes them (plus the tokenizer files, which mamba_ssm ignores).
- import: an HF or mamba_ssm directory -> a weights-only checkpoint directory at --tp N; `mamba-dist train ...
  checkpoint.resume=OUT parallel.tp=N` starts a new run from those weights (fresh optimizer). OUT/config.yaml is a
  training config with the model section filled in.
- reshard: the same checkpoint at another TP size (ZeRO partitions consolidated by DeepSpeed's zero_to_fp32). With
  --keep-optimizer the AdamW moments, LR schedule, step and data position move too and the run continues exactly
  (on the plain-torch path, parallel.zero_stage=0); without it the output holds the weights only.
Outputs are written to a temporary sibling and renamed when complete. Errors: one line, exit code 2.

Implementation: source.py (read + consolidate), layout.py (TP shard layout), target.py (write trainer
checkpoints), formats.py (HF / mamba_ssm), tokenizer_files.py, generate.py (`mamba-dist generate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Optional

from .source import ConvertError

log = logging.getLogger("mamba_dist.convert")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# --------------------------------------------------------------------------------------------- helpers
class _Staged:
    """Write a directory atomically: into `<out>.tmp-<pid>` (same parent), renamed onto `out` at the end."""

    def __init__(self, out: str, overwrite: bool):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)) and not overwrite:
            raise ConvertError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
        self.tmp = f"{self.out}.tmp-{os.getpid()}"
        self.overwrite = overwrite

    def __enter__(self) -> str:
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.out):
            trash = f"{self.out}.trash-{os.getpid()}"
            os.rename(self.out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(self.tmp, self.out)
        return False


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------- export-hf
def export_hf(checkpoint: str, out: str, dtype: str = "fp32", tokenizer: Optional[str] = None,
              overwrite: bool = False, progress: bool = True) -> str:
    from safetensors.torch import save_file

    from . import formats, source, tokenizer_files

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ck = source.open_checkpoint(checkpoint)
    tok = tokenizer_files.resolve_tokenizer(ck, tokenizer)
    special = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    hf_cfg = formats.hf_config(ck.model_config, special, DTYPES[dtype])  # refuses before anything is written
    if tok.vocab_size > ck.model_config.padded_vocab_size:
        raise ConvertError(f"tokenizer {tok.name} has {tok.vocab_size} ids, the model only "
                           f"{ck.model_config.padded_vocab_size}")
    torch_dtype = _torch_dtype(DTYPES[dtype])
    with _Staged(out, overwrite) as tmp:
        tensors = {}
        for name, t in source.iter_full_state(ck, progress, desc="export-hf"):
            if ck.model_config.tie_embeddings and name == "lm_head.weight":
                continue  # HF ties it on load; safetensors stores no shared tensors
            tensors[formats.to_hf_name(name)] = t.to(torch_dtype).contiguous()
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        hf_cfg.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(**special).save_pretrained(tmp)
        tokenizer_files.write_tokenizer(tok, tmp)
    log.info("exported %s (step %s) to %s as %s (%s)", ck.path, ck.meta.get("step"), out,
             hf_cfg.architectures[0], dtype)
    return out


# --------------------------------------------------------------------------------------------- export-mamba-ssm
def export_mamba_ssm(checkpoint: str, out: str, tokenizer: Optional[str] = None, overwrite: bool = False,
                     progress: bool = True) -> str:
    import torch

    from mamba_dist.data.tokenizer import TokenizerError

    from . import formats, source, tokenizer_files

    ck = source.open_checkpoint(checkpoint)
    config = ck.model_config
    try:
        tok = tokenizer_files.resolve_tokenizer(ck, tokenizer)
    except (ConvertError, TokenizerError) as e:
        tok = None
        log.warning("no tokenizer files written (%s); mamba_ssm does not need them", e)
    with _Staged(out, overwrite) as tmp:
        state = {}
        for name, t in source.iter_full_state(ck, progress, desc="export-mamba-ssm"):
            # the model's own state_dict: a tied lm_head.weight is the embedding tensor, stored once by torch.save
            state[name] = state[formats.OUR_EMB] if (config.tie_embeddings and name == "lm_head.weight") else \
                t.contiguous()
        torch.save(state, os.path.join(tmp, "pytorch_model.bin"))
        del state
        # MambaConfig's fields only: mamba_ssm's from_pretrained calls MambaConfig(**json)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(formats.mamba_ssm_config_dict(config), f, indent=4)
        if tok is not None:
            tokenizer_files.write_tokenizer(tok, tmp)
    log.info("exported %s (step %s) to %s (mamba_ssm MambaLMHeadModel)", ck.path, ck.meta.get("step"), out)
    return out


# --------------------------------------------------------------------------------------------- import
def import_model(src: str, out: str, tp: int = 1, overwrite: bool = False, progress: bool = True) -> str:
    import torch
    from tqdm import tqdm

    from mamba_dist.config import config_from_dict, save_config
    from mamba_dist.data.tokenizer import load_tokenizer
    from mamba_dist.model import MambaConfig

    from . import formats, layout, target

    if not os.path.isdir(src):
        raise ConvertError(f"{src} is not a directory")
    tok_file = os.path.join(src, "tokenizer.json")
    tok = load_tokenizer(tok_file) if os.path.isfile(tok_file) else None
    if formats.is_hf_dir(src):
        config = formats.config_from_hf(formats.read_json(os.path.join(src, "config.json")),
                                        tok.vocab_size if tok else None)
        def tensors():
            return formats.iter_hf_tensors(src)

        kind = "Hugging Face"
    elif os.path.isfile(os.path.join(src, "pytorch_model.bin")):
        try:
            config = formats.mamba_ssm_config(formats.read_json(os.path.join(src, "config.json")))
        except (ValueError, TypeError) as e:
            raise ConvertError(f"{src}/config.json is not a mamba_ssm MambaConfig ({e})") from None
        sd = torch.load(os.path.join(src, "pytorch_model.bin"), map_location="cpu", mmap=True, weights_only=True)

        def tensors():
            return iter(sd.items())

        kind = "mamba_ssm"
    else:
        raise ConvertError(f"{src} is neither a Hugging Face directory (config.json with model_type) nor a mamba_ssm "
                           f"one (config.json + pytorch_model.bin)")
    from mamba_dist.parallel.dims import ParallelLayoutError

    try:
        layout.check_tp(config, tp)
    except ParallelLayoutError as e:
        raise ConvertError(f"--tp {tp}: {e}") from None
    def checked():  # one pass per output TP rank (safe_open / mmap: nothing is read twice into memory for long)
        return formats.checked_tensors(config, tqdm(tensors(), desc="import", unit="tensor", disable=not progress,
                                                    leave=False), src)

    with _Staged(out, overwrite) as tmp:
        extra = {"tokenizer.json": tok_file} if tok else {}
        target.write_checkpoint(tmp, config, tp, checked, extra_files=extra,
                                           extra_meta={"source": os.path.abspath(src), "source_format": kind,
                                                       **({"tokenizer_file": "tokenizer.json"} if tok else {})})
        cfg = config_from_dict({"model": target.model_config_dict(config), "parallel": {"tp": tp},
                                "checkpoint": {"resume": os.path.abspath(out)}}, validate=False)
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    log.info("imported %s (%s, %s) into %s at tp=%d: weights only; a run started from it (checkpoint.resume=%s) "
             "begins with a fresh optimizer", src, kind, config.mixer, out, tp, out)
    return out


# --------------------------------------------------------------------------------------------- reshard
def reshard(checkpoint: str, out: str, tp: int, keep_optimizer: bool = False, overwrite: bool = False,
            progress: bool = True) -> str:
    from mamba_dist import checkpoint as ckpt
    from mamba_dist.parallel.dims import ParallelLayoutError

    from . import layout, source, target

    ck = source.open_checkpoint(checkpoint)
    try:
        layout.check_tp(ck.model_config, tp)
    except ParallelLayoutError as e:
        raise ConvertError(f"--tp {tp}: {e}") from None
    if keep_optimizer and ck.weights_only:
        raise ConvertError(f"--keep-optimizer: {ck.path} holds weights only (an import); there is no optimizer "
                           f"state to keep")
    with _Staged(out, overwrite) as tmp:
        tensors = source.reader(ck, progress, desc=f"reshard tp {ck.tp}->{tp}")
        if keep_optimizer:
            opt = source.full_optimizer(ck)
            rank0 = os.path.join(ck.path, ckpt.rank_file(0))
            target.write_checkpoint(tmp, ck.model_config, tp, tensors, step=int(ck.meta["step"]),
                                    train_config=target.resharded_train_config(ck.meta["config"], tp),
                                    optimizer=opt, rank_state_file=rank0, tokens=int(ck.meta.get("tokens", 0)),
                                    skipped=int(ck.meta.get("skipped", 0)),
                                    extra_meta={"resharded_from": ck.path, "source_tp": ck.tp,
                                                "source_zero_stage": ck.zero_stage})
        else:
            extra_meta = {"resharded_from": ck.path, "source_tp": ck.tp}
            extra_files = {}
            if ck.meta.get("tokenizer_file"):
                extra_files[ck.meta["tokenizer_file"]] = os.path.join(ck.path, ck.meta["tokenizer_file"])
                extra_meta["tokenizer_file"] = ck.meta["tokenizer_file"]
            target.write_checkpoint(tmp, ck.model_config, tp, tensors, extra_meta=extra_meta,
                                    extra_files=extra_files)
    log.info("resharded %s (tp %d, zero stage %d) to %s at tp=%d%s", ck.path, ck.tp, ck.zero_stage, out, tp,
             " with the optimizer state: continue with parallel.tp=%d parallel.zero_stage=0 checkpoint.resume=%s"
             % (tp, out) if keep_optimizer else ": weights only; a run started from it begins with a fresh optimizer")
    return out


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-dist convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{export-hf,export-mamba-ssm,import,reshard}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    e = sub.add_parser("export-hf", parents=[common], help="Hugging Face transformers directory (safetensors)")
    e.add_argument("checkpoint", metavar="CHECKPOINT")
    e.add_argument("out", metavar="OUT")
    e.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    e.add_argument("--tokenizer", default=None, help="override the data's tokenizer (byte | gpt-neox-20b | PATH)")
    m = sub.add_parser("export-mamba-ssm", parents=[common], help="mamba_ssm save_pretrained directory")
    m.add_argument("checkpoint", metavar="CHECKPOINT")
    m.add_argument("out", metavar="OUT")
    m.add_argument("--tokenizer", default=None)
    i = sub.add_parser("import", parents=[common], help="HF or mamba_ssm directory -> training checkpoint")
    i.add_argument("src", metavar="SRC")
    i.add_argument("out", metavar="OUT")
    i.add_argument("--tp", type=int, default=1)
    r = sub.add_parser("reshard", parents=[common], help="another tensor-parallel size")
    r.add_argument("checkpoint", metavar="CHECKPOINT")
    r.add_argument("out", metavar="OUT")
    r.add_argument("--tp", type=int, required=True)
    r.add_argument("--keep-optimizer", action="store_true", help="re-shard the AdamW moments too")
    return p


def _setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    pkg = logging.getLogger("mamba_dist")
    pkg.handlers[:] = [handler]
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    logging.getLogger("mamba_dist.model.backend").setLevel(logging.WARNING)  # the offline layout models' backend
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    from mamba_dist.data.tokenizer import TokenizerError

    try:
        if getattr(args, "tp", 1) < 1:
            raise ConvertError(f"--tp must be >= 1, got {args.tp}")
        if args.cmd == "export-hf":
            export_hf(args.checkpoint, args.out, args.dtype, args.tokenizer, args.overwrite, args.progress)
        elif args.cmd == "export-mamba-ssm":
            export_mamba_ssm(args.checkpoint, args.out, args.tokenizer, args.overwrite, args.progress)
        elif args.cmd == "import":
            import_model(args.src, args.out, args.tp, args.overwrite, args.progress)
        else:
            reshard(args.checkpoint, args.out, args.tp, args.keep_optimizer, args.overwrite, args.progress)
    except (ConvertError, TokenizerError) as e:
        print(f"mamba-dist convert {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["export_hf", "export_mamba_ssm", "import_model", "reshard", "main", "ConvertError"]

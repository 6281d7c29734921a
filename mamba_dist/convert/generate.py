"""Generate text with the recurrent step: constant time and memory per token (a conv state and an SSM state per
layer, nothing that grows with the sequence).

    mamba-dist generate runs/demo/checkpoints --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 40
    mamba-dist generate release/demo-hf --prompt "In the beginning" --temperature 0      # greedy
    mamba-dist generate CHECKPOINT_OR_EXPORT --prompt TEXT [--max-new-tokens N --temperature T --top-k K
                        --top-p P --seed S --device auto|cpu|cuda --tokenizer NAME]

CHECKPOINT_OR_EXPORT: a training checkpoint (any layout; a checkpoint directory means its latest step), an
`export-hf` directory or an `export-mamba-ssm` directory. Prints the continuation (not the prompt) on stdout.
The prompt is fed through the same recurrent step, token by token. On CUDA with mamba_ssm installed the SSM step is
mamba_ssm's selective_state_update kernel (backend "fused"); elsewhere the pure-PyTorch reference.
Sampling: temperature 0 (or --top-k 1) is greedy; otherwise softmax(logits / T) restricted to the top-k tokens and
to the smallest set whose probability reaches top-p, drawn with a torch.Generator seeded by --seed. Only ids of
the tokenizer's vocabulary are drawn (the padded rows of the embedding never trained).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from .source import ConvertError


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) logits -> (V,) logits with -inf outside the top-k / top-p set, divided by temperature."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # a token is kept if the mass before it is below top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None, vocab_size: Optional[int] = None,
             cache: Optional[dict] = None) -> list[int]:
    """New token ids after `prompt_ids` (at least one prompt token), through `model.step` (one batch row).
    Stops after max_new_tokens or at eos_id. `cache` (from model.allocate_inference_cache(1)) may be passed in to
    inspect the state afterwards."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    cache = model.allocate_inference_cache(1) if cache is None else cache
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = None
    for t in prompt_ids:
        logits = model.step(torch.tensor([t], device=device), cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        row = logits[0, :vocab_size] if vocab_size else logits[0]
        if temperature <= 0 or top_k == 1:
            tok = int(row.argmax())
        else:
            probs = filter_logits(row, temperature, top_k, top_p).softmax(-1).cpu()
            tok = int(torch.multinomial(probs, 1, generator=gen))
        out.append(tok)
        if eos_id is not None and tok == eos_id:
            break
        logits = model.step(torch.tensor([tok], device=device), cache)
    return out


def cache_bytes(cache: dict) -> int:
    return sum(t.numel() * t.element_size() for states in cache.values() for t in states)


# --------------------------------------------------------------------------------------------- loading
def load_model(path: str, device: str = "cpu", backend: str = "auto", tokenizer: Optional[str] = None,
               progress: bool = False):
    """(model in eval mode, tokenizer or None) from a training checkpoint or an export directory."""
    from mamba_dist.data.tokenizer import load_tokenizer
    from mamba_dist.model import MambaConfig, MambaLMHeadModel

    from . import formats, source, tokenizer_files

    if formats.is_hf_dir(path):
        tok = load_tokenizer(tokenizer or path) if (tokenizer or os.path.isfile(os.path.join(path, "tokenizer.json"))) \
            else None
        config = formats.config_from_hf(formats.read_json(os.path.join(path, "config.json")),
                                        tok.vocab_size if tok else None)
        tensors = formats.checked_tensors(config, formats.iter_hf_tensors(path), path)
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")) and os.path.isfile(os.path.join(path, "config.json")):
        try:
            config = MambaConfig.from_dict(formats.read_json(os.path.join(path, "config.json")))
        except (ValueError, TypeError) as e:
            raise ConvertError(f"{path}/config.json is not a mamba_ssm MambaConfig ({e})") from None
        has_tok = os.path.isfile(os.path.join(path, "tokenizer.json"))
        tok = load_tokenizer(tokenizer or (path if has_tok else "gpt-neox-20b"))
        sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", mmap=True, weights_only=True)
        tensors = formats.checked_tensors(config, iter(sd.items()), path)
    else:
        ck = source.open_checkpoint(path)
        config = ck.model_config
        tok = tokenizer_files.resolve_tokenizer(ck, tokenizer)
        tensors = source.iter_full_state(ck, progress=progress)
    tok = _as_byte_tokenizer(tok)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = MambaLMHeadModel(config, backend="reference", device="meta")
    state = dict(tensors)
    if config.tie_embeddings:
        state["lm_head.weight"] = state[formats.OUR_EMB]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model = model.to(dev)
    if dev.type == "cpu":
        model = model.float()  # a bf16 export computes in fp32 on CPU
    else:
        model.set_backend(backend)  # fused (mamba_ssm's selective_state_update) when it is usable
    return model.eval(), tok


def _as_byte_tokenizer(tok):
    """An export's tokenizer.json that is our byte tokenizer's JSON -> the byte tokenizer itself (same ids; its
    decode replaces only the invalid bytes of a sequence, where `tokenizers`' ByteFallback replaces the run)."""
    if tok is None or tok.path is None:
        return tok
    import json

    from mamba_dist.data.tokenizer import fingerprint_json, load_tokenizer

    from .tokenizer_files import byte_tokenizer_json

    if tok.sha256 == fingerprint_json(json.loads(byte_tokenizer_json())):
        return load_tokenizer("byte")
    return tok


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-dist generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CHECKPOINT_OR_EXPORT")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer (byte | gpt-neox-20b | PATH)")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from mamba_dist.data.tokenizer import TokenizerError

    try:
        if args.max_new_tokens < 0 or args.top_k < 0 or not 0.0 < args.top_p <= 1.0 or args.temperature < 0:
            raise ConvertError("--max-new-tokens, --top-k, --temperature must be >= 0 and --top-p in (0, 1]")
        if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
            raise ConvertError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConvertError("--device cuda: torch sees no GPU")
        model, tok = load_model(args.path, args.device, tokenizer=args.tokenizer)
        prompt = tok.encode(args.prompt)
        if not prompt:
            raise ConvertError("--prompt is empty")
        ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id if args.stop_at_eos else None,
                       vocab_size=tok.vocab_size)
    except (ConvertError, TokenizerError, OSError) as e:
        print(f"mamba-dist generate: error: {e}", file=sys.stderr)
        return 2
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    print(tok.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `mamba-dist` command: one entry point, one subcommand per tool.

    mamba-dist prepare builtin --out data/prepared/builtin --seq-len 2048     # tokenize + pack a corpus
    mamba-dist train --config configs/tiny.yaml train.max_steps=100            # train (also under torchrun)
    mamba-dist <command> --help

Each subcommand is a module with `main(argv) -> int`, imported only when it runs (so `prepare` does not pay for
importing the model, and tools added later register here with one line).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("mamba_dist.train", "train a model from a YAML config (one process or torchrun)"),
    "prepare": ("mamba_dist.data.prepare", "tokenize a corpus into packed zstd webdataset shards"),
    "convert": ("mamba_dist.convert", "convert checkpoints to/from mamba_ssm and Hugging Face formats"),
    "sweep": ("mamba_dist.sweep", "run a scaling sweep"),
    "generate": ("mamba_dist.convert.generate", "generate text from a checkpoint or an export (recurrent step)"),
    "checkpoint": ("mamba_dist.checkpoint", "verify a checkpoint's files against their checksums (offline)"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def usage() -> str:
    lines = ["usage: mamba-dist <command> [args...]", "", "commands:"]
    for name, (module, help_) in COMMANDS.items():
        if _available(module):
            lines.append(f"  {name:<12}{help_}")
    lines.append("")
    lines.append("`mamba-dist <command> --help` describes a command's arguments.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or not _available(COMMANDS[name][0]):
        print(f"mamba-dist: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

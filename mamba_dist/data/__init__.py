"""Data: tokenizer, prepare (corpus -> zstd webdataset shards + manifest), loader (rank-split, resumable).

    from mamba_dist.data.prepare import prepare        # the function; `mamba_dist.data.prepare` is the module
    from mamba_dist.data import build_loader, load_tokenizer, read_manifest

Attributes resolve lazily so that tokenizer worker processes (spawned by prepare) do not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "build_loader": "loader", "PackedLoader": "loader", "read_manifest": "loader", "ShardError": "loader",
    "ManifestError": "loader",
    "load_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "TokenizerError": "tokenizer",
    "resolve_inputs": "corpus", "InputError": "corpus",
    "cache_dir": "cache", "FetchError": "cache",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

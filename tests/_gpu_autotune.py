"""Shorter Triton autotuning for the GPU tests.

mamba_ssm's SSD and layer-norm kernels autotune over ~190 block configurations for every new (chunk, headdim,
d_state, nheads, dtype): on the device machine that compiles for ~7 minutes per set, most of a test run. The
configurations change the tiling, not the function, so the correctness tests keep only the first
MAMBA_DIST_GPU_AUTOTUNE_CONFIGS (default 2; 0 = all) of each kernel's list: still autotuned between two, so a
configuration that does not fit the shape (out of shared memory) is skipped as usual. Benchmarks never use this."""

import importlib
import os

_MODULES = ["ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_combined", "ssd_state_passing", "layer_norm",
            "layernorm_gated", "selective_state_update"]


def limit_triton_autotune() -> int:
    """Trim every Autotuner in mamba_ssm.ops.triton.*; returns how many were trimmed."""
    keep = int(os.environ.get("MAMBA_DIST_GPU_AUTOTUNE_CONFIGS", "2"))
    if keep <= 0:
        return 0
    from triton.runtime.autotuner import Autotuner

    trimmed = 0
    for name in _MODULES:
        try:
            mod = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
        except ImportError:
            continue
        for obj in list(vars(mod).values()):
            seen = set()
            while obj is not None and id(obj) not in seen:  # @heuristics / @autotune wrappers chain through .fn
                seen.add(id(obj))
                if isinstance(obj, Autotuner) and len(obj.configs) > keep:
                    obj.configs = obj.configs[:keep]
                    trimmed += 1
                obj = getattr(obj, "fn", None)
    return trimmed

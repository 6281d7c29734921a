"""Shorter Triton autotuning for the GPU tests.

mamba_ssm's SSD and layer-norm kernels autotune over ~190 block configurations for every new (chunk, headdim,
d_state, nheads, dtype): on the device machine that compiles for ~7 minutes per set, most of a test run. The
configurations change the tiling, not the function, so the correctness tests keep only the first
MAMBA_DIST_GPU_AUTOTUNE_CONFIGS (default 2, at least 2; 0 = all) of each kernel's list. At least two, because the
autotuner skips a configuration that does not fit the shape only when it has another: with one, mamba_ssm's first
_chunk_state_fwd_kernel configuration asked for 263,680 bytes of shared memory on an H100 (limit 232,448) and the
Mamba-2 test failed (device run, 2026-11-24). Benchmarks never use this."""

import importlib
import os

_MODULES = ["ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_combined", "ssd_state_passing", "layer_norm",
            "layernorm_gated", "selective_state_update"]


def limit_triton_autotune() -> int:
    """Trim every Autotuner in mamba_ssm.ops.triton.*; returns how many were trimmed."""
    keep = int(os.environ.get("MAMBA_DIST_GPU_AUTOTUNE_CONFIGS", "2"))
    if keep <= 0:
        return 0
    keep = max(keep, 2)
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

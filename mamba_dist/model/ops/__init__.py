"""Kernels: `reference` (pure PyTorch) and `fused` (CUDA; imported lazily by backend.kernels("fused") only)."""

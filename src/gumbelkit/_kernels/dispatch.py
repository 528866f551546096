"""Kernel choice in one place: the torch path everywhere, fused Triton kernels for CUDA tensors.

``GUMBELKIT_BACKEND`` overrides the choice: ``torch`` never uses Triton, ``auto`` (the
default) uses it for CUDA tensors when the ``triton`` package imports. CPU tensors never
touch the Triton kernels (tests call them directly under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import torch

__all__ = ["triton_kernels"]


@lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    try:
        from . import triton_gumbel
    except ImportError:  # triton missing or too old: the torch path serves every device
        return None
    return triton_gumbel


def triton_kernels(t: torch.Tensor) -> ModuleType | None:
    """The Triton kernel module to use for ``t``, or None for the torch path."""
    backend = os.environ.get("GUMBELKIT_BACKEND", "auto").lower()
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"GUMBELKIT_BACKEND must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or t.device.type != "cuda":
        return None
    kernels = _load()
    if kernels is None and backend == "triton":
        raise ImportError("GUMBELKIT_BACKEND=triton but the triton package is not importable; "
                          "pip install 'gumbelkit[triton]'")
    return kernels

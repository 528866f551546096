"""Kernel choice in one place: fused numba kernels for CPU tensors, fused Triton kernels for CUDA
tensors, the torch path everywhere else (and whenever the optional package is missing).

``GUMBELKIT_BACKEND`` overrides the choice: ``torch`` always takes the torch path, ``auto``
(the default) takes the fused kernels where their package imports, ``numba`` and ``triton``
insist on them (an ``ImportError`` with the install hint when missing). CPU tensors never
touch the Triton kernels (tests call them directly under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import torch

__all__ = ["cpu_kernels", "triton_kernels"]

_BACKENDS = ("auto", "torch", "triton", "numba")
# Below this many elements ``auto`` takes the torch path on the CPU: it is as fast there, and
# numba's OpenMP pool, which waits by spinning, slows concurrent processes (two data-parallel
# ranks training small models ran 4-5x slower). ``GUMBELKIT_BACKEND=numba`` uses the fused
# kernels at every size.
FUSED_MIN_ELEMENTS = 1 << 15


def _backend() -> str:
    backend = os.environ.get("GUMBELKIT_BACKEND", "").lower() or "auto"  # unset or empty: auto
    if backend not in _BACKENDS:
        raise ValueError(f"GUMBELKIT_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    return backend


@lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    try:
        from . import triton_gumbel
    except ImportError:  # triton missing or too old: the torch path serves every device
        return None
    return triton_gumbel


def triton_kernels(t: torch.Tensor) -> ModuleType | None:
    """The Triton kernel module to use for ``t``, or None for the torch path."""
    backend = _backend()
    if backend in ("torch", "numba") or t.device.type != "cuda":
        return None
    kernels = _load()
    if kernels is None and backend == "triton":
        raise ImportError("GUMBELKIT_BACKEND=triton but the triton package is not importable; "
                          "pip install 'gumbelkit[triton]'")
    return kernels


def cpu_kernels(t: torch.Tensor) -> ModuleType | None:
    """The fused numba kernel module to use for ``t`` (a CPU float tensor), or None for the torch path."""
    backend = _backend()
    if backend in ("torch", "triton") or t.device.type != "cpu" or type(t) is not torch.Tensor:
        return None
    if backend == "auto" and t.numel() < FUSED_MIN_ELEMENTS:
        return None
    from . import cpu_fused

    if cpu_fused.available():
        return cpu_fused
    if backend == "numba":
        raise ImportError(cpu_fused.HINT)
    return None

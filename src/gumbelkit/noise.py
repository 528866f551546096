"""Gumbel noise: the one place where gumbelkit turns uniform draws into Gumbel draws.

The noise contract: every sampler in gumbelkit that draws Gumbel noise on the CPU draws
exactly ``gumbel_noise_like(logits, generator=generator)``. Seed a generator, call the
sampler, seed it again and call ``gumbel_noise_like``: you get the noise the sampler used.

Speed: torch draws CPU uniforms serially (one Mersenne Twister), which would make the noise
the bottleneck of every sampler. Tensors of at least ``PARALLEL_CHUNK`` elements are
therefore filled in chunks of ``PARALLEL_CHUNK`` elements, chunk ``i`` from its own
generator seeded with the ``i``-th of a batch of 64-bit seeds drawn from ``generator``, on
up to ``torch.get_num_threads()`` threads. The draw is a pure function of the generator
state and the shape: it never depends on the thread count or scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from numbers import Real

import torch

from ._validation import check_generator, compute_dtype

__all__ = ["gumbel_noise", "gumbel_noise_like"]


PARALLEL_CHUNK = 1 << 20


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gumbelkit-noise")


def _uniform_(buf: torch.Tensor, low: float, generator: torch.Generator | None) -> torch.Tensor:
    """``buf.uniform_(low, 1)``; large contiguous CPU buffers are filled in seeded chunks in parallel."""
    n = buf.numel()
    if buf.device.type != "cpu" or n < PARALLEL_CHUNK:
        return buf.uniform_(low, 1.0, generator=generator)
    flat = buf.view(-1)
    starts = range(0, n, PARALLEL_CHUNK)
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(starts),), dtype=torch.int64, generator=generator).tolist()

    def fill(job: tuple[int, int]) -> None:
        start, seed = job
        chunk_gen = torch.Generator().manual_seed(seed & (2**64 - 1))
        flat[start:start + PARALLEL_CHUNK].uniform_(low, 1.0, generator=chunk_gen)

    workers = min(torch.get_num_threads(), len(starts))
    jobs = list(zip(starts, seeds, strict=True))
    if workers <= 1:
        for job in jobs:
            fill(job)
    else:
        list(_pool(workers).map(fill, jobs))
    return buf


def _neg_gumbel_(buf: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``buf`` with ``log(-log U)``, i.e. *minus* a standard Gumbel draw, in place.

    Samplers subtract this from the logits (``logits - L`` equals ``logits + g`` bit for bit),
    which saves the final negation pass.
    """
    # U is drawn on [tiny, 1): both logs stay finite, so g lies in about [-4.5, 16.6] in
    # float32 and [-6.6, 36.7] in float64 and is never +-inf or NaN.
    return _uniform_(buf, torch.finfo(buf.dtype).tiny, generator).log_().neg_().log_()


def _neg_gumbel(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None) -> torch.Tensor:
    """``-g`` in the compute dtype of ``dtype`` in a fresh buffer; half precision is rounded through ``dtype``."""
    cdtype = compute_dtype(dtype)
    buf = _neg_gumbel_(torch.empty(shape, dtype=cdtype, device=device), generator)
    if cdtype != dtype:
        # the noise contract rounds half-precision noise; rounding commutes with negation
        buf = buf.to(dtype).to(cdtype)
    return buf


def neg_gumbel_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``-gumbel_noise_like(t)`` in the compute dtype of ``t``, in a fresh buffer the caller owns."""
    return _neg_gumbel(t.shape, t.dtype, t.device, generator)


def _check_param(value: object, name: str, positive: bool) -> None:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
        ok = torch.isfinite(value) & (value > 0) if positive else torch.isfinite(value)
        if not bool(ok.all()):
            raise ValueError(f"{name} must be finite{' and > 0' if positive else ''} everywhere")
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")


def gumbel_noise(
    shape: Sequence[int] | torch.Size | int,
    *,
    loc: float | torch.Tensor = 0.0,
    scale: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Draw Gumbel(loc, scale) noise.

    .. math::
        g = \mathrm{loc} - \mathrm{scale}\cdot\log(-\log U), \quad U \sim \mathcal U(0, 1),

    whose density is :math:`\frac1b e^{-(x-\mu)/b - e^{-(x-\mu)/b}}` with :math:`\mu` = loc
    and :math:`b` = scale (Gumbel 1954). U is drawn on the open interval, so a draw is never
    infinite or NaN; half and bfloat16 results are computed in float32 and rounded.

    Args:
        shape: the output shape.
        loc: location :math:`\mu` (a float or a tensor broadcastable to ``shape``).
        scale: scale :math:`b > 0` (a float or a tensor broadcastable to ``shape``).
        generator: the random source; the same state gives bit-identical draws.
        dtype: a floating dtype (default: ``torch.get_default_dtype()``).
        device: where to draw (default: the generator's device, else the CPU).

    Returns:
        A tensor of ``shape`` holding Gumbel draws.

    Example:
        >>> g = gumbel_noise((100_000,), generator=torch.Generator().manual_seed(0))
        >>> round(g.mean().item(), 1)  # Euler's constant 0.5772...
        0.6
    """
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if any((isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in shape):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    device = torch.device(device)
    check_generator(generator, device)
    _check_param(loc, "loc", positive=False)
    _check_param(scale, "scale", positive=True)
    g = _neg_gumbel(shape, compute_dtype(dtype), device, generator).neg_()
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        g = g * scale
    if isinstance(loc, torch.Tensor) or loc != 0.0:
        g = g + loc
    if tuple(g.shape) != shape:
        raise ValueError(f"loc/scale of shapes {getattr(loc, 'shape', ())}, {getattr(scale, 'shape', ())} "
                         f"do not broadcast to shape {shape}")
    return g.to(dtype)


def gumbel_noise_like(t: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Standard Gumbel(0, 1) noise with the shape, dtype and device of ``t``.

    :math:`g = -\log(-\log U)` with :math:`U \sim \mathcal U(0, 1)` open, computed in at least
    float32. This is exactly the noise every gumbelkit sampler adds to ``t`` when given the
    same generator state (the noise contract).

    Example:
        >>> logits = torch.zeros(2, 3)
        >>> gumbel_noise_like(logits, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3])
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    check_generator(generator, t.device)
    return neg_gumbel_like(t, generator).neg_().to(t.dtype)

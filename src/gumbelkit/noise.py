"""Gumbel noise: the one place where gumbelkit turns random bits into Gumbel draws.

The noise contract: the samplers of :mod:`gumbelkit.functional` (``gumbel_softmax``,
``log_gumbel_softmax``, ``gumbel_max``, ``gumbel_topk``) and the modules built on them draw their
noise from one 64-bit seed taken from ``generator`` (or torch's default generator), exactly as
``gumbel_noise_like(logits, generator=generator)`` does. Seed a generator, call the sampler,
seed it again and call ``gumbel_noise_like``: you get the noise the sampler used, at the same
positions whatever ``dim`` is (for float16/bfloat16 logits the samplers use the float32 noise,
i.e. ``gumbel_noise_like(logits.float())``, before rounding). The same state gives
bit-identical results in eager, compiled, exported and checkpointed runs (see
:func:`gumbelkit.rng_context` for checkpointing with a ``generator``).
:func:`gumbelkit.sample` is the exception by design: its noise is counter-based, keyed by
``(row seed, token id)`` (``seeds=``, or per-row seeds derived from one seed drawn from
``generator=``), so that a row's draw does not depend on the rest of the batch; see
:mod:`gumbelkit._counter_noise`.

How a seed becomes noise, with an exact tail, is described in
:mod:`gumbelkit._kernels.cpu_noise` (the torch path: a float32 draw reaches 42 nats, not 16.6),
:mod:`gumbelkit._kernels.cpu_fused` (the fused CPU kernels: 36.7 nats) and
:mod:`gumbelkit._kernels.triton_gumbel` (CUDA: 22.9 nats from 32 Philox bits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from numbers import Real

import torch

from ._kernels.ops import draw_seed, gumbel_noise_forward
from ._validation import check_generator, compute_dtype

__all__ = ["gumbel_noise", "gumbel_noise_like", "rng_context"]

# |g| <= G_BOUND for every draw: g = -log E with E in [2**-61, 40] (see _kernels.cpu_noise)
G_BOUND = 43.0


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


def _check_range(loc: float | torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> None:
    """Raise when ``loc + scale * g`` could overflow ``dtype`` for some draw (|g| <= G_BOUND)."""
    top = torch.finfo(dtype).max
    if isinstance(loc, torch.Tensor) or isinstance(scale, torch.Tensor):
        with torch.no_grad():
            loc64, scale64 = (torch.as_tensor(v, dtype=torch.float64) for v in (loc, scale))
            reach = loc64.abs() + scale64 * G_BOUND
            ok = bool((reach <= top).all())
    else:
        ok = abs(loc) + scale * G_BOUND <= top
    if bool((torch.as_tensor(scale).detach().to(compute_dtype(dtype)) == 0).any()):
        raise ValueError(f"scale underflows to 0 in {compute_dtype(dtype)}, the dtype the noise is computed in; "
                         "use a larger scale or a wider dtype")
    if not ok:
        raise ValueError(f"loc and scale are too large for {dtype}: loc + scale * g (|g| <= {G_BOUND:g}) "
                         f"would overflow its largest value {top:g}; use a wider dtype or smaller loc/scale")


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
    infinite or NaN; half and bfloat16 results are computed in float32 and rounded. A float32
    draw reaches 42 nats (the exact tail; see :mod:`gumbelkit._kernels.cpu_noise`).

    Raises:
        ValueError: a bad shape, non-finite ``loc``/``scale``, ``scale <= 0``, or ``loc``/``scale``
            so large that a draw could overflow ``dtype``.

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
    _check_range(loc, scale, dtype)
    like = torch.empty((), dtype=compute_dtype(dtype), device=device).expand(shape)
    g = gumbel_noise_forward(like, draw_seed(generator, device))
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
    float32 with an exact tail. This is exactly the noise the samplers of
    :mod:`gumbelkit.functional` add to ``t`` when given the same generator state (the noise
    contract; float16/bfloat16 samplers add the float32 noise before rounding,
    ``gumbel_noise_like(t.float())``; :func:`gumbelkit.sample` uses counter-based noise instead).

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
    return gumbel_noise_forward(t.detach(), draw_seed(generator, t.device)).to(t.dtype)


def rng_context(*generators: torch.Generator) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    r"""A ``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` that replays ``generator=`` draws.

    ``checkpoint`` re-runs the forward pass during backward; with ``preserve_rng_state`` it
    restores torch's *default* generators, but not the ``torch.Generator`` objects you pass
    to gumbelkit's samplers, so the recomputation would draw new noise and the gradients
    would silently belong to another sample. With ``context_fn=rng_context(gen, ...)`` the
    recomputation starts from the states these generators had when the forward pass began,
    and afterwards they are put back where they were, so the draws after the checkpointed
    region are unaffected. Calls without ``generator=`` need nothing: they draw their seed
    from the default generator, which ``checkpoint`` already restores.

    Args:
        generators: the ``torch.Generator`` objects the checkpointed function draws from.

    Returns:
        A callable returning ``(forward_context, recompute_context)``, as ``context_fn`` expects
        (use it with ``use_reentrant=False``).

    Raises:
        TypeError: an argument is not a ``torch.Generator``.

    Example:
        >>> import gumbelkit as gk
        >>> from torch.utils.checkpoint import checkpoint
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = torch.randn(4, 6, requires_grad=True)
        >>> f = lambda t: gk.gumbel_softmax(t, 0.5, generator=gen) ** 2
        >>> y = checkpoint(f, x, use_reentrant=False, context_fn=gk.rng_context(gen))
        >>> y.sum().backward()  # the gradient of the sample that y holds
    """
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"rng_context takes torch.Generator objects, got {type(g).__name__}")

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        saved: list[torch.Tensor] = []

        @contextmanager
        def forward() -> Iterator[None]:
            saved[:] = [g.get_state() for g in generators]
            yield

        @contextmanager
        def recompute() -> Iterator[None]:
            now = [g.get_state() for g in generators]
            for g, state in zip(generators, saved, strict=True):
                g.set_state(state)
            try:
                yield
            finally:
                for g, state in zip(generators, now, strict=True):
                    g.set_state(state)

        return forward(), recompute()

    return context_fn

r"""gumbelkit's samplers as registered PyTorch operators (``torch.ops.gumbelkit.*``).

Why operators: an operator is one opaque, typed call to the dispatcher, so ``torch.compile``
(also ``fullgraph=True`` and ``dynamic=True``), ``torch.export``, FakeTensor/meta tracing,
``torch.jit.trace`` and ``torch.func.vmap`` all see it, while its real implementation stays
the fast eager path, data-dependent checks included: a NaN in the logits raises the same
``ValueError`` from a compiled or exported program as in eager mode.

Every sampler follows one template:

1. ``@custom_op("gumbelkit::NAME", mutates_args=())`` with a ``seed`` argument: a 0-d int64
   tensor drawn by the Python wrapper from the user's generator (:func:`draw_seed`), so the
   draw is a pure function of the generator state, the same in eager, compiled and exported
   runs, and replayable under checkpointing;
2. a fake implementation (output shapes and dtypes only) and 3. the shared vmap rule, both
   given by :func:`register_random_op`; the vmap rule honours
   ``vmap``'s ``randomness``: the seed is itself drawn inside ``vmap``, so under
   ``randomness="different"`` it arrives batched (one seed per sample) and under ``"same"``
   unbatched (every sample draws the same noise); ``"error"`` raises in ``torch.randint``,
   as for torch's own random functions;
4. autograd, where the sampler is differentiable, by a new-style ``autograd.Function``
   around the operator (:mod:`gumbelkit._kernels.gumbel_softmax`).

The operators are not differentiable themselves; ``opcheck`` runs on each of them in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._counter_noise import counter_gumbel
from .._validation import check_rows, check_tau_values, compute_dtype
from .cpu_noise import fill_neg_gumbel_
from .dispatch import cpu_kernels, triton_kernels

__all__ = [
    "checked_row_max",
    "checked_tau",
    "draw_seed",
    "gumbel_max_forward",
    "gumbel_max_op",
    "gumbel_noise_forward",
    "gumbel_noise_op",
    "gumbel_softmax_forward",
    "gumbel_softmax_op",
    "gumbel_topk_op",
    "register_random_op",
    "register_vmap_rule",
]

_NEG_INF = float("-inf")
SOFT, HARD, LOG = 0, 1, 2  # gumbel_softmax_op modes
# The fused softmax divides by tau in its compute dtype: below this, the torch path (which
# shifts by the perturbed maximum first) keeps (x - m + g) / tau finite.
_FUSED_MIN_TAU = 1e-30


def draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A 0-d int64 seed drawn from ``generator`` (or torch's default generator) on ``device``."""
    if generator is not None:
        device = generator.device
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=device)


def _neg_noise(seed: Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """*Minus* standard Gumbel noise of ``shape`` in ``dtype`` (float32/float64) on ``device``, a fresh buffer.

    On the CPU: the fused kernel's counter noise or the torch path's (:mod:`.cpu_noise`). On
    CUDA the counter noise of :mod:`gumbelkit._counter_noise`, computed there from the device
    seed (no host synchronisation; float32 and half precision take the Triton operators
    instead when Triton is installed, see :func:`gumbel_noise_forward`). Other devices get the
    CPU transform, moved over.
    """
    if device.type == "cpu":
        out = torch.empty(shape, dtype=dtype)
        fused = cpu_kernels(out) if out.numel() else None
        if fused is not None:
            return torch.from_numpy(fused.gumbel_noise(out.numpy(), int(seed))).neg_()
        return fill_neg_gumbel_(out, int(seed))
    if device.type == "cuda":
        positions = torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
        return counter_gumbel(seed.reshape(1), positions, dtype=dtype).neg_()
    # other devices: the CPU transform, moved over
    return fill_neg_gumbel_(torch.empty(shape, dtype=dtype), int(seed)).to(device)


def _fused_rows(logits: Tensor, mask: Tensor | None, dim: int):
    """``(kernels, rows)`` when the fused CPU kernels serve this call, else ``(None, None)``.

    They serve unmasked float logits whose category dimension is the last one, seen as a
    C-contiguous (rows, n) float32/float64 array (half precision upcast): the noise position
    of an entry is then its flat index, exactly as for :func:`_neg_noise`, so the noise
    contract holds on both paths. The rows are validated here (NaN, +inf, no allowed category).
    """
    if mask is not None or dim != logits.dim() - 1 or logits.numel() == 0:
        return None, None
    fused = cpu_kernels(logits)
    if fused is None:
        return None, None
    rows = logits.reshape(-1, logits.shape[-1]).to(compute_dtype(logits.dtype)).contiguous()
    check_rows(rows.amax(-1, keepdim=True), logits, None, dim)
    return fused, rows


# -- the shared vmap rule --------------------------------------------------------------------

def _vmap_rule(op):
    """A vmap rule for a random operator: one call per sample, every batched argument sliced.

    The seed is drawn inside ``vmap`` too, so a batched seed (``randomness="different"``) gives
    each sample its own draw and an unbatched one (``"same"``) the same draw for every sample.
    """

    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            outs.append(op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True))))
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def register_vmap_rule(op) -> None:
    """Give an operator the shared vmap rule (one call per sample)."""
    torch.library.register_vmap(op, _vmap_rule(op))


def register_random_op(op, fake) -> None:
    """Give a random operator its fake implementation and the shared vmap rule (the template).

    (``torch.library.triton_op`` operators have their fake implementation already, the
    function itself, and take only :func:`register_vmap_rule`.)
    """
    op.register_fake(fake)
    register_vmap_rule(op)


# -- the temperature's values ------------------------------------------------------------------

@torch.library.custom_op("gumbelkit::check_tau", mutates_args=())
def _check_tau_op(tau: Tensor) -> Tensor:
    """Zeros like a tensor temperature, after checking that every value is finite and > 0."""
    check_tau_values(tau)
    return torch.zeros_like(tau)


_check_tau_op.register_fake(lambda tau: torch.empty_like(tau))
torch.library.register_vmap(_check_tau_op, lambda info, in_dims, tau: (_check_tau_op(tau), in_dims[0]))


def checked_tau(tau: Tensor) -> Tensor:
    """A tensor temperature after an operator has checked its values (finite, > 0).

    ``tau + zeros``: the check's output is used, so compilers cannot drop it as dead code, and
    the temperature stays on the differentiable path in plain torch ops (backward, forward AD
    and torch.func see through the addition; the operator only sees ``tau.detach()``).
    """
    return tau + _check_tau_op(tau.detach())


# -- the rows' values ---------------------------------------------------------------------------

@torch.library.custom_op("gumbelkit::check_rows", mutates_args=())
def _check_rows_op(row_max: Tensor, logits: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Zeros like ``row_max`` after :func:`gumbelkit._validation.check_rows` (NaN, +inf, empty rows).

    A host check raising ``ValueError``; while a CUDA graph is captured, an on-device assert.
    """
    check_rows(row_max, logits, mask, dim)
    return torch.zeros_like(row_max)


_check_rows_op.register_fake(lambda row_max, logits, mask, dim: torch.empty_like(row_max))
register_vmap_rule(_check_rows_op)


def checked_row_max(logits: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """The row maximum of the allowed logits along ``dim`` (kept with size 1), checked by an operator."""
    allowed = logits if mask is None else logits.masked_fill(~mask, _NEG_INF)
    m = allowed.amax(dim, keepdim=True)
    return m + _check_rows_op(m, logits, mask, dim)


# -- noise -----------------------------------------------------------------------------------

@torch.library.custom_op("gumbelkit::gumbel_noise", mutates_args=())
def gumbel_noise_op(like: Tensor, seed: Tensor) -> Tensor:
    """Standard Gumbel noise with the shape and device of ``like``, in its compute dtype."""
    return _neg_noise(seed, like.shape, compute_dtype(like.dtype), like.device).neg_()


def _gumbel_noise_fake(like: Tensor, seed: Tensor) -> Tensor:
    return like.new_empty(like.shape, dtype=compute_dtype(like.dtype))


register_random_op(gumbel_noise_op, _gumbel_noise_fake)


def _triton_serves(logits: Tensor):
    """The Triton kernel module when it serves ``logits`` (CUDA, float32 or half precision)."""
    if logits.dtype == torch.float64:
        return None
    return triton_kernels(logits)


def gumbel_noise_forward(like: Tensor, seed: Tensor) -> Tensor:
    """The noise operator for ``like``: Triton's on CUDA (float32 noise for float32/half), else the generic one."""
    kernels = _triton_serves(like)
    if kernels is not None:
        return kernels.triton_gumbel_noise(like, seed)
    return gumbel_noise_op(like, seed)


# -- shared pieces of the sampler implementations ----------------------------------------------

# Below this row-maximum magnitude, adding the noise to the logits directly is as exact as
# shifting first (the rounding of logits + g is that of the noise itself); above it, shift.
_SHIFT_ABOVE = 8.0


def _perturbed(logits: Tensor, seed: Tensor, mask: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    """``(logits - m) + g`` in the compute dtype (a fresh buffer) and ``m``, the checked row maximum.

    Subtracting the row maximum of the allowed logits *before* adding the noise keeps the
    noise's resolution at any scale (``logits + g`` at logits of 1e7 would round ``g`` to
    integers in float32); argmax and softmax are shift invariant. Rows whose maximum is small
    (``|m| <= 8``) skip the shift on the CPU (``m`` is then returned as 0): it would change
    nothing but cost a pass; other devices always shift, since asking would synchronise. The
    maximum also validates every row: a NaN, a +inf or a row with no allowed category raises
    ``ValueError``.
    """
    cdtype = compute_dtype(logits.dtype)
    allowed = logits if mask is None else logits.masked_fill(~mask, _NEG_INF)
    m = allowed.amax(dim, keepdim=True)
    check_rows(m, logits, mask, dim)
    x = _neg_noise(seed, logits.shape, cdtype, logits.device)
    if logits.device.type != "cpu" or bool((m.abs() > _SHIFT_ABOVE).any()):  # no host sync on devices
        m = m.to(cdtype)
        shifted = allowed.to(cdtype) - m
        # finite logits more than finfo.max below the maximum stay possible (at the lowest value),
        # not -inf: gumbel_topk must still be able to draw them
        allowed = torch.where(torch.isneginf(allowed), allowed.to(cdtype), shifted.clamp_(min=torch.finfo(cdtype).min))
    else:
        m = torch.zeros_like(m, dtype=cdtype)
    return torch.sub(allowed, x, out=x), m


# -- gumbel_softmax / log_gumbel_softmax / the hard one-hot -----------------------------------

@torch.library.custom_op("gumbelkit::gumbel_softmax", mutates_args=())
def gumbel_softmax_op(logits: Tensor, seed: Tensor, mask: Tensor | None, tau_t: Tensor | None, tau: float,
                      dim: int, mode: int) -> tuple[Tensor, Tensor]:
    """``(y, index)``: ``y`` = softmax((logits + g) / tau) (``mode`` SOFT/HARD) or its log (LOG), and
    in HARD mode the argmax of ``logits + g`` along ``dim`` (kept with size 1), the exact
    Gumbel-Max draw (an empty int64 tensor in the other modes)."""
    small_tau = tau < _FUSED_MIN_TAU if tau_t is None else bool((tau_t < _FUSED_MIN_TAU).any())
    fused, rows = (None, None) if small_tau else _fused_rows(logits, mask, dim)
    if fused is not None:
        kernel = fused.log_gumbel_softmax if mode == LOG else fused.gumbel_softmax
        taus = tau if tau_t is None else tau_t.to(rows.dtype).expand(*logits.shape[:-1], 1).reshape(-1).contiguous()
        y, index = kernel(rows.numpy(), int(seed), taus if tau_t is None else taus.numpy())
        out = torch.from_numpy(y).view(logits.shape)
        if mode == LOG and out.dtype != logits.dtype:
            out = out.clamp_(min=torch.finfo(logits.dtype).min)  # saturate, as the torch path does
        index = torch.from_numpy(index) if mode == HARD else torch.empty(0, dtype=torch.int64)
        index = index.view(*logits.shape[:-1], 1) if mode == HARD else index
        return out.to(logits.dtype), index
    x, _ = _perturbed(logits, seed, mask, dim)
    return softmax_of_perturbed_(x, logits.dtype, tau_t, tau, dim, mode)


def softmax_of_perturbed_(x: Tensor, dtype: torch.dtype, tau_t: Tensor | None, tau: float, dim: int,
                          mode: int) -> tuple[Tensor, Tensor]:
    """``(softmax(x / tau) or its log, argmax x)`` of perturbed scores ``x``, computed over ``x`` in place.

    The argmax is computed in ``HARD`` mode only (an empty int64 tensor otherwise: ``max`` with
    indices costs a pass that ``amax`` does not).
    """
    if mode == HARD:
        top, index = x.max(dim, keepdim=True)
    else:
        top, index = x.amax(dim, keepdim=True), x.new_empty(0, dtype=torch.int64)
    tau_x: float | Tensor = tau if tau_t is None else tau_t.to(x.dtype)
    if x.device.type != "cpu" or not bool(torch.isfinite(top / tau_x).all()):
        x = x.sub_(top)  # x / tau would overflow (or a device, where asking would sync): shift by it too
    if tau_t is not None or tau != 1.0:
        x = x.div_(tau_x)
    if mode == LOG:
        out = torch._log_softmax(x, dim, False, out=x)
        if out.dtype != dtype:
            # a half-precision log-probability below the lowest finite value saturates there;
            # only impossible categories are -inf
            lowest = torch.finfo(dtype).min
            out = torch.where(torch.isinf(out), out, out.clamp(min=lowest))
    else:
        out = torch._softmax(x, dim, False, out=x)
    return out.to(dtype), index


def _gumbel_softmax_fake(logits, seed, mask, tau_t, tau, dim, mode):
    shape = list(logits.shape)
    shape[dim] = 1
    if mode != HARD:
        shape = [0]
    return torch.empty_like(logits), logits.new_empty(shape, dtype=torch.int64)


register_random_op(gumbel_softmax_op, _gumbel_softmax_fake)


def gumbel_softmax_forward(logits: Tensor, seed: Tensor, mask: Tensor | None, tau_t: Tensor | None, tau: float,
                           dim: int, mode: int) -> tuple[Tensor, Tensor]:
    """The forward operator for this call (arguments and result as :func:`gumbel_softmax_op`): the
    fused Triton operator for CUDA float32/half logits without mask, tensor tau or log mode,
    else the generic operator (numba or torch kernels inside)."""
    kernels = _triton_serves(logits)
    if kernels is not None and mask is None and tau_t is None and mode != LOG and tau >= _FUSED_MIN_TAU:
        return kernels.triton_gumbel_softmax(logits, seed, tau, dim, mode == HARD)
    return gumbel_softmax_op(logits, seed, mask, tau_t, tau, dim, mode)


# -- gumbel_max --------------------------------------------------------------------------------

@torch.library.custom_op("gumbelkit::gumbel_max", mutates_args=())
def gumbel_max_op(logits: Tensor, seed: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """``argmax(logits + g)`` along ``dim`` (kept with size 1), int64."""
    fused, rows = _fused_rows(logits, mask, dim)
    if fused is not None:
        return torch.from_numpy(fused.gumbel_max(rows.numpy(), int(seed))).view(*logits.shape[:-1], 1)
    x, _ = _perturbed(logits, seed, mask, dim)
    return x.argmax(dim, keepdim=True)


def _gumbel_max_fake(logits, seed, mask, dim):
    shape = list(logits.shape)
    shape[dim] = 1
    return logits.new_empty(shape, dtype=torch.int64)


register_random_op(gumbel_max_op, _gumbel_max_fake)


def gumbel_max_forward(logits: Tensor, seed: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """The Gumbel-Max operator for this call (as :func:`gumbel_max_op`): Triton's for CUDA
    float32/half logits without mask, else the generic operator."""
    kernels = _triton_serves(logits)
    if kernels is not None and mask is None:
        return kernels.triton_gumbel_max(logits, seed, dim)
    return gumbel_max_op(logits, seed, mask, dim)


def _spans_overflow(rows: Tensor) -> Tensor:
    """Per row: do the finite logits lie so far apart that ``x - max x`` overflows to -inf?"""
    lowest = torch.finfo(rows.dtype).min
    low = rows.amin(-1)
    if not bool(torch.isneginf(low).any()):  # no -inf entry: no copy of the rows needed
        return torch.isinf(rows.amax(-1) - low)
    return torch.isinf(rows.amax(-1) - rows.masked_fill(torch.isneginf(rows), 0.0).amin(-1).clamp(min=lowest))


# -- gumbel_topk -------------------------------------------------------------------------------

@torch.library.custom_op("gumbelkit::gumbel_topk", mutates_args=())
def gumbel_topk_op(logits: Tensor, seed: Tensor, mask: Tensor | None, k: int, dim: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` of ``logits + g`` along ``dim``: ``(values, indices)`` in sampling order."""
    fused, rows = _fused_rows(logits, mask, dim)
    if fused is not None and bool(_spans_overflow(rows).any()):
        fused = None  # finite logits more than finfo.max apart: the torch path keeps them possible
    if fused is not None:
        values, indices = fused.gumbel_topk(rows.numpy(), int(seed), k)
        shape = (*logits.shape[:-1], k)
        m = rows.amax(-1, keepdim=True).view(*logits.shape[:-1], 1)
        values = torch.from_numpy(values).view(shape)
        indices = torch.from_numpy(indices).view(shape)
    else:
        x, m = _perturbed(logits, seed, mask, dim)
        values, indices = x.topk(k, dim)
    kth = values.narrow(dim, k - 1, 1)
    if not bool(torch.isfinite(kth).all()):
        short = int((~torch.isfinite(kth)).sum())
        raise ValueError(f"k={k} is larger than the number of allowed (unmasked, > -inf) "
                         f"categories in {short} row(s); lower k or allow more categories")
    return values.add_(m.to(values.dtype)).to(logits.dtype), indices


def _gumbel_topk_fake(logits, seed, mask, k, dim):
    shape = list(logits.shape)
    shape[dim] = k
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.int64)


register_random_op(gumbel_topk_op, _gumbel_topk_fake)

r"""Gradient estimators for one-hot categorical samples, one autograd Function each.

Every Function returns an exact one-hot sample :math:`D` in its forward pass. Its backward
pass is a weighted sum of softmax Jacobians applied to the upstream gradient :math:`G`:

.. math::
    \widehat{\nabla}_\theta = s \sum_m w_m\, J(p_m)^\top G, \qquad
    J(p)^\top G = p \odot \big(G - \langle G, p\rangle\big),

where :math:`J(p) = \operatorname{diag}(p) - p p^\top` is the Jacobian of the softmax at
:math:`p`. The estimators differ only in the surrogate probabilities :math:`p_m`, the
weights :math:`w_m` and the scale :math:`s` (for most, :math:`1/\tau`). :math:`J` is
symmetric, so the same linear map is the forward-mode derivative (``jvp``).

How the Functions compose with the PyTorch stack (torch.func, torch.compile, vmap):

* New-style Functions: ``forward`` without ``ctx``, ``setup_context``, ``generate_vmap_rule``.
* The noise is an input tensor (drawn outside by :func:`gumbelkit.noise.gumbel_noise_like`), so
  a Function is a deterministic map of (logits, noise); no callables are passed in.
* ``backward`` and ``jvp`` recompute the surrogates from the saved logits with plain
  differentiable torch ops (nothing in place, no ``out=``): double backward, ``jacrev`` of
  ``grad`` and AOT autograd see through them.
* Numerics: half precision is computed in float32; every score is shifted by its row maximum
  before it is divided by a temperature, so no ``x / tau`` overflows; gradients of half
  precision logits saturate at the dtype's largest finite value instead of becoming ``inf``.
* The data-dependent checks (NaN, ``+inf``, rows without an allowed category, bad indices) run
  inside one registered operator, :func:`row_max`, which also returns the row maximum used for
  the shift: the check raises the same ``ValueError`` in eager mode, under ``torch.compile``
  (no graph break) and under ``vmap``, and is never dead-code eliminated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.library import custom_op

from .._validation import check_rows, compute_dtype

__all__ = [
    "DecoupledSTGumbelSoftmaxFunction",
    "GappedStraightThroughFunction",
    "GumbelRaoFunction",
    "ReinMaxFunction",
    "STGumbelSoftmaxFunction",
    "StraightThroughFunction",
    "one_hot",
    "row_max",
    "to_dtype_saturating",
    "upcast",
]

Tau = float | torch.Tensor


# ----------------------------------------------------------------------------- the validation op

def _reduced_shape(x: torch.Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = 1
    return shape


@custom_op("gumbelkit::estimator_row_max", mutates_args=())
def row_max(logits: torch.Tensor, dim: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The row maximum of ``logits`` along ``dim`` (keepdim, compute dtype), validating the data.

    Raises ``ValueError`` for a NaN, a ``+inf`` or a row with no finite logit, and, when
    ``index`` (int64, keepdim along ``dim``) is given, for an index outside ``[0, n)`` or one
    pointing at a category of probability 0. This is the one data-dependent check of the
    estimators: a registered operator, so it runs (and raises) under compile and vmap too.
    """
    m = logits.amax(dim, keepdim=True) if logits.numel() else logits.new_zeros(_reduced_shape(logits, dim))
    check_rows(m, logits, None, dim)
    if index is not None and index.numel():
        n = logits.shape[dim]
        if not bool(((index >= 0) & (index < n)).all()):
            raise ValueError(f"index must lie in [0, {n - 1}] (the categories along dim={dim})")
        if bool(torch.isneginf(logits.gather(dim, index)).any()):
            raise ValueError("index points at a category with probability 0 (logit -inf); "
                             "conditioning on an impossible category is undefined")
    return m.to(compute_dtype(logits.dtype))


@row_max.register_fake
def _row_max_fake(logits: torch.Tensor, dim: int, index: torch.Tensor | None = None) -> torch.Tensor:
    return logits.new_empty(_reduced_shape(logits, dim), dtype=compute_dtype(logits.dtype))


def _row_max_vmap(info: Any, in_dims: tuple, logits: torch.Tensor, dim: int,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    size = info.batch_size
    ld, xd = in_dims[0], (in_dims[2] if len(in_dims) > 2 else None)
    logits = logits.movedim(ld, 0) if ld is not None else logits.expand(size, *logits.shape)
    if index is not None:
        index = index.movedim(xd, 0) if xd is not None else index.expand(size, *index.shape)
    return row_max(logits, dim % (logits.dim() - 1) + 1, index), 0


row_max.register_vmap(_row_max_vmap)


# ----------------------------------------------------------------------------- shared pieces

def one_hot(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """A one-hot tensor shaped and typed like ``like``, with ones at ``index`` (keepdim) along ``dim``."""
    return torch.zeros_like(like, memory_format=torch.contiguous_format).scatter(
        dim, index, torch.ones_like(index, dtype=like.dtype))


def to_dtype_saturating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, values beyond the range of a half-precision ``dtype`` clamped to its max."""
    if dtype == x.dtype:
        return x
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def _shifted(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x - max(x)`` along ``dim``, the maximum detached (softmax is shift invariant)."""
    return x - x.detach().amax(dim, keepdim=True)


def _div(x: torch.Tensor, tau: Tau) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return x / tau.to(x.dtype)
    return x / tau if tau != 1.0 else x


NOISE_BOUND = 40.0
"""Above every standard Gumbel draw gumbelkit makes (at most 16.6 in float32, 36.7 in float64)."""


def _softmax_over_tau(z: torch.Tensor, tau: Tau, dim: int, at_most_zero: bool = False,
                      at_most: float | None = None) -> torch.Tensor:
    """``softmax(z / tau)`` where ``z / tau`` cannot overflow upward: ``z`` is shifted to a maximum
    of 0 first, unless it is known to be ``<= 0`` already (``at_most_zero``) or bounded by
    ``at_most`` with a float ``tau`` for which ``at_most / tau`` is far from overflowing."""
    safe = at_most_zero or (at_most is not None and not isinstance(tau, torch.Tensor)
                            and at_most / tau < torch.finfo(z.dtype).max / 16)
    return torch.softmax(_div(z if safe else _shifted(z, dim), tau), dim)


def _scores(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``logits - max(logits)`` in the compute dtype (<= 0; ``-inf`` stays ``-inf``)."""
    return logits.to(shift.dtype) - shift


def _argmax_one_hot(scores: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    return one_hot(scores.argmax(dim, keepdim=True), logits, dim)


def _jt(p: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    r""":math:`J(p)^\top v = p \odot (v - \langle v, p\rangle)` along ``dim`` (J is symmetric)."""
    return p * (v - (v * p).sum(dim, keepdim=True))


def _inverse(tau: Tau, dtype: torch.dtype) -> Tau:
    """``1 / tau`` in the compute dtype (a float16 tau of 1e-5 has an inverse float16 cannot hold)."""
    return tau.to(dtype).reciprocal() if isinstance(tau, torch.Tensor) else 1.0 / tau


def _linear_map(parts: list[tuple[float, torch.Tensor, int]], scale: Tau, v: torch.Tensor) -> torch.Tensor:
    """``scale * sum_m w_m J(p_m) v``; ``parts`` holds ``(w_m, p_m, dim)``; ``p_m`` may carry a
    leading stack dimension that is averaged."""
    out = None
    for w, p, dim in parts:
        if p.dim() > v.dim():  # a stack of surrogates along dim 0: their mean
            term = _jt(p, v.unsqueeze(0), dim + 1).mean(0)
        else:
            term = _jt(p, v, dim)
        term = term * w if w != 1.0 else term
        out = term if out is None else out + term
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        out = out * scale
    return out


class _Estimator(torch.autograd.Function):
    """Shared ``setup_context``, ``backward`` and ``jvp``; subclasses write ``forward`` and ``parts``.

    ``forward(logits, noise, shift, *params)``; ``parts(logits, noise, shift, output, *params)``
    returns ``(parts, scale)`` for :func:`_linear_map`, recomputed in differentiable ops.
    """

    generate_vmap_rule = True

    @staticmethod
    def parts(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, output: torch.Tensor,
              *params: Any) -> tuple[list[tuple[float, torch.Tensor, int]], Tau]:
        raise NotImplementedError

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        logits, noise, shift, *params = inputs
        tensor_index = [i for i, p in enumerate(params) if isinstance(p, torch.Tensor)]
        ctx.params = [None if isinstance(p, torch.Tensor) else p for p in params]
        ctx.tensor_index = tensor_index
        tensors = (logits, noise, shift, output, *(params[i] for i in tensor_index))
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.n_inputs = len(inputs)

    @classmethod
    def _apply_map(cls, ctx: Any, v: torch.Tensor) -> torch.Tensor:
        logits, noise, shift, output, *tensors = ctx.saved_tensors
        params = list(ctx.params)
        for i, t in zip(ctx.tensor_index, tensors, strict=True):
            params[i] = t
        # the sample is a constant of the backward pass (it is this Function's own output: left
        # attached, double backward would differentiate it through the estimator again)
        parts, scale = cls.parts(logits, noise, shift, output.detach(), *params)
        return to_dtype_saturating(_linear_map(parts, scale, v.to(shift.dtype)), logits.dtype)

    @classmethod
    def backward(cls, ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        return (cls._apply_map(ctx, grad),) + (None,) * (ctx.n_inputs - 1)

    @classmethod
    def jvp(cls, ctx: Any, d_logits: torch.Tensor | None, *_: Any) -> torch.Tensor:  # type: ignore[override]
        if d_logits is None:
            output = ctx.saved_tensors[3]
            return torch.zeros_like(output)
        return cls._apply_map(ctx, d_logits)


# ----------------------------------------------------------------------------- the estimators

class StraightThroughFunction(_Estimator):
    r"""Straight-through estimator (Bengio, Léonard and Courville 2013).

    Forward: :math:`D = \operatorname{onehot}(\arg\max_i(\theta_i + g_i))`, an exact draw from
    :math:`\operatorname{Categorical}(\operatorname{softmax}(\theta))`.
    Backward: the gradient of :math:`\operatorname{softmax}(\theta/\tau)`,

    .. math:: \widehat\nabla_\theta = \tfrac1\tau\, J(\pi_\tau)^\top G, \quad
              \pi_\tau = \operatorname{softmax}(\theta / \tau).
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                dim: int) -> torch.Tensor:
        return _argmax_one_hot(_scores(logits, shift) + noise.to(shift.dtype), logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, tau, dim):  # type: ignore[override]
        p = _softmax_over_tau(_scores(logits, shift), tau, dim, at_most_zero=True)
        return [(1.0, p, dim)], _inverse(tau, shift.dtype)


class STGumbelSoftmaxFunction(_Estimator):
    r"""Straight-through Gumbel-Softmax (Jang, Gu and Poole 2017).

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta + g)), \qquad
        \widehat\nabla_\theta = \tfrac1\tau\, J(y)^\top G, \quad
        y = \operatorname{softmax}((\theta + g)/\tau).
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                dim: int) -> torch.Tensor:
        return _argmax_one_hot(_scores(logits, shift) + noise.to(shift.dtype), logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, tau, dim):  # type: ignore[override]
        z = _scores(logits, shift) + noise.to(shift.dtype)  # <= the noise's bound
        y = _softmax_over_tau(z, tau, dim, at_most=NOISE_BOUND)
        return [(1.0, y, dim)], _inverse(tau, shift.dtype)


class DecoupledSTGumbelSoftmaxFunction(_Estimator):
    r"""Decoupled straight-through Gumbel-Softmax (Shah, Yan, Mozer and Liu 2024).

    One Gumbel draw :math:`g`, two temperatures, in the paper's parametrisation
    :math:`\theta/\tau + g`:

    .. math::
        D = \operatorname{onehot}\big(\arg\max_i(\theta_i/\tau_f + g_i)\big), \qquad
        \widehat\nabla_\theta = \tfrac1{\tau_b}\, J(y_b)^\top G, \quad
        y_b = \operatorname{softmax}(\theta/\tau_b + g).

    :math:`D` is an exact draw from :math:`\operatorname{softmax}(\theta/\tau_f)`. The logits
    are shifted to a maximum of 0 before the division, so :math:`\theta/\tau` cannot overflow
    (``theta = [1e33, 0]``, ``tau_f = 1e-6`` is a valid one-hot with finite gradients).
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau_forward: Tau,
                tau_backward: Tau, dim: int) -> torch.Tensor:
        z = _div(_scores(logits, shift), tau_forward) + noise.to(shift.dtype)
        return _argmax_one_hot(z, logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, tau_forward, tau_backward, dim):  # type: ignore[override]
        z = _div(_scores(logits, shift), tau_backward) + noise.to(shift.dtype)
        return [(1.0, torch.softmax(_shifted(z, dim), dim), dim)], _inverse(tau_backward, shift.dtype)


class GumbelRaoFunction(_Estimator):
    r"""Gumbel-Rao Monte Carlo estimator GR-MCk (Paulus, Maddison and Krause 2021).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward: the
    straight-through Gumbel-Softmax Jacobian averaged over :math:`k` draws :math:`g^{(j)} \sim
    \text{Gumbel} \mid \arg\max(\theta + g) = D` (``conditional``, shape ``(k, *logits.shape)``,
    compute dtype), the noise held fixed:

    .. math::
        \widehat\nabla_\theta = \frac1{k\tau} \sum_{j=1}^k J(y_j)^\top G, \quad
        y_j = \operatorname{softmax}\big((\theta + g^{(j)}) / \tau\big).
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor,
                conditional: torch.Tensor, tau: Tau, dim: int) -> torch.Tensor:
        return _argmax_one_hot(_scores(logits, shift) + noise.to(shift.dtype), logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, conditional, tau, dim):  # type: ignore[override]
        z = _scores(logits, shift).unsqueeze(0) + conditional.to(shift.dtype)
        y = _softmax_over_tau(z, tau.unsqueeze(0) if isinstance(tau, torch.Tensor) else tau, dim + 1,
                              at_most=NOISE_BOUND)
        return [(1.0, y, dim)], _inverse(tau, shift.dtype)


class GappedStraightThroughFunction(_Estimator):
    r"""Gapped straight-through estimator, GST (Fan, Chi, Rudnicky and Ramadge 2022).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward: the
    straight-through gradient at deterministically moved logits :math:`\tilde\theta` that
    pick :math:`D` with a gap :math:`\kappa` (the move :math:`\tilde\theta - \theta` is held
    fixed):

    .. math::
        \tilde\theta_D = \max_j \theta_j, \quad
        \tilde\theta_i = \min(\theta_i,\ \max_j \theta_j - \kappa)\ (i \ne D), \qquad
        \widehat\nabla_\theta = \tfrac1\tau\, J(\operatorname{softmax}(\tilde\theta/\tau))^\top G.

    ``gap`` is :math:`\kappa \ge 0`, or ``None`` for GST-p, the per-row gap
    :math:`\kappa = -\log(1 - \pi_D) / \pi_D` with :math:`\pi = \operatorname{softmax}(\theta)`.
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                gap: float | None, dim: int) -> torch.Tensor:
        return _argmax_one_hot(_scores(logits, shift) + noise.to(shift.dtype), logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, tau, gap, dim):  # type: ignore[override]
        z = _scores(logits, shift)  # the top logit is at 0
        zd = z.detach()
        d = output.to(torch.bool)
        if gap is None:  # GST-p; the series 1 + p/2 avoids 0/0 where pi_D underflows
            p = (torch.softmax(zd, dim) * output.to(zd.dtype)).sum(dim, keepdim=True)
            kappa = torch.where(p > 1e-4, -torch.log1p(-p) / p, 1.0 + p / 2)
            moved = torch.where(d, torch.zeros_like(zd), torch.minimum(zd, -kappa))
        else:
            moved = torch.where(d, torch.zeros_like(zd), zd.clamp(max=-gap))
        # the move is a constant (d target / d logits = identity); -inf - -inf moves by 0
        target = z + torch.nan_to_num(moved - zd, nan=0.0, posinf=0.0)
        return [(1.0, _softmax_over_tau(target, tau, dim, at_most_zero=True), dim)], _inverse(tau, shift.dtype)


class ReinMaxFunction(_Estimator):
    r"""ReinMax, the second-order (Heun's method) estimator (Liu, Liu, Gao, Wang and Han 2023).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward (their Algorithm 2):

    .. math::
        \pi_0 = \operatorname{softmax}(\theta), \quad
        \pi_1 = \tfrac12\big(D + \operatorname{softmax}(\theta/\tau)\big), \qquad
        \widehat\nabla_\theta = 2\, J(\pi_1)^\top G - \tfrac12\, J(\pi_0)^\top G.

    :math:`\tau` only enters :math:`\pi_1`; the paper recommends :math:`\tau \ge 1`.
    """

    @staticmethod
    def forward(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                dim: int) -> torch.Tensor:
        return _argmax_one_hot(_scores(logits, shift) + noise.to(shift.dtype), logits, dim)

    @staticmethod
    def parts(logits, noise, shift, output, tau, dim):  # type: ignore[override]
        z = _scores(logits, shift)
        zd = z.detach()
        pi1 = (output.to(z.dtype) + _softmax_over_tau(zd, tau, dim, at_most_zero=True)) * 0.5
        # as the authors' code: pi1 = softmax(z + c), c = log(pi1) - z held constant, so that
        # second derivatives are those of a softmax at pi1 (impossible entries: c = 0)
        if torch.is_grad_enabled():  # double backward / torch.func: the differentiable form
            c = torch.where(torch.isneginf(zd), torch.zeros_like(zd), torch.log(pi1) - zd)
            p1 = torch.softmax(z + c, dim)
        else:  # the same values (softmax(log pi1) = pi1) without the log and the softmax
            p1 = pi1
        pi0 = torch.softmax(z, dim)
        return [(2.0, p1, dim), (-0.5, pi0, dim)], 1.0


# ----------------------------------------------------------------------------- half precision in float32

class _Upcast(torch.autograd.Function):
    """``x.to(dtype)`` whose gradient goes back to ``x.dtype`` saturating (see :func:`upcast`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.in_dtype, ctx.out_dtype = inputs[0].dtype, inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        return to_dtype_saturating(grad, ctx.in_dtype), None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, _: Any) -> torch.Tensor:  # type: ignore[override]
        return tangent.to(ctx.out_dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype (float32 for half precision), differentiably.

    The gradient flows back to half precision saturating at the dtype's largest finite value:
    a relaxation at ``tau = 1e-6`` can have gradients of 1e6, which float16 cannot hold, and an
    ``inf`` gradient would turn the next optimizer step into NaN.
    """
    cdtype = compute_dtype(x.dtype)
    return x if cdtype == x.dtype else _Upcast.apply(x, cdtype)

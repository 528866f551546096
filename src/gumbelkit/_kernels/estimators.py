r"""Gradient estimators for one-hot categorical samples, one function each.

Every estimator returns an exact one-hot sample :math:`D` whose derivative is that of a
surrogate :math:`s(\theta)`, a weighted sum of softmaxes, written ``D + (s - sg(s))``:

.. math::
    \widehat{\nabla}_\theta = \Big(\frac{\partial s}{\partial\theta}\Big)^\top G
    = c \sum_m w_m\, J(p_m)^\top G, \qquad
    J(p)^\top G = p \odot \big(G - \langle G, p\rangle\big),

where :math:`J(p) = \operatorname{diag}(p) - p p^\top` is the Jacobian of the softmax at
:math:`p`; the estimators differ only in the surrogate probabilities :math:`p_m`, the weights
:math:`w_m` and the scale :math:`c` (for most, :math:`1/\tau`). ``D + (s - sg(s))`` equals
:math:`D` exactly (``s - s`` is 0 for finite ``s``).

How they compose with the PyTorch stack:

* Plain differentiable torch ops, nothing in place, no ``out=``, no ``autograd.Function``
  with a custom ``jvp`` (which Dynamo refuses to trace, breaking ``fullgraph=True``): so
  ``torch.compile`` (``fullgraph=True`` too), ``torch.export``, ``vmap``, ``grad``/``jacrev``,
  forward-mode AD (``jvp``) and double backward all see through them, with autograd's own
  softmax backward (the closed form above).
* The noise is an input tensor (drawn outside by :func:`gumbelkit.noise.gumbel_noise_like`), so
  an estimator is a deterministic map of (logits, noise); no callables are passed in.
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
    "ESTIMATORS",
    "decoupled_st_gumbel_softmax",
    "gapped_straight_through",
    "gumbel_rao",
    "one_hot",
    "reinmax",
    "row_max",
    "st_gumbel_softmax",
    "straight_through",
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
    """A one-hot tensor shaped and typed like ``like``, with ones at ``index`` (keepdim) along ``dim``.

    Written as a comparison with ``arange`` rather than a ``scatter`` into ``zeros_like``: inductor
    (torch 2.13) miscompiled the scatter form to all zeros in a graph split by the noise draw.
    """
    n = like.shape[dim]
    shape = [1] * like.dim()
    shape[dim] = n
    categories = torch.arange(n, device=like.device).view(shape)
    return (categories == index).to(like.dtype)


def to_dtype_saturating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, values beyond the range of a half-precision ``dtype`` clamped to its max."""
    if dtype == x.dtype:
        return x
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


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


class _UpcastWithJvp(_Upcast):
    """:class:`_Upcast` with forward-mode AD (eager only: Dynamo does not trace a custom ``jvp``)."""

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
    if cdtype == x.dtype:
        return x
    if torch.compiler.is_compiling():
        return _Upcast.apply(x, cdtype)
    return _UpcastWithJvp.apply(x, cdtype)


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
    """``logits - max(logits)`` in the compute dtype (<= 0; ``-inf`` stays ``-inf``), differentiable."""
    return upcast(logits) - shift


def _sample(z: torch.Tensor, noise: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    """The one-hot of ``argmax(z + noise)``, typed like ``logits`` (no gradient)."""
    return one_hot((z.detach() + noise.to(z.dtype)).argmax(dim, keepdim=True), logits, dim)


def needs_derivative(logits: torch.Tensor) -> bool:
    """Whether anything can differentiate through ``logits``: autograd, torch.func or forward AD.

    When nothing can (``no_grad``, ``inference_mode``, a plain tensor), the estimators return the
    sample without computing their surrogate. Always True while compiling (the compiled graph
    must serve both cases).
    """
    if torch.compiler.is_compiling():
        return True
    return ((logits.requires_grad and torch.is_grad_enabled())
            or torch._C._functorch.is_functorch_wrapped_tensor(logits)
            or torch.autograd.forward_ad._current_level >= 0)


def _attach(d: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``d`` in value, the derivative of ``surrogate`` (``d + (s - sg(s))``, exactly ``d``)."""
    return d + (surrogate - surrogate.detach()).to(d.dtype)


# ----------------------------------------------------------------------------- the estimators
# Each takes validated logits, the noise (like the logits), the validated row maximum ``shift``
# (keepdim, compute dtype, from :func:`row_max`) and the method's parameters.

def straight_through(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                     dim: int) -> torch.Tensor:
    r"""Straight-through estimator (Bengio, Léonard and Courville 2013).

    Forward: :math:`D = \operatorname{onehot}(\arg\max_i(\theta_i + g_i))`, an exact draw from
    :math:`\operatorname{Categorical}(\operatorname{softmax}(\theta))`.
    Backward: the gradient of :math:`\operatorname{softmax}(\theta/\tau)`,

    .. math:: \widehat\nabla_\theta = \tfrac1\tau\, J(\pi_\tau)^\top G, \quad
              \pi_\tau = \operatorname{softmax}(\theta / \tau).
    """
    z = _scores(logits, shift)
    d = _sample(z, noise, logits, dim)
    if not needs_derivative(logits):
        return d
    return _attach(d, _softmax_over_tau(z, tau, dim, at_most_zero=True))


def st_gumbel_softmax(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                      dim: int) -> torch.Tensor:
    r"""Straight-through Gumbel-Softmax (Jang, Gu and Poole 2017).

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta + g)), \qquad
        \widehat\nabla_\theta = \tfrac1\tau\, J(y)^\top G, \quad
        y = \operatorname{softmax}((\theta + g)/\tau).
    """
    z = _scores(logits, shift)
    d = _sample(z, noise, logits, dim)
    if not needs_derivative(logits):
        return d
    y = _softmax_over_tau(z + noise.to(z.dtype), tau, dim, at_most=NOISE_BOUND)  # z + g <= the bound
    return _attach(d, y)


def decoupled_st_gumbel_softmax(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor,
                                tau_forward: Tau, tau_backward: Tau, dim: int) -> torch.Tensor:
    r"""Decoupled straight-through Gumbel-Softmax (Shah, Yan, Mozer and Liu 2024).

    One Gumbel draw :math:`g`, two temperatures, in the paper's parametrisation
    :math:`\theta/\tau + g`:

    .. math::
        D = \operatorname{onehot}\big(\arg\max_i(\theta_i/\tau_f + g_i)\big), \qquad
        \widehat\nabla_\theta = \tfrac1{\tau_b}\, J(y_b)^\top G, \quad
        y_b = \operatorname{softmax}(\theta/\tau_b + g).

    The logits are shifted to a maximum of 0 before the division, so :math:`\theta/\tau`
    cannot overflow (``theta = [1e33, 0]``, ``tau_f = 1e-6`` is a valid one-hot).
    """
    z = _scores(logits, shift)
    g = noise.to(z.dtype)
    d = _sample(_div(z.detach(), tau_forward), g, logits, dim)
    if not needs_derivative(logits):
        return d
    y = torch.softmax(_shifted(_div(z, tau_backward) + g, dim), dim)
    return _attach(d, y)


def gumbel_rao(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor,
               conditional: torch.Tensor, tau: Tau, dim: int) -> torch.Tensor:
    r"""Gumbel-Rao Monte Carlo estimator GR-MCk (Paulus, Maddison and Krause 2021).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward: the
    straight-through Gumbel-Softmax Jacobian averaged over :math:`k` draws :math:`g^{(j)} \sim
    \text{Gumbel} \mid \arg\max(\theta + g) = D` (``conditional``, shape ``(k, *logits.shape)``),
    the noise held fixed:

    .. math::
        \widehat\nabla_\theta = \frac1{k\tau} \sum_{j=1}^k J(y_j)^\top G, \quad
        y_j = \operatorname{softmax}\big((\theta + g^{(j)}) / \tau\big).
    """
    z = _scores(logits, shift)
    d = _sample(z, noise, logits, dim)
    if not needs_derivative(logits):
        return d
    tau_k = tau.unsqueeze(0) if isinstance(tau, torch.Tensor) else tau
    y = _softmax_over_tau(z.unsqueeze(0) + conditional.to(z.dtype), tau_k, dim + 1, at_most=NOISE_BOUND)
    return _attach(d, y.mean(0))


def gapped_straight_through(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
                            gap: float | None, dim: int) -> torch.Tensor:
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
    z = _scores(logits, shift)  # the top logit is at 0
    d = _sample(z, noise, logits, dim)
    if not needs_derivative(logits):
        return d
    zd, chosen = z.detach(), d.to(torch.bool)
    if gap is None:  # GST-p; the series 1 + p/2 avoids 0/0 where pi_D underflows
        p = (torch.softmax(zd, dim) * d.to(zd.dtype)).sum(dim, keepdim=True)
        kappa = torch.where(p > 1e-4, -torch.log1p(-p) / p, 1.0 + p / 2)
        moved = torch.where(chosen, torch.zeros_like(zd), torch.minimum(zd, -kappa))
    else:
        moved = torch.where(chosen, torch.zeros_like(zd), zd.clamp(max=-gap))
    # the move is a constant (d target / d logits = identity); -inf - -inf moves by 0
    target = z + torch.nan_to_num(moved - zd, nan=0.0, posinf=0.0)
    return _attach(d, _softmax_over_tau(target, tau, dim, at_most_zero=True))


def reinmax(logits: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor, tau: Tau,
            dim: int) -> torch.Tensor:
    r"""ReinMax, the second-order (Heun's method) estimator (Liu, Liu, Gao, Wang and Han 2023).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward (their Algorithm 2):

    .. math::
        \pi_0 = \operatorname{softmax}(\theta), \quad
        \pi_1 = \tfrac12\big(D + \operatorname{softmax}(\theta/\tau)\big), \qquad
        \widehat\nabla_\theta = 2\, J(\pi_1)^\top G - \tfrac12\, J(\pi_0)^\top G,

    as the authors' code: :math:`\pi_1 = \operatorname{softmax}(\theta + c)` with the constant
    :math:`c = \log\pi_1 - \theta`. :math:`\tau` only enters :math:`\pi_1`; the paper
    recommends :math:`\tau \ge 1`.
    """
    z = _scores(logits, shift)
    d = _sample(z, noise, logits, dim)
    if not needs_derivative(logits):
        return d
    zd = z.detach()
    pi1 = (d.to(z.dtype) + _softmax_over_tau(zd, tau, dim, at_most_zero=True)) * 0.5
    c = torch.where(torch.isneginf(zd), torch.zeros_like(zd), torch.log(pi1) - zd)
    surrogate = 2.0 * torch.softmax(z + c, dim) - 0.5 * torch.softmax(z, dim)
    return _attach(d, surrogate)


ESTIMATORS = {
    "st": straight_through,
    "st-gs": st_gumbel_softmax,
    "decoupled-st-gs": decoupled_st_gumbel_softmax,
    "gumbel-rao": gumbel_rao,
    "gst": gapped_straight_through,
    "reinmax": reinmax,
}
"""The kernel of each pathwise method, by name."""

r"""Gradient estimators for discrete samples, behind one API.

A model that draws a one-hot sample :math:`D \sim \operatorname{Categorical}(\operatorname{softmax}
(\theta))` and computes a loss :math:`f(D)` needs :math:`\nabla_\theta\,\mathbb E[f(D)]`, which
backpropagation cannot give through the discrete draw. Two families of estimators:

* **pathwise** (straight-through family): the forward value is the exact one-hot :math:`D`;
  the backward pass replaces :math:`\partial D/\partial\theta` by the Jacobian of a softmax
  surrogate. Use them anywhere in a model, through :func:`sample`. Biased, low variance.
  Methods ``"st"``, ``"st-gs"``, ``"decoupled-st-gs"``, ``"gumbel-rao"``, ``"gst"``, ``"reinmax"``.
* **score-function** (REINFORCE family): :math:`\nabla_\theta\,\mathbb E[f] = \mathbb E[f(D)\,
  \nabla_\theta \log p_\theta(D)]`. Unbiased, higher variance, and they need the loss values:
  draw with :func:`sample_with_log_prob` and train on :func:`reinforce_surrogate`.
  Methods ``"reinforce"`` and ``"rloo"``.

Every sampler draws its Gumbel noise through :mod:`gumbelkit.noise` (the noise contract): the
first draw is ``gumbel_noise_like(logits, generator=generator)``, whose argmax is the sample.

Example:
    >>> import torch
    >>> from gumbelkit import estimators as est
    >>> available = est.available()
    >>> available[:3], len(available)
    (['st', 'st-gs', 'decoupled-st-gs'], 8)
    >>> logits = torch.zeros(4, 3, requires_grad=True)
    >>> z = est.sample(logits, method="reinmax", generator=torch.Generator().manual_seed(0))
    >>> z.sum(-1).tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from numbers import Real
from types import MappingProxyType

import torch

from ._kernels import estimators as kernels
from ._kernels.estimators import one_hot, row_max
from ._validation import check_generator, check_logits, check_tau, compute_dtype, normalize_dim
from .noise import gumbel_noise_like

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "available",
    "conditional_gumbel",
    "decoupled_st_gumbel_softmax",
    "gapped_straight_through",
    "gumbel_rao",
    "reinforce_surrogate",
    "reinmax",
    "sample",
    "sample_with_log_prob",
    "st_gumbel_softmax",
    "straight_through",
]

Tau = float | torch.Tensor


# ----------------------------------------------------------------------------- argument checks

def _temperature(tau: object, logits: torch.Tensor, dim: int, name: str = "tau") -> Tau:
    """``check_tau`` under the argument's own name; the estimators do not differentiate tau."""
    try:
        tau = check_tau(tau, logits, dim)
    except (TypeError, ValueError) as err:
        if name == "tau":
            raise
        raise type(err)(f"{name}: {err}") from None
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        raise ValueError(f"{name} requires grad, but the estimators treat the temperature as a "
                         f"constant; pass {name}.detach()")
    return tau


def _prepare(logits: object, dim: object, generator: object) -> tuple[torch.Tensor, int]:
    """The checks that read only Python values, shapes, dtypes and devices."""
    logits = check_logits(logits)
    dim = normalize_dim(dim, logits.dim())
    check_generator(generator, logits.device)
    if logits.shape[dim] == 0:
        raise ValueError(f"logits have no categories along dim={dim} (shape {tuple(logits.shape)})")
    return logits, dim


def _shift(logits: torch.Tensor, dim: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The row maximum (compute dtype, keepdim), after the data checks (NaN, +inf, empty rows).

    The module's one data-dependent validation: a registered operator (see
    :func:`gumbelkit._kernels.estimators.row_max`), so it raises under compile and vmap too.
    """
    return row_max(logits.detach(), dim, index)


def _draw(logits: object, tau: object, dim: object, generator: object
          ) -> tuple[torch.Tensor, Tau, int, torch.Tensor, torch.Tensor]:
    """Validate ``logits``, ``tau``, ``dim``, ``generator``; draw the sample's Gumbel noise."""
    logits, dim = _prepare(logits, dim, generator)
    tau = _temperature(tau, logits, dim)
    shift = _shift(logits, dim)
    return logits, tau, dim, gumbel_noise_like(logits, generator=generator), shift


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _index(index: object, logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Category indices with ``dim`` removed (or kept with size 1), returned keepdim.

    Shapes and dtypes only; the values are checked by :func:`_shift`."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"index must be an int64 tensor of category indices, got {got}")
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device} but logits are on {logits.device}")
    reduced = logits.shape[:dim] + logits.shape[dim + 1:]
    if index.shape == reduced:
        index = index.unsqueeze(dim)
    elif index.shape != (*logits.shape[:dim], 1, *logits.shape[dim + 1:]):
        raise ValueError(f"index of shape {tuple(index.shape)} does not match logits of shape "
                         f"{tuple(logits.shape)} with dim={dim}: expected {tuple(reduced)}")
    return index


# ----------------------------------------------------------------------------- pathwise estimators

def straight_through(
    logits: torch.Tensor,
    tau: Tau = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Straight-through estimator: exact one-hot sample, gradient of softmax(logits / tau).

    .. math::
        D = \operatorname{onehot}(\arg\max_i(\theta_i + g_i)) \sim \operatorname{Cat}
        (\operatorname{softmax}\theta), \qquad
        \widehat\nabla_\theta = \tfrac1\tau\,J(\operatorname{softmax}(\theta/\tau))^\top
        \frac{\partial f}{\partial D}

    with :math:`J(p) = \operatorname{diag}(p) - pp^\top` (Bengio, Léonard and Courville 2013,
    "Estimating or propagating gradients through stochastic neurons"; the softmax form as in
    Liu et al. 2023). ``tau`` changes only the backward pass.

    Args:
        logits: unnormalized log-probabilities, any shape; ``-inf`` = impossible.
        tau: backward temperature > 0 (float, or tensor with size 1 along ``dim``; not differentiated).
        dim: the category dimension.
        generator: the random source (same state, bit-identical sample and gradient).

    Returns:
        An exact one-hot tensor like ``logits``.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z = straight_through(logits, generator=torch.Generator().manual_seed(0))
        >>> z.sum().item()
        1.0
        >>> (z * torch.tensor([3.0, 1.0, 0.0])).sum().backward()
        >>> abs(logits.grad.sum().item()) < 1e-6  # softmax gradients sum to zero
        True
    """
    logits, tau, dim, noise, shift = _draw(logits, tau, dim, generator)
    return kernels.straight_through(logits, noise, shift, tau, dim)


def st_gumbel_softmax(
    logits: torch.Tensor,
    tau: Tau = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Straight-through Gumbel-Softmax: ``gumbel_softmax(logits, tau, hard=True)``.

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta + g)), \qquad
        \widehat\nabla_\theta = \tfrac1\tau\,J(y)^\top \frac{\partial f}{\partial D}, \quad
        y = \operatorname{softmax}((\theta + g)/\tau)

    (Jang, Gu and Poole 2017, "Categorical reparameterization with Gumbel-Softmax"). Same
    noise, sample and gradient as :func:`gumbelkit.gumbel_softmax` with ``hard=True``.

    Example:
        >>> logits = torch.zeros(2, 5)
        >>> g = torch.Generator().manual_seed(0)
        >>> bool((st_gumbel_softmax(logits, 0.5, generator=g).sum(-1) == 1).all())
        True
    """
    logits, tau, dim, noise, shift = _draw(logits, tau, dim, generator)
    return kernels.st_gumbel_softmax(logits, noise, shift, tau, dim)


def decoupled_st_gumbel_softmax(
    logits: torch.Tensor,
    tau_forward: Tau = 1.0,
    tau_backward: Tau = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Straight-through Gumbel-Softmax with separate forward and backward temperatures.

    One noise draw :math:`g`, the paper's parametrisation :math:`\theta/\tau + g`:

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta/\tau_f + g)), \qquad
        \widehat\nabla_\theta = \tfrac1{\tau_b} J(y_b)^\top \frac{\partial f}{\partial D}, \quad
        y_b = \operatorname{softmax}(\theta/\tau_b + g)

    (Shah, Yan, Mozer and Liu 2024, "Improving discrete optimisation via decoupled
    straight-through Gumbel-Softmax"). ``tau_forward`` sets how random the forward sample is:
    :math:`D` is an exact draw from :math:`\operatorname{softmax}(\theta/\tau_f)`, so from the
    model's distribution only at ``tau_forward=1`` (the default). ``tau_backward`` sets how the
    gradient spreads over categories.

    Example:
        >>> logits = torch.tensor([2.0, 0.0, -2.0], requires_grad=True)
        >>> g = torch.Generator().manual_seed(0)
        >>> z = decoupled_st_gumbel_softmax(logits, tau_forward=1.0, tau_backward=2.0, generator=g)
        >>> z.sum().item(), sorted(z.tolist())  # an exact one-hot
        (1.0, [0.0, 0.0, 1.0])
    """
    logits, dim = _prepare(logits, dim, generator)
    tau_forward = _temperature(tau_forward, logits, dim, "tau_forward")
    tau_backward = _temperature(tau_backward, logits, dim, "tau_backward")
    shift = _shift(logits, dim)
    noise = gumbel_noise_like(logits, generator=generator)
    return kernels.decoupled_st_gumbel_softmax(logits, noise, shift, tau_forward, tau_backward, dim)


def _separate_ties(noise: torch.Tensor, theta: torch.Tensor, index: torch.Tensor,
                   dim: int) -> torch.Tensor:
    """Lower, by a few ulps, any noise whose perturbed logit rounds up to the chosen one's.

    Mathematically every other perturbed logit is below the chosen one; in floating point a
    draw far above the truncation point rounds onto it (likely at logits near 1e4 in float32).
    """
    top = (theta + noise).gather(dim, index)
    chosen = torch.zeros_like(theta + noise, dtype=torch.bool).scatter(
        dim, index, torch.ones_like(index, dtype=torch.bool))
    for step in (2.0, 4.0, 16.0, 64.0, 256.0):  # branch-free: a pass with no tie changes nothing
        tie = ((theta + noise) >= top) & ~chosen
        size = torch.maximum(theta.abs(), top.abs())
        ulp = torch.nextafter(size, torch.full_like(size, float("inf"))) - size
        noise = torch.where(tie, (top - theta) - step * ulp, noise)
    return noise


def conditional_gumbel(
    logits: torch.Tensor,
    index: torch.Tensor,
    k: int = 1,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Gumbel noise conditioned on ``argmax(logits + noise) == index`` ("truncated Gumbel").

    Given :math:`\arg\max_j(\theta_j + G_j) = i`, the maximum :math:`M` is
    :math:`\text{Gumbel}(\log\sum_j e^{\theta_j})` and each other perturbed logit is a
    :math:`\text{Gumbel}(\theta_j)` truncated to lie below :math:`M`. With fresh standard
    Gumbel draws :math:`g` and :math:`\log\pi = \operatorname{log\_softmax}(\theta)`:

    .. math::
        G_i = g_i - \log\pi_i, \qquad
        G_j = -\operatorname{logaddexp}(-g_j,\ \log\pi_j - g_i)\quad (j \ne i)

    (Maddison, Tarlow and Minka 2014, A* sampling; Paulus, Maddison and Krause 2021, appendix).
    Everything is in log space from ``log_softmax``, so logits of :math:`\pm 10^4` neither
    overflow nor lose the truncation; impossible categories (``-inf``) get unconditioned noise.

    Args:
        logits: unnormalized log-probabilities, any shape.
        index: int64 category indices, the shape of ``logits`` without ``dim`` (or with size 1).
            The chosen categories must have probability > 0.
        k: independent draws to return.
        dim: the category dimension.
        generator: the random source; draws ``gumbel_noise_like`` of ``logits`` expanded to
            ``(k, *logits.shape)`` in the compute dtype.

    Returns:
        Noise of shape ``(k, *logits.shape)`` in the compute dtype (float32 for half logits):
        ``argmax(logits + noise[j], dim) == index`` for every ``j``, exactly, in that dtype.

    Example:
        >>> logits = torch.tensor([[1e4, -1e4, 0.0]])
        >>> noise = conditional_gumbel(logits, torch.tensor([1]), k=3,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> noise.shape, (logits + noise).argmax(-1).flatten().tolist()
        (torch.Size([3, 1, 3]), [1, 1, 1])
    """
    logits, dim = _prepare(logits, dim, generator)
    index = _index(index, logits, dim)
    k = _count(k, "k", 1)
    _shift(logits, dim, index)
    with torch.no_grad():
        theta = logits.detach().to(compute_dtype(logits.dtype))
        noise = _conditional_noise(theta, index, k, dim, generator)
        idx = index.unsqueeze(0).expand(k, *index.shape)
        return _separate_ties(noise, theta.unsqueeze(0), idx, dim + 1)


def _conditional_noise(theta: torch.Tensor, index: torch.Tensor, k: int, dim: int,
                       generator: torch.Generator | None) -> torch.Tensor:
    """The formula of :func:`conditional_gumbel` on validated input (``index`` keepdim)."""
    log_p = torch.log_softmax(theta, dim)
    g = gumbel_noise_like(theta.unsqueeze(0).expand(k, *theta.shape), generator=generator)
    idx = index.unsqueeze(0).expand(k, *index.shape)
    g_top = g.gather(dim + 1, idx)
    noise = torch.logaddexp(-g, log_p - g_top).neg()
    return noise.scatter(dim + 1, idx, g_top - log_p.gather(dim, index).unsqueeze(0))


def gumbel_rao(
    logits: torch.Tensor,
    k: int = 10,
    tau: Tau = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Gumbel-Rao (GR-MCk): ST-GS gradient averaged over noise conditioned on the sample.

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta + g)), \qquad
        \widehat\nabla_\theta = \frac1k \sum_{j=1}^k \tfrac1\tau J(y_j)^\top
        \frac{\partial f}{\partial D}, \quad
        y_j = \operatorname{softmax}((\theta + g^{(j)})/\tau),\;
        g^{(j)} \sim \text{Gumbel} \mid D

    (Paulus, Maddison and Krause 2021, "Rao-Blackwellizing the straight-through Gumbel-Softmax
    gradient estimator"). The expectation equals that of ST-GS; the variance falls with ``k``.
    Costs ``k`` softmaxes (and ``k`` times the memory) in the backward pass, one loss evaluation.
    The conditional noise comes from :func:`conditional_gumbel` (stable for logits up to
    :math:`\pm 10^4`), drawn after the sample's own noise.

    Example:
        >>> logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
        >>> z = gumbel_rao(logits, k=100, tau=0.5, generator=torch.Generator().manual_seed(0))
        >>> z.sum(-1).tolist() == [1.0] * 8
        True
    """
    k = _count(k, "k", 1)
    logits, tau, dim, noise, shift = _draw(logits, tau, dim, generator)
    with torch.no_grad():  # ties do not matter to a softmax: skip conditional_gumbel's fix-up
        theta = logits.detach().to(shift.dtype)
        index = (theta - shift + noise.to(shift.dtype)).argmax(dim, keepdim=True)
        cond = _conditional_noise(theta, index, k, dim, generator)
    return kernels.gumbel_rao(logits, noise, shift, cond, tau, dim)


def gapped_straight_through(
    logits: torch.Tensor,
    tau: Tau = 1.0,
    gap: float | str = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Gapped straight-through (GST): straight-through at logits moved to pick the sample.

    .. math::
        \tilde\theta_D = \max_j\theta_j,\quad
        \tilde\theta_i = \min(\theta_i, \max_j\theta_j - \kappa)\ (i\ne D), \qquad
        \widehat\nabla_\theta = \tfrac1\tau J(\operatorname{softmax}(\tilde\theta/\tau))^\top
        \frac{\partial f}{\partial D}

    with the move :math:`\tilde\theta - \theta` held constant (Fan, Chi, Rudnicky and Ramadge
    2022, "Training discrete deep generative models via gapped straight-through estimator").
    Like ST-GS the surrogate is consistent with :math:`D` and leaves a gap :math:`\kappa`
    between :math:`D` and the rest, but it needs no noise beyond the sample's own.

    Args:
        gap: :math:`\kappa \ge 0` (GST-1.0 is ``gap=1.0``), or ``"p"`` for GST-p, the per-row
            gap :math:`\kappa = -\log(1 - \pi_D)/\pi_D`.

    Example:
        >>> logits = torch.tensor([0.5, 0.0, -0.5], requires_grad=True)
        >>> z = gapped_straight_through(logits, gap=1.0, generator=torch.Generator().manual_seed(0))
        >>> z.sum().item()
        1.0
    """
    if gap == "p":
        gap = None
    elif isinstance(gap, bool) or not isinstance(gap, Real):
        raise TypeError(f"gap must be a float >= 0 or 'p' (GST-p), got {gap!r}")
    elif not 0.0 <= float(gap) < float("inf"):
        raise ValueError(f"gap must be finite and >= 0, got {gap}")
    else:
        gap = float(gap)
    logits, tau, dim, noise, shift = _draw(logits, tau, dim, generator)
    return kernels.gapped_straight_through(logits, noise, shift, tau, gap, dim)


def reinmax(
    logits: torch.Tensor,
    tau: Tau = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""ReinMax: a second-order (Heun's method) straight-through estimator.

    .. math::
        D = \operatorname{onehot}(\arg\max(\theta + g)), \quad
        \pi_0 = \operatorname{softmax}\theta, \quad
        \pi_1 = \tfrac12(D + \operatorname{softmax}(\theta/\tau)), \qquad
        \widehat\nabla_\theta = \Big(2J(\pi_1) - \tfrac12 J(\pi_0)\Big)^\top
        \frac{\partial f}{\partial D}

    (Liu, Liu, Gao, Wang and Han 2023, "Bridging discrete and backpropagation:
    straight-through and beyond", Algorithm 2). Where plain straight-through is a first-order
    (Euler) approximation of :math:`f(D) - f(\cdot)` differences, ReinMax is second order, at
    the cost of two softmaxes. The paper recommends ``tau >= 1`` (its bias grows at small
    ``tau``); any ``tau > 0`` is accepted.

    Example:
        >>> logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> z = reinmax(logits, tau=1.0, generator=torch.Generator().manual_seed(0))
        >>> sorted(z.flatten().tolist())
        [0.0, 0.0, 1.0]
        >>> (z * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> logits.grad.shape
        torch.Size([1, 3])
    """
    logits, tau, dim, noise, shift = _draw(logits, tau, dim, generator)
    return kernels.reinmax(logits, noise, shift, tau, dim)


# ----------------------------------------------------------------------------- score function

def sample_with_log_prob(
    logits: torch.Tensor,
    n: int = 1,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``n`` one-hot samples and their log-probabilities, for score-function estimators.

    .. math::
        D^{(s)} = \operatorname{onehot}(\arg\max(\theta + g^{(s)})), \qquad
        \log p_\theta(D^{(s)}) = \operatorname{log\_softmax}(\theta)_{D^{(s)}}

    The samples carry no gradient; the log-probabilities do (they are what REINFORCE
    differentiates). The noise is ``gumbel_noise_like`` of ``logits`` expanded to ``(n, *shape)``.

    Returns:
        ``(samples, log_prob)``: samples of shape ``(n, *logits.shape)``, and log-probabilities
        of shape ``(n, *logits.shape without dim)``. Sum ``log_prob`` over independent latents
        to get each sample's joint log-probability.

    Example:
        >>> logits = torch.zeros(5, 4, requires_grad=True)  # 5 latents, 4 categories
        >>> z, log_p = sample_with_log_prob(logits, n=3, generator=torch.Generator().manual_seed(0))
        >>> z.shape, log_p.shape, round(log_p[0, 0].item(), 4)  # log(1/4)
        (torch.Size([3, 5, 4]), torch.Size([3, 5]), -1.3863)
    """
    logits, dim = _prepare(logits, dim, generator)
    n = _count(n, "n", 1)
    shift = _shift(logits, dim)
    expanded = logits.detach().unsqueeze(0).expand(n, *logits.shape)
    noise = gumbel_noise_like(expanded, generator=generator).to(shift.dtype)
    index = (expanded.to(shift.dtype) - shift + noise).argmax(dim + 1, keepdim=True)
    log_p = torch.log_softmax(logits.to(shift.dtype), dim).expand(n, *logits.shape)
    log_prob = log_p.gather(dim + 1, index).squeeze(dim + 1).to(logits.dtype)
    return one_hot(index, expanded, dim + 1), log_prob


def reinforce_surrogate(
    log_prob: torch.Tensor,
    f: torch.Tensor,
    *,
    baseline: str | float | torch.Tensor | None = None,
    dim: int = 0,
) -> torch.Tensor:
    r"""Surrogate loss whose gradient is the REINFORCE (or RLOO) estimate; its value is mean f.

    For :math:`n` samples :math:`D^{(s)}` along ``dim`` with losses :math:`f_s` and
    log-probabilities :math:`\log p_\theta(D^{(s)})`:

    .. math::
        \widehat\nabla_\theta = \frac1n \sum_{s=1}^n (f_s - b_s)\,\nabla_\theta\log p_\theta(D^{(s)})
        \;+\; \frac1n\sum_s \nabla_\theta f_s

    (Williams 1992). ``baseline=None``: :math:`b_s = 0`; ``"loo"``: the leave-one-out mean
    :math:`b_s = \frac1{n-1}\sum_{t\ne s} f_t`, still unbiased (RLOO; Kool, van Hoof and Welling
    2019, "Buy 4 REINFORCE samples, get a baseline for free!"); a float or tensor: a constant
    baseline (detached). The second term is the pathwise gradient of ``f`` itself (e.g. a
    decoder's parameters) and vanishes when ``f`` does not require grad. The returned value
    equals ``f.mean(dim)``, so it can be logged as the loss.

    Args:
        log_prob: log-probabilities of the samples (differentiable in the parameters), e.g.
            the second output of :func:`sample_with_log_prob` summed over latents.
        f: the loss of each sample, broadcastable against ``log_prob``.
        baseline: ``None``, ``"loo"`` (needs ``n >= 2``), or a constant.
        dim: the sample dimension, reduced by the mean.

    Example:
        >>> logits = torch.zeros(3, requires_grad=True)
        >>> z, log_p = sample_with_log_prob(logits, n=8, generator=torch.Generator().manual_seed(0))
        >>> f = (z * torch.tensor([0.0, 1.0, 4.0])).sum(-1)  # a black-box loss per sample
        >>> loss = reinforce_surrogate(log_p, f, baseline="loo")
        >>> torch.allclose(loss, f.mean())
        True
        >>> loss.backward(); logits.grad.shape
        torch.Size([3])
    """
    for name, t in (("log_prob", log_prob), ("f", f)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    try:
        shape = torch.broadcast_shapes(log_prob.shape, f.shape)
    except RuntimeError:
        raise ValueError(f"log_prob of shape {tuple(log_prob.shape)} and f of shape "
                         f"{tuple(f.shape)} do not broadcast") from None
    if not shape:
        raise ValueError("log_prob and f need a sample dimension; got 0-d tensors")
    dim = normalize_dim(dim, len(shape))
    n = shape[dim]
    fd = f.detach()
    if baseline is None:
        advantage = fd
    elif isinstance(baseline, str):
        if baseline != "loo":
            raise ValueError(f"baseline must be None, 'loo' or a constant, got {baseline!r}")
        if n < 2:
            raise ValueError(f"baseline='loo' needs n >= 2 samples along dim={dim}, got {n}")
        fd = fd.expand(shape)
        advantage = fd - (fd.sum(dim, keepdim=True) - fd) / (n - 1)
    elif isinstance(baseline, torch.Tensor) or (isinstance(baseline, Real)
                                                and not isinstance(baseline, bool)):
        advantage = fd - (baseline.detach() if isinstance(baseline, torch.Tensor) else baseline)
    else:
        raise TypeError(f"baseline must be None, 'loo' or a constant, got {type(baseline).__name__}")
    score = (advantage * log_prob).expand(shape).mean(dim)
    return f.expand(shape).mean(dim) + (score - score.detach())


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Estimator:
    """A registry entry: what a method is, how to call it, and where it comes from.

    ``kind`` is ``"pathwise"`` (``function`` is a sampler: ``function(logits, dim=, generator=,
    **{tau: ...})`` returns a one-hot with the estimator's gradient; use it via :func:`sample`)
    or ``"score-function"`` (``function`` is ``reinforce_surrogate`` with its baseline bound:
    ``function(log_prob, f)``; draw with :func:`sample_with_log_prob`). ``tau`` names the
    keyword that :func:`sample`'s temperature goes to (``None``: no temperature).

    Example:
        >>> e = ESTIMATORS["gumbel-rao"]
        >>> e.kind, e.tau, e.paper
        ('pathwise', 'tau', 'Paulus et al. 2021')
    """

    name: str
    kind: str
    function: Callable[..., torch.Tensor]
    tau: str | None
    paper: str
    summary: str


def _entries() -> Mapping[str, Estimator]:
    rows = [
        Estimator("st", "pathwise", straight_through, "tau", "Bengio et al. 2013",
                  "hard sample, gradient of softmax(logits / tau)"),
        Estimator("st-gs", "pathwise", st_gumbel_softmax, "tau", "Jang et al. 2017",
                  "hard sample, gradient of softmax((logits + g) / tau)"),
        Estimator("decoupled-st-gs", "pathwise", decoupled_st_gumbel_softmax, "tau_backward",
                  "Shah et al. 2024", "ST-GS with a forward temperature (default 1) and a "
                  "backward temperature (tau)"),
        Estimator("gumbel-rao", "pathwise", gumbel_rao, "tau", "Paulus et al. 2021",
                  "ST-GS averaged over k conditional noise draws (k=10)"),
        Estimator("gst", "pathwise", gapped_straight_through, "tau", "Fan et al. 2022",
                  "straight-through at deterministically gapped logits (gap=1.0)"),
        Estimator("reinmax", "pathwise", reinmax, "tau", "Liu et al. 2023",
                  "second-order (Heun) straight-through; prefers tau >= 1"),
        Estimator("reinforce", "score-function", partial(reinforce_surrogate, baseline=None),
                  None, "Williams 1992", "score-function estimator, no baseline"),
        Estimator("rloo", "score-function", partial(reinforce_surrogate, baseline="loo"),
                  None, "Kool et al. 2019", "REINFORCE with the leave-one-out baseline (n >= 2)"),
    ]
    return MappingProxyType({e.name: e for e in rows})


ESTIMATORS: Mapping[str, Estimator] = _entries()
"""Every method by name (read-only), in a fixed order."""

KINDS = ("pathwise", "score-function")


def available(kind: str | None = None) -> list[str]:
    """The registered method names, optionally only ``"pathwise"`` or ``"score-function"`` ones.

    Example:
        >>> available("score-function")
        ['reinforce', 'rloo']
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be None, 'pathwise' or 'score-function', got {kind!r}")
    return [name for name, e in ESTIMATORS.items() if kind is None or e.kind == kind]


def _lookup(method: object) -> Estimator:
    if not isinstance(method, str) or method not in ESTIMATORS:
        raise ValueError(f"unknown estimator {method!r}; choose one of {available()}")
    return ESTIMATORS[method]


def sample(
    logits: torch.Tensor,
    method: str = "reinmax",
    *,
    tau: Tau = 1.0,
    dim: int = -1,
    generator: torch.Generator | None = None,
    **kw: object,
) -> torch.Tensor:
    r"""Draw an exact one-hot sample whose backward pass is ``method``'s gradient estimate.

    The single entry point for pathwise estimators (``available("pathwise")``); extra keywords
    go to the method (``k=`` for ``"gumbel-rao"``, ``gap=`` for ``"gst"``, ``tau_forward=`` for
    ``"decoupled-st-gs"``, whose ``tau`` is the backward temperature). Score-function methods
    need the loss values, so they are not drawn here: use :func:`sample_with_log_prob` and
    :func:`reinforce_surrogate` (or ``ESTIMATORS[method].function``).

    Example:
        >>> logits = torch.randn(2, 6, 4, requires_grad=True)
        >>> g = torch.Generator().manual_seed(0)
        >>> z = sample(logits, "gumbel-rao", tau=0.5, k=20, generator=g)
        >>> z.shape, bool((z.sum(-1) == 1).all())
        (torch.Size([2, 6, 4]), True)
    """
    est = _lookup(method)
    if est.kind != "pathwise":
        baseline = "'loo'" if method == "rloo" else "None"
        raise ValueError(
            f"{method!r} is a score-function estimator: it needs the loss of each sample. Draw "
            f"with z, log_p = sample_with_log_prob(logits, n) and minimise "
            f"reinforce_surrogate(log_p, f(z), baseline={baseline})")
    if est.tau in kw:
        raise TypeError(f"pass the temperature of {method!r} as tau=..., not {est.tau}=...")
    return est.function(logits, dim=dim, generator=generator, **{est.tau: tau}, **kw)

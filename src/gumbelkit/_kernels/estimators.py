r"""Gradient estimators for one-hot categorical samples, one autograd Function each.

Every Function returns an exact one-hot sample :math:`D` in its forward pass. Its backward
pass is a weighted sum of softmax Jacobians applied to the upstream gradient :math:`G`:

.. math::
    \widehat{\nabla}_\theta = s \sum_m w_m\, J(p_m)^\top G, \qquad
    J(p)^\top G = p \odot \big(G - \langle G, p\rangle\big),

where :math:`J(p) = \operatorname{diag}(p) - p p^\top` is the Jacobian of the softmax at
:math:`p`. The estimators differ only in the surrogate probabilities :math:`p_m`, the
weights :math:`w_m` and the scale :math:`s` (for most, :math:`1/\tau`), so one backward pass
(:class:`_SurrogateJacobian`) serves them all and only the forward passes are written out.

Computation runs in float32 for half-precision logits; the surrogates are saved in that
dtype. The noise is passed in (drawn by :mod:`gumbelkit.noise`), so a Function is a
deterministic map of (logits, noise) and can be checked against a reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from .._validation import check_rows, compute_dtype
from .gumbel_softmax import perturb

__all__ = [
    "DecoupledSTGumbelSoftmaxFunction",
    "GappedStraightThroughFunction",
    "GumbelRaoFunction",
    "ReinMaxFunction",
    "StraightThroughFunction",
    "one_hot",
]

Tau = float | torch.Tensor


def softmax_vjp(p: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    r""":math:`J(p)^\top G = p \odot (G - \langle G, p\rangle)` along ``dim``."""
    return p * (grad - (grad * p).sum(dim, keepdim=True))


def one_hot(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """A one-hot tensor shaped and typed like ``like``, with ones at ``index`` (keepdim) along ``dim``."""
    return torch.zeros(like.shape, dtype=like.dtype, device=like.device).scatter_(dim, index, 1.0)


def sample_index(scores: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    """``argmax(scores)`` along ``dim`` (keepdim), validating every row of ``logits`` on the way."""
    values, index = scores.max(dim, keepdim=True)
    check_rows(values, logits, None, dim)
    return index


def _scaled(x: torch.Tensor, tau: Tau) -> torch.Tensor:
    """``x / tau``, skipping the division at ``tau == 1``."""
    if isinstance(tau, torch.Tensor):
        return x / tau.to(x.dtype)
    return x / tau if tau != 1.0 else x


def _inverse(tau: Tau) -> Tau:
    return tau.reciprocal() if isinstance(tau, torch.Tensor) else 1.0 / tau


class _SurrogateJacobian(torch.autograd.Function):
    """Shared backward pass; subclasses write ``forward`` and call :meth:`save`."""

    @staticmethod
    def save(ctx: FunctionCtx, logits: torch.Tensor, dim: int, surrogates: torch.Tensor,
             weights: tuple[float, ...] | None, scale: Tau, n_inputs: int) -> None:
        """Keep ``surrogates`` (stacked along a new dim 0); ``weights=None`` means their mean."""
        ctx.dim, ctx.weights, ctx.n_inputs, ctx.dtype = dim, weights, n_inputs, logits.dtype
        if isinstance(scale, torch.Tensor):
            ctx.scale = None
            ctx.save_for_backward(surrogates, scale)
        else:
            ctx.scale = scale
            ctx.save_for_backward(surrogates)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        p, *rest = ctx.saved_tensors
        scale = rest[0].to(p.dtype) if rest else ctx.scale
        v = softmax_vjp(p, grad_out.to(p.dtype).unsqueeze(0), ctx.dim + 1)
        if ctx.weights is None:
            grad = v.mean(0)
        else:
            grad = sum(w * v[m] for m, w in enumerate(ctx.weights))
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            grad = grad * scale
        return (grad.to(ctx.dtype),) + (None,) * (ctx.n_inputs - 1)


class StraightThroughFunction(_SurrogateJacobian):
    r"""Straight-through estimator (Bengio, Léonard and Courville 2013).

    Forward: :math:`D = \operatorname{onehot}(\arg\max_i(\theta_i + g_i))`, an exact draw from
    :math:`\operatorname{Categorical}(\operatorname{softmax}(\theta))`.
    Backward: the gradient of :math:`\operatorname{softmax}(\theta/\tau)`,

    .. math:: \widehat\nabla_\theta = \tfrac1\tau\, J(\pi_\tau)^\top G, \quad
              \pi_\tau = \operatorname{softmax}(\theta / \tau).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, noise: torch.Tensor, tau: Tau,
                dim: int) -> torch.Tensor:
        index = sample_index(perturb(logits, noise, None), logits, dim)
        p = torch.softmax(_scaled(logits.to(compute_dtype(logits.dtype)), tau), dim)
        _SurrogateJacobian.save(ctx, logits, dim, p.unsqueeze(0), None, _inverse(tau), 4)
        return one_hot(index, logits, dim)


class DecoupledSTGumbelSoftmaxFunction(_SurrogateJacobian):
    r"""Decoupled straight-through Gumbel-Softmax (Shah, Yan, Mozer and Liu 2024).

    One Gumbel draw :math:`g`, two temperatures, in the paper's parametrisation
    :math:`\theta/\tau + g`:

    .. math::
        D = \operatorname{onehot}\big(\arg\max_i(\theta_i/\tau_f + g_i)\big), \qquad
        \widehat\nabla_\theta = \tfrac1{\tau_b}\, J(y_b)^\top G, \quad
        y_b = \operatorname{softmax}(\theta/\tau_b + g).

    :math:`D` is an exact draw from :math:`\operatorname{softmax}(\theta/\tau_f)` (so from
    :math:`\operatorname{softmax}(\theta)` at :math:`\tau_f = 1`).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, noise: torch.Tensor, tau_forward: Tau,
                tau_backward: Tau, dim: int) -> torch.Tensor:
        x = logits.to(compute_dtype(logits.dtype))
        noise = noise.to(x.dtype)
        index = sample_index(_scaled(x, tau_forward) + noise, logits, dim)
        y = torch.softmax(_scaled(x, tau_backward) + noise, dim)
        _SurrogateJacobian.save(ctx, logits, dim, y.unsqueeze(0), None, _inverse(tau_backward), 5)
        return one_hot(index, logits, dim)


class GumbelRaoFunction(_SurrogateJacobian):
    r"""Gumbel-Rao Monte Carlo estimator GR-MCk (Paulus, Maddison and Krause 2021).

    Forward: the given one-hot :math:`D`. Backward: the straight-through Gumbel-Softmax
    Jacobian averaged over :math:`k` draws :math:`g^{(j)} \sim \text{Gumbel} \mid
    \arg\max(\theta + g) = D`, with the noise held fixed (Rao-Blackwellisation of ST-GS):

    .. math::
        \widehat\nabla_\theta = \frac1{k\tau} \sum_{j=1}^k J(y_j)^\top G, \quad
        y_j = \operatorname{softmax}\big((\theta + g^{(j)}) / \tau\big).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, index: torch.Tensor,
                conditional_noise: torch.Tensor, tau: Tau, dim: int) -> torch.Tensor:
        x = logits.to(compute_dtype(logits.dtype)).unsqueeze(0) + conditional_noise
        y = torch.softmax(_scaled(x, tau), dim + 1)
        _SurrogateJacobian.save(ctx, logits, dim, y, None, _inverse(tau), 5)
        return one_hot(index, logits, dim)


class GappedStraightThroughFunction(_SurrogateJacobian):
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
    def forward(ctx: FunctionCtx, logits: torch.Tensor, noise: torch.Tensor, tau: Tau,
                gap: float | None, dim: int) -> torch.Tensor:
        x = logits.to(compute_dtype(logits.dtype))
        index = sample_index(perturb(logits, noise, None), logits, dim)
        d = one_hot(index, x, dim).bool()
        top = x.amax(dim, keepdim=True)
        if gap is None:  # GST-p; the series 1 + p/2 avoids 0/0 where pi_D underflows
            p = torch.softmax(x, dim).gather(dim, index)
            kappa = torch.where(p > 1e-4, -torch.log1p(-p) / p, 1.0 + p / 2)
        else:
            kappa = gap
        moved = torch.where(d, top, torch.minimum(x, top - kappa))
        y = torch.softmax(_scaled(moved, tau), dim)
        _SurrogateJacobian.save(ctx, logits, dim, y.unsqueeze(0), None, _inverse(tau), 5)
        return one_hot(index, logits, dim)


class ReinMaxFunction(_SurrogateJacobian):
    r"""ReinMax, the second-order (Heun's method) estimator (Liu, Liu, Gao, Wang and Han 2023).

    Forward: :math:`D = \operatorname{onehot}(\arg\max(\theta + g))`. Backward (their Algorithm 2):

    .. math::
        \pi_0 = \operatorname{softmax}(\theta), \quad
        \pi_1 = \tfrac12\big(D + \operatorname{softmax}(\theta/\tau)\big), \qquad
        \widehat\nabla_\theta = 2\, J(\pi_1)^\top G - \tfrac12\, J(\pi_0)^\top G.

    :math:`\tau` only enters :math:`\pi_1`; the paper recommends :math:`\tau \ge 1`.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, noise: torch.Tensor, tau: Tau,
                dim: int) -> torch.Tensor:
        x = logits.to(compute_dtype(logits.dtype))
        index = sample_index(perturb(logits, noise, None), logits, dim)
        d = one_hot(index, x, dim)
        pi1 = (d + torch.softmax(_scaled(x, tau), dim)).mul_(0.5)
        p = torch.stack([pi1, torch.softmax(x, dim)])
        _SurrogateJacobian.save(ctx, logits, dim, p, (2.0, -0.5), 1.0, 4)
        return d.to(logits.dtype)

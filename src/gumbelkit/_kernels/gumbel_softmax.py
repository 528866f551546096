"""Gumbel-Softmax as one autograd Function with a closed-form backward pass.

Forward: ``y = softmax((logits + g - m) / tau)`` where ``m`` is the row maximum of
``logits + g`` (softmax is shift invariant, and subtracting it first means no temperature
can overflow the division). Only ``y`` is saved. Backward, with upstream gradient ``G``:

    dL/dlogits = (1 / tau) * y * (G - sum(G * y))
    dL/dtau    = -(1 / tau) * sum(w * log y),   w = y * (G - sum(G * y))

The second line uses ``sum(w) = 0``: ``(logits + g) / tau`` and ``log y`` differ by a
per-row constant, so ``log y`` stands in for the pre-softmax scores we did not save.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

from .._validation import check_rows, compute_dtype

__all__ = ["GumbelSoftmaxFunction", "gumbel_softmax_from_noise", "perturb", "scores_for_softmax"]

_NEG_INF = float("-inf")


def perturb(logits: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits + noise`` in the compute dtype, masked entries set to -inf.

    Writes into ``noise`` when it already has the compute dtype (callers pass a fresh
    buffer they own), so the perturbed scores cost no extra allocation.
    """
    cdtype = compute_dtype(logits.dtype)
    if noise.dtype == cdtype and noise.shape == logits.shape and not noise.requires_grad:
        x = noise.add_(logits)
    else:
        x = logits.to(cdtype) + noise.to(cdtype)
    if mask is not None:
        x = x.masked_fill_(~mask, _NEG_INF)
    return x


def scores_for_softmax(x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None, dim: int,
                       tau: float | torch.Tensor) -> torch.Tensor:
    """``(x - rowmax(x)) / tau`` in place, validating every row on the way."""
    m = x.amax(dim, keepdim=True).detach()
    check_rows(m, logits, mask, dim)
    x = x.sub_(m) if not x.requires_grad else x - m
    if isinstance(tau, torch.Tensor):
        tau = tau.to(x.dtype)
        return x.div_(tau) if not x.requires_grad and not tau.requires_grad else x / tau
    if tau != 1.0:
        x = x.div_(tau) if not x.requires_grad else x / tau
    return x


class GumbelSoftmaxFunction(torch.autograd.Function):
    """Soft or straight-through hard Gumbel-Softmax on given noise (Jang et al. 2017).

    Returns ``y`` when soft and ``(one_hot, y)`` when hard: the soft sample is an output
    in both modes, so the saved tensor is an output and double backward stays correct.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, tau: float | torch.Tensor, noise: torch.Tensor,
                mask: torch.Tensor | None, hard: bool, dim: int):
        x = scores_for_softmax(perturb(logits, noise, mask), logits, mask, dim, tau)
        y = torch.softmax(x, dim)
        del x
        index = y.argmax(dim, keepdim=True) if hard else None
        y = y.to(logits.dtype)
        ctx.dim = dim
        if isinstance(tau, torch.Tensor):
            ctx.tau = None
            ctx.save_for_backward(y, tau)
        else:
            ctx.tau = tau
            ctx.save_for_backward(y)
        if not hard:
            return y
        one_hot = torch.zeros_like(y).scatter_(dim, index, 1.0)
        return one_hot, y

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor):  # type: ignore[override]
        # Straight-through: the one-hot's gradient is passed to y unchanged.
        y, *rest = ctx.saved_tensors
        tau_t = rest[0] if rest else None
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        gc = sum(g.to(cdtype) for g in grads)
        w = yc * (gc - (gc * yc).sum(ctx.dim, keepdim=True))
        tau = tau_t.to(cdtype) if tau_t is not None else ctx.tau
        grad_logits = grad_tau = None
        if ctx.needs_input_grad[0]:
            grad_logits = (w / tau if tau_t is not None or tau != 1.0 else w).to(y.dtype)
        if tau_t is not None and ctx.needs_input_grad[1]:
            g = torch.xlogy(w, yc).sum(ctx.dim, keepdim=True).div(tau).neg()
            grad_tau = g.sum_to_size(tau_t.shape).to(tau_t.dtype)
        return grad_logits, grad_tau, None, None, None, None


def gumbel_softmax_from_noise(logits: torch.Tensor, tau: float | torch.Tensor, noise: torch.Tensor,
                              mask: torch.Tensor | None, hard: bool, dim: int) -> torch.Tensor:
    """Apply :class:`GumbelSoftmaxFunction` to validated arguments; returns only the sample."""
    out = GumbelSoftmaxFunction.apply(logits, tau, noise, mask, hard, dim)
    return out[0] if hard else out

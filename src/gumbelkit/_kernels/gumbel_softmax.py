"""Gumbel-Softmax as one autograd Function with a closed-form backward pass (the CPU/torch path).

Forward: ``y = softmax((logits + g) / tau)``, computed in a single buffer: the noise buffer
holds ``L = -g`` (see :func:`gumbelkit.noise.neg_gumbel_like`), ``logits - L`` is written over
it, divided by ``tau`` in place and soft-maxed in place, so the forward allocates one tensor.
The row maximum ``m`` of ``logits + g`` is computed once: it validates every row (NaN, +inf,
nothing allowed) and, only where ``m / tau`` would overflow, is subtracted first (softmax is
shift invariant). Only ``y`` is saved. Backward, with upstream gradient ``G``:

    dL/dlogits = (1 / tau) * y * (G - sum(G * y))
    dL/dtau    = -(1 / tau) * sum(w * log y),   w = y * (G - sum(G * y))

The second line uses ``sum(w) = 0``: ``(logits + g) / tau`` and ``log y`` differ by a
per-row constant, so ``log y`` stands in for the pre-softmax scores we did not save.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx

from .._validation import check_rows, compute_dtype

__all__ = [
    "GumbelSoftmaxFunction",
    "gumbel_softmax_from_noise",
    "perturb",
    "scale_scores_",
    "subtract_noise",
]

_NEG_INF = float("-inf")


def subtract_noise(logits: torch.Tensor, neg_noise: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits - neg_noise`` (= ``logits + g``) with masked entries at -inf.

    Written over ``neg_noise`` (a fresh compute-dtype buffer the caller owns) unless ``logits``
    requires grad, in which case a new tensor is made so autograd can track it.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        x = logits.to(neg_noise.dtype) - neg_noise
    else:
        x = torch.sub(logits, neg_noise, out=neg_noise)
    if mask is not None:
        x = x.masked_fill(~mask, _NEG_INF) if x.requires_grad else x.masked_fill_(~mask, _NEG_INF)
    return x


def perturb(logits: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits + noise`` in the compute dtype (a new tensor), masked entries set to -inf."""
    return subtract_noise(logits, noise.to(compute_dtype(logits.dtype)).neg(), mask)


def scale_scores_(x: torch.Tensor, row_max: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """``x / tau``, shifted by the row maximum first only where the division would overflow.

    In place when ``x`` does not require grad. ``row_max`` must already be validated (finite).
    """
    inplace = not x.requires_grad
    if isinstance(tau, torch.Tensor):
        tau = tau.to(x.dtype)
        inplace = inplace and not tau.requires_grad
    elif tau == 1.0:
        return x
    if not bool(torch.isfinite(row_max / tau).all()):
        x = x.sub_(row_max) if inplace else x - row_max.detach()
    if inplace:
        return x.div_(tau)
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        # d(x / tau)/dtau = -x / tau^2 is infinite at impossible (-inf) entries: keep them out of the graph
        impossible = torch.isneginf(x.detach())
        return (x.masked_fill(impossible, 0.0) / tau).masked_fill(impossible, _NEG_INF)
    return x / tau


class GumbelSoftmaxFunction(torch.autograd.Function):
    """Soft or straight-through hard Gumbel-Softmax on given noise (Jang et al. 2017).

    ``draw_neg_noise()`` returns ``-g`` in a fresh buffer that the forward overwrites (a
    callable rather than a tensor input, so autograd does not see a modified input).
    Returns ``y`` when soft and
    ``(one_hot, y)`` when hard: the soft sample is an output in both modes, so the saved
    tensor is an output and double backward stays correct.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, tau: float | torch.Tensor,
                draw_neg_noise: Callable[[], torch.Tensor], mask: torch.Tensor | None, hard: bool, dim: int):
        x = subtract_noise(logits, draw_neg_noise(), mask)
        if hard:
            # the one-hot is argmax(logits + g): exactly gumbel_max's draw on the same noise
            row_max, index = x.max(dim, keepdim=True)
        else:
            row_max = x.amax(dim, keepdim=True)
        check_rows(row_max, logits, mask, dim)
        x = scale_scores_(x, row_max, tau)
        y = torch._softmax(x, dim, False, out=x).to(logits.dtype)
        ctx.dim = dim
        if isinstance(tau, torch.Tensor):
            ctx.tau = None
            ctx.save_for_backward(y, tau)
        else:
            ctx.tau = tau
            ctx.save_for_backward(y)
        if not hard:
            return y
        ctx.set_materialize_grads(False)  # y's gradient is usually None: don't add a zero tensor
        one_hot = torch.zeros_like(y).scatter_(dim, index, 1.0)
        return one_hot, y

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor):  # type: ignore[override]
        # Straight-through: the one-hot's gradient is passed to y unchanged.
        y, *rest = ctx.saved_tensors
        tau_t = rest[0] if rest else None
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        present = [g.to(cdtype) for g in grads if g is not None]
        if not present:
            return None, None, None, None, None, None
        gc = present[0] if len(present) == 1 else present[0] + present[1]
        w = gc * yc
        w = w.addcmul_(yc, w.sum(ctx.dim, keepdim=True), value=-1.0)  # y * (G - <G, y>)
        tau = tau_t.to(cdtype) if tau_t is not None else ctx.tau
        grad_logits = grad_tau = None
        if tau_t is not None and ctx.needs_input_grad[1]:
            g = torch.xlogy(w, yc).sum(ctx.dim, keepdim=True).div(tau).neg()
            grad_tau = g.sum_to_size(tau_t.shape).to(tau_t.dtype)
        if ctx.needs_input_grad[0]:
            if tau_t is not None or tau != 1.0:
                w = w.div_(tau) if not torch.is_grad_enabled() else w / tau
            grad_logits = w.to(y.dtype)
        return grad_logits, grad_tau, None, None, None, None


def gumbel_softmax_from_noise(logits: torch.Tensor, tau: float | torch.Tensor, noise: torch.Tensor,
                              mask: torch.Tensor | None, hard: bool, dim: int) -> torch.Tensor:
    """Gumbel-Softmax of validated arguments on given Gumbel ``noise`` (not modified)."""
    cdtype = compute_dtype(logits.dtype)
    out = GumbelSoftmaxFunction.apply(logits, tau, lambda: noise.to(cdtype).neg(), mask, hard, dim)
    return out[0] if hard else out

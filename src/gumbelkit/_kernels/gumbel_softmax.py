r"""Autograd for the Gumbel-Softmax operator: one new-style ``autograd.Function``, closed forms.

Forward: ``torch.ops.gumbelkit.gumbel_softmax`` (see :mod:`gumbelkit._kernels.ops`), or, for
given noise, the same computation in plain torch ops. Only ``y`` (or ``log y``) is saved.
With upstream gradient ``G`` and ``w = y * (G - <G, y>)`` (soft) or ``w = G - y <G, 1>`` (log):

    dL/dlogits = w / tau
    dL/dtau    = -(1 / tau) * sum(w * log y)

The second line uses ``sum(w) = 0``: ``(logits + g) / tau`` and ``log y`` differ by a per-row
constant, so ``log y`` stands in for the pre-softmax scores we did not save. Forward mode is
the transpose: ``dz = (dlogits - log(y) * dtau) / tau``, ``dy = y * (dz - <dz, y>)``. Backward
and ``jvp`` are plain differentiable torch ops, so double backward, ``torch.func`` transforms
and AOT autograd see through them; ``generate_vmap_rule`` batches the forward through the
operator's own vmap rule. Hard mode returns ``(one_hot, y)`` and passes the one-hot's
gradient (and tangent) straight through to ``y``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .._validation import compute_dtype
from .dispatch import cpu_kernels
from .ops import HARD, LOG, gumbel_softmax_forward, softmax_of_perturbed_

__all__ = [
    "GumbelSoftmaxFunction",
    "apply_gumbel_softmax",
    "gumbel_softmax_from_noise",
    "perturb",
]

_NEG_INF = float("-inf")


def perturb(logits: Tensor, noise: Tensor, mask: Tensor | None) -> Tensor:
    """``logits + noise`` in the compute dtype (a new tensor), masked entries set to -inf."""
    x = logits.to(compute_dtype(logits.dtype)) + noise.to(compute_dtype(logits.dtype))
    return x if mask is None else x.masked_fill(~mask, _NEG_INF)


def _log_y(y: Tensor, mode: int) -> Tensor:
    return y if mode == LOG else torch.log(y)


def _times_log_y(w: Tensor, log_y: Tensor) -> Tensor:
    """``w * log y`` with 0 where ``y = 0`` (``0 * log 0 = 0``)."""
    return torch.where(torch.isinf(log_y), torch.zeros_like(w), w * log_y)


def _fused_backward(y: Tensor, grad: Tensor, tau_t: Tensor | None, ctx) -> Tensor | None:
    """``y (grad - <grad, y>) / tau`` by the fused CPU kernel (two passes instead of four), or None.

    Only for plain eager CPU tensors, the category dimension last and a float temperature, while
    no graph of the gradient is built: compilers, ``torch.func`` transforms and double backward
    take the plain-ops formula, which they can see through.
    """
    if torch.compiler.is_compiling() or ctx.mode == LOG or tau_t is not None or ctx.dim not in (-1, y.dim() - 1):
        return None
    if y.numel() == 0 or torch._C._functorch.is_functorch_wrapped_tensor(grad) or torch._C._get_tracing_state():
        return None
    fused = cpu_kernels(y) if type(grad) is torch.Tensor and grad.device.type == "cpu" else None
    if fused is None:
        return None
    n = y.shape[-1]
    out = fused.softmax_backward(y.reshape(-1, n).contiguous().numpy(), grad.reshape(-1, n).contiguous().numpy(),
                                 ctx.tau)
    return torch.from_numpy(out).view(y.shape)


class GumbelSoftmaxFunction(torch.autograd.Function):
    """Soft, straight-through hard or log Gumbel-Softmax (Jang et al. 2017; Maddison et al. 2017).

    ``apply(logits, tau_t, tau, seed, mask, dim, mode, noise)``: ``tau_t`` is a tensor
    temperature (or None for the float ``tau``); ``noise`` is None to draw it from ``seed``
    inside the operator, or a given Gumbel noise tensor.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, tau_t: Tensor | None, tau: float, seed: Tensor | None, mask: Tensor | None,
                dim: int, mode: int, noise: Tensor | None):
        if noise is None:
            y, index = gumbel_softmax_forward(logits, seed, mask, tau_t, tau, dim, mode)
        else:
            y, index = softmax_of_perturbed_(perturb(logits, noise, mask), logits.dtype, tau_t, tau, dim, mode)
        if mode != HARD:
            return y
        return torch.zeros_like(y).scatter_(dim, index, 1.0), y

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, tau_t, tau, _, _, dim, mode, _ = inputs
        y = output[1] if mode == HARD else output
        ctx.tau, ctx.dim, ctx.mode = tau, dim, mode
        ctx.save_for_backward(y, tau_t)
        ctx.save_for_forward(y, tau_t)
        if mode == HARD:
            ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        y, tau_t = ctx.saved_tensors
        present = [g for g in grads if g is not None]  # hard: the one-hot's gradient goes to y
        if not present:
            return (None,) * 8
        cdtype = compute_dtype(y.dtype)
        grad = present[0].to(cdtype) if len(present) == 1 else present[0].to(cdtype) + present[1].to(cdtype)
        yc = y.to(cdtype)
        dim = ctx.dim
        # in place where no graph is being built (create_graph=False): two passes fewer
        inplace = not torch.is_grad_enabled()
        fused = _fused_backward(yc, grad, tau_t, ctx) if inplace and ctx.needs_input_grad[0] else None
        if fused is not None:
            return fused.to(y.dtype), None, None, None, None, None, None, None
        if ctx.mode == LOG:
            p = torch.exp(yc)
            w = grad - p * grad.sum(dim, keepdim=True)
            w = torch.where(torch.isinf(yc), torch.zeros_like(w), w)
        elif inplace:
            w = grad * yc
            w = w.addcmul_(yc, w.sum(dim, keepdim=True), value=-1.0)
        else:
            w = yc * (grad - (grad * yc).sum(dim, keepdim=True))
        tau = ctx.tau if tau_t is None else tau_t.to(cdtype)
        grad_logits = grad_tau = None
        if ctx.needs_input_grad[0]:
            if tau_t is None and tau == 1.0:
                grad_logits = w.to(y.dtype)
            elif inplace and not (tau_t is not None and ctx.needs_input_grad[1]):
                grad_logits = w.div_(tau).to(y.dtype)
            else:
                grad_logits = (w / tau).to(y.dtype)
        if tau_t is not None and ctx.needs_input_grad[1]:
            g = -_times_log_y(w, _log_y(yc, ctx.mode)).sum(dim, keepdim=True) / tau
            grad_tau = g.sum_to_size(tau_t.shape).to(tau_t.dtype)
        return grad_logits, grad_tau, None, None, None, None, None, None



class _GumbelSoftmaxForwardAD(GumbelSoftmaxFunction):
    """:class:`GumbelSoftmaxFunction` with forward-mode AD (used only while forward AD is active:
    dynamo cannot trace a custom ``jvp`` under ``fullgraph=True``)."""

    @staticmethod
    def jvp(ctx, dlogits: Tensor | None, dtau: Tensor | None, *_):
        y, tau_t = ctx.saved_tensors
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        log_y = _log_y(yc, ctx.mode)
        dz = torch.zeros_like(yc) if dlogits is None else dlogits.to(cdtype)
        if dtau is not None:
            dz = dz - _times_log_y(dtau.to(cdtype).expand_as(yc), log_y)
        dz = dz / (ctx.tau if tau_t is None else tau_t.to(cdtype))
        p = torch.exp(yc) if ctx.mode == LOG else yc
        centred = dz - (torch.where(p == 0, torch.zeros_like(dz), dz) * p).sum(ctx.dim, keepdim=True)
        if ctx.mode == LOG:
            dy = torch.where(torch.isinf(yc), torch.zeros_like(centred), centred)
        else:
            dy = torch.where(p == 0, torch.zeros_like(centred), p * centred)
        dy = dy.to(y.dtype)
        return (dy, dy) if ctx.mode == HARD else dy


def apply_gumbel_softmax(logits: Tensor, tau_t: Tensor | None, tau: float, seed: Tensor | None,
                         mask: Tensor | None, dim: int, mode: int, noise: Tensor | None):
    """``GumbelSoftmaxFunction.apply(...)``, or just its forward when nothing will be differentiated.

    While forward-mode AD is active (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``)
    the Function with a ``jvp`` is applied, never while dynamo traces (it cannot trace a custom
    ``jvp`` under ``fullgraph=True``). ``Function.apply`` costs about 50 us per call, as much as
    the whole forward on small inputs, so it is skipped when no gradient is recorded (grad mode
    off, or neither ``logits`` nor a tensor ``tau`` requires one) and forward-mode AD is off.
    Under ``vmap`` the forward alone batches through the operator's own vmap rule, as
    ``generate_vmap_rule`` does.
    """
    args = (logits, tau_t, tau, seed, mask, dim, mode, noise)
    if not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0:
        return _GumbelSoftmaxForwardAD.apply(*args)
    if torch.is_grad_enabled() and (logits.requires_grad or (tau_t is not None and tau_t.requires_grad)):
        return GumbelSoftmaxFunction.apply(*args)
    return GumbelSoftmaxFunction.forward(*args)


def gumbel_softmax_from_noise(logits: Tensor, tau: float | Tensor, noise: Tensor, mask: Tensor | None,
                              hard: bool, dim: int) -> Tensor:
    """Gumbel-Softmax of validated arguments on given Gumbel ``noise`` (not modified)."""
    tau_t = tau if isinstance(tau, Tensor) else None
    tau_f = 1.0 if tau_t is not None else float(tau)
    out = apply_gumbel_softmax(logits, tau_t, tau_f, None, mask, dim, HARD if hard else 0, noise)
    return out[0] if hard else out


# autograd.Function.apply binds its arguments with inspect.signature on every call (tens of
# microseconds); a precomputed __signature__ answers that lookup at once.
GumbelSoftmaxFunction.forward.__signature__ = inspect.signature(GumbelSoftmaxFunction.forward)

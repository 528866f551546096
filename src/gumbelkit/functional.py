"""The functional core: Gumbel-Max, Gumbel-top-k and the Gumbel-Softmax relaxation.

Every function here draws its noise as ``gumbel_noise_like(logits, generator=generator)``
(the noise contract, see :mod:`gumbelkit.noise`), computes half precision in float32, and
treats ``mask == False`` and ``logits == -inf`` alike: the category is impossible.
"""

from __future__ import annotations

import warnings

import torch

from ._kernels.gumbel_softmax import apply_gumbel_softmax
from ._kernels.ops import HARD, LOG, SOFT, draw_seed, gumbel_max_forward, gumbel_topk_op
from ._validation import check_generator, check_logits, check_mask, check_tau, normalize_dim

__all__ = ["gumbel_max", "gumbel_softmax", "gumbel_topk", "log_gumbel_softmax"]


def _prepare(logits: object, dim: object, generator: object, mask: object
             ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    logits = check_logits(logits)
    dim = normalize_dim(dim, logits.dim())
    check_generator(generator, logits.device)
    mask = check_mask(mask, logits)
    if logits.shape[dim] == 0:
        raise ValueError(f"logits have no categories along dim={dim} (shape {tuple(logits.shape)})")
    return logits, dim, mask


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float | torch.Tensor = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Sample from the Gumbel-Softmax (Concrete) distribution, optionally straight-through hard.

    .. math::
        y = \operatorname{softmax}\big((\mathrm{logits} + g) / \tau\big), \qquad
        g_i = -\log(-\log U_i),\; U_i \sim \mathcal U(0, 1)

    (Jang, Gu and Poole 2017; Maddison, Mnih and Teh 2017). As :math:`\tau \to 0` the
    sample tends to the one-hot of :math:`\arg\max(\mathrm{logits} + g)`, an exact draw from
    :math:`\operatorname{Categorical}(\operatorname{softmax}(\mathrm{logits}))`.
    With ``hard=True`` the forward value is that exact one-hot (of the argmax of ``y``) and
    the backward pass is the gradient of ``y`` (straight-through). The backward pass is the
    closed form :math:`\frac1\tau\, y \odot (G - \langle G, y\rangle)` for an upstream gradient
    :math:`G`; only ``y`` is saved.

    A drop-in replacement for :func:`torch.nn.functional.gumbel_softmax`, with its positional
    order ``(logits, tau, hard, eps, dim)``; ``eps`` is accepted and ignored, as there.

    Args:
        logits: unnormalized log-probabilities, any floating dtype; ``-inf`` = impossible.
        tau: temperature > 0, a float or a tensor broadcastable against ``logits`` with size 1
            along ``dim`` (one temperature per distribution); differentiable when a tensor.
        hard: return exact one-hot samples with straight-through gradients.
        dim: the category dimension.
        generator: the random source (same state, bit-identical result).
        mask: bool tensor broadcastable to ``logits``, True = allowed. Masked categories get
            probability exactly 0 and are never chosen.
        eps: ignored (deprecated in torch as well; the noise is never infinite here).

    Returns:
        A tensor like ``logits``: the relaxed sample on the simplex, or a one-hot if ``hard``.

    Example:
        >>> logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> y = gumbel_softmax(logits, tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
        >>> y.sum().item(), sorted(y.flatten().tolist())
        (1.0, [0.0, 0.0, 1.0])
        >>> (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # straight-through gradient
        >>> logits.grad.shape
        torch.Size([1, 3])
    """
    if isinstance(eps, int):  # an int here is a dim passed in eps's place, not an epsilon
        raise TypeError(f"eps must be a float, got the int {eps!r}; the 4th positional argument is eps, as in "
                        "torch.nn.functional.gumbel_softmax: pass the category dimension as dim=...")
    if eps != 1e-10:
        warnings.warn("gumbel_softmax: `eps` has no effect (the noise is never infinite)", stacklevel=2)
    logits, dim, mask = _prepare(logits, dim, generator, mask)
    tau_t, tau_f = _split_tau(check_tau(tau, logits, dim))
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    seed = draw_seed(generator, logits.device)
    out = apply_gumbel_softmax(logits, tau_t, tau_f, seed, mask, dim, HARD if hard else SOFT, None)
    return out[0] if hard else out


def _split_tau(tau: float | torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """``(tensor tau or None, float tau)``: the operator takes a float or a tensor temperature."""
    return (tau, 1.0) if isinstance(tau, torch.Tensor) else (None, tau)


def log_gumbel_softmax(
    logits: torch.Tensor,
    tau: float | torch.Tensor = 1.0,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The log of a Gumbel-Softmax sample, computed in log space.

    .. math::
        \log y = \operatorname{log\_softmax}\big((\mathrm{logits} + g) / \tau\big)

    i.e. a draw from the ExpConcrete distribution (Maddison et al. 2017, appendix C). It stays
    finite where ``gumbel_softmax`` underflows to exact zeros at small ``tau``; masked or
    ``-inf`` categories give ``-inf``. Differentiable in ``logits`` and a tensor ``tau``.
    In float16/bfloat16 (computed in float32) a log-probability below the dtype's lowest
    finite value saturates at it.

    Example:
        >>> logits = torch.tensor([0.0, -50.0, 50.0])
        >>> lg = log_gumbel_softmax(logits, tau=0.01, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.isfinite(lg).all()), torch.logsumexp(lg, 0).abs().item() < 1e-6
        (True, True)
    """
    logits, dim, mask = _prepare(logits, dim, generator, mask)
    tau_t, tau_f = _split_tau(check_tau(tau, logits, dim))
    seed = draw_seed(generator, logits.device)
    return apply_gumbel_softmax(logits, tau_t, tau_f, seed, mask, dim, LOG, None)


def gumbel_max(
    logits: torch.Tensor,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    keepdim: bool = False,
) -> torch.Tensor:
    r"""Sample category indices with the Gumbel-Max trick.

    .. math::
        i = \arg\max_j\,(\mathrm{logits}_j + g_j) \;\sim\;
        \operatorname{Categorical}(\operatorname{softmax}(\mathrm{logits}))

    exactly (Gumbel 1954; Maddison, Tarlow and Minka 2014). Not differentiable.

    Returns:
        int64 indices with ``dim`` removed (kept with size 1 if ``keepdim``).

    Example:
        >>> logits = torch.log(torch.tensor([0.1, 0.2, 0.7]))
        >>> idx = gumbel_max(logits.expand(10_000, 3), generator=torch.Generator().manual_seed(0))
        >>> [round(c / 10_000, 1) for c in torch.bincount(idx, minlength=3).tolist()]
        [0.1, 0.2, 0.7]
    """
    logits, dim, mask = _prepare(logits, dim, generator, mask)
    indices = gumbel_max_forward(logits.detach(), draw_seed(generator, logits.device), mask, dim)
    return indices if keepdim else indices.squeeze(dim)


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.return_types.topk:
    r"""Sample ``k`` distinct categories without replacement with the Gumbel-top-k trick.

    .. math::
        (i_1, \dots, i_k) = \operatorname{top}_k\,(\mathrm{logits} + g)

    is an ordered draw from the Plackett-Luce distribution: :math:`i_1` is drawn from
    softmax(logits), :math:`i_2` from the renormalized rest, and so on (Yellott 1977;
    Vieira 2014; Kool, van Hoof and Welling 2019).

    Returns:
        ``(values, indices)`` like :func:`torch.topk`: the perturbed scores (in the dtype of
        ``logits``) and the sampled indices, in sampling order.

    Example:
        >>> out = gumbel_topk(torch.zeros(5), 3, generator=torch.Generator().manual_seed(0))
        >>> len(set(out.indices.tolist())), bool((out.values[:-1] >= out.values[1:]).all())
        (3, True)
    """
    logits, dim, mask = _prepare(logits, dim, generator, mask)
    n = logits.shape[dim]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of categories {n} along dim={dim}")
    values, indices = gumbel_topk_op(logits.detach(), draw_seed(generator, logits.device), mask, k, dim)
    return torch.return_types.topk((values, indices))

r"""Structured relaxations: relaxed top-k subsets and relaxed permutations.

- :func:`relaxed_topk`: a relaxed k-hot sample of a subset of size ``k`` (Xie and Ermon 2019),
  with a straight-through hard option whose forward value is an exact Gumbel-top-k subset.
- :func:`gumbel_sinkhorn`: a relaxed permutation matrix, Sinkhorn normalization of perturbed
  scores in log space (Mena, Belanger, Linderman and Snoek 2018).
- :func:`matching`: the best permutation for a score matrix, exact (SciPy's
  ``linear_sum_assignment``; ``pip install 'gumbelkit[scipy]'``).

Every sampler draws its noise as ``gumbel_noise_like(scores, generator=generator)`` (the noise
contract of :mod:`gumbelkit.noise`), computes half precision in float32 and shifts scores by
their row maximum before dividing by a temperature, so no ``x / tau`` overflows. The functions
are plain differentiable torch ops (so torch.func, vmap, compile and forward-mode AD see through
them); the data-dependent checks run in one registered operator, :func:`_check` (and the
assignment solver is one too), so they raise the same ``ValueError`` under compile and vmap.
"""

from __future__ import annotations

import warnings
from numbers import Real
from typing import Any

import torch
from torch.library import custom_op

from ._kernels.estimators import upcast
from ._validation import (
    check_generator,
    check_logits,
    check_rows,
    check_tau,
    compute_dtype,
    normalize_dim,
)
from .noise import gumbel_noise_like

__all__ = ["gumbel_sinkhorn", "matching", "relaxed_topk"]

_NEG_INF = float("-inf")
MATCHING_METHODS = ("auto", "hungarian")
SCIPY_HINT = "pip install 'gumbelkit[scipy]'"


# ----------------------------------------------------------------------------- data checks (one op)

def _reduced(x: torch.Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = 1
    return shape


@custom_op("gumbelkit::structured_check", mutates_args=())
def _check(x: torch.Tensor, dim: int, k: int, columns: bool) -> torch.Tensor:
    """The row maximum of ``x`` along ``dim`` (keepdim, compute dtype) after the data checks.

    Raises ``ValueError`` for a NaN, a ``+inf``, a row with fewer than ``k`` finite entries or,
    with ``columns`` (square matrices, ``dim = -1``), a column with no finite entry. The one
    data-dependent validation of this module, registered as an operator so that it raises under
    ``torch.compile`` (without a graph break) and ``vmap`` as in eager mode.
    """
    m = x.amax(dim, keepdim=True) if x.numel() else x.new_zeros(_reduced(x, dim))
    check_rows(m, x, None, dim)
    if k > 1 and x.numel() and bool(((x > _NEG_INF).sum(dim) < k).any()):
        raise ValueError(f"k={k} is larger than the number of categories with finite logits in some "
                         "row; lower k or give more categories finite logits")
    if columns and x.numel() and not bool(torch.isfinite(x.amax(-2)).all()):
        raise ValueError("some column of log_alpha has no finite entry; every row and every column "
                         "needs at least one finite score")
    return m.to(compute_dtype(x.dtype))


@_check.register_fake
def _check_fake(x: torch.Tensor, dim: int, k: int, columns: bool) -> torch.Tensor:
    return x.new_empty(_reduced(x, dim), dtype=compute_dtype(x.dtype))


def _check_vmap(info: Any, in_dims: tuple, x: torch.Tensor, dim: int, k: int,
                columns: bool) -> tuple[torch.Tensor, int]:
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
    return _check(x, dim % (x.dim() - 1) + 1, k, columns), 0


_check.register_vmap(_check_vmap)


def _clamp_scaled(z: torch.Tensor, impossible: torch.Tensor) -> torch.Tensor:
    """Scaled scores ``z`` with finite-score entries floored at the dtype's lowest finite value.

    ``(x - max) / tau`` can overflow to ``-inf`` for a finite ``x`` (a gap of 1e30 at tau 1e-9);
    such an entry has probability 0 either way, but a ``-inf`` left in a log-sum-exp whose other
    entries are ``-inf`` too gives NaN gradients. Impossible (``-inf``) scores stay ``-inf``.
    """
    floored = z.clamp(min=torch.finfo(z.dtype).min)
    return floored.masked_fill(impossible, _NEG_INF)


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} must be {bounds}")
    return value


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass, the derivative of ``soft`` in backward and forward mode.

    Always written out (not skipped when ``soft.requires_grad`` is False): forward-mode AD and
    torch.func carry tangents on tensors that do not require grad.
    """
    return hard + (soft - soft.detach())


def _scale(x: torch.Tensor, tau: float | torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``(x - max x) / tau``: shifted to a maximum of 0 along ``dim`` first, so the division cannot
    overflow upward; ``-inf`` entries stay ``-inf`` with a zero (not NaN) gradient for ``tau``."""
    gone = torch.isneginf(x.detach())
    x = x - x.detach().amax(dim, keepdim=True)
    if isinstance(tau, torch.Tensor):
        tau = tau.to(x.dtype)
        if tau.requires_grad:
            x = x.masked_fill(gone, 0.0)
    elif tau == 1.0:
        return _clamp_scaled(x, gone)
    return _clamp_scaled(x / tau, gone)


def _log1m_softmax(z: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``log a`` and ``log(1 - a)`` for ``a = softmax(z)``, both accurate.

    ``log1p(-a)`` loses everything when ``a`` rounds to 1; only the largest entry can be
    above 1/2, so its ``log(1 - a)`` is computed as the logsumexp of the others instead.
    """
    lse = z.logsumexp(dim, keepdim=True)
    log_a = z - lse
    top = z.detach().argmax(dim, keepdim=True)
    # others: the top entry at the dtype's lowest value, not -inf (a row of -inf has a NaN
    # logsumexp gradient); its contribution exp(lowest) is exactly 0
    lowest = torch.finfo(z.dtype).min
    others = z.scatter(dim, top, torch.full_like(top, lowest, dtype=z.dtype))
    log_rest_top = (others.logsumexp(dim, keepdim=True) - lse).clamp(min=lowest)
    # the top entry is set to -inf before log1p (its value is replaced below), so neither the
    # value nor the gradient of log1p(-1) is ever formed
    log1m = torch.log1p(-log_a.scatter(dim, top, torch.full_like(top, _NEG_INF, dtype=z.dtype)).exp())
    return log_a, log1m.scatter(dim, top, log_rest_top)


def relaxed_topk(
    logits: torch.Tensor,
    k: int,
    tau: float | torch.Tensor = 1.0,
    hard: bool = False,
    *,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A relaxed k-hot sample: a differentiable relaxation of a random subset of size ``k``.

    The relaxed subset sampler of Xie and Ermon (2019), "Reparameterizable Subset Sampling via
    Continuous Relaxations": with :math:`\alpha^1 = \mathrm{logits} + g`,
    :math:`g_i \sim \operatorname{Gumbel}(0, 1)`,

    .. math::
        a^j = \operatorname{softmax}(\alpha^j / \tau), \qquad
        \alpha^{j+1} = \alpha^j + \log(1 - a^j), \qquad
        y = \sum_{j=1}^k a^j,

    so :math:`y \ge 0` with :math:`\sum_i y_i = k`, and :math:`y` tends to the k-hot vector of
    :math:`\operatorname{top}_k(\mathrm{logits} + g)` as :math:`\tau \to 0`: that subset is
    an exact draw of ``k`` items without replacement (Plackett-Luce, see
    :func:`gumbelkit.gumbel_topk`). At moderate temperatures an entry can exceed 1 (with
    ``n = k = 2`` and ``tau = 1``, :math:`y = (p + 1/2, 3/2 - p)`), as in the paper's
    algorithm. :math:`\log(1 - a)` is computed without cancellation (the paper's code floors
    :math:`1 - a` at a tiny constant instead). With ``hard=True`` the forward value is that
    exact k-hot vector (the top-k of the perturbed scores, which can differ from the top-k of
    :math:`y` near ties) and the gradient is the gradient of :math:`y` (straight-through).

    Args:
        logits: unnormalized log-probabilities; ``-inf`` = never chosen.
        k: the subset size, at most the number of categories with finite logits.
        tau: temperature > 0, a float or a tensor broadcastable against ``logits`` with size 1
            along ``dim``; differentiable when a tensor.
        hard: return the exact k-hot sample with straight-through gradients.
        dim: the category dimension.
        generator: the random source (same state, bit-identical result).

    Returns:
        A tensor like ``logits`` (same shape and dtype), nonnegative, whose entries along ``dim``
        sum to ``k`` (within the dtype's rounding), at any scale: the scores are shifted by their
        row maximum before the division by ``tau`` (five equal logits of 1e8 with ``k = 2`` sum
        to 2), and half precision is computed in float32.

    Raises:
        TypeError: ``logits`` not a floating tensor, ``k`` not an int, ``hard`` not a bool.
        ValueError: ``k`` outside ``[1, n]``, a bad ``tau``, or (checked on the data) a NaN, a
            ``+inf`` or a row with fewer than ``k`` finite logits.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]], requires_grad=True)
        >>> y = relaxed_topk(logits, 2, tau=0.5, generator=torch.Generator().manual_seed(0))
        >>> round(y.sum().item(), 4), bool((y >= 0).all())
        (2.0, True)
        >>> h = relaxed_topk(logits, 2, tau=0.5, hard=True, generator=torch.Generator().manual_seed(0))
        >>> h.sum().item(), sorted(set(h.flatten().tolist()))  # an exact 2-subset; the gradient is y's
        (2.0, [0.0, 1.0])
    """
    logits = check_logits(logits)
    dim = normalize_dim(dim, logits.dim())
    check_generator(generator, logits.device)
    k = _check_int(k, "k", 1, logits.shape[dim])
    tau = check_tau(tau, logits, dim)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    shift = _check(logits.detach(), dim, k, False)
    noise = gumbel_noise_like(logits, generator=generator).to(shift.dtype)
    # shifted first: logits of 1e8 keep their O(1) differences and the Gumbel noise
    alpha = (upcast(logits) - shift) + noise
    # the hard subset is the top-k of the perturbed scores: the exact Gumbel-top-k draw
    top = alpha.detach().topk(k, dim).indices if hard else None
    soft = torch.zeros_like(alpha)
    for j in range(k):
        log_a, log1m = _log1m_softmax(_scale(alpha, tau, dim), dim)
        soft = soft + log_a.exp()
        if j + 1 < k:  # the last update is never used
            alpha = alpha + log1m
    if top is not None:
        hard_k = torch.zeros_like(soft).scatter(dim, top, torch.ones_like(top, dtype=soft.dtype))
        soft = _straight_through(hard_k, soft)
    return soft.to(logits.dtype)


def _check_square(x: object, name: str) -> torch.Tensor:
    x = check_logits(x, name)
    if x.dim() < 2 or x.shape[-1] != x.shape[-2] or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., n, n) with n >= 1, got {tuple(x.shape)}")
    return x


def _normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x - logsumexp(x, dim)``, computed as ``z - log(sum(exp(z)))`` with ``z = x - max(x)``.

    ``x - logsumexp(x)`` directly loses ``|x|`` ulps: at scores near 1.6e4 the float32 logsumexp
    is off by 1e-3, and every entry of the line with it (a column summing to 0.999).
    Subtracting the maximum, an entry of ``x``, is exact; what is left is small.
    """
    z = x - x.detach().amax(dim, keepdim=True)
    return z - z.logsumexp(dim, keepdim=True)


def gumbel_sinkhorn(
    log_alpha: torch.Tensor,
    tau: float | torch.Tensor = 1.0,
    n_iters: int = 20,
    *,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    noise: bool = True,
    hard: bool = False,
) -> torch.Tensor:
    r"""A relaxed random permutation matrix: Sinkhorn normalization of Gumbel-perturbed scores.

    The Gumbel-Sinkhorn operator of Mena, Belanger, Linderman and Snoek (2018), "Learning
    Latent Permutations with Gumbel-Sinkhorn Networks": with :math:`X = (\log\alpha + G)/\tau`,
    :math:`G_{ij} \sim \operatorname{Gumbel}(0, 1)` (omitted when ``noise=False``), repeat
    ``n_iters`` times, in log space,

    .. math::
        X \leftarrow X - \operatorname{logsumexp}_{\text{cols}}(X), \qquad
        X \leftarrow X - \operatorname{logsumexp}_{\text{rows}}(X),

    and return :math:`S(X) = \exp(X)`: columns sum to 1 exactly, rows converge to 1
    (Sinkhorn 1964). Convergence slows as ``tau`` falls (at ``tau = 0.1`` some 5 x 5 matrices
    need thousands of iterations for rows within 1e-4): pass ``tol`` to iterate until every
    row sum is within ``tol`` of 1, with ``n_iters`` as the cap (a ``RuntimeWarning`` says
    when the cap was reached first). As :math:`\tau \to 0`, :math:`S((\log\alpha + G)/\tau)`
    tends to the permutation matrix of :math:`M(\log\alpha + G) = \arg\max_P
    \langle P, \log\alpha + G \rangle`, the Gumbel-matching sample; ``hard=True`` returns that
    exact permutation matrix (found by :func:`matching`) with the gradient of the soft one
    (straight-through).

    Args:
        log_alpha: scores of shape ``(..., n, n)``; ``-inf`` forbids an assignment.
        tau: temperature > 0, a float or a tensor broadcastable against ``log_alpha`` with
            size 1 in the last two dimensions (one per matrix).
        n_iters: Sinkhorn iterations (>= 1), or the most iterations when ``tol`` is given.
        tol: stop once every row sums to 1 within ``tol`` (checked every 10 iterations);
            ``None`` (default) runs exactly ``n_iters`` iterations, as Mena et al. do. The
            stopping test reads the data (a host sync, a graph break under ``torch.compile``,
            refused under ``vmap``): leave ``tol=None`` in compiled or vmapped code.
        generator: the random source (same state, bit-identical result).
        noise: add Gumbel noise (``False``: the deterministic Sinkhorn operator).
        hard: return the exact permutation matrix with straight-through gradients.

    Returns:
        A doubly stochastic (or, with ``hard``, permutation) matrix like ``log_alpha`` (same shape
        and dtype; computed in float32 for half precision, each line normalized after a shift by
        its maximum, so scores up to 1e30 and tau down to 1e-6 stay finite).

    Raises:
        ImportError: ``hard=True`` without SciPy (``pip install 'gumbelkit[scipy]'``).
        ValueError: a NaN or ``+inf`` score, a row or column with no finite score, bad
            ``tau``/``n_iters``/``tol``, or with ``hard=True`` no permutation avoiding the
            ``-inf`` entries.

    Example:
        >>> log_alpha = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
        >>> p = gumbel_sinkhorn(log_alpha, 1.0, 50, generator=torch.Generator().manual_seed(0))
        >>> ones = torch.ones(2, 4)
        >>> torch.allclose(p.sum(-1), ones, atol=1e-4), torch.allclose(p.sum(-2), ones, atol=1e-4)
        (True, True)
        >>> h = gumbel_sinkhorn(log_alpha, 0.1, hard=True, generator=torch.Generator().manual_seed(0))
        >>> h.sum(-1).tolist(), h.sum(-2).tolist()  # exact permutation matrices
        ([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    """
    log_alpha = _check_square(log_alpha, "log_alpha")
    if hard:
        _require_scipy()
    check_generator(generator, log_alpha.device)
    last = log_alpha.dim() - 1
    tau = check_tau(tau, log_alpha, last)
    if isinstance(tau, torch.Tensor) and tau.dim() >= 2 and tau.shape[-2] != 1:
        raise ValueError(f"tau of shape {tuple(tau.shape)} varies inside a matrix; use one temperature "
                         "per matrix (size 1 in the last two dimensions)")
    n_iters = _check_int(n_iters, "n_iters", 1)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, Real) or not tol > 0):
        raise ValueError(f"tol must be a positive float or None, got {tol!r}")
    for name, flag in (("noise", noise), ("hard", hard)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    shift = _check(log_alpha.detach(), last, 1, True)
    x = upcast(log_alpha) - shift  # row maxima at 0: 1e30 scores keep their noise
    if noise:
        x = x + gumbel_noise_like(log_alpha, generator=generator).to(x.dtype)
    perm = _assignment(x.detach()) if hard else None
    x = _scale(x, tau, (-2, -1))
    for it in range(1, n_iters + 1):
        x = _normalize(_normalize(x, -1), -2)
        if tol is not None and (it % 10 == 0 or it == n_iters):
            err = float((x.detach().exp().sum(-1) - 1).abs().amax()) if x.numel() else 0.0
            if err <= tol:
                break
    else:
        if tol is not None:
            warnings.warn(f"gumbel_sinkhorn: after n_iters={n_iters} iterations the rows sum to 1 only "
                          f"within {err:.2g} > tol={tol}; raise n_iters (or tau)", RuntimeWarning,
                          stacklevel=2)
    soft = x.exp()
    if perm is not None:
        index = perm.unsqueeze(-1)
        onehot = torch.zeros_like(soft).scatter(-1, index, torch.ones_like(index, dtype=soft.dtype))
        soft = _straight_through(onehot, soft)
    return soft.to(log_alpha.dtype)


def _require_scipy() -> None:
    """Fail early, before any work, when SciPy (the exact assignment solver) is missing."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise ImportError("matching and gumbel_sinkhorn(hard=True) need SciPy's exact assignment "
                          f"solver: {SCIPY_HINT}") from None


@custom_op("gumbelkit::linear_sum_assignment", mutates_args=())
def _assignment(scores: torch.Tensor) -> torch.Tensor:
    """For each ``(n, n)`` matrix, the permutation maximizing the total score (int64 ``(..., n)``).

    SciPy's ``linear_sum_assignment`` (Crouse 2016) in float64, on the CPU. Raises ``ValueError``
    for NaN or ``+inf`` scores and when no permutation avoids the ``-inf`` (forbidden) entries.
    A registered operator, so it runs under compile (no graph break) and vmap.
    """
    _require_scipy()
    from scipy.optimize import linear_sum_assignment

    if scores.numel() and bool(torch.isnan(scores).any() | torch.isposinf(scores).any()):
        raise ValueError("scores contain NaN or +inf; use finite scores (-inf forbids an assignment)")
    n = scores.shape[-1]
    mats = scores.detach().to("cpu", torch.float64).reshape(-1, n, n).numpy()
    perm = torch.empty(mats.shape[0], n, dtype=torch.long)
    for b, m in enumerate(mats):
        try:
            rows, cols = linear_sum_assignment(m, maximize=True)
        except ValueError:
            where = f" (matrix {b} of the batch)" if mats.shape[0] > 1 else ""
            raise ValueError(f"no permutation avoids the -inf (forbidden) entries{where}: every "
                             "assignment uses one; allow more entries") from None
        perm[b, torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.reshape(scores.shape[:-1]).to(scores.device)


@_assignment.register_fake
def _assignment_fake(scores: torch.Tensor) -> torch.Tensor:
    return scores.new_empty(scores.shape[:-1], dtype=torch.long)


def _assignment_vmap(info: Any, in_dims: tuple, scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    d = in_dims[0]
    scores = scores.movedim(d, 0) if d is not None else scores.expand(info.batch_size, *scores.shape)
    return _assignment(scores), 0


_assignment.register_vmap(_assignment_vmap)


def matching(scores: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    r"""The permutation that maximizes the total score: :math:`\arg\max_\sigma \sum_i
    \mathrm{scores}_{i, \sigma(i)}` (the matching operator :math:`M` of Mena et al. 2018).

    Solved exactly, always: the linear assignment problem by SciPy's
    :func:`scipy.optimize.linear_sum_assignment` (Kuhn 1955; Crouse 2016), an optional
    dependency (``pip install 'gumbelkit[scipy]'``; without it an ``ImportError`` says so before
    any work). A greedy approximation would be faster to write but silently wrong: it can pick
    forbidden entries when a feasible permutation exists. Not differentiable (use
    :func:`gumbel_sinkhorn` with ``hard=True`` for gradients).

    Args:
        scores: a batch of square score matrices ``(..., n, n)``, any floating dtype;
            ``-inf`` forbids an assignment.
        method: ``"auto"`` or ``"hungarian"`` (the same exact solver).

    Returns:
        int64 ``(..., n)``: ``perm[..., i]`` is the column assigned to row ``i``. Its permutation
        matrix is ``torch.nn.functional.one_hot(perm, n)``.

    Raises:
        ImportError: SciPy is not installed.
        ValueError: NaN or ``+inf`` scores, or no permutation avoids the ``-inf`` entries.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.7, 0.0], [0.0, 0.2, 0.5]])
        >>> matching(scores).tolist()
        [1, 0, 2]
        >>> inf = float("inf")  # row 0 may only use column 1, row 1 columns 0 or 1
        >>> matching(torch.tensor([[-inf, 0.0, -inf], [9.0, 5.0, -inf], [1.0, 1.0, 1.0]])).tolist()
        [1, 0, 2]
    """
    scores = _check_square(scores, "scores")
    if method not in MATCHING_METHODS:
        raise ValueError(f"method must be one of {MATCHING_METHODS}, got {method!r} (the greedy "
                         "method was removed: it could return forbidden assignments)")
    _require_scipy()
    return _assignment(scores.detach())

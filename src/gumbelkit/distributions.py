r"""Relaxed distributions with exact, log-space densities, as ``torch.distributions`` classes.

- :class:`ExpConcrete` and :class:`Concrete` (alias ``RelaxedOneHotCategorical``): the relaxed
  one-hot of Maddison, Mnih and Teh (2017) and Jang, Gu and Poole (2017), in log space and on
  the simplex.
- :class:`BinaryConcrete` (alias ``RelaxedBernoulli``): the two-category case on (0, 1),
  parameterized by logits.
- :class:`HardConcrete`: the stretched and clipped Binary Concrete of Louizos, Welling and
  Kingma (2018) for L0 gates, with point masses at 0 and 1.
- :class:`PlackettLuce` (alias ``GumbelTopK``): ordered samples without replacement.

Every sampler draws its noise through :mod:`gumbelkit.noise` (the noise contract) and takes a
``generator=``; densities are computed in log space (float32 for half precision), so they stay
finite at small temperatures, for many categories and for samples that rounded onto the
boundary of the support. Temperatures are batch parameters and broadcast against the batch
shape of the logits, so one distribution object can hold a grid of temperatures.

Conventions shared by every class:

- **Exact densities.** ``log_prob`` reads every nonzero value exactly, subnormals included
  (nothing is clamped to ``finfo.tiny``). A value exactly on the boundary where the density
  is 0 or infinite (a Concrete coordinate of exactly 0, a Binary Concrete value of exactly 0
  or 1, the usual result of underflow) is read as the nearest interior float of the value's
  dtype: the smallest positive float (``finfo.tiny * finfo.eps``), or ``1 - eps/2``.
- **Result dtype.** ``log_prob`` returns the compute dtype of the value and the parameters:
  float32 for half precision (the log-density of a float16 Concrete with ``K = 2000`` exceeds
  float16's range), otherwise the promoted dtype.
- **Support checks** are calibrated to the rounding a genuine sample can have in its dtype
  (:func:`_simplex_tolerance`), so they reject points off the support in every precision.
- **validate_args** follows torch: ``True``/``False`` as given, ``None`` for the default of
  :meth:`torch.distributions.Distribution.set_default_validate_args` (on unless Python runs
  with ``-O``). torch re-reads that class attribute at every call, and ``torch.compile`` sets
  it to ``False`` for the rest of the process when it first runs; here the decision is taken
  once, at construction, and a ``False`` written by ``torch.compile`` is not mistaken for the
  user's (see :func:`set_default_validate_args`).
- **Checks inside an operator.** Every check that reads tensor data (parameter values, the
  support of ``log_prob``/``cdf`` values, ``icdf`` probabilities) runs inside one registered
  operator, ``torch.ops.gumbelkit.check`` (:mod:`gumbelkit._kernels.checks`), whose result
  (a 0-d zero) is added to the checked parameter or to the result. So with validation on,
  the default, the distributions work under ``torch.compile`` (``fullgraph=True`` too),
  ``torch.export``, ``torch.func`` (``vmap`` checks every batch element) and with meta and
  fake tensors, and a bad value raises the same ``ValueError`` eagerly, from a compiled
  graph and from an exported program.
"""

from __future__ import annotations

import itertools
import math
import sys
from numbers import Real
from typing import ClassVar

import torch
from torch.distributions import Distribution, constraints, register_kl
from torch.types import _size

from ._kernels.checks import check as _check_op
from ._kernels.checks import register_check
from ._validation import check_logits, compute_dtype
from .functional import gumbel_topk, log_gumbel_softmax
from .noise import gumbel_noise

__all__ = [
    "BinaryConcrete",
    "Concrete",
    "ExpConcrete",
    "ExpRelaxedCategorical",
    "GumbelTopK",
    "HardConcrete",
    "PlackettLuce",
    "RelaxedBernoulli",
    "RelaxedOneHotCategorical",
    "kl_monte_carlo",
    "set_default_validate_args",
]

_NEG_INF = float("-inf")
_EMPTY = torch.Size()
MAX_UNORDERED_K = 8  # log_prob_unordered sums over k! orders: 8! = 40320 terms per value


# --- validation: the one place that reads tensor data ------------------------------------------


def _require(x: torch.Tensor, kind: str, context: str = "", n: int = 0,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """A 0-d zero of ``x``'s dtype, once the operator ``gumbelkit::check`` has checked ``x``.

    The only way this module reads tensor data for a check: the check ``kind`` (registered
    below with :func:`~gumbelkit._kernels.checks.register_check`) runs inside the operator,
    which raises ``ValueError`` with the check's message (built only on failure). Add the
    result to the checked parameter or to the returned value, so the check is never dropped
    as dead code; the operator sees ``x.detach()``, so gradients are unaffected.
    """
    return _check_op(x.detach(), kind, context, n, dtype, 0)


def _dynamo_flipped_default() -> bool:
    """Whether ``torch.compile`` has run ``TorchPatcher.patch``, which calls
    ``Distribution.set_default_validate_args(False)`` for the rest of the process."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    patch = getattr(getattr(eval_frame, "TorchPatcher", None), "patch", None)
    cache_info = getattr(patch, "cache_info", None)
    return cache_info is not None and cache_info().currsize > 0


# torch's documented default as last seen before torch.compile overwrote it (on, unless python -O)
_torch_default: bool = __debug__ if _dynamo_flipped_default() else bool(Distribution._validate_args)
_own_default: bool | None = None  # set_default_validate_args; None follows torch's switch


def set_default_validate_args(value: bool | None) -> None:
    """Set whether gumbelkit's distributions validate by default (``validate_args=None``).

    By default they follow torch's documented switch,
    :meth:`torch.distributions.Distribution.set_default_validate_args` (validation on unless
    Python runs with ``-O``), read when a distribution is constructed. ``torch.compile``
    calls that switch with ``False`` the first time it is used and never restores it, so after
    any ``torch.compile`` a ``False`` there cannot be told apart from the user's; gumbelkit then
    keeps the value torch's switch had before (a ``True`` set later is still honoured). This
    function is the unambiguous switch: ``True``/``False`` for every gumbelkit distribution
    constructed afterwards, ``None`` to follow torch's switch again. An explicit
    ``validate_args=`` always wins.

    Example:
        >>> import gumbelkit.distributions as gkd
        >>> gkd.set_default_validate_args(False)
        >>> gkd.Concrete(1.0, logits=torch.zeros(3))._validate_args
        False
        >>> gkd.set_default_validate_args(None)
        >>> gkd.Concrete(1.0, logits=torch.zeros(3))._validate_args == __debug__
        True
    """
    global _own_default
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"value must be True, False or None, got {value!r}")
    _own_default = value


def _default_validate_args() -> bool:
    """The default decision, honest under ``torch.compile`` (see :func:`set_default_validate_args`)."""
    global _torch_default
    if _own_default is not None:
        return _own_default
    if torch.compiler.is_compiling():  # no bookkeeping while tracing: a constant to dynamo
        return _torch_default
    current = bool(Distribution._validate_args)
    if current or not _dynamo_flipped_default():
        _torch_default = current
        return current
    return _torch_default


def _validating(validate_args: bool | None) -> bool:
    """torch's rule (``None`` means the default), decided once, at construction."""
    return _default_validate_args() if validate_args is None else bool(validate_args)


# --- exact logarithms of stored values ----------------------------------------------------------

def _log_value(v: torch.Tensor) -> torch.Tensor:
    """``log(v)`` for ``v >= 0``, exact for subnormal ``v`` too (``-inf`` at 0, NaN below 0).

    ``log(c) + log(v / c)`` with ``c = max(v, tiny)``: a normal ``v`` gives ``log(v) + log(1)``
    exactly; a subnormal one ``log(tiny) + log(v / tiny)``, where the division by a power of two
    is exact and lands in the normal range, so a ``log`` that flushes subnormal inputs cannot
    clamp it. Elementwise arithmetic only (no data-dependent mask), the gradient is ``1/v``.
    """
    c = v.clamp_min(torch.finfo(v.dtype).tiny)
    return c.log() + (v / c).log()


def _smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive float of ``dtype``: where an exact 0 is read."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def _coarsest_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


# --- constraints -------------------------------------------------------------------------------


class _PositiveFinite(constraints.Constraint):
    def check(self, value: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(value) & (value > 0)

    def __repr__(self) -> str:
        return "PositiveFinite(> 0 and finite)"


class _Finite(constraints.Constraint):
    def check(self, value: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(value)

    def __repr__(self) -> str:
        return "Finite(probs of exactly 0 or 1 give infinite logits; use finite logits)"


class _LogitsVector(constraints.Constraint):
    """No NaN, no +inf, at least one finite entry; ``-inf`` marks an impossible category."""

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        ok = ~(torch.isnan(value) | torch.isposinf(value))
        return ok.all(-1) & (value > _NEG_INF).any(-1)

    def __repr__(self) -> str:
        return "LogitsVector(finite or -inf = impossible, at least one finite entry per row)"


_TORCH_SIMPLEX_TOL = 1e-6  # torch.distributions.constraints.simplex


def _coarsest(*dtypes: torch.dtype) -> tuple[float, float, float, float]:
    """``(eps, smallest subnormal, tiny, compute eps)`` of the coarsest of ``dtypes``."""
    infos = [torch.finfo(d) for d in dtypes]
    return (max(f.eps for f in infos), max(f.tiny * f.eps for f in infos), max(f.tiny for f in infos),
            max(torch.finfo(compute_dtype(d)).eps for d in dtypes))


def _simplex_tolerance(v: torch.Tensor, log_v: torch.Tensor, dtypes: tuple[torch.dtype, ...]
                       ) -> torch.Tensor:
    r"""How far from 1 the sum of a genuine sample ``v`` (``log_v = log v``) can be, per row.

    A sample is computed in the compute dtype ``C`` (float32 for half, float32, float64) as
    ``exp(x)`` with ``x = log_softmax(z)`` and stored in the dtype ``D``, the coarsest of the
    value's and the distribution's dtypes:

    - storing ``x`` and ``v`` in ``D`` errs by at most ``eps_D/2 * |x_k|`` absolute and
      ``eps_D/2`` relative, and by half the subnormal spacing ``s_D`` below ``D``'s smallest
      normal ``t_D``: :math:`\tfrac{\epsilon_D}{2}\sum_k v_k(1 + |\log v_k|)
      + \tfrac{s_D}{2}\,\#\{k : v_k < t_D\}`;
    - computing them in ``C`` adds the same relative errors with :math:`\epsilon_C` (twice, for
      the sampler's ``log`` and ``exp``), plus the error of the sampler's sum of ``K``
      exponentials: a vectorized reduction with at least 8 sequential lanes errs by at most
      :math:`\tfrac{K}{8}\cdot\tfrac{\epsilon_C}{2}`, and this check's own sum by less than
      :math:`2\epsilon_C`.

    So the tolerance is :math:`(\tfrac{\epsilon_D}{2} + \epsilon_C)\sum_k v_k(1 + |\log v_k|)
    + \tfrac{s_D}{2}\#\{k : v_k < t_D\} + \epsilon_C (K/16 + 2)`, computed in ``C`` from the
    stored values, and never below torch's fixed ``1e-6`` (every point that torch's simplex
    accepts, e.g. a float32 sample cast to float64, passes here too). Genuine samples of
    :class:`Concrete`, :class:`ExpConcrete` and ``gumbel_softmax`` use at most 0.61 of it
    (measured for ``K = 2 ... 100000`` in every dtype, at temperatures 0.01 to 100, by
    tests/test_distributions_exact.py); points off the simplex by more than their own rounding
    are rejected: a float16 point of ``K = 1000`` summing to 1.9 (tolerance 6.8e-3), a float32
    point of ``K = 20000`` summing to 1.002 (tolerance 1.5e-4).
    """
    eps_d, sub_d, tiny_d, eps_c = _coarsest(v.dtype, *dtypes)
    k = v.shape[-1]
    # log_v finite (clamped) so that an entry of 0 weighs 0 * finite = 0
    weight = (v * (1 - log_v.clamp(torch.finfo(v.dtype).min, 0.0))).sum(-1)
    n_small = (v < tiny_d).sum(-1).to(v.dtype)
    tol = (eps_d / 2 + eps_c) * weight + (sub_d / 2) * n_small + eps_c * (k / 16 + 2)
    return tol.clamp_min(_TORCH_SIMPLEX_TOL)


class _Simplex(constraints.Constraint):
    """Entries ``>= 0`` summing to 1 up to the rounding a genuine sample can have (see
    :func:`_simplex_tolerance`); ``check(value, *dtypes)`` calibrates on the coarsest dtype."""

    event_dim = 1

    def check(self, value: torch.Tensor, *dtypes: torch.dtype) -> torch.Tensor:
        v = value.to(compute_dtype(_coarsest_dtype(value.dtype, *dtypes)))
        total = v.sum(-1)
        tol = _simplex_tolerance(v, _log_value(v), dtypes)
        return (v >= 0).all(-1) & ((total - 1).abs() <= tol)

    def __repr__(self) -> str:
        return "Simplex(entries >= 0 summing to 1 up to the rounding of a genuine sample)"


class _LogSimplex(constraints.Constraint):
    """``logsumexp(value) == 0`` and entries ``<= 0``, up to the rounding a genuine sample can have
    (the same bound as :class:`_Simplex`, applied to ``v = exp(value)``)."""

    event_dim = 1

    def check(self, value: torch.Tensor, *dtypes: torch.dtype) -> torch.Tensor:
        x = value.to(compute_dtype(_coarsest_dtype(value.dtype, *dtypes)))
        tol = _simplex_tolerance(x.exp(), x, dtypes)
        lse = x.logsumexp(-1)
        return (~torch.isnan(x) & (x <= tol.unsqueeze(-1))).all(-1) & (lse.abs() <= tol)

    def __repr__(self) -> str:
        return "LogSimplex(log of a point on the simplex: logsumexp(value) == 0)"


class _OrderedSubset(constraints.Constraint):
    """``k`` distinct indices in ``[0, n)``."""

    is_discrete = True
    event_dim = 1

    def __init__(self, n: int) -> None:
        self.n = n
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        in_range = ((value >= 0) & (value < self.n)).all(-1)
        s = value.sort(-1).values
        return in_range & (s[..., 1:] != s[..., :-1]).all(-1)

    def __repr__(self) -> str:
        return f"OrderedSubset(distinct indices in [0, {self.n}))"


_positive_finite = _PositiveFinite()
_finite = _Finite()
_logits_vector = _LogitsVector()
_simplex = _Simplex()
_log_simplex = _LogSimplex()


# --- the data-reading checks, run by the operator gumbelkit::check (see _require) ----------------
#
# Each is registered as (valid, message): ``valid(x, context, n, dtype)`` is elementwise or
# reduces over the event dimension only (so vmap's leading dimensions survive), and
# ``message(...)`` builds the ValueError's text for an ``x`` that failed, only on failure.


def _invalid_values(value: torch.Tensor, constraint: constraints.Constraint) -> list[float]:
    bad = ~constraint.check(value)
    if constraint.event_dim:
        return value[bad].flatten()[:6].tolist()
    return value.expand(bad.shape)[bad].flatten()[:4].tolist()


def _param_message(value: torch.Tensor, name: str, constraint: constraints.Constraint) -> str:
    return (f"{name} of shape {tuple(value.shape)} must satisfy {constraint!r}; invalid values: "
            f"{_invalid_values(value, constraint)}")


for _kind, _constraint in (("positive_finite", _positive_finite), ("finite", _finite),
                           ("logits_vector", _logits_vector)):
    register_check(_kind, lambda x, name, n, dtype, c=_constraint: c.check(x),
                   lambda x, name, n, dtype, c=_constraint: _param_message(x, name, c))


def _temperature_valid(t: torch.Tensor, name: str, n: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Positive and finite, before and after the cast to ``dtype`` (the logits' dtype)."""
    cast = t if dtype is None else t.to(dtype)
    return _positive_finite.check(t) & _positive_finite.check(cast)


def _temperature_message(t: torch.Tensor, name: str, n: int, dtype: torch.dtype | None) -> str:
    if not bool(_positive_finite.check(t).all()) or dtype is None:
        return _param_message(t, name, _positive_finite)
    # finite and > 0 as given, but not in the logits' dtype: say so, and how to fix it
    cast = t.to(dtype)
    fi = torch.finfo(dtype)
    over = torch.isinf(cast)
    bad = t.expand(over.shape)[over | (cast == 0)].unique()[:4].tolist()  # distinct values
    wider = str(torch.float32 if fi.bits == 16 else torch.float64).removeprefix("torch.")
    fix = f"pass logits in {wider} (logits.to(torch.{wider})) or a {'smaller' if bool(over.any()) else 'larger'} {name}"
    if bool(over.any()):
        return f"{name} {bad} overflows {dtype}, the dtype of the logits (largest finite value {fi.max:.6g}); {fix}"
    return (f"{name} {bad} underflows to 0 in {dtype}, the dtype of the logits (smallest positive value "
            f"{fi.tiny * fi.eps:.3g}); {fix}")


register_check("temperature", _temperature_valid, _temperature_message)


def _probs_valid(p: torch.Tensor, name: str, binary: int, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.isfinite(p) & (p >= 0) & ((p <= 1) if binary else True)


register_check("probs", _probs_valid, lambda p, name, binary, dtype: (
    f"probs must be finite and in [0, {1 if binary else 'inf'}), got "
    f"{p[~_probs_valid(p, name, binary, dtype)].flatten()[:4].tolist()}"))


def _possible(logits: torch.Tensor) -> torch.Tensor:
    return (logits > _NEG_INF).sum(-1)


def _enough_categories_message(logits: torch.Tensor, name: str, k: int, dtype: torch.dtype | None) -> str:
    possible = _possible(logits)
    return (f"k={k} is larger than the number of possible (> -inf) categories in "
            f"{int((possible < k).sum())} row(s) of logits, e.g. {int(possible.min())} at batch index "
            f"{(possible < k).nonzero()[0].tolist()}; lower k or give those categories finite logits")


register_check("enough_categories", lambda logits, name, k, dtype: _possible(logits) >= k,
               _enough_categories_message)


def _q_valid(q: torch.Tensor, name: str, n: int, dtype: torch.dtype | None) -> torch.Tensor:
    return (q >= 0) & (q <= 1)


register_check("quantile", _q_valid, lambda q, name, n, dtype: (
    f"icdf takes probabilities in [0, 1], got values {q[~_q_valid(q, name, n, dtype)].flatten()[:4].tolist()}"))


def _support_message(value: torch.Tensor, cls: str, support: constraints.Constraint, detail: str) -> str:
    return f"value of shape {tuple(value.shape)} is outside the support {support!r} of {cls}: {detail}"


def _index_detail(bad: torch.Tensor) -> str:
    return f"{int(bad.sum())} invalid of {bad.numel()}, e.g. at index {bad.nonzero()[0].tolist()}"


def _simplex_detail(value: torch.Tensor, support: constraints.Constraint, dtype: torch.dtype) -> str:
    bad = ~support.check(value, dtype)
    row = bad.nonzero()[0].tolist()
    coarsest = _coarsest_dtype(value.dtype, dtype)
    v = value[tuple(row)].to(compute_dtype(coarsest))
    if support is _log_simplex:
        x, total = v, f"logsumexp {v.logsumexp(-1).item():.6g}, max {v.max().item():.3g}"
    else:
        x, total = _log_value(v), f"sum {v.sum(-1).item():.6g}, min {v.min().item():.3g}"
    tol = _simplex_tolerance(x.exp(), x, (dtype,)).item()
    return (f"{int(bad.sum())} of {bad.numel()} rows, e.g. at batch index {row}: {total} "
            f"(tolerance {tol:.3g} for K={v.shape[-1]} in {coarsest})")


for _kind, _support in (("simplex", _simplex), ("log_simplex", _log_simplex)):
    register_check(_kind, lambda v, cls, n, dtype, c=_support: c.check(v, dtype),
                   lambda v, cls, n, dtype, c=_support: _support_message(v, cls, c, _simplex_detail(v, c, dtype)))

register_check("unit_interval", lambda v, cls, n, dtype: constraints.unit_interval.check(v),
               lambda v, cls, n, dtype: _support_message(v, cls, constraints.unit_interval, _index_detail(
                   ~constraints.unit_interval.check(v))))
register_check("ordered_subset", lambda v, cls, n, dtype: _OrderedSubset(n).check(v),
               lambda v, cls, n, dtype: _support_message(v, cls, _OrderedSubset(n), _index_detail(
                   ~_OrderedSubset(n).check(v))))
del _kind, _constraint, _support


# --- shared helpers ----------------------------------------------------------------------------


def _as_size(sample_shape: _size | int) -> torch.Size:
    return torch.Size((sample_shape,) if isinstance(sample_shape, int) else sample_shape)


def _as_param(value: object, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float or floating tensor as a tensor: a tensor as it is (on ``like``'s device if
    given), a float in ``like``'s dtype and device, or the default dtype without ``like``."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}; "
                            f"convert it with {name}.float()")
        if like is not None and value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but logits are on {like.device}; "
                             "move it with .to()")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if like is None:
        return torch.tensor(float(value), dtype=torch.get_default_dtype())
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _temperature(temperature: object, logits: torch.Tensor, batch_dims: torch.Size, validate: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Size]:
    """``(given, tau, batch_shape)``: the temperature as given (a tensor as it is; a float in
    float64, float32 on MPS, when ``validate``, else ``tau``), the temperature in the logits'
    dtype (a float rounded once, straight into it), neither expanded, and ``batch_dims``, the
    logits' batch shape, broadcast against it. The check of the values
    (:func:`_temperature_valid`) reads the temperature as given, so it can tell a bad value
    from one that only overflows or underflows in the logits' dtype.

    A one-element temperature counts as a scalar, so torch's idiom
    ``RelaxedOneHotCategorical(torch.tensor([2.2]), probs)`` keeps its batch shape.
    """
    t = _as_param(temperature, "temperature", logits)
    if isinstance(temperature, torch.Tensor) or not validate:
        given = t
    else:
        wide = torch.float32 if logits.device.type == "mps" else torch.float64
        given = torch.tensor(float(temperature), dtype=wide, device=logits.device)
    if t.numel() == 1:
        given = given.reshape(())
        t = t.reshape(())
    elif t.dim() == logits.dim() > len(batch_dims) and tuple(t.shape) == (*batch_dims, 1):
        # torch's per-row idiom (B, 1) for (B, K) logits would silently make a (B, B) batch here
        raise ValueError(f"temperature of shape {tuple(t.shape)} has a category dimension; here "
                         "temperatures are batch parameters: pass temperature.squeeze(-1)")
    try:
        batch_shape = torch.broadcast_shapes(t.shape, batch_dims)
    except RuntimeError:
        raise ValueError(f"temperature of shape {tuple(t.shape)} does not broadcast against the batch "
                         f"shape {tuple(batch_dims)} of the logits; temperatures are batch parameters "
                         "(one per distribution, no category dimension)") from None
    return given, t.to(logits.dtype), batch_shape


def _logits_from(probs: object, logits: object, binary: bool, validate: bool) -> torch.Tensor:
    if (probs is None) == (logits is None):
        raise ValueError("pass exactly one of probs or logits (logits are preferred: exact and stable)")
    if logits is not None:
        return logits if isinstance(logits, torch.Tensor) else _as_param(logits, "logits")
    p = _as_param(probs, "probs")
    if validate:
        p = p + _require(p, "probs", "probs", int(binary))
    return torch.logit(p) if binary else p.log()


def _extended(d: Distribution, sample_shape: _size | int, *params: torch.Tensor) -> list[torch.Tensor]:
    """The parameters expanded to ``sample_shape + batch_shape`` (+ their trailing dims)."""
    shape = _as_size(sample_shape) + d.batch_shape
    return [p.expand(shape + p.shape[len(d.batch_shape):]) for p in params]


def _log_normalized(logits: torch.Tensor) -> torch.Tensor:
    """``logits - logsumexp(logits)`` (log-probabilities, like torch's Categorical).

    Normalizing only shifts each row, and every density and sampler here is shift invariant,
    so a row where it would turn a finite logit into ``-inf`` (finite logits more than the
    dtype's range apart, e.g. float16 ``[6e4, -6e4]``) is kept as given instead of making that
    category impossible; so are rows with no finite logsumexp, for the argument check.
    """
    cdtype = compute_dtype(logits.dtype)
    lse = logits.to(cdtype).logsumexp(-1, keepdim=True)
    shifted = (logits.to(cdtype) - lse).to(logits.dtype)
    keep = torch.isfinite(lse) & ((shifted > _NEG_INF) | (logits == _NEG_INF)).all(-1, keepdim=True)
    return torch.where(keep, shifted, logits)


class _Validated(Distribution):
    """torch's ``validate_args`` contract, decided at construction and checked through
    :func:`_require` (the operator ``gumbelkit::check``).

    ``torch.distributions.Distribution.__init__`` stores an explicit ``validate_args`` on the
    instance and otherwise leaves ``self._validate_args`` to the class attribute that
    ``set_default_validate_args`` sets, read again at every call; ``torch.compile`` sets that
    attribute to ``False`` for good when it first runs. Here the decision is taken once, in
    ``__init__`` (see :func:`set_default_validate_args`), and stored on the instance.
    """

    _support_kind: ClassVar[str]  # the check of gumbelkit._kernels.checks for log_prob's value

    def _init_validated(self, batch_shape: torch.Size, event_shape: torch.Size, validate: bool) -> None:
        super().__init__(batch_shape, event_shape, validate_args=False)
        self._validate_args = validate

    def _check_sample(self, value: torch.Tensor) -> torch.Tensor | None:
        """``None`` without validation, else a 0-d zero once ``value`` passed the support check
        (the shape checks here read no data; the support check runs in the operator)."""
        if not self._validate_args:
            return None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        start = value.dim() - len(self.event_shape)
        if start < 0 or value.shape[start:] != self.event_shape:
            raise ValueError(f"the right-most size of value must match event_shape: {tuple(value.shape)} "
                             f"vs {tuple(self.event_shape)}")
        try:
            torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        except RuntimeError:
            raise ValueError(f"value of shape {tuple(value.shape)} does not broadcast with batch_shape + "
                             f"event_shape {tuple(self.batch_shape + self.event_shape)}") from None
        n = self.logits.shape[-1] if self.logits.dim() else 0  # the categories (PlackettLuce's indices)
        return _require(value, self._support_kind, type(self).__name__, n, self.logits.dtype)


def _plus(result: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``result`` with a check's zero added (so the check runs), or as it is without one."""
    return result if zero is None else result + zero.to(result.dtype)


class _Tempered(_Validated):
    """A temperature and logits, the temperature a batch parameter (no event dimension)."""

    has_rsample = True
    _binary: ClassVar[bool]  # scalar events (Binary/Hard Concrete) or vectors (Concrete)
    _logits_kind: ClassVar[str]  # the check of the logits' values

    def __init__(self, temperature: float | torch.Tensor, probs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None, validate_args: bool | None = None) -> None:
        validate = _validating(validate_args)
        logits = _logits_from(probs, logits, self._binary, validate)
        if self._binary:
            logits, event_shape = _as_param(logits, "logits"), torch.Size()
        else:
            logits = _log_normalized(check_logits(logits))
            event_shape = logits.shape[-1:]
        given, tau, batch_shape = _temperature(temperature, logits, logits.shape[:logits.dim() - len(event_shape)],
                                               validate)
        if validate:
            # temperature first, then logits (chained: the same error first under compile too);
            # both parameters carry both checks' zeros, so using either runs both
            tz = _require(given.expand(batch_shape), "temperature", "temperature", 0, logits.dtype).to(logits.dtype)
            zero = tz + _require((logits + tz).expand(batch_shape + event_shape), self._logits_kind, "logits")
            tau, logits = tau + zero, logits + zero
        self.temperature = tau.expand(batch_shape)
        self.logits = logits.expand(batch_shape + event_shape)
        self._init_validated(batch_shape, event_shape, validate)

    def _out_dtype(self, value: torch.Tensor) -> torch.dtype:
        """``log_prob``'s dtype: the compute dtype, float32 for half precision, whose range
        cannot hold the log-density of many categories."""
        return compute_dtype(torch.promote_types(value.dtype, self.logits.dtype))

    def expand(self, batch_shape: _size, _instance: Distribution | None = None) -> _Tempered:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.temperature = self.temperature.expand(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)  # type: ignore[call-arg]


# --- Concrete -----------------------------------------------------------------------------------


class _ConcreteBase(_Tempered):
    """What :class:`ExpConcrete` and :class:`Concrete` share."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "temperature": _positive_finite, "logits": _logits_vector}
    _binary = False
    _logits_kind = "logits_vector"

    @property
    def probs(self) -> torch.Tensor:
        """The category probabilities ``softmax(logits)`` of the unrelaxed categorical."""
        return self.logits.softmax(-1)

    def _check_sample(self, value: torch.Tensor) -> torch.Tensor | None:
        if self._validate_args and isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise TypeError(f"value must be a floating-point tensor, got dtype {value.dtype}")
        return super()._check_sample(value)

    def _log_rsample(self, sample_shape: _size | int, generator: torch.Generator | None
                     ) -> torch.Tensor:
        logits, tau = _extended(self, sample_shape, self.logits, self.temperature)
        return log_gumbel_softmax(logits, tau.unsqueeze(-1), generator=generator)

    def _exp_log_prob(self, x: torch.Tensor, concrete: bool = False) -> torch.Tensor:
        """The ExpConcrete log-density at ``x`` (log of a point on the simplex), in log space;
        with ``concrete``, the Concrete's at ``y = exp(x)``: minus ``sum(x)`` over the possible
        categories. Summed term by term (each ``score - logsumexp <= 0``), so no two large sums
        cancel; the caller marks the rows outside the support."""
        cdtype = compute_dtype(torch.promote_types(x.dtype, self.logits.dtype))
        x, logits = x.to(cdtype), self.logits.to(cdtype)
        tau = self.temperature.to(cdtype)
        impossible = logits == _NEG_INF
        # impossible categories score -inf by themselves; a -inf coordinate (for a possible
        # category the boundary, density 0: the caller masks those rows) is read as 0 to keep
        # inf - inf (and its NaN gradient) out
        score = logits - tau.unsqueeze(-1) * x.masked_fill(x == _NEG_INF, 0.0)
        n = (~impossible).sum(-1).to(cdtype)
        terms = score - score.logsumexp(-1, keepdim=True)
        if concrete:
            terms = terms - x
        # an impossible category's term is -inf and counts 0
        return terms.masked_fill(impossible, 0.0).sum(-1) + torch.lgamma(n) + (n - 1) * tau.log()


class ExpConcrete(_ConcreteBase):
    r"""The ExpConcrete distribution: the log of a Concrete (relaxed one-hot) sample.

    Samples are :math:`x = \operatorname{log\_softmax}((\ell + g)/\tau)` with
    :math:`g_i \sim \operatorname{Gumbel}(0, 1)` (Maddison, Mnih and Teh 2017, appendix C),
    computed in log space so that no coordinate underflows. The log-density is

    .. math::
        \log p(x) = \log (K-1)! + (K-1)\log\tau + \sum_{k=1}^K (\ell_k - \tau x_k)
        - K \operatorname{logsumexp}_k(\ell_k - \tau x_k),

    with respect to Lebesgue measure on the log-ratios :math:`(x_k - x_K)_{k<K}`. Categories
    with ``logits == -inf`` are impossible: their coordinate is always ``-inf`` and ``K``
    counts only the others. Same density as :class:`torch.distributions.ExpRelaxedCategorical`,
    with temperatures that broadcast against the batch shape (a ``(3, 1)`` temperature and
    ``(4, K)`` logits give a ``(3, 4)`` batch), samples that take a ``generator`` and a
    ``-inf`` limit instead of NaN when a coordinate of ``x`` is ``-inf``. There is no closed
    form for the mean or the entropy.

    Args:
        temperature: :math:`\tau > 0`, a float or a tensor broadcastable against
            ``logits.shape[:-1]``.
        probs: category probabilities (normalized along the last dimension), or
        logits: unnormalized log-probabilities :math:`\ell` (``-inf`` = impossible).
        validate_args: check parameters and ``log_prob`` values; ``None`` takes torch's default
            (on unless ``python -O``), decided at construction (see
            :func:`set_default_validate_args`).

    Example:
        >>> d = ExpConcrete(torch.tensor([1.0, 0.01]), logits=torch.zeros(1000))
        >>> x = d.rsample(generator=torch.Generator().manual_seed(0))
        >>> x.shape, bool(torch.isfinite(d.log_prob(x)).all())
        (torch.Size([2, 1000]), True)
    """

    support = _log_simplex
    _support_kind = "log_simplex"

    def rsample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        return self._log_rsample(sample_shape, generator)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        x = value.to(self._out_dtype(value))
        # a coordinate is -inf exactly where its category is impossible; anywhere else x is
        # outside the support (mass on an impossible category) or at the limit of the boundary,
        # where the density tends to 0: log_prob = -inf either way
        outside = ((x == _NEG_INF) != (self.logits == _NEG_INF)).any(-1)
        return _plus(self._exp_log_prob(x).masked_fill(outside, _NEG_INF), checked)


class Concrete(_ConcreteBase):
    r"""The Concrete (Gumbel-Softmax, relaxed one-hot categorical) distribution on the simplex.

    Samples are :math:`y = \operatorname{softmax}((\ell + g)/\tau)` with
    :math:`g_i \sim \operatorname{Gumbel}(0, 1)` (Maddison, Mnih and Teh 2017; Jang, Gu and
    Poole 2017). The density with respect to Lebesgue measure on :math:`(y_1, \dots, y_{K-1})` is

    .. math::
        p(y) = (K-1)!\,\tau^{K-1} \prod_{k=1}^K
        \frac{e^{\ell_k} y_k^{-\tau-1}}{\sum_{i=1}^K e^{\ell_i} y_i^{-\tau}},

    computed in log space as ``ExpConcrete.log_prob(log y) - sum(log y)``, term by term. Every
    nonzero coordinate is read exactly, subnormals included. At small temperatures many
    coordinates of a float sample underflow to exactly 0, a point on the boundary where the
    formula reads ``inf - inf``; ``log_prob`` reads such a coordinate as the smallest positive
    float of the value's dtype (``finfo.tiny * finfo.eps``), the nearest interior point, so the
    result stays finite and continuous. For densities of the unrounded sample at small
    temperatures use :class:`ExpConcrete`, whose samples never underflow. The support check
    accepts a sum within the rounding a genuine sample can have (:func:`_simplex_tolerance`).
    Same density as
    :class:`torch.distributions.RelaxedOneHotCategorical` where that one is finite; there is
    no closed form for the mean or the entropy.

    Args:
        temperature: :math:`\tau > 0`, a float or a tensor broadcastable against
            ``logits.shape[:-1]``.
        probs: category probabilities (normalized along the last dimension), or
        logits: unnormalized log-probabilities :math:`\ell` (``-inf`` = impossible).
        validate_args: check parameters and ``log_prob`` values; ``None`` takes torch's default
            (on unless ``python -O``), decided at construction (see
            :func:`set_default_validate_args`).

    Example:
        >>> d = Concrete(0.5, logits=torch.tensor([0.0, 1.0, 2.0]))
        >>> y = d.rsample((4,), generator=torch.Generator().manual_seed(0))
        >>> y.shape, torch.allclose(y.sum(-1), torch.ones(4))
        (torch.Size([4, 3]), True)
        >>> bool(torch.isfinite(d.log_prob(torch.tensor([0.0, 0.0, 1.0]))))  # boundary point
        True
    """

    support = _simplex
    _support_kind = "simplex"

    def rsample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        return self._log_rsample(sample_shape, generator).exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        y = value.to(self._out_dtype(value))
        # every nonzero value exactly (subnormals too); an exact 0 as the smallest positive float
        # of the value's dtype, the nearest interior point (clamping below it changes nothing
        # else: every positive value of that dtype is at least as large)
        log_y = _log_value(y.clamp_min(_smallest_subnormal(
            value.dtype if value.is_floating_point() else y.dtype)))
        # outside the support: a negative entry, or mass on an impossible category (whose own
        # term counts 0 whatever its coordinate)
        outside = (y < 0).any(-1) | ((self.logits == _NEG_INF) & (y != 0)).any(-1)
        return _plus(self._exp_log_prob(log_y, concrete=True).masked_fill(outside, _NEG_INF), checked)


# --- Binary Concrete and Hard Concrete -----------------------------------------------------------


class _BinaryBase(_Tempered):
    """What :class:`BinaryConcrete` and :class:`HardConcrete` share."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "temperature": _positive_finite, "logits": _finite}
    _binary = True
    _logits_kind = "finite"
    _support_kind = "unit_interval"

    @property
    def probs(self) -> torch.Tensor:
        """``sigmoid(logits)``: the probability of 1 of the unrelaxed Bernoulli."""
        return torch.sigmoid(self.logits)

    def _logit_rsample(self, sample_shape: _size | int, generator: torch.Generator | None
                       ) -> torch.Tensor:
        """``(logits + g1 - g2) / tau``: the logit of a sample, in the compute dtype.

        ``g1 - g2`` of two Gumbel draws is Logistic(0, 1); drawing them as the Gumbel noise of
        the two-category logits ``[logits, 0]`` keeps the noise contract: the sample equals
        the first coordinate of a Concrete sample with those logits.
        """
        logits, tau = _extended(self, sample_shape, self.logits, self.temperature)
        cdtype = compute_dtype(logits.dtype)
        g = gumbel_noise((*logits.shape, 2), generator=generator, dtype=logits.dtype,
                         device=logits.device).to(cdtype)
        return (logits.to(cdtype) + (g[..., 0] - g[..., 1])) / tau.to(cdtype)

    def _s_log_prob(self, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        r"""Binary Concrete log-density at ``s`` in [0, 1], in the compute dtype.

        With :math:`t = \operatorname{logit}(s)`, :math:`\tau t - \ell` is Logistic(0, 1):
        :math:`\log p(s) = \log\tau - |u| - 2\log(1 + e^{-|u|}) - \log s - \log(1 - s)`,
        :math:`u = \tau t - \ell`; symmetric in :math:`u`, so nothing overflows. Every value in
        (0, 1) is read exactly, subnormals included; an exact 0 or 1 as the nearest interior
        float of ``dtype`` (the smallest positive float, and ``1 - eps/2``), so the closed
        interval stays finite; outside [0, 1] the density is 0 (``-inf``).
        """
        cdtype = compute_dtype(torch.promote_types(s.dtype, self.logits.dtype))
        s = s.to(cdtype)
        outside = (s < 0) | (s > 1)
        # no float of ``dtype`` lies strictly between 0 and the smallest one, or between
        # 1 - eps/2 and 1: clamping moves only 0 and 1 (and points outside, masked below)
        s = s.clamp(_smallest_subnormal(dtype), 1.0 - torch.finfo(dtype).eps / 2)
        log_s, log_1ms = _log_value(s), torch.log1p(-s)
        tau = self.temperature.to(cdtype)
        u = (tau * (log_s - log_1ms) - self.logits.to(cdtype)).abs()
        lp = tau.log() - u - 2 * torch.log1p(torch.exp(-u)) - log_s - log_1ms
        return lp.masked_fill(outside, _NEG_INF)

    def _s_cdf(self, s: torch.Tensor) -> torch.Tensor:
        """``P(S <= s) = sigmoid(tau * logit(s) - logits)`` for the Binary Concrete ``S``."""
        cdtype = compute_dtype(torch.promote_types(s.dtype, self.logits.dtype))
        s = s.to(cdtype)
        return torch.sigmoid(self.temperature.to(cdtype) * torch.logit(s) - self.logits.to(cdtype))

    def _s_icdf(self, q: torch.Tensor) -> torch.Tensor:
        cdtype = compute_dtype(torch.promote_types(q.dtype, self.logits.dtype))
        q = q.to(cdtype)
        return torch.sigmoid((torch.logit(q) + self.logits.to(cdtype)) / self.temperature.to(cdtype))

    def _check_q(self, q: torch.Tensor) -> torch.Tensor | None:
        return _require(q, "quantile") if self._validate_args else None


class BinaryConcrete(_BinaryBase):
    r"""The Binary Concrete (relaxed Bernoulli) distribution on (0, 1), parameterized by logits.

    Samples are :math:`y = \sigma\big((\ell + g_1 - g_2)/\tau\big)`, :math:`g_1, g_2 \sim
    \operatorname{Gumbel}(0, 1)` (:math:`g_1 - g_2` is Logistic(0, 1); Maddison, Mnih and
    Teh 2017, eq. 11). The density is

    .. math::
        p(y) = \frac{\tau\, e^{\ell}\, y^{-\tau-1} (1-y)^{-\tau-1}}
        {\big(e^{\ell} y^{-\tau} + (1-y)^{-\tau}\big)^2},
        \qquad P(Y \le y) = \sigma\big(\tau \operatorname{logit}(y) - \ell\big),

    evaluated in a symmetric log-space form that never overflows (torch's
    ``RelaxedBernoulli`` gives ``-inf`` or NaN for large logits or samples that rounded to 0
    or 1). Values in (0, 1) are read exactly, subnormals included; a value of exactly 0 or 1
    is read as the nearest interior float of its dtype (the smallest positive float, and
    ``1 - eps/2``), so ``log_prob`` is finite on the whole closed interval. There is no closed form for the mean or the
    entropy; :meth:`cdf` and :meth:`icdf` are exact.

    Args:
        temperature: :math:`\tau > 0`, a float or a tensor broadcastable against ``logits``.
        probs: probability of 1 in (0, 1) (turned into logits exactly), or
        logits: the log-odds :math:`\ell` (finite).
        validate_args: check parameters and ``log_prob`` values; ``None`` takes torch's default
            (on unless ``python -O``), decided at construction (see
            :func:`set_default_validate_args`).

    Example:
        >>> d = BinaryConcrete(torch.tensor([[0.1], [1.0]]), logits=torch.tensor([-1.0, 0.0, 2.0]))
        >>> y = d.rsample(generator=torch.Generator().manual_seed(0))
        >>> d.batch_shape, bool(torch.isfinite(d.log_prob(y)).all())
        (torch.Size([2, 3]), True)
        >>> d.cdf(torch.tensor(0.5))[1].tolist()  # P(Y <= 1/2) = sigmoid(-logits) at tau = 1
        [0.7310585975646973, 0.5, 0.11920291930437088]
    """

    support = constraints.unit_interval

    def rsample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        return torch.sigmoid(self._logit_rsample(sample_shape, generator)).to(self.logits.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        dtype = self._out_dtype(value)
        return _plus(self._s_log_prob(value, value.dtype if value.is_floating_point() else dtype).to(dtype), checked)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        return _plus(self._s_cdf(value).to(self.logits.dtype), checked)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_q(value)
        return _plus(self._s_icdf(value).to(self.logits.dtype), checked)


class HardConcrete(_BinaryBase):
    r"""The Hard Concrete distribution of L0 gates (Louizos, Welling and Kingma 2018).

    A Binary Concrete sample :math:`s` is stretched to :math:`(\gamma, \zeta)` and clipped:

    .. math::
        z = \min\big(1, \max(0,\; \gamma + (\zeta - \gamma)\, s)\big), \qquad
        s = \sigma\big((\ell + g_1 - g_2)/\tau\big),

    so :math:`z` has point masses at 0 and 1 and a continuous part on (0, 1):

    .. math::
        P(z = 0) = \sigma\big(\tau \log\tfrac{-\gamma}{\zeta} - \ell\big),\quad
        P(z = 1) = \sigma\big(\ell - \tau \log\tfrac{1-\gamma}{\zeta-1}\big),\quad
        p(z) = \frac{p_s\big(\tfrac{z-\gamma}{\zeta-\gamma}\big)}{\zeta - \gamma}
        \text{ on } (0, 1).

    ``log_prob`` is the log-density with respect to Lebesgue measure on (0, 1) plus unit point
    masses at 0 and 1: ``log P(z=0)`` at 0, ``log P(z=1)`` at 1, ``log p(z)`` in between.
    :meth:`prob_nonzero` is the expected-L0 penalty :math:`1 - P(z=0)` (the paper's eq. 12).
    The paper uses :math:`\tau = 2/3`, :math:`\gamma = -0.1`, :math:`\zeta = 1.1`. There is no
    closed form for the mean; :meth:`cdf` and :meth:`icdf` are exact (``icdf(0.5)`` is the
    median gate).

    Args:
        temperature: :math:`\tau > 0` (float or tensor broadcastable against ``logits``).
        logits: :math:`\ell = \log\alpha`, the location of the underlying Binary Concrete.
        lower: :math:`\gamma < 0`, the lower end of the stretch.
        upper: :math:`\zeta > 1`, the upper end of the stretch.
        validate_args: check parameters and ``log_prob`` values; ``None`` takes torch's default
            (on unless ``python -O``), decided at construction (see
            :func:`set_default_validate_args`).

    Example:
        >>> d = HardConcrete(2 / 3, logits=torch.tensor([-3.0, 0.0, 3.0]))
        >>> z = d.rsample((1000,), generator=torch.Generator().manual_seed(0))
        >>> bool(((z >= 0) & (z <= 1)).all()), [round(p, 2) for p in d.prob_nonzero().tolist()]
        (True, [0.2, 0.83, 0.99])
        >>> bool(torch.isfinite(d.log_prob(z)).all())
        True
    """

    support = constraints.unit_interval

    def __init__(self, temperature: float | torch.Tensor, logits: torch.Tensor | float, *,
                 lower: float = -0.1, upper: float = 1.1, validate_args: bool | None = None) -> None:
        for name, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite float, got {value!r}")
        if not (lower < 0 and upper > 1):
            raise ValueError(f"need lower < 0 and upper > 1 (the stretch that creates the point "
                             f"masses at 0 and 1), got lower={lower}, upper={upper}; "
                             "use BinaryConcrete for no stretch")
        self.lower, self.upper = float(lower), float(upper)
        super().__init__(temperature, logits=logits, validate_args=validate_args)

    def expand(self, batch_shape: _size, _instance: Distribution | None = None) -> HardConcrete:
        new = super().expand(batch_shape, _instance)
        new.lower, new.upper = self.lower, self.upper
        return new

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (self.lower + (self.upper - self.lower) * s).clamp(0.0, 1.0)

    def _mass_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of ``P(z = 0)`` and ``P(z = 1)``: the Binary Concrete CDF at the clip points."""
        cdtype = compute_dtype(self.logits.dtype)
        tau, logits = self.temperature.to(cdtype), self.logits.to(cdtype)
        logit0 = math.log(-self.lower / self.upper)  # logit of s where the stretch crosses 0
        logit1 = math.log((1 - self.lower) / (self.upper - 1))  # ... and where it crosses 1
        return tau * logit0 - logits, logits - tau * logit1

    def rsample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        s = torch.sigmoid(self._logit_rsample(sample_shape, generator))
        return self._stretch(s).to(self.logits.dtype)

    def prob_nonzero(self) -> torch.Tensor:
        r""":math:`P(z \ne 0) = \sigma\big(\ell - \tau\log(-\gamma/\zeta)\big)`, differentiable in
        the logits: the expected L0 norm of the gates is its sum (Louizos et al. 2018, eq. 12)."""
        return torch.sigmoid(-self._mass_logits()[0]).to(self.logits.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        cdtype = self._out_dtype(value)
        log_p0, log_p1 = (torch.nn.functional.logsigmoid(m).to(cdtype) for m in self._mass_logits())
        z = value.to(cdtype)
        width = self.upper - self.lower
        # s = (z - lower) / width stays inside (0, 1) for z in [0, 1]: no boundary reading here
        s = (z.clamp(0.0, 1.0) - self.lower) / width
        cont = self._s_log_prob(s, cdtype) - math.log(width)
        lp = torch.where(z <= 0, log_p0, torch.where(z >= 1, log_p1, cont))
        return _plus(lp.masked_fill((z < 0) | (z > 1), _NEG_INF), checked)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        checked = self._check_sample(value)
        z = value.to(compute_dtype(torch.promote_types(value.dtype, self.logits.dtype)))
        f = self._s_cdf(((z - self.lower) / (self.upper - self.lower)).clamp(0.0, 1.0))
        return _plus(torch.where(z >= 1, torch.ones_like(f), f).to(self.logits.dtype), checked)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        # clipping is monotone, so the quantile of z is the clipped quantile of s
        checked = self._check_q(value)
        return _plus(self._stretch(self._s_icdf(value)).to(self.logits.dtype), checked)


# --- Plackett-Luce --------------------------------------------------------------------------------


def _plackett_luce_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r"""``sum_j [l_{i_j} - logsumexp(l over the items not yet picked)]`` without subtraction.

    The items left at step ``j`` are the later picks ``i_j..i_k`` (a reversed cumulative
    logsumexp) and the never-picked items (one masked logsumexp), so no ``log(1 - p)``
    cancellation appears, however dominant the picked items are.
    """
    cdtype = compute_dtype(logits.dtype)
    shape = torch.broadcast_shapes(logits.shape[:-1], value.shape[:-1])
    logits = logits.to(cdtype).expand(shape + logits.shape[-1:])
    value = value.expand(shape + value.shape[-1:])
    picked = logits.gather(-1, value)
    rest = logits.scatter(-1, value, _NEG_INF).logsumexp(-1, keepdim=True)
    later = picked.flip(-1).logcumsumexp(-1).flip(-1)
    terms = picked - torch.logaddexp(later, rest)
    return torch.where(picked == _NEG_INF, _NEG_INF, terms).sum(-1)


class PlackettLuce(_Validated):
    r"""The Plackett-Luce distribution over ordered ``k``-tuples of distinct categories.

    Draw :math:`i_1` from :math:`\operatorname{softmax}(\ell)`, then :math:`i_2` from the
    renormalized rest, and so on ``k`` times (Plackett 1975; Luce 1959). The Gumbel-top-k trick
    draws it exactly: :math:`(i_1, \dots, i_k) = \operatorname{top}_k(\ell + g)` (Yellott 1977;
    Kool, van Hoof and Welling 2019). The log-probability of an ordered tuple is

    .. math::
        \log P(i_1, \dots, i_k) = \sum_{j=1}^k \Big(\ell_{i_j}
        - \log \sum_{m \notin \{i_1, \dots, i_{j-1}\}} e^{\ell_m}\Big),

    computed as logsumexps over the items still left (never as :math:`\log(1 - \sum p)`), so it
    stays exact when the first picks hold nearly all the mass. :meth:`log_prob_unordered` gives
    the probability of the set :math:`\{i_1, \dots, i_k\}` in any order, by enumerating the
    :math:`k!` orders (``k <= 8``). Samples are int64 of shape ``sample_shape + batch_shape +
    (k,)``; there is no ``rsample``. Finite logits are always possible picks, however far below
    the others (the stored, normalized logits never overflow to ``-inf``); ``log_prob`` is
    float32 for half-precision logits.

    Args:
        logits: unnormalized log-probabilities ``(..., n)``; ``-inf`` = never picked.
        k: the number of picks, ``1 <= k <= n`` (default ``n``: a full ranking); with
            validation, at most the number of finite logits in every row (else ``ValueError``).
        validate_args: check parameters and ``log_prob`` values; ``None`` takes torch's default
            (on unless ``python -O``), decided at construction (see
            :func:`set_default_validate_args`).

    Example:
        >>> d = PlackettLuce(torch.log(torch.tensor([0.5, 0.3, 0.2])), k=2)
        >>> d.sample((3,), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([3, 2])
        >>> round(d.log_prob(torch.tensor([0, 1])).exp().item(), 4)  # 0.5 * 0.3 / 0.5
        0.3
        >>> round(d.log_prob_unordered(torch.tensor([0, 1])).exp().item(), 4)  # + 0.3 * 0.5 / 0.7
        0.5143
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": _logits_vector}
    _support_kind = "ordered_subset"

    def __init__(self, logits: torch.Tensor, k: int | None = None,
                 validate_args: bool | None = None) -> None:
        logits = check_logits(logits)
        n = logits.shape[-1]
        k = n if k is None else k
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the number of categories n={n}")
        self.k = k
        # normalizing never makes a finite logit -inf (see _log_normalized): finite logits are
        # always possible picks, however far below the others they are
        logits = _log_normalized(logits)
        validate = _validating(validate_args)
        if validate:  # the values, then enough possible categories for k picks (chained)
            zero = _require(logits, "logits_vector", "logits")
            logits = logits + (zero + _require(logits + zero, "enough_categories", "logits", k))
        self.logits = logits
        self._init_validated(logits.shape[:-1], torch.Size((k,)), validate)

    @property
    def support(self) -> constraints.Constraint:
        return _OrderedSubset(self.logits.shape[-1])

    @property
    def probs(self) -> torch.Tensor:
        """``softmax(logits)``: the probabilities of the first pick."""
        return self.logits.softmax(-1)

    def expand(self, batch_shape: _size, _instance: Distribution | None = None) -> PlackettLuce:
        new = self._get_checked_instance(PlackettLuce, _instance)
        batch_shape = torch.Size(batch_shape)
        new.k = self.k
        new.logits = self.logits.expand(batch_shape + self.logits.shape[-1:])
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: _size | int = _EMPTY, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        (logits,) = _extended(self, sample_shape, self.logits)
        return gumbel_topk(logits, self.k, generator=generator).indices

    def _check_value(self, value: object) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"value must be an integer tensor of category indices, got {got}; "
                            "use value.long()")
        checked = self._check_sample(value)
        # indices that depend on the check: a compiled gather never runs before it
        return _plus(value.long(), checked)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = self._check_value(value)
        return _plackett_luce_log_prob(self.logits, value)

    def log_prob_unordered(self, value: torch.Tensor) -> torch.Tensor:
        r"""``log P({i_1, ..., i_k})``: the log-probability that the ``k`` picks are the set
        ``value`` in any order, a logsumexp over the ``k!`` orders (``k <= 8``)."""
        if self.k > MAX_UNORDERED_K:
            raise ValueError(f"log_prob_unordered enumerates k! orders and supports k <= "
                             f"{MAX_UNORDERED_K}, got k={self.k}")
        value = self._check_value(value)
        orders = torch.tensor(list(itertools.permutations(range(self.k))), device=value.device)
        lp = _plackett_luce_log_prob(self.logits.unsqueeze(-2), value[..., orders])
        return lp.logsumexp(-1)


ExpRelaxedCategorical = ExpConcrete
RelaxedOneHotCategorical = Concrete
RelaxedBernoulli = BinaryConcrete
GumbelTopK = PlackettLuce


# --- KL divergences -------------------------------------------------------------------------------


def _binary_kl(delta: torch.Tensor) -> torch.Tensor:
    r""":math:`\delta \coth(\delta/2) - 2`, the KL between two Logistic laws with equal scale
    whose locations differ by :math:`\delta` scales (a series near 0, where it cancels)."""
    x = delta.abs()
    small = x < 0.1
    xs = torch.where(small, 1.0, x)  # no expm1(0) even in the branch torch.where drops
    far = xs + 2 * xs / torch.expm1(xs) - 2
    x2 = x * x
    return torch.where(small, x2 / 6 - x2 * x2 / 360 + x2 ** 3 / 15120, far)


def kl_monte_carlo(p: Distribution, q: Distribution, num_samples: int = 64, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""A Monte Carlo estimate of :math:`\mathrm{KL}(p \,\|\, q)
    = \mathbb E_{x \sim p}[\log p(x) - \log q(x)]`.

    The average of ``num_samples`` draws. When ``p`` has ``rsample`` the estimate is
    reparameterized (pathwise gradients, Kingma and Welling 2014), the standard estimate for
    Concrete latents (Maddison et al. 2017, appendix C: use :class:`ExpConcrete` densities);
    otherwise the gradient adds the score-function term :math:`(\log p - \log q)\nabla\log p`
    (Williams 1992), so it is unbiased for discrete ``p`` such as :class:`PlackettLuce` too.
    The value is the plain average either way.

    Example:
        >>> p = ExpConcrete(0.5, logits=torch.tensor([0.0, 1.0, 2.0]))
        >>> q = ExpConcrete(0.5, logits=torch.zeros(3))
        >>> kl = kl_monte_carlo(p, q, 10_000, generator=torch.Generator().manual_seed(0))
        >>> bool(kl > 0)
        True
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    if p.event_shape != q.event_shape:
        raise ValueError(f"p and q have different event shapes {tuple(p.event_shape)} and "
                         f"{tuple(q.event_shape)}")
    p = p.expand(batch) if p.batch_shape != batch else p
    if p.has_rsample:
        x = p.rsample((num_samples,), generator=generator)  # type: ignore[call-arg]
        return (p.log_prob(x) - q.log_prob(x)).mean(0)
    x = p.sample((num_samples,), generator=generator)  # type: ignore[call-arg]
    log_p = p.log_prob(x)
    f = log_p - q.log_prob(x)
    return (f + f.detach() * (log_p - log_p.detach())).mean(0)


@register_kl(BinaryConcrete, BinaryConcrete)
def _kl_binary_binary(p: BinaryConcrete, q: BinaryConcrete) -> torch.Tensor:
    """Exact where the temperatures are equal; a Monte Carlo estimate where they differ."""
    tp, tq = torch.broadcast_tensors(p.temperature, q.temperature)
    exact = _binary_kl(p.logits - q.logits).expand(tp.shape)
    if bool((tp == tq).all()):
        return exact
    return torch.where(tp == tq, exact, kl_monte_carlo(p, q))


@register_kl(ExpConcrete, ExpConcrete)
@register_kl(Concrete, Concrete)
def _kl_concrete_concrete(p: _ConcreteBase, q: _ConcreteBase) -> torch.Tensor:
    """Monte Carlo (no closed form): KL is invariant under ``log``, so both use ExpConcrete."""
    to_exp = [ExpConcrete(d.temperature, logits=d.logits, validate_args=False) for d in (p, q)]
    return kl_monte_carlo(*to_exp)


MAX_EXACT_PL_KL_TUPLES = 40320  # ordered tuples enumerated by the exact Plackett-Luce KL


@register_kl(PlackettLuce, PlackettLuce)
def _kl_plackett_luce(p: PlackettLuce, q: PlackettLuce) -> torch.Tensor:
    """Exact by enumerating the ordered k-tuples when there are at most 40320 of them, else
    Monte Carlo with the score-function gradient."""
    n, k = p.logits.shape[-1], p.k
    if q.logits.shape[-1] != n or q.k != k:
        raise ValueError(f"KL needs the same n and k, got (n={n}, k={k}) and "
                         f"(n={q.logits.shape[-1]}, k={q.k})")
    if math.perm(n, k) > MAX_EXACT_PL_KL_TUPLES:
        return kl_monte_carlo(p, q)
    tuples = torch.tensor(list(itertools.permutations(range(n), k)), device=p.logits.device)
    log_p = _plackett_luce_log_prob(p.logits.unsqueeze(-2), tuples)
    log_q = _plackett_luce_log_prob(q.logits.unsqueeze(-2), tuples)
    # xlogy-style: tuples with p = 0 contribute 0 even where q = 0
    diff = torch.where(log_p == _NEG_INF, 0.0, log_p - log_q)
    return (log_p.exp() * diff).sum(-1)

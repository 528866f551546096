"""Temperature schedules for the Gumbel-Softmax, and a learnable temperature.

A schedule is a small object with ``__call__(step) -> tau`` (a float), so annealing is one line
in a training loop::

    tau = schedule(step)
    y = gk.gumbel_softmax(logits, tau=tau, hard=True)

Large temperatures give smooth, low-variance but biased gradients; small ones give samples close
to one-hot with high-variance gradients. Jang, Gu and Poole (2017) start at ``tau0 = 1`` and
anneal towards ``tau_min = 0.5``; :class:`ExponentialSchedule` is their schedule.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import nn

__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LearnableTemperature",
    "LinearSchedule",
    "TemperatureSchedule",
]


def _positive(value: object, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class TemperatureSchedule:
    """Base class: ``schedule(step)`` returns the temperature for a (0-based) training step.

    Subclasses implement ``value(step)``; ``__call__`` checks that ``step`` is an int >= 0.

    Example:
        >>> class Halving(TemperatureSchedule):
        ...     def value(self, step):
        ...         return 2.0 ** -(step // 100)
        >>> Halving()(250)
        0.25
    """

    def __call__(self, step: int) -> float:
        return self.value(_count(step, "step", 0))

    def value(self, step: int) -> float:
        """The temperature at ``step`` (already checked to be an int >= 0)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantSchedule(TemperatureSchedule):
    """``tau(t) = tau`` for every step.

    Example:
        >>> ConstantSchedule(0.5)(1000)
        0.5
    """

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = _positive(tau, "tau")

    def value(self, step: int) -> float:
        return self.tau


class ExponentialSchedule(TemperatureSchedule):
    r"""The annealing schedule of Jang, Gu and Poole (2017), updated every ``every`` steps.

    .. math::
        \tau(t) = \max\big(\tau_{\min},\; \tau_0\, e^{-r\, \lfloor t / N \rfloor N}\big)

    The paper uses ``tau0 = 1``, ``tau_min = 0.5``, ``r`` in ``{1e-5, 1e-4}`` and ``N = 500``.

    Args:
        tau0: the starting temperature.
        rate: the decay rate ``r`` per step (>= 0).
        tau_min: the floor ``tau_min`` (<= tau0).
        every: ``N``, the temperature changes only at multiples of this many steps.

    Example:
        >>> s = ExponentialSchedule(tau0=1.0, rate=1e-3, tau_min=0.5, every=100)
        >>> s(0), s(99), round(s(100), 4), s(10_000)
        (1.0, 1.0, 0.9048, 0.5)
    """

    def __init__(self, tau0: float = 1.0, rate: float = 1e-4, tau_min: float = 0.5,
                 every: int = 500) -> None:
        self.tau0 = _positive(tau0, "tau0")
        self.tau_min = _positive(tau_min, "tau_min")
        if self.tau_min > self.tau0:
            raise ValueError(f"tau_min={tau_min} must not exceed tau0={tau0}")
        self.rate = _positive(rate, "rate", allow_zero=True)
        self.every = _count(every, "every", 1)

    def value(self, step: int) -> float:
        t = step - step % self.every
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * t))


class _Interpolated(TemperatureSchedule):
    """Goes from ``tau0`` at step 0 to ``tau_end`` at step ``steps``, then stays there."""

    def __init__(self, tau0: float = 1.0, tau_end: float = 0.5, steps: int = 1000) -> None:
        self.tau0 = _positive(tau0, "tau0")
        self.tau_end = _positive(tau_end, "tau_end")
        self.steps = _count(steps, "steps", 1)

    def value(self, step: int) -> float:
        frac = self.shape(min(step, self.steps) / self.steps)
        # a convex combination of two positive numbers, written so that it stays positive:
        # tau0 + (tau_end - tau0) * 1 rounds to 0.0 for tau0 = 1, tau_end = 1e-300
        tau = self.tau0 * (1.0 - frac) + self.tau_end * frac
        return min(max(tau, min(self.tau0, self.tau_end)), max(self.tau0, self.tau_end))

    @staticmethod
    def shape(x: float) -> float:
        raise NotImplementedError


class LinearSchedule(_Interpolated):
    r"""Linear interpolation, constant after ``steps``.

    .. math:: \tau(t) = \tau_0 + (\tau_{\mathrm{end}} - \tau_0)\, \min(t / T, 1)

    The value always lies between ``tau0`` and ``tau_end`` (both > 0), so it is never 0.

    Example:
        >>> s = LinearSchedule(tau0=1.0, tau_end=0.5, steps=100)
        >>> s(0), s(50), s(100), s(500)
        (1.0, 0.75, 0.5, 0.5)
        >>> LinearSchedule(tau0=1.0, tau_end=1e-300, steps=10)(10)
        1e-300
    """

    @staticmethod
    def shape(x: float) -> float:
        return x


class CosineSchedule(_Interpolated):
    r"""Half-cosine interpolation (Loshchilov and Hutter 2017), constant after ``steps``.

    .. math::
        \tau(t) = \tau_{\mathrm{end}} + \tfrac12(\tau_0 - \tau_{\mathrm{end}})
        \big(1 + \cos(\pi \min(t / T, 1))\big)

    Example:
        >>> s = CosineSchedule(tau0=1.0, tau_end=0.5, steps=100)
        >>> s(0), s(50), s(100), s(500)
        (1.0, 0.75, 0.5, 0.5)
    """

    @staticmethod
    def shape(x: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * x))


class LearnableTemperature(nn.Module):
    r"""A temperature learned by gradient descent, bounded below.

    .. math:: \tau = \tau_{\min} + \operatorname{softplus}(\theta)

    The softplus keeps ``tau >= tau_min > 0`` for every value of the parameter ``theta``, so
    no optimizer step can make the temperature zero or negative. ``theta`` starts where
    ``tau == init``. With ``shape`` you learn one temperature per distribution, e.g.
    ``shape=(n_latents, 1)`` for ``n_latents`` categorical variables along the last dim.
    Jang et al. (2017) note that a learned temperature acts as an entropy regularizer.

    Args:
        init: the starting temperature (> ``tau_min``, and within the range of ``dtype``).
        tau_min: the lower bound (> 0).
        shape: the shape of the parameter (``()``: one temperature).
        dtype: the parameter's dtype (default ``torch.get_default_dtype()``).

    Raises:
        ValueError: ``init <= tau_min``, or ``init`` beyond the largest value of ``dtype``
            (``LearnableTemperature(1e300)`` needs ``dtype=torch.float64``).

    Example:
        >>> import gumbelkit as gk
        >>> temp = LearnableTemperature(init=1.0, tau_min=0.1)
        >>> round(temp().item(), 6)
        1.0
        >>> y = gk.gumbel_softmax(torch.zeros(3), tau=temp(), generator=torch.Generator().manual_seed(0))
        >>> (y * torch.arange(3.0)).sum().backward(); temp.raw.grad is not None
        True
    """

    def __init__(self, init: float = 1.0, tau_min: float = 0.1,
                 shape: tuple[int, ...] | torch.Size = (), *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        init = _positive(init, "init")
        self.tau_min = _positive(tau_min, "tau_min")
        if init <= self.tau_min:
            raise ValueError(f"init={init} must be > tau_min={tau_min}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"dtype must be a real floating dtype, got {dtype!r}")
        big = torch.finfo(dtype).max
        if init > big:
            raise ValueError(f"init={init} does not fit in the parameter dtype {dtype} (largest "
                             f"{big:.4g}); use a smaller init, or dtype=torch.float64")
        # the inverse of softplus, log(expm1(x)), written to stay finite for large x
        x = init - self.tau_min
        raw = x + math.log(-math.expm1(-x))
        self.raw = nn.Parameter(torch.full(tuple(shape), raw, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return self.tau_min + nn.functional.softplus(self.raw)

    def extra_repr(self) -> str:
        return f"tau_min={self.tau_min}, shape={tuple(self.raw.shape)}"

"""Temperature schedules return their documented values; the learnable temperature is bounded."""

import doctest
import itertools
import math

import pytest
import torch

import gumbelkit as gk
import gumbelkit.schedules
from gumbelkit.schedules import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LearnableTemperature,
    LinearSchedule,
)


def test_docstring_examples():
    result = doctest.testmod(gumbelkit.schedules)
    assert result.attempted > 0 and result.failed == 0


def test_constant():
    s = ConstantSchedule(0.7)
    assert [s(t) for t in (0, 1, 10**9)] == [0.7, 0.7, 0.7]
    assert repr(s) == "ConstantSchedule(tau=0.7)"


def test_exponential_is_jang_et_al_formula():
    # tau = max(tau_min, tau0 * exp(-r * t)), t rounded down to a multiple of N
    tau0, r, tau_min, n = 2.0, 1e-3, 0.5, 50
    s = ExponentialSchedule(tau0=tau0, rate=r, tau_min=tau_min, every=n)
    for t in range(0, 3000, 7):
        expected = max(tau_min, tau0 * math.exp(-r * (t // n) * n))
        assert s(t) == pytest.approx(expected, rel=1e-15), t
    assert s(0) == s(n - 1) == tau0
    assert s(n) == pytest.approx(tau0 * math.exp(-r * n))
    assert s(10**7) == tau_min


def test_exponential_paper_defaults():
    s = ExponentialSchedule()  # tau0 = 1, r = 1e-4, tau_min = 0.5, N = 500 (Jang et al. 2017)
    assert (s.tau0, s.rate, s.tau_min, s.every) == (1.0, 1e-4, 0.5, 500)
    assert s(499) == 1.0
    assert s(500) == pytest.approx(math.exp(-0.05))


@pytest.mark.parametrize("cls", [LinearSchedule, CosineSchedule])
def test_interpolated_endpoints_and_monotone(cls):
    s = cls(tau0=1.0, tau_end=0.2, steps=200)
    values = [s(t) for t in range(0, 400)]
    assert values[0] == 1.0
    assert values[200] == pytest.approx(0.2, abs=1e-15)
    assert values[100] == pytest.approx(0.6, abs=1e-15)  # both pass the midpoint halfway
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert all(v == pytest.approx(0.2, abs=1e-15) for v in values[200:])


def test_linear_and_cosine_formulas():
    lin, cos = LinearSchedule(2.0, 1.0, 100), CosineSchedule(2.0, 1.0, 100)
    for t in range(0, 150, 5):
        x = min(t, 100) / 100
        assert lin(t) == pytest.approx(2.0 - x, abs=1e-15)
        assert cos(t) == pytest.approx(1.0 + 0.5 * (1 + math.cos(math.pi * x)), abs=1e-15)
    # warming up (tau_end > tau0) is allowed too
    assert LinearSchedule(0.5, 1.0, 10)(5) == pytest.approx(0.75)


@pytest.mark.parametrize("make, err", [
    (lambda: ConstantSchedule(0.0), ValueError),
    (lambda: ConstantSchedule(float("nan")), ValueError),
    (lambda: ConstantSchedule("1"), TypeError),
    (lambda: ExponentialSchedule(tau0=0.5, tau_min=1.0), ValueError),
    (lambda: ExponentialSchedule(rate=-1.0), ValueError),
    (lambda: ExponentialSchedule(every=0), ValueError),
    (lambda: LinearSchedule(steps=0), ValueError),
    (lambda: CosineSchedule(tau_end=-1.0), ValueError),
    (lambda: LearnableTemperature(init=0.1, tau_min=0.1), ValueError),
    (lambda: LearnableTemperature(init=1.0, tau_min=0.0), ValueError),
])
def test_bad_arguments(make, err):
    with pytest.raises(err):
        make()


def test_bad_step():
    s = ConstantSchedule()
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(TypeError, match="step"):
        s(1.5)


@pytest.mark.parametrize("init, tau_min", [(1.0, 0.1), (0.5, 1e-3), (60.0, 0.5), (0.1001, 0.1)])
def test_learnable_temperature_starts_at_init(init, tau_min):
    temp = LearnableTemperature(init=init, tau_min=tau_min)
    assert temp().item() == pytest.approx(init, rel=1e-6)


def test_learnable_temperature_bounded_and_gradient():
    temp = LearnableTemperature(init=1.0, tau_min=0.25, shape=(3, 1)).double()
    with torch.no_grad():
        temp.raw.copy_(torch.tensor([[-1e4], [0.0], [1e4]], dtype=torch.float64))
    tau = temp()
    assert tau.shape == (3, 1) and tau.dtype == torch.float64
    assert bool(torch.isfinite(tau).all()) and bool((tau >= 0.25).all())
    tau.sum().backward()
    # d tau / d raw = sigmoid(raw)
    torch.testing.assert_close(temp.raw.grad, torch.sigmoid(temp.raw.detach()))


def test_learnable_temperature_trains_through_gumbel_softmax():
    temp = LearnableTemperature(init=1.0, shape=(4, 1))
    gen = torch.Generator().manual_seed(0)
    y = gk.gumbel_softmax(torch.randn(4, 5, generator=gen), tau=temp(), generator=gen)
    (y * torch.arange(5.0)).sum().backward()
    assert temp.raw.grad is not None and bool(torch.isfinite(temp.raw.grad).all())
    with torch.no_grad():
        assert temp().shape == (4, 1)


# ----------------------------------------------------------------------------- extreme values (issue 12)

EXTREMES = [5e-324, 1e-300, 1e-30, 1e-6, 0.5, 1.0, 3.0, 1e6, 1e30, 1e300, 1.7e308]


@pytest.mark.parametrize("cls", [LinearSchedule, CosineSchedule])
def test_interpolated_schedules_never_return_zero_or_leave_the_endpoints(cls):
    """LinearSchedule(1.0, 1e-300) used to return 0.0 at the end (1 + (1e-300 - 1) * 1 == 0)."""
    assert LinearSchedule(1.0, 1e-300, 10)(10) == 1e-300
    for tau0, tau_end in itertools.product(EXTREMES, repeat=2):
        s = cls(tau0=tau0, tau_end=tau_end, steps=7)
        lo, hi = min(tau0, tau_end), max(tau0, tau_end)
        values = [s(t) for t in range(9)]
        assert all(lo <= v <= hi and v > 0 and math.isfinite(v) for v in values), (tau0, tau_end, values)
        assert values[0] == tau0 and values[-1] == tau_end


def test_learnable_temperature_out_of_range_init_is_a_clear_error_or_works_in_float64():
    with pytest.raises(ValueError, match=r"init=1e\+300 does not fit.*float32.*dtype=torch.float64"):
        LearnableTemperature(1e300)
    temp = LearnableTemperature(1e300, dtype=torch.float64)
    assert temp.raw.dtype == torch.float64 and temp().item() == pytest.approx(1e300, rel=1e-12)
    big = LearnableTemperature(3e38)  # just inside float32
    assert torch.isfinite(big()).all() and big().item() == pytest.approx(3e38, rel=1e-6)
    tiny = LearnableTemperature(0.1 + 1e-7, tau_min=0.1)  # init just above tau_min
    assert tiny().item() == pytest.approx(0.1 + 1e-7, rel=1e-6)
    half = LearnableTemperature(2.0, dtype=torch.float16)
    assert half.raw.dtype == torch.float16
    with pytest.raises(ValueError, match=r"init=100000\.0 does not fit.*float16"):
        LearnableTemperature(1e5, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        LearnableTemperature(2.0, dtype=torch.int64)

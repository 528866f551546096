"""gumbelkit.distributions at the edges: exact densities at subnormal, zero and one coordinates,
support checks calibrated to the rounding of genuine samples, ``validate_args`` semantics that
``torch.compile`` cannot flip, finite logits that stay possible, and tracing.

References are independent: 50-digit mpmath (skipped when mpmath is missing) or float64 formulas
written here from the papers, evaluated at the exact stored values. The conventions checked:
every nonzero value is read exactly; an exact 0 is read as the smallest positive float of the
value's dtype and an exact 1 (Binary Concrete) as ``1 - eps/2`` of it, the nearest interior
points; ``log_prob`` is returned in the compute dtype (float32 for half precision).
"""

import math

import pytest
import torch
import torch.distributions as td

import gumbelkit as gk
import gumbelkit.distributions as gkd
from gumbelkit.distributions import BinaryConcrete, Concrete, ExpConcrete, HardConcrete, PlackettLuce

F64 = torch.float64
NEG_INF = float("-inf")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HALF = (torch.float16, torch.bfloat16)
# dynamo traces (fullgraph: no graph break) and AOT autograd checks the graph, without the
# cost of inductor's code generation; the log_prob test also runs inductor
BACKEND = "aot_eager"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smallest(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def rtol_for(dtype: torch.dtype) -> float:
    # the result is computed in float32 (half, float32) or float64
    return 2e-6 if out_dtype(dtype) == torch.float32 else 1e-12


# ------------------------------------------------------------------ the issue's right values


def test_issue_values_concrete_and_binary_concrete_at_subnormals():
    logits = torch.tensor([0.0, 0.5, -0.5])
    y = torch.tensor([1e-40, 0.3, 0.7])
    assert Concrete(1.0, logits=logits).log_prob(y).item() == pytest.approx(-88.289, abs=5e-4)
    assert Concrete(0.05, logits=logits).log_prob(y).item() == pytest.approx(79.163, abs=5e-4)
    b = BinaryConcrete(0.004, logits=torch.tensor(-4.0))
    assert b.log_prob(torch.tensor(1e-40)).item() == pytest.approx(82.8981, abs=5e-5)
    b64 = BinaryConcrete(0.004, logits=torch.tensor(-4.0, dtype=F64))
    assert b64.log_prob(torch.tensor(1e-310, dtype=F64)).item() == pytest.approx(706.5825, abs=5e-5)


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("dtype", HALF)
def test_half_concrete_sample_with_many_categories_has_a_finite_exact_log_prob(tau, dtype):
    """K = 2000 in half precision: the log-density exceeds float16's range, so it is float32,
    and it equals a float64 evaluation at the same stored values (zeros read as the smallest
    positive float of the dtype)."""
    d = Concrete(tau, logits=torch.randn(3, 2000, generator=gen(1)).to(dtype))
    y = d.sample(generator=gen(2))
    lp = d.log_prob(y)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    y64 = y.double().clamp_min(smallest(dtype))
    log_y = y64.log()
    logits, t = d.logits.double(), d.temperature.double()[..., None]
    K = y.shape[-1]
    want = (math.lgamma(K) + (K - 1) * t[..., 0].log() + (logits - (t + 1) * log_y).sum(-1)
            - K * torch.logsumexp(logits - t * log_y, -1))
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------ mpmath references


def _mp():
    return pytest.importorskip("mpmath")


def mp_concrete(y, logits, tau, zero):
    """Maddison et al. (2017) eq. (6) in 50 digits, an exact 0 read as ``zero``."""
    mp = _mp()
    mp.mp.dps = 50
    y = [mp.mpf(v) if v > 0 else mp.mpf(zero) for v in y]
    logits, tau, K = [mp.mpf(v) for v in logits], mp.mpf(tau), len(y)
    terms = [logits[k] - (tau + 1) * mp.log(y[k]) for k in range(K)]
    lse = mp.log(mp.fsum(mp.exp(logits[k] - tau * mp.log(y[k])) for k in range(K)))
    return mp.loggamma(K) + (K - 1) * mp.log(tau) + mp.fsum(terms) - K * lse


def mp_exp_concrete(x, logits, tau):
    mp = _mp()
    mp.mp.dps = 50
    x, logits, tau, K = [mp.mpf(v) for v in x], [mp.mpf(v) for v in logits], mp.mpf(tau), len(x)
    s = [logits[k] - tau * x[k] for k in range(K)]
    lse = mp.log(mp.fsum(mp.exp(v) for v in s))
    return mp.loggamma(K) + (K - 1) * mp.log(tau) + mp.fsum(s) - K * lse


def mp_binary(s, logit, tau, dtype):
    """log of tau e^l s^(-tau-1) (1-s)^(-tau-1) / (e^l s^-tau + (1-s)^-tau)^2; 0 and 1 read as
    the nearest interior floats of ``dtype``."""
    mp = _mp()
    mp.mp.dps = 50
    eps = torch.finfo(dtype).eps
    s = mp.mpf(smallest(dtype)) if s <= 0 else (1 - mp.mpf(eps) / 2 if s >= 1 else mp.mpf(s))
    logit, tau = mp.mpf(logit), mp.mpf(tau)
    return (mp.log(tau) + logit - (tau + 1) * (mp.log(s) + mp.log(1 - s))
            - 2 * mp.log(mp.exp(logit) * s ** -tau + (1 - s) ** -tau))


def mp_hard(z, logit, tau, lo, hi):
    """Louizos et al. (2018): point masses at 0 and 1, the stretched density in between."""
    mp = _mp()
    mp.mp.dps = 50
    logit, tau, lo, hi = (mp.mpf(v) for v in (logit, tau, lo, hi))

    def cdf(s):
        return 1 / (1 + mp.exp(-(tau * mp.log(s / (1 - s)) - logit)))

    if z <= 0:
        return mp.log(cdf(-lo / (hi - lo)))
    if z >= 1:
        return mp.log(1 - cdf((1 - lo) / (hi - lo)))
    s = (mp.mpf(z) - lo) / (hi - lo)
    dens = (tau * mp.exp(logit) * s ** (-tau - 1) * (1 - s) ** (-tau - 1)
            / (mp.exp(logit) * s ** -tau + (1 - s) ** -tau) ** 2)
    return mp.log(dens / (hi - lo))


def mp_plackett_luce(logits, order):
    mp = _mp()
    mp.mp.dps = 50
    left = list(range(len(logits)))
    total = mp.mpf(0)
    for i in order:
        total += mp.mpf(logits[i]) - mp.log(mp.fsum(mp.exp(mp.mpf(logits[j])) for j in left))
        left.remove(i)
    return total


def close(got: torch.Tensor, want, dtype: torch.dtype) -> None:
    want = float(want)
    assert got.dtype == out_dtype(dtype)
    assert got.item() == pytest.approx(want, rel=rtol_for(dtype), abs=rtol_for(dtype)), (got.item(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_concrete_log_prob_at_subnormal_zero_and_one_coordinates(dtype, tau):
    fi = torch.finfo(dtype)
    d = Concrete(tau, logits=torch.tensor([0.0, 0.5, -0.5], dtype=dtype))
    logits, t = d.logits.tolist(), d.temperature.item()
    points = [
        [fi.tiny / 4, 0.3, 0.7],     # a subnormal coordinate
        [fi.tiny * 3, 0.3, 0.7],     # a small normal one, for monotonicity below
        [smallest(dtype), 0.3, 0.7],  # the smallest positive float
        [0.0, 0.3, 0.7],             # an exact zero
        [0.0, 0.0, 1.0],             # a vertex: two zeros and a one
        [1.0, 0.0, 0.0],
    ]
    got = []
    for p in points:
        y = torch.tensor(p, dtype=dtype)
        lp = d.log_prob(y)
        close(lp, mp_concrete(y.tolist(), logits, t, smallest(dtype)), dtype)
        got.append(lp.item())
    # an exact zero is the smallest positive float: the same density, no jump at the boundary
    assert got[3] == pytest.approx(got[2], rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_concrete_log_prob_at_log_subnormal_zero_and_one_coordinates(dtype):
    d = ExpConcrete(0.5, logits=torch.tensor([0.0, 0.5, -0.5], dtype=dtype))
    logits, t = d.logits.tolist(), d.temperature.item()
    low = max(math.log(smallest(torch.float32)), torch.finfo(dtype).min)  # log of a subnormal
    for p in ([low, math.log(0.3), math.log(0.7)], [-30.0, -1e-13, -30.0], [-2000.0, 0.0, -2000.0]):
        x = torch.tensor(p, dtype=dtype)
        if abs(torch.logsumexp(x.double(), 0).item()) > 1e-3:
            continue  # not representable on the simplex in this dtype
        close(d.log_prob(x), mp_exp_concrete(x.tolist(), logits, t), dtype)
    # a coordinate of exactly -inf (a zero) of a possible category: the limit, density 0
    for p in ([NEG_INF, math.log(0.3), math.log(0.7)], [0.0, NEG_INF, NEG_INF]):
        assert d.log_prob(torch.tensor(p, dtype=dtype)).item() == NEG_INF


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tau", "logit"), [(0.004, -4.0), (0.5, 0.0), (3.0, 2.5)])
def test_binary_concrete_log_prob_at_subnormal_zero_and_one(dtype, tau, logit):
    fi = torch.finfo(dtype)
    d = BinaryConcrete(tau, logits=torch.tensor(logit, dtype=dtype))
    t, l = d.temperature.item(), d.logits.item()
    for s in (fi.tiny / 4, smallest(dtype), fi.tiny, 0.0, 0.3, 1.0 - fi.eps / 2, 1.0):
        v = torch.tensor(s, dtype=dtype)
        close(d.log_prob(v), mp_binary(v.item(), l, t, dtype), dtype)
    # the closed interval is read continuously: 0 as the smallest float, 1 as 1 - eps/2
    lp = d.log_prob(torch.tensor([0.0, smallest(dtype), 1.0, 1 - fi.eps / 2], dtype=dtype))
    assert lp[0] == lp[1] and lp[2] == lp[3]
    outside = BinaryConcrete(tau, logits=torch.tensor(logit, dtype=dtype), validate_args=False)
    assert (outside.log_prob(torch.tensor([-0.5, 1.5], dtype=dtype)) == NEG_INF).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_concrete_log_prob_at_subnormal_zero_and_one(dtype):
    fi = torch.finfo(dtype)
    lo, hi = -0.1, 1.1
    d = HardConcrete(2 / 3, torch.tensor(0.7, dtype=dtype), lower=lo, upper=hi)
    t, l = d.temperature.item(), d.logits.item()
    for z in (0.0, fi.tiny / 4, smallest(dtype), 0.5, 1.0 - fi.eps / 2, 1.0):
        v = torch.tensor(z, dtype=dtype)
        close(d.log_prob(v), mp_hard(v.item(), l, t, lo, hi), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plackett_luce_log_prob_with_subnormal_zero_and_one_probabilities(dtype):
    big = min(200.0, 0.9 * torch.finfo(dtype).max)
    cases = [
        [0.0, -100.0, -110.0, 1.0],  # first-pick probabilities e^-100: subnormal in float32
        [0.0, -big, -big / 2, 3.0],  # the later picks hold almost no mass: P(order) ~ 1
    ]
    for raw in cases:
        d = PlackettLuce(torch.tensor(raw, dtype=dtype), k=3)
        logits = d.logits.tolist()
        for order in ([3, 0, 1], [1, 2, 0], [2, 1, 3]):
            got = d.log_prob(torch.tensor(order))
            want = float(mp_plackett_luce(logits, order))
            assert got.dtype == out_dtype(dtype)
            assert got.item() == pytest.approx(want, rel=rtol_for(dtype), abs=1e-6)
    # an impossible (-inf) category: probability exactly 0 when picked
    d = PlackettLuce(torch.tensor([0.0, NEG_INF, 1.0], dtype=dtype), k=2)
    assert d.log_prob(torch.tensor([1, 0])).item() == NEG_INF
    assert math.isfinite(d.log_prob(torch.tensor([2, 0])).item())


# ------------------------------------------------------------------ finite logits stay possible


@pytest.mark.parametrize("raw", [
    torch.tensor([6e4, -6e4], dtype=torch.float16),
    torch.tensor([3e38, -3e38], dtype=torch.bfloat16),
    torch.tensor([3e38, -3e38]),
    torch.tensor([1e308, -1e308], dtype=F64),
])
def test_finite_logits_that_normalization_would_overflow_stay_possible(raw):
    """Normalizing (logits - logsumexp) used to overflow these to -inf, so PlackettLuce said
    'k larger than allowed' and Concrete made a possible category impossible."""
    pl = PlackettLuce(raw)  # k = n = 2: a full ranking is always possible
    assert torch.isfinite(pl.logits).all()
    assert pl.log_prob(torch.tensor([0, 1])).item() == 0.0
    gap = raw[0].item() - raw[1].item()
    if gap < torch.finfo(out_dtype(raw.dtype)).max:
        assert pl.log_prob(torch.tensor([1, 0])).item() == pytest.approx(-gap, rel=1e-3)
    else:  # the exact value overflows the compute dtype
        assert pl.log_prob(torch.tensor([1, 0])).item() == NEG_INF
    c = ExpConcrete(1.0, logits=raw)
    assert torch.isfinite(c.logits).all()
    x = torch.tensor([0.0, -1.0]).log_softmax(-1).to(raw.dtype)
    assert not torch.isnan(c.log_prob(x))
    # a coordinate of -inf is the boundary of a possible category (density 0), not an impossible one
    assert c.log_prob(torch.tensor([0.0, NEG_INF], dtype=raw.dtype)).item() == NEG_INF
    assert ExpConcrete(1.0, logits=torch.tensor([0.0, NEG_INF], dtype=raw.dtype)).log_prob(
        torch.tensor([0.0, NEG_INF], dtype=raw.dtype)).item() == 0.0


def test_plackett_luce_samples_finite_logits_far_apart():
    pl = PlackettLuce(torch.tensor([6e4, -6e4], dtype=torch.float16))
    assert (pl.sample((5,), generator=gen(3)) == torch.tensor([0, 1])).all()


@pytest.mark.parametrize("raw", [torch.tensor([3e38, -3e38]), torch.tensor([1e308, -1e308], dtype=F64)])
def test_plackett_luce_samples_finite_logits_at_the_dtype_range(raw):
    assert (PlackettLuce(raw).sample((5,), generator=gen(3)) == torch.tensor([0, 1])).all()


def test_finite_logits_far_apart_still_relax_at_high_temperature():
    raw = torch.tensor([6e4, -6e4], dtype=torch.float16)
    d = Concrete(torch.tensor(6e4, dtype=torch.float16), logits=raw)
    y = d.sample((2000,), generator=gen(4)).float()
    # y_1 = sigmoid((l_1 - l_0 + g_1 - g_0) / tau), the noise negligible: sigmoid(-2) = 0.1192
    assert y[:, 1].min().item() == pytest.approx(0.1192, abs=2e-3)
    assert y[:, 1].max().item() == pytest.approx(0.1192, abs=2e-3)


def test_plackett_luce_error_names_the_rows_that_lack_categories():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, NEG_INF, NEG_INF]])
    with pytest.raises(ValueError, match=r"k=2 is larger than the number of possible .* 1 row\(s\)"):
        PlackettLuce(logits, k=2)
    assert PlackettLuce(logits, k=1).sample(generator=gen(5))[1].item() == 0


# ------------------------------------------------------------------ support calibration


def test_issue_off_support_points_are_rejected():
    f16, bf16 = torch.float16, torch.bfloat16
    cases = [
        (Concrete(0.5, logits=torch.zeros(1000, dtype=f16)), torch.full((1000,), 1.9 / 1000, dtype=f16)),
        (Concrete(0.5, logits=torch.zeros(1000, dtype=f16)), torch.full((1000,), 3.5 / 1000, dtype=f16)),
        (Concrete(0.5, logits=torch.zeros(1000, dtype=bf16)), torch.full((1000,), 2.0 / 1000, dtype=bf16)),
        (Concrete(0.5, logits=torch.zeros(20000)), torch.full((20000,), 1.002 / 20000)),
        (ExpConcrete(0.5, logits=torch.zeros(10)), torch.full((10,), 1.25 - math.log(10))),
    ]
    for d, v in cases:
        with pytest.raises(ValueError, match="outside the support"):
            d.log_prob(v)


def _nudge(y: torch.Tensor, delta: float) -> torch.Tensor:
    """``y`` with one entry moved so that the stored sum is ``1 + delta`` (float64): the entry
    nearest twice the change in size, which stays positive and is spaced finely enough."""
    y64 = y.double()
    err = 1 + delta - y64.sum(-1, keepdim=True)
    i = (y64 - 2 * err.abs()).abs().argmin(-1, keepdim=True)
    for _ in range(3):  # rounding of the moved entry: correct twice
        y = y64.scatter_add(-1, i, err).to(y.dtype)
        y64 = y.double()
        err = 1 + delta - y64.sum(-1, keepdim=True)
    return y


@pytest.mark.parametrize(("dtype", "K", "delta"), [
    (torch.float32, 20000, 2.9e-6), (torch.float16, 2000, 3.3e-4), (torch.bfloat16, 2000, 2.0e-3)])
def test_issue_genuine_rounding_is_accepted(dtype, K, delta):
    d = Concrete(1.0, logits=torch.zeros(K, dtype=dtype))
    y = _nudge(d.sample((4,), generator=gen(6)), delta)
    assert ((y.double().sum(-1) - 1).abs() >= 0.9 * delta).all()
    assert torch.isfinite(d.log_prob(y)).all()
    e = ExpConcrete(1.0, logits=torch.zeros(K, dtype=dtype))
    x = e.sample((4,), generator=gen(6))
    x = (x.double() + (delta - x.double().logsumexp(-1, keepdim=True))).to(dtype)
    assert torch.isfinite(e.log_prob(x)).all()


def _off_by(dtype: torch.dtype) -> float:
    """A relative error no genuine sample of K <= 100000 has in ``dtype``."""
    return {torch.float64: 1e-5, torch.float32: 2e-3, torch.float16: 0.05, torch.bfloat16: 0.25}[dtype]


KS = [2, 3, 10, 100, 1000, 20000, 100000]


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_genuine_samples_accepted_and_off_support_points_rejected(dtype, K):
    rows = max(2, min(64, 400_000 // K))
    g = gen(K)
    worst = 0.0
    for tau in (0.01, 1.0, 100.0):  # low temperature (many exact zeros) to high (near uniform)
        for scale in (0.0, 4.0):
            logits = (torch.randn(rows, K, generator=g) * scale).to(dtype)
            c = Concrete(tau, logits=logits)
            e = ExpConcrete(tau, logits=logits)
            if dtype in (torch.float32, F64):
                # torch's sampler subtracts logsumexp from unshifted scores, so at low temperature
                # its samples are off by eps * |logits + g| / tau: whatever torch's own simplex
                # constraint accepts, gumbelkit accepts (never stricter than torch's 1e-6)
                y = td.RelaxedOneHotCategorical(torch.tensor(tau, dtype=dtype), logits=logits,
                                                validate_args=False).sample()
                assert (c.support.check(y, dtype) | ~td.constraints.simplex.check(y)).all()
            for y in (c.sample(generator=g), gk.gumbel_softmax(logits, tau, generator=g)):
                assert not torch.isnan(c.log_prob(y)).any()  # accepted: raises otherwise
                tol = gkd._simplex_tolerance(y.to(out_dtype(dtype)), gkd._log_value(y.to(out_dtype(dtype))),
                                             (dtype,))
                worst = max(worst, ((y.double().sum(-1) - 1).abs() / tol.double()).max().item())
            x = e.sample(generator=g)
            assert not torch.isnan(e.log_prob(x)).any()
            # off the simplex by a relative error no genuine sample has: rejected, row by row
            for factor in (1 + _off_by(dtype), 1 - _off_by(dtype)):
                bad = (y.double() * factor).to(dtype)
                assert not c.support.check(bad, dtype).any()
                with pytest.raises(ValueError, match="outside the support"):
                    c.log_prob(bad)
                shifted = (x.double() + math.log(factor)).to(dtype)
                assert not e.support.check(shifted, dtype).any()
            neg = y.clone()
            neg[..., 0] = -neg[..., 0].abs() - torch.finfo(dtype).tiny
            assert not c.support.check(neg, dtype).any()
            nan = y.clone()
            nan[..., -1] = float("nan")
            assert not c.support.check(nan, dtype).any() and not e.support.check(nan.log(), dtype).any()
    # the stated margin: genuine samples use at most two thirds of the tolerance
    assert worst <= 2 / 3, worst


# ------------------------------------------------------------------ validate_args


@pytest.fixture
def restore_defaults():
    old = td.Distribution._validate_args
    # forget an earlier torch.compile in this worker (dynamo's one-off TorchPatcher.patch), so that
    # these tests see a process where torch's switch is the user's alone until they compile
    from torch._dynamo import eval_frame

    eval_frame.TorchPatcher.patch.cache_clear()
    td.Distribution.set_default_validate_args(True)
    yield
    td.Distribution.set_default_validate_args(old)
    gkd.set_default_validate_args(None)


def _validates(d) -> bool:
    try:
        d.log_prob(torch.tensor([0.9, 0.9, 0.9]))
    except ValueError:
        return True
    return False


def test_validate_args_explicit_and_torch_default_decided_at_construction(restore_defaults):
    z = torch.zeros(3)
    assert _validates(Concrete(1.0, logits=z, validate_args=True))
    assert not _validates(Concrete(1.0, logits=z, validate_args=False))
    td.Distribution.set_default_validate_args(True)
    on = Concrete(1.0, logits=z)
    td.Distribution.set_default_validate_args(False)
    off = Concrete(1.0, logits=z)
    assert not _validates(off)
    assert _validates(on)  # decided at construction, like an explicit validate_args
    assert _validates(Concrete(1.0, logits=z, validate_args=True))
    td.Distribution.set_default_validate_args(True)
    assert not _validates(off) and _validates(Concrete(1.0, logits=z))
    assert _validates(on.expand((2,)))  # expand keeps the decision
    with pytest.raises(ValueError, match="temperature"):  # parameters too
        Concrete(-1.0, logits=z)
    assert Concrete(-1.0, logits=z, validate_args=False).batch_shape == ()


def test_validate_args_survive_torch_compile_flipping_torchs_default(restore_defaults):
    z = torch.zeros(3)
    td.Distribution.set_default_validate_args(True)
    torch.compile(lambda t: t + 1, backend=BACKEND)  # dynamo's TorchPatcher: torch's default False for good
    assert td.Distribution._validate_args is False
    assert _validates(Concrete(1.0, logits=z))  # still torch's documented default: on
    with pytest.raises(ValueError, match="temperature"):
        BinaryConcrete(0.0, logits=z)
    # a True set after the flip is the user's; gumbelkit's own switch is unambiguous
    td.Distribution.set_default_validate_args(True)
    assert _validates(Concrete(1.0, logits=z))
    gkd.set_default_validate_args(False)
    assert not _validates(Concrete(1.0, logits=z)) and _validates(Concrete(1.0, logits=z, validate_args=True))
    gkd.set_default_validate_args(True)
    td.Distribution.set_default_validate_args(False)
    assert _validates(Concrete(1.0, logits=z))
    with pytest.raises(TypeError, match="True, False or None"):
        gkd.set_default_validate_args(1)


# ------------------------------------------------------------------ tracing


def _log_prob_cases():
    l = torch.randn(4, 5, generator=gen(7))
    y = torch.softmax(torch.randn(4, 5, generator=gen(8)), -1)
    s = torch.rand(4, 5, generator=gen(9))
    return {
        "Concrete": (lambda l, y, s: Concrete(0.5, logits=l, validate_args=False).log_prob(y)),
        "ExpConcrete": (lambda l, y, s: ExpConcrete(torch.tensor(0.5), logits=l, validate_args=False)
                        .log_prob(y.log())),
        "BinaryConcrete": (lambda l, y, s: BinaryConcrete(0.5, logits=l, validate_args=False).log_prob(s)),
        "HardConcrete": (lambda l, y, s: HardConcrete(0.5, l, validate_args=False).log_prob(s)),
        "PlackettLuce": (lambda l, y, s: PlackettLuce(l, k=2, validate_args=False)
                         .log_prob(torch.tensor([0, 1]))),
    }, (l, y, s)


@pytest.mark.parametrize("backend", [BACKEND, "inductor"])
@pytest.mark.parametrize("name", ["Concrete", "ExpConcrete", "BinaryConcrete", "HardConcrete", "PlackettLuce"])
def test_log_prob_compiles_fullgraph_without_validation(name, backend):
    cases, args = _log_prob_cases()
    fn = cases[name]
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend=backend)(*args), fn(*args))


@pytest.mark.parametrize("cls", [BinaryConcrete, HardConcrete])
def test_binary_rsample_compiles_fullgraph_without_validation(cls):
    l = torch.randn(4, 5, generator=gen(10))
    torch._dynamo.reset()
    out = torch.compile(lambda l: cls(0.5, logits=l, validate_args=False).rsample((2,)), fullgraph=True,
                        backend=BACKEND)(l)
    assert out.shape == (2, 4, 5) and ((out >= 0) & (out <= 1)).all()


def test_concrete_rsample_compiles_fullgraph_without_validation():
    l = torch.randn(4, 5, generator=gen(11))
    torch._dynamo.reset()
    y = torch.compile(lambda l: Concrete(0.5, logits=l, validate_args=False).rsample(), fullgraph=True,
                      backend=BACKEND)(l)
    assert y.shape == (4, 5) and torch.allclose(y.sum(-1), torch.ones(4))


def test_log_prob_with_validation_compiles_and_still_raises():
    l = torch.randn(4, 5, generator=gen(12))
    y = torch.softmax(torch.randn(4, 5, generator=gen(13)), -1)

    def fn(l, y):
        return Concrete(0.5, logits=l, validate_args=True).log_prob(y)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=BACKEND)
    torch.testing.assert_close(compiled(l, y), fn(l, y))
    with pytest.raises(ValueError, match="outside the support"):
        compiled(l, y * 2)
    # the default (validate_args=None) inside a compiled function: still torch's documented
    # default, not the False that torch.compile wrote into Distribution._validate_args
    torch._dynamo.reset()
    default = torch.compile(lambda l, y: Concrete(0.5, logits=l).log_prob(y), backend=BACKEND)
    torch.testing.assert_close(default(l, y), fn(l, y))
    with pytest.raises(ValueError, match="outside the support"):
        default(l, y * 2)


# ------------------------------------------------------------------ validation inside an operator
#
# With validation on (the default) every data-reading check runs in the operator gumbelkit::check:
# the same ValueError, message for message, eagerly, from a fullgraph-compiled function, from an
# exported program (bad data arriving at run time) and under vmap; results and gradients unchanged.


def _validation_cases():
    g = gen(60)
    l, t = torch.randn(4, 5, generator=g), torch.tensor([0.5, 1.0, 2.0, 0.7])
    y = torch.softmax(torch.randn(4, 5, generator=g), -1)
    p, s, q = (torch.rand(4, 5, generator=g) for _ in range(3))
    v = torch.tensor([[0, 1], [4, 2], [3, 0], [2, 1]])

    def with_(args, i, index, value):
        args = [a.clone() for a in args]
        args[i][index] = value
        return tuple(args)

    def binary(p, t, s, q):
        d = BinaryConcrete(t.unsqueeze(-1), probs=p)
        return d.log_prob(s) + d.cdf(s) + d.icdf(q)

    concrete = (l, t, y)
    return {
        "Concrete": (lambda l, t, y: Concrete(t, logits=l).log_prob(y), concrete, [
            (with_(concrete, 1, 2, -1.0), "temperature of shape"),
            (with_(concrete, 0, (1, 3), float("nan")), "logits of shape"),
            (with_(concrete, 2, (0, 0), 0.9), "outside the support"),
        ]),
        "ExpConcrete": (lambda l, t, x: ExpConcrete(t, logits=l).log_prob(x), (l, t, y.log()), [
            (with_((l, t, y.log()), 2, (3, 1), 0.5), "outside the support"),
            (with_((l, t, y.log()), 1, 0, float("inf")), "temperature of shape"),
        ]),
        "BinaryConcrete": (binary, (p, t, s, q), [
            (with_((p, t, s, q), 0, (2, 2), 1.5), "probs must be finite"),
            (with_((p, t, s, q), 2, (0, 4), -0.1), "outside the support"),
            (with_((p, t, s, q), 3, (1, 1), 2.0), "icdf takes probabilities"),
        ]),
        "HardConcrete": (lambda l, t, z: HardConcrete(t.unsqueeze(-1), l).log_prob(z), (l, t, s), [
            (with_((l, t, s), 0, (0, 0), float("inf")), "logits of shape"),
            (with_((l, t, s), 2, (3, 3), -0.5), "outside the support"),
        ]),
        "PlackettLuce": (lambda l, v: PlackettLuce(l, k=2).log_prob(v), (l, v), [
            (with_((l, v), 0, (2, slice(1, None)), NEG_INF), "k=2 is larger"),
            (with_((l, v), 1, (1, 1), 4), "outside the support"),
            (with_((l, v), 1, (0, 1), 7), "outside the support"),
        ]),
    }


def _message(fn, args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("name", ["Concrete", "ExpConcrete", "BinaryConcrete", "HardConcrete", "PlackettLuce"])
def test_default_validation_raises_the_same_error_compiled_fullgraph_and_exported(name):
    fn, good, bad = _validation_cases()[name]
    want = fn(*good)
    eager = [_message(fn, args) for args, _ in bad]
    for message, (_, match) in zip(eager, bad, strict=True):
        assert match in message, message
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    torch.testing.assert_close(compiled(*good), want)
    assert [_message(compiled, args) for args, _ in bad] == eager
    exported = torch.export.export(_Fn(fn), good).module()
    torch.testing.assert_close(exported(*good), want)
    assert [_message(exported, args) for args, _ in bad] == eager


@pytest.mark.parametrize("name", ["Concrete", "PlackettLuce"])
def test_default_validation_raises_under_inductor_before_the_indices_are_used(name):
    # inductor keeps the check (its zero is used) and runs it before PlackettLuce's gather reads
    # an index out of range: the ValueError, not an indexing assert
    fn, good, bad = _validation_cases()[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*good), fn(*good))
    assert [_message(compiled, args) for args, _ in bad] == [_message(fn, args) for args, _ in bad]


def test_default_validation_under_vmap_checks_every_element_with_the_eager_message():
    logits = torch.randn(5, generator=gen(61))
    y = torch.softmax(torch.randn(3, 4, 5, generator=gen(62)), -1)
    fn = lambda y: Concrete(0.5, logits=logits).log_prob(y)  # noqa: E731
    for randomness in ("different", "same", "error"):
        torch.testing.assert_close(torch.func.vmap(fn, randomness=randomness)(y), fn(y))
    bad = y.clone()
    bad[1, 2, 0] = 0.9
    assert _message(torch.func.vmap(fn), (bad,)) == _message(fn, (bad[1],))  # the first bad element's
    assert _message(torch.func.vmap(torch.func.vmap(fn)), (bad,)) == _message(fn, (bad[1, 2],))
    # parameters checked per element too: a temperature constructed inside vmap
    temps = torch.tensor([0.5, -2.0, 1.0])
    make = lambda t: ExpConcrete(t, logits=logits).rsample()  # noqa: E731
    assert _message(torch.func.vmap(make, randomness="different"), (temps,)) == _message(make, (temps[1],))
    assert torch.func.vmap(make, randomness="same")(temps.abs()).shape == (3, 5)


@pytest.mark.parametrize("name", ["Concrete", "ExpConcrete", "BinaryConcrete", "HardConcrete", "PlackettLuce"])
def test_validation_changes_neither_results_nor_gradients(name):
    fn, good, _ = _validation_cases()[name]
    floats = [i for i, a in enumerate(good) if a.is_floating_point()]

    def run(validate):
        gkd.set_default_validate_args(validate)
        try:
            args = [a.clone().requires_grad_() if i in floats else a for i, a in enumerate(good)]
            out = fn(*args)
            grads = torch.autograd.grad(out.sum(), [args[i] for i in floats], allow_unused=True)
            # forward mode through torch.func, along the first argument
            tangent = torch.func.jvp(lambda x: fn(x, *good[1:]), (good[0],), (torch.ones_like(good[0]),))[1]
            return out, (*grads, tangent)
        finally:
            gkd.set_default_validate_args(None)

    (a, ga), (b, gb) = run(True), run(False)
    assert torch.equal(a, b)
    for x, z in zip(ga, gb, strict=True):
        assert (x is None and z is None) or torch.equal(x, z)


def test_check_operator_passes_opcheck():
    from gumbelkit._kernels.checks import check

    y = torch.softmax(torch.randn(3, 4, generator=gen(63)), -1)
    for args in [(torch.rand(3) + 0.1, "temperature", "temperature", 0, torch.float16, 0),
                 (y, "simplex", "Concrete", 4, torch.float32, 0),
                 (torch.tensor([[0, 2], [3, 1]]), "ordered_subset", "PlackettLuce", 4, None, 0)]:
        torch.library.opcheck(check, args)
        assert check(*args).shape == () and check(*args).item() == 0


def test_temperature_out_of_the_logits_dtype_names_the_argument_and_the_fix():
    half = torch.zeros(3, dtype=torch.float16)
    for temperature in (1e5, torch.tensor(1e5), torch.tensor([1.0, 1e5])):
        with pytest.raises(ValueError, match=r"\[100000\.0\] overflows torch\.float16.*logits\.to\(torch\.float32\)"):
            Concrete(temperature, logits=half.expand(2, 3) if isinstance(temperature, torch.Tensor) else half)
    with pytest.raises(ValueError, match=r"temperature \[1e-09\] underflows to 0 in torch\.float16"):
        BinaryConcrete(1e-9, logits=half)
    with pytest.raises(ValueError, match=r"temperature of shape \(\) must satisfy PositiveFinite.*\[-1\.0\]"):
        Concrete(-1.0, logits=half)  # a bad value in any dtype: the constraint's message
    with pytest.raises(ValueError, match=r"temperature \[1e-50\] underflows to 0 in torch\.float32.*torch\.float64"):
        ExpConcrete(torch.tensor(1e-50, dtype=F64), logits=half.float())
    assert Concrete(1e5, logits=half.float()).temperature.item() == 1e5
    assert Concrete(2.0, logits=half).temperature.dtype == torch.float16

"""gumbelkit.distributions: densities, goodness of fit, gradients, interop and bad input.

Statistical tests use a fixed seed each and reject at p < 1e-3 (stated in each assert).
Reference densities are written here straight from the papers, in float64.
"""

import doctest
import itertools
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.distributions as td
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.integrate import tanhsinh
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

import gumbelkit as gk
import gumbelkit.distributions as gkd
import reference as ref
from gumbelkit.distributions import (
    BinaryConcrete,
    Concrete,
    ExpConcrete,
    HardConcrete,
    PlackettLuce,
    kl_monte_carlo,
)

F64 = torch.float64
NEG_INF = float("-inf")
P_MIN = 1e-3  # reject a goodness-of-fit test below this p-value
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributions"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ------------------------------------------------------------------ reference formulas (float64)

def concrete_log_pdf(y: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Maddison et al. (2017), eq. (6): density on (y_1..y_{K-1}) of the Concrete."""
    K = y.shape[-1]
    log_y = y.log()
    return (math.lgamma(K) + (K - 1) * math.log(tau) + (logits - (tau + 1) * log_y).sum(-1)
            - K * torch.logsumexp(logits - tau * log_y, -1))


def binary_concrete_cdf(y: torch.Tensor, logit: float, tau: float) -> torch.Tensor:
    """P(Y <= y) = sigmoid(tau * logit(y) - logit): Y = sigmoid((logit + L) / tau), L logistic."""
    return torch.sigmoid(tau * torch.logit(y) - logit)


def hard_concrete_masses(logit: float, tau: float, lo: float, hi: float) -> tuple[float, float]:
    """P(z = 0), P(z = 1) of the stretched-and-clipped Binary Concrete (Louizos et al. 2018)."""
    cdf = lambda s: 1 / (1 + math.exp(-(tau * math.log(s / (1 - s)) - logit)))  # noqa: E731
    return cdf(-lo / (hi - lo)), 1 - cdf((1 - lo) / (hi - lo))


def chi2_pvalue(counts, probs) -> float:
    counts = torch.as_tensor(counts, dtype=F64)
    probs = torch.as_tensor(probs, dtype=F64)
    return stats.chisquare(counts.numpy(), (probs / probs.sum() * counts.sum()).numpy()).pvalue


def integrate_2d(f, lo: float, hi: float, rtol: float = 1e-8) -> float:
    """Nested tanh-sinh quadrature of a vectorized ``f(a, b)`` over ``[lo, hi]^2``: robust to
    the integrable endpoint singularities of Concrete densities at small temperatures."""
    def inner(a):
        return tanhsinh(lambda b, a: f(*np.broadcast_arrays(a, b)), lo, hi, args=(a,), rtol=rtol).integral
    return float(tanhsinh(inner, lo, hi, rtol=rtol).integral)


def on_simplex(y1: np.ndarray, v: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(y1, v) in (0, 1)^2 -> y = (y1, (1 - y1) v, (1 - y1)(1 - v)), and the Jacobian 1 - y1."""
    y1, v = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (y1, v))
    return torch.stack([y1, (1 - y1) * v, (1 - y1) * (1 - v)], -1), (1 - y1).numpy()


# ------------------------------------------------------------------ densities


def test_concrete_log_prob_matches_paper_formula():
    g = gen(0)
    logits = torch.randn(50, 4, generator=g, dtype=F64)
    tau = torch.rand(50, generator=g, dtype=F64) * 3 + 0.05
    y = torch.distributions.Dirichlet(torch.ones(4, dtype=F64)).sample((50,))
    got = Concrete(tau, logits=logits).log_prob(y)
    want = torch.stack([concrete_log_pdf(y[i], logits[i], tau[i].item()) for i in range(50)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_log_prob_agrees_with_torch_where_finite():
    g = gen(1)
    for _ in range(20):
        logits = torch.randn(5, generator=g, dtype=F64) * 2
        tau = torch.rand((), generator=g, dtype=F64).item() * 2 + 0.1
        t = torch.tensor(tau, dtype=F64)
        x = ExpConcrete(tau, logits=logits).rsample((30,), generator=g)
        torch.testing.assert_close(ExpConcrete(tau, logits=logits).log_prob(x),
                                   ExpRelaxedCategorical(t, logits=logits).log_prob(x))
        ours = Concrete(tau, probs=logits.softmax(-1)).log_prob(x.exp())
        theirs = td.RelaxedOneHotCategorical(t, probs=logits.softmax(-1)).log_prob(x.exp())
        finite = torch.isfinite(theirs)
        assert finite.sum() > 20
        torch.testing.assert_close(ours[finite], theirs[finite])
        lb = torch.randn(30, generator=g, dtype=F64) * 3
        yb = BinaryConcrete(tau, logits=lb).rsample(generator=g)
        theirs = td.RelaxedBernoulli(t, logits=lb).log_prob(yb)
        # torch clamps values to [eps, 1 - eps] (clamp_probs); gumbelkit reads them exactly
        eps = torch.finfo(F64).eps
        finite = torch.isfinite(theirs) & (yb >= eps) & (yb <= 1 - eps)
        torch.testing.assert_close(BinaryConcrete(tau, logits=lb).log_prob(yb)[finite], theirs[finite])
        torch.testing.assert_close(BinaryConcrete(tau, probs=lb.sigmoid()).log_prob(yb)[finite],
                                   theirs[finite])


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_binary_and_k2_densities_integrate_to_one(tau):
    for logit in (-2.0, 0.0, 1.5):
        b = BinaryConcrete(tau, logits=torch.tensor(logit, dtype=F64))
        f = lambda y, b=b: b.log_prob(torch.tensor(y, dtype=F64)).exp().item()  # noqa: E731
        assert integrate.quad(f, 0, 1, limit=200)[0] == pytest.approx(1, abs=1e-6)
        c = Concrete(tau, logits=t64(logit, 0.0))
        f = lambda y, c=c: c.log_prob(t64(y, 1 - y)).exp().item()  # noqa: E731
        assert integrate.quad(f, 0, 1, limit=200)[0] == pytest.approx(1, abs=1e-6)
        # ExpConcrete: Lebesgue measure on the log-ratio t = x_1 - x_2
        e = ExpConcrete(tau, logits=t64(logit, 0.0))
        f = lambda t, e=e: e.log_prob(t64(t, 0.0).log_softmax(-1)).exp().item()  # noqa: E731
        assert integrate.quad(f, -math.inf, math.inf, limit=200)[0] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_k3_densities_integrate_to_one(tau):
    """The Concrete's density is w.r.t. dy_1 dy_2 on the simplex; ExpConcrete's w.r.t. the
    log-ratios (t_1, t_2) = (x_1 - x_3, x_2 - x_3) on R^2."""
    logits = t64(0.3, -0.7, 1.1)
    c = Concrete(tau, logits=logits, validate_args=False)

    def concrete(y1, v):
        y, jac = on_simplex(y1, v)
        return c.log_prob(y).exp().numpy() * jac

    assert integrate_2d(concrete, 0.0, 1.0) == pytest.approx(1, abs=1e-6)
    # ExpConcrete: the trapezoid rule on a grid of log-ratios, spectrally accurate for this
    # smooth integrand with exp(-tau |t|) tails
    h, L = 0.25 / tau, 35 / tau
    axis = torch.arange(-L, L + h / 2, h, dtype=F64)
    t = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    x = torch.cat([t, torch.zeros(len(t), 1, dtype=F64)], -1).log_softmax(-1)
    e = ExpConcrete(tau, logits=logits, validate_args=False)
    assert (e.log_prob(x).exp().sum() * h * h).item() == pytest.approx(1, abs=1e-6)


def test_hard_concrete_mass_plus_density_is_one():
    for tau, logit, lo, hi in [(2 / 3, 0.5, -0.1, 1.1), (0.3, -1.0, -0.5, 1.2), (1.5, 2.0, -0.05, 1.05)]:
        d = HardConcrete(tau, torch.tensor(logit, dtype=F64), lower=lo, upper=hi)
        p0, p1 = hard_concrete_masses(logit, tau, lo, hi)
        zero_one = d.log_prob(t64(0.0, 1.0)).exp()
        torch.testing.assert_close(zero_one, t64(p0, p1))
        cont = integrate.quad(lambda z, d=d: d.log_prob(torch.tensor(z, dtype=F64)).exp().item(),
                              0, 1, limit=200)[0]
        assert p0 + p1 + cont == pytest.approx(1, abs=1e-6)
        assert d.prob_nonzero().item() == pytest.approx(1 - p0, rel=1e-12)
        torch.testing.assert_close(d.cdf(t64(0.0, 1.0)), t64(p0, 1.0))


def test_plackett_luce_probabilities_sum_to_one_and_match_reference():
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]
    d = PlackettLuce(torch.tensor(probs, dtype=F64).log() + 3.0, k=3)  # unnormalized logits
    table = ref.plackett_luce_table(probs, 3)
    seqs = torch.tensor(list(table))
    torch.testing.assert_close(d.log_prob(seqs).exp(), torch.tensor(list(table.values()), dtype=F64))
    sets = torch.tensor(list(itertools.combinations(range(5), 3)))
    assert d.log_prob_unordered(sets).exp().sum().item() == pytest.approx(1, abs=1e-12)
    full = PlackettLuce(torch.tensor(probs, dtype=F64).log())
    perms = torch.tensor(list(itertools.permutations(range(5))))
    assert full.log_prob(perms).exp().sum().item() == pytest.approx(1, abs=1e-12)


def test_plackett_luce_log_prob_stable_when_first_picks_hold_all_mass():
    logits = torch.tensor([60.0, 40.0, 0.0, -5.0])  # float32: 1 - p_1 - p_2 underflows
    d = PlackettLuce(logits, k=3)
    lp = d.log_prob(torch.tensor([0, 1, 2])).item()
    l64 = logits.double()
    want = sum(l64[j] - torch.logsumexp(l64[j:], 0) for j in range(3)).item()
    assert lp == pytest.approx(want, abs=1e-4)
    assert math.isfinite(d.log_prob(torch.tensor([3, 2, 1])).item())


# ------------------------------------------------------------------ goodness of fit


@pytest.mark.parametrize(("tau", "logit"), [(0.3, -2.0), (1.0, 0.5), (3.0, 2.0)])
def test_binary_concrete_pit_is_uniform(tau, logit):
    d = BinaryConcrete(tau, logits=torch.tensor(logit, dtype=F64))
    y = d.sample((20_000,), generator=gen(2))
    u = binary_concrete_cdf(y, logit, tau).numpy()
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    torch.testing.assert_close(d.cdf(y), binary_concrete_cdf(y, logit, tau))
    q = torch.rand(100, generator=gen(3), dtype=F64)
    torch.testing.assert_close(d.cdf(d.icdf(q)), q)


def test_exp_concrete_k2_log_ratio_is_logistic():
    # x_1 - x_2 = (l_1 - l_2 + g_1 - g_2) / tau: Logistic(l_1 - l_2, 1) after scaling by tau
    tau = 0.2
    x = ExpConcrete(tau, logits=t64(1.0, -0.5)).sample((20_000,), generator=gen(4))
    assert stats.kstest((tau * (x[:, 0] - x[:, 1])).numpy(), stats.logistic(loc=1.5).cdf).pvalue > P_MIN


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_concrete_k3_marginals_match_integrated_density(tau):
    """Each coordinate's 10 bin probabilities, integrating the paper's density over the simplex."""
    logits = t64(0.8, -0.4, 0.0)
    y = Concrete(tau, logits=logits).sample((20_000,), generator=gen(5))
    edges = np.linspace(0, 1, 11)
    for k in range(3):
        def marginal(y1, k=k):  # the density of y_k at y1: integrate out the other two
            def inner(v, y1):
                yk, jac = on_simplex(*np.broadcast_arrays(y1, v))
                return concrete_log_pdf(yk.roll(k, -1), logits, tau).exp().numpy() * jac
            return tanhsinh(inner, 0.0, 1.0, args=(y1,), rtol=1e-10).integral

        probs = tanhsinh(marginal, edges[:-1], edges[1:], rtol=1e-8).integral
        assert probs.sum() == pytest.approx(1, abs=1e-6)
        counts = np.histogram(y[:, k].numpy(), edges)[0]
        assert chi2_pvalue(counts, probs) > P_MIN, k


def test_plackett_luce_ordered_pair_and_set_frequencies():
    probs = [0.1, 0.2, 0.3, 0.4]
    d = PlackettLuce(torch.tensor(probs).log(), k=2)
    pairs = d.sample((30_000,), generator=gen(6))
    table = ref.plackett_luce_table(probs, 2)
    index = {seq: i for i, seq in enumerate(table)}
    counts = torch.bincount(torch.tensor([index[tuple(p)] for p in pairs.tolist()]), minlength=len(table))
    assert chi2_pvalue(counts, list(table.values())) > P_MIN
    d3 = gkd.GumbelTopK(torch.tensor(probs).log(), 3)
    triples = d3.sample((30_000,), generator=gen(7)).sort(-1).values
    sets = list(itertools.combinations(range(4), 3))
    counts = torch.bincount(torch.tensor([sets.index(tuple(s)) for s in triples.tolist()]), minlength=4)
    exact = d3.log_prob_unordered(torch.tensor(sets)).exp()
    assert chi2_pvalue(counts, exact) > P_MIN


@pytest.mark.parametrize(("tau", "logit"), [(2 / 3, 0.0), (0.3, 1.0)])
def test_hard_concrete_point_masses_and_continuous_part(tau, logit):
    lo, hi = -0.1, 1.1
    d = HardConcrete(tau, torch.tensor(logit, dtype=F64), lower=lo, upper=hi)
    z = d.sample((30_000,), generator=gen(8))
    p0, p1 = hard_concrete_masses(logit, tau, lo, hi)
    inside = (z > 0) & (z < 1)
    counts = [(z == 0).sum(), (z == 1).sum(), inside.sum()]
    assert chi2_pvalue(counts, [p0, p1, 1 - p0 - p1]) > P_MIN
    s = (z[inside] - lo) / (hi - lo)
    cond_cdf = (binary_concrete_cdf(s, logit, tau) - p0) / (1 - p0 - p1)
    assert stats.kstest(cond_cdf.numpy(), "uniform").pvalue > P_MIN


# ------------------------------------------------------------------ stability


def test_finite_for_small_tau_and_many_categories():
    logits = torch.randn(4, 1000, generator=gen(9)) * 3
    for tau in (0.01, 0.1):
        e = ExpConcrete(tau, logits=logits)
        x = e.rsample((3,), generator=gen(10))
        lp = e.log_prob(x)
        assert torch.isfinite(x).all() and torch.isfinite(lp).all()
        lp64 = ExpConcrete(tau, logits=logits.double()).log_prob(x.double())
        torch.testing.assert_close(lp.double(), lp64, rtol=1e-4, atol=0.0)
        c = Concrete(tau, logits=logits)
        y = c.rsample((3,), generator=gen(10))
        assert (y == 0).any() and torch.isfinite(c.log_prob(y)).all()  # underflowed coordinates


def test_finite_on_the_boundary():
    onehot = torch.eye(4)
    assert torch.isfinite(Concrete(0.5, logits=torch.zeros(4)).log_prob(onehot)).all()
    edge = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert torch.isfinite(Concrete(torch.tensor([0.01, 1.0, 30.0]).unsqueeze(-1),
                                   logits=torch.zeros(4)).log_prob(edge)).all()
    ends = torch.tensor([0.0, 1.0])
    for tau in (0.01, 1.0, 10.0):
        for logit in (-80.0, 0.0, 80.0):  # torch's formula overflows exp(80) in float32
            b = BinaryConcrete(tau, logits=torch.tensor(logit))
            assert torch.isfinite(b.log_prob(ends)).all()
            assert torch.isfinite(b.log_prob(b.sample((100,), generator=gen(11)))).all()
            h = HardConcrete(tau, torch.tensor(logit))
            assert not torch.isnan(h.log_prob(h.sample((100,), generator=gen(12)))).any()


def test_impossible_categories():
    logits = torch.tensor([0.0, NEG_INF, 1.0, NEG_INF])
    e = ExpConcrete(0.5, logits=logits)
    x = e.rsample((100,), generator=gen(13))
    assert (x[:, [1, 3]] == NEG_INF).all() and torch.isfinite(e.log_prob(x)).all()
    # the same as the two-category distribution on the allowed coordinates
    torch.testing.assert_close(e.log_prob(x), ExpConcrete(0.5, logits=logits[[0, 2]]).log_prob(x[:, [0, 2]]))
    c = Concrete(0.5, logits=logits)
    y = x.exp()
    torch.testing.assert_close(c.log_prob(y), Concrete(0.5, logits=logits[[0, 2]]).log_prob(y[:, [0, 2]]))
    moved = torch.tensor([0.4, 0.1, 0.5, 0.0])  # mass on an impossible category
    assert c.log_prob(moved).item() == NEG_INF
    pl = PlackettLuce(logits, k=2)
    s = pl.sample((200,), generator=gen(14))
    assert set(s.flatten().tolist()) <= {0, 2}
    assert pl.log_prob(torch.tensor([1, 0])).item() == NEG_INF


def test_float16_computes_in_float32():
    logits = torch.randn(3, 50, generator=gen(15)).half()
    e = ExpConcrete(0.05, logits=logits)
    x = e.rsample(generator=gen(16))
    assert x.dtype == torch.float16 and torch.isfinite(e.log_prob(x)).all()
    b = BinaryConcrete(0.1, logits=logits)
    assert b.rsample(generator=gen(16)).dtype == torch.float16
    assert torch.isfinite(b.log_prob(b.sample(generator=gen(17)))).all()


# ------------------------------------------------------------------ shapes, batching, noise contract


def test_batched_temperatures_broadcast_against_the_batch_shape():
    logits = torch.randn(4, 6, generator=gen(18), dtype=F64)
    tau = torch.tensor([[0.1], [1.0], [5.0]], dtype=F64)
    for cls in (ExpConcrete, Concrete):
        d = cls(tau, logits=logits)
        assert d.batch_shape == (3, 4) and d.event_shape == (6,)
        v = d.sample((2,), generator=gen(19))
        assert v.shape == (2, 3, 4, 6)
        lp = d.log_prob(v)
        for i, j in itertools.product(range(3), range(4)):
            single = cls(tau[i, 0].item(), logits=logits[j]).log_prob(v[:, i, j])
            torch.testing.assert_close(lp[:, i, j], single)
    b = BinaryConcrete(tau, logits=logits[0])
    assert b.batch_shape == (3, 6) and b.rsample((5,)).shape == (5, 3, 6)
    # torch's idiom of a one-element temperature keeps the batch shape
    assert Concrete(torch.tensor([2.2]), probs=torch.tensor([0.1, 0.2, 0.3, 0.4])).batch_shape == ()


def test_expand():
    r = torch.randn(2, 5, generator=gen(52))
    for d in (ExpConcrete(torch.tensor([0.5, 1.0]), logits=r[:, :3]),
              Concrete(0.5, logits=r[:, :3]),
              BinaryConcrete(0.5, logits=r[:, 0]),
              HardConcrete(0.5, r[:, 0], lower=-0.2),
              PlackettLuce(r, k=3)):
        e = d.expand((4, 2))
        assert type(e) is type(d) and e.batch_shape == (4, 2)
        v = e.sample(generator=gen(20))
        assert v.shape == (4, 2, *d.event_shape)
        torch.testing.assert_close(e.log_prob(v), d.log_prob(v))
    assert HardConcrete(0.5, r[:, 0], lower=-0.2).expand((3, 2)).lower == -0.2


def test_noise_contract_and_reproducibility():
    logits = torch.randn(3, 5, generator=gen(21))
    d = ExpConcrete(0.7, logits=logits)
    x = d.rsample((2,), generator=gen(22))
    assert torch.equal(x, gk.log_gumbel_softmax(d.logits.expand(2, 3, 5), 0.7, generator=gen(22)))
    assert torch.equal(Concrete(0.7, logits=logits).rsample((2,), generator=gen(22)), x.exp())
    idx = PlackettLuce(logits, k=3).sample((2,), generator=gen(23))
    assert torch.equal(idx, gk.gumbel_topk(logits.expand(2, 3, 5), 3, generator=gen(23)).indices)
    # Binary Concrete = the first coordinate of a two-category Concrete on the same noise
    lb = torch.randn(7, generator=gen(24), dtype=F64)
    yb = BinaryConcrete(0.4, logits=lb).rsample(generator=gen(25))
    y2 = Concrete(0.4, logits=torch.stack([lb, torch.zeros_like(lb)], -1)).rsample(generator=gen(25))
    torch.testing.assert_close(yb, y2[:, 0], rtol=1e-12, atol=1e-12)
    h = HardConcrete(0.4, lb)
    assert torch.equal(h.rsample((3,), generator=gen(26)), h.rsample((3,), generator=gen(26)))


@given(batch=st.lists(st.integers(1, 3), max_size=2), K=st.integers(2, 6),
       tau=st.floats(0.02, 20.0), seed=st.integers(0, 2 ** 16))
def test_property_samples_in_support_and_log_prob_finite(batch, K, tau, seed):
    g = gen(seed)
    logits = torch.randn(*batch, K, generator=g) * 3
    c = Concrete(tau, logits=logits)  # validate_args: log_prob checks the support
    y = c.sample((2,), generator=g)
    assert y.shape == (2, *batch, K) and torch.isfinite(c.log_prob(y)).all()
    e = ExpConcrete(tau, logits=logits)
    assert torch.isfinite(e.log_prob(e.sample(generator=g))).all()
    pl = PlackettLuce(logits, k=min(K, 3))
    s = pl.sample(generator=g)
    assert torch.isfinite(pl.log_prob(s)).all() and (pl.log_prob(s) <= 0).all()


# ------------------------------------------------------------------ gradients


def test_rsample_gradients_match_float64_reference_on_the_same_noise():
    logits = torch.randn(3, 6, generator=gen(27), requires_grad=True)
    tau = torch.tensor([0.05, 0.5, 2.0], requires_grad=True)
    w = torch.randn(3, 6, generator=gen(28))
    x = ExpConcrete(tau, logits=logits).rsample(generator=gen(29))
    (x * w).sum().backward()
    noise = gk.gumbel_noise_like(logits, generator=gen(29)).double()
    l64 = logits.detach().double().requires_grad_()
    t64_ = tau.detach().double().requires_grad_()
    x64 = ((l64.log_softmax(-1) + noise) / t64_.unsqueeze(-1)).log_softmax(-1)
    (x64 * w.double()).sum().backward()
    torch.testing.assert_close(x.double(), x64.detach(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tau.grad.double(), t64_.grad, rtol=1e-4, atol=1e-3)


def _seeded(fn):
    """A deterministic function of the parameters: reseed the sampler's generator each call."""
    return lambda *a: fn(*a, gen(30))


def test_gradcheck_rsample_and_log_prob():
    l = torch.randn(2, 4, generator=gen(50), dtype=F64, requires_grad=True)
    t = torch.tensor([0.3, 1.7], dtype=F64, requires_grad=True)
    lb = torch.randn(3, generator=gen(51), dtype=F64, requires_grad=True)
    tb = torch.tensor(0.6, dtype=F64, requires_grad=True)
    checks = [
        (_seeded(lambda a, b, g: ExpConcrete(b, logits=a).rsample((2,), generator=g)), (l, t)),
        (_seeded(lambda a, b, g: Concrete(b, logits=a).rsample((2,), generator=g)), (l, t)),
        (_seeded(lambda a, b, g: BinaryConcrete(b, logits=a).rsample((2,), generator=g)), (lb, tb)),
        (_seeded(lambda a, b, g: HardConcrete(b, a, lower=-0.3, upper=1.3).rsample((50,), generator=g)
                 .clamp(1e-3, 1 - 1e-3)), (lb, tb)),
    ]
    # values away from the boundary, where finite differences of size 1e-6 stay inside
    y = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.05, 0.6, 0.1]], dtype=F64, requires_grad=True)
    x = y.detach().log().requires_grad_()
    yb = torch.tensor([0.1, 0.5, 0.97], dtype=F64, requires_grad=True)
    checks += [
        (lambda a, b, v: ExpConcrete(b, logits=a, validate_args=False).log_prob(v), (l, t, x)),
        (lambda a, b, v: Concrete(b, logits=a, validate_args=False).log_prob(v), (l, t, y)),
        (lambda a, b, v: BinaryConcrete(b, logits=a).log_prob(v), (lb, tb, yb)),
        (lambda a, b, v: HardConcrete(b, a).log_prob(v), (lb, tb, yb)),
        (lambda a, b: HardConcrete(b, a).prob_nonzero(), (lb, tb)),
        (lambda a, b: PlackettLuce(a * b, k=3).log_prob(torch.tensor([[2, 0, 1], [3, 1, 0]])), (l, t[:1])),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args)


def test_log_prob_gradient_at_boundary_and_impossible_categories_is_finite():
    logits = torch.tensor([0.0, NEG_INF, 1.0], requires_grad=True)
    tau = torch.tensor(0.5, requires_grad=True)
    y = torch.tensor([0.0, 0.0, 1.0], requires_grad=True)
    Concrete(tau, logits=logits).log_prob(y).backward()
    for grad in (logits.grad, tau.grad, y.grad):
        assert not torch.isnan(grad).any()


# ------------------------------------------------------------------ KL divergences


def _logistic_kl_numeric(lp: float, lq: float, tp: float, tq: float) -> float:
    """KL between two Binary Concretes, integrated in the logit space (invariant under logit)."""
    p = stats.logistic(loc=lp / tp, scale=1 / tp)
    q = stats.logistic(loc=lq / tq, scale=1 / tq)
    return integrate.quad(lambda t: p.pdf(t) * (p.logpdf(t) - q.logpdf(t)), -math.inf, math.inf)[0]


def test_binary_concrete_kl_closed_form():
    lp, lq = t64(0.0, 1.0, -3.0, 1e-4, 20.0), t64(0.5, 1.0, 2.0, 0.0, -20.0)
    kl = td.kl_divergence(BinaryConcrete(0.7, logits=lp), BinaryConcrete(0.7, logits=lq))
    want = [_logistic_kl_numeric(a, b, 0.7, 0.7) for a, b in zip(lp.tolist(), lq.tolist(), strict=True)]
    torch.testing.assert_close(kl, torch.tensor(want, dtype=F64), rtol=1e-7, atol=1e-12)
    l = torch.tensor(0.3, requires_grad=True, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a: td.kl_divergence(BinaryConcrete(0.7, logits=a), BinaryConcrete(0.7, logits=t64(0.1))), (l,))


def test_monte_carlo_kls_are_unbiased():
    torch.manual_seed(0)  # registered Monte Carlo KLs draw from the global generator
    # unequal temperatures: 64 draws per call, averaged over calls (5-sigma band)
    p, q = BinaryConcrete(0.5, logits=t64(1.0)), BinaryConcrete(1.5, logits=t64(-0.5))
    draws = torch.stack([td.kl_divergence(p, q) for _ in range(100)])
    want = _logistic_kl_numeric(1.0, -0.5, 0.5, 1.5)
    assert abs(draws.mean().item() - want) < 5 * draws.std().item() / math.sqrt(100)
    # K = 2 Concrete = Binary Concrete: the closed form is the reference
    cp, cq = Concrete(0.4, logits=t64(1.0, 0.0)), Concrete(0.4, logits=t64(-1.0, 0.0))
    exact = td.kl_divergence(BinaryConcrete(0.4, logits=t64(1.0)), BinaryConcrete(0.4, logits=t64(-1.0)))
    draws = torch.stack([td.kl_divergence(cp, cq) for _ in range(100)])
    assert abs(draws.mean().item() - exact.item()) < 5 * draws.std().item() / math.sqrt(100)
    ep, eq = (ExpConcrete(0.4, logits=d.logits) for d in (cp, cq))
    est = kl_monte_carlo(ep, eq, 20_000, generator=gen(32))
    assert est.item() == pytest.approx(exact.item(), rel=0.05)


def test_plackett_luce_kl_exact_and_score_function_gradient():
    lp = torch.tensor([0.5, -0.2, 0.1, 0.9], dtype=F64, requires_grad=True)
    lq = t64(0.0, 0.3, -0.4, 0.2)
    p, q = PlackettLuce(lp, k=2), PlackettLuce(lq, k=2)
    pp, qq = lp.detach().softmax(-1).tolist(), lq.softmax(-1).tolist()
    tp, tq = ref.plackett_luce_table(pp, 2), ref.plackett_luce_table(qq, 2)
    want = sum(tp[s] * math.log(tp[s] / tq[s]) for s in tp)
    kl = td.kl_divergence(p, q)
    assert kl.item() == pytest.approx(want, rel=1e-10)
    (exact_grad,) = torch.autograd.grad(kl, lp)
    est = kl_monte_carlo(PlackettLuce(lp, k=2), q, 200_000, generator=gen(33))
    (mc_grad,) = torch.autograd.grad(est, lp)
    assert est.item() == pytest.approx(want, rel=0.05)
    torch.testing.assert_close(mc_grad, exact_grad, atol=0.01, rtol=0.0)


# ------------------------------------------------------------------ bad input


def test_bad_arguments_raise_clear_errors():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="temperature"):
        Concrete(0.0, logits=z)
    with pytest.raises(ValueError, match="temperature"):
        BinaryConcrete(torch.tensor([1.0, -1.0]), logits=torch.zeros(2))
    with pytest.raises(TypeError, match="temperature"):
        Concrete("hot", logits=z)
    with pytest.raises(ValueError, match="temperature of shape"):
        Concrete(torch.ones(5), logits=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"squeeze\(-1\)"):  # torch's (B, 1) idiom
        Concrete(torch.ones(4, 1), logits=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="exactly one of probs or logits"):
        Concrete(1.0, probs=z.softmax(-1), logits=z)
    with pytest.raises(ValueError, match="logits"):
        ExpConcrete(1.0, logits=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="logits"):
        Concrete(1.0, logits=torch.full((3,), NEG_INF))
    with pytest.raises(TypeError, match="logits"):
        Concrete(1.0, logits=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="probs"):
        BinaryConcrete(1.0, probs=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="logits"):
        BinaryConcrete(1.0, probs=torch.tensor([0.0, 0.5]))  # infinite logit
    with pytest.raises(ValueError, match="lower < 0 and upper > 1"):
        HardConcrete(0.5, z, lower=0.1)
    with pytest.raises(TypeError, match="upper"):
        HardConcrete(0.5, z, upper="1.1")
    with pytest.raises(ValueError, match="support"):
        Concrete(1.0, logits=z).log_prob(torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="support"):
        BinaryConcrete(1.0, logits=z).log_prob(torch.tensor([0.5, 1.5, 0.1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinaryConcrete(1.0, logits=z).icdf(torch.tensor(2.0))
    with pytest.raises(ValueError, match="k=4"):
        PlackettLuce(z, k=4)
    with pytest.raises(TypeError, match="k must be an int"):
        PlackettLuce(z, k=2.0)
    with pytest.raises(ValueError, match="k=2 is larger"):
        PlackettLuce(torch.tensor([0.0, NEG_INF, NEG_INF]), k=2)
    with pytest.raises(TypeError, match="integer tensor"):
        PlackettLuce(z, k=2).log_prob(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="support"):
        PlackettLuce(z, k=2).log_prob(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="k <= 8"):
        PlackettLuce(torch.zeros(10), k=9).log_prob_unordered(torch.arange(9))
    with pytest.raises(ValueError, match="num_samples"):
        kl_monte_carlo(Concrete(1.0, logits=z), Concrete(1.0, logits=z), 0)
    with pytest.raises(ValueError, match="event shapes"):
        kl_monte_carlo(Concrete(1.0, logits=z), Concrete(1.0, logits=torch.zeros(4)))
    for d in (Concrete(1.0, logits=z), BinaryConcrete(1.0, logits=z), PlackettLuce(z)):
        with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
            d.sample(generator=0)


# ------------------------------------------------------------------ docs


def test_module_docstring_examples():
    result = doctest.testmod(gkd, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


@pytest.mark.parametrize("page", ["concrete.md", "binary_concrete.md", "hard_concrete.md",
                                  "plackett_luce.md", "structured.md"])
def test_docs_page_examples_run(page):
    result = doctest.testfile(str(DOCS / page), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ L0Gate (gumbelkit.nn)


def test_l0_gate_samples_hard_concrete_and_uses_the_median_in_eval():
    from gumbelkit.nn import L0Gate

    gate = L0Gate((2, 3), init_prob_nonzero=0.7)
    assert gate.expected_l0().item() == pytest.approx(6 * 0.7, rel=1e-6)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(2, 3, generator=gen(40)))
    x = torch.randn(5, 2, 3, generator=gen(41))
    z = gate.distribution().rsample((5,), generator=gen(42))
    torch.testing.assert_close(gate(x, generator=gen(42)), x * z)  # independent gates per example
    d = gate.distribution()
    median = (d.lower + (d.upper - d.lower) * torch.sigmoid(gate.log_alpha / d.temperature)).clamp(0, 1)
    torch.testing.assert_close(gate.eval()(x), x * median)
    assert "shape=(2, 3)" in repr(gate)


def test_l0_gate_learns_to_close_useless_gates():
    from gumbelkit.nn import L0Gate

    g = gen(43)
    w_true = torch.tensor([2.0, -3.0, 0.0, 0.0, 0.0, 0.0])
    gate, lin = L0Gate(6), torch.nn.Linear(6, 1)
    opt = torch.optim.Adam([*gate.parameters(), *lin.parameters()], lr=0.05)
    for _ in range(300):
        x = torch.randn(64, 6, generator=g)
        y = x @ w_true + 0.1 * torch.randn(64, generator=g)
        loss = ((lin(gate(x, generator=g)).squeeze(-1) - y) ** 2).mean() + 0.05 * gate.expected_l0()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = gate.distribution().prob_nonzero()
    assert (p[:2] > 0.9).all() and (p[2:] < 0.2).all(), p


def test_l0_gate_bad_arguments():
    from gumbelkit.nn import L0Gate

    with pytest.raises(ValueError, match="shape"):
        L0Gate(0)
    with pytest.raises(ValueError, match="init_prob_nonzero"):
        L0Gate(3, init_prob_nonzero=1.0)
    with pytest.raises(ValueError, match="lower < 0"):
        L0Gate(3, lower=0.0)
    with pytest.raises(ValueError, match="temperature"):
        L0Gate(3, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature"):
        L0Gate(3, temperature="2/3")
    with pytest.raises(ValueError, match="gate shape"):
        L0Gate(3)(torch.zeros(2, 4))

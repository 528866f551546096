import math

import numpy as np
import pytest
import torch
from scipy import stats

import gumbelkit as gk
from gumbelkit._kernels.cpu_noise import PARALLEL_CHUNK, SMALL, _neg_gumbel_chunk_, fill_neg_gumbel_
from reference import EULER_GAMMA

# every test runs on the default kernels (fused numba where installed) and on the torch path
pytestmark = pytest.mark.usefixtures("backend")

N = 1_000_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_gumbel_matches_cdf_and_moments(dtype):
    g = gk.gumbel_noise((N,), generator=gen(1), dtype=dtype).double().numpy()
    # Kolmogorov-Smirnov against the Gumbel(0, 1) CDF exp(-exp(-x)); false-alarm rate 1e-3.
    assert stats.kstest(g, stats.gumbel_r.cdf).pvalue > 1e-3
    se_mean = math.sqrt(math.pi**2 / 6 / N)
    assert abs(g.mean() - EULER_GAMMA) < 5 * se_mean
    # Var of the sample variance ~ sigma^4 (2 + excess kurtosis 12/5) / N.
    var = math.pi**2 / 6
    assert abs(g.var() - var) < 5 * var * math.sqrt(4.4 / N)


def test_loc_scale():
    g = gk.gumbel_noise((200_000,), loc=2.0, scale=0.5, generator=gen(2), dtype=torch.float64)
    assert stats.kstest(g.numpy(), stats.gumbel_r(loc=2.0, scale=0.5).cdf).pvalue > 1e-3
    loc = torch.tensor([0.0, 10.0]).expand(100_000, 2)
    g = gk.gumbel_noise((100_000, 2), loc=loc, generator=gen(3))
    assert abs(g[:, 1].mean() - g[:, 0].mean() - 10.0) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_never_infinite_and_dtype(dtype):
    g = gk.gumbel_noise_like(torch.empty(N, dtype=dtype), generator=gen(4))
    assert g.dtype == dtype and g.shape == (N,)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("u", "w"), [(0.0, 0.0), (0.0, 1.0 - 2**-53), (1.0 - 2**-24, 0.0),
                                      ("top", 0.5), (0.5, 0.5)])
def test_transform_is_finite_at_the_ends_of_both_uniforms(dtype, u, w, monkeypatch):
    # u is the bulk uniform on [0, 1) (at most 1 - eps/2 of its dtype), w the 53-bit uniform
    # that refines its low end
    u = 1.0 - torch.finfo(dtype).eps / 2 if u == "top" else u
    real = torch.Tensor.uniform_

    def fake_uniform_(self, a=0.0, b=1.0, generator=None):
        assert (a, b) == (0.0, 1.0)
        return self.fill_(u if self.dtype == dtype and self.numel() == 4 else w)

    monkeypatch.setattr(torch.Tensor, "uniform_", fake_uniform_)
    g = torch.empty(4, dtype=dtype)
    _neg_gumbel_chunk_(g, torch.Generator())
    g = -g
    monkeypatch.setattr(torch.Tensor, "uniform_", real)
    assert torch.isfinite(g).all()
    assert -3.7 < g.min() and g.max() < 42.3
    if u == 0.0:  # refined: far beyond the 16.6 nats of a 24-bit uniform
        assert g.min() > 38.0 if w < 0.5 else g.min() > 5.5


@pytest.mark.parametrize("u", [0.0, 1.0 - 2**-53])
def test_small_tensors_draw_53_bit_uniforms_and_stay_finite(u, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, a=0.0, b=1.0, generator=None: self.fill_(u))
    g = -fill_neg_gumbel_(torch.empty(SMALL, dtype=torch.float32), 0)
    monkeypatch.undo()
    assert torch.isfinite(g).all()
    assert g.min() > 37.0 if u == 0.0 else g.max() < -3.5


def test_the_tail_reaches_far_beyond_24_bits(monkeypatch):
    # u = 0 is refined by w: g = -log(-log1p(-2**-8 w)); w = 2**8 e^-30 gives g = 30 in float32,
    # far past the 16.6 that a 24-bit uniform allows; the smallest w gives 61 log 2 = 42.28.
    for w, want in ((2**8 * math.exp(-30.0), 30.0), (0.0, 61 * math.log(2))):
        def fake_uniform_(self, a=0.0, b=1.0, generator=None, w=w):
            return self.fill_(0.0 if self.dtype == torch.float32 else w)

        monkeypatch.setattr(torch.Tensor, "uniform_", fake_uniform_)
        g = torch.empty(4, dtype=torch.float32)
        _neg_gumbel_chunk_(g, torch.Generator())
        g = -g
        monkeypatch.undo()
        assert torch.allclose(g, torch.full_like(g, want), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_upper_tail_has_the_exact_law(dtype):
    # Conditional on g > 5.5 (the refined region), g - 5.5 has the law of the Gumbel tail;
    # KS against the exact conditional CDF, and the tail counts at 10 and 12 nats.
    g = gk.gumbel_noise((8_000_000,), generator=gen(9), dtype=dtype).double()
    t = 5.5
    tail = g[g > t].numpy()
    sf = lambda x: -np.expm1(-np.exp(-x))  # noqa: E731  P(g > x)
    assert stats.kstest(tail, lambda x: 1 - sf(x) / sf(t)).pvalue > 1e-3
    for x in (10.0, 12.0):
        n, p = g.numel(), float(sf(x))
        count = int((g > x).sum())
        assert stats.poisson.cdf(count, n * p) > 1e-4 and stats.poisson.sf(count - 1, n * p) > 1e-4, (x, count, n * p)


def test_half_is_rounded_from_float32_noise():
    a = gk.gumbel_noise((1000,), generator=gen(5), dtype=torch.float32)
    b = gk.gumbel_noise((1000,), generator=gen(5), dtype=torch.float16)
    assert torch.equal(a.half(), b)


def test_reproducible_and_generator_advances():
    g = gen(7)
    a, b = gk.gumbel_noise((5, 7), generator=g), gk.gumbel_noise((5, 7), generator=g)
    assert not torch.equal(a, b)
    assert torch.equal(a, gk.gumbel_noise((5, 7), generator=gen(7)))
    assert torch.equal(gk.gumbel_noise_like(a, generator=gen(7)), a)


def test_default_generator_follows_manual_seed():
    torch.manual_seed(11)
    a = gk.gumbel_noise((10,))
    torch.manual_seed(11)
    assert torch.equal(a, gk.gumbel_noise((10,)))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"scale": 0.0}, ValueError, "scale"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"loc": float("nan")}, ValueError, "loc"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"generator": 3}, TypeError, "generator"),
        ({"device": "meta", "generator": torch.Generator()}, ValueError, "generator"),
        ({"loc": 3.0e38, "scale": 1e37, "dtype": torch.float32}, ValueError, "overflow"),
        ({"scale": 1e37, "dtype": torch.float32}, ValueError, "overflow"),
        ({"loc": -6.55e4, "dtype": torch.float16}, ValueError, "overflow"),
        ({"scale": 1e-46, "dtype": torch.float32}, ValueError, "underflows"),
        ({"loc": torch.tensor([0.0, 3.0e38]), "scale": 1e37, "dtype": torch.float32}, ValueError, "overflow"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gk.gumbel_noise((3,), **kwargs)


def test_extreme_loc_and_scale_that_fit_stay_finite():
    g = gk.gumbel_noise((100_000,), loc=-3e38, scale=1e35, generator=gen(8), dtype=torch.float32)
    assert torch.isfinite(g).all()


def test_bad_shape_and_like():
    with pytest.raises(ValueError, match="shape"):
        gk.gumbel_noise((3, -1))
    with pytest.raises(TypeError, match="floating"):
        gk.gumbel_noise_like(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="Tensor"):
        gk.gumbel_noise_like([1.0, 2.0])


def test_parallel_chunked_draw_is_gumbel_and_thread_count_invariant():
    n = 3 * PARALLEL_CHUNK + 12345  # several chunks and a ragged last one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gk.gumbel_noise((n,), generator=gen(40), dtype=torch.float64)
        torch.set_num_threads(2)
        two = gk.gumbel_noise((n,), generator=gen(40), dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert stats.kstest(one.numpy(), stats.gumbel_r.cdf).pvalue > 1e-3
    # chunks come from different streams: no chunk repeats another, and neighbours are uncorrelated
    c = one[: 3 * PARALLEL_CHUNK].view(3, PARALLEL_CHUNK)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        r = torch.corrcoef(torch.stack([c[i], c[j]]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(PARALLEL_CHUNK)
    # and the ragged tail is distributed like the rest
    assert stats.kstest(one[3 * PARALLEL_CHUNK:].numpy(), stats.gumbel_r.cdf).pvalue > 1e-3

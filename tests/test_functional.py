import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import gumbelkit as gk
import reference as ref
from gumbelkit._kernels.gumbel_softmax import gumbel_softmax_from_noise

# every test runs on the default kernels (fused numba where installed) and on the torch path
pytestmark = pytest.mark.usefixtures("backend")

NEG_INF = float("-inf")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the categories with positive probability."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "an impossible category was drawn"
    n = counts.sum().item()
    return stats.chisquare(counts[keep].double().numpy(), (probs[keep].double() * n).numpy()).pvalue


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("K", [2, 5, 50])
def test_gumbel_max_frequencies(K):
    logits = torch.randn(K, generator=gen(K)) * 2
    idx = gk.gumbel_max(logits.expand(200_000, K), generator=gen(100 + K))
    counts = torch.bincount(idx, minlength=K)
    assert chi2_pvalue(counts, torch.softmax(logits.double(), 0)) > 1e-3


def test_gumbel_max_with_mask_and_neg_inf():
    logits = torch.tensor([0.5, NEG_INF, -1.0, 2.0, 0.0, 1.0])
    mask = torch.tensor([True, True, True, False, True, True])
    idx = gk.gumbel_max(logits.expand(200_000, 6), generator=gen(1), mask=mask)
    probs = torch.softmax(logits.masked_fill(~mask, NEG_INF).double(), 0)
    assert probs[1] == 0 and probs[3] == 0
    assert chi2_pvalue(torch.bincount(idx, minlength=6), probs) > 1e-3


def test_gumbel_max_keepdim_and_dim():
    logits = torch.randn(3, 4, 5)
    assert gk.gumbel_max(logits, dim=1).shape == (3, 5)
    assert gk.gumbel_max(logits, dim=1, keepdim=True).shape == (3, 1, 5)
    assert gk.gumbel_max(logits).dtype == torch.int64


def test_gumbel_topk_first_pick_and_pairs():
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4], dtype=torch.float64)
    n = 200_000
    out = gk.gumbel_topk(probs.log().float().expand(n, 5), 2, generator=gen(3))
    first = torch.bincount(out.indices[:, 0], minlength=5)
    assert chi2_pvalue(first, probs) > 1e-3
    table = ref.plackett_luce_table(probs.tolist(), 2)
    pair_ids = out.indices[:, 0] * 5 + out.indices[:, 1]
    counts = torch.bincount(pair_ids, minlength=25)
    exact = torch.zeros(25, dtype=torch.float64)
    for (i, j), p in table.items():
        exact[i * 5 + j] = p
    assert chi2_pvalue(counts, exact) > 1e-3
    # scores come back sorted, indices distinct
    assert (out.values[:, 0] >= out.values[:, 1]).all()
    assert (out.indices[:, 0] != out.indices[:, 1]).all()


def test_gumbel_topk_respects_mask_and_returns_topk_type():
    logits = torch.zeros(1000, 6)
    mask = torch.tensor([True, False, True, True, False, True])
    out = gk.gumbel_topk(logits, 4, mask=mask, generator=gen(4))
    assert isinstance(out, torch.return_types.topk)
    assert set(out.indices.unique().tolist()) == {0, 2, 3, 5}
    assert out.indices.sort(-1).values.eq(torch.tensor([0, 2, 3, 5])).all()


def test_soft_sample_mean_matches_float64_monte_carlo():
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0])
    tau, n = 0.7, 200_000
    y = gk.gumbel_softmax(logits.expand(n, 4), tau, generator=gen(5)).double()
    g64 = torch.distributions.Gumbel(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(6)
    y64 = torch.softmax((logits.double() + g64.sample((n, 4))) / tau, -1)
    se = (y.var(0) / n + y64.var(0) / n).sqrt()
    assert ((y.mean(0) - y64.mean(0)).abs() < 5 * se).all()


# ---------------------------------------------------------------- noise contract / reproducibility

def test_noise_contract_all_functions():
    logits = torch.randn(6, 9)
    mask = torch.rand(6, 9, generator=gen(0)) > 0.3
    mask[:, 0] = True
    noise = gk.gumbel_noise_like(logits, generator=gen(8))
    x = ref.perturbed(logits, noise, mask)
    # gumbel_max: exactly the argmax of logits + noise (float32, as the library computes it)
    x32 = logits.masked_fill(~mask, NEG_INF) + noise
    assert torch.equal(gk.gumbel_max(logits, generator=gen(8), mask=mask), x32.argmax(-1))
    top = gk.gumbel_topk(logits, 3, generator=gen(8), mask=mask)
    assert torch.equal(top.indices, x32.topk(3).indices)
    assert torch.equal(top.values, x32.topk(3).values)
    # rows with a large maximum m: (logits - m) + noise, which keeps the noise exact at any scale
    big = logits * 1e6
    allowed = big.masked_fill(~mask, NEG_INF)
    m = allowed.amax(-1, keepdim=True)
    shifted = (allowed - m) + noise
    assert torch.equal(gk.gumbel_max(big, generator=gen(8), mask=mask), shifted.argmax(-1))
    top = gk.gumbel_topk(big, 3, generator=gen(8), mask=mask)
    assert torch.equal(top.values, shifted.topk(3).values + m)
    y = gk.gumbel_softmax(logits, 0.5, generator=gen(8), mask=mask)
    torch.testing.assert_close(y.double(), torch.softmax(x / 0.5, -1), atol=1e-6, rtol=1e-5)
    lg = gk.log_gumbel_softmax(logits, 0.5, generator=gen(8), mask=mask)
    want = torch.log_softmax(x / 0.5, -1)
    assert torch.equal(torch.isinf(lg), ~mask)
    torch.testing.assert_close(lg[mask].double(), want[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", ["softmax", "hard", "log", "max", "topk"])
def test_bit_identical_for_same_generator_state(fn):
    logits = torch.randn(16, 33)
    call = {
        "softmax": lambda g: gk.gumbel_softmax(logits, 0.3, generator=g),
        "hard": lambda g: gk.gumbel_softmax(logits, 0.3, hard=True, generator=g),
        "log": lambda g: gk.log_gumbel_softmax(logits, 0.3, generator=g),
        "max": lambda g: gk.gumbel_max(logits, generator=g),
        "topk": lambda g: gk.gumbel_topk(logits, 4, generator=g).values,
    }[fn]
    g = gen(9)
    a, b = call(g), call(g)
    assert torch.equal(a, call(gen(9)))
    assert not torch.equal(a, b)  # the generator advanced


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("tau_kind", ["float", "scalar", "per_row"])
def test_forward_backward_match_float64_reference(dim, tau_kind):
    logits = torch.randn(4, 6, 5, generator=gen(10)).requires_grad_()
    shape = [4, 6, 5]
    shape[dim] = 1
    tau = {
        "float": 0.6,
        "scalar": torch.tensor(0.6, requires_grad=True),
        "per_row": (torch.rand(shape, generator=gen(11)) + 0.3).requires_grad_(),
    }[tau_kind]
    y = gk.gumbel_softmax(logits, tau, dim=dim, generator=gen(12))
    noise = gk.gumbel_noise_like(logits, generator=gen(12))
    l64 = logits.detach().double().requires_grad_()
    t64 = tau.detach().double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    want = ref.gumbel_softmax(l64, noise, t64, dim=dim)
    torch.testing.assert_close(y.double(), want.detach(), atol=1e-6, rtol=1e-5)
    upstream = torch.randn(y.shape, generator=gen(13), dtype=torch.float64)
    inputs = [logits, tau] if isinstance(tau, torch.Tensor) else [logits]
    got = torch.autograd.grad(y, inputs, upstream.float())
    inputs64 = [l64, t64] if isinstance(tau, torch.Tensor) else [l64]
    exp = torch.autograd.grad(want, inputs64, upstream)
    for a, b in zip(got, exp, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_hard_is_one_hot_and_its_gradient_is_the_soft_gradient():
    logits = torch.randn(32, 10, generator=gen(14)).requires_grad_()
    tau = torch.full((32, 1), 0.5, requires_grad=True)
    hard = gk.gumbel_softmax(logits, tau, hard=True, generator=gen(15))
    soft = gk.gumbel_softmax(logits, tau, hard=False, generator=gen(15))
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert (hard.sum(-1) == 1).all()
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))
    up = torch.randn(32, 10, generator=gen(16))
    gh = torch.autograd.grad(hard, [logits, tau], up)
    gs = torch.autograd.grad(soft, [logits, tau], up)
    for a, b in zip(gh, gs, strict=True):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    logits = torch.randn(3, 5, dtype=torch.float64, generator=gen(17)).requires_grad_()
    tau = torch.tensor([[0.7], [1.3], [0.4]], dtype=torch.float64, requires_grad=True)

    def soft(lg, t):
        return gk.gumbel_softmax(lg, t, generator=gen(18))

    def hard(lg, t):
        return gk.gumbel_softmax(lg, t, hard=True, generator=gen(18))

    def log_soft(lg, t):
        return gk.log_gumbel_softmax(lg, t, generator=gen(18))

    assert torch.autograd.gradcheck(soft, (logits, tau))
    assert torch.autograd.gradgradcheck(soft, (logits, tau))
    assert torch.autograd.gradcheck(log_soft, (logits, tau))
    # hard's backward is the soft Jacobian; check it against soft's numerically
    up = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(torch.autograd.grad(hard(logits, tau), logits, up)[0],
                          torch.autograd.grad(soft(logits, tau), logits, up)[0])


def test_log_gumbel_softmax_gradient_matches_reference():
    logits = torch.randn(5, 7, generator=gen(19)).requires_grad_()
    tau = torch.full((5, 1), 0.3, requires_grad=True)
    lg = gk.log_gumbel_softmax(logits, tau, generator=gen(20))
    noise = gk.gumbel_noise_like(logits, generator=gen(20))
    l64, t64 = logits.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    want = ref.log_gumbel_softmax(l64, noise, t64)
    up = torch.randn(5, 7, dtype=torch.float64)
    got = torch.autograd.grad(lg, [logits, tau], up.float())
    for a, b in zip(got, torch.autograd.grad(want, [l64, t64], up), strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_log_gumbel_softmax_tau_gradient_with_impossible_categories():
    logits = torch.tensor([[0.5, float("-inf"), 1.0, -2.0], [0.0, 1.0, float("-inf"), float("-inf")]])
    logits.requires_grad_()
    tau = torch.tensor([[0.7], [1.3]], requires_grad=True)
    lg = gk.log_gumbel_softmax(logits, tau, generator=gen(29))
    allowed = torch.isfinite(logits.detach())
    loss = lg[allowed].sum()
    g_logits, g_tau = torch.autograd.grad(loss, [logits, tau])
    assert torch.isfinite(g_logits).all() and torch.isfinite(g_tau).all()
    # against a float64 reference computed on each row's allowed entries only
    noise = gk.gumbel_noise_like(logits, generator=gen(29))
    l64, t64 = logits.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    want = sum(ref.log_gumbel_softmax(l64[r][allowed[r]], noise[r][allowed[r]], t64[r]).sum() for r in range(2))
    e_logits, e_tau = torch.autograd.grad(want, [l64, t64])
    torch.testing.assert_close(g_tau.double(), e_tau, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_logits.double(), e_logits, atol=1e-4, rtol=1e-4)


def test_double_backward_matches_reference():
    """Higher-order gradients (e.g. gradient penalties) are right in both modes."""
    logits = torch.randn(3, 4, dtype=torch.float64, generator=gen(27)).requires_grad_()
    noise = gk.gumbel_noise_like(logits, generator=gen(28))
    c = torch.arange(4.0, dtype=torch.float64)
    want = ref.gumbel_softmax(logits, noise, 0.5)
    (gw,) = torch.autograd.grad((want * c).sum(), logits, create_graph=True)
    (hw,) = torch.autograd.grad(gw.pow(2).sum(), logits)
    for hard in (False, True):
        y = gk.gumbel_softmax(logits, 0.5, hard=hard, generator=gen(28))
        (g,) = torch.autograd.grad((y * c).sum(), logits, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), logits)
        torch.testing.assert_close(g, gw)
        torch.testing.assert_close(h, hw)


# ---------------------------------------------------------------- drop-in for torch

@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_for_torch_on_the_same_noise(hard, dim, dtype):
    x = torch.randn(5, 7, 3, dtype=dtype).requires_grad_()
    torch.manual_seed(21)
    want = F.gumbel_softmax(x, tau=0.8, hard=hard, dim=dim)
    torch.manual_seed(21)
    noise = ref.torch_gumbel_noise(x.detach())
    got = gumbel_softmax_from_noise(x, 0.8, noise, None, hard, dim % 3)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    up = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, up)[0], torch.autograd.grad(want, x, up)[0])
    # and the public function has the same shape, dtype and one-hot behaviour
    pub = gk.gumbel_softmax(x, 0.8, hard, 1e-10, dim)  # torch's positional order
    assert pub.shape == want.shape and pub.dtype == want.dtype
    torch.testing.assert_close(pub.sum(dim), torch.ones_like(pub.sum(dim)))


def test_positional_order_is_torchs():
    # F.gumbel_softmax(logits, tau, hard, eps, dim): the same positional call means the same here
    x = torch.randn(3, 4, 5)
    a = gk.gumbel_softmax(x, 0.7, True, 1e-10, 1, generator=gen(3))
    b = gk.gumbel_softmax(x, tau=0.7, hard=True, dim=1, generator=gen(3))
    assert torch.equal(a, b) and torch.equal(a.sum(1), torch.ones(3, 5))
    with pytest.raises(TypeError):
        gk.gumbel_softmax(x, 0.7, True, 1e-10, 1, gen(3))  # generator is keyword-only
    with pytest.raises(TypeError, match="dim="):
        gk.gumbel_softmax(x, 0.7, True, 1)  # a dim in eps's place


def test_eps_is_accepted_and_ignored():
    x = torch.randn(3, 4)
    a = gk.gumbel_softmax(x, 1.0, generator=gen(0), eps=1e-10)
    with pytest.warns(UserWarning, match="eps"):
        b = gk.gumbel_softmax(x, 1.0, generator=gen(0), eps=1e-3)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- robustness

def _all_outputs(logits, tau, mask=None, gen_seed=0):
    lg = logits.detach().requires_grad_()
    out = {
        "soft": gk.gumbel_softmax(lg, tau, generator=gen(gen_seed), mask=mask),
        "hard": gk.gumbel_softmax(lg, tau, hard=True, generator=gen(gen_seed), mask=mask),
        "log": gk.log_gumbel_softmax(lg, tau, generator=gen(gen_seed), mask=mask),
        "max": gk.gumbel_max(lg, generator=gen(gen_seed), mask=mask),
        "topk": gk.gumbel_topk(lg, 1, generator=gen(gen_seed), mask=mask).values,
    }
    grad = torch.autograd.grad(out["soft"].float().pow(2).sum() + out["hard"].float().mul(
        torch.arange(lg.shape[-1], dtype=torch.float32)).sum(), lg)[0]
    return out, grad


def _assert_sane(out, grad, mask=None):
    for name in ("soft", "hard", "topk"):
        assert torch.isfinite(out[name]).all(), name
    log = out["log"]
    allowed = torch.ones_like(log, dtype=torch.bool) if mask is None else mask.expand_as(log)
    assert not torch.isnan(log).any() and torch.isfinite(log[allowed]).all()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out["soft"].float().sum(-1), torch.ones(out["soft"].shape[:-1]),
                               atol=1e-2, rtol=0)


@pytest.mark.parametrize("scale", [1e30, 1e10, 1.0])
@pytest.mark.parametrize("tau", [1e-4, 1e-2, 1.0, 1e4])
def test_no_nan_for_extreme_logits_and_temperatures(scale, tau):
    logits = torch.randn(64, 20, generator=gen(22)) * scale
    logits[0] = scale  # an all-equal row
    logits[1] = -scale
    _assert_sane(*_all_outputs(logits, tau))


def test_large_rows_and_single_allowed_category():
    logits = torch.randn(2, 100_000, generator=gen(23))
    _assert_sane(*_all_outputs(logits, 0.1))
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[torch.arange(3), torch.tensor([0, 17, 49])] = True
    logits = torch.randn(3, 50)
    out, grad = _all_outputs(logits, 0.5, mask=mask)
    _assert_sane(out, grad, mask)
    assert torch.equal(out["max"], torch.tensor([0, 17, 49]))
    assert torch.equal(out["soft"], mask.float())
    assert torch.equal(grad, torch.zeros_like(grad))
    # -inf logits behave exactly like the mask
    out_inf, _ = _all_outputs(logits.masked_fill(~mask, NEG_INF), 0.5)
    for k in out:
        assert torch.equal(out[k], out_inf[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    logits = (torch.randn(128, 50, generator=gen(24)) * 20).to(dtype)
    out, grad = _all_outputs(logits, 0.05)
    _assert_sane(out, grad)
    for name in ("soft", "hard", "log", "topk"):
        assert out[name].dtype == dtype
    # computed in float32 on float32 noise (gumbel_noise_like(logits.float())), then rounded once
    noise = gk.gumbel_noise_like(logits.float(), generator=gen(0))
    want = ref.gumbel_softmax(logits, noise, 0.05).to(dtype)
    torch.testing.assert_close(out["soft"], want, atol=2e-3, rtol=0)


def test_half_min_tau_large_logits():
    logits = torch.full((4, 8), 60000.0, dtype=torch.float16)
    logits[:, 0] = -60000.0
    _assert_sane(*_all_outputs(logits, 1e-4))


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    hard=st.booleans(),
    log_tau=st.floats(-4, 4),
)
def test_property_shapes_dims_dtypes(shape, data, dtype, hard, log_tau):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    logits = (torch.randn(shape, generator=gen(seed)) * 10).to(dtype)
    tau = 10.0**log_tau
    y = gk.gumbel_softmax(logits, tau, hard=hard, dim=dim, generator=gen(seed))
    assert y.shape == logits.shape and y.dtype == dtype
    assert torch.isfinite(y).all() and (y >= 0).all()
    torch.testing.assert_close(y.float().sum(dim), torch.ones(y.sum(dim).shape), atol=2e-2, rtol=0)
    if hard:
        assert ((y == 0) | (y == 1)).all()
    idx = gk.gumbel_max(logits, dim, generator=gen(seed))
    assert idx.shape == y.sum(dim).shape and (idx >= 0).all() and (idx < shape[dim]).all()
    lg = gk.log_gumbel_softmax(logits, tau, dim, generator=gen(seed))
    assert torch.isfinite(lg).all() and (lg <= 0).all()
    k = data.draw(st.integers(1, shape[dim]))
    top = gk.gumbel_topk(logits, k, dim, generator=gen(seed))
    assert top.indices.shape[dim] == k
    assert torch.equal(top.indices.sort(dim).values.unique_consecutive(dim=dim), top.indices.sort(dim).values)


def test_empty_batch():
    logits = torch.zeros(0, 5)
    assert gk.gumbel_softmax(logits).shape == (0, 5)
    assert gk.gumbel_max(logits).shape == (0,)
    assert gk.gumbel_topk(logits, 2).indices.shape == (0, 2)


# ---------------------------------------------------------------- bad input

GOOD = torch.zeros(3, 4)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: gk.gumbel_softmax(GOOD, 0.0), ValueError, "gumbel_max"),
        (lambda: gk.gumbel_softmax(GOOD, -1.0), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, float("nan")), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, float("inf")), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, torch.tensor([[1.0], [0.0], [1.0]])), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, torch.ones(1, 4)), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, torch.ones(5, 1)), ValueError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, torch.ones(3, 1, dtype=torch.int64)), TypeError, "tau"),
        (lambda: gk.gumbel_softmax(GOOD, "1"), TypeError, "tau"),
        (lambda: gk.gumbel_softmax(torch.zeros(3, 4, dtype=torch.int64)), TypeError, "logits"),
        (lambda: gk.gumbel_softmax(torch.zeros(3, 4, dtype=torch.complex64)), TypeError, "logits"),
        (lambda: gk.gumbel_softmax([[0.0, 1.0]]), TypeError, "logits"),
        (lambda: gk.gumbel_softmax(torch.tensor(1.0)), ValueError, "logits"),
        (lambda: gk.gumbel_softmax(torch.tensor([0.0, float("nan")])), ValueError, "NaN"),
        (lambda: gk.gumbel_max(torch.tensor([0.0, float("inf")])), ValueError, r"\+inf"),
        (lambda: gk.log_gumbel_softmax(torch.tensor([0.0, float("nan")])), ValueError, "NaN"),
        (lambda: gk.gumbel_topk(torch.tensor([0.0, float("nan")]), 1), ValueError, "NaN"),
        (lambda: gk.gumbel_softmax(GOOD, dim=2), ValueError, "dim"),
        (lambda: gk.gumbel_softmax(GOOD, dim=2), IndexError, "dim"),
        (lambda: gk.gumbel_max(GOOD, dim=-3), ValueError, "dim"),
        (lambda: gk.gumbel_topk(GOOD, 0), ValueError, "k"),
        (lambda: gk.gumbel_topk(GOOD, 5), ValueError, "k"),
        (lambda: gk.gumbel_topk(GOOD, 2.0), TypeError, "k"),
        (lambda: gk.gumbel_topk(GOOD, 3, mask=torch.tensor([True, True, False, False])),
         ValueError, "allowed"),
        (lambda: gk.gumbel_topk(torch.tensor([0.0, NEG_INF, 0.0]), 3), ValueError, "allowed"),
        (lambda: gk.gumbel_max(GOOD, mask=torch.tensor([[True] * 4, [False] * 4, [True] * 4])),
         ValueError, "no allowed"),
        (lambda: gk.gumbel_softmax(torch.full((2, 3), NEG_INF)), ValueError, "no allowed"),
        (lambda: gk.gumbel_softmax(GOOD, mask=torch.ones(3, 4)), TypeError, "mask"),
        (lambda: gk.gumbel_softmax(GOOD, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (lambda: gk.gumbel_softmax(GOOD, hard=1), TypeError, "hard"),
        (lambda: gk.gumbel_max(GOOD.to("meta"), generator=torch.Generator()), ValueError, "generator"),
        (lambda: gk.gumbel_softmax(torch.zeros(3, 0)), ValueError, "categories"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_temperature_limit_is_gumbel_max():
    logits = torch.randn(100, 7, generator=gen(25))
    y = gk.gumbel_softmax(logits, 1e-3, generator=gen(26))
    assert torch.equal(y.argmax(-1), gk.gumbel_max(logits, generator=gen(26)))


# ---------------------------------------------------------------- exact at the edges (issue 11)

_SAMPLERS = {
    "gumbel_max": lambda x, g: gk.gumbel_max(x, generator=g),
    "hard": lambda x, g: gk.gumbel_softmax(x, 0.5, hard=True, generator=g).argmax(-1),
    "topk": lambda x, g: gk.gumbel_topk(x, 1, generator=g).indices[..., 0],
    "log": lambda x, g: gk.log_gumbel_softmax(x, 1e-3, generator=g).argmax(-1),
}


@pytest.mark.parametrize("gap", [18.0, 22.0])
@pytest.mark.parametrize("fn", ["gumbel_max", "hard"])
def test_tail_categories_win_at_their_exact_rate(fn, gap):
    # One winner at 0 and 2**20 - 1 tail categories `gap` nats below: a tail category wins with
    # probability 1 - 1/(1 + (2**20 - 1) e^-gap): 0.01573 per row at 18 nats. A 24-bit float32
    # uniform caps g at 16.6 and gives 0.
    # the noise is one shared path: the full-power run (expected 10 wins; P(0) = 5e-5) is gumbel_max's
    rows, calls = 16, (40 if fn == "gumbel_max" else 12) if gap == 18.0 else 4
    x = torch.full((rows, 2**20), -gap)
    x[:, 0] = 0
    g = gen(31)
    wins = sum(int((_SAMPLERS[fn](x, g) != 0).sum()) for _ in range(calls))
    n, p = rows * calls, 1 - 1 / (1 + (2**20 - 1) * math.exp(-gap))
    assert stats.binom.cdf(wins, n, p) > 1e-4 and stats.binom.sf(wins - 1, n, p) > 1e-4, (wins, n * p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("score", [1.0, 1e4, 1e7, 1e30])
@pytest.mark.parametrize("fn", list(_SAMPLERS))
def test_two_way_ties_are_fifty_fifty_at_any_scale(fn, score, dtype):
    # softmax and argmax are shift invariant: the noise is added after subtracting the row maximum,
    # so two equal scores of 1e7 are still a fair coin (adding g to 1e7 in float32 rounds it to integers)
    score = min(score, torch.finfo(dtype).max / 4)
    n = 20_000
    x = torch.tensor([score, score], dtype=dtype).expand(n, 2)
    idx = _SAMPLERS[fn](x, gen(32))
    assert abs(float((idx == 0).double().mean()) - 0.5) < 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize(("dtype", "vocab"), [(torch.bfloat16, 32768), (torch.float32, 262144)])
def test_noise_never_ties_at_the_top_of_large_rows(dtype, vocab):
    # bfloat16-rounded noise tied at the top in about 3% of rows of 32k equal logits, float32 noise
    # from 24-bit uniforms in 0.8% at 256k (and the tie went to the lowest index). The samplers add
    # float32 noise whatever the dtype (the noise contract: gumbel_noise_like(logits.float())), and
    # its top is drawn with 53 bits: no ties.
    x = torch.zeros(100, vocab, dtype=dtype)
    noise = gk.gumbel_noise_like(x.float(), generator=gen(33))
    top = noise.topk(2).values
    assert bool((top[:, 0] > top[:, 1]).all())
    assert torch.equal(gk.gumbel_max(x, generator=gen(33)), noise.argmax(-1))

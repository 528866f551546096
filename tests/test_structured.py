"""gumbelkit.structured: relaxed top-k, Gumbel-Sinkhorn and matching.

References are naive float64 loops written from the papers; statistical tests use a fixed
seed each and reject at p < 1e-3.
"""

import doctest
import itertools
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import gumbelkit as gk
import gumbelkit.structured as gks
import strategies
from compile_check import eager_and_compiled
from gumbelkit.distributions import PlackettLuce
from gumbelkit.structured import gumbel_sinkhorn, matching, relaxed_topk

F64 = torch.float64
NEG_INF = float("-inf")
P_MIN = 1e-3


@pytest.fixture(autouse=True)
def _restore_distribution_validation():
    """torch.compile switches torch.distributions' global validate_args default off for the whole
    process; put it back so that later tests (in the same worker) see torch's default."""
    saved = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(saved)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ float64 references


def relaxed_topk_reference(logits, noise, k, tau):
    """Xie and Ermon (2019) as in their code, in float64: log(1 - a) floored at log(tiny)."""
    alpha = logits.double() + noise.double()
    khot = torch.zeros_like(alpha)
    for _ in range(k):
        a = torch.softmax(alpha / tau, -1)
        khot = khot + a
        alpha = alpha + torch.log((1 - a).clamp_min(torch.finfo(F64).tiny))
    return khot


def sinkhorn_reference(x, tau, n_iters):
    """Mena et al. (2018): alternate row and column normalization of exp(x / tau), in float64."""
    p = torch.exp((x.double() - x.double().amax((-1, -2), keepdim=True)) / tau)
    for _ in range(n_iters):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    return p


def is_permutation_matrix(p: torch.Tensor) -> bool:
    ones = torch.ones(p.shape[:-1], dtype=p.dtype)
    return bool(((p == 0) | (p == 1)).all() and torch.equal(p.sum(-1), ones) and torch.equal(p.sum(-2), ones))


def score_of(scores: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return scores.gather(-1, perm.unsqueeze(-1)).squeeze(-1).sum(-1)


# ------------------------------------------------------------------ relaxed top-k


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_relaxed_topk_matches_float64_reference_values_and_gradients(tau):
    logits = (torch.randn(4, 10, generator=gen(0)) * 2).requires_grad_()
    w = torch.randn(4, 10, generator=gen(1))
    y = relaxed_topk(logits, 3, tau, generator=gen(2))
    (y * w).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    y64 = relaxed_topk_reference(l64, gk.gumbel_noise_like(logits, generator=gen(2)), 3, tau)
    (y64 * w.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64.detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(y.sum(-1), torch.full((4,), 3.0))
    torch.testing.assert_close(logits.grad.double(), l64.grad, atol=1e-3, rtol=1e-3)


def test_relaxed_topk_accurate_when_one_item_dominates():
    # a_1 = 1 - 4e-9 rounds to 1 in float32; a naive log(1 - a_1) is -inf or badly wrong
    logits = torch.tensor([[20.0, 0.0, 0.5, -1.0]], requires_grad=True)
    y = relaxed_topk(logits, 2, 1.0, generator=gen(3))
    noise = gk.gumbel_noise_like(logits, generator=gen(3))
    torch.testing.assert_close(y.double(), relaxed_topk_reference(logits.detach(), noise, 2, 1.0),
                               atol=1e-5, rtol=0)
    y[0, 1].backward()
    assert torch.isfinite(logits.grad).all()


def test_relaxed_topk_hard_is_the_exact_gumbel_topk_subset():
    logits = torch.randn(6, 8, generator=gen(4), requires_grad=True)
    h = relaxed_topk(logits, 3, 0.5, hard=True, generator=gen(5))
    idx = gk.gumbel_topk(logits.detach(), 3, generator=gen(5)).indices
    assert torch.equal(h, torch.zeros(6, 8).scatter_(-1, idx, 1.0))
    w = torch.randn(6, 8, generator=gen(6))
    (grad_hard,) = torch.autograd.grad((h * w).sum(), logits)
    (grad_soft,) = torch.autograd.grad((relaxed_topk(logits, 3, 0.5, generator=gen(5)) * w).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)


def test_relaxed_topk_hard_subset_frequencies():
    probs = torch.tensor([0.05, 0.15, 0.2, 0.25, 0.35])
    h = relaxed_topk(probs.log().expand(20_000, 5), 2, 1.0, hard=True, generator=gen(7))
    sets = list(itertools.combinations(range(5), 2))
    codes = {s: i for i, s in enumerate(sets)}
    picked = h.nonzero()[:, 1].view(-1, 2)
    counts = torch.bincount(torch.tensor([codes[tuple(s)] for s in picked.tolist()]), minlength=len(sets))
    exact = PlackettLuce(probs.log(), k=2).log_prob_unordered(torch.tensor(sets)).exp()
    expected = (exact.double() / exact.double().sum() * 20_000).numpy()
    assert stats.chisquare(counts.numpy(), expected).pvalue > P_MIN


def test_relaxed_topk_k1_is_gumbel_softmax_and_low_tau_tends_to_hard():
    logits = torch.randn(5, 7, generator=gen(8))
    torch.testing.assert_close(relaxed_topk(logits, 1, 0.7, generator=gen(9)),
                               gk.gumbel_softmax(logits, 0.7, generator=gen(9)))
    hard = relaxed_topk(logits.expand(200, 5, 7), 3, 1.0, hard=True, generator=gen(10))
    gaps = []
    for tau in (0.1, 0.01, 0.001):
        soft = relaxed_topk(logits.expand(200, 5, 7), 3, tau, generator=gen(10))
        gaps.append((soft - hard).abs().amax(-1))
    # the gap shrinks about as fast as tau; near-ties of the perturbed scores stay soft longest
    assert gaps[0].mean() > gaps[1].mean() > gaps[2].mean()
    assert gaps[2].mean() < 0.01 and (gaps[2] < 1e-3).float().mean() > 0.95


def test_relaxed_topk_impossible_categories_dim_and_tensor_tau():
    logits = torch.tensor([[0.0, NEG_INF, 1.0, 2.0, NEG_INF]] * 3).T.contiguous().requires_grad_()  # dim=0
    tau = torch.tensor([[0.3, 1.0, 3.0]], requires_grad=True)
    y = relaxed_topk(logits, 2, tau, dim=0, generator=gen(11))
    assert (y[[1, 4]] == 0).all()
    torch.testing.assert_close(y.sum(0), torch.full((3,), 2.0))
    y[0].sum().backward()
    assert torch.isfinite(tau.grad).all() and torch.isfinite(logits.grad).all()
    h = relaxed_topk(torch.randn(2, 9, generator=gen(12)).half(), 4, 0.5, hard=True, generator=gen(13))
    assert h.dtype == torch.float16 and torch.equal(h.sum(-1), torch.full((2,), 4.0, dtype=torch.float16))


def test_relaxed_topk_gradcheck():
    logits = torch.randn(2, 5, generator=gen(36), dtype=F64, requires_grad=True)
    tau = torch.tensor([[0.4], [1.3]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, t: relaxed_topk(l, 3, t, generator=gen(14)), (logits, tau))


@given(n=st.integers(2, 12), data=st.data(), tau=st.floats(0.01, 10.0), seed=st.integers(0, 2 ** 16))
def test_property_relaxed_topk_is_a_relaxed_k_hot(n, data, tau, seed):
    k = data.draw(st.integers(1, n))
    logits = torch.randn(3, n, generator=gen(seed)) * 5
    y = relaxed_topk(logits, k, tau, generator=gen(seed))
    assert torch.isfinite(y).all() and (y >= 0).all()
    torch.testing.assert_close(y.sum(-1), torch.full((3,), float(k)), atol=1e-4, rtol=0)


def test_relaxed_topk_bad_arguments():
    z = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="k=0"):
        relaxed_topk(z, 0)
    with pytest.raises(ValueError, match="k=5"):
        relaxed_topk(z, 5)
    with pytest.raises(TypeError, match="k must be an int"):
        relaxed_topk(z, 2.0)
    with pytest.raises(ValueError, match="tau"):
        relaxed_topk(z, 2, tau=0.0)
    with pytest.raises(ValueError, match="k=3 is larger"):
        relaxed_topk(torch.tensor([0.0, 1.0, NEG_INF, NEG_INF]), 3)
    with pytest.raises(ValueError, match="NaN"):
        relaxed_topk(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(TypeError, match="hard"):
        relaxed_topk(z, 2, hard=1)
    with pytest.raises(TypeError, match="logits"):
        relaxed_topk(torch.zeros(4, dtype=torch.long), 2)


# ------------------------------------------------------------------ Gumbel-Sinkhorn


@pytest.mark.parametrize("tau", [1.0, 0.3, 0.1])
def test_sinkhorn_rows_and_columns_sum_to_one(tau):
    log_alpha = torch.randn(8, 6, 6, generator=gen(15)) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge" warning
        p = gumbel_sinkhorn(log_alpha, tau, 20_000, tol=1e-4, generator=gen(16))
    ones = torch.ones(8, 6)
    torch.testing.assert_close(p.sum(-1), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), ones, atol=1e-4, rtol=0)
    # a fixed number of iterations (Mena et al.): columns are normalized last, so exact
    q = gumbel_sinkhorn(log_alpha, tau, 20, generator=gen(16))
    torch.testing.assert_close(q.sum(-2), ones, atol=1e-5, rtol=0)


def test_sinkhorn_matches_float64_reference_and_noise_contract():
    log_alpha = torch.randn(3, 5, 5, generator=gen(17), requires_grad=True)
    w = torch.randn(3, 5, 5, generator=gen(18))
    p = gumbel_sinkhorn(log_alpha, 0.7, 30, generator=gen(19))
    (p * w).sum().backward()
    noise = gk.gumbel_noise_like(log_alpha, generator=gen(19))
    la64 = log_alpha.detach().double().requires_grad_()
    p64 = sinkhorn_reference(la64 + noise.double(), 0.7, 30)
    (p64 * w.double()).sum().backward()
    torch.testing.assert_close(p.double(), p64.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_alpha.grad.double(), la64.grad, atol=1e-4, rtol=1e-4)
    same = gumbel_sinkhorn(log_alpha.detach() + noise, 0.7, 30, noise=False)
    torch.testing.assert_close(p.detach(), same)


def test_sinkhorn_hard_is_the_gumbel_matching_with_straight_through_gradient():
    log_alpha = torch.randn(10, 5, 5, generator=gen(20), requires_grad=True)
    h = gumbel_sinkhorn(log_alpha, 0.5, 20, hard=True, generator=gen(21))
    assert is_permutation_matrix(h)
    perm = matching(log_alpha.detach() + gk.gumbel_noise_like(log_alpha, generator=gen(21)))
    assert torch.equal(h.argmax(-1), perm)
    w = torch.randn(10, 5, 5, generator=gen(22))
    (g_hard,) = torch.autograd.grad((h * w).sum(), log_alpha)
    (g_soft,) = torch.autograd.grad((gumbel_sinkhorn(log_alpha, 0.5, 20, generator=gen(21)) * w).sum(),
                                    log_alpha)
    torch.testing.assert_close(g_hard, g_soft)


def test_sinkhorn_low_temperature_tends_to_the_matching():
    log_alpha = torch.randn(30, 4, 4, generator=gen(23)) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a few near-tied matrices converge slowly
        soft = gumbel_sinkhorn(log_alpha, 0.02, 2000, tol=1e-5, generator=gen(24))
    hard = gumbel_sinkhorn(log_alpha, 0.02, hard=True, generator=gen(24))
    assert ((soft - hard).abs().amax((-1, -2)) < 1e-2).float().mean() > 0.9


def test_sinkhorn_recovers_a_planted_permutation():
    """Learn log_alpha so that P x reorders the rows of x by a hidden permutation (Mena et al.)."""
    g, n = gen(25), 8
    planted = torch.randperm(n, generator=g)
    log_alpha = torch.zeros(n, n, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=0.1)
    assert not torch.equal(matching(log_alpha.detach()), planted)
    for _ in range(80):
        x = torch.randn(32, n, 2, generator=g)
        p = gumbel_sinkhorn(log_alpha.expand(32, n, n), 0.5, 20, generator=g)
        loss = ((p @ x - x[:, planted]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(matching(log_alpha.detach()), planted)
    assert loss.item() < 0.05


def test_sinkhorn_warns_when_not_converged_and_tensor_tau():
    log_alpha = torch.randn(4, 5, 5, generator=gen(26)) * 3
    with pytest.warns(RuntimeWarning, match="raise n_iters"):
        gumbel_sinkhorn(log_alpha, 0.05, 10, tol=1e-7, generator=gen(27))
    tau = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1)
    p = gumbel_sinkhorn(log_alpha, tau, 40, generator=gen(28))
    for i in range(4):
        torch.testing.assert_close(p[i], gumbel_sinkhorn(log_alpha, tau[i].item(), 40, generator=gen(28))[i])


def test_sinkhorn_forbidden_entries_and_gradcheck():
    la = torch.randn(4, 4, generator=gen(29))
    la[0, 1] = la[2, 3] = NEG_INF
    tau = torch.tensor(0.6, requires_grad=True)
    p = gumbel_sinkhorn(la, tau, 5000, tol=1e-5, generator=gen(30))
    assert p[0, 1] == 0 and p[2, 3] == 0
    p.sum().backward()
    assert torch.isfinite(tau.grad)
    assert gumbel_sinkhorn(la, 0.3, hard=True, generator=gen(31))[0, 1] == 0
    l64 = torch.randn(2, 3, 3, generator=gen(37), dtype=F64, requires_grad=True)
    t64 = torch.tensor([[[0.5]], [[1.5]]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: gumbel_sinkhorn(a, t, 5, generator=gen(32)), (l64, t64))


def test_sinkhorn_bad_arguments():
    z = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        gumbel_sinkhorn(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        gumbel_sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="n_iters=0"):
        gumbel_sinkhorn(z, 1.0, 0)
    with pytest.raises(ValueError, match="tau"):
        gumbel_sinkhorn(z, -1.0)
    with pytest.raises(ValueError, match="inside a matrix"):
        gumbel_sinkhorn(z, torch.ones(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        gumbel_sinkhorn(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="no allowed category"):
        gumbel_sinkhorn(torch.tensor([[NEG_INF, NEG_INF], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="column"):
        gumbel_sinkhorn(torch.tensor([[NEG_INF, 0.0], [NEG_INF, 0.0]]))
    with pytest.raises(ValueError, match="tol"):
        gumbel_sinkhorn(z, tol=-1.0)
    with pytest.raises(TypeError, match="noise"):
        gumbel_sinkhorn(z, noise=None)


# ------------------------------------------------------------------ matching


def test_hungarian_matching_is_optimal():
    scores = torch.randn(20, 6, 6, generator=gen(33), dtype=F64)
    perm = matching(scores)
    perms = torch.tensor(list(itertools.permutations(range(6))))
    best = scores[:, torch.arange(6), perms].sum(-1).amax(-1)  # brute force over 720 permutations
    torch.testing.assert_close(score_of(scores, perm), best)
    assert torch.equal(matching(scores, method="hungarian"), perm)


def brute_force_best(scores: torch.Tensor) -> torch.Tensor:
    """The best total score over all n! permutations (-inf where every permutation is forbidden)."""
    n = scores.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(n))))
    return scores[..., torch.arange(n), perms].sum(-1).amax(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_matching_is_exact_with_forbidden_entries(dtype, n):
    """Random matrices with about 40% forbidden (-inf) entries: where a feasible permutation
    exists, matching finds an optimal one and never uses a forbidden entry; where none exists,
    ValueError. The greedy method this replaces failed both."""
    g = gen(40 + n)
    scores = torch.randn(60, n, n, generator=g, dtype=F64)
    scores[torch.rand(60, n, n, generator=g) < 0.4] = NEG_INF
    scores = scores.to(dtype)
    best = brute_force_best(scores.double())
    for b in range(60):
        if torch.isinf(best[b]):
            with pytest.raises(ValueError, match="no permutation avoids the -inf"):
                matching(scores[b])
            continue
        perm = matching(scores[b])
        assert sorted(perm.tolist()) == list(range(n))
        total = score_of(scores[b].double(), perm)
        assert torch.isfinite(total), "used a forbidden entry"
        torch.testing.assert_close(total, best[b])


def test_matching_issue_case_greedy_would_use_a_forbidden_entry():
    """The largest entry (9) is in row 1, column 0, but row 0 can only take column 0."""
    scores = torch.tensor([[3.0, NEG_INF, NEG_INF], [9.0, 1.0, NEG_INF], [2.0, 2.0, 2.0]])
    assert matching(scores).tolist() == [0, 1, 2]
    h = gumbel_sinkhorn(scores, 0.1, noise=False, hard=True)
    assert is_permutation_matrix(h) and h.tolist() == torch.eye(3).tolist()
    with pytest.raises(ValueError, match="no permutation avoids"):
        matching(torch.tensor([[0.0, NEG_INF, NEG_INF], [0.0, NEG_INF, NEG_INF], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"no permutation avoids.*matrix 1 of the batch"):
        matching(torch.stack([torch.zeros(2, 2), torch.tensor([[0.0, NEG_INF], [0.0, NEG_INF]])]))
    with pytest.raises(ValueError, match="no permutation avoids"):
        # every row and column has a finite entry, but rows 0 and 1 both need column 0
        gumbel_sinkhorn(torch.tensor([[0.0, NEG_INF, NEG_INF], [0.0, NEG_INF, NEG_INF],
                                      [0.0, 0.0, 0.0]]), hard=True)


def test_matching_without_scipy_says_how_to_install_it(monkeypatch):
    scores = torch.randn(5, 5, 5, generator=gen(35))
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize -> ImportError
    for call in (lambda: matching(scores), lambda: gumbel_sinkhorn(scores, hard=True)):
        with pytest.raises(ImportError, match=r"pip install 'gumbelkit\[scipy\]'"):
            call()
    gumbel_sinkhorn(scores)  # the soft relaxation needs no SciPy


def test_matching_forbidden_entries_and_errors():
    scores = torch.tensor([[5.0, NEG_INF, 0.0], [0.0, 5.0, NEG_INF], [NEG_INF, 0.0, 5.0]])
    assert matching(scores).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no permutation"):
        matching(torch.tensor([[0.0, NEG_INF], [0.0, NEG_INF]]))
    with pytest.raises(ValueError, match="NaN"):
        matching(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="method"):
        matching(scores, method="auction")
    with pytest.raises(ValueError, match="greedy method was removed"):
        matching(scores, method="greedy")
    with pytest.raises(ValueError, match="shape"):
        matching(torch.zeros(2, 3))


# ------------------------------------------------------------------ at the edges (issue 12)
# Scores are shifted by their row maximum before the division by tau and computed in float32
# at least, so extreme scores and temperatures stay finite and rows keep their sums.

DTYPES = [torch.float16, torch.bfloat16, torch.float32, F64]


def _big(dtype: torch.dtype, want: float = 1e30) -> float:
    return min(want, float(torch.finfo(dtype).max) / 2)


def _sum_tolerance(dtype: torch.dtype, k: int, n: int) -> float:
    """Each output entry is rounded to ``dtype`` (relative error eps/2) and each of the k
    float32 softmaxes sums to 1 within about n float32 ulps."""
    return k * (torch.finfo(dtype).eps + 4 * n * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relaxed_topk_issue_case_five_equal_logits_1e8_sum_to_k(dtype):
    """Five equal logits of 1e8, k = 2, summed to 6 (logits / tau lost the noise)."""
    value = _big(dtype, 1e8)
    logits = torch.full((5,), value, dtype=dtype, requires_grad=True)
    y = relaxed_topk(logits, 2, generator=gen(50))
    assert abs(y.double().sum().item() - 2.0) <= _sum_tolerance(dtype, 2, 5)
    # equal logits: the relaxation is that of the noise alone (shift invariance)
    expected = relaxed_topk(torch.zeros(5, dtype=dtype), 2, generator=gen(50))
    torch.testing.assert_close(y, expected)
    y[0].backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e8, 1e30])
@pytest.mark.parametrize("tau", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_relaxed_topk_rows_sum_to_k_at_any_scale_and_temperature(dtype, scale, tau, k):
    big = _big(dtype, scale)
    logits = (torch.randn(4, 6, generator=gen(51), dtype=F64) * big).clamp(-big, big).to(dtype)
    logits[1] = big  # all tied
    logits[2, :3] = NEG_INF
    logits = logits.requires_grad_(True)
    for hard in (False, True):
        y = relaxed_topk(logits, min(k, 3), tau, hard=hard, generator=gen(52))
        assert torch.isfinite(y).all() and (y >= 0).all() and (y[2, :3] == 0).all()
        err = (y.double().sum(-1) - min(k, 3)).abs().max().item()
        assert err <= _sum_tolerance(dtype, k, 6), (hard, err)
        (grad,) = torch.autograd.grad((y * torch.randn(4, 6, generator=gen(53))).sum(), logits)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 1e8, 1e30])
@pytest.mark.parametrize("tau", [1e-6, 1.0, 1e6])
def test_sinkhorn_finite_and_doubly_stochastic_at_any_scale_and_temperature(dtype, scale, tau):
    big = _big(dtype, scale)
    log_alpha = (torch.randn(3, 4, 4, generator=gen(54), dtype=F64) * big).clamp(-big, big).to(dtype)
    log_alpha[1] = big  # all tied
    log_alpha[2, 0, 1] = log_alpha[2, 3, 2] = NEG_INF
    log_alpha = log_alpha.requires_grad_(True)
    for hard in (False, True):
        p = gumbel_sinkhorn(log_alpha, tau, 30, generator=gen(55), hard=hard)
        assert torch.isfinite(p).all() and (p >= 0).all() and p[2, 0, 1] == 0 and p[2, 3, 2] == 0
        col = (p.double().sum(-2) - 1).abs().max().item()
        assert col <= _sum_tolerance(dtype, 1, 4), col
        if hard:
            assert is_permutation_matrix(p.double())
        (grad,) = torch.autograd.grad((p * torch.randn(3, 4, 4, generator=gen(56))).sum(), log_alpha)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [16393.0, 1e8, 1e30])
def test_sinkhorn_columns_sum_to_one_when_a_column_sits_far_below(dtype, offset):
    """Found by the property test: [[-16393, 0], [-16393, 0]] in float16 gave a column summing to
    0.9988 (x - logsumexp(x) near 1.6e4 loses 1e-3 in float32): normalize after the shift."""
    offset = _big(dtype, offset)
    log_alpha = torch.tensor([[-offset, 0.0], [-offset, 0.0]], dtype=dtype)
    for n_iters in (1, 2, 7):
        p = gumbel_sinkhorn(log_alpha, 1.0, n_iters, generator=gen(58))
        assert (p.double().sum(-2) - 1).abs().max().item() <= _sum_tolerance(dtype, 1, 2)
        q = gumbel_sinkhorn(log_alpha.double(), 1.0, n_iters, generator=gen(58))
        torch.testing.assert_close(q.sum(-2), torch.ones(2, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tensor_tau_1e_5_gradients_are_finite(dtype):
    tau = torch.tensor(1e-5, dtype=dtype)
    logits = torch.tensor([[0.5, 0.5, -1.0, 0.25]], dtype=dtype, requires_grad=True)
    for f in (lambda x: relaxed_topk(x, 2, tau, generator=gen(57)),
              lambda x: gumbel_sinkhorn(x.expand(4, 4), tau.view(1, 1), 10, generator=gen(57))):
        (grad,) = torch.autograd.grad(f(logits)[..., 0].sum(), logits)
        assert grad.dtype == dtype and torch.isfinite(grad).all()


def _score_values(dtype: torch.dtype):
    big = _big(dtype)
    specials = [0.0, 1.0, -1.0, big, -big, _big(dtype, 1e8), -_big(dtype, 1e8), NEG_INF]
    return st.one_of(st.floats(-big, big, allow_nan=False), st.sampled_from(specials))


def _tau(data):
    return strategies.temperature(data, DTYPES)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_relaxed_topk_at_extremes(data):
    """Logits up to +-1e30 (the dtype's range for float16), -inf entries, tau 1e-6 .. 1e6, every
    dtype: finite, nonnegative, rows summing to k, finite gradients."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    rows, n = data.draw(st.integers(1, 3), label="rows"), data.draw(st.integers(1, 6), label="n")
    k = data.draw(st.integers(1, n), label="k")
    values = data.draw(st.lists(_score_values(dtype), min_size=rows * n, max_size=rows * n))
    logits = torch.tensor(values, dtype=F64).reshape(rows, n)
    logits[:, :k] = logits[:, :k].nan_to_num(neginf=0.0)  # at least k possible categories
    logits = logits.to(dtype).requires_grad_(True)
    hard = data.draw(st.booleans(), label="hard")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    y = relaxed_topk(logits, k, _tau(data), hard=hard, generator=gen(seed))
    assert y.dtype == dtype and torch.isfinite(y).all() and (y >= 0).all()
    assert (y.detach()[torch.isneginf(logits.detach())] == 0).all()
    assert (y.double().sum(-1) - k).abs().max().item() <= _sum_tolerance(dtype, k, n)
    (grad,) = torch.autograd.grad((y * torch.randn(rows, n, generator=gen(seed))).sum(), logits)
    assert torch.isfinite(grad).all()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_sinkhorn_at_extremes(data):
    """The same for Gumbel-Sinkhorn (soft and hard): finite, columns summing to 1, finite
    gradients; forbidden entries stay 0 (the diagonal is kept finite, so a permutation exists)."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n = data.draw(st.integers(1, 4), label="n")
    values = data.draw(st.lists(_score_values(dtype), min_size=n * n, max_size=n * n))
    log_alpha = torch.tensor(values, dtype=F64).reshape(n, n)
    log_alpha.diagonal().copy_(log_alpha.diagonal().nan_to_num(neginf=0.0))
    log_alpha = log_alpha.to(dtype).requires_grad_(True)
    hard = data.draw(st.booleans(), label="hard")
    noise = data.draw(st.booleans(), label="noise")
    tau = _tau(data)
    if isinstance(tau, torch.Tensor):
        tau = tau.view(1, 1)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    p = gumbel_sinkhorn(log_alpha, tau, data.draw(st.integers(1, 30)), generator=gen(seed),
                        noise=noise, hard=hard)
    assert p.dtype == dtype and torch.isfinite(p).all() and (p >= 0).all()
    assert (p.detach()[torch.isneginf(log_alpha.detach())] == 0).all()
    assert (p.double().sum(-2) - 1).abs().max().item() <= _sum_tolerance(dtype, 1, n)
    (grad,) = torch.autograd.grad((p * torch.randn(n, n, generator=gen(seed))).sum(), log_alpha)
    assert torch.isfinite(grad).all()


# ------------------------------------------------------------------ composability (issue 10)
# Plain differentiable torch ops, data checks and the assignment solver in registered operators.

STRUCTURED = {
    "relaxed_topk": lambda x, **kw: relaxed_topk(x, 2, 0.7, **kw),
    "relaxed_topk-hard": lambda x, **kw: relaxed_topk(x, 2, 0.7, hard=True, **kw),
    "gumbel_sinkhorn": lambda x, **kw: gumbel_sinkhorn(x, 0.7, 10, **kw),
    "gumbel_sinkhorn-hard": lambda x, **kw: gumbel_sinkhorn(x, 0.7, 10, hard=True, **kw),
    "sinkhorn-no-noise": lambda x, **kw: gumbel_sinkhorn(x, 0.7, 10, noise=False),
    "sinkhorn-no-noise-hard": lambda x, **kw: gumbel_sinkhorn(x, 0.7, 10, noise=False, hard=True),
}


def _seeded(name):
    return lambda x: STRUCTURED[name](x, generator=gen(60))


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_compile_matches_eager(name):
    x0 = torch.randn(4, 4, generator=gen(61))
    w = torch.randn(4, 4, generator=gen(62))
    expected, grad, out, compiled_grad = eager_and_compiled(_seeded(name), x0, w)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled_grad, grad)


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_compile_fullgraph_without_generator_matches_eager(name):
    """No graph break without a generator (the checks and the solver are registered operators)."""
    x0 = torch.randn(4, 4, generator=gen(69))
    w = torch.randn(4, 4, generator=gen(70))
    expected, grad, out, compiled_grad = eager_and_compiled(STRUCTURED[name], x0, w, fullgraph=True, seed=0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled_grad, grad)


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_torch_func_and_forward_ad_match_autograd(name):
    f = _seeded(name)
    x0 = torch.randn(4, 4, generator=gen(63), dtype=F64)
    w = torch.randn(4, 4, generator=gen(64), dtype=F64)
    x = x0.clone().requires_grad_(True)
    (f(x) * w).sum().backward()
    torch.testing.assert_close(torch.func.grad(lambda t: (f(t) * w).sum())(x0), x.grad)
    jac = torch.func.jacrev(f)(x0)
    torch.testing.assert_close(torch.einsum("ij,ijkl->kl", w, jac), x.grad)
    tangent = torch.randn(4, 4, generator=gen(65), dtype=F64)
    _, jvp = torch.func.jvp(f, (x0,), (tangent,))
    torch.testing.assert_close(jvp, torch.einsum("ijkl,kl->ij", jac, tangent))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        torch.testing.assert_close(fwAD.unpack_dual(f(fwAD.make_dual(x0, tangent))).tangent, jvp)


@pytest.mark.parametrize("name", ["sinkhorn-no-noise", "sinkhorn-no-noise-hard"])
def test_structured_vmap_without_noise_equals_the_loop(name):
    f = STRUCTURED[name]
    x = torch.randn(5, 4, 4, generator=gen(66))
    torch.testing.assert_close(torch.func.vmap(f)(x), torch.stack([f(x[b]) for b in range(5)]))
    w = torch.arange(16.0).view(4, 4)
    grads = torch.func.vmap(torch.func.grad(lambda t: (f(t) * w).sum()))(x)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda t: (f(t) * w).sum())(x[b])
                                                   for b in range(5)]))


@pytest.mark.parametrize("name", ["relaxed_topk", "relaxed_topk-hard", "gumbel_sinkhorn", "gumbel_sinkhorn-hard"])
def test_structured_vmap_with_noise_draws_different_noise(name):
    out = torch.func.vmap(STRUCTURED[name], randomness="different")(torch.zeros(32, 4, 4))
    assert torch.isfinite(out).all() and not torch.equal(out, out[:1].expand_as(out))


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_inference_mode_matches_eager(name):
    f = _seeded(name)
    x = torch.randn(4, 4, generator=gen(67))
    expected = f(x)
    with torch.inference_mode():
        torch.testing.assert_close(f(x), expected)


def test_structured_checks_raise_under_compile_and_vmap():
    """The data checks and the assignment solver are registered operators: the same ValueError
    under torch.compile (fullgraph for the deterministic operator) and vmap."""
    torch._dynamo.reset()  # each test compiles afresh (no recompile limit across tests)
    f = torch.compile(lambda x: gumbel_sinkhorn(x, 0.5, 5, noise=False, hard=True), fullgraph=True)
    good = torch.randn(2, 3, 3, generator=gen(68))
    torch.testing.assert_close(f(good), gumbel_sinkhorn(good, 0.5, 5, noise=False, hard=True))
    bad = good.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        f(bad)
    infeasible = torch.tensor([[0.0, NEG_INF, NEG_INF], [0.0, NEG_INF, NEG_INF], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no permutation avoids"):
        f(infeasible.expand(2, 3, 3))
    with pytest.raises(ValueError, match="no permutation avoids"):
        torch.func.vmap(matching)(infeasible.expand(2, 3, 3))
    with pytest.raises(ValueError, match="k=3 is larger"):
        torch.compile(lambda x: relaxed_topk(x, 3))(torch.tensor([[0.0, 1.0, NEG_INF]]))
    torch.library.opcheck(gks._check, (good, -1, 1, True))
    torch.library.opcheck(gks._assignment, (good,))


# ------------------------------------------------------------------ docs


def test_module_docstring_examples():
    result = doctest.testmod(gks, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_float_temperatures_with_half_scores_are_accepted(dtype):
    """A Python float tau is never rounded to the scores' dtype (1e5 is inf in float16)."""
    x = torch.randn(4, 4, generator=gen(70)).to(dtype).requires_grad_(True)
    for tau in (1e-30, 1e-6, 7e4, 1e6, 1e30):
        for f in (lambda t: relaxed_topk(x, 2, t, generator=gen(71)),
                  lambda t: gumbel_sinkhorn(x, t, 5, generator=gen(71))):
            y = f(tau)
            assert torch.isfinite(y).all(), tau
            (grad,) = torch.autograd.grad(y[:, 0].sum(), x)
            assert torch.isfinite(grad).all(), tau

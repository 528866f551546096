"""The fused Triton operators, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

They are checked against the torch formulas on the same Philox noise (which the noise
operator writes out), for the distribution they sample (chi-square), for the noise transform
against float64 on chosen bits (both tails), at large scores, and wired into the public
functions (the dispatch is pointed at them for CPU tensors) for values and gradients. Shapes
straddle the single-tile / looping boundary. What needs a GPU (compile, export, CUDA graphs)
is in tests/test_cuda.py.
"""

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # set by conftest.py when there is no GPU
    pytest.skip("runs the kernels on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)
from scipy import stats

import gumbelkit as gk
from gumbelkit._kernels import dispatch, ops

# without Triton (pip install gumbelkit[triton]) the module is skipped, not an error
tg = pytest.importorskip("gumbelkit._kernels.triton_gumbel", exc_type=ImportError)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# the interpreter evaluates both branches of tl.where on padded lanes (e.g. 0/0), then discards them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def seed(s: int) -> torch.Tensor:
    return ops.draw_seed(torch.Generator().manual_seed(s), torch.device("cpu"))


def noise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return tg.triton_gumbel_noise(x, s)


def scores(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(x - max x) + g in float64 on the kernels' noise (rows along the last dim)."""
    x64 = x.double()
    return (x64 - x64.amax(-1, keepdim=True)) + noise(x, s).double()


@triton.jit
def _transform_kernel(R, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(R + offs, mask=offs < n).to(tl.uint32, bitcast=True)
    tl.store(OUT + offs, tg.gumbel_from_bits(r), mask=offs < n)


def transform(bits: list[int]) -> torch.Tensor:
    r = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32)
    out = torch.empty(len(bits), dtype=torch.float32)
    _transform_kernel[(1,)](r, out, len(bits), BLOCK=triton.next_power_of_2(len(bits)))
    return out


def exact(bit: int) -> float:
    """-log(-log U) in float64 from the definition: U = X or 1 - X, X = (b + 1/2) 2**-32."""
    upper = bit >> 31
    b = (~bit if upper else bit) & 0x7FFFFFFF
    x = (b + 0.5) * 2.0**-32
    e = -math.log1p(-x) if upper else -math.log(x)
    return -math.log(e)


def test_transform_is_exact_in_both_tails():
    extremes = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFF00, 0x12345678, 0xDEADBEEF]
    bits = extremes + torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    got = transform(bits).double()
    want = torch.tensor([exact(b) for b in bits], dtype=torch.float64)
    err = ((got - want).abs() / want.abs().clamp(min=1) * 2**24).max().item()
    assert err <= 4, err  # units of 2**-24 max(1, |G|)
    assert abs(got[6].item() - exact(0xFFFFFFFF)) < 1e-5 and got[6].item() > 22.8  # the top of the upper tail
    assert got[0].item() == pytest.approx(-math.log(33 * math.log(2)), rel=1e-6)  # the bottom


def test_noise_is_gumbel_finite_and_reproducible():
    like = torch.empty(200, 1000)
    g = noise(like, seed(0)).flatten().double()
    assert torch.isfinite(g).all() and g.max() < 22.9 and g.min() > -3.2
    assert stats.kstest(g.numpy(), stats.gumbel_r.cdf).pvalue > 1e-3
    assert torch.equal(g, noise(like, seed(0)).flatten().double())
    assert not torch.equal(g, noise(like, seed(1)).flatten().double())


@pytest.mark.parametrize("shape", [(37, 10), (3, 8192), (2, 8193), (2, 10000)])  # single tile / loop
@pytest.mark.parametrize("hard", [False, True])
def test_softmax_matches_torch_on_the_same_noise(shape, hard):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1e4  # a shift the kernel removes
    s, tau = seed(2), 0.7
    y, index = tg.triton_gumbel_softmax(x, s, tau, 1, hard)
    z = scores(x, s)
    torch.testing.assert_close(y.double(), torch.softmax(z / tau, -1), atol=2e-6, rtol=1e-4)
    if hard:
        assert torch.equal(index, z.argmax(-1, keepdim=True))
    else:
        assert index.numel() == 0


def test_other_dim_and_half_precision():
    x = torch.randn(6, 40, 5, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y, index = tg.triton_gumbel_softmax(x, seed(5), 0.5, 1, True)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and index.shape == (6, 1, 5)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().sum(1), torch.ones(6, 5), atol=2e-2, rtol=0)
    assert torch.equal(y.float().argmax(1, keepdim=True), index)


def test_hard_frequencies_match_softmax():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 20_000
    _, index = tg.triton_gumbel_softmax(probs.log().float().expand(n, 4).contiguous(), seed(6), 0.5, 1, True)
    counts = torch.bincount(index.flatten(), minlength=4).double().numpy()
    assert stats.chisquare(counts, (probs * n).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("n_cols", [4, 4097, 10_000])  # one tile / several tiles per row
def test_gumbel_max_is_argmax_of_the_same_noise(n_cols):
    x = torch.randn(5, n_cols, generator=torch.Generator().manual_seed(7))
    s = seed(8)
    idx = tg.triton_gumbel_max(x, s, 1)
    assert idx.shape == (5, 1)
    assert torch.equal(idx, scores(x, s).argmax(-1, keepdim=True))


def test_gumbel_max_frequencies_neg_inf_and_large_scores():
    logits = torch.tensor([0.5, float("-inf"), -1.0, 2.0, 0.0])
    n = 20_000
    idx = tg.triton_gumbel_max(logits.expand(n, 5).contiguous(), seed(9), 1).flatten()
    counts = torch.bincount(idx, minlength=5)
    assert counts[1] == 0
    probs = torch.softmax(logits.double(), 0)
    keep = probs > 0
    assert stats.chisquare(counts[keep].double().numpy(), (probs[keep] * n).numpy()).pvalue > 1e-3
    # two logits of 1e7: shifted before the noise is added, so 50/50 (unshifted float32 would round g)
    for big in (1e7, 1e30):
        idx = tg.triton_gumbel_max(torch.full((4000, 2), big), seed(10), 1).flatten()
        assert abs(idx.float().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(4000)


def test_bad_rows_raise():
    nan_row = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN"):
        tg.triton_gumbel_max(nan_row, seed(0), 1)
    with pytest.raises(ValueError, match="NaN"):
        tg.triton_gumbel_softmax(nan_row, seed(0), 1.0, 1, False)
    with pytest.raises(ValueError, match="NaN"):  # the looping kernel too
        tg.triton_gumbel_softmax(torch.zeros(1, 9000).index_fill_(1, torch.tensor([8500]), float("nan")),
                                 seed(0), 1.0, 1, True)
    with pytest.raises(ValueError, match=r"\+inf"):
        tg.triton_gumbel_max(torch.tensor([[0.0, float("inf")]]), seed(0), 1)
    with pytest.raises(ValueError, match="no allowed"):
        tg.triton_gumbel_softmax(torch.full((2, 3), float("-inf")), seed(0), 1.0, 1, False)


def test_vmap_over_the_operator():
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(11))
    out = torch.func.vmap(lambda t: tg.triton_gumbel_max(t, seed(12), 1), randomness="same")(x)
    assert torch.equal(out[1], tg.triton_gumbel_max(x[1], seed(12), 1))
    same = torch.func.vmap(lambda t: tg.triton_gumbel_noise(t, ops.draw_seed(None, t.device)), randomness="same")(x)
    assert torch.equal(same[0], same[2])
    diff = torch.func.vmap(lambda t: tg.triton_gumbel_noise(t, ops.draw_seed(None, t.device)),
                           randomness="different")(x)
    assert not torch.equal(diff[0], diff[2])


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Point the dispatch at the Triton operators for CPU tensors (the interpreter runs them)."""
    monkeypatch.setattr(ops, "_triton_serves", lambda t: None if t.dtype == torch.float64 else tg)


def test_public_functions_run_the_operators(triton_on_cpu):
    x = torch.randn(8, 300, generator=torch.Generator().manual_seed(13), requires_grad=True)
    g = torch.Generator()
    g.manual_seed(3)
    y = gk.gumbel_softmax(x, tau=0.5, generator=g)
    g.manual_seed(3)
    want, _ = tg.triton_gumbel_softmax(x.detach(), ops.draw_seed(g, x.device), 0.5, 1, False)
    assert torch.equal(y.detach(), want)
    # the closed-form backward on the operator's output: d<y, w>/dx = y (w - <y, w>) / tau
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(14))
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    yd = y.detach()
    torch.testing.assert_close(grad, yd * (w - (yd * w).sum(-1, keepdim=True)) / 0.5)
    # hard: one-hot forward at the argmax of the same scores, straight-through gradient
    g.manual_seed(5)
    hard = gk.gumbel_softmax(x, tau=0.5, hard=True, generator=g)
    g.manual_seed(5)
    assert torch.equal(hard.argmax(-1), gk.gumbel_max(x.detach(), generator=g))
    assert torch.equal(hard.detach().sum(-1), torch.ones(8))
    # gumbel_noise_like is the noise the samplers add
    g.manual_seed(6)
    n = gk.gumbel_noise_like(x.detach(), generator=g)
    g.manual_seed(6)
    xd = x.detach()
    assert torch.equal(gk.gumbel_max(xd, generator=g), ((xd - xd.amax(-1, keepdim=True)) + n).argmax(-1))


@pytest.mark.parametrize(("shape", "dim"), [((4, 8), 0), ((3, 5, 7), 1), ((3, 5, 7), 0), ((2, 9000), 0)])
def test_any_dim_uses_the_noise_of_gumbel_noise_like(triton_on_cpu, shape, dim):
    """The noise of an entry is the one at its flat index in the caller's tensor, for any dim."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(15))
    g = torch.Generator()
    g.manual_seed(1)
    n = gk.gumbel_noise_like(x, generator=g).double()
    z = (x.double() - x.double().amax(dim, keepdim=True)) + n
    g.manual_seed(1)
    y = gk.gumbel_softmax(x, 0.7, dim=dim, generator=g)
    torch.testing.assert_close(y.double(), torch.softmax(z / 0.7, dim), atol=2e-6, rtol=1e-4)
    g.manual_seed(1)
    assert torch.equal(gk.gumbel_max(x, dim=dim, generator=g), z.argmax(dim))


def test_dispatch_never_sends_cpu_tensors_to_triton(monkeypatch):
    cpu = torch.zeros(2, 3)
    for backend in ("auto", "torch", "triton"):
        monkeypatch.setenv("GUMBELKIT_BACKEND", backend)
        assert dispatch.triton_kernels(cpu) is None
        gk.gumbel_softmax(cpu)  # the torch path serves it
    monkeypatch.setenv("GUMBELKIT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="GUMBELKIT_BACKEND"):
        dispatch.triton_kernels(cpu)

"""The fused Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

They are checked against the torch formulas on the same Philox noise (which the noise kernel
writes out for the test), for the distribution they sample (chi-square, KS) and for the
gradient; shapes straddle the single-tile / looping boundary.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import pytest
import torch
from scipy import stats

import gumbelkit as gk
from gumbelkit._kernels import dispatch

# without Triton (pip install gumbelkit[triton]) the module is skipped, not an error
tg = pytest.importorskip("gumbelkit._kernels.triton_gumbel", exc_type=ImportError)

# the interpreter evaluates both branches of tl.where on padded lanes (e.g. 0/0), then discards them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def seed(s: int) -> torch.Tensor:
    return tg.draw_seed(torch.device("cpu"), torch.Generator().manual_seed(s))


def reference(x: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    noise = tg.triton_gumbel_noise(tuple(x.shape), s).double()
    return torch.softmax((x.double() + noise) / tau, -1)


def test_philox_noise_is_gumbel_and_finite():
    g = tg.triton_gumbel_noise((200, 1000), seed(0)).flatten().double()
    assert torch.isfinite(g).all()
    assert stats.kstest(g.numpy(), stats.gumbel_r.cdf).pvalue > 1e-3
    assert torch.equal(g, tg.triton_gumbel_noise((200, 1000), seed(0)).flatten().double())
    assert not torch.equal(g, tg.triton_gumbel_noise((200, 1000), seed(1)).flatten().double())


@pytest.mark.parametrize("shape", [(37, 10), (3, 8192), (2, 8193), (2, 10000)])  # single tile / loop
def test_forward_matches_torch_on_the_same_noise(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    s, tau = seed(2), 0.7
    y, index = tg.triton_softmax_forward(x, tau, s, 1)
    want = reference(x, s, tau)
    torch.testing.assert_close(y.double(), want, atol=2e-6, rtol=1e-4)
    noise = tg.triton_gumbel_noise(tuple(x.shape), s)
    assert torch.equal(index, (x + noise).argmax(-1, keepdim=True))


def test_other_dim_and_half_precision():
    x = torch.randn(6, 40, 5, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y, index = tg.triton_softmax_forward(x, 0.5, seed(5), 1)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and index.shape == (6, 1, 5)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().sum(1), torch.ones(6, 5), atol=2e-2, rtol=0)


def test_hard_frequencies_match_softmax():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 20_000
    _, index = tg.triton_softmax_forward(probs.log().float().expand(n, 4).contiguous(), 0.5, seed(6), 1)
    counts = torch.bincount(index.flatten(), minlength=4).double().numpy()
    assert stats.chisquare(counts, (probs * n).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("n_cols", [4, 4097, 10_000])  # one tile / several tiles per row
def test_gumbel_max_is_argmax_of_the_same_noise(n_cols):
    x = torch.randn(5, n_cols, generator=torch.Generator().manual_seed(7))
    s = seed(8)
    idx = tg.triton_gumbel_max(x, 1, s)
    noise = tg.triton_gumbel_noise((5, n_cols), s)
    assert torch.equal(idx, (x + noise).argmax(-1))


def test_gumbel_max_frequencies_and_neg_inf():
    logits = torch.tensor([0.5, float("-inf"), -1.0, 2.0, 0.0])
    n = 20_000
    idx = tg.triton_gumbel_max(logits.expand(n, 5).contiguous(), 1, seed(9))
    counts = torch.bincount(idx, minlength=5)
    assert counts[1] == 0
    probs = torch.softmax(logits.double(), 0)
    keep = probs > 0
    assert stats.chisquare(counts[keep].double().numpy(), (probs[keep] * n).numpy()).pvalue > 1e-3


def test_bad_rows_raise():
    nan_row = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN"):
        tg.triton_gumbel_max(nan_row, 1, seed(0))
    with pytest.raises(ValueError, match="NaN"):
        tg.triton_softmax_forward(nan_row, 1.0, seed(0), 1)
    with pytest.raises(ValueError, match="NaN"):  # the looping kernel too
        tg.triton_softmax_forward(torch.zeros(1, 9000).index_fill_(1, torch.tensor([8500]), float("nan")),
                                  1.0, seed(0), 1)
    with pytest.raises(ValueError, match=r"\+inf"):
        tg.triton_gumbel_max(torch.tensor([[0.0, float("inf")]]), 1, seed(0))
    with pytest.raises(ValueError, match="no allowed"):
        tg.triton_softmax_forward(torch.full((2, 3), float("-inf")), 1.0, seed(0), 1)


def test_dispatch_never_sends_cpu_tensors_to_triton(monkeypatch):
    cpu = torch.zeros(2, 3)
    for backend in ("auto", "torch", "triton"):
        monkeypatch.setenv("GUMBELKIT_BACKEND", backend)
        assert dispatch.triton_kernels(cpu) is None
        gk.gumbel_softmax(cpu)  # the torch path serves it
    monkeypatch.setenv("GUMBELKIT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="GUMBELKIT_BACKEND"):
        dispatch.triton_kernels(cpu)

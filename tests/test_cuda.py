"""CUDA checks (skipped without a GPU): the Triton operators under torch.compile, export and
CUDA-graph capture, agreement with the CPU definitions, and no host synchronisation.

Run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``; the CPU suite checks
the same kernels under Triton's interpreter (tests/test_triton_kernels.py).
"""

import math

import pytest
import torch

import gumbelkit as gk

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [(64, 1000), (16, 50_000)]  # single tile / looping kernel


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _triton_available(), reason="needs triton")


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("GUMBELKIT_BACKEND", raising=False)


@needs_triton
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hard_frequencies_and_soft_rows(shape, dtype):
    from scipy import stats

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = torch.full(shape, -1e4, dtype=torch.float32)
    logits[:, :4] = probs.log().float()
    x = logits.to(dtype).cuda()
    y = gk.gumbel_softmax(x, tau=0.5, hard=True, generator=torch.Generator("cuda").manual_seed(0))
    counts = torch.bincount(y.argmax(-1).cpu(), minlength=shape[1])[:4].double().numpy()
    assert stats.chisquare(counts, (probs * shape[0]).numpy() * counts.sum() / shape[0]).pvalue > 1e-4
    soft = gk.gumbel_softmax(x, tau=0.5, generator=torch.Generator("cuda").manual_seed(1))
    torch.testing.assert_close(soft.float().sum(-1), torch.ones(shape[0], device="cuda"), atol=2e-2, rtol=0)


@needs_triton
def test_ties_at_large_scores_are_fair():
    x = torch.full((20_000, 2), 1e7, device="cuda")
    idx = gk.gumbel_max(x, generator=torch.Generator("cuda").manual_seed(2)).float()
    assert abs(idx.mean().item() - 0.5) < 5 * 0.5 / math.sqrt(20_000)


@needs_triton
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_equals_eager_and_inductor_sees_the_kernels(fullgraph):
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(32, 5000, device="cuda")

    def f(t, g):
        return gk.gumbel_softmax(t, tau=0.7, generator=g), gk.gumbel_max(t, generator=g)

    eager = f(x, torch.Generator("cuda").manual_seed(3))
    compiled = torch.compile(f, fullgraph=fullgraph)
    out, code = run_and_get_code(compiled, x, torch.Generator("cuda").manual_seed(3))
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert "_softmax_fwd_kernel" in "\n".join(code)  # a user-defined Triton kernel, not an opaque op


@needs_triton
def test_export_runs_twice_with_fresh_noise():
    class M(torch.nn.Module):
        def forward(self, t):
            return gk.gumbel_softmax(t, tau=0.5)

    x = torch.randn(8, 100, device="cuda")
    ep = torch.export.export(M(), (x,))
    a, b = ep.module()(x), ep.module()(x)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="NaN"):
        ep.module()(x.clone().fill_(float("nan")))


@needs_triton
def test_cuda_graph_capture_and_replay():
    """Capture fails on any host synchronisation, so this also checks that the hot path has none."""
    x = torch.randn(16, 4096, device="cuda")
    static_out = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (compiles the kernels) outside capture
            gk.gumbel_softmax(x, tau=0.5, hard=True)
            gk.gumbel_max(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = (gk.gumbel_softmax(x, tau=0.5, hard=True), gk.gumbel_max(x))
    graph.replay()
    first = [t.clone() for t in static_out]
    graph.replay()
    assert not torch.equal(first[0], static_out[0]) or not torch.equal(first[1], static_out[1])
    assert torch.equal(static_out[0].sum(-1), torch.ones(16, device="cuda"))  # one-hot rows
    assert torch.equal((static_out[0] == 1).sum(-1), torch.ones(16, dtype=torch.int64, device="cuda"))


def test_torch_path_on_cuda_float64_matches_the_distribution():
    from scipy import stats

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    x = probs.log().expand(20_000, 4).contiguous().cuda()
    idx = gk.gumbel_max(x, generator=torch.Generator("cuda").manual_seed(4))
    counts = torch.bincount(idx.cpu(), minlength=4).double().numpy()
    assert stats.chisquare(counts, (probs * 20_000).numpy()).pvalue > 1e-4

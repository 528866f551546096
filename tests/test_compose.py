"""gumbelkit composes with the PyTorch stack: the matrix of tests/compose_matrix.py, cell by cell.

Rows are every public sampler, module, distribution and estimator, and the torch functions they
replace; columns are torch.compile (default, fullgraph, dynamic), torch.export, torch.func
transforms, forward AD, meta and fake tensors, inference_mode/no_grad at 2**21 elements,
autocast, checkpointing (with and without a generator), deterministic algorithms,
non-contiguous and zero-size inputs, and module state. docs/compose.md shows the same table
(``python benchmarks/compose_table.py --write-docs``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import compose_matrix as cm
import gumbelkit as gk
from gumbelkit._kernels import ops

torch._dynamo.config.cache_size_limit = 256


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CELLS = [(r, c) for r in cm.ROWS for c in cm.COLUMNS]


def _param(row: str, col: str):
    marks = []
    if (row, col) in cm.UNSUPPORTED:
        marks.append(pytest.mark.xfail(strict=True, reason=cm.UNSUPPORTED[row, col]))
    return pytest.param(row, col, marks=marks, id=f"{row}|{col}")


@pytest.mark.parametrize(("row", "col"), [_param(r, c) for r, c in CELLS])
def test_cell(row, col):
    try:
        cm.COLUMNS[col](cm.ROWS[row])
    except cm.NotApplicable as why:
        pytest.skip(f"n/a: {why}")


def test_gumbelkit_passes_every_cell_its_torch_baseline_passes():
    # the baselines' failures are listed too; a gumbelkit row never fails where its baseline passes
    pairs = {"gumbel_softmax": "torch F.gumbel_softmax", "gumbel_softmax hard": "torch F.gumbel_softmax hard",
             "nn.GumbelSoftmax": "torch F.gumbel_softmax", "distributions.Concrete.rsample":
             "torch RelaxedOneHotCategorical", "sample": "torch multinomial(softmax)",
             "gumbel_max": "torch multinomial(softmax)"}
    for ours, theirs in pairs.items():
        for col in cm.COLUMNS:
            if (ours, col) in cm.UNSUPPORTED:
                assert (theirs, col) in cm.UNSUPPORTED, (ours, col, cm.UNSUPPORTED[ours, col])


# ---------------------------------------------------------------- errors under compile and export

NAN = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
CALLS = {
    "gumbel_softmax": lambda x: gk.gumbel_softmax(x, 0.5),
    "hard": lambda x: gk.gumbel_softmax(x, 0.5, hard=True),
    "log": lambda x: gk.log_gumbel_softmax(x, 0.5),
    "gumbel_max": lambda x: gk.gumbel_max(x),
    "gumbel_topk": lambda x: gk.gumbel_topk(x, 2).indices,
}


@pytest.mark.parametrize("fn", list(CALLS))
def test_bad_logits_raise_the_same_error_compiled_and_exported(fn):
    f = CALLS[fn]
    with pytest.raises(ValueError, match="NaN"):
        f(NAN)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="NaN"):
        torch.compile(f, fullgraph=True)(NAN)

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)

    ep = torch.export.export(M(), (torch.zeros(2, 3),))
    ep.module()(torch.zeros(2, 3))  # valid input runs
    with pytest.raises(ValueError, match="NaN"):
        ep.module()(NAN)
    with pytest.raises(ValueError, match="no allowed"):
        ep.module()(torch.full((2, 3), float("-inf")))


def test_tensor_tau_values_are_checked_inside_the_operator():
    f = torch.compile(lambda x, t: gk.gumbel_softmax(x, t), fullgraph=True)
    with pytest.raises(ValueError, match="tau"):
        f(torch.zeros(2, 3), torch.tensor([[0.5], [-1.0]]))


@pytest.mark.parametrize("fn", list(CALLS))
def test_no_graph_breaks_without_generator(fn):
    explained = torch._dynamo.explain(CALLS[fn])(torch.randn(4, 8))
    assert explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------- the operators themselves

def _seed() -> torch.Tensor:
    return torch.tensor(12345, dtype=torch.int64)


OPCHECK = {
    "gumbel_noise": (ops.gumbel_noise_op, lambda x: (x, _seed())),
    "gumbel_softmax soft": (ops.gumbel_softmax_op, lambda x: (x, _seed(), None, None, 0.5, 1, ops.SOFT)),
    "gumbel_softmax hard+mask": (ops.gumbel_softmax_op,
                                 lambda x: (x, _seed(), torch.arange(8) != 2, None, 0.5, 1, ops.HARD)),
    "gumbel_softmax log tau tensor": (ops.gumbel_softmax_op,
                                      lambda x: (x, _seed(), None, torch.full((4, 1), 0.3), 1.0, 1, ops.LOG)),
    "gumbel_max": (ops.gumbel_max_op, lambda x: (x, _seed(), None, 1)),
    "gumbel_topk": (ops.gumbel_topk_op, lambda x: (x, _seed(), None, 3, 0)),
    "check_rows": (ops._check_rows_op, lambda x: (x.amax(1, keepdim=True), x, torch.arange(8) != 2, 1)),
}


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name):
    op, args = OPCHECK[name]
    torch.library.opcheck(op, args(torch.randn(4, 8)))


def test_row_check_operator_raises_under_compile():
    f = torch.compile(lambda x: ops.checked_row_max(x, None, 1), fullgraph=True)
    assert torch.equal(f(torch.ones(2, 3)), torch.ones(2, 1))
    with pytest.raises(ValueError, match="NaN"):
        f(torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]]))


def test_operators_are_pure_functions_of_the_seed():
    x = torch.randn(4, 8)
    a = ops.gumbel_softmax_op(x, _seed(), None, None, 0.5, 1, ops.SOFT)
    b = ops.gumbel_softmax_op(x, _seed(), None, None, 0.5, 1, ops.SOFT)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- threads, tracing, generators

@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_parallel_noise_under_thread_local_modes(mode):
    # the chunked noise runs on pool threads: they must work under the caller's inference mode
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
        with ctx:
            ids = gk.sample(torch.randn(16, 128256), temperature=0.8)
            y = gk.gumbel_softmax(torch.randn(16, 2**17), 0.5)
        assert ids.shape == (16,) and torch.isfinite(y).all()
    finally:
        torch.set_num_threads(threads)


def test_jit_trace_records_the_operator_not_the_fill():
    x = torch.randn(4, 2**19)  # 2**21 elements: the parallel fill

    def f(t):
        return gk.gumbel_max(t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(f, (x,), check_trace=False)
    assert "gumbelkit::gumbel_max" in str(traced.graph)
    torch.manual_seed(3)
    a = traced(x)
    torch.manual_seed(3)
    assert torch.equal(a, f(x))  # the traced call draws like the eager one


def test_compiled_with_generator_is_bit_identical_to_eager():
    x = torch.randn(6, 10, requires_grad=True)

    def f(t, g):
        return gk.gumbel_softmax(t, 0.5, hard=True, generator=g)

    torch._dynamo.reset()
    cf = torch.compile(f)
    a = cf(x, torch.Generator().manual_seed(4))
    b = f(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    w = torch.randn(6, 10)
    (ga,) = torch.autograd.grad((a * w).sum(), x)
    (gb,) = torch.autograd.grad((b * w).sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)  # inductor fuses the backward: rounding only


def test_rng_context_checkpoint_with_two_generators_and_draws_after():
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(3, 7, requires_grad=True)
    w = torch.randn(3, 7)

    def f(t, g1, g2):
        return gk.gumbel_softmax(t, 0.5, generator=g1) * gk.gumbel_softmax(t, 2.0, generator=g2)

    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    (f(x, g1, g2) * w).sum().backward()
    want, after = x.grad.clone(), gk.gumbel_noise((3,), generator=g1)
    x.grad = None
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    out = checkpoint(f, x, g1, g2, use_reentrant=False, context_fn=gk.rng_context(g1, g2))
    (out * w).sum().backward()
    assert torch.equal(x.grad, want)
    assert torch.equal(gk.gumbel_noise((3,), generator=g1), after)  # the generator ends where it should
    with pytest.raises(TypeError, match="Generator"):
        gk.rng_context(3)


def test_compose_doc_table_is_current():
    # docs/compose.md holds the matrix between markers; the rows and columns it names are the test's
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "compose.md").read_text()
    table = page.split("<!-- matrix:start -->")[1].split("<!-- matrix:end -->")[0]
    header = table.strip().splitlines()[0]
    assert all(c in header for c in cm.COLUMNS)
    assert all(f"| {r} |" in table for r in cm.ROWS)

"""The composability matrix: every public sampler, module and distribution against every PyTorch context.

Rows are callables ``fn(x, generator) -> Tensor`` on a float32 input ``x``; columns are checks
that run a row inside one context (compile, export, vmap, ...) and raise on failure. Used by
``tests/test_compose.py`` (one test per cell) and ``benchmarks/compose_table.py`` (the table in
docs/compose.md). ``torch`` rows are the baselines gumbelkit must match or beat, cell by cell.
"""

from __future__ import annotations

import copy
import datetime
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

import gumbelkit as gk
from gumbelkit import distributed as gd
from gumbelkit import estimators
from gumbelkit._kernels import vocab_parallel as vp

BIG = 2**21  # elements: past the parallel-noise threshold


@dataclass(frozen=True)
class Row:
    fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
    differentiable: bool = True
    generator: bool = True  # takes generator=
    torch_baseline: bool = False
    module: Callable[[], nn.Module] | None = None  # for state_dict / pickle / deepcopy
    shape: tuple[int, ...] = (4, 8)
    random: bool = True  # draws noise (export must not freeze it; vmap randomness applies)
    tags: frozenset[str] = field(default_factory=frozenset)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Head(nn.Module):
    """A linear layer followed by a module under test: compiled models look like this."""

    def __init__(self, inner: nn.Module, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(self.linear(x))
        return out[0] if isinstance(out, tuple) else out


class _VAE(nn.Module):
    """CategoricalVAE trained with straight-through samples; returns its differentiable loss terms."""

    def __init__(self):
        super().__init__()
        self.vae = gk.nn.CategoricalVAE(8, n_latents=2, n_classes=3, hidden=(8,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae(torch.sigmoid(x), lambda logits: gk.gumbel_softmax(logits, 1.0, hard=True))
        return out.nll + out.kl


def _module_row(make: Callable[[], nn.Module], **kw) -> Row:
    """A row calling one module instance (weights fixed by seed; a copy per other device).

    The instance is built here, at import, not inside the first cell that calls it: building
    draws the initial weights, which a cell's context (vmap, fullgraph, forward AD) may refuse.
    """

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return make()

    instances = {"cpu": build()}

    def fn(x, g):
        device = str(x.device)
        if device not in instances:
            instances[device] = copy.deepcopy(instances["cpu"]).to(x.device)
        return instances[device](x)

    return Row(fn, generator=False, module=build, **kw)


def _estimator_row(method: str) -> Row:
    if method in ("reinforce", "rloo"):  # score-function estimators: the sample and its log-probability
        def fn(x, g):
            _, log_p = estimators.sample_with_log_prob(x, 2, generator=g)
            return log_p.T  # (batch, n): batch first, like the other rows
        return Row(fn)
    return Row(lambda x, g, method=method: estimators.sample(x, method=method, tau=0.7, generator=g))


def _concrete(x, g):
    return gk.distributions.Concrete(0.7, logits=x, validate_args=False).rsample()


def _dist(name: str, draw: str = "rsample") -> Callable:
    D = gk.distributions

    def make(x):
        return {"ExpConcrete": lambda: D.ExpConcrete(0.7, logits=x, validate_args=False),
                "BinaryConcrete": lambda: D.BinaryConcrete(0.7, logits=x, validate_args=False),
                "HardConcrete": lambda: D.HardConcrete(0.7, x, validate_args=False),
                "PlackettLuce": lambda: D.PlackettLuce(x, validate_args=False)}[name]()

    if draw == "log_prob":
        return lambda x, g: D.Concrete(0.7, logits=x, validate_args=False).log_prob(torch.softmax(x.detach() * 0.5, -1))

    return lambda x, g: getattr(make(x), draw)()


def _validated(name: str) -> Callable:
    """A row with default validation (``validate_args=None``: on): every check runs in the operator."""
    D = gk.distributions

    def fn(x, g):
        if name == "ExpConcrete":
            d = D.ExpConcrete(0.7, logits=x)
            return d.log_prob(d.rsample())
        if name == "BinaryConcrete":  # probs, the support of log_prob and cdf, icdf's probabilities
            d = D.BinaryConcrete(0.7, probs=torch.sigmoid(x))
            y = d.rsample()
            return d.log_prob(y) + d.icdf(d.cdf(y))
        if name == "HardConcrete":
            d = D.HardConcrete(0.7, x)
            return d.log_prob(d.rsample())
        d = D.PlackettLuce(x, k=3)  # logits, k possible categories, distinct indices in range
        return d.log_prob(d.sample())

    return fn


def _baseline_relaxed(x, g):
    d = torch.distributions.RelaxedOneHotCategorical(torch.tensor(0.7), logits=x, validate_args=False)
    return d.rsample()


# The vocab-parallel rows run on a one-rank gloo group that needs no init_process_group (so the
# tests that expect torch.distributed to be uninitialized are unaffected).
_GROUP = torch.distributed.ProcessGroupGloo(torch.distributed.HashStore(), 0, 1, datetime.timedelta(seconds=60))


def _vp_seeds(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def _vp_local_step(x: torch.Tensor) -> torch.Tensor:
    """The rank-local operator alone, on a shard at offset 3 of a vocabulary of V + 5 tokens."""
    batch, width = x.shape
    temps = torch.full((batch,), 0.8, dtype=torch.float64, device=x.device)
    shift = x.detach().amax(-1).double() + 1.0 if width else torch.zeros(batch, dtype=torch.float64, device=x.device)
    return vp.vocab_parallel_max_op(x.detach(), _vp_seeds(x), shift, temps, 3, width + 5)[2]


def _vp_local_softmax(x: torch.Tensor) -> torch.Tensor:
    """The rank-local softmax operator alone: the shard's unnormalized Gumbel-Softmax at offset 3."""
    batch, width = x.shape
    shift = x.detach().amax(-1).double() + 1.0 if width else torch.zeros(batch, dtype=torch.float64, device=x.device)
    return vp.vocab_parallel_softmax_op(x.detach(), _vp_seeds(x), shift, 0.7, 3)[0]


ROWS: dict[str, Row] = {
    "gumbel_softmax": Row(lambda x, g: gk.gumbel_softmax(x, 0.7, generator=g)),
    "gumbel_softmax hard": Row(lambda x, g: gk.gumbel_softmax(x, 0.7, hard=True, generator=g)),
    "gumbel_softmax tensor tau": Row(lambda x, g: gk.gumbel_softmax(
        x, torch.full((x.shape[0], 1), 0.7, device=x.device), generator=g)),
    "gumbel_softmax mask": Row(lambda x, g: gk.gumbel_softmax(x, 0.7, generator=g,
                                                              mask=torch.arange(x.shape[-1], device=x.device) != 1)),
    "log_gumbel_softmax": Row(lambda x, g: gk.log_gumbel_softmax(x, 0.7, generator=g)),
    "gumbel_max": Row(lambda x, g: gk.gumbel_max(x, generator=g), differentiable=False),
    "gumbel_topk": Row(lambda x, g: gk.gumbel_topk(x, 3, generator=g).indices, differentiable=False),
    "gumbel_noise_like": Row(lambda x, g: gk.gumbel_noise_like(x, generator=g), differentiable=False),
    "sample": Row(lambda x, g: gk.sample(x, temperature=0.8, generator=g), differentiable=False),
    "sample top_k/top_p/min_p": Row(lambda x, g: gk.sample(x, temperature=2.0, top_k=50, top_p=0.95, min_p=0.001,
                                                           generator=g), differentiable=False, shape=(8, 64)),
    "sample seeds": Row(lambda x, g: gk.sample(x, seeds=torch.arange(x.shape[0], device=x.device)),
                        differentiable=False, generator=False, random=False),
    "nn.GumbelSoftmax": _module_row(lambda: _Head(gk.nn.GumbelSoftmax(tau=0.7))),
    "nn.GumbelSoftmax hard": _module_row(lambda: _Head(gk.nn.GumbelSoftmax(tau=0.7, hard=True))),
    "nn.GumbelSoftmax eval argmax": _module_row(
        lambda: _Head(gk.nn.GumbelSoftmax(tau=0.7, eval_mode="argmax")).eval(), differentiable=False, random=False),
    "nn.GumbelSoftmax eval softmax": _module_row(
        lambda: _Head(gk.nn.GumbelSoftmax(tau=0.7, eval_mode="softmax")).eval(), random=False),
    "nn.GumbelVectorQuantizer": _module_row(lambda: _Head(gk.nn.GumbelVectorQuantizer(8, 6, groups=2, vq_dim=4))),
    "nn.L0Gate": _module_row(lambda: _Head(gk.nn.L0Gate(8))),
    "nn.CategoricalVAE": _module_row(_VAE),
    "distributions.Concrete.rsample": Row(_concrete, generator=False),
    "distributions.Concrete default validation": Row(
        lambda x, g: (lambda d: d.log_prob(d.rsample()))(gk.distributions.Concrete(0.7, logits=x)), generator=False),
    **{f"distributions.{n} default validation": Row(_validated(n), generator=False)
       for n in ("ExpConcrete", "BinaryConcrete", "HardConcrete", "PlackettLuce")},
    "distributions.Concrete.log_prob": Row(_dist("Concrete", "log_prob"), generator=False, random=False),
    "distributions.ExpConcrete.rsample": Row(_dist("ExpConcrete"), generator=False),
    "distributions.BinaryConcrete.rsample": Row(_dist("BinaryConcrete"), generator=False),
    "distributions.HardConcrete.rsample": Row(_dist("HardConcrete"), generator=False),
    "distributions.PlackettLuce.sample": Row(_dist("PlackettLuce", "sample"), generator=False, differentiable=False),
    "structured.relaxed_topk": Row(lambda x, g: gk.relaxed_topk(x, 3, tau=0.7, generator=g)),
    "structured.relaxed_topk hard": Row(lambda x, g: gk.relaxed_topk(x, 3, tau=0.7, hard=True, generator=g)),
    "structured.gumbel_sinkhorn": Row(lambda x, g: gk.gumbel_sinkhorn(x, tau=0.7, n_iters=5, generator=g),
                                      shape=(2, 4, 4)),
    **{f"estimators {m}": _estimator_row(m) for m in estimators.available()},
    "distributed.vocab_parallel_gumbel_max": Row(
        lambda x, g: gd.vocab_parallel_gumbel_max(x, seeds=_vp_seeds(x), vocab_offset=0, temperature=0.8,
                                                  group=_GROUP), differentiable=False, generator=False, random=False),
    "distributed.vocab_parallel_gumbel_softmax": Row(
        lambda x, g: gd.vocab_parallel_gumbel_softmax(x, 0.7, seeds=_vp_seeds(x), vocab_offset=0, group=_GROUP),
        generator=False, random=False),
    "distributed.vocab_parallel_gumbel_softmax hard": Row(
        lambda x, g: gd.vocab_parallel_gumbel_softmax(x, 0.7, hard=True, seeds=_vp_seeds(x), vocab_offset=0,
                                                      group=_GROUP), generator=False, random=False),
    "distributed local step (op vocab_parallel_max_local)": Row(
        lambda x, g: _vp_local_step(x), differentiable=False, generator=False, random=False),
    "distributed local step (op vocab_parallel_softmax_local)": Row(
        lambda x, g: _vp_local_softmax(x), differentiable=False, generator=False, random=False),
    "torch F.gumbel_softmax": Row(lambda x, g: F.gumbel_softmax(x, 0.7), generator=False, torch_baseline=True),
    "torch F.gumbel_softmax hard": Row(lambda x, g: F.gumbel_softmax(x, 0.7, hard=True), generator=False,
                                       torch_baseline=True),
    "torch RelaxedOneHotCategorical": Row(_baseline_relaxed, generator=False, torch_baseline=True),
    "torch multinomial(softmax)": Row(lambda x, g: torch.multinomial(torch.softmax(x, -1), 1, generator=g),
                                      differentiable=False, torch_baseline=True),
}


# ------------------------------------------------------------------------------------ columns

class NotApplicable(Exception):
    """The context does not apply to this row (e.g. gradients of an index sampler)."""


def _x(row: Row, seed: int = 0, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.randn(shape or row.shape, generator=_gen(100 + seed))


def _nogen(row: Row) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: row.fn(t, None)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _grad_eager(row: Row, x: torch.Tensor, w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    (row.fn(x, None) * w).sum().backward()
    return x.grad


def _weights(row: Row, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Random output weights: the gradient of <w, f(x)> probes every output."""
    shape = row.fn(x, None).shape
    return torch.randn(shape, generator=_gen(seed))


def _need_grad(row: Row) -> None:
    if not row.differentiable:
        raise NotApplicable("not differentiable")


def col_eager(row: Row) -> None:
    x = _x(row)
    out = row.fn(x, _gen(1))
    assert torch.isfinite(out.float()).all()
    if row.generator:
        _same(out, row.fn(x, _gen(1)))


def _compile_check(row: Row, **kw) -> None:
    x = _x(row)
    torch._dynamo.reset()
    f = torch.compile(_nogen(row), **kw)
    out = f(x)
    assert out.shape == row.fn(x, None).shape
    if row.differentiable:
        xr = x.clone().requires_grad_()
        f(xr).sum().backward()
        assert torch.isfinite(xr.grad).all()
    if kw.get("dynamic"):
        assert f(_x(row, 1, (row.shape[0] + 3, *row.shape[1:]))).shape[0] == row.shape[0] + 3
    if row.generator and not kw.get("fullgraph"):
        # with a generator, the compiled call gives the eager call's bits (forward and backward)
        g = torch.compile(lambda t, gen: row.fn(t, gen), **kw)
        _same(g(x, _gen(5)), row.fn(x, _gen(5)))


def col_compile(row: Row) -> None:
    _compile_check(row)


def col_fullgraph(row: Row) -> None:
    _compile_check(row, fullgraph=True, backend="aot_eager")


def col_dynamic(row: Row) -> None:
    _compile_check(row, dynamic=True, backend="aot_eager")


class _Wrap(nn.Module):
    def __init__(self, row: Row):
        super().__init__()
        self.row = row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.fn(x, None)


def col_export(row: Row) -> None:
    x = _x(row)
    ep = torch.export.export(_Wrap(row), (x,))
    a, b = ep.module()(x), ep.module()(x)
    want = row.fn(x, None)
    assert a.shape == want.shape and a.dtype == want.dtype
    if row.random:
        assert not torch.equal(a, b), "the exported program froze its random draw"


def _vmap(row: Row, randomness: str) -> torch.Tensor:
    x = _x(row).unsqueeze(0).expand(3, *row.shape).contiguous()
    return torch.func.vmap(_nogen(row), randomness=randomness)(x)


def col_vmap_different(row: Row) -> None:
    if not row.random:
        raise NotApplicable("draws no noise")
    out = _vmap(row, "different")
    assert not (torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])), "samples did not differ"


def col_vmap_same(row: Row) -> None:
    out = _vmap(row, "same")
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]), "samples differed under 'same'"


def col_grad(row: Row) -> None:
    _need_grad(row)
    x = _x(row)
    w = _weights(row, x)
    torch.manual_seed(0)
    got = torch.func.grad(lambda t: (row.fn(t, None) * w).sum())(x)
    _same(got, _grad_eager(row, x, w))


def _jac(row: Row, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.func.jacrev(_nogen(row))(x)


def col_jacrev(row: Row) -> None:
    _need_grad(row)
    x = _x(row)
    w = _weights(row, x)
    jac = _jac(row, x)
    got = (jac * w.reshape(*w.shape, *([1] * x.dim()))).sum(tuple(range(w.dim())))
    _same(got, _grad_eager(row, x, w))


def col_jvp(row: Row) -> None:
    _need_grad(row)
    x, v = _x(row), torch.randn(row.shape, generator=_gen(8))
    torch.manual_seed(0)
    out, tangent = torch.func.jvp(_nogen(row), (x,), (v,))
    jac = _jac(row, x)
    want = (jac * v.reshape(*([1] * out.dim()), *v.shape)).sum(tuple(range(out.dim(), out.dim() + x.dim())))
    _same(tangent, want)


def col_forward_ad(row: Row) -> None:
    _need_grad(row)
    x, v = _x(row), torch.randn(row.shape, generator=_gen(8))
    torch.manual_seed(0)
    _, want = torch.func.jvp(_nogen(row), (x,), (v,))
    with fwAD.dual_level():
        torch.manual_seed(0)
        tangent = fwAD.unpack_dual(row.fn(fwAD.make_dual(x, v), None)).tangent
    _same(tangent, want)


def col_meta(row: Row) -> None:
    x = _x(row)
    out = row.fn(x.to("meta"), None)
    want = row.fn(x, None)
    assert out.device.type == "meta" and out.shape == want.shape and out.dtype == want.dtype


def col_fake(row: Row) -> None:
    want = row.fn(_x(row), None)
    with FakeTensorMode(allow_non_fake_inputs=True):  # a module's real weights meet fake inputs
        out = row.fn(torch.randn(row.shape), None)
    assert out.shape == want.shape and out.dtype == want.dtype


def _big(row: Row) -> torch.Tensor:
    if row.module is not None:
        return torch.randn(4096, *row.shape[1:])
    return torch.randn(BIG // math.prod(row.shape[1:]), *row.shape[1:])


def col_inference_mode(row: Row) -> None:
    with torch.inference_mode():
        out = row.fn(_big(row), None)
    assert torch.isfinite(out.float()).all()


def col_no_grad(row: Row) -> None:
    with torch.no_grad():
        out = row.fn(_big(row), None)
    assert torch.isfinite(out.float()).all()


def col_autocast_bf16(row: Row) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = row.fn(_x(row), None)
    assert torch.isfinite(out.float()).all()


def _checkpointed_grad(row: Row, generator: bool) -> None:
    _need_grad(row)
    x = _x(row)
    w = _weights(row, x)
    gen = _gen(3) if generator else None
    xr = x.clone().requires_grad_()
    torch.manual_seed(0)
    (row.fn(xr, gen) * w).sum().backward()
    gen = _gen(3) if generator else None
    xc = x.clone().requires_grad_()
    torch.manual_seed(0)
    kw = {"context_fn": gk.rng_context(gen)} if generator else {}
    out = checkpoint(lambda t: row.fn(t, gen), xc, use_reentrant=False, **kw)
    (out * w).sum().backward()
    _same(xc.grad, xr.grad)


def col_checkpoint(row: Row) -> None:
    _checkpointed_grad(row, generator=False)


def col_checkpoint_generator(row: Row) -> None:
    if not row.generator:
        raise NotApplicable("takes no generator")
    _checkpointed_grad(row, generator=True)


def col_deterministic(row: Row) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = row.fn(_x(row), _gen(2) if row.generator else None)
        if row.differentiable:
            x = _x(row).requires_grad_()
            row.fn(x, None).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.isfinite(out.float()).all()


def col_noncontiguous(row: Row) -> None:
    x = _x(row)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, transposed strides
    assert not strided.is_contiguous()
    if row.generator:
        _same(row.fn(strided, _gen(4)), row.fn(x, _gen(4)))
    else:
        assert row.fn(strided, None).shape == row.fn(x, None).shape


def col_zero_size(row: Row) -> None:
    x = torch.randn(0, *row.shape[1:])
    out = row.fn(x, None)
    assert out.shape[0] == 0


def col_module_state(row: Row) -> None:
    if row.module is None:
        raise NotApplicable("not a module")
    m = row.module()
    copy.deepcopy(m)
    pickle.loads(pickle.dumps(m))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = row.module()
    m2.load_state_dict(torch.load(buf, weights_only=True))
    x = _x(row)
    torch.manual_seed(9)
    a = m(x)
    torch.manual_seed(9)
    b = m2(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    _same(a, b)


COLUMNS: dict[str, Callable[[Row], None]] = {
    "eager": col_eager,
    "compile": col_compile,
    "fullgraph": col_fullgraph,
    "dynamic": col_dynamic,
    "export": col_export,
    "vmap different": col_vmap_different,
    "vmap same": col_vmap_same,
    "func.grad": col_grad,
    "jacrev": col_jacrev,
    "jvp": col_jvp,
    "forward AD": col_forward_ad,
    "meta": col_meta,
    "FakeTensor": col_fake,
    "inference_mode": col_inference_mode,
    "no_grad": col_no_grad,
    "autocast bf16": col_autocast_bf16,
    "checkpoint": col_checkpoint,
    "checkpoint generator": col_checkpoint_generator,
    "deterministic": col_deterministic,
    "non-contiguous": col_noncontiguous,
    "zero-size": col_zero_size,
    "module state": col_module_state,
}

# Cells that fail, with what they would need. The test marks them xfail(strict=True): a cell
# that starts passing must be moved out of this table.
# The whole vocab-parallel functions hold collectives in Python between the rank-local operators
# (which pass every cell: row "distributed local step").
_VOCAB_PARALLEL = {
    "fullgraph": "the collectives run with async_op=True and a timed wait (a dead rank raises instead of hanging), "
                 "which dynamo does not trace; would need traceable functional collectives without the per-call "
                 "timeout, and the validation of the gathered table inside an operator",
    "export": "export traces with fake tensors, and gloo collectives need real data; would need functional "
              "collectives in the graph plus the validation of the gathered table inside an operator",
    "meta": "a collective cannot run on meta tensors; would need a meta path that skips the collectives and "
            "returns the shapes (the local operators have one)",
    "FakeTensor": "the validation reads the gathered table on the host, and gloo needs real memory; would need an "
                  "operator with a fake implementation around the whole function, collectives included",
}
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("torch multinomial(softmax)", "vmap same"): "torch's multinomial has no batching rule for randomness='same' "
                                                 "with a batched input (gumbelkit's sample passes this cell)",
    **{(f"distributed.{fn}", col): why
       for fn in ("vocab_parallel_gumbel_max", "vocab_parallel_gumbel_softmax", "vocab_parallel_gumbel_softmax hard")
       for col, why in _VOCAB_PARALLEL.items()},
}


def run_cell(row_name: str, col_name: str) -> str:
    """'pass', 'n/a' or 'FAIL: reason' for one cell (used by the docs table)."""
    try:
        COLUMNS[col_name](ROWS[row_name])
    except NotApplicable:
        return "n/a"
    except Exception as err:
        return f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    return "pass"

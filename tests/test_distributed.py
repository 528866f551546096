"""Vocab-parallel sampling across real processes (gloo on 127.0.0.1), failures, and DDP training.

One launch per world size (2 and 3 processes, torch.multiprocessing spawn, a gloo group on
a free port) runs every multi-process scenario in turn: vocab-parallel sampling equals
single-process sampling; bad input on one rank raises on all; then a rank fails (with 2
ranks it dies, with 3 it stalls) and the others must raise a clear error within the
timeout. The parent collects the reports through a queue with a deadline, so a test fails
instead of hanging. The DDP test launches this file itself under ``torchrun`` (see
``_ddp_main`` at the bottom).
"""

from __future__ import annotations

import itertools
import json
import os
import queue as queue_module
import re
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.multiprocessing as mp

import gumbelkit.distributed as gd
from gumbelkit import _ddp, sampling
from gumbelkit._counter_noise import counter_gumbel
from gumbelkit._kernels import vocab_parallel as vp
from gumbelkit._kernels.gumbel_softmax import gumbel_softmax_from_noise
from gumbelkit.sampling import sample

DEADLINE = 120.0  # seconds a launch may take in all, far above the ~10 it needs on a busy machine
TIMEOUT = 3.0  # the collective timeout of the failure scenarios


class _Sender:
    """What a child calls to report; ``flush`` waits until the report left the process."""

    def __init__(self, rank, queue):
        self.rank, self.queue = rank, queue

    def __call__(self, report):
        self.queue.put((self.rank, "ok", report))

    def flush(self):
        self.queue.close()
        self.queue.join_thread()


def _entry(fn, rank, world, port, queue):
    """Run ``fn(rank, world, port, send)`` in a child; errors are reported too."""
    torch.set_num_threads(1)
    try:
        fn(rank, world, port, _Sender(rank, queue))
    except BaseException as err:
        queue.put((rank, "error", (type(err).__name__, str(err), traceback.format_exc())))


def launch(fn, world: int) -> dict:
    """Start ``fn`` on ``world`` ranks; return ``{rank: report}`` once every rank reported.

    Fails as soon as every process that has not reported is gone, or at the deadline; then
    the processes get a moment to exit and whatever is left (a rank told to stall, or a hung
    one) is killed.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = gd.free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, end = {}, time.monotonic() + DEADLINE
    try:
        while len(results) < world:
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                silent = [p for r, p in enumerate(procs) if r not in results]
                assert time.monotonic() < end, f"no report from ranks {sorted(set(range(world)) - set(results))}"
                assert any(p.is_alive() for p in silent) or not queue.empty(), (
                    f"ranks {sorted(set(range(world)) - set(results))} exited without reporting "
                    f"(exit codes {[p.exitcode for p in silent]})"
                )
                continue
            assert status == "ok", f"rank {rank} failed: {payload[2]}"
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join()
    return results


# ------------------------------------------------------------------- the scenarios of a launch


def _bounds(vocab: int, world: int) -> list[int]:
    """Uneven shards: rank 0 holds three tokens; with 3 ranks rank 1 holds none at all."""
    cuts = torch.linspace(0, vocab, world + 1).round().long().tolist()
    cuts[1] = 3
    if world == 3:
        cuts[2] = 3
    return cuts


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _equality(rank: int, world: int) -> dict:
    """Vocab-parallel results next to single-process ones on the same seeds (True / max error)."""
    report = {}
    gen = torch.Generator().manual_seed(11)
    batch, vocab = 32, 1009
    cuts = _bounds(vocab, world)
    a, b = cuts[rank], cuts[rank + 1]
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    full = torch.randn(batch, vocab, generator=gen) * 3
    full[0, :] = float("-inf")  # a row whose only possible tokens live on the last rank
    full[0, -2:] = 0.0
    full[1, 500:] = float("-inf")  # a row whose last ranks hold no possible token
    full[2] += 1e4  # large logits: without the global shift the scores would round differently
    per_row = torch.rand(batch, generator=gen) * 2
    per_row[::5] = 0.0  # greedy rows
    # 8 x 5003 = 40024 elements: past the fused-kernel size, so "auto" takes the numba path there
    wide = torch.randn(8, 5003, generator=gen) * 2
    wcuts = _bounds(5003, world)
    wa, wb = wcuts[rank], wcuts[rank + 1]

    for backend in ("torch", "numba", "auto"):
        os.environ["GUMBELKIT_BACKEND"] = backend
        cases = [
            ("plain", full, a, b, seeds, {}),
            ("half", full.half(), a, b, seeds, {}),
            ("bf16", full.bfloat16(), a, b, seeds, {}),
            ("float64", full.double(), a, b, seeds, {}),
            ("temperature", full, a, b, seeds, {"temperature": 0.7}),
            ("per_row_temperature", full, a, b, seeds, {"temperature": per_row}),
            ("tiny_temperature", full, a, b, seeds, {"temperature": 1e-40}),
            ("wide", wide, wa, wb, seeds[:8], {"temperature": 0.9}),
        ]
        if backend != "torch":  # the dtypes' arithmetic is covered per backend in-process (below)
            cases = [c for c in cases if c[0] in ("plain", "per_row_temperature", "wide")]
        for name, logits, lo, hi, s0, kwargs in cases:
            for trial in range(2 if name == "plain" else 1):
                s = s0 + trial
                mine = gd.vocab_parallel_gumbel_max(
                    logits[:, lo:hi], seeds=s, vocab_offset=lo, timeout=20, validate=trial != 1, **kwargs
                )
                report[f"max_{backend}_{name}_{trial}"] = torch.equal(mine, sample(logits, seeds=s, **kwargs))
    os.environ["GUMBELKIT_BACKEND"] = "torch"

    # vmap folds its dimension into the batch: three different problems in one call
    stack = torch.stack([full, full.flip(-1), full * 0.5])
    many = torch.stack([seeds, seeds + 1, seeds + 2])
    vm = torch.func.vmap(lambda x, s: gd.vocab_parallel_gumbel_max(x, seeds=s, vocab_offset=a, timeout=20))(
        stack[:, :, a:b], many
    )
    report["vmap"] = all(torch.equal(vm[i], sample(stack[i], seeds=many[i])) for i in range(3))

    # Exact score ties (zero noise, torch path): sample breaks them with a uniform keyed by
    # (seed, token id); the ranks must pick the same token, not the lowest id.
    tied = torch.zeros(batch, vocab)
    tied[:, 700:] = 1.0
    tied[:, 5] = 1.0
    saved = vp.counter_gumbel, sampling.counter_gumbel
    zero = lambda seeds, ids, dtype: torch.zeros(len(seeds), len(ids), dtype=dtype)  # noqa: E731
    vp.counter_gumbel = sampling.counter_gumbel = zero
    try:
        mine = gd.vocab_parallel_gumbel_max(tied[:, a:b], seeds=seeds, vocab_offset=a)
        report["ties_as_sample"] = torch.equal(mine, sample(tied, seeds=seeds))
        report["ties_spread"] = len(set(mine.tolist())) > 10  # uniform among the 310 maxima
    finally:
        vp.counter_gumbel, sampling.counter_gumbel = saved
    greedy = gd.vocab_parallel_gumbel_max(tied[:, a:b], seeds=seeds, vocab_offset=a, temperature=0.0)
    report["greedy_ties_lowest_id"] = greedy.tolist() == [5] * batch

    # Gumbel-Softmax: the shard of the single-process sample on the same (float64) noise, its
    # gradient, double backward and forward-mode derivative, against float64 references.
    noise = counter_gumbel(seeds.unsqueeze(-1), torch.arange(vocab), dtype=torch.float64)
    weights = torch.randn(batch, vocab, generator=gen)
    weights2 = torch.randn(batch, vocab, generator=gen)
    tangent = torch.randn(batch, vocab, generator=gen)
    for tau, hard in ((0.5, False), (2.0, True)):
        x = full.double().requires_grad_()
        ref = gumbel_softmax_from_noise(x, tau, noise.clone(), None, hard, -1)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), x, create_graph=True)
        (gg_ref,) = torch.autograd.grad((g_ref * weights2).sum(), x)
        _, jvp_ref = torch.func.jvp(
            lambda t, tau=tau: gumbel_softmax_from_noise(t, tau, noise.clone(), None, False, -1),
            (full.double(),),
            (tangent.double(),),
        )
        mine_x = full[:, a:b].clone().requires_grad_()
        mine = gd.vocab_parallel_gumbel_softmax(mine_x, tau, hard, seeds=seeds, vocab_offset=a, timeout=20)
        (g,) = torch.autograd.grad((mine * weights[:, a:b]).sum(), mine_x, create_graph=True)
        (gg,) = torch.autograd.grad((g * weights2[:, a:b]).sum(), mine_x)
        with fwAD.dual_level():
            dual = fwAD.make_dual(full[:, a:b].clone(), tangent[:, a:b])
            out = gd.vocab_parallel_gumbel_softmax(dual, tau, hard, seeds=seeds, vocab_offset=a, timeout=20)
            jvp = fwAD.unpack_dual(out).tangent
        report[f"softmax_{tau}_{hard}_err"] = _max_error(mine.double(), ref[:, a:b])
        report[f"softmax_{tau}_{hard}_grad_err"] = _max_error(g.double(), g_ref[:, a:b])
        report[f"softmax_{tau}_{hard}_double_backward_err"] = _max_error(gg.double(), gg_ref[:, a:b])
        report[f"softmax_{tau}_{hard}_jvp_err"] = _max_error(jvp.double(), jvp_ref[:, a:b])
        report[f"softmax_{tau}_{hard}_shape"] = mine.shape == (batch, b - a) and mine.dtype == torch.float32
        if hard:
            winners = gd.vocab_parallel_gumbel_max(full[:, a:b], seeds=seeds, vocab_offset=a)
            expect = torch.nn.functional.one_hot(winners, vocab).float()[:, a:b]
            report["hard_is_winner"] = torch.equal(mine.detach(), expect)
    return report


BAD_CASES = {
    "nan": r"NaN or \+inf on rank\(s\) \[1\]",
    "overlap": "do not tile the vocabulary",
    "seeds": "seeds differ between ranks",
    "empty": r"row\(s\) \[2\] have no possible token",
    "batch": "different batch sizes",
    "temperature": "temperature differs between ranks",
    "bad_temperature": r"temperature must be finite and >= 0, got \[nan\]",
    "inf": r"NaN or \+inf on rank\(s\) \[0\]",
}


def _bad_input(rank: int) -> dict:
    """The ValueError message each bad-input case gives on this rank (None: no error)."""
    messages = {}
    for case in BAD_CASES:
        logits, seeds, offset = torch.randn(4, 10), torch.arange(4), 10 * rank
        temperature = torch.ones(4)
        if case == "nan" and rank == 1:
            logits[2, 3] = float("nan")
        if case == "overlap":
            offset = 5 * rank
        if case == "seeds" and rank == 1:
            seeds = seeds + 1
        if case == "empty":
            logits[2] = float("-inf")
        if case == "batch" and rank == 1:  # without the size check gloo would abort rank 0
            logits, seeds, temperature = logits[:3], seeds[:3], temperature[:3]
        if case == "temperature" and rank == 1:
            temperature[1] = 0.5
        if case == "bad_temperature":
            temperature[3] = float("nan")
        if case == "inf" and rank == 0:
            logits[1, 1] = float("inf")
        try:
            gd.vocab_parallel_gumbel_max(logits, seeds=seeds, vocab_offset=offset, temperature=temperature, timeout=20)
            messages[case] = None
        except ValueError as err:  # raised after the collective: the group stays usable
            messages[case] = str(err)
    return messages


def _scenarios(rank, world, port, send):
    gd.init_gloo(rank, world, port=port, timeout=30)
    report = {"equality": _equality(rank, world), "bad_input": _bad_input(rank)}
    # Failure: with 2 ranks the last one crashes, with 3 it stays alive but never calls again.
    if rank == world - 1:
        send(report)
        if world == 2:
            send.flush()
            os._exit(3)  # no clean shutdown: the OS closes its sockets
        time.sleep(60)  # killed by the parent once the others have reported
    start = time.monotonic()
    try:
        gd.vocab_parallel_gumbel_max(torch.randn(2, 5), seeds=torch.arange(2), vocab_offset=5 * rank, timeout=TIMEOUT)
        report["failure"] = None
    except RuntimeError as err:
        report["failure"] = str(err)
    report["failure_seconds"] = time.monotonic() - start
    send(report)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def reports(request):
    return launch(_scenarios, request.param)


def test_vocab_parallel_equals_single_process(reports):
    assert len(reports) in (2, 3)
    for rank, report in reports.items():
        for key, value in report["equality"].items():
            if key.endswith("_err"):
                assert value < 1e-6, (rank, key, value)
            else:
                assert value is True, (rank, key)


def test_bad_input_on_one_rank_raises_on_every_rank(reports):
    for rank, report in reports.items():
        for case, pattern in BAD_CASES.items():
            message = report["bad_input"][case]
            assert message is not None and re.search(pattern, message), (rank, case, message)


def test_dead_or_stalled_rank_gives_clear_error_quickly(reports):
    survivors = [r for r in reports.values() if "failure" in r]
    assert len(survivors) == len(reports) - 1
    for report in survivors:
        assert report["failure"] is not None, "the collective returned although a rank never joined it"
        assert f"a rank died, or did not call it within {TIMEOUT:g} s" in report["failure"]
        assert report["failure_seconds"] < TIMEOUT + 10  # the timeout, plus slack for a busy machine


def test_rendezvous_timeout_when_a_rank_never_starts():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not form within 2 s"):
        gd.init_gloo(0, 2, port=gd.free_port(), timeout=2)  # rank 1 never comes
    assert time.monotonic() - start < 15
    assert not dist.is_initialized()


def test_argument_errors_without_a_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        gd.vocab_parallel_gumbel_max(torch.randn(2, 3), seeds=torch.arange(2), vocab_offset=0)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor of shape"):
        gd.vocab_parallel_gumbel_max(torch.randn(2, 3), seeds=torch.arange(3), vocab_offset=0)
    with pytest.raises(ValueError, match="vocab_offset must be a non-negative int"):
        gd.vocab_parallel_gumbel_max(torch.randn(2, 3), seeds=torch.arange(2), vocab_offset=-1)
    with pytest.raises(ValueError, match="local_logits must have shape"):
        gd.vocab_parallel_gumbel_max(torch.randn(3), seeds=torch.arange(3), vocab_offset=0)
    with pytest.raises(ValueError, match="rank must lie in"):
        gd.init_gloo(2, 2, port=1)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        gd.init_gloo(0, 1, port=1, timeout=0)


# ---------------------------------------------------------------- the rank-local operators, in one process


def _shards_draw(full, seeds, temperature, cuts, shift=None):
    """The vocab-parallel draw without collectives: the local operator on every shard, then the
    wrapper's rule (largest score, then largest tie value, then lowest id)."""
    batch, vocab = full.shape
    temps = temperature.double() if isinstance(temperature, torch.Tensor) else torch.full((batch,), temperature)
    temps = temps.double()
    parts = []
    for lo, hi in itertools.pairwise(cuts):
        m = full.amax(-1).double() if shift is None else shift(full[:, lo:hi])
        parts.append(vp.vocab_parallel_max_op(full[:, lo:hi].contiguous(), seeds, m, temps, lo, vocab))
    s, u, ids = (torch.stack(t) for t in zip(*parts, strict=True))
    best = s == s.max(0).values
    best &= u == torch.where(best, u, float("-inf")).max(0).values
    return torch.where(best, ids, vp.BIG_ID).amin(0)


def _logits(batch, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, vocab, generator=gen) * 3
    full[0, :-2] = float("-inf")  # the possible tokens of row 0 are on the last shard only
    full[1] += 3e3  # large logits: the shift must be the global maximum for equal floats
    return full.to(dtype), torch.randint(-(2**62), 2**62, (batch,), generator=gen)


@pytest.mark.parametrize("backend", ["torch", "numba", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_local_operator_on_shards_gives_the_token_of_sample(monkeypatch, backend, dtype):
    monkeypatch.setenv("GUMBELKIT_BACKEND", backend)
    per_row = torch.linspace(0, 2, 16)  # row 0 greedy
    for batch, vocab in ((16, 1000), (16, 3001)):  # auto: torch path, then the fused kernels
        full, seeds = _logits(batch, vocab, dtype)
        cuts = [0, 3, 3, vocab // 2, vocab - 1, vocab]  # uneven, an empty shard, a 1-column shard
        for t in (1.0, 0.6, 1e-40, per_row):
            want = sample(full, temperature=t, seeds=seeds)
            assert torch.equal(_shards_draw(full, seeds, t, cuts), want), (batch, vocab, t)

    # the control: shards shifted by their own maxima do not give sample's token
    def local(x):
        return x.amax(-1).double().clamp(min=-1e30) if x.shape[1] else torch.zeros(len(x), dtype=torch.float64)

    assert not torch.equal(_shards_draw(full, seeds, 1.0, cuts, local), sample(full, seeds=seeds))


def test_local_operator_ties_like_sample(monkeypatch):
    monkeypatch.setenv("GUMBELKIT_BACKEND", "torch")
    zero = lambda seeds, ids, dtype: torch.zeros(len(seeds), len(ids), dtype=dtype)  # noqa: E731
    monkeypatch.setattr(vp, "counter_gumbel", zero)
    monkeypatch.setattr(sampling, "counter_gumbel", zero)
    tied = torch.zeros(64, 100)
    tied[:, 60:] = 1.0
    tied[:, 7] = 1.0
    seeds = torch.arange(64)
    got = _shards_draw(tied, seeds, 1.0, [0, 50, 80, 100])
    assert torch.equal(got, sample(tied, seeds=seeds))
    assert len(set(got.tolist())) > 10  # uniform among the 41 maxima, not the lowest id
    assert _shards_draw(tied, seeds, 0.0, [0, 50, 80, 100]).tolist() == [7] * 64  # greedy: lowest id


def _max_args(batch=4, vocab=12, offset=5):
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(3))
    return (logits, torch.arange(batch), logits.amax(-1).double() + 0.5, torch.full((batch,), 0.8), offset, 40)


def _softmax_args():
    logits, seeds, shift, _, offset, _ = _max_args()
    return (logits, seeds, shift, 0.7, offset)


def test_local_operators_pass_opcheck():
    torch.library.opcheck(vp.vocab_parallel_max_op, _max_args())
    torch.library.opcheck(vp.vocab_parallel_softmax_op, _softmax_args())


def test_local_softmax_operator_is_the_scaled_shard():
    logits, seeds, shift, tau, offset = _softmax_args()
    e, best, _, gid, total = vp.vocab_parallel_softmax_op(logits, seeds, shift, tau, offset)
    noise = counter_gumbel(seeds.unsqueeze(-1), torch.arange(offset, offset + logits.shape[1]))
    s = noise + (logits - shift.float().unsqueeze(-1)).double()
    torch.testing.assert_close(best, s.max(-1).values, rtol=0, atol=0)
    assert torch.equal(gid, s.argmax(-1) + offset)
    want = ((s - best.unsqueeze(-1)) / tau).exp()
    torch.testing.assert_close(e, want.float())
    torch.testing.assert_close(total, want.sum(-1))
    score, _, gid_max = vp.vocab_parallel_max_op(logits, seeds, shift, torch.ones(4), offset, 40)
    assert torch.equal(score, best) and torch.equal(gid_max, gid)  # the same scores at T = 1


def test_local_operator_vmap_is_a_loop_over_samples():
    logits, seeds, _, temps, offset, vocab = _max_args()
    stack = torch.stack([logits, logits * 2, logits - 1])
    shifts = stack.amax(-1).double()
    out = torch.func.vmap(vp.vocab_parallel_max_op, in_dims=(0, None, 0, None, None, None))(
        stack, seeds, shifts, temps, offset, vocab
    )
    for i in range(3):
        one = vp.vocab_parallel_max_op(stack[i], seeds, shifts[i], temps, offset, vocab)
        assert all(torch.equal(a[i], b) for a, b in zip(out, one, strict=True))


def test_local_operators_fake_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits, seeds, shift, temps, offset, vocab = _max_args()
        score, tie, gid = vp.vocab_parallel_max_op(logits, seeds, shift, temps, offset, vocab)
        e, *_ = vp.vocab_parallel_softmax_op(logits, seeds, shift, 0.7, offset)
    assert score.shape == tie.shape == gid.shape == (4,) and gid.dtype == torch.int64
    assert score.dtype == tie.dtype == torch.float64 and e.shape == (4, 12) and e.dtype == torch.float32


class _LocalStep(torch.nn.Module):
    def forward(self, logits, seeds, shift, temps):
        return vp.vocab_parallel_max_op(logits, seeds, shift, temps, 5, 40)[2]


@pytest.mark.parametrize(
    ("case", "pattern"),
    [("nan", "contain NaN or \\+inf"), ("shift", "below the row's largest logit"), ("temperature", "temperature")],
)
def test_local_operator_checks_raise_under_compile_and_export(case, pattern):
    logits, seeds, shift, temps, _, _ = _max_args()
    good = (logits.clone(), seeds, shift.clone(), temps.clone())
    if case == "nan":
        logits[1, 2] = float("nan")
    if case == "shift":
        shift[2] = logits[2].max() - 0.25
    if case == "temperature":
        temps[0] = -1.0
    step = _LocalStep()
    with pytest.raises(ValueError, match=pattern):
        step(logits, seeds, shift, temps)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert compiled(*good).shape == (4,)
    with pytest.raises(ValueError, match=pattern):
        compiled(logits, seeds, shift, temps)
    exported = torch.export.export(step, good).module()
    assert torch.equal(exported(*good), step(*good))
    with pytest.raises(ValueError, match=pattern):
        exported(logits, seeds, shift, temps)


def test_a_backend_group_without_init_process_group():
    from datetime import timedelta

    assert not dist.is_initialized()
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
    full, seeds = _logits(4, 50, torch.float32)
    ids = gd.vocab_parallel_gumbel_max(full, seeds=seeds, vocab_offset=0, temperature=0.8, group=group)
    assert torch.equal(ids, sample(full, temperature=0.8, seeds=seeds))
    y = gd.vocab_parallel_gumbel_softmax(full, 0.5, hard=True, seeds=seeds, vocab_offset=0, group=group)
    assert torch.equal(y.argmax(-1), sample(full, seeds=seeds))
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        gd.vocab_parallel_gumbel_max(full, seeds=seeds, vocab_offset=0, temperature=-1.0, group=group)
    with pytest.raises(TypeError, match="temperature must be a float or a floating tensor"):
        gd.vocab_parallel_gumbel_max(full, seeds=seeds, vocab_offset=0, temperature=torch.ones(3), group=group)
    with pytest.raises(ValueError, match="tau must be a positive finite float"):
        gd.vocab_parallel_gumbel_softmax(full, 0.0, seeds=seeds, vocab_offset=0, group=group)
    # vmap: the vmapped dimension is folded into the batch, seeds batched or not
    stack = torch.stack([full, full.flip(-1), full * 0.5])
    many = torch.stack([seeds, seeds + 1, seeds + 2])
    vm = torch.func.vmap(lambda x, s: gd.vocab_parallel_gumbel_max(x, seeds=s, vocab_offset=0, group=group))(
        stack, many
    )
    assert all(torch.equal(vm[i], sample(stack[i], seeds=many[i])) for i in range(3))
    soft = torch.func.vmap(
        lambda x: gd.vocab_parallel_gumbel_softmax(x, 0.5, hard=True, seeds=seeds, vocab_offset=0, group=group)
    )(stack)
    for i in range(3):
        one = gd.vocab_parallel_gumbel_softmax(stack[i], 0.5, hard=True, seeds=seeds, vocab_offset=0, group=group)
        assert torch.equal(soft[i], one)
    assert not dist.is_initialized()


# ---------------------------------------------------------------- DDP training under torchrun


def _ddp_train(info: _ddp.DistInfo) -> dict:
    """20 DDP steps through a Gumbel-Softmax layer; returns plain numbers (no tensor survives)."""
    import gumbelkit as gk

    gen = _ddp.rank_generator(0, info)
    torch.manual_seed(1000 + info.rank)  # different initial weights: DDP must broadcast rank 0's
    model = _ddp.wrap_model(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)), info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(5))
    target = x[:, :4].argmax(-1)
    first_noise = gk.gumbel_noise_like(torch.zeros(4), generator=gen).tolist()
    losses = []
    for step in range(20):
        rows = _ddp.shard_indices(len(x), info, seed=step)[:8]
        y = gk.log_gumbel_softmax(model(x[rows]), tau=0.5, generator=gen)
        loss = torch.nn.functional.nll_loss(y, target[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(_ddp.mean_across_ranks(loss, info))
    return {
        "rank": info.rank,
        "world": info.world_size,
        "in_sync": _ddp.replicas_in_sync(model, info),
        "noise": first_noise,
        "losses": losses,
        "shard": _ddp.shard_indices(10, info, shuffle=False).tolist(),
    }


def _ddp_main() -> None:
    """Run by torchrun: train, write one JSON file per rank, leave the group."""
    torch.set_num_threads(1)
    info = _ddp.init_from_env(timeout=30)
    # The DDP model and its autograd graph hold the group: they die with _ddp_train's frame,
    # before cleanup tears the group down.
    result = _ddp_train(info)
    with open(os.path.join(os.environ["GUMBELKIT_TEST_OUT"], f"rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    _ddp.cleanup(info)


def test_ddp_training_under_torchrun_keeps_replicas_identical(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.abspath(__file__),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", GUMBELKIT_TEST_OUT=str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_rank = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert all(r["world"] == 2 for r in by_rank.values())
    assert all(r["in_sync"] for r in by_rank.values())  # 20 steps later, bit-identical parameters
    assert by_rank[0]["noise"] != by_rank[1]["noise"]  # independent noise per rank
    assert by_rank[0]["losses"] == by_rank[1]["losses"]  # the all-reduced loss agrees
    assert by_rank[0]["shard"] == [0, 2, 4, 6, 8] and by_rank[1]["shard"] == [1, 3, 5, 7, 9]


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = _ddp.init_from_env()
    assert info == _ddp.DistInfo() and info.is_main and not info.distributed
    model = torch.nn.Linear(3, 2)
    assert _ddp.wrap_model(model, info) is model
    assert _ddp.replicas_in_sync(model, info)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        _ddp.init_from_env()
    with pytest.raises(ValueError, match="does not split evenly"):
        _ddp.local_batch(torch.arange(5), _ddp.DistInfo(0, 2))


if __name__ == "__main__":
    _ddp_main()

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
import torch.distributed as dist
import torch.multiprocessing as mp

import gumbelkit.distributed as gd
from gumbelkit import _ddp
from gumbelkit._counter_noise import counter_gumbel
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
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results, end = {}, time.monotonic() + DEADLINE
    try:
        while len(results) < world:
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                silent = [p for r, p in enumerate(procs) if r not in results]
                assert time.monotonic() < end, (
                    f"no report from ranks {sorted(set(range(world)) - set(results))}"
                )
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

    for name, logits, ref_logits, kwargs in (
        ("plain", full, full, {}),
        ("half", full.half(), full.half(), {}),
        ("temperature", full / 0.7, full, {"temperature": 0.7}),
    ):
        for trial in range(3):
            s = seeds + trial
            mine = gd.vocab_parallel_gumbel_max(
                logits[:, a:b], seeds=s, vocab_offset=a, timeout=20, validate=trial != 1
            )
            report[f"max_{name}_{trial}"] = torch.equal(mine, sample(ref_logits, seeds=s, **kwargs))

    # Exact score ties (zero noise): the lowest global id must win, on every layout.
    saved = gd.counter_gumbel
    gd.counter_gumbel = lambda seeds, ids, dtype: torch.zeros(len(seeds), len(ids), dtype=dtype)
    try:
        tied = torch.zeros(batch, vocab)
        tied[:, 700:] = 1.0
        tied[:, 5] = 1.0
        mine = gd.vocab_parallel_gumbel_max(tied[:, a:b], seeds=seeds, vocab_offset=a)
        report["ties_lowest_id"] = mine.tolist() == [5] * batch
    finally:
        gd.counter_gumbel = saved

    # Gumbel-Softmax: the shard of the single-process sample on the same noise, and its gradient.
    noise = counter_gumbel(seeds.unsqueeze(-1), torch.arange(vocab), dtype=torch.float32)
    weights = torch.randn(batch, vocab, generator=gen)
    for tau, hard in ((0.5, False), (2.0, True)):
        x = full.clone().requires_grad_()
        ref = gumbel_softmax_from_noise(x, tau, noise.clone(), None, hard, -1)
        (ref * weights).sum().backward()
        mine_x = full[:, a:b].clone().requires_grad_()
        mine = gd.vocab_parallel_gumbel_softmax(
            mine_x, tau, hard, seeds=seeds, vocab_offset=a, timeout=20
        )
        (mine * weights[:, a:b]).sum().backward()
        report[f"softmax_{tau}_{hard}_err"] = _max_error(mine, ref[:, a:b])
        report[f"softmax_{tau}_{hard}_grad_err"] = _max_error(mine_x.grad, x.grad[:, a:b])
        report[f"softmax_{tau}_{hard}_shape"] = mine.shape == (batch, b - a)
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
}


def _bad_input(rank: int) -> dict:
    """The ValueError message each bad-input case gives on this rank (None: no error)."""
    messages = {}
    for case in BAD_CASES:
        logits, seeds, offset = torch.randn(4, 10), torch.arange(4), 10 * rank
        if case == "nan" and rank == 1:
            logits[2, 3] = float("nan")
        if case == "overlap":
            offset = 5 * rank
        if case == "seeds" and rank == 1:
            seeds = seeds + 1
        if case == "empty":
            logits[2] = float("-inf")
        if case == "batch" and rank == 1:  # without the size check gloo would abort rank 0
            logits, seeds = logits[:3], seeds[:3]
        try:
            gd.vocab_parallel_gumbel_max(logits, seeds=seeds, vocab_offset=offset, timeout=20)
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
        gd.vocab_parallel_gumbel_max(
            torch.randn(2, 5), seeds=torch.arange(2), vocab_offset=5 * rank, timeout=TIMEOUT
        )
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
        assert report["failure"] is not None, (
            "the collective returned although a rank never joined it"
        )
        assert f"a rank died, or did not call it within {TIMEOUT:g} s" in report["failure"]
        assert (
            report["failure_seconds"] < TIMEOUT + 10
        )  # the timeout, plus slack for a busy machine


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


# ---------------------------------------------------------------- DDP training under torchrun


def _ddp_train(info: _ddp.DistInfo) -> dict:
    """20 DDP steps through a Gumbel-Softmax layer; returns plain numbers (no tensor survives)."""
    import gumbelkit as gk

    gen = _ddp.rank_generator(0, info)
    torch.manual_seed(1000 + info.rank)  # different initial weights: DDP must broadcast rank 0's
    model = _ddp.wrap_model(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)), info
    )
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

r"""Gumbel-Max and Gumbel-Softmax over a vocabulary split across processes (torch.distributed).

In tensor-parallel language models each rank holds a shard of the output vocabulary
(Megatron-LM's vocab-parallel embedding, Shoeybi et al. 2019). Sampling needs no gather of
the full logits: with counter-based noise keyed by ``(seed, global token id)``
(:mod:`gumbelkit._counter_noise`) every rank perturbs its own shard,

.. math::
    s_i = \ell_i + g(\mathrm{seed}, i), \qquad i \in [\mathrm{offset}, \mathrm{offset} + V_r),

takes its local maximum, and one collective picks the global winner, ties to the lowest
global id. The noise of token ``i`` is the same whichever rank computes it, so the token is
exactly the one :func:`gumbelkit.sampling.sample` gives on the concatenated logits with the
same seeds (Gumbel-Max is a max, and a max of maxima is the max).

Every collective here has a timeout; a rank that dies or stops calling raises a
``RuntimeError`` that says so on the others instead of hanging them. Bad input found on one
rank (NaN logits, shards that do not tile the vocabulary, different seeds) travels in the
same collective, so every rank raises the same ``ValueError`` together. Different batch
sizes, which make gloo abort the process inside the all-gather, are caught before it by a
tiny all-reduce of the sizes (``validate=True``, the default).
"""

from __future__ import annotations

import socket
from datetime import timedelta
from numbers import Integral, Real

import torch
import torch.distributed as dist

from ._counter_noise import counter_gumbel
from ._validation import check_logits, compute_dtype

__all__ = [
    "free_port",
    "init_gloo",
    "vocab_parallel_gumbel_max",
    "vocab_parallel_gumbel_softmax",
]

DEFAULT_TIMEOUT = 60.0
_NEG_INF = float("-inf")
_BIG = torch.iinfo(torch.int64).max


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for a rendezvous on one machine).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def init_gloo(
    rank: int,
    world_size: int,
    *,
    port: int,
    host: str = "127.0.0.1",
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Join a gloo process group over TCP at ``host:port``, failing after ``timeout`` seconds.

    Every collective of the group then also fails after ``timeout`` seconds instead of
    waiting forever for a rank that died. Rank 0 hosts the rendezvous store.

    Raises:
        RuntimeError: the group did not form in time (a rank was not started or cannot
            reach ``host:port``); the message names the address and the rank.

    Example:
        >>> import torch.distributed as dist
        >>> init_gloo(0, 1, port=free_port(), timeout=10)
        >>> dist.get_world_size(), dist.get_backend()
        (1, 'gloo')
        >>> dist.destroy_process_group()
    """
    for name, value in (("rank", rank), ("world_size", world_size), ("port", port)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    timeout = _check_timeout(timeout)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{host}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
    except (RuntimeError, dist.DistError) as err:
        raise RuntimeError(
            f"rank {rank}: the gloo group of {world_size} ranks at {host}:{port} did not form "
            f"within {timeout:g} s; check that every rank was started with the same address "
            f"and world size ({type(err).__name__}: {err})"
        ) from err


def _run(
    what: str, group: dist.ProcessGroup | None, timeout: float | None, collective, *args
) -> None:
    """Run ``collective(*args)`` and wait; a dead, stuck or absent rank becomes a RuntimeError."""
    try:
        work = collective(*args, group=group, async_op=True)
        work.wait(timedelta(seconds=timeout)) if timeout is not None else work.wait()
    except Exception as err:  # gloo raises RuntimeError or DistError subclasses
        limit = f"within {timeout:g} s" if timeout is not None else "before the group's timeout"
        raise RuntimeError(
            f"{what}: the collective over {dist.get_world_size(group)} ranks failed on rank "
            f"{dist.get_rank(group)}: a rank died, or did not call it {limit} (every rank of the "
            f"group must call it, with the same batch size) ({type(err).__name__}: {err})"
        ) from err


def _check_args(
    local_logits: object,
    seeds: object,
    vocab_offset: object,
    group: object,
    timeout: object,
    validate: object,
) -> tuple[torch.Tensor, torch.Tensor, int, float | None]:
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    logits = check_logits(local_logits, "local_logits")
    if logits.dim() != 2:
        raise ValueError(
            f"local_logits must have shape (batch, local_vocab), got {tuple(logits.shape)}"
        )
    if (
        not isinstance(seeds, torch.Tensor)
        or seeds.dtype != torch.int64
        or seeds.shape != logits.shape[:1]
    ):
        got = (
            f"{seeds.dtype} {tuple(seeds.shape)}"
            if isinstance(seeds, torch.Tensor)
            else type(seeds).__name__
        )
        raise TypeError(
            f"seeds must be an int64 tensor of shape ({logits.shape[0]},), the same on every "
            f"rank, got {got}"
        )
    if seeds.device != logits.device:
        raise ValueError(f"seeds are on {seeds.device} but local_logits on {logits.device}")
    if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, Integral) or vocab_offset < 0:
        raise ValueError(
            f"vocab_offset must be a non-negative int (the global id of local column 0), "
            f"got {vocab_offset!r}"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized; call gumbelkit.distributed.init_gloo "
            "(or torch.distributed.init_process_group) on every rank first"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    return logits, seeds, int(vocab_offset), None if timeout is None else _check_timeout(timeout)


def _scores(logits: torch.Tensor, seeds: torch.Tensor, offset: int) -> torch.Tensor:
    """``logits + g(seed, global id)`` in the compute dtype, as ``sample`` computes them."""
    ids = torch.arange(offset, offset + logits.shape[1], device=logits.device)
    noise = counter_gumbel(seeds.unsqueeze(-1), ids, dtype=compute_dtype(logits.dtype))
    return noise.add_(logits)


def _check_batch(
    batch: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    timeout: float | None,
    what: str,
) -> None:
    """Compare the batch sizes of all ranks (a mismatched all-gather would crash gloo)."""
    sizes = torch.tensor([batch, -batch], device=device)  # on the device nccl needs
    _run(what, group, timeout, dist.all_reduce, sizes, dist.ReduceOp.MAX)
    if int(sizes[0]) != -int(sizes[1]):
        raise ValueError(
            f"{what}: the ranks pass different batch sizes (from {-int(sizes[1])} to "
            f"{int(sizes[0])} rows); every rank must pass the same rows"
        )


def _global_winner(
    x: torch.Tensor,
    logits: torch.Tensor,
    seeds: torch.Tensor,
    offset: int,
    group: dist.ProcessGroup | None,
    timeout: float | None,
    validate: bool,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-gather of each rank's (best score, its global id, bad-row flag, seed) and its shard.

    Returns the global winner ids ``(B,)`` and the global best scores ``(B,)`` (float64),
    after checking, identically on every rank, that the shards tile ``[0, V)``, the seeds
    agree and every row has a finite best score.
    """
    batch, local = x.shape
    if validate:
        _check_batch(batch, x.device, group, timeout, what)
    if local:
        col = x.argmax(-1, keepdim=True)  # the first maximum: the lowest local id
        best = x.gather(-1, col).squeeze(-1).double()
        gid = col.squeeze(-1) + offset
    else:
        best = torch.full((batch,), _NEG_INF, dtype=torch.float64, device=x.device)
        gid = torch.full((batch,), _BIG, dtype=torch.int64, device=x.device)
    bad = torch.zeros(batch, dtype=torch.int64, device=x.device)
    if not bool(torch.isfinite(best).all()):
        bad = (torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)).long()
    mine = torch.stack([best.view(torch.int64), gid, bad, seeds], -1)
    mine = torch.cat([mine, torch.tensor([[offset, local, batch, 0]], device=x.device)])
    world = dist.get_world_size(group)
    parts = [torch.empty_like(mine) for _ in range(world)]
    _run(what, group, timeout, dist.all_gather, parts, mine.contiguous())
    table = torch.stack(parts)  # (world, batch + 1, 4)

    head = table[:, -1]
    shards = head[head[:, 1] > 0]  # ranks holding no column may pass any offset
    shards = shards[shards[:, 0].argsort()]
    starts, ends = shards[:, 0], shards[:, 0] + shards[:, 1]
    if not len(shards) or int(starts[0]) != 0 or not bool((starts[1:] == ends[:-1]).all()):
        shards = ", ".join(
            f"rank {r}: [{int(a)}, {int(a + n)})" for r, (a, n, _, _) in enumerate(head.tolist())
        )
        raise ValueError(
            f"{what}: the shards do not tile the vocabulary from 0 without gaps or "
            f"overlaps ({shards}); set vocab_offset to the global id of each rank's first column"
        )
    rows = table[:, :-1]
    if not bool((rows[:, :, 3] == rows[:1, :, 3]).all()):
        raise ValueError(f"{what}: seeds differ between ranks; every rank must pass the same seeds")
    flagged = rows[:, :, 2].any(-1).nonzero().flatten().tolist()
    if flagged:
        raise ValueError(f"{what}: local_logits contain NaN or +inf on rank(s) {flagged}")
    values = rows[:, :, 0].contiguous().view(torch.float64)
    top = values.max(0).values
    if not bool(torch.isfinite(top).all()):
        empty = (~torch.isfinite(top)).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"{what}: row(s) {empty} have no possible token on any rank (all logits -inf)"
        )
    winner = torch.where(values == top, rows[:, :, 1], _BIG).amin(0)
    return winner, top


def vocab_parallel_gumbel_max(
    local_logits: torch.Tensor,
    *,
    seeds: torch.Tensor,
    vocab_offset: int,
    group: dist.ProcessGroup | None = None,
    timeout: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""Sample a token per row from logits whose vocabulary is split across the ranks of ``group``.

    .. math::
        i^* = \arg\max_i\, \ell_i + g(\mathrm{seed}, i) \;\sim\; \operatorname{softmax}(\ell)

    (Gumbel 1954; Maddison et al. 2014). Rank ``r`` holds columns
    ``[vocab_offset, vocab_offset + V_r)`` of the ``(B, V)`` logits; the noise of global token
    ``i`` is ``counter_gumbel(seed, i)``. Each rank reduces its shard to its best
    ``(score, id)``; one ``all_gather`` of those pairs (with the shard extents, seeds and a
    bad-input flag, so every rank validates alike) picks the global winner, ties to the lowest
    id. The result equals ``gumbelkit.sampling.sample(full_logits, seeds=seeds)`` token for
    token. For a temperature ``T``, pass ``local_logits / T`` (as ``sample`` divides).

    Args:
        local_logits: ``(B, V_r)`` this rank's columns (``V_r`` may be 0).
        seeds: ``(B,)`` int64, identical on every rank.
        vocab_offset: global id of this rank's first column; the shards must tile ``[0, V)``.
        group: the process group (default: the world).
        timeout: seconds to wait for each collective (default: the group's timeout).
        validate: first compare the ranks' batch sizes with a tiny all-reduce, so that a
            mismatch raises ``ValueError`` on every rank (gloo aborts the process on a
            mismatched all-gather); ``False`` saves that round trip when the sizes are known
            to agree. Shards, seeds and logits are validated either way.

    Returns:
        ``(B,)`` int64 global token ids, the same on every rank.

    Example:
        >>> import torch.distributed as dist
        >>> from gumbelkit.sampling import sample
        >>> init_gloo(0, 1, port=free_port(), timeout=10)
        >>> logits, seeds = torch.randn(4, 50), torch.arange(4)
        >>> ids = vocab_parallel_gumbel_max(logits, seeds=seeds, vocab_offset=0)
        >>> torch.equal(ids, sample(logits, seeds=seeds))
        True
        >>> dist.destroy_process_group()
    """
    what = "vocab_parallel_gumbel_max"
    logits, seeds, offset, timeout = _check_args(
        local_logits, seeds, vocab_offset, group, timeout, validate
    )
    with torch.no_grad():
        x = _scores(logits, seeds, offset)
        return _global_winner(x, logits, seeds, offset, group, timeout, validate, what)[0]


class _VocabParallelGumbelSoftmax(torch.autograd.Function):
    """Forward: the local shard of ``softmax((l + g) / tau)`` with a global normalizer.

    Returns ``y``, or ``(one_hot, y)`` when hard (as the core kernel does, so the saved tensor
    is an output). Backward, closed form: ``(1/tau) * y * (G - <G, y>)`` with ``G`` the sum of
    the outputs' gradients (straight-through when hard); the inner product over the whole
    vocabulary takes one all-reduce.
    """

    @staticmethod
    def forward(ctx, logits, seeds, offset, tau, hard, group, timeout, validate):
        what = "vocab_parallel_gumbel_softmax"
        x = _scores(logits, seeds, offset)
        winner, top = _global_winner(x, logits, seeds, offset, group, timeout, validate, what)
        # Shift by the global maximum score, then scale: the core kernel's order of operations.
        x = x.sub_(top.to(x.dtype).unsqueeze(-1)).div_(tau).exp_()
        total = x.double().sum(-1)
        _run(what, group, timeout, dist.all_reduce, total)
        y = x.div_(total.to(x.dtype).unsqueeze(-1)).to(logits.dtype)
        ctx.tau, ctx.group, ctx.timeout = tau, group, timeout
        ctx.save_for_backward(y)
        if not hard:
            return y
        local = winner - offset
        rows = ((local >= 0) & (local < y.shape[1])).nonzero().flatten()
        one_hot = torch.zeros_like(y)
        one_hot[rows, local[rows]] = 1.0
        return one_hot, y

    @staticmethod
    def backward(ctx, *grads):
        (y,) = ctx.saved_tensors
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        gc = sum(g.to(cdtype) for g in grads)
        inner = (gc * yc).double().sum(-1)
        _run(
            "vocab_parallel_gumbel_softmax backward", ctx.group, ctx.timeout, dist.all_reduce, inner
        )
        w = yc * (gc - inner.to(cdtype).unsqueeze(-1)) / ctx.tau
        return w.to(y.dtype), None, None, None, None, None, None, None


def vocab_parallel_gumbel_softmax(
    local_logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    *,
    seeds: torch.Tensor,
    vocab_offset: int,
    group: dist.ProcessGroup | None = None,
    timeout: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""This rank's shard of a Gumbel-Softmax sample over a vocabulary split across ranks.

    .. math::
        y_i = \frac{\exp((\ell_i + g_i - m)/\tau)}{\sum_{j=1}^{V} \exp((\ell_j + g_j - m)/\tau)},
        \qquad g_i = g(\mathrm{seed}, i),\; m = \max_j\, \ell_j + g_j

    (Jang et al. 2017; Maddison et al. 2017) with the counter-based noise of
    :func:`vocab_parallel_gumbel_max`. The global maximum comes from the same all-gather as
    the winner, the normalizer from a second collective (an all-reduce of the local sums);
    ``timeout`` and ``validate`` are as there.
    With ``hard=True`` the forward value is the one-hot of the global winner (the token of
    :func:`vocab_parallel_gumbel_max`) and the gradient is that of ``y`` (straight-through).
    Differentiable in ``local_logits``: the backward pass is ``(1/tau) y (G - <G, y>)`` and
    needs one all-reduce, so every rank must call backward.

    Returns:
        ``(B, V_r)``: columns ``[vocab_offset, vocab_offset + V_r)`` of the sample; concatenated
        over the ranks they equal the single-process Gumbel-Softmax with the same noise.

    Example:
        >>> import torch.distributed as dist
        >>> init_gloo(0, 1, port=free_port(), timeout=10)
        >>> y = vocab_parallel_gumbel_softmax(torch.randn(2, 5), 0.5, seeds=torch.tensor([3, 4]),
        ...                                   vocab_offset=0)
        >>> torch.allclose(y.sum(-1), torch.ones(2))
        True
        >>> dist.destroy_process_group()
    """
    logits, seeds, offset, timeout = _check_args(
        local_logits, seeds, vocab_offset, group, timeout, validate
    )
    if isinstance(tau, bool) or not isinstance(tau, Real) or not 0 < tau < float("inf"):
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    out = _VocabParallelGumbelSoftmax.apply(
        logits, seeds, offset, float(tau), hard, group, timeout, validate
    )
    return out[0] if hard else out

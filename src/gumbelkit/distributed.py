r"""Gumbel-Max and Gumbel-Softmax over a vocabulary split across processes (torch.distributed).

In tensor-parallel language models each rank holds a shard of the output vocabulary
(Megatron-LM's vocab-parallel embedding, Shoeybi et al. 2019). Sampling needs no gather of
the full logits: with counter-based noise keyed by ``(seed, global token id)``
(:mod:`gumbelkit._counter_noise`) every rank perturbs its own shard,

.. math::
    s_i = (\ell_i - m) / T + g(\mathrm{seed}, i), \qquad i \in [\mathrm{offset}, \mathrm{offset} + V_r),
    \qquad m = \max_{j < V} \ell_j,

takes its local best, and one collective picks the global winner (a max of maxima is the max).

Exactness. :func:`vocab_parallel_gumbel_max` returns exactly the token of
``gumbelkit.sample(full_logits, temperature=T, seeds=seeds)`` on the concatenated logits, on
every backend (``GUMBELKIT_BACKEND`` ``torch``, ``numba`` and ``auto``, the same on every rank):
each rank computes the very floats ``sample`` compares. That takes the GLOBAL row maximum
``m`` (one all-gather of ``B`` values before the scores, which also carries the validation),
``sample``'s arithmetic (``(l - m) / T`` in the compute dtype plus float64 counter noise on
its torch path, or the fused kernel's float32 transform of the same SplitMix64 stream where
``sample`` would use it: same backend rule, decided on the whole ``(B', V)`` rows) and its tie
rule (torch path: a uniform keyed by ``(seed, token id)``; fused: the lowest id). Tested on CPU
tensors over gloo with 1, 2 and 3 ranks (uneven and empty shards) for float32, float16, bfloat16
and float64 logits and scalar, per-row, greedy and tiny temperatures. Not covered:
top-k/top-p/min-p (not offered here) and ``return_logprobs``. The rank-local steps are the
registered operators of :mod:`gumbelkit._kernels.vocab_parallel`.

Collectives stay outside the operators, in this module's Python. So the local steps compile
(also ``fullgraph``), export, ``vmap`` and run on meta and fake tensors, their checks raising
the same ``ValueError`` (``torch.ops.gumbelkit.vocab_parallel_max_local`` in the composability
matrix; both operators pass ``opcheck``); the whole functions run in eager mode, under
``no_grad``, ``inference_mode``, autocast, checkpointing and a default or ``dynamic``
``torch.compile`` (which runs the collectives eagerly between graphs) and ``torch.func.vmap`` (a vmap rule folds the
vmapped dimension into the batch: every rank must vmap alike), the softmax also under
``torch.func.grad``/``jacrev``/``jvp`` and forward AD, but not under ``fullgraph``, export,
meta or fake tensors (docs/compose.md says what each would need).

Every collective here has a timeout; a rank that dies or stops calling raises a
``RuntimeError`` that says so on the others instead of hanging them. Bad input found on one
rank (NaN logits, shards that do not tile the vocabulary, different seeds or temperatures)
travels in the same collective, so every rank raises the same ``ValueError`` together.
Different batch sizes, which make gloo abort the process inside the all-gather, are caught
before it by a tiny all-reduce of the sizes (``validate=True``, the default).
"""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from numbers import Integral, Real

import torch
import torch.distributed as dist

from ._kernels.vocab_parallel import BIG_ID, vocab_parallel_max_op, vocab_parallel_softmax_op
from ._validation import check_logits, compute_dtype

__all__ = [
    "free_port",
    "init_gloo",
    "vocab_parallel_gumbel_max",
    "vocab_parallel_gumbel_softmax",
]

DEFAULT_TIMEOUT = 60.0
# A group: a ProcessGroup, or a backend object such as ``dist.ProcessGroupGloo(store, rank, size)``,
# which the collectives accept without ``init_process_group``.
_GROUP_TYPES = (dist.ProcessGroup, torch._C._distributed_c10d.Backend) if dist.is_available() else ()
_NEG_INF = float("-inf")


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


def _size(group: dist.ProcessGroup | None) -> int:
    return group.size() if group is not None else dist.get_world_size()


def _rank(group: dist.ProcessGroup | None) -> int:
    return group.rank() if group is not None else dist.get_rank()


def _run(what: str, group: dist.ProcessGroup | None, timeout: float | None, collective, *args) -> None:
    """Run ``collective(*args)`` and wait; a dead, stuck or absent rank becomes a RuntimeError."""
    try:
        work = collective(*args, group=group, async_op=True)
        work.wait(timedelta(seconds=timeout)) if timeout is not None else work.wait()
    except Exception as err:  # gloo raises RuntimeError or DistError subclasses
        limit = f"within {timeout:g} s" if timeout is not None else "before the group's timeout"
        raise RuntimeError(
            f"{what}: the collective over {_size(group)} ranks failed on rank "
            f"{_rank(group)}: a rank died, or did not call it {limit} (every rank of the "
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
        raise ValueError(f"local_logits must have shape (batch, local_vocab), got {tuple(logits.shape)}")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != logits.shape[:1]:
        got = f"{seeds.dtype} {tuple(seeds.shape)}" if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise TypeError(
            f"seeds must be an int64 tensor of shape ({logits.shape[0]},), the same on every rank, got {got}"
        )
    if seeds.device != logits.device:
        raise ValueError(f"seeds are on {seeds.device} but local_logits on {logits.device}")
    if isinstance(vocab_offset, bool) or not isinstance(vocab_offset, Integral) or vocab_offset < 0:
        raise ValueError(
            f"vocab_offset must be a non-negative int (the global id of local column 0), got {vocab_offset!r}"
        )
    if group is not None and not isinstance(group, _GROUP_TYPES):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if group is None and (not dist.is_available() or not dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized; call gumbelkit.distributed.init_gloo "
            "(or torch.distributed.init_process_group) on every rank first, or pass group="
        )
    timeout = None if timeout is None else _check_timeout(timeout)
    return logits, seeds.contiguous(), int(vocab_offset), timeout


def _check_temperature(temperature: object, batch: int, device: torch.device) -> torch.Tensor:
    """``temperature`` as a ``(B,)`` float64 tensor (its values are checked with the others')."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point() or temperature.shape not in ((), (batch,)):
            raise TypeError(
                f"temperature must be a float or a floating tensor of shape ({batch},), got "
                f"{temperature.dtype} {tuple(temperature.shape)}"
            )
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but local_logits on {device}")
        return temperature.detach().double().expand(batch).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    return torch.full((batch,), float(temperature), dtype=torch.float64, device=device)


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


def _all_gather(mine: torch.Tensor, group: dist.ProcessGroup | None, timeout: float | None, what: str) -> torch.Tensor:
    """Every rank's ``mine`` stacked in rank order: ``(world, *mine.shape)``."""
    parts = [torch.empty_like(mine) for _ in range(_size(group))]
    _run(what, group, timeout, dist.all_gather, parts, mine.contiguous())
    return torch.stack(parts)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.double().contiguous().view(torch.int64)


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.float64)


def _global_stats(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    temps: torch.Tensor,
    offset: int,
    group: dist.ProcessGroup | None,
    timeout: float | None,
    what: str,
    tname: str,
) -> tuple[torch.Tensor, int]:
    """One all-gather of each rank's row maxima, seeds, temperatures and shard extent.

    Returns the global row maxima ``(B,)`` float64 and the vocabulary size, after checking,
    identically on every rank, that the shards tile ``[0, V)``, the seeds and temperatures
    agree and are valid, and every row has a finite maximum and no NaN or ``+inf``.
    """
    batch, local = logits.shape
    if local:
        rowmax = logits.amax(-1).double()
    else:
        rowmax = torch.full((batch,), _NEG_INF, dtype=torch.float64, device=logits.device)
    mine = torch.stack([_bits(rowmax), seeds, _bits(temps)], -1)
    head = torch.tensor([[offset, local, batch]], device=logits.device)
    table = _all_gather(torch.cat([mine, head]), group, timeout, what)  # (world, B + 1, 3)

    head = table[:, -1]
    shards = head[head[:, 1] > 0]  # ranks holding no column may pass any offset
    shards = shards[shards[:, 0].argsort()]
    starts, ends = shards[:, 0], shards[:, 0] + shards[:, 1]
    if not len(shards) or int(starts[0]) != 0 or not bool((starts[1:] == ends[:-1]).all()):
        shards = ", ".join(f"rank {r}: [{int(a)}, {int(a + n)})" for r, (a, n, _) in enumerate(head.tolist()))
        raise ValueError(
            f"{what}: the shards do not tile the vocabulary from 0 without gaps or "
            f"overlaps ({shards}); set vocab_offset to the global id of each rank's first column"
        )
    rows = table[:, :-1]
    if not bool((rows[:, :, 1] == rows[:1, :, 1]).all()):
        raise ValueError(f"{what}: seeds differ between ranks; every rank must pass the same seeds")
    if not bool((rows[:, :, 2] == rows[:1, :, 2]).all()):
        raise ValueError(f"{what}: {tname} differs between ranks; every rank must pass the same")
    t = _floats(rows[0, :, 2])
    bad_t = ~(torch.isfinite(t) & (t >= 0))
    if bool(bad_t.any()):
        raise ValueError(f"{what}: {tname} must be finite and >= 0, got {t[bad_t][:4].tolist()}")
    maxima = _floats(rows[:, :, 0])  # (world, B)
    flagged = (torch.isnan(maxima) | torch.isposinf(maxima)).any(-1).nonzero().flatten().tolist()
    if flagged:
        raise ValueError(f"{what}: local_logits contain NaN or +inf on rank(s) {flagged}")
    top = maxima.max(0).values
    if not bool(torch.isfinite(top).all()):
        empty = (~torch.isfinite(top)).nonzero().flatten()[:8].tolist()
        raise ValueError(f"{what}: row(s) {empty} have no possible token on any rank (all logits -inf)")
    return top, int(head[:, 1].sum())


def _global_winner(
    score: torch.Tensor,
    tie: torch.Tensor,
    gid: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    group: dist.ProcessGroup | None,
    timeout: float | None,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-gather of each rank's best ``(score, tie, id, *extra)``: the global winner ``(B,)``
    (the lexicographic maximum of ``(score, tie, -id)``) and the gathered ``(world, B, k)`` table.
    """
    mine = torch.stack([_bits(score), _bits(tie), gid, *extra], -1)
    table = _all_gather(mine, group, timeout, what)
    s, u, ids = _floats(table[..., 0]), _floats(table[..., 1]), table[..., 2]
    best = s == s.max(0).values
    best &= u == torch.where(best, u, _NEG_INF).max(0).values
    return torch.where(best, ids, BIG_ID).amin(0), table


def vocab_parallel_gumbel_max(
    local_logits: torch.Tensor,
    *,
    seeds: torch.Tensor,
    vocab_offset: int,
    temperature: float | torch.Tensor = 1.0,
    group: dist.ProcessGroup | None = None,
    timeout: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""Sample a token per row from logits whose vocabulary is split across the ranks of ``group``.

    .. math::
        i^* = \arg\max_i\, (\ell_i - m) / T + g(\mathrm{seed}, i) \;\sim\;
        \operatorname{softmax}(\ell / T), \qquad m = \max_j \ell_j

    (Gumbel 1954; Maddison et al. 2014). Rank ``r`` holds columns
    ``[vocab_offset, vocab_offset + V_r)`` of the ``(B, V)`` logits. Three collectives: a tiny
    all-reduce of the batch sizes (``validate``), an all-gather of the row maxima (with seeds,
    temperatures and shard extents, so every rank validates alike), then, after the rank-local
    operator ``torch.ops.gumbelkit.vocab_parallel_max_local``, an all-gather of each rank's
    best ``(score, tie, id)``.

    Exactly ``gumbelkit.sample(full_logits, temperature=temperature, seeds=seeds)`` token for
    token (no top-k/top-p/min-p), with every ``GUMBELKIT_BACKEND`` as long as all ranks use the
    same one: see the module docstring. ``T = 0`` rows are greedy (the lowest id among the
    maxima), as in ``sample``.

    Args:
        local_logits: ``(B, V_r)`` this rank's columns (``V_r`` may be 0); float16, bfloat16,
            float32 or float64. Not differentiated.
        seeds: ``(B,)`` int64, identical on every rank.
        vocab_offset: global id of this rank's first column; the shards must tile ``[0, V)``.
        temperature: ``>= 0`` and finite; a float or a ``(B,)`` floating tensor, identical on
            every rank.
        group: the process group (default: the world). A backend object such as
            ``dist.ProcessGroupGloo(store, rank, size, timeout)`` works without
            ``init_process_group``.
        timeout: seconds to wait for each collective (default: the group's timeout).
        validate: first compare the ranks' batch sizes with a tiny all-reduce, so that a
            mismatch raises ``ValueError`` on every rank (gloo aborts the process on a
            mismatched all-gather); ``False`` saves that round trip when the sizes are known
            to agree. Shards, seeds, temperatures and logits are validated either way.

    Returns:
        ``(B,)`` int64 global token ids, the same on every rank.

    Raises:
        TypeError / ValueError: bad arguments, before any collective; ``ValueError`` on every
            rank together for NaN or ``+inf`` logits, a row that is ``-inf`` on every rank,
            shards that do not tile the vocabulary, seeds or temperatures that differ between
            ranks, different batch sizes.
        RuntimeError: torch.distributed not initialized (and no ``group``), or a collective
            failed or timed out (a rank died or stopped calling).

    Example:
        >>> import torch.distributed as dist
        >>> from gumbelkit.sampling import sample
        >>> init_gloo(0, 1, port=free_port(), timeout=10)
        >>> logits, seeds = torch.randn(4, 50), torch.arange(4)
        >>> ids = vocab_parallel_gumbel_max(logits, seeds=seeds, vocab_offset=0, temperature=0.7)
        >>> torch.equal(ids, sample(logits, temperature=0.7, seeds=seeds))
        True
        >>> dist.destroy_process_group()
    """
    logits, seeds, offset, timeout = _check_args(local_logits, seeds, vocab_offset, group, timeout, validate)
    temps = _check_temperature(temperature, logits.shape[0], logits.device)
    with torch.no_grad():
        return _VocabParallelMax.apply(logits.detach(), seeds, temps, offset, group, timeout, validate)


def _fold(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """``t`` with the vmapped dimension ``dim`` (None: unbatched, repeated ``n`` times) folded into
    its first (batch) dimension: ``(n * B, ...)``."""
    t = t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


class _VocabParallelMax(torch.autograd.Function):
    """The whole of :func:`vocab_parallel_gumbel_max` after the argument checks, as one call, so
    that ``vmap`` folds its dimension into the batch (every rank must vmap alike; the batch-size
    check catches ranks that do not). Not differentiable."""

    @staticmethod
    def forward(logits, seeds, temps, offset, group, timeout, validate):
        what = "vocab_parallel_gumbel_max"
        if validate:
            _check_batch(logits.shape[0], logits.device, group, timeout, what)
        shift, vocab = _global_stats(logits, seeds, temps, offset, group, timeout, what, "temperature")
        score, tie, gid = vocab_parallel_max_op(logits, seeds, shift, temps, offset, vocab)
        return _global_winner(score, tie, gid, (), group, timeout, what)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):
        return (None,) * 7

    @staticmethod
    def vmap(info, in_dims, logits, seeds, temps, offset, group, timeout, validate):
        n = info.batch_size
        args = [_fold(t, d, n) for t, d in zip((logits, seeds, temps), in_dims[:3], strict=True)]
        out = _VocabParallelMax.apply(*args, offset, group, timeout, validate)
        return out.view(n, out.shape[0] // n), 0


def _softmax_forward(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    offset: int,
    tau: float,
    group: dist.ProcessGroup | None,
    timeout: float | None,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, winner)``: this rank's shard of the sample and the global winner ids ``(B,)``."""
    what = "vocab_parallel_gumbel_softmax"
    batch = logits.shape[0]
    if validate:
        _check_batch(batch, logits.device, group, timeout, what)
    taus = torch.full((batch,), tau, dtype=torch.float64, device=logits.device)
    shift, _ = _global_stats(logits, seeds, taus, offset, group, timeout, what, "tau")
    e, best, tie, gid, total = vocab_parallel_softmax_op(logits, seeds, shift, tau, offset)
    winner, table = _global_winner(best, tie, gid, (_bits(total),), group, timeout, what)
    bests, totals = _floats(table[..., 0]), _floats(table[..., 3])  # (world, B)
    top = bests.max(0).values
    # exp((t_r - t*) / tau): each rank's unnormalized shard in the global scale
    scale = torch.where(bests > _NEG_INF, ((bests - top) / tau).exp(), 0.0)
    factor = scale[_rank(group)] / (totals * scale).sum(0)
    return (e * factor.to(e.dtype).unsqueeze(-1)).to(logits.dtype), winner


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum) with the module's timeout. It is linear and its own
    adjoint: backward and jvp all-reduce the gradient or tangent; vmap all-reduces the batch."""

    @staticmethod
    def forward(x, group, timeout, what):
        out = x.clone()
        _run(what, group, timeout, dist.all_reduce, out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.group, ctx.timeout, ctx.what = inputs

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group, ctx.timeout, ctx.what), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _AllReduceSum.apply(tangent.contiguous(), ctx.group, ctx.timeout, ctx.what)

    @staticmethod
    def vmap(info, in_dims, x, group, timeout, what):
        if in_dims[0] is None:
            return _AllReduceSum.apply(x, group, timeout, what), None
        return _AllReduceSum.apply(x.movedim(in_dims[0], 0).contiguous(), group, timeout, what), 0


class VocabParallelGumbelSoftmax(torch.autograd.Function):
    """Forward: the local shard of ``softmax((l + g) / tau)`` with a global normalizer.

    ``apply(logits, seeds, offset, tau, hard, group, timeout, validate)`` returns ``y``, or
    ``(one_hot, y)`` when hard (so the saved tensor is an output). Closed forms with ``G`` the
    sum of the outputs' gradients (straight-through when hard), inner products over the whole
    vocabulary by an all-reduce:

        backward:  dL/dl = (1/tau) * y * (G - <G, y>)
        jvp:       dy    = (1/tau) * y * (dl - <dl, y>)

    The backward is plain torch ops plus a differentiable all-reduce (:class:`_AllReduceSum`),
    so double backward works (every rank must run it). The vmap rule folds the vmapped
    dimension into the batch and calls the collectives once (every rank must vmap alike).
    """

    @staticmethod
    def forward(logits, seeds, offset, tau, hard, group, timeout, validate):
        y, winner = _softmax_forward(logits.detach(), seeds, offset, tau, group, timeout, validate)
        if not hard:
            return y
        local = winner - offset
        rows = ((local >= 0) & (local < y.shape[1])).nonzero().flatten()
        one_hot = torch.zeros_like(y)
        one_hot[rows, local[rows]] = 1.0
        return one_hot, y

    @staticmethod
    def vmap(info, in_dims, logits, seeds, offset, tau, hard, group, timeout, validate):
        # fold the vmapped dimension into the batch (every rank must vmap alike)
        n = info.batch_size
        x, s = _fold(logits, in_dims[0], n), _fold(seeds, in_dims[1], n)
        out = VocabParallelGumbelSoftmax.apply(x, s, offset, tau, hard, group, timeout, validate)
        shape = (n, x.shape[0] // n, x.shape[1])
        if hard:
            return tuple(o.view(shape) for o in out), (0, 0)
        return out.view(shape), 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, _, tau, hard, group, timeout, _ = inputs
        y = output[1] if hard else output
        ctx.tau, ctx.hard, ctx.group, ctx.timeout = tau, hard, group, timeout
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        if hard:
            ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        (y,) = ctx.saved_tensors
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        present = [g.to(cdtype) for g in grads if g is not None]
        # every rank must join the all-reduce, with or without a gradient of its own
        gc = sum(present[1:], present[0]) if present else torch.zeros_like(yc)
        inner = _AllReduceSum.apply(
            (gc * yc).sum(-1, dtype=torch.float64),
            ctx.group,
            ctx.timeout,
            "vocab_parallel_gumbel_softmax backward",
        )
        w = yc * (gc - inner.to(cdtype).unsqueeze(-1)) / ctx.tau
        return w.to(y.dtype), None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dlogits, *_):
        (y,) = ctx.saved_tensors
        cdtype = compute_dtype(y.dtype)
        yc = y.to(cdtype)
        dz = dlogits.to(cdtype) / ctx.tau
        inner = _AllReduceSum.apply(
            (dz * yc).sum(-1, dtype=torch.float64), ctx.group, ctx.timeout, "vocab_parallel_gumbel_softmax jvp"
        )
        dy = (yc * (dz - inner.to(cdtype).unsqueeze(-1))).to(y.dtype)
        return (dy, dy) if ctx.hard else dy


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
        y_i = \frac{\exp((s_i - s^*)/\tau)}{\sum_{j=1}^{V} \exp((s_j - s^*)/\tau)},
        \qquad s_i = (\ell_i - m) + g(\mathrm{seed}, i),\; s^* = \max_j s_j,\;
        m = \max_j \ell_j

    (Jang et al. 2017; Maddison et al. 2017) with the float64 counter-based noise of
    :func:`vocab_parallel_gumbel_max` (its torch-path scores at ``T = 1``). Collectives: the
    batch-size check (``validate``), the all-gather of the row maxima, then one all-gather of
    each rank's best score, tie-break value, id and local sum
    ``sum_i exp((s_i - t_r)/tau)`` (``t_r`` the rank's best score): the normalizer is
    ``sum_r exp((t_r - s^*)/tau) * sum_r`` (the online-softmax identity), so the forward needs
    no further all-reduce. The rank-local step is the operator
    ``torch.ops.gumbelkit.vocab_parallel_softmax_local``.

    With ``hard=True`` the forward value is the one-hot of the global argmax of the same float64
    scores, which is the token of ``vocab_parallel_gumbel_max(..., temperature=1)`` and of
    ``sample(full_logits, seeds=seeds)`` whenever those take the torch path (backend ``torch``,
    or ``auto`` below the fused-kernel size; the fused numba path uses float32 noise and may
    pick another token where two scores differ in float64 by less than float32 rounding); the
    gradient is that of ``y`` (straight-through).

    Differentiable in ``local_logits`` (:class:`VocabParallelGumbelSoftmax`): backward
    ``(1/tau) y (G - <G, y>)`` and forward-mode ``(1/tau) y (dl - <dl, y>)``, each with one
    all-reduce, so every rank must call backward (or the jvp) together.

    Args:
        local_logits: ``(B, V_r)`` floating logits, this rank's columns (``V_r`` may be 0).
        tau: positive finite temperature, identical on every rank.
        hard: straight-through one-hot of the winner.
        seeds, vocab_offset, group, timeout, validate: as :func:`vocab_parallel_gumbel_max`.

    Returns:
        ``(B, V_r)`` in the dtype of ``local_logits``: columns ``[vocab_offset, vocab_offset +
        V_r)`` of the sample; concatenated over the ranks they equal the single-process
        Gumbel-Softmax of the full logits with the noise ``counter_gumbel(seeds, token id)``
        (up to float rounding, ~1e-7 relative in float32).

    Raises:
        TypeError / ValueError / RuntimeError: as :func:`vocab_parallel_gumbel_max`; ``tau``
            not positive and finite, ``hard`` not a bool.

    Example:
        >>> import torch.distributed as dist
        >>> init_gloo(0, 1, port=free_port(), timeout=10)
        >>> y = vocab_parallel_gumbel_softmax(torch.randn(2, 5), 0.5, seeds=torch.tensor([3, 4]),
        ...                                   vocab_offset=0)
        >>> torch.allclose(y.sum(-1), torch.ones(2))
        True
        >>> dist.destroy_process_group()
    """
    logits, seeds, offset, timeout = _check_args(local_logits, seeds, vocab_offset, group, timeout, validate)
    if isinstance(tau, bool) or not isinstance(tau, Real) or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    out = VocabParallelGumbelSoftmax.apply(logits, seeds, offset, float(tau), hard, group, timeout, validate)
    return out[0] if hard else out

r"""The rank-local steps of vocab-parallel sampling as registered operators.

:mod:`gumbelkit.distributed` splits a ``(B, V)`` row of logits over ranks; each rank holds the
columns ``[offset, offset + V_r)``. Between two collectives (done by the Python wrapper, never
inside an operator) each rank runs one of these operators on its shard:

* ``gumbelkit::vocab_parallel_max_local`` (:func:`vocab_parallel_max_op`): the shard's best
  ``(score, tie, token id)`` per row, where the score of token ``i`` is the very float
  :func:`gumbelkit.sampling.sample` compares for it on the whole row with ``seeds=``:

  - torch path: ``counter_gumbel(seed, i)`` (float64) ``+ (l_i - m) / T`` with the subtraction
    and division in the compute dtype (:func:`gumbelkit.sampling._scaled`); exact score ties are
    broken by the larger ``counter_uniform(seed ^ TIE_KEY, i)`` (``tie``), as ``sample`` does;
  - fused numba path (taken exactly when ``sample`` would take it on the ``(B', V)`` whole rows,
    ``B'`` the rows with ``T > 0``): :func:`gumbelkit._kernels.cpu_fused.sample_seeded` with
    ``offset`` and ``shift``, float32 noise for float32 logits; ties go to the lowest id
    (``tie = 0``);
  - ``T = 0`` (greedy): the largest logit, ties to the lowest id.

  ``m`` is ``shift``, the row maximum over the WHOLE vocabulary (one collective earlier), so the
  shard computes the same floats as the single process. The global winner is the lexicographic
  maximum of ``(score, tie, -id)`` over the ranks.

* ``gumbelkit::vocab_parallel_softmax_local`` (:func:`vocab_parallel_softmax_op`): the same
  torch-path scores at ``T = 1`` and the shard's best, plus the unnormalized shard of the
  Gumbel-Softmax ``e_i = exp((s_i - t) / tau)`` with ``t`` the shard's best score and its sum
  ``sum_i e_i`` (float64). The wrapper rescales by ``exp((t_r - t^*) / tau)`` with the global
  best ``t^*`` (the online-softmax identity), so one collective gives the normalizer.

Both follow the operator template of :mod:`gumbelkit._kernels.ops`: the real implementation is
the eager path with its data-dependent checks inside (NaN / ``+inf`` logits, a ``shift`` below
the shard's maximum or not finite, bad temperatures raise ``ValueError`` under ``torch.compile``
and from an exported program too), a shape-only fake implementation and the shared vmap rule.
They draw no noise from a generator: the noise is a pure function of ``seeds``, so ``vmap``'s
``randomness`` has nothing to vary (every sample uses its own slice of ``seeds``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._counter_noise import counter_gumbel, counter_uniform
from .._validation import compute_dtype
from ..sampling import _FUSED_MIN_T, _TIE_KEY, _scaled, _signed64
from .dispatch import cpu_kernels
from .ops import register_random_op

__all__ = ["BIG_ID", "vocab_parallel_max_op", "vocab_parallel_softmax_op"]

_NEG_INF = float("-inf")
BIG_ID = torch.iinfo(torch.int64).max  # the id of "no token on this shard"


def _check_local(logits: Tensor, shift: Tensor, offset: int, what: str) -> None:
    """Data checks of a shard: no NaN / +inf, ``shift`` finite and at least the shard's maximum."""
    if offset < 0:
        raise ValueError(f"{what}: offset must be >= 0 (the token id of column 0), got {offset}")
    if logits.shape[1] == 0:
        if not bool(torch.isfinite(shift).all()):
            raise ValueError(f"{what}: shift must be finite (the row maximum over the whole vocabulary)")
        return
    local = logits.amax(-1).double()
    bad_logits = torch.isnan(local) | torch.isposinf(local)
    bad_shift = ~torch.isfinite(shift) | (shift < local)
    if not bool((bad_logits | bad_shift).any()):
        return
    if bool(bad_logits.any()):
        rows = bad_logits.nonzero().flatten()[:8].tolist()
        raise ValueError(f"{what}: local_logits of row(s) {rows} contain NaN or +inf")
    rows = bad_shift.nonzero().flatten()[:8].tolist()
    raise ValueError(
        f"{what}: shift of row(s) {rows} is not finite or below the row's largest logit; it must be "
        "the row maximum over the whole vocabulary"
    )


def _fused_for(sub: Tensor, temperature: Tensor, vocab: int):
    """The fused kernels exactly when ``sample`` uses them for these rows over ``vocab`` tokens.

    ``sample`` asks :func:`cpu_kernels` about the ``(rows, vocab)`` logits of its ``T > 0``
    rows; a zero-stride view of that shape asks the same question without the memory.
    """
    if not bool((temperature >= _FUSED_MIN_T).all()):
        return None
    return cpu_kernels(sub.new_empty(()).expand(sub.shape[0], vocab))


def _torch_scores(sub: Tensor, seeds: Tensor, shift: Tensor, temperature: Tensor, offset: int):
    """``(scores (n, V_r) float64, best, tie, id)``: ``sample``'s torch-path scores and the shard's winner."""
    pos = torch.arange(offset, offset + sub.shape[1], device=sub.device)
    score = counter_gumbel(seeds.unsqueeze(-1), pos, dtype=torch.float64).add_(_scaled(sub, shift, temperature))
    col = score.argmax(-1, keepdim=True)
    best = score.gather(-1, col)
    key = (seeds ^ _signed64(_TIE_KEY)).unsqueeze(-1)
    tied = ((score == best).view(torch.uint8).sum(-1, dtype=torch.int32) > 1).nonzero().flatten()
    if tied.numel():
        u = counter_uniform(key[tied], pos)
        u = torch.where(score[tied] == best[tied], u, -1.0)
        col[tied] = u.argmax(-1, keepdim=True)
    tie = counter_uniform(key, col + offset).squeeze(-1)
    best = best.squeeze(-1)
    return score, best, torch.where(best > _NEG_INF, tie, -1.0), col.squeeze(-1) + offset


def _empty_winners(batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.full((batch,), _NEG_INF, dtype=torch.float64, device=device),
        torch.full((batch,), -1.0, dtype=torch.float64, device=device),
        torch.full((batch,), BIG_ID, dtype=torch.int64, device=device),
    )


@torch.library.custom_op("gumbelkit::vocab_parallel_max_local", mutates_args=())
def vocab_parallel_max_op(
    logits: Tensor, seeds: Tensor, shift: Tensor, temperature: Tensor, offset: int, vocab: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A shard's Gumbel-Max winner per row: ``(score, tie, id)``, float64, float64, int64, each ``(B,)``.

    ``logits`` ``(B, V_r)``, ``seeds`` ``(B,)`` int64, ``shift`` ``(B,)`` float64 (the row
    maximum over all ``vocab`` tokens), ``temperature`` ``(B,)`` float64 ``>= 0``; ``offset`` is
    the token id of column 0. An empty shard gives ``(-inf, -1, int64 max)``.
    """
    what = "vocab_parallel_max_local"
    if not bool((torch.isfinite(temperature) & (temperature >= 0)).all()):
        raise ValueError(f"{what}: temperature must be finite and >= 0, got {temperature[:4].tolist()}")
    _check_local(logits, shift, offset, what)
    batch, n = logits.shape
    if vocab < offset + n:
        raise ValueError(f"{what}: vocab={vocab} is smaller than offset + local columns = {offset + n}")
    score, tie, gid = _empty_winners(batch, logits.device)
    if batch == 0 or n == 0:
        return score, tie, gid
    greedy = temperature == 0
    if bool(greedy.any()):  # sample: argmax of the logits, the lowest id among ties
        g = greedy.nonzero().flatten()
        col = logits[g].argmax(-1, keepdim=True)
        score[g] = logits[g].gather(-1, col).squeeze(-1).double()
        tie[g] = 0.0
        gid[g] = col.squeeze(-1) + offset
    rows = (~greedy).nonzero().flatten()
    if rows.numel() == 0:
        return score, tie, gid
    whole = rows.numel() == batch
    sub = logits if whole else logits[rows]
    s, m, t = (seeds, shift, temperature) if whole else (seeds[rows], shift[rows], temperature[rows])
    fused = _fused_for(sub, t, vocab)
    if fused is not None:
        x = sub.detach().to(compute_dtype(sub.dtype)).contiguous()
        ids, best = fused.sample_seeded(
            x.numpy(),
            s.contiguous(),
            t.to(x.dtype).numpy(),
            offset=offset,
            shift=m.to(x.dtype).numpy(),
            return_score=True,
        )
        best = torch.from_numpy(best).double()
        score[rows], tie[rows], gid[rows] = best, 0.0, torch.from_numpy(ids) + offset
    else:
        _, best, u, ids = _torch_scores(sub, s, m, t, offset)
        score[rows], tie[rows], gid[rows] = best, u, ids
    gid[rows] = torch.where(score[rows] > _NEG_INF, gid[rows], BIG_ID)
    return score, tie, gid


def _max_fake(logits, seeds, shift, temperature, offset, vocab):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.float64),
        logits.new_empty((batch,), dtype=torch.float64),
        logits.new_empty((batch,), dtype=torch.int64),
    )


register_random_op(vocab_parallel_max_op, _max_fake)


@torch.library.custom_op("gumbelkit::vocab_parallel_softmax_local", mutates_args=())
def vocab_parallel_softmax_op(
    logits: Tensor, seeds: Tensor, shift: Tensor, tau: float, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A shard's unnormalized Gumbel-Softmax: ``(e, best, tie, id, total)``.

    ``e`` ``(B, V_r)`` in the compute dtype is ``exp((s - best) / tau)`` with ``s`` the
    torch-path scores at ``T = 1`` (see the module docstring) and ``best`` ``(B,)`` float64 the
    shard's largest score; ``tie`` and ``id`` as :func:`vocab_parallel_max_op`; ``total`` ``(B,)``
    float64 is the sum of ``e`` (before rounding). A shard without a possible token gives
    ``e = 0``, ``best = -inf``, ``total = 0``.
    """
    what = "vocab_parallel_softmax_local"
    if not 0 < tau < math.inf:
        raise ValueError(f"{what}: tau must be a positive finite float, got {tau!r}")
    _check_local(logits, shift, offset, what)
    batch, n = logits.shape
    cdtype = compute_dtype(logits.dtype)
    best, tie, gid = _empty_winners(batch, logits.device)
    total = torch.zeros(batch, dtype=torch.float64, device=logits.device)
    if batch == 0 or n == 0:
        return logits.new_zeros((batch, n), dtype=cdtype), best, tie, gid, total
    ones = torch.ones(batch, dtype=torch.float64, device=logits.device)
    score, best, tie, gid = _torch_scores(logits, seeds, shift, ones, offset)
    possible = (best > _NEG_INF).unsqueeze(-1)
    e = score.sub_(torch.where(possible, best.unsqueeze(-1), 0.0))
    e = e.div_(tau).exp_() if tau != 1.0 else e.exp_()
    e = e.masked_fill_(~possible, 0.0)
    gid = torch.where(best > _NEG_INF, gid, BIG_ID)
    return e.to(cdtype), best, tie, gid, e.sum(-1)


def _softmax_fake(logits, seeds, shift, tau, offset):
    batch = logits.shape[0]
    vec = [logits.new_empty((batch,), dtype=torch.float64) for _ in range(2)]
    return (
        torch.empty_like(logits, dtype=compute_dtype(logits.dtype)),
        *vec,
        logits.new_empty((batch,), dtype=torch.int64),
        logits.new_empty((batch,), dtype=torch.float64),
    )


register_random_op(vocab_parallel_softmax_op, _softmax_fake)

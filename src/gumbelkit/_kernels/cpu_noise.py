r"""Gumbel noise from a 64-bit seed on the torch path, with an exact tail in every dtype.

The draw is a pure function of ``(seed, shape, dtype)``. Tensors of at least ``PARALLEL_CHUNK``
elements are filled in chunks of ``PARALLEL_CHUNK`` elements, chunk ``i`` from its own
``torch.Generator`` seeded with the ``i``-th of a batch of 64-bit seeds drawn from a generator
seeded with ``seed``, on up to ``torch.get_num_threads()`` threads: never dependent on the
thread count or scheduling. Worker threads run under the caller's inference mode (PyTorch's
thread-local modes do not cross threads), and the fill runs inside a registered operator, so
tracers record one opaque call, never the fill.

**The exact tail.** A float32 uniform has 24 random bits, which would cap
:math:`g = -\log(-\log U)` at 16.6 and starve every category more than about 17 nats below
the winner. Instead :math:`g = -\log E` with :math:`E = -\log U = -\operatorname{log1p}(-u)`,
:math:`u \sim \mathcal U[0, 1)`, and the end of ``u`` that makes ``g`` large is refined:
conditional on :math:`u < 2^{-8}`, ``u`` is uniform on :math:`[0, 2^{-8})`, so it is redrawn
there as :math:`2^{-8} w` with ``w`` a 53-bit float64 uniform (at least :math:`2^{-53}`), and
:math:`E = -\operatorname{log1p}(-2^{-8} w)` is computed in float64. The law of ``E`` is
unchanged, ``g`` reaches :math:`61 \log 2 \approx 42.3` nats (the mass beyond is below
:math:`10^{-18}`), is never infinite, and every ``g > 5.5`` (the top of any row of more than a
few hundred categories) carries 53 random bits, so ties of the noise among the leading
candidates have probability about :math:`2^{-53}`. At the other end a float32 ``g`` stays
above :math:`-\log(24 \log 2) = -2.81` (a float64 one above -3.6): the Gumbel mass below is
:math:`6 \cdot 10^{-8}` (:math:`10^{-16}`), and a category whose noise is that low never wins.

Small tensors (at most ``SMALL`` elements) skip the refinement, which costs more calls than it
saves work there: ``u`` is a 53-bit float64 uniform (at least :math:`2^{-54}`) and ``E`` is
computed in float64, so ``g`` reaches 37.4 nats.

The samplers use ``-g = \log E`` directly (``logits - (-g)`` saves a negation pass).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

__all__ = ["PARALLEL_CHUNK", "SMALL", "fill_neg_gumbel_"]

PARALLEL_CHUNK = 1 << 20
SMALL = 1 << 14
_LOW = 2.0**-8  # u below this (large g) is refined
_W_MIN = 2.0**-53  # w is drawn on [0, 1); w = 0 would give E = 0 and g = +inf


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gumbelkit-noise")


def _neg_gumbel_chunk_(flat: torch.Tensor, generator: torch.Generator) -> None:
    """Fill a 1-D contiguous float32/float64 tensor with ``-g = log E`` (the transform above)."""
    u = flat.uniform_(0.0, 1.0, generator=generator)
    refine = (u < _LOW).nonzero().squeeze(1)
    w = torch.empty(refine.numel(), dtype=torch.float64).uniform_(0.0, 1.0, generator=generator)
    log_e_fine = w.clamp_(min=_W_MIN).mul_(-_LOW).log1p_().neg_().log_()
    u.neg_().log1p_().neg_().log_()  # log E = log(-log1p(-u))
    u[refine] = log_e_fine.to(u.dtype)


def fill_neg_gumbel_(buf: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill a contiguous float32/float64 CPU tensor with *minus* the standard Gumbel draws of ``seed``."""
    flat = buf.view(-1)
    n = flat.numel()
    root = torch.Generator().manual_seed(seed & (2**64 - 1))
    if n <= SMALL:
        u = torch.empty(n, dtype=torch.float64).uniform_(0.0, 1.0, generator=root).clamp_(min=_W_MIN / 2)
        flat.copy_(u.neg_().log1p_().neg_().log_())
        return buf
    if n < PARALLEL_CHUNK:
        _neg_gumbel_chunk_(flat, root)
        return buf
    starts = range(0, n, PARALLEL_CHUNK)
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(starts),), dtype=torch.int64, generator=root).tolist()
    inference = torch.is_inference_mode_enabled()

    def fill(job: tuple[int, int]) -> None:
        start, chunk_seed = job
        with torch.inference_mode(inference), torch.no_grad():
            chunk_gen = torch.Generator().manual_seed(chunk_seed & (2**64 - 1))
            _neg_gumbel_chunk_(flat[start:start + PARALLEL_CHUNK], chunk_gen)

    jobs = list(zip(starts, seeds, strict=True))
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        for job in jobs:
            fill(job)
    else:
        list(_pool(workers).map(fill, jobs))
    return buf

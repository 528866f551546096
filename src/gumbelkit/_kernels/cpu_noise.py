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
:math:`u \sim \mathcal U[0, 1)`, and the two ends of ``u`` are refined: conditional on
:math:`u < 2^{-8}` (large ``g``) or :math:`u \ge 1 - 2^{-4}` (small ``g``), ``u`` is uniform on
that interval, so it is redrawn there from a 53-bit float64 uniform ``w``:

.. math::
    E = -\operatorname{log1p}(-2^{-8} w) \quad (u < 2^{-8}), \qquad
    E = -\log\big(2^{-4}(1 - w)\big) \quad (u \ge 1 - 2^{-4}),

computed in float64. The law of ``E`` is unchanged (each interval keeps its exact
probability), ``g`` reaches :math:`61 \log 2 \approx 42.3` nats (tail mass beyond it
:math:`< 10^{-18}`), is never infinite, and the top of every row is drawn with 53 bits, so
ties of the noise among the leading candidates have probability about :math:`2^{-53}`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

__all__ = ["PARALLEL_CHUNK", "fill_gumbel_"]

PARALLEL_CHUNK = 1 << 20
_LOW = 2.0**-8  # u below this: large g, refined
_HIGH = 2.0**-4  # 1 - u below this: small g, refined
_W_MIN = 2.0**-53  # w is drawn on [0, 1); w = 0 would give E = 0 and g = +inf


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gumbelkit-noise")


def _gumbel_chunk_(flat: torch.Tensor, generator: torch.Generator) -> None:
    """Fill a 1-D contiguous float32/float64 tensor with standard Gumbel draws (the transform above)."""
    u = flat.uniform_(0.0, 1.0, generator=generator)
    refine = ((u < _LOW) | (u >= 1.0 - _HIGH)).nonzero().squeeze(1)
    low = u[refine] < _LOW
    w = torch.empty(refine.numel(), dtype=torch.float64).uniform_(0.0, 1.0, generator=generator)
    e_fine = torch.where(low, torch.log1p(w.clamp(min=_W_MIN).mul(-_LOW)).neg(),
                         torch.log1p(-w).add(torch.log(torch.tensor(_HIGH, dtype=torch.float64))).neg())
    u.neg_().log1p_().neg_()  # E = -log1p(-u)
    u[refine] = e_fine.to(u.dtype)
    u.log_().neg_()  # g = -log E


def fill_gumbel_(buf: torch.Tensor, seed: int) -> torch.Tensor:
    """Fill a contiguous float32/float64 CPU tensor with the standard Gumbel draws of ``seed``."""
    flat = buf.view(-1)
    n = flat.numel()
    root = torch.Generator().manual_seed(seed & (2**64 - 1))
    if n < PARALLEL_CHUNK:
        _gumbel_chunk_(flat, root)
        return buf
    starts = range(0, n, PARALLEL_CHUNK)
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(starts),), dtype=torch.int64, generator=root).tolist()
    inference = torch.is_inference_mode_enabled()

    def fill(job: tuple[int, int]) -> None:
        start, chunk_seed = job
        with torch.inference_mode(inference), torch.no_grad():
            chunk_gen = torch.Generator().manual_seed(chunk_seed & (2**64 - 1))
            _gumbel_chunk_(flat[start:start + PARALLEL_CHUNK], chunk_gen)

    jobs = list(zip(starts, seeds, strict=True))
    workers = min(torch.get_num_threads(), len(jobs))
    if workers <= 1:
        for job in jobs:
            fill(job)
    else:
        list(_pool(workers).map(fill, jobs))
    return buf

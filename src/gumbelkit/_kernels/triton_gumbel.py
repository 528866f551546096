"""Fused Triton kernels for Gumbel-Softmax, Gumbel-Max and the noise (GPU; optional extra ``[triton]``).

Imported only through :mod:`gumbelkit._kernels.dispatch`, never at package import time.

Each host function is registered with :func:`torch.library.triton_op` and launches its kernels
through :func:`torch.library.wrap_triton`, so ``torch.compile`` (Inductor) sees the Triton
kernels themselves and can schedule them with the surrounding code, while ``torch.export``
keeps the operator as one node (``torch.ops.gumbelkit.triton_gumbel_softmax`` ...). Anatomy
(Liger-Kernel style): private ``@triton.jit`` kernels, host functions that view the input as
(rows, cols) with the category dimension last and pick a single-tile or looping launch.

No host synchronisation: the seed is a device tensor drawn from the caller's generator
(:func:`gumbelkit._kernels.ops.draw_seed`) and read by the kernel from memory, and the row
maximum of the logits is computed on the device and checked by the ``gumbelkit::check_rows``
operator. That check raises the usual ``ValueError`` (one tiny device-to-host copy); while a
CUDA graph is being captured it is an on-device assert instead (raised at the next
synchronisation), so the calls can be captured.

Noise (the exact-tail contract on 32 bits). Philox gives a 32-bit integer ``r`` per element,
``r = randint(seed, row * n_cols + col)``. Its top bit chooses the half of ``(0, 1)`` that
``U`` lies in, and the other 31 bits give ``X = (b + 1/2) 2**-32``, the distance of ``U`` from
the nearer end (``U = X`` or ``U = 1 - X``), with full relative precision; then
``E = -log U`` is ``-log X`` or ``-log1p(-X) = -log w + (X - t) / w`` with ``w = fl(1 - X)``,
``t = 1 - w`` (exact), and ``G = -log E``. ``G`` lies in ``[-3.13, 22.87]``: never infinite,
and the upper tail keeps its probability down to ``e**-22.8``. Scores are
``(x - max x) + G``: shifted by the row maximum *before* the noise is added, so the noise keeps
its resolution at any logit scale (two logits of 1e7 are 50/50).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how the test
suite checks them without a GPU (the interpreter launches the kernels directly instead of
tracing them, so the compile/export behaviour itself is checked only on a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .ops import checked_row_max, register_vmap_rule

__all__ = ["triton_gumbel_max", "triton_gumbel_noise", "triton_gumbel_softmax"]

_MAX_SINGLE_TILE = 8192  # widest row handled by one register tile; wider rows loop
_HALF_ULP32 = tl.constexpr(2.3283064365386963e-10)  # 2**-32


@triton.jit
def _gumbel(seed, offsets):
    """Standard Gumbel noise from 32 Philox bits at ``offsets``."""
    return gumbel_from_bits(tl.randint(seed, offsets).to(tl.uint32, bitcast=True))


@triton.jit
def gumbel_from_bits(r):
    """G from a uint32 ``r``, exact in both tails (module docstring)."""
    upper = (r >> 31) != 0
    b = tl.where(upper, ~r, r) & 0x7FFFFFFF
    x = (b.to(tl.float32) + 0.5) * _HALF_ULP32  # U or 1 - U, in (0, 1/2)
    w = 1.0 - x
    t = 1.0 - w
    e = tl.where(upper, -tl.log(w) + (x - t) / w, -tl.log(x))
    return -tl.log(e)


@triton.jit
def _noise_kernel(OUT, seed_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _gumbel(tl.load(seed_ptr), offs), mask=offs < n)


@triton.jit
def _scores(X, ROWMAX, seed, rows, cols, base, rmask, n_cols, inner):
    """(x - rowmax) + g in float32 on one tile (-inf at -inf logits and outside the tile).

    The noise of the entry at (row, col) of the (rows, cols) view is the one at its flat index
    in the caller's tensor, where the category dimension has ``inner`` elements after it:
    ``(row // inner) * n_cols * inner + col * inner + row % inner`` (``row * n_cols + col``
    when it is the last dimension), so ``gumbel_noise_like`` gives the noise used for any dim.
    """
    m2 = rmask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + base + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
    m = tl.load(ROWMAX + rows, mask=rmask, other=0.0)
    flat = ((rows // inner) * n_cols * inner + rows % inner)[:, None] + cols[None, :] * inner
    z = (x - m[:, None]) + _gumbel(seed, flat)
    return tl.where(m2, z, -float("inf")), m2


@triton.jit
def _softmax_fwd_kernel(X, Y, IDX, ROWMAX, seed_ptr, n_rows, n_cols, inner, inv_tau,
                        SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    seed = tl.load(seed_ptr)
    base = rows[:, None] * n_cols
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        z, m2 = _scores(X, ROWMAX, seed, rows, cols, base, rmask, n_cols, inner)
        zmax = tl.max(z, 1)
        e = tl.where(z == -float("inf"), 0.0, tl.exp((z - zmax[:, None]) * inv_tau))
        y = e / tl.sum(e, 1)[:, None]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)
        tl.store(IDX + rows, tl.argmax(z, 1).to(tl.int64), mask=rmask)
    else:
        # pass 1: online max and normalizer (and argmax) over column tiles
        zmax = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        norm = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.zeros((BLOCK_M,), tl.int32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z, m2 = _scores(X, ROWMAX, seed, rows, cols, base, rmask, n_cols, inner)
            tile_max = tl.max(z, 1)
            tile_arg = tl.argmax(z, 1).to(tl.int32) + start
            new_max = tl.maximum(zmax, tile_max)
            scale = tl.where(zmax == -float("inf"), 0.0, tl.exp((zmax - new_max) * inv_tau))
            e = tl.where(z == -float("inf"), 0.0, tl.exp((z - new_max[:, None]) * inv_tau))
            norm = norm * scale + tl.sum(e, 1)
            best = tl.where(tile_max > zmax, tile_arg, best)
            zmax = new_max
        # pass 2: regenerate the same noise and write the normalized sample
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z, m2 = _scores(X, ROWMAX, seed, rows, cols, base, rmask, n_cols, inner)
            e = tl.where(z == -float("inf"), 0.0, tl.exp((z - zmax[:, None]) * inv_tau))
            tl.store(Y + base + cols[None, :], (e / norm[:, None]).to(Y.dtype.element_ty), mask=m2)
        tl.store(IDX + rows, best.to(tl.int64), mask=rmask)


@triton.jit
def _max_partial_kernel(X, ROWMAX, VAL, IDX, seed_ptr, n_rows, n_cols, inner, n_tiles, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Max and argmax of the scores over one (BLOCK_M x BLOCK_N) tile: rows split across programs."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    z, _ = _scores(X, ROWMAX, tl.load(seed_ptr), rows, cols, rows[:, None] * n_cols, rmask, n_cols, inner)
    tl.store(VAL + rows * n_tiles + tile, tl.max(z, 1), mask=rmask)
    tl.store(IDX + rows * n_tiles + tile, tl.argmax(z, 1).to(tl.int64) + tile * BLOCK_N, mask=rmask)


# ----------------------------------------------------------------------------- host side

def _as_rows(t: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...], int]:
    """``(rows, moved shape, inner)``: ``t`` as a contiguous (rows, categories) matrix, the
    shape with ``dim`` moved last, and the number of elements after ``dim`` in ``t``."""
    moved = t.movedim(dim, -1)
    inner = math.prod(t.shape[dim % t.dim() + 1:])
    return moved.reshape(-1, moved.shape[-1]).contiguous(), tuple(moved.shape), inner


def _tiles(n_cols: int, itemsize: int) -> tuple[bool, int, int]:
    """(single tile?, BLOCK_M, BLOCK_N): whole rows in registers when they fit, else column loops."""
    n = triton.next_power_of_2(n_cols)
    if n <= _MAX_SINGLE_TILE:
        return True, max(1, min(1024, 4096 // n)), n
    return False, 1, 4096 if itemsize <= 2 else 2048


def _check_offsets(numel: int) -> None:
    if numel >= 2**31:
        raise ValueError("the Triton kernels index noise with 32-bit counters; use GUMBELKIT_BACKEND=torch "
                         f"for tensors of {numel} >= 2**31 elements")


def _philox_seed(seed: Tensor) -> Tensor:
    """A gumbelkit 64-bit seed as the kernels' non-negative 62-bit Philox seed (on device: no sync)."""
    return seed.reshape(1).bitwise_and(2**62 - 1)


def _row_max(logits: Tensor, dim: int) -> Tensor:
    """The checked row maximum as a contiguous float32 (rows,) vector in the kernels' row order."""
    return checked_row_max(logits, None, dim).movedim(dim, -1).reshape(-1).float().contiguous()


@triton_op("gumbelkit::triton_gumbel_softmax", mutates_args={})
def triton_gumbel_softmax(logits: Tensor, seed: Tensor, tau: float, dim: int, hard: bool) -> tuple[Tensor, Tensor]:
    """``(softmax(((x - max x) + g) / tau), argmax)`` along ``dim`` in one fused kernel.

    Philox noise in registers; writes only ``y`` (in the logits' dtype) and, when ``hard``, one
    index per row (kept with size 1 along ``dim``; an empty int64 tensor otherwise). The
    backward pass is the closed form in :mod:`gumbelkit._kernels.gumbel_softmax`.
    """
    row_max = _row_max(logits, dim)
    x, shape, inner = _as_rows(logits, dim)
    _check_offsets(x.numel())
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    index = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    single, bm, bn = _tiles(n_cols, x.element_size())
    wrap_triton(_softmax_fwd_kernel)[(triton.cdiv(n_rows, bm),)](
        x, y, index, row_max, _philox_seed(seed), n_rows, n_cols, inner, 1.0 / tau, SINGLE=single, BLOCK_M=bm,
        BLOCK_N=bn)
    y = y.view(shape).movedim(-1, dim)
    if not hard:
        return y, index.new_empty(0)
    return y, index.view(shape[:-1]).unsqueeze(dim)


@triton_op("gumbelkit::triton_gumbel_max", mutates_args={})
def triton_gumbel_max(logits: Tensor, seed: Tensor, dim: int) -> Tensor:
    """``argmax((x - max x) + g)`` along ``dim`` (kept with size 1): each program reduces one tile,
    then a tiny reduction over the tiles."""
    row_max = _row_max(logits, dim)
    x, shape, inner = _as_rows(logits, dim)
    _check_offsets(x.numel())
    n_rows, n_cols = x.shape
    bn = min(triton.next_power_of_2(n_cols), 4096)
    bm = max(1, min(1024, 4096 // bn))
    n_tiles = triton.cdiv(n_cols, bn)
    val = torch.empty(n_rows, n_tiles, dtype=torch.float32, device=x.device)
    idx = torch.empty(n_rows, n_tiles, dtype=torch.int64, device=x.device)
    wrap_triton(_max_partial_kernel)[(triton.cdiv(n_rows, bm), n_tiles)](
        x, row_max, val, idx, _philox_seed(seed), n_rows, n_cols, inner, n_tiles, BLOCK_M=bm, BLOCK_N=bn)
    best_tile = val.argmax(1, keepdim=True)
    return idx.gather(1, best_tile).view(shape[:-1]).unsqueeze(dim)


@triton_op("gumbelkit::triton_gumbel_noise", mutates_args={})
def triton_gumbel_noise(like: Tensor, seed: Tensor) -> Tensor:
    """The float32 Philox Gumbel noise the kernels add at each flat (row-major) position of ``like``."""
    n = like.numel()
    _check_offsets(n)
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    wrap_triton(_noise_kernel)[(triton.cdiv(n, 1024),)](out, _philox_seed(seed), n, BLOCK=1024)
    return out


for _op in (triton_gumbel_softmax, triton_gumbel_max, triton_gumbel_noise):
    register_vmap_rule(_op)

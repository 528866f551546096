"""Fused Triton kernels for Gumbel-Softmax and Gumbel-Max (GPU; optional extra ``[triton]``).

Imported only through :mod:`gumbelkit._kernels.dispatch`, never at package import time.

Anatomy (Liger-Kernel style): private ``@triton.jit`` kernels, host functions that view the
input as (rows, cols) with the category dimension last and pick a single-tile or looping
launch, then the ``autograd.Function``.

Noise: Philox counters in registers, ``u = rand(seed, row * n_cols + col)`` clamped to
``[tiny, 1)``, ``g = -log(-log u)``. ``seed`` is a 62-bit integer drawn from the caller's
torch generator on the tensor's device, read by the kernel from memory (no host sync), so
the same generator state gives the same draw; the noise is never written to memory. The
looping kernel regenerates the same noise in its second pass instead of storing it.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how the test
suite checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import check_rows

__all__ = [
    "draw_seed",
    "triton_gumbel_max",
    "triton_gumbel_noise",
    "triton_softmax_forward",
]

_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32
_MAX_SINGLE_TILE = 8192  # widest row handled by one register tile; wider rows loop


@triton.jit
def _gumbel(seed, offsets):
    u = tl.maximum(tl.rand(seed, offsets), _TINY)
    return -tl.log(-tl.log(u))


@triton.jit
def _flag_nan(row_max, n_nan):
    # tl.max skips NaN; a row that held one reports NaN so the host raises a clear error
    return tl.where(n_nan > 0, float("nan"), row_max)


@triton.jit
def _noise_kernel(OUT, seed_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _gumbel(tl.load(seed_ptr), offs), mask=offs < n)


@triton.jit
def _softmax_fwd_kernel(X, Y, IDX, ROWMAX, seed_ptr, n_rows, n_cols, inv_tau,
                        SINGLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    seed = tl.load(seed_ptr)
    base = rows[:, None] * n_cols
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        m2 = rmask[:, None] & (cols < n_cols)[None, :]
        z = tl.load(X + base + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
        z = z + _gumbel(seed, base + cols[None, :])
        z = tl.where(m2, z, -float("inf"))
        zmax = tl.max(z, 1)
        e = tl.where(z == -float("inf"), 0.0, tl.exp((z - zmax[:, None]) * inv_tau))
        y = e / tl.sum(e, 1)[:, None]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)
        tl.store(IDX + rows, tl.argmax(z, 1).to(tl.int64), mask=rmask)
        tl.store(ROWMAX + rows, _flag_nan(zmax, tl.sum((z != z).to(tl.int32), 1)), mask=rmask)
    else:
        # pass 1: online max and normalizer (and argmax) over column tiles
        zmax = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        norm = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.zeros((BLOCK_M,), tl.int32)
        n_nan = tl.zeros((BLOCK_M,), tl.int32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m2 = rmask[:, None] & (cols < n_cols)[None, :]
            z = tl.load(X + base + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
            z = tl.where(m2, z + _gumbel(seed, base + cols[None, :]), -float("inf"))
            tile_max = tl.max(z, 1)
            tile_arg = tl.argmax(z, 1).to(tl.int32) + start
            new_max = tl.maximum(zmax, tile_max)
            scale = tl.where(zmax == -float("inf"), 0.0, tl.exp((zmax - new_max) * inv_tau))
            e = tl.where(z == -float("inf"), 0.0, tl.exp((z - new_max[:, None]) * inv_tau))
            norm = norm * scale + tl.sum(e, 1)
            best = tl.where(tile_max > zmax, tile_arg, best)
            n_nan += tl.sum((z != z).to(tl.int32), 1)
            zmax = new_max
        # pass 2: regenerate the same noise and write the normalized sample
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m2 = rmask[:, None] & (cols < n_cols)[None, :]
            z = tl.load(X + base + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
            z = tl.where(m2, z + _gumbel(seed, base + cols[None, :]), -float("inf"))
            e = tl.where(z == -float("inf"), 0.0, tl.exp((z - zmax[:, None]) * inv_tau))
            tl.store(Y + base + cols[None, :], (e / norm[:, None]).to(Y.dtype.element_ty), mask=m2)
        tl.store(IDX + rows, best.to(tl.int64), mask=rmask)
        tl.store(ROWMAX + rows, _flag_nan(zmax, n_nan), mask=rmask)


@triton.jit
def _max_partial_kernel(X, VAL, IDX, seed_ptr, n_rows, n_cols, n_tiles, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Max and argmax of logits + g over one (BLOCK_M x BLOCK_N) tile: rows split across programs."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    m2 = rmask[:, None] & (cols < n_cols)[None, :]
    base = rows[:, None] * n_cols
    z = tl.load(X + base + cols[None, :], mask=m2, other=-float("inf")).to(tl.float32)
    z = tl.where(m2, z + _gumbel(tl.load(seed_ptr), base + cols[None, :]), -float("inf"))
    zmax = _flag_nan(tl.max(z, 1), tl.sum((z != z).to(tl.int32), 1))
    tl.store(VAL + rows * n_tiles + tile, zmax, mask=rmask)
    tl.store(IDX + rows * n_tiles + tile, tl.argmax(z, 1).to(tl.int64) + tile * BLOCK_N, mask=rmask)


# ----------------------------------------------------------------------------- host side

def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A 62-bit Philox seed drawn from ``generator`` on ``device`` (stays on the device: no sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def _as_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    moved = t.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous(), tuple(moved.shape)


def _tiles(n_cols: int, itemsize: int) -> tuple[bool, int, int]:
    """(single tile?, BLOCK_M, BLOCK_N): whole rows in registers when they fit, else column loops."""
    n = triton.next_power_of_2(n_cols)
    if n <= _MAX_SINGLE_TILE:
        return True, max(1, min(1024, 4096 // n)), n
    return False, 1, 4096 if itemsize <= 2 else 2048


def _grid_rows(n_rows: int, block_m: int) -> tuple[int]:
    return (triton.cdiv(n_rows, block_m),)


def _check_offsets(numel: int) -> None:
    if numel >= 2**31:
        raise ValueError("the Triton kernels index noise with 32-bit counters; use GUMBELKIT_BACKEND=torch "
                         f"for tensors of {numel} >= 2**31 elements")


def triton_softmax_forward(logits: torch.Tensor, tau: float, seed: torch.Tensor, dim: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(softmax((logits + g) / tau), argmax(logits + g))`` along ``dim`` (index kept with size 1).

    Philox noise in registers; writes only ``y`` and one index per row. The backward pass is
    the closed form in :mod:`gumbelkit._kernels.gumbel_softmax` (plain torch ops).
    """
    x, shape = _as_rows(logits, dim)
    _check_offsets(x.numel())
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    index = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    row_max = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    single, bm, bn = _tiles(n_cols, x.element_size())
    _softmax_fwd_kernel[_grid_rows(n_rows, bm)](x, y, index, row_max, _philox_seed(seed), n_rows, n_cols, 1.0 / tau,
                                                SINGLE=single, BLOCK_M=bm, BLOCK_N=bn)
    check_rows(row_max, logits, None, dim)
    return y.view(shape).movedim(-1, dim), index.view(shape[:-1]).unsqueeze(dim)


def _philox_seed(seed: torch.Tensor) -> torch.Tensor:
    """A gumbelkit 64-bit seed as the kernels' non-negative 62-bit Philox seed (on device: no sync)."""
    return seed.reshape(1).bitwise_and(2**62 - 1)


def triton_gumbel_max(logits: torch.Tensor, dim: int, seed: torch.Tensor) -> torch.Tensor:
    """Gumbel-Max in one pass: each program reduces one tile, then a tiny reduction over tiles."""
    x, shape = _as_rows(logits, dim)
    _check_offsets(x.numel())
    n_rows, n_cols = x.shape
    bn = min(triton.next_power_of_2(n_cols), 4096)
    bm = max(1, min(1024, 4096 // bn))
    n_tiles = triton.cdiv(n_cols, bn)
    val = torch.empty(n_rows, n_tiles, dtype=torch.float32, device=x.device)
    idx = torch.empty(n_rows, n_tiles, dtype=torch.int64, device=x.device)
    _max_partial_kernel[(triton.cdiv(n_rows, bm), n_tiles)](x, val, idx, _philox_seed(seed), n_rows, n_cols, n_tiles,
                                                            BLOCK_M=bm, BLOCK_N=bn)
    best_val, best_tile = val.max(1, keepdim=True)
    check_rows(best_val, logits, None, dim)
    return idx.gather(1, best_tile).view(shape[:-1])


def triton_gumbel_noise(shape: tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    """The Philox Gumbel noise the kernels use for a (rows, cols) problem, flattened row-major (tests)."""
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=torch.float32, device=seed.device)
    _noise_kernel[(triton.cdiv(n, 1024),)](out, _philox_seed(seed), n, BLOCK=1024)
    return out.view(shape)

r"""Fused CPU kernels (numba): counter-based Gumbel noise generated in registers and reduced in
the same pass, for ``gumbel_max``, ``gumbel_softmax``, seeded token sampling and top-p.

numba is an optional extra (``pip install 'gumbelkit[numba]'``); this module imports without
it and :func:`available` says whether the kernels can run. The kernels take C-contiguous 2-D
float32/float64 numpy arrays (``tensor.numpy()`` views of CPU tensors), work row by row over
the last axis and run in parallel over rows and, for few long rows, over blocks of a row.
They are compiled on first use and cached on disk (see :func:`cache_info`). float16 and
bfloat16 tensors are the caller's to upcast (``x.float()``): half precision is computed in
float32, and the noise is float32 or better whatever the input dtype.

Noise contract
--------------
The noise at position ``p`` of stream ``seed`` is the SplitMix64 counter noise of
:mod:`gumbelkit._counter_noise` (Steele, Lea and Flood 2014; Salmon et al. 2011)::

    key = mix64(seed mod 2**64)
    h   = mix64(key + p * 0x9E3779B97F4A7C15 mod 2**64)
    U   = (2 * floor(h / 2**12) + 1) * 2**-53          (52 random bits, U in [2**-53, 1 - 2**-53])
    G   = -log(-log U)

so ``G`` lies in [-3.59, 36.74] and is never infinite or NaN, and ``counter_gumbel(seed, p)``
of the torch reference is the same value computed in float64. Positions: the flat index
``offset + r * n + j`` for :func:`gumbel_noise`, :func:`gumbel_max`, :func:`gumbel_softmax`,
:func:`gumbel_topk`; the token id ``offset + j`` under the row's own seed for
:func:`sample_seeded`. A
value depends only on ``(seed, position)``: never on the thread count, the block split or
the other rows of the batch.

The exact tail. float64 inputs get ``G`` computed as written (``U`` is exact in float64, so
``log U`` keeps all 52 bits near ``U = 1``). float32 inputs get a float32 computation that
keeps the tail too: the smaller of ``U`` and ``V = 1 - U`` is formed directly from the hash
bits, ``X = ((b >> 11) | 1) * 2**-53`` with ``b = h`` (then ``X = U``) or ``b = ~h`` when
``h``'s top bit is set (then ``X = V``), each with full relative precision; then

* ``E = -log X`` when ``X = U``;
* ``E = -log1p(-X)`` when ``X = V``, as ``-log(w) + (X - t) / w`` with ``w = fl(1 - X)``,
  ``t = 1 - w`` (exact) and ``X - t`` (exact: the rounding error of ``w``), the division
  replaced by ``1 + t + t**2`` (the correction term is below ``2**-25``; when ``w`` rounds to 1,
  ``E = X``);
* ``G = -log E``,

with a vectorizable float32 ``log`` (Cephes ``logf``: exponent from the float's bits, degree-9
polynomial; <= 0.72 ulp measured). Against the same transform in float64 (and 40-digit mpmath)
on the same bits, the error is at most 4 units of ``2**-24 * max(1, |G|)`` (3.3 measured,
tested), and the largest value, 36.74, is reached: a category 30 nats below the winner still
wins with its exact probability (about ``e**-30``).

Kernel results
--------------
* :func:`gumbel_max`: ``argmax_j (x_j - m) + G_j`` with ``m`` the row max (shifting first keeps
  the noise exact at large scores: two logits ``1e7`` are 50/50), ties to the lowest index.
  Chunks that cannot win (``max x - m + 36.74`` below the best so far) skip the logarithms
  (the vLLM-style exact skip: the noise is bounded, so the draw is unchanged).
* :func:`gumbel_softmax` / :func:`log_gumbel_softmax`: ``softmax(((x - m) + G) / tau)`` with a
  per-chunk online max and normalizer (float64), one exp per element and one scaling pass.
* :func:`sample_seeded`: per-row seeds, position = token id (``offset + j`` for a vocabulary
  shard), optional per-row temperature ``argmax_j (x_j - m) / T + G_j`` (division, so
  ``T -> 0`` gives the greedy limit); ``shift`` replaces ``m`` (the global max over shards) and
  ``return_score`` returns the winning scores, so shard winners merge into the exact draw.
* :func:`top_p_threshold`: exact nucleus threshold in float64 masses without a full sort.
* :func:`kth_largest`: the k-th largest value per row (a top-k threshold) without a sort.
* :func:`sample_kept`: :func:`sample_seeded` with ``min_value``, skipping what cannot win.

Speed: per element, the float32 kernels cost one SplitMix64 hash (two 64-bit multiplies),
two float32 logs and a few operations, in one vectorized loop that also forms the shifted
logit; on AVX-512 CPUs that loop runs on 512-bit registers (set in code, no environment
variable). Many rows of at most ``2**17`` elements run one task per row (the row max, the draw
and both softmax passes read the row from L2); otherwise tasks are (row, block) pairs. Either
way the results are the same bits (docs/benchmarks_fused.md has the figures).

Masked entries (``-inf``) are never drawn and get probability 0 / log-probability ``-inf``.
Every row must have a finite maximum (no NaN, no ``+inf``, not all ``-inf``): validation is
the caller's job (:func:`check_finite_rows` is the data-dependent check, kept in one place).
"""

from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "available",
    "cache_info",
    "check_finite_rows",
    "gumbel_max",
    "gumbel_noise",
    "gumbel_softmax",
    "gumbel_topk",
    "kth_largest",
    "log_gumbel_softmax",
    "mix64_int",
    "sample_kept",
    "sample_seeded",
    "softmax_backward",
    "top_k_sample",
    "top_p_threshold",
]

_MASK64 = (1 << 64) - 1
HINT = "the fused CPU kernels need numba: pip install 'gumbelkit[numba]'"


@lru_cache(maxsize=1)
def _impl() -> ModuleType | None:
    if os.environ.get("GUMBELKIT_NUMBA", "1") == "0":
        return None
    try:
        from . import _cpu_fused_numba
    except ImportError:
        return None
    return _cpu_fused_numba


def available() -> bool:
    """Whether numba imports, so that the fused kernels can run.

    ``GUMBELKIT_NUMBA=0`` in the environment makes it False (the torch path then serves).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _impl() is not None


def _kernels() -> ModuleType:
    impl = _impl()
    if impl is None:
        raise ImportError(HINT)
    return impl


SERIAL_BELOW = 1 << 15  # elements: below this, one thread (waking the pool costs more than it saves)


def _run(name: str, size: int, *args: object) -> object:
    """Call kernel ``name`` on ``torch.get_num_threads()`` threads (one when the input is small).

    The results do not depend on the thread count, so this is only a matter of speed: the
    kernels follow torch's thread setting, and on a busy machine waking a second thread for a
    small input can cost milliseconds.
    """
    impl = _kernels()
    kernel = getattr(impl, name)
    import numba

    threads = 1 if size < SERIAL_BELOW else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    old = numba.get_num_threads()
    if threads == old:
        return kernel(*args)
    numba.set_num_threads(threads)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(old)


def cache_info() -> dict[str, object]:
    """Where numba keeps the compiled kernels: ``{"enabled": bool, "dir": str | None}``.

    numba writes next to the source (``__pycache__``) when that folder is writable, else to
    ``NUMBA_CACHE_DIR`` or the user cache folder (a read-only site-packages install is fine);
    when none is writable the kernels are compiled in every process (``enabled`` False).
    """
    impl = _kernels()
    cache = getattr(impl.noise_fill, "_cache", None)
    path = getattr(cache, "cache_path", None)
    return {"enabled": bool(impl.CACHE_ENABLED and path), "dir": path}


def mix64_int(x: int) -> int:
    """SplitMix64's finalizer on a Python int's low 64 bits (unsigned result).

    Example:
        >>> mix64_int(0), mix64_int(1)
        (0, 6238072747940578789)
    """
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# --------------------------------------------------------------------------- validation


def _as_array(x: object, name: str, ndim: int | None = 2) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; the fused CPU kernels need a CPU tensor")
        x = x.detach().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or CPU tensor, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}; cast it with .astype(np.float32)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D (rows, n), got shape {x.shape}; reshape it to (-1, n)")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name}) or tensor.contiguous()")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x


def _check_seed(seed: object, name: str = "seed") -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"{name} must fit in 64 bits (int64 or uint64), got {seed}")
    return seed


def _check_offset(offset: object) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    return int(offset)


def _key(seed: int) -> np.uint64:
    return np.uint64(mix64_int(seed))


def _out_like(x: np.ndarray, out: object) -> np.ndarray:
    if out is None:
        return np.empty_like(x)
    out = _as_array(out, "out")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have x's shape {x.shape} and dtype {x.dtype}, got {out.shape} {out.dtype}")
    return out


def _per_row(value: object, rows: int, dtype: np.dtype, name: str) -> np.ndarray:
    """A positive per-row parameter (temperature) as an array of ``rows`` values of ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        arr = np.full(rows, value, dtype=dtype)
    elif isinstance(value, np.ndarray):
        if value.shape not in ((rows,), (rows, 1), (), (1,)):
            raise ValueError(f"{name} must be a scalar or have one value per row ({rows},), got {value.shape}")
        arr = np.ascontiguousarray(np.broadcast_to(value.reshape(-1), (rows,)), dtype=dtype)
    else:
        raise TypeError(f"{name} must be a float or an array of per-row floats, got {type(value).__name__}")
    _check_positive(arr, name)
    return arr


def _check_positive(arr: np.ndarray, name: str) -> None:
    """The data-dependent checks of this module (one place, to move into an operator later)."""
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(f"{name} must be positive and finite, got {arr[~(np.isfinite(arr) & (arr > 0))][:4]}")


def check_finite_rows(x: np.ndarray) -> None:
    """Raise ValueError unless every row has no NaN, no ``+inf`` and at least one finite entry.

    The kernels assume it (``-inf`` entries are masked categories); this is the one
    data-dependent check, left to the caller so the hot path stays free of it.
    """
    x = _as_array(x, "x")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("x contains NaN or +inf; the samplers need finite logits or -inf for masked ones")
    if not np.isfinite(x).any(axis=-1).all():
        raise ValueError("x has a row with every entry -inf: there is nothing to sample")


# --------------------------------------------------------------------------- kernels


def gumbel_noise(out: np.ndarray, seed: int, offset: int = 0) -> np.ndarray:
    """Fill ``out`` with the counter noise ``G(seed, offset + i)``, ``i`` its flat index.

    Args:
        out: C-contiguous float32/float64 array, any shape (written in place).
        seed: int (int64 or uint64 range).
        offset: first position (>= 0).

    Returns:
        ``out``. float32 values follow the float32 transform of the module docstring,
        float64 ones equal ``counter_gumbel(seed, positions)`` to an ulp or two.

    Raises:
        TypeError / ValueError: wrong array type, dtype, layout or seed.

    Example:
        >>> from gumbelkit._counter_noise import counter_gumbel
        >>> g = gumbel_noise(np.empty((2, 3), np.float64), seed=7)
        >>> ref = counter_gumbel(torch.tensor(7), torch.arange(6)).numpy().reshape(2, 3)
        >>> bool(np.allclose(g, ref, rtol=1e-15, atol=0))
        True
    """
    out = _as_array(out, "out", ndim=None)
    seed = _check_seed(seed)
    offset = _check_offset(offset)
    _run("noise_fill", out.size, out.reshape(-1), _key(seed), offset)
    return out


def gumbel_max(x: np.ndarray, seed: int, offset: int = 0, *, skip: bool = True) -> np.ndarray:
    """Gumbel-Max per row: ``argmax_j (x_j - max x) + G(seed, offset + r n + j)``.

    Draws index ``j`` with probability ``softmax(x)_j`` (Gumbel 1954; Maddison et al. 2014),
    ties to the lowest index.

    Args:
        x: C-contiguous (rows, n) float32/float64 logits; ``-inf`` masks a category.
        seed, offset: the noise stream and its first position (see the module docstring).
        skip: skip chunks that cannot win (exact; no effect on the result).

    Returns:
        int64 array (rows,).

    Raises:
        TypeError / ValueError: wrong array type, dtype, layout, seed or offset.

    Example:
        >>> x = np.array([[0.0, -np.inf, 0.0], [1e7, 1e7, -1.0]], np.float32)
        >>> ids = gumbel_max(x, seed=3)
        >>> ids.dtype, ids.shape, int(ids[0]) in (0, 2), int(ids[1]) in (0, 1)
        (dtype('int64'), (2,), True, True)
    """
    x = _as_array(x, "x")
    key = np.array([_key(_check_seed(seed))], dtype=np.uint64)
    temps = np.ones(1, dtype=x.dtype)
    offset = _check_offset(offset)
    scores = np.empty(x.shape[0], dtype=x.dtype)
    return _run(
        "argmax_perturbed", x.size, x, key, False, offset, temps, False, bool(skip), temps, False, temps, False, scores
    )


def sample_seeded(
    x: np.ndarray,
    row_seeds: np.ndarray | torch.Tensor,
    temperature: object = None,
    *,
    min_value: np.ndarray | None = None,
    skip: bool = True,
    offset: int = 0,
    shift: np.ndarray | None = None,
    return_score: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Seeded, batch-invariant sampling: ``argmax_j (x_j - m_r) / T_r + G(seed_r, offset + j)``.

    The position of token ``j`` is its token id ``offset + j`` under row ``r``'s own seed, so a
    row's draw depends only on its seed and its logits: alone or in any batch, on any thread
    count. The noise is ``counter_gumbel(seed_r, offset + j)`` of the torch reference (module
    docstring). ``m_r`` is the row maximum, or ``shift[r]`` when given.

    Vocabulary sharding: a row split into shards ``x[:, a:b]`` sampled with ``offset=a``,
    the same ``shift`` (the global row max, equal to ``m_r`` of the whole row) and
    ``return_score=True`` gives per-shard winners and scores; the winner of the shard with the
    largest score (the lowest ``offset`` on equal scores) is exactly the whole row's draw,
    because every element's score is the same float either way.

    Args:
        x: C-contiguous (rows, n) float32/float64 logits; ``-inf`` masks a token.
        row_seeds: int64 (rows,) array or tensor, one seed per row.
        temperature: None (1), a positive float or a (rows,) array of them.
        min_value: optional (rows,) array: entries with ``x < min_value[r]`` are masked in
            the same pass (the ``threshold`` of :func:`top_p_threshold`, a top-k or min-p cut).
        skip: skip chunks that cannot win (exact).
        offset: token id of column 0 (>= 0): column ``j`` gets the noise of position
            ``offset + j``.
        shift: optional (rows,) finite floats used instead of the row max; the caller
            guarantees ``shift[r] >= x[r, j]`` for every unmasked ``j`` (e.g. the max over all
            shards). Cast to x's dtype (rounding keeps the guarantee).
        return_score: also return the winning scores.

    Returns:
        int64 token ids (rows,) (column indices, add ``offset`` for token ids), or with
        ``return_score`` the pair ``(ids, scores)``: scores of x's dtype (rows,), the exact
        value ``(x_j - m_r) / T_r + G`` the kernel compared for the winner (``-inf`` when
        every entry of the row is masked; the id is then meaningless).

    Raises:
        TypeError / ValueError: bad arrays, a seed count that differs from rows, T <= 0,
            a negative offset, a shift of the wrong shape or not finite.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
        >>> seeds = np.array([11, 12, 13])
        >>> batch = sample_seeded(x, seeds, temperature=0.7)
        >>> alone = sample_seeded(x[1:2].copy(), seeds[1:2], temperature=0.7)
        >>> bool(alone[0] == batch[1])  # batch-invariant
        True
        >>> m = x.max(axis=1)  # two vocabulary shards, the global max as shift
        >>> ia, sa = sample_seeded(x[:, :600].copy(), seeds, 0.7, shift=m, return_score=True)
        >>> ib, sb = sample_seeded(x[:, 600:].copy(), seeds, 0.7, offset=600, shift=m, return_score=True)
        >>> bool(np.array_equal(np.where(sb > sa, ib + 600, ia), batch))
        True
    """
    x = _as_array(x, "x")
    rows = x.shape[0]
    if isinstance(row_seeds, torch.Tensor):
        row_seeds = row_seeds.detach().cpu().numpy()
    if not isinstance(row_seeds, np.ndarray) or row_seeds.dtype != np.int64:
        raise TypeError("row_seeds must be an int64 array or tensor; convert it with .astype(np.int64)")
    if row_seeds.shape not in ((rows,), (rows, 1)):
        raise ValueError(f"row_seeds must have one seed per row ({rows},), got {row_seeds.shape}")
    offset = _check_offset(offset)
    seeds = np.ascontiguousarray(row_seeds.reshape(-1)).view(np.uint64)
    keys = _kernels().mix64_array(seeds)
    if temperature is None:
        temps, use = np.ones(rows, dtype=x.dtype), False
    else:
        temps, use = _per_row(temperature, rows, x.dtype, "temperature"), True
    lows, use_low = _row_values(min_value, rows, x.dtype, "min_value", temps)
    shifts, use_shift = _row_values(shift, rows, x.dtype, "shift", temps)
    if use_shift and not np.all(np.isfinite(shifts)):
        raise ValueError("shift must be finite (the max over the unmasked logits of each row)")
    scores = np.empty(rows, dtype=x.dtype)
    args = (keys, True, offset, temps, use, bool(skip), lows, use_low, shifts, use_shift, scores)
    ids = _run("argmax_perturbed", x.size, x, *args)
    return (ids, scores) if return_score else ids


def _row_values(value: object, rows: int, dtype: np.dtype, name: str, unused: np.ndarray) -> tuple[np.ndarray, bool]:
    """An optional per-row array as ``(array of dtype, True)``; ``(unused, False)`` for None."""
    if value is None:
        return unused, False
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.shape not in ((rows,), (rows, 1)):
        raise ValueError(f"{name} must have one value per row ({rows},), got {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=dtype), True


def _softmax(
    x: np.ndarray, seed: int, tau: object, out: object, offset: int, mode: int
) -> tuple[np.ndarray, np.ndarray]:
    x = _as_array(x, "x")
    seed = _check_seed(seed)
    offset = _check_offset(offset)
    taus = _per_row(tau, x.shape[0], x.dtype, "tau")
    out = _out_like(x, out)
    argmax = _run("softmax_perturbed", x.size, x, _key(seed), offset, taus, out, mode)
    return out, argmax


def gumbel_softmax(
    x: np.ndarray, seed: int, tau: object = 1.0, out: np.ndarray | None = None, hard: bool = False, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Fused Gumbel-Softmax forward: :math:`y = \mathrm{softmax}(((x - m) + G) / \tau)` per row.

    Jang et al. 2017, Maddison et al. 2017. ``G = G(seed, offset + r n + j)`` as in
    :func:`gumbel_max` (the same noise, so ``argmax`` equals ``gumbel_max(x, seed, offset)``).

    Args:
        x: C-contiguous (rows, n) float32/float64 logits; ``-inf`` entries get ``y = 0``.
        seed, offset: the noise stream.
        tau: positive temperature, a float or one per row.
        out: optional output array (x's shape and dtype).
        hard: write the one-hot of the argmax instead of the soft sample (no exp at all);
            a straight-through estimator needs the soft sample, so it calls with False and
            builds the one-hot from the returned argmax.

    Returns:
        ``(y, argmax)``: y of x's dtype and shape, argmax int64 (rows,).

    Raises:
        TypeError / ValueError: bad arrays or seed, tau not positive and finite, bad ``out``.

    Example:
        >>> x = np.log(np.array([[0.2, 0.3, 0.5]], np.float32))
        >>> y, a = gumbel_softmax(x, seed=5, tau=0.5)
        >>> bool(abs(y.sum() - 1) < 1e-6), bool(a[0] == gumbel_max(x, seed=5)[0] == y.argmax())
        (True, True)
    """
    return _softmax(x, seed, tau, out, offset, 2 if hard else 0)


def log_gumbel_softmax(
    x: np.ndarray, seed: int, tau: object = 1.0, out: np.ndarray | None = None, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Fused :math:`\log \mathrm{softmax}(((x - m) + G) / \tau)` per row (``-inf`` stays ``-inf``).

    Same arguments as :func:`gumbel_softmax`; returns ``(log_y, argmax)``.
    """
    return _softmax(x, seed, tau, out, offset, 1)


def softmax_backward(y: np.ndarray, grad: np.ndarray, tau: object = 1.0) -> np.ndarray:
    r"""The Gumbel-Softmax (softmax) backward, fused: :math:`y (g - \langle g, y \rangle) / \tau` per row.

    Two passes over ``y`` and ``g`` (the row's inner product, summed in float64, then the
    write) where the torch formula makes four; used by the eager backward when no graph of
    the gradient is built (:mod:`gumbelkit._kernels.gumbel_softmax`).

    Args:
        y: C-contiguous (rows, n) float32/float64 softmax output.
        grad: the upstream gradient, same shape and dtype.
        tau: positive temperature, a float or one per row.

    Returns:
        The gradient with respect to the logits, a new array like ``y``.

    Example:
        >>> y = np.array([[0.25, 0.75]]); g = np.array([[1.0, 0.0]])
        >>> softmax_backward(y, g, 0.5).round(4).tolist()
        [[0.375, -0.375]]
    """
    y = _as_array(y, "y")
    grad = _as_array(grad, "grad")
    if grad.shape != y.shape or grad.dtype != y.dtype:
        raise ValueError(f"grad must match y ({y.shape}, {y.dtype}), got {grad.shape}, {grad.dtype}")
    taus = _per_row(tau, y.shape[0], np.float64, "tau")
    return _run("softmax_backward", y.size, y, grad, taus, np.empty_like(y))


def perturbed_logits(x: np.ndarray, seed: int, offset: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """``(x - max x) + G(seed, offset + r n + j)`` per row (the scores Gumbel-top-k sorts)."""
    x = _as_array(x, "x")
    out = _out_like(x, out)
    _run("perturb", x.size, x, _key(_check_seed(seed)), _check_offset(offset), out)
    return out


def gumbel_topk(x: np.ndarray, seed: int, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-k: the ``k`` largest perturbed scores per row, in decreasing order.

    The indices are a Plackett-Luce draw of ``k`` categories without replacement (Yellott
    1977; Kool et al. 2019). The fused noise pass feeds ``torch.topk`` (fusing the selection
    did not pay at the sizes measured).

    Returns:
        ``(values, indices)``: float (rows, k) of the shifted scores ``(x - max x) + G``,
        int64 (rows, k).
    """
    x = _as_array(x, "x")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be an int in [1, {x.shape[1]}], got {k!r}")
    v = perturbed_logits(x, seed, offset)
    values, indices = torch.topk(torch.from_numpy(v), int(k), dim=-1)
    return values.numpy(), indices.numpy()


def top_p_threshold(
    x: np.ndarray,
    p: float | np.ndarray,
    *,
    probs: bool = False,
    temperature: object = None,
    min_value: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Exact nucleus (top-p) threshold per row without sorting the vocabulary.

    With weights :math:`w = e^{(x - \max x) / T}` in float64 (or ``w = x`` when ``probs``)
    over the entries with ``x >= min_value`` (the others are out, as after a top-k cut) and
    :math:`Z = \sum w`, token ``i`` is kept iff :math:`\sum_{w_j > w_i} w_j < p Z`: the most
    probable tokens until their mass reaches ``p``; the token that crosses ``p`` is kept and so
    is every token tied with it (gumbelkit's convention, Holtzman et al. 2020). transformers'
    ``TopPLogitsWarper`` keeps the same set except at ties with the crossing token, where
    its choice depends on the sort order (it can keep only some of them). A pivot search
    (quickselect with median-of-three pivots, after dropping every weight below
    ``(1 - p) Z / n``, which can never be kept) finds the smallest kept value in expected
    linear time; a sort finishes rows where pivots keep failing. ``Z`` is summed in an order
    that depends on ``n`` only, so a row's threshold does not depend on the batch.

    Args:
        x: C-contiguous (rows, n) float32/float64 logits (``-inf`` = masked) or probabilities.
        p: float in (0, 1], or a (rows,) array of them.
        probs: ``x`` holds (possibly unnormalized) probabilities instead of logits.
        temperature: None (1), a positive float or a (rows,) array (logits only).
        min_value: optional (rows,) array: entries below it are not part of the row.

    Returns:
        ``(threshold, count)``: float64 (rows,) smallest kept value of ``x`` (keep
        ``x >= threshold``) and int64 (rows,) number of kept tokens.

    Raises:
        ValueError: p outside (0, 1], bad shapes. TypeError: bad array types.

    Example:
        >>> x = np.log(np.array([[0.5, 0.3, 0.2], [0.7, 0.15, 0.15]], np.float32))
        >>> threshold, count = top_p_threshold(x, 0.8)
        >>> count.tolist()  # row 0: 0.5 + 0.3 reaches 0.8; row 1: both tokens tied at 0.15 kept
        [2, 3]
    """
    x = _as_array(x, "x")
    rows = x.shape[0]
    if isinstance(p, np.ndarray):
        ps = _row_array(p, rows, np.float64, "p")
        if not np.all((ps > 0) & (ps <= 1)):
            raise ValueError(f"p must lie in (0, 1], got {ps[~((ps > 0) & (ps <= 1))][:4]}")
    elif isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p must be a float in (0, 1], got {p!r}")
    else:
        ps = np.full(rows, float(p))
    temps = np.ones(rows) if temperature is None else _per_row(temperature, rows, np.float64, "temperature")
    floors = np.full(rows, -np.inf) if min_value is None else _row_array(min_value, rows, np.float64, "min_value")
    return top_p_rows(x, ps, temps, floors, np.full(rows, np.nan), bool(probs))


def _row_array(value: object, rows: int, dtype: type, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape not in ((rows,), (rows, 1)):
        raise ValueError(f"{name} must have one value per row ({rows},), got {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=dtype)


def top_p_rows(
    x: np.ndarray, ps: np.ndarray, temps: np.ndarray, floors: np.ndarray, row_max: np.ndarray, probs: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_p_threshold` on checked float64 (rows,) arrays, without the checks (for
    :func:`gumbelkit.sample`): ``ps[r] > 1`` turns the row off (threshold ``-inf``),
    ``row_max[r]`` NaN means "compute it"."""
    thresholds = np.empty(x.shape[0], dtype=np.float64)
    counts = np.empty(x.shape[0], dtype=np.int64)
    _run("top_p_rows", x.size, x, ps, temps, floors, row_max, bool(probs), thresholds, counts)
    return thresholds, counts


def kth_largest(x: np.ndarray, k: object) -> np.ndarray:
    """The k-th largest value of each row, counting repeats: ``torch.topk(x, k).values[:, -1]``.

    A streaming selection (a min-heap of the k best values per row and block, skipping every
    256-element stretch whose maximum does not beat the heap's minimum, so after a short
    warm-up it costs about one read of the row), parallel over rows and blocks of long rows.

    Args:
        x: C-contiguous (rows, n) float32/float64 array without NaN.
        k: int or (rows,) int array, ``1 <= k <= n`` (``k <= 0`` in an array gives ``-inf``).

    Returns:
        (rows,) array of x's dtype.

    Raises:
        ValueError: ``k > n``, bad shapes. TypeError: bad array types.

    Example:
        >>> x = np.array([[3.0, 1.0, 3.0, 2.0]], np.float32)
        >>> kth_largest(x, 2).tolist(), kth_largest(x, 3).tolist()  # ties count
        ([3.0], [2.0])
    """
    x = _as_array(x, "x")
    rows, n = x.shape
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer, np.ndarray)):
        raise TypeError(f"k must be an int or an int array, got {type(k).__name__}")
    ks = np.full(rows, int(k), dtype=np.int64) if not isinstance(k, np.ndarray) else _row_array(k, rows, np.int64, "k")
    if ks.max() > n or (not isinstance(k, np.ndarray) and ks[0] < 1):
        raise ValueError(f"k must lie in [1, {n}], got {k!r}")
    return kth_largest_rows(x, ks)


def kth_largest_rows(x: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """:func:`kth_largest` on a checked (rows,) int64 ``ks``, without the checks."""
    out = np.empty(x.shape[0], dtype=x.dtype)
    _run("kth_largest_rows", x.size, x, ks, _block(x), out)
    return out


def _block(x: np.ndarray) -> int:
    """Elements per parallel task of the selection kernels: whole rows when there are enough
    rows to keep the threads busy, else blocks (the results do not depend on it)."""
    rows, n = x.shape
    return n if rows >= 4 * max(1, torch.get_num_threads()) else max(4096, min(n, 16384))


def sample_kept(
    x: np.ndarray,
    keys: np.ndarray,
    row_max: np.ndarray,
    temperature: np.ndarray,
    min_value: np.ndarray,
) -> np.ndarray:
    """``argmax_j (x_j - m_r) / T_r + G(seed_r, j)`` over ``x_j >= min_value[r]``: the token of
    :func:`sample_seeded` with ``min_value``, bit for bit, with the row maxima given and
    stretches of the row that cannot win skipped (all below ``min_value``, or too low to win
    with the largest noise), so a small kept set costs about one read of the row.

    No checks (for :func:`gumbelkit.sample`): ``x`` C-contiguous float32/float64, ``keys`` the
    uint64 ``mix64(seed)`` of each row (``mix64_array``), the other arrays (rows,) of x's dtype
    with ``T > 0`` and ``min_value <= m``.
    """
    return _run("sample_above", x.size, x, keys, row_max, temperature, min_value, _block(x))


def row_keys(seeds: np.ndarray) -> np.ndarray:
    """The uint64 kernel keys ``mix64(seed)`` of int64 row seeds."""
    return _kernels().mix64_array(np.ascontiguousarray(seeds).view(np.uint64))


def top_k_sample(
    x: np.ndarray, ks: np.ndarray, keys: np.ndarray, row_max: np.ndarray, temperature: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k sampling, selection and draw in one pass per row: ``(ids, thresholds)`` with
    ``thresholds`` the :func:`kth_largest` values and ``ids`` :func:`sample_kept`'s tokens over
    ``x >= thresholds`` (the same scores: the same tokens). Parallel over rows only (for few
    long rows, :func:`kth_largest` and :func:`sample_kept` split the rows into blocks).

    No checks (for :func:`gumbelkit.sample`): ``1 <= ks[r] <= n`` int64, the other arguments
    as for :func:`sample_kept`.
    """
    thresholds = np.empty(x.shape[0], dtype=x.dtype)
    ids = _run("top_k_sample_rows", x.size, x, ks, keys, row_max, temperature, thresholds)
    return ids, thresholds

"""numba kernels behind :mod:`gumbelkit._kernels.cpu_fused` (imports numba at import time).

Only :mod:`gumbelkit._kernels.cpu_fused` imports this module, lazily; see its docstring for
the noise contract and the kernel API. Everything here works on C-contiguous 2-D numpy
arrays and assumes validated arguments.

Layout of the parallel loops: a row of length ``n`` is cut into blocks of ``BLOCK`` elements
(a fixed number, independent of the thread count), and ``prange`` runs over the
``rows * blocks`` (row, block) tasks, so few long rows still use every thread. Inside a task
the elements are handled in chunks of ``CHUNK`` held in an L1-resident buffer: one
vectorized loop fills the buffer (counter hash, Gumbel transform, shifted logit), then small
reductions read it. The noise loops carry ``_wide_vectors()``, which lets LLVM use 512-bit
registers on AVX-512 CPUs. Every floating-point reduction has a fixed order that depends on ``n``
only, so results are bit-identical whatever the number of threads.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

BLOCK = 16384  # elements per parallel task (fixed: results must not depend on the thread count)
CHUNK = 512  # elements per L1 buffer inside a task
G_MAX = 37.0  # every noise value is <= -log(-log(1 - 2**-53)) = 36.737, in float32 and float64

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S63 = np.uint64(63)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)

# Helpers: no reassociation (it would break Cody-Waite splits and the exact shift x - m),
# contraction to FMA allowed. Reductions get their own flags below.
_HELPER_MATH = {"contract"}
_REDUCE_MATH = {"reassoc", "nsz", "nnan", "contract"}

CACHE_ENABLED = True


def _jit(**kwargs):
    """``njit(cache=True, error_model="numpy", **kwargs)``, without the cache when numba has
    nowhere writable to put it (a read-only install with an unwritable home and no
    ``NUMBA_CACHE_DIR``): compiling on every import beats failing to import."""

    def wrap(func):
        global CACHE_ENABLED
        try:
            return njit(cache=CACHE_ENABLED, error_model="numpy", **kwargs)(func)
        except RuntimeError as err:  # "cannot cache function ...: no locator available"
            if "cache" not in str(err):
                raise
            CACHE_ENABLED = False
            warnings.warn(
                f"gumbelkit: numba cannot cache its compiled kernels ({err}); they are compiled "
                "on first use in every process. Set NUMBA_CACHE_DIR to a writable folder.",
                RuntimeWarning,
                stacklevel=2,
            )
            return njit(cache=False, error_model="numpy", **kwargs)(func)

    return wrap


# --------------------------------------------------------------------------- bit casts


@intrinsic
def _f32_to_i32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _i32_to_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of an integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _i64_to_f64(typingctx, x):
    """The float64 whose bits are those of a 64-bit integer."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(x), codegen


@intrinsic
def _fmax(typingctx, a, b):
    """llvm.maxnum (with nnan): the max that LLVM vectorizes as a reduction; numba's max()
    and ``a if a > b else b`` stay scalar (about 1.3 ns per element against 0.05)."""
    if a != b or not isinstance(a, types.Float):
        return None

    def codegen(context, builder, signature, args):
        lt = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lt], ir.FunctionType(lt, [lt, lt]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


@intrinsic
def _split32(typingctx, x):
    """(m, e) with x = m 2**(e - 127), m in [1, 2), e a float, for a positive normal float32,
    in 32-bit integer IR (numba would widen int32 arithmetic to int64)."""
    if x != types.float32:
        return None
    sig = types.UniTuple(types.float32, 2)(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        i = builder.bitcast(args[0], i32)
        e = builder.sitofp(builder.lshr(i, ir.Constant(i32, 23)), ir.FloatType())
        mb = builder.or_(builder.and_(i, ir.Constant(i32, 0x7FFFFF)), ir.Constant(i32, 0x3F800000))
        m = builder.bitcast(mb, ir.FloatType())
        return context.make_tuple(builder, signature.return_type, [m, e])

    return sig, codegen


@intrinsic
def _pow2f(typingctx, n):
    """2**n for an integer-valued float32 n in [-126, 127] (32-bit integer IR)."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k = builder.fptosi(args[0], i32)
        b = builder.shl(builder.add(k, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(b, ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers on AVX-512 targets.

    LLVM's x86 cost model prefers 256-bit vectors on AVX-512 CPUs (``prefer-vector-width=256``,
    against frequency drops on old Xeons), so numba's loops run on ymm registers while the
    64-bit multiplies of the hash already need zmm (and a core that runs 512-bit instructions
    turns off one of its 256-bit vector ports). These function attributes (what clang's
    ``-mprefer-vector-width=512`` sets) make the noise loops 1.5x faster on a Sapphire/Emerald
    Rapids Xeon. Nothing is changed on targets without AVX-512F, or when llvmlite's internals
    differ from what this expects (the attributes are only a speed hint).
    """

    def codegen(context, builder, signature, args):
        try:
            features = getattr(context.codegen(), "_tm_features", "") or ""
            if "+avx512f" in features.split(","):
                attrs = builder.function.attributes
                set.add(attrs, '"prefer-vector-width"="512"')  # bypasses llvmlite's list of known flags
                set.add(attrs, '"min-legal-vector-width"="512"')
        except Exception:  # pragma: no cover - a speed hint only
            pass
        return context.get_dummy_value()

    return types.none(), codegen


# --------------------------------------------------------------------------- elementary functions


@_jit(fastmath=_HELPER_MATH)
def log32(x):
    """Natural log of a positive normal float32 (Cephes ``logf``: range reduction on the float's
    bits to m in [sqrt(1/2), sqrt(2)), degree-9 polynomial, ln 2 split in two parts)."""
    m, eb = _split32(x)
    big = m > np.float32(1.41421356)
    m = m * np.float32(0.5) if big else m
    ef = eb - np.float32(126.0) if big else eb - np.float32(127.0)
    f = m - np.float32(1.0)
    z = f * f
    p = np.float32(7.0376836292e-2)
    p = p * f + np.float32(-1.1514610310e-1)
    p = p * f + np.float32(1.1676998740e-1)
    p = p * f + np.float32(-1.2420140846e-1)
    p = p * f + np.float32(1.4249322787e-1)
    p = p * f + np.float32(-1.6668057665e-1)
    p = p * f + np.float32(2.0000714765e-1)
    p = p * f + np.float32(-2.4999993993e-1)
    p = p * f + np.float32(3.3333331174e-1)
    y = p * f * z
    y = y + ef * np.float32(-2.12194440e-4)
    y = y - np.float32(0.5) * z
    r = f + y
    return r + ef * np.float32(0.693359375)


@_jit(fastmath=_HELPER_MATH)
def exp32(x):
    """exp of a float32 <= 88.7 (Cephes ``expf``), gradual underflow to 0 below -103.97; -inf
    gives 0. The power of two is applied in two halves so subnormal results round once."""
    x = max(x, np.float32(-104.0))
    x = min(x, np.float32(88.7))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    n1 = np.floor(n * np.float32(0.5))
    return y * _pow2f(n1) * _pow2f(n - n1)


@_jit(fastmath=_HELPER_MATH)
def exp64(x):
    """exp of a float64 <= 709 (degree-13 Taylor polynomial on |r| <= ln2/2 after Cody-Waite
    reduction, about 1 ulp), gradual underflow to 0 below -745.2; -inf gives 0."""
    x = max(x, -746.0)
    x = min(x, 709.0)
    n = math.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 6.93145751953125e-1
    r = r - n * 1.42860682030941723212e-6
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    y = p * r * r + r + 1.0
    ni = np.int64(n)
    n1 = ni >> np.int64(1)
    n2 = ni - n1
    s1 = _i64_to_f64((n1 + np.int64(1023)) << np.int64(52))
    s2 = _i64_to_f64((n2 + np.int64(1023)) << np.int64(52))
    return y * s1 * s2


def _exp(x):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_exp)
def _exp_impl(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: exp64(x)


def _like(v, proto):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_like)
def _like_impl(v, proto):
    if proto == types.float32:
        return lambda v, proto: np.float32(v)
    return lambda v, proto: np.float64(v)


# --------------------------------------------------------------------------- counter noise


@_jit()
def mix64(z):
    """SplitMix64's finalizer (Stafford's Mix13) on a uint64."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@_jit()
def mix64_array(seeds):
    """mix64 of every uint64 in a 1-D array (the per-row keys)."""
    out = np.empty_like(seeds)
    for i in range(seeds.shape[0]):
        out[i] = mix64(seeds[i])
    return out


@_jit(fastmath=_HELPER_MATH, inline="always")
def gumbel32_from_hash(h):
    """float32 G = -log(-log U), U = (2 floor(h / 2**12) + 1) 2**-53, keeping U's 52-bit tail.

    The smaller of U and V = 1 - U is formed from the bits with full relative precision:
    X = ((b >> 11) | 1) 2**-53 with b = h, or ~h when h's top bit is set (then X = V).
    E = -log U is -log X when X = U, and -log1p(-X) when X = V, the latter as
    -log(w) + (X - t) / w with w = fl(1 - X), t = 1 - w (exact), X - t (exact: the rounding
    error of w) and 1 / w ~ 1 + t + t**2 (the correction is at most 2**-25, so this suffices).
    Inlined into the kernels' loops at numba's IR level (``inline="always"``: LLVM's inliner
    finds the two logs too large, and a call per element does not vectorize).
    """
    msb = h >> _S63
    b = h ^ (_ZERO - msb)
    n = (b >> _S11) | _ONE
    x = np.float32(np.int64(n)) * np.float32(1.1102230246251565e-16)  # 2**-53
    w = np.float32(1.0) - x
    upper = msb != _ZERO
    a = w if upper else x
    lg = log32(a)
    t = np.float32(1.0) - w
    corr = (x - t) * (np.float32(1.0) + t * (np.float32(1.0) + t))
    e = -lg + corr if upper else -lg
    return -log32(e)


@_jit(inline="always")
def gumbel64_from_hash(h):
    """float64 G = -log(-log U), U = (2 floor(h / 2**12) + 1) 2**-53 (exact in float64)."""
    n = (h >> _S11) | _ONE
    u = np.float64(np.int64(n)) * 1.1102230246251565e-16
    return -math.log(-math.log(u))


@_jit(fastmath=_HELPER_MATH)
def noise32_chunk(buf, key, pos0, length):
    """buf[j] = float32 G(key, pos0 + j) for j < length (gumbel32_from_hash inlined into a
    loop that LLVM vectorizes; the counter advances by an addition, not a multiply)."""
    _wide_vectors()
    z = key + np.uint64(pos0) * _GAMMA
    for j in range(length):
        buf[j] = gumbel32_from_hash(mix64(z))
        z += _GAMMA


@_jit()
def noise64_chunk(buf, key, pos0, length):
    """buf[j] = float64 G(key, pos0 + j) for j < length."""
    _wide_vectors()
    z = key + np.uint64(pos0) * _GAMMA
    for j in range(length):
        buf[j] = gumbel64_from_hash(mix64(z))
        z += _GAMMA


def _gumbel(h, proto):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_gumbel, inline="always")
def _gumbel_impl(h, proto):
    if proto == types.float32:
        return lambda h, proto: gumbel32_from_hash(h)
    return lambda h, proto: gumbel64_from_hash(h)


@_jit()
def gumbel_of_hashes(hashes, out):
    """out[i] = G from the hash hashes[i] (float32 or float64 transform by out's dtype)."""
    for i in range(hashes.shape[0]):
        out[i] = _gumbel(hashes[i], out[0])
    return out


@_jit()
def log32_array(x, out):
    for i in range(x.shape[0]):
        out[i] = log32(x[i])
    return out


@_jit()
def exp_array(x, out):
    for i in range(x.shape[0]):
        out[i] = _exp(x[i])
    return out


def _noise_chunk(buf, key, pos0, length):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_noise_chunk)
def _noise_chunk_impl(buf, key, pos0, length):
    if buf.dtype == types.float32:
        return lambda buf, key, pos0, length: noise32_chunk(buf, key, pos0, length)
    return lambda buf, key, pos0, length: noise64_chunk(buf, key, pos0, length)


# --------------------------------------------------------------------------- reductions


@_jit(fastmath=_REDUCE_MATH)
def _buf_max(buf, length):
    _wide_vectors()
    m = buf[0]
    for j in range(1, length):
        m = _fmax(m, buf[j])
    return m


@_jit(fastmath=_REDUCE_MATH)
def _buf_sum64(buf, length):
    _wide_vectors()
    s = 0.0
    for j in range(length):
        s += np.float64(buf[j])
    return s


@_jit()
def _first_index(buf, length, value):
    for j in range(length):
        if buf[j] == value:
            return j
    return -1


ROW_TASKS_MIN_ROWS = 8  # at least this many rows ...
ROW_TASK_MAX_N = 1 << 17  # ... of at most this many elements: one task per row


@_jit()
def _whole_rows(rows, n):
    """Whether a task takes a whole row (many rows of at most 512 KiB of float32): it then reads
    its row for the row max and again from L2 for the draw, instead of a separate pass over the
    whole array from memory. Results do not depend on it (the reductions are per chunk)."""
    return rows >= ROW_TASKS_MIN_ROWS and n <= ROW_TASK_MAX_N


@_jit(parallel=True)
def row_max(x):
    """Row maxima of a 2-D array (blocked, parallel over (row, block))."""
    rows, n = x.shape
    nblk = (n + BLOCK - 1) // BLOCK
    part = np.empty(rows * nblk, dtype=x.dtype)
    for t in prange(rows * nblk):
        r = t // nblk
        lo = (t % nblk) * BLOCK
        hi = min(n, lo + BLOCK)
        part[t] = _buf_max(x[r, lo:hi], hi - lo)
    out = np.empty(rows, dtype=x.dtype)
    for r in range(rows):
        out[r] = _buf_max(part[r * nblk : (r + 1) * nblk], nblk)
    return out


# --------------------------------------------------------------------------- kernels


@_jit(parallel=True)
def noise_fill(flat, key, offset):
    """flat[i] = G(key, offset + i) for a 1-D contiguous array."""
    n = flat.shape[0]
    nblk = (n + BLOCK - 1) // BLOCK
    for t in prange(nblk):
        lo = t * BLOCK
        hi = min(n, lo + BLOCK)
        for c in range(lo, hi, CHUNK):
            length = min(CHUNK, hi - c)
            _noise_chunk(flat[c : c + length], key, offset + c, length)
    return flat


@_jit(fastmath=_HELPER_MATH)
def _fill_perturbed(buf, xrow, lo, length, shift, inv_t, key, pos0):
    """buf[j] = (xrow[lo + j] - shift) * inv_t + G(key, pos0 + j), in one vectorized loop."""
    _wide_vectors()
    z = key + np.uint64(pos0) * _GAMMA
    for j in range(length):
        buf[j] = (xrow[lo + j] - shift) * inv_t + _gumbel(mix64(z), shift)
        z += _GAMMA


@_jit(fastmath=_HELPER_MATH)
def _fill_perturbed_div(buf, xrow, lo, length, shift, tau, key, pos0):
    """buf[j] = (xrow[lo + j] - shift) / tau + G(key, pos0 + j) (exact T -> 0 limit)."""
    _wide_vectors()
    z = key + np.uint64(pos0) * _GAMMA
    for j in range(length):
        buf[j] = (xrow[lo + j] - shift) / tau + _gumbel(mix64(z), shift)
        z += _GAMMA


@_jit()
def _merge_block_winners(best_v, best_i, rows, nblk, scores):
    """Per row, the winner over its ``nblk`` blocks' winners (``best_i < 0``: the block had
    none): the largest score, ties to the earlier block, i.e. the lowest index. Writes the
    winning score to ``scores`` and returns the int64 indices (-1 where no block had one)."""
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        bv = -np.inf
        bi = -1
        for b in range(nblk):
            v = best_v[r * nblk + b]
            i = best_i[r * nblk + b]
            if i >= 0 and (bi < 0 or v > bv):
                bv = v
                bi = i
        out[r] = bi
        scores[r] = bv
    return out


@_jit(parallel=True)
def argmax_perturbed(x, keys, key_by_row, offset, temps, use_temp, skip, lows, use_low, shifts, use_shift, scores):
    """Per row, argmax_j ((x_j - m) / T + G(key, position)), ties to the lowest index.

    ``key_by_row``: the key of row r is keys[r] and the position of x[r, j] is offset + j
    (per-row seeds); else keys[0] and position offset + r * n + j (one stream over the flat
    array). ``use_shift``: m = shifts[r] instead of the row max. ``scores[r]`` receives the
    winning value (the exact float compared; -inf when every entry is masked).
    ``skip``: skip chunks whose best possible value max_j (x_j - m) / T + G_MAX is below the
    best found so far (exact: no noise value exceeds G_MAX). ``use_low``: entries with
    x < lows[r] are masked (a top-p / top-k / min-p threshold applied in the same pass).
    """
    rows, n = x.shape
    whole = _whole_rows(rows, n)
    if use_shift:
        m = shifts
    elif whole:
        m = np.empty(rows, dtype=x.dtype)  # each task takes its row's max itself
    else:
        m = row_max(x)
    bl = n if whole else BLOCK
    nblk = (n + bl - 1) // bl
    best_v = np.empty(rows * nblk, dtype=x.dtype)
    best_i = np.empty(rows * nblk, dtype=np.int64)
    gmax = _like(G_MAX, x[0, 0])
    for t in prange(rows * nblk):
        r = t // nblk
        lo = (t % nblk) * bl
        hi = min(n, lo + bl)
        buf = np.empty(CHUNK, dtype=x.dtype)
        xr = x[r]
        mr = _buf_max(xr, n) if whole and not use_shift else m[r]
        tau = temps[r] if use_temp else _like(1.0, x[0, 0])
        key = keys[r] if key_by_row else keys[0]
        pos_row = offset if key_by_row else offset + r * n
        bv = -np.inf
        bi = -1
        for c in range(lo, hi, CHUNK):
            length = min(CHUNK, hi - c)
            if skip and bi >= 0:
                cmx = _buf_max(xr[c : c + length], length)
                if (cmx - mr) / tau + gmax < bv:
                    continue
            if use_temp:
                _fill_perturbed_div(buf, xr, c, length, mr, tau, key, pos_row + c)
            else:
                _fill_perturbed(buf, xr, c, length, mr, _like(1.0, x[0, 0]), key, pos_row + c)
            if use_low:
                low = lows[r]
                for j in range(length):
                    buf[j] = buf[j] if xr[c + j] >= low else -np.inf
            cm = _buf_max(buf, length)
            if cm > bv or bi < 0:
                idx = _first_index(buf, length, cm)
                if idx >= 0:
                    bv = cm
                    bi = c + idx
        best_v[t] = bv
        best_i[t] = bi
    return _merge_block_winners(best_v, best_i, rows, nblk, scores)


@_jit(parallel=True)
def perturb(x, key, offset, out):
    """out[r, j] = (x[r, j] - m_r) + G(key, offset + r * n + j)."""
    rows, n = x.shape
    m = row_max(x)
    nblk = (n + BLOCK - 1) // BLOCK
    one = _like(1.0, x[0, 0])
    for t in prange(rows * nblk):
        r = t // nblk
        lo = (t % nblk) * BLOCK
        hi = min(n, lo + BLOCK)
        _fill_perturbed(out[r, lo:hi], x[r], lo, hi - lo, m[r], one, key, offset + r * n + lo)
    return out


@_jit()
def _softmax_pass1(x, out, r, lo, hi, mr, tau, key, pos_row, cmax, csum, mode, tmp):
    """Pass 1 of :func:`softmax_perturbed` over the chunks of row r in [lo, hi) (lo a multiple
    of CHUNK): v = (x - mr) + G into ``out``, the chunk max c into cmax[r, k] and (modes 0, 1)
    sum exp((v - c) / tau) into csum[r, k]; mode 0 leaves exp((v - c) / tau) in ``out``."""
    _wide_vectors()
    orow = out[r]
    xr = x[r]
    one = _like(1.0, mr)
    for c in range(lo, hi, CHUNK):
        length = min(CHUNK, hi - c)
        buf = orow[c : c + length]
        _fill_perturbed(buf, xr, c, length, mr, one, key, pos_row + c)
        cm = _buf_max(buf, length)
        k = c // CHUNK
        cmax[r, k] = cm
        if mode == 2:
            continue
        if cm == -np.inf:
            csum[r, k] = 0.0
            if mode == 0:
                buf[:] = 0.0
            continue
        if mode == 0:
            for j in range(length):
                buf[j] = _exp((buf[j] - cm) / tau)
            csum[r, k] = _buf_sum64(buf, length)
        else:
            for j in range(length):
                tmp[j] = _exp((buf[j] - cm) / tau)
            csum[r, k] = _buf_sum64(tmp, length)


@_jit()
def _softmax_row(cmax, csum, r, tau64, mode):
    """(M, S) of row r: M = max of the chunk maxima, S = sum_k csum[r, k] exp((c_k - M) / tau)
    in chunk order (S = 0 in mode 2)."""
    nch = cmax.shape[1]
    M = -np.inf
    for k in range(nch):
        M = max(M, cmax[r, k])
    S = 0.0
    if mode != 2:
        for k in range(nch):
            if csum[r, k] > 0.0:
                S += csum[r, k] * math.exp((cmax[r, k] - M) / tau64)
    return M, S


@_jit()
def _softmax_argmax(x, out, r, M, mr, key, pos_row, cmax, mode, tmp):
    """First index of the row maximum M of v, found in the first chunk whose max is M (mode 0
    overwrote v with exp: that chunk's v is recomputed into ``tmp``)."""
    n = x.shape[1]
    one = _like(1.0, mr)
    target = _like(M, mr)
    for k in range(cmax.shape[1]):
        if cmax[r, k] == M:
            c = k * CHUNK
            length = min(CHUNK, n - c)
            if mode == 0:
                _fill_perturbed(tmp, x[r], c, length, mr, one, key, pos_row + c)
                return c + _first_index(tmp, length, target)
            return c + _first_index(out[r, c : c + length], length, target)
    return -1


@_jit()
def _softmax_scale(out, r, k0, k1, M, S, tau, cmax, csum, best, mode):
    """Pass 2 over chunks k0 .. k1 - 1 of row r: out *= exp((c_k - M) / tau) / S (mode 0),
    out = (out - M) / tau - log S (mode 1), the one-hot of ``best`` (mode 2)."""
    _wide_vectors()
    n = out.shape[1]
    tau64 = np.float64(tau)
    for k in range(k0, k1):
        c = k * CHUNK
        length = min(CHUNK, n - c)
        buf = out[r, c : c + length]
        if mode == 2:
            buf[:] = 0.0
            if best >= c and best < c + length:
                buf[best - c] = 1.0
        elif mode == 0:
            if csum[r, k] > 0.0:
                scale = _like(math.exp((cmax[r, k] - M) / tau64) / S, tau)
                for j in range(length):
                    buf[j] = buf[j] * scale
        else:
            Mr = _like(M, tau)
            lse = _like(math.log(S), tau)
            for j in range(length):
                buf[j] = (buf[j] - Mr) / tau - lse


@_jit(parallel=True)
def softmax_perturbed(x, key, offset, taus, out, mode):
    """Fused Gumbel-Softmax over rows: v = (x - m) + G, y = softmax(v / tau).

    mode 0: out = y; mode 1: out = log y; mode 2: out = one-hot of argmax v (no exp).
    Returns argmax_j v_j per row (ties to the lowest index).

    Pass 1, per chunk of CHUNK elements: v into the chunk's slot of ``out``, the chunk max
    c, and (modes 0, 1) s = sum exp((v - c) / tau) in float64; mode 0 leaves exp((v - c)/tau)
    in ``out``. Per row: M = max c, S = sum s exp((c - M) / tau). Pass 2: out *= exp((c - M)
    / tau) / S (mode 0), out = (out - M) / tau - log S (mode 1). Chunks whose every entry is
    -inf contribute 0 (mode 0) or -inf (mode 1). Many short rows (:func:`_whole_rows`): one
    task per row does the row max, both passes and the argmax while the row sits in L2; else
    (row, block) tasks for pass 1, then the per-row combination and pass 2 in parallel. The
    floating-point operations and their order are the same either way.
    """
    rows, n = x.shape
    nch = (n + CHUNK - 1) // CHUNK
    cmax = np.empty((rows, nch), dtype=np.float64)
    csum = np.empty((rows, nch), dtype=np.float64)
    argmax = np.empty(rows, dtype=np.int64)
    if _whole_rows(rows, n):
        for r in prange(rows):
            tmp = np.empty(CHUNK, dtype=x.dtype)
            mr = _buf_max(x[r], n)
            tau = taus[r]
            pos_row = offset + r * n
            _softmax_pass1(x, out, r, 0, n, mr, tau, key, pos_row, cmax, csum, mode, tmp)
            M, S = _softmax_row(cmax, csum, r, np.float64(tau), mode)
            best = _softmax_argmax(x, out, r, M, mr, key, pos_row, cmax, mode, tmp)
            argmax[r] = best
            _softmax_scale(out, r, 0, nch, M, S, tau, cmax, csum, best, mode)
        return argmax
    m = row_max(x)
    nblk = (n + BLOCK - 1) // BLOCK
    for t in prange(rows * nblk):
        r = t // nblk
        lo = (t % nblk) * BLOCK
        hi = min(n, lo + BLOCK)
        tmp = np.empty(CHUNK, dtype=x.dtype)
        _softmax_pass1(x, out, r, lo, hi, m[r], taus[r], key, offset + r * n, cmax, csum, mode, tmp)
    rowM = np.empty(rows, dtype=np.float64)
    rowS = np.empty(rows, dtype=np.float64)
    for r in range(rows):
        rowM[r], rowS[r] = _softmax_row(cmax, csum, r, np.float64(taus[r]), mode)
    for r in prange(rows):
        tmp = np.empty(CHUNK, dtype=x.dtype)
        argmax[r] = _softmax_argmax(x, out, r, rowM[r], m[r], key, offset + r * n, cmax, mode, tmp)
    for t in prange(rows * nch):
        r = t // nch
        k = t % nch
        _softmax_scale(out, r, k, k + 1, rowM[r], rowS[r], taus[r], cmax, csum, argmax[r], mode)
    return argmax


# --------------------------------------------------------------------------- selection (top-p, top-k)

SUB = 64  # elements per sub-chunk of the selection kernels (the unit of noise work they skip)
SKIP = 256  # elements per stretch whose maximum decides a skip (fewer horizontal reductions)


@_jit(parallel=True)
def top_p_rows(x, ps, temps, floors, ms, is_probs, thresholds, counts):
    """Exact nucleus threshold per row without a full sort (quickselect on the values).

    Keeps token i iff B_i < p Z, B_i = sum of weights w_j > w_i over the tokens with
    x >= floors[r], w = exp((x - m) / T) in float64 (or the probabilities themselves), Z =
    their sum. ``thresholds[r]`` is the smallest kept value of x, ``counts[r]`` the number of
    entries >= it (ties at the boundary kept). Per row: ``ps[r] > 1`` means top-p is off
    (threshold -inf, count -1); ``ms[r]`` is the row max, or NaN to compute it here.
    The sums are float64 in an order that depends on n only (batch-invariant).
    """
    rows, n = x.shape
    for r in prange(rows):
        p = ps[r]
        if p > 1.0:
            thresholds[r] = -np.inf
            counts[r] = -1
            continue
        xr = x[r]
        fl = floors[r]
        tau = np.float64(temps[r])
        mx = ms[r]
        if mx != mx:
            mx = np.float64(_buf_max(xr, n))
        Z = 0.0
        if is_probs:
            for j in range(n):
                Z += np.float64(xr[j]) if xr[j] >= fl else 0.0
        else:
            Z = _exp_sum(xr, n, mx, tau, fl)
        target = p * Z
        if p >= 1.0:  # every token of positive weight
            lo_v = np.inf
            cnt = 0
            for j in range(n):
                if xr[j] >= fl and _weight(xr[j], mx, tau, is_probs) > 0.0:
                    lo_v = min(lo_v, np.float64(xr[j]))
                    cnt += 1
            thresholds[r] = lo_v
            counts[r] = cnt
            continue
        # Weights w <= (1 - p) Z / n are never kept (their preceding mass is >= p Z): drop them,
        # first by value (a margin of 1e-6 in log space), then exactly by weight.
        cut = (1.0 - p) * Z / n * (1.0 - 1e-9)
        if is_probs:
            vcut = -np.inf
        else:
            vcut = mx + tau * (math.log(cut) - 1e-6) if cut > 0.0 else -np.inf
        vcut = max(vcut, np.float64(fl))
        cx = np.empty(n, dtype=np.float64)
        cw = np.empty(n, dtype=np.float64)
        nc = 0
        for j in range(n):
            v = np.float64(xr[j])
            if v >= vcut:
                w = _weight(xr[j], mx, tau, is_probs)
                if w > cut:
                    cx[nc] = v
                    cw[nc] = w
                    nc += 1
        thresholds[r], counts[r] = _select_crossing(cx, cw, nc, target)
    return thresholds


@_jit(fastmath=_HELPER_MATH)
def _weight(v, mx, tau, is_probs):
    if is_probs:
        return np.float64(v)
    return exp64((np.float64(v) - mx) / tau)


@_jit(fastmath=_REDUCE_MATH)
def _exp_sum(xr, n, mx, tau, fl):
    """sum of exp((x - m) / T) over x >= fl, float64, in an order fixed by n."""
    s = 0.0
    if tau == 1.0:
        for j in range(n):
            w = exp64(np.float64(xr[j]) - mx)
            s += w if xr[j] >= fl else 0.0
    else:
        for j in range(n):
            w = exp64((np.float64(xr[j]) - mx) / tau)
            s += w if xr[j] >= fl else 0.0
    return s


@_jit()
def _select_crossing(cx, cw, nc, target):
    """The smallest value v among the candidates (cx, cw) whose mass strictly above is below
    ``target``, and how many candidates are >= v (a selection by mass, expected linear time).

    Large candidate sets are cut by two pivots bracketing the crossing, read off a sorted
    sample of 512 candidates (Floyd and Rivest 1975): one pass usually leaves the few
    percent between them. Small ones use median-of-three pivots; a sort finishes rows where
    pivots keep failing. Every pass is branch-free (the candidate order is arbitrary).
    """
    above = 0.0  # mass of the values above every candidate
    count_above = 0
    kept = np.inf
    kept_count = 0
    it = 0
    while nc > 0:
        it += 1
        if it > 48 or nc <= 16:  # few left, or adversarial pivots: sort what is left
            order = np.argsort(-cx[:nc], kind="mergesort")
            j = 0
            while j < nc:
                v = cx[order[j]]
                s = 0.0
                k = j
                while k < nc and cx[order[k]] == v:
                    s += cw[order[k]]
                    k += 1
                if above < target:
                    kept = v
                    kept_count = count_above + (k - j)
                else:
                    break
                above += s
                count_above += k - j
                j = k
            break
        if nc > 4096 and it <= 8:
            hi, lo = _bracket(cx, cw, nc, target - above)
        else:
            a = cx[nc // 4]
            b = cx[nc // 2]
            c = cx[(3 * nc) // 4]
            hi = max(min(a, b), min(max(a, b), c))  # median of three
            lo = hi
        # masses and counts of: v > hi, v == hi, lo < v < hi, v == lo (lo <= hi)
        s_gt = 0.0
        s_hi = 0.0
        s_mid = 0.0
        s_lo = 0.0
        n_gt = 0
        n_hi = 0
        n_mid = 0
        n_lo = 0
        for j in range(nc):
            v = cx[j]
            w = cw[j]
            g = v > hi
            e = v == hi
            md = (v > lo) & (v < hi)
            el = (v == lo) & (lo < hi)
            s_gt += w if g else 0.0
            s_hi += w if e else 0.0
            s_mid += w if md else 0.0
            s_lo += w if el else 0.0
            n_gt += np.int64(g)
            n_hi += np.int64(e)
            n_mid += np.int64(md)
            n_lo += np.int64(el)
        if above + s_gt >= target:  # hi is not kept: the crossing is above it
            nc = _compact(cx, cw, nc, hi, np.inf)
            continue
        kept = hi  # hi is kept, and everything above it
        above += s_gt + s_hi
        count_above += n_gt + n_hi
        kept_count = count_above
        if lo == hi:
            nc = _compact(cx, cw, nc, -np.inf, hi)
            continue
        if above + s_mid < target:  # lo is kept too: the crossing is below it
            kept = lo
            above += s_mid + s_lo
            count_above += n_mid + n_lo
            kept_count = count_above
            nc = _compact(cx, cw, nc, -np.inf, lo)
        else:  # the crossing lies strictly between lo and hi
            nc = _compact(cx, cw, nc, lo, hi)
    return kept, kept_count


@_jit()
def _compact(cx, cw, nc, lo, hi):
    """Keep the candidates with lo < v < hi (in place, branch-free); returns their count."""
    k = 0
    for j in range(nc):
        v = cx[j]
        cx[k] = v
        cw[k] = cw[j]
        k += np.int64((v > lo) & (v < hi))
    return k


@_jit()
def _bracket(cx, cw, nc, target):
    """Two values ``hi >= lo`` among the candidates that likely bracket the crossing: from an
    evenly spaced sample, sorted, its mass scaled to the candidates' (estimated)."""
    s = 512
    sv = np.empty(s, dtype=np.float64)
    sw = np.empty(s, dtype=np.float64)
    for i in range(s):
        j = (i * nc) // s
        sv[i] = cx[j]
        sw[i] = cw[j]
    order = np.argsort(-sv)
    total = 0.0
    for i in range(s):
        total += sw[i]
    # the candidates' mass, estimated from the sample: (nc / s) * total; find where the
    # sample's scaled cumulative mass reaches target
    scale = nc / s
    cum = 0.0
    pos = s - 1
    for i in range(s):
        cum += sw[order[i]] * scale
        if cum >= target:
            pos = i
            break
    d = 24
    return sv[order[max(pos - d, 0)]], sv[order[min(pos + d, s - 1)]]


@_jit()
def _heap_replace_min(h, k, v):
    """Replace the root of the min-heap h[:k] by v (> root) and restore the heap."""
    i = 0
    while True:
        c = 2 * i + 1
        if c >= k:
            break
        if c + 1 < k and h[c + 1] < h[c]:
            c += 1
        if h[c] >= v:
            break
        h[i] = h[c]
        i = c
    h[i] = v


@_jit()
def _heap_push_all(vals, lo, hi, h, k, floor):
    """Push vals[lo:hi] entries > max(floor, heap min) through the min-heap h[:k] of the k
    largest values seen (with multiplicity)."""
    hmin = h[0]
    for j in range(lo, hi):
        v = vals[j]
        if v > hmin and v >= floor:
            _heap_replace_min(h, k, v)
            hmin = h[0]


@_jit()
def _heap_scan(xr, lo, hi, h, k):
    """Push xr[lo:hi] through the min-heap h[:k] of the k largest values (with multiplicity).

    First the maximum of every SUB-element stretch (one vectorized read); the k-th largest of
    those maxima, L, is a lower bound of the k-th largest value (they are k distinct
    entries), so only the stretches whose maximum is >= L are read again (about k of them).
    """
    ns = (hi - lo + SUB - 1) // SUB
    smax = np.empty(ns, dtype=xr.dtype)
    for s in range(ns):
        c = lo + s * SUB
        length = min(SUB, hi - c)
        smax[s] = _buf_max(xr[c:c + length], length)
    low = -np.inf
    if ns >= k:
        hs = np.full(k, -np.inf, dtype=xr.dtype)
        _heap_push_all(smax, 0, ns, hs, k, -np.inf)
        low = hs[0]
    for s in range(ns):
        if smax[s] >= low and smax[s] > h[0]:
            c = lo + s * SUB
            _heap_push_all(xr, c, min(hi, c + SUB), h, k, low)


@_jit(parallel=True)
def kth_largest_rows(x, ks, block, out):
    """out[r] = the ks[r]-th largest value of x[r] counting repeats (1 <= ks[r] <= n; ks[r]
    <= 0 gives -inf), i.e. ``torch.topk(x[r], k).values[-1]``, without sorting.

    Tasks are (row, block of ``block`` elements); each keeps its k largest values in a
    min-heap, reading again only the stretches that can hold one (``_heap_scan``: about one
    read pass in all), then the blocks' heaps of a row are merged.
    The result is exact and does not depend on the block size.
    """
    rows, n = x.shape
    nblk = (n + block - 1) // block
    kmax = 1
    for r in range(rows):
        kmax = max(kmax, ks[r])
    part = np.full((rows * nblk, kmax), -np.inf, dtype=x.dtype)
    for t in prange(rows * nblk):
        r = t // nblk
        k = ks[r]
        if k > 0:
            lo = (t % nblk) * block
            _heap_scan(x[r], lo, min(n, lo + block), part[t], k)
    for r in prange(rows):
        k = ks[r]
        if k <= 0:
            out[r] = -np.inf
        elif nblk == 1:
            out[r] = part[r, 0]
        else:
            h = np.full(k, -np.inf, dtype=x.dtype)
            for b in range(nblk):
                _heap_push_all(part[r * nblk + b], 0, k, h, k, -np.inf)
            out[r] = h[0]
    return out


@_jit(parallel=True)
def sample_above(x, keys, m, temps, lows, block):
    """Per row, argmax_j ((x_j - m_r) / T_r + G(keys[r], j)) over x_j >= lows[r], ties to the
    lowest index: the result of ``argmax_perturbed(x, keys, True, 0, temps, True, True, lows,
    True)`` (the same helpers compute the same scores), with the row maxima ``m`` given.

    Works in stretches of SKIP elements, then sub-chunks of SUB, and skips those that cannot
    hold the winner: every entry below the row's low, or ``(max - m) / T + G_MAX`` below the
    best score so far. With
    a small kept set (top-k, a narrow nucleus) that leaves about one read pass, and noise for
    the sub-chunks that hold kept tokens.
    """
    rows, n = x.shape
    nblk = (n + block - 1) // block
    best_v = np.empty(rows * nblk, dtype=x.dtype)
    best_i = np.empty(rows * nblk, dtype=np.int64)
    gmax = _like(G_MAX, x[0, 0])
    for t in prange(rows * nblk):
        r = t // nblk
        lo = (t % nblk) * block
        hi = min(n, lo + block)
        buf = np.empty(SUB, dtype=x.dtype)
        xr = x[r]
        mr = m[r]
        tau = temps[r]
        low = lows[r]
        key = keys[r]
        bv = -np.inf
        bi = -1
        for s0 in range(lo, hi, SKIP):
            s1 = min(SKIP, hi - s0)
            smx = _buf_max(xr[s0:s0 + s1], s1)
            if smx < low or (bi >= 0 and (smx - mr) / tau + gmax < bv):
                continue
            for c in range(s0, s0 + s1, SUB):
                length = min(SUB, s0 + s1 - c)
                cmx = _buf_max(xr[c:c + length], length)
                if cmx < low:
                    continue
                if bi >= 0 and (cmx - mr) / tau + gmax < bv:
                    continue
                _fill_perturbed_div(buf, xr, c, length, mr, tau, key, c)
                for j in range(length):
                    buf[j] = buf[j] if xr[c + j] >= low else -np.inf
                cm = _buf_max(buf, length)
                if cm > bv or bi < 0:
                    idx = _first_index(buf, length, cm)
                    if idx >= 0:
                        bv = cm
                        bi = c + idx
        best_v[t] = bv
        best_i[t] = bi
    return _merge_block_winners(best_v, best_i, rows, nblk, np.empty(rows, dtype=best_v.dtype))



@_jit(parallel=True)
def top_k_sample_rows(x, ks, keys, m, temps, thresholds):
    """Top-k sampling in one pass per row: ``thresholds[r]`` = the ks[r]-th largest value
    (1 <= ks[r] <= n, repeats counted), and the token ``sample_above`` draws over
    ``x >= thresholds[r]`` (the same scores, so the same token).

    The SUB-element stretch maxima are read once and serve both the selection (as in
    ``_heap_scan``) and the draw: only the stretches whose maximum reaches the threshold
    (about k of them) are read again and get noise. Parallel over rows.
    """
    rows, n = x.shape
    out = np.empty(rows, dtype=np.int64)
    gmax = _like(G_MAX, x[0, 0])
    for r in prange(rows):
        xr = x[r]
        k = ks[r]
        ns = (n + SUB - 1) // SUB
        smax = np.empty(ns, dtype=x.dtype)
        for s in range(ns):
            c = s * SUB
            length = min(SUB, n - c)
            smax[s] = _buf_max(xr[c:c + length], length)
        low = -np.inf
        if ns >= k:
            hs = np.full(k, -np.inf, dtype=x.dtype)
            _heap_push_all(smax, 0, ns, hs, k, -np.inf)
            low = hs[0]
        h = np.full(k, -np.inf, dtype=x.dtype)
        for s in range(ns):
            if smax[s] >= low and smax[s] > h[0]:
                c = s * SUB
                _heap_push_all(xr, c, min(n, c + SUB), h, k, low)
        t = h[0]
        thresholds[r] = t
        mr = m[r]
        tau = temps[r]
        key = keys[r]
        buf = np.empty(SUB, dtype=x.dtype)
        bv = -np.inf
        bi = -1
        for s in range(ns):
            cmx = smax[s]
            if cmx < t or (bi >= 0 and (cmx - mr) / tau + gmax < bv):
                continue
            c = s * SUB
            length = min(SUB, n - c)
            _fill_perturbed_div(buf, xr, c, length, mr, tau, key, c)
            for j in range(length):
                buf[j] = buf[j] if xr[c + j] >= t else -np.inf
            cm = _buf_max(buf, length)
            if cm > bv or bi < 0:
                idx = _first_index(buf, length, cm)
                if idx >= 0:
                    bv = cm
                    bi = c + idx
        out[r] = bi
    return out


# --------------------------------------------------------------------------- backward


@_jit(parallel=True, fastmath={"reassoc", "contract"})
def softmax_backward(y, g, tau, out):
    """out[r] = y[r] (g[r] - <g[r], y[r]>) / tau[r]: the softmax backward in two passes per row.

    ``<g, y>`` is summed in float64 in an order fixed by the row length (so the bits do not
    depend on the thread count); no ``nnan``: a NaN gradient stays NaN.
    """
    for r in prange(y.shape[0]):
        yr = y[r]
        gr = g[r]
        orow = out[r]
        s = 0.0
        for j in range(yr.shape[0]):
            s += np.float64(gr[j]) * np.float64(yr[j])
        sc = _like(s, yr[0])
        t = _like(tau[r], yr[0])
        for j in range(yr.shape[0]):
            orow[j] = yr[j] * (gr[j] - sc) / t
    return out

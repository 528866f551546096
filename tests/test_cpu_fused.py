"""Fused numba CPU kernels (gumbelkit._kernels.cpu_fused) against torch and float64 references.

Skipped when numba is missing. Statistical tests use fixed seeds and state their bounds
(p > 1e-3 or a 5-sigma band, as in conftest.py).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gumbelkit._counter_noise import counter_gumbel
from gumbelkit._kernels import cpu_fused as cf

numba = pytest.importorskip("numba")
stats = pytest.importorskip("scipy.stats")
K = pytest.importorskip("gumbelkit._kernels._cpu_fused_numba")

MASK64 = (1 << 64) - 1
EPS32 = 2.0**-24
DTYPES = [np.float32, np.float64]


def signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def torch_noise(seed: int, positions: np.ndarray) -> np.ndarray:
    """float64 counter noise of the torch reference at int positions."""
    return counter_gumbel(torch.tensor(signed(seed & MASK64)), torch.from_numpy(positions.astype(np.int64))).numpy()


def ref_transform(hashes: np.ndarray) -> np.ndarray:
    """float64 -log(-log U), U = ((h >> 11) | 1) 2**-53, exact in float64 (U is exact, log is 1 ulp)."""
    n = (hashes >> np.uint64(11)) | np.uint64(1)
    u = n.astype(np.float64) * 2.0**-53
    return -np.log(-np.log(u))


def hash_of(seed: int, positions: np.ndarray) -> np.ndarray:
    key = np.uint64(cf.mix64_int(seed))
    with np.errstate(over="ignore"):
        z = key + positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    out = np.empty_like(z)
    for i, v in enumerate(z.tolist()):
        out[i] = cf.mix64_int(v)
    return out


def noise_tolerance(ref: np.ndarray, dtype) -> np.ndarray:
    """float32: 4 units of 2**-24 max(1, |g|); float64: 4 units of 2**-53 max(1, |g|)."""
    unit = EPS32 if dtype == np.float32 else 2.0**-53
    return 4 * unit * np.maximum(1.0, np.abs(ref))


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    n = min(request.param, numba.config.NUMBA_NUM_THREADS)
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    yield n
    numba.set_num_threads(old)


# --------------------------------------------------------------------------- availability, validation


def test_available_and_off_switch(monkeypatch):
    assert cf.available()
    monkeypatch.setenv("GUMBELKIT_NUMBA", "0")
    cf._impl.cache_clear()
    try:
        assert not cf.available()
        with pytest.raises(ImportError, match=r"gumbelkit\[numba\]"):
            cf.gumbel_max(np.zeros((1, 3), np.float32), 0)
    finally:
        monkeypatch.delenv("GUMBELKIT_NUMBA")
        cf._impl.cache_clear()
    assert cf.available()


def test_cache_is_on_disk():
    info = cf.cache_info()
    assert info["enabled"] and isinstance(info["dir"], str)


def test_validation_errors():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        cf.gumbel_max(x.astype(np.float16), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        cf.gumbel_max(np.zeros((5, 2), np.float32).T, 0)
    with pytest.raises(ValueError, match="2-D"):
        cf.gumbel_max(np.zeros(5, np.float32), 0)
    with pytest.raises(TypeError, match="seed"):
        cf.gumbel_max(x, 1.5)
    with pytest.raises(ValueError, match="64 bits"):
        cf.gumbel_max(x, 1 << 64)
    with pytest.raises(ValueError, match="tau"):
        cf.gumbel_softmax(x, 0, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        cf.gumbel_softmax(x, 0, tau=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="one value per row"):
        cf.gumbel_softmax(x, 0, tau=np.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        cf.sample_seeded(x, np.arange(2), temperature=float("nan"))
    with pytest.raises(TypeError, match="int64"):
        cf.sample_seeded(x, np.arange(2, dtype=np.int32))
    with pytest.raises(ValueError, match="one seed per row"):
        cf.sample_seeded(x, np.arange(3))
    with pytest.raises(ValueError, match="p must be"):
        cf.top_p_threshold(x, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        cf.gumbel_topk(x, 0, 6)
    with pytest.raises(ValueError, match="offset"):
        cf.gumbel_noise(x, 0, offset=-1)
    with pytest.raises(ValueError, match="out must have"):
        cf.gumbel_softmax(x, 0, out=np.zeros((2, 5), np.float64))
    with pytest.raises(ValueError, match="NaN"):
        cf.check_finite_rows(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="every entry -inf"):
        cf.check_finite_rows(np.array([[-np.inf, -np.inf]], np.float32))


def test_torch_tensors_accepted():
    x = torch.randn(3, 7)
    assert np.array_equal(cf.gumbel_max(x, 5), cf.gumbel_max(x.numpy(), 5))


# --------------------------------------------------------------------------- elementary functions


def test_log32_accuracy_over_the_float32_range():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            np.exp2(rng.uniform(-126, 127.9, 200_000)),
            rng.uniform(0.5, 2.0, 100_000),
            np.nextafter(np.float32(1), np.float32(0)) - np.arange(1000) * 2.0**-24,
            [np.finfo(np.float32).tiny, np.finfo(np.float32).max, 1.0, 2.0, 0.5],
        ]
    ).astype(np.float32)
    got = K.log32_array(x, np.empty_like(x)).astype(np.float64)
    ref = np.log(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    ulp[ref == 0] = np.finfo(np.float32).smallest_subnormal
    assert (np.abs(got - ref) / ulp).max() <= 1.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_accuracy(dtype):
    rng = np.random.default_rng(2)
    lo, hi = (-103.0, 88.0) if dtype == np.float32 else (-740.0, 709.0)
    x = np.concatenate([rng.uniform(lo, hi, 200_000), rng.uniform(-1, 1, 50_000), [0.0, -1e-30]]).astype(dtype)
    got = K.exp_array(x, np.empty_like(x))
    ref = np.exp(x.astype(np.float64) if dtype == np.float32 else x)
    normal = ref >= np.finfo(dtype).tiny
    ulp = np.spacing(ref.astype(dtype)).astype(np.float64)
    assert (np.abs(got - ref)[normal] / ulp[normal]).max() <= 2.0
    # subnormal results: an absolute error of a couple of subnormal steps
    tiny = np.finfo(dtype).smallest_subnormal
    assert (np.abs(got - ref)[~normal]).max() <= 4 * tiny * (1 if dtype == np.float32 else 2**30)
    special = np.array([-np.inf, -1e4, -200.0 if dtype == np.float32 else -800.0], dtype)
    assert np.all(K.exp_array(special, np.empty_like(special)) == 0)


# --------------------------------------------------------------------------- the noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "seed", "offset"), [((3, 1000), 7, 0), ((2, 40_000), -5, 123), ((1, 17), 2**64 - 1, 2**40)]
)
def test_noise_matches_torch_counter_reference(dtype, shape, seed, offset):
    out = cf.gumbel_noise(np.empty(shape, dtype), seed, offset)
    ref = torch_noise(seed, offset + np.arange(math.prod(shape))).reshape(shape)
    assert np.all(np.abs(out - ref) <= noise_tolerance(ref, dtype))
    if dtype == np.float32:  # bit-identical to the float64 noise rounded to float32, up to a few ulps
        assert np.mean(out == ref.astype(np.float32)) > 0.4


def test_transform_keeps_the_tail_against_mpmath():
    """The float32 transform on hashes near U = 1 and U = 0, against 40-digit arithmetic.

    Tail wins at gaps of 22 and 30 nats have probabilities near 3e-4 per 2**20-token row and
    1e-13 per token: too rare to count, so the tail is checked here, exactly, on the hashes
    that produce it (every G up to 36.74), and gumbel_max is checked to be the argmax of this
    very noise (test_gumbel_max_is_argmax_of_its_noise); gap 18 is counted below.
    """
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(3)
    small = rng.integers(0, 2**20, 3000).astype(np.uint64) << rng.integers(0, 44, 3000).astype(np.uint64)
    edges = np.array([0, 1, 2**11, 2**12, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2**12], dtype=np.uint64)
    hashes = np.concatenate([small, ~small, edges, rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64)])
    g32 = K.gumbel_of_hashes(hashes, np.empty(hashes.size, np.float32)).astype(np.float64)
    g64 = K.gumbel_of_hashes(hashes, np.empty(hashes.size, np.float64))
    mpmath.mp.dps = 40
    ref = np.array(
        [
            float(-mpmath.log(-mpmath.log(mpmath.mpf((int(h) >> 11) | 1) * mpmath.mpf(2) ** -53)))
            for h in hashes.tolist()
        ]
    )
    assert np.all(np.abs(g32 - ref) <= noise_tolerance(ref, np.float32))
    assert np.all(np.abs(g64 - ref) <= noise_tolerance(ref, np.float64))
    # the tail is there: every value up to -log(-log(1 - 2**-53)) = 36.737, gaps 22 and 30 included
    assert g32.max() == pytest.approx(36.7368, abs=1e-4)
    assert np.any((g32 > 22) & (g32 < 30)) and np.any(g32 > 30)
    assert g32.min() == pytest.approx(-3.6038, abs=1e-4)
    assert np.isfinite(g32).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_ks_against_gumbel(dtype):
    g = cf.gumbel_noise(np.empty((1, 200_000), dtype), 11).ravel()
    assert stats.kstest(g.astype(np.float64), "gumbel_r").pvalue > 1e-3


def test_noise_independent_of_threads_and_blocks(threads):
    out = cf.gumbel_noise(np.empty((3, 50_000), np.float32), 9)
    flat = cf.gumbel_noise(np.empty(150_000, np.float32), 9)
    part = cf.gumbel_noise(np.empty(50_000, np.float32), 9, offset=50_000)
    assert np.array_equal(out.ravel(), flat)
    assert np.array_equal(out[1], part)


# --------------------------------------------------------------------------- gumbel_max, sample_seeded


def perturbed_ref(x: np.ndarray, g: np.ndarray, temps=None) -> np.ndarray:
    """argmax of (x - max x) / T + g in x's dtype, as the kernels round it."""
    m = x.max(axis=1, keepdims=True)
    z = x - m
    if temps is not None:
        z = z / temps.reshape(-1, 1).astype(x.dtype)
    return np.argmax(z + g, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip", [True, False])
def test_gumbel_max_is_argmax_of_its_noise(dtype, skip):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 40_000)) * np.array([[0.1], [1], [3], [10], [30], [100]])).astype(dtype)
    x[2, ::3] = -np.inf
    g = cf.gumbel_noise(np.empty_like(x), 21, offset=5)
    assert np.array_equal(cf.gumbel_max(x, 21, offset=5, skip=skip), perturbed_ref(x, g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_seeded_is_argmax_of_counter_noise(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5, 30_000)) * 4).astype(dtype)
    seeds = np.array([3, -1, 2**62, 0, 77], dtype=np.int64)
    temps = np.array([1.0, 0.5, 2.0, 1e-3, 1.0])
    g = np.stack([cf.gumbel_noise(np.empty(x.shape[1], dtype), int(s)) for s in seeds])
    assert np.array_equal(cf.sample_seeded(x, seeds), perturbed_ref(x, g))
    assert np.array_equal(cf.sample_seeded(x, seeds, temps), perturbed_ref(x, g, temps))


def seeded_scores_ref(x: np.ndarray, seeds: np.ndarray, temps, shift, offset: int = 0) -> np.ndarray:
    """(x - shift) / T + G(seed_r, offset + j) in x's dtype, as sample_seeded rounds it."""
    g = np.stack([cf.gumbel_noise(np.empty(x.shape[1], x.dtype), int(s), offset=offset) for s in seeds])
    z = x - shift.reshape(-1, 1).astype(x.dtype)
    if temps is not None:
        z = z / np.broadcast_to(np.asarray(temps), (x.shape[0],)).reshape(-1, 1).astype(x.dtype)
    return z + g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [None, 0.7, "rows"])
@pytest.mark.parametrize("with_min", [False, True])
@pytest.mark.parametrize(("n", "cut"), [(2_500, 1_000), (40_000, 17_001)])
def test_sample_seeded_vocabulary_shards_give_the_whole_row_draw(dtype, temperature, with_min, n, cut):
    """Issue 13 (dist): shards [0, cut) and [cut, n) sampled with offset and the global max as
    shift; the shard winner of larger score (the first shard on equal scores) is the whole row's
    token, and the returned scores are the exact values compared."""
    rng = np.random.default_rng(13)
    rows = 96
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.05, 3.0, (rows, 1))).astype(dtype)
    x[:, rng.integers(0, n, n // 10)] = -np.inf  # masked tokens in both shards
    x[5, :cut] = -np.inf  # a row whose first shard is fully masked
    x[6, cut:] = -np.inf  # and one whose second is
    seeds = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    temps = rng.uniform(0.3, 2.0, rows) if temperature == "rows" else temperature
    low = np.nanquantile(np.where(np.isfinite(x), x, np.nan), 0.6, axis=1) if with_min else None
    low_a = None if low is None else low.copy()
    whole, whole_score = cf.sample_seeded(x, seeds, temps, min_value=low, return_score=True)
    m = x.max(axis=1)
    a, b = np.ascontiguousarray(x[:, :cut]), np.ascontiguousarray(x[:, cut:])
    ia, sa = cf.sample_seeded(a, seeds, temps, min_value=low_a, shift=m, return_score=True)
    ib, sb = cf.sample_seeded(b, seeds, temps, min_value=low, offset=cut, shift=m, return_score=True)
    assert sa.dtype == sb.dtype == x.dtype
    merged = np.where(sb > sa, ib + cut, ia)
    assert np.array_equal(merged, whole)
    assert np.array_equal(np.maximum(sa, sb), whole_score)
    assert np.all(np.isfinite(whole_score))
    assert 0.2 < np.mean(merged < cut) < 0.8  # both shards win some rows: the test can fail
    # the scores are the exact reference values at the winners
    ref = seeded_scores_ref(x, seeds, temps, m)
    if low is not None:
        ref = np.where(x >= low.astype(dtype)[:, None], ref, -np.inf)
    assert np.array_equal(whole, np.argmax(ref, axis=1))
    assert np.array_equal(whole_score, ref[np.arange(rows), whole])
    assert sa[5] == -np.inf and sb[6] == -np.inf  # a fully masked shard scores -inf and loses
    assert merged[5] >= cut and merged[6] < cut


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_seeded_offset_and_shift_semantics(dtype):
    rng = np.random.default_rng(14)
    x = (rng.standard_normal((7, 20_000)) * 2).astype(dtype)
    seeds = rng.integers(0, 2**62, 7, dtype=np.int64)
    temps = rng.uniform(0.5, 1.5, 7)
    plain = cf.sample_seeded(x, seeds, temps)
    ids, scores = cf.sample_seeded(x, seeds, temps, return_score=True)
    assert np.array_equal(ids, plain)  # shift=None, offset=0: unchanged
    ref = seeded_scores_ref(x, seeds, temps, x.max(axis=1))
    assert np.array_equal(plain, np.argmax(ref, axis=1))
    assert np.array_equal(scores, ref[np.arange(7), plain])
    assert np.array_equal(cf.sample_seeded(x, seeds, temps, shift=x.max(axis=1)), plain)
    # offset: column j gets the noise of token offset + j
    ref = seeded_scores_ref(x, seeds, temps, x.max(axis=1), offset=12_345)
    assert np.array_equal(cf.sample_seeded(x, seeds, temps, offset=12_345), np.argmax(ref, axis=1))
    # a shift above the max: the argmax of (x - shift) / T + G as written
    shift = x.max(axis=1).astype(np.float64) + rng.uniform(0, 50, 7)
    ids, scores = cf.sample_seeded(x, seeds, temps, shift=shift, return_score=True)
    ref = seeded_scores_ref(x, seeds, temps, shift.astype(dtype))
    assert np.array_equal(ids, np.argmax(ref, axis=1))
    assert np.array_equal(scores, ref.max(axis=1))
    with pytest.raises(ValueError, match="offset"):
        cf.sample_seeded(x, seeds, offset=-1)
    with pytest.raises(ValueError, match="shift must have one value per row"):
        cf.sample_seeded(x, seeds, shift=np.zeros(3))
    with pytest.raises(ValueError, match="shift must be finite"):
        cf.sample_seeded(x, seeds, shift=np.full(7, np.inf))


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def chisquare_counts(ids: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value over the categories of positive probability (the others never drawn)."""
    counts = np.bincount(ids, minlength=probs.size)
    assert np.all(counts[probs == 0] == 0)
    expected = probs[probs > 0] / probs.sum() * ids.size
    return stats.chisquare(counts[probs > 0], expected).pvalue


@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_max_chi_square(dtype):
    logits = np.array([1.0, 0.0, -1.0, 2.0, -np.inf, 0.5], dtype)
    x = np.ascontiguousarray(np.broadcast_to(logits, (40_000, 6)))
    ids = cf.gumbel_max(x, 123)
    assert not np.any(ids == 4)
    assert chisquare_counts(ids, softmax64(logits)) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [None, 0.7, 3.0])
def test_sample_seeded_chi_square(dtype, temperature):
    logits = np.array([1.0, 0.0, -1.0, 2.0, -np.inf, 0.5], dtype)
    x = np.ascontiguousarray(np.broadcast_to(logits, (40_000, 6)))
    ids = cf.sample_seeded(x, np.arange(40_000, dtype=np.int64) * 7919 + 1, temperature)
    t = 1.0 if temperature is None else temperature
    assert chisquare_counts(ids, softmax64(logits / t)) > 1e-3


def test_tail_wins_at_gap_18():
    """Issue 11: P(token 0 loses) = 1 - 1/(1 + (2**20 - 1) e**-18) = 0.01573 per row."""
    p_lose = 1 - 1 / (1 + (2**20 - 1) * math.exp(-18))
    x = np.full((16, 2**20), -18.0, np.float32)
    x[:, 0] = 0
    lost_max = sum(int(np.sum(cf.gumbel_max(x, seed) != 0)) for seed in range(40))
    lost_seeded = sum(
        int(np.sum(cf.sample_seeded(x, np.arange(16, dtype=np.int64) + 1000 * call) != 0)) for call in range(40)
    )
    # 640 rows: mean 10.07; Poisson bounds with P(outside) < 1e-3 each
    for lost in (lost_max, lost_seeded):
        assert 2 <= lost <= 22, (lost, 640 * p_lose)


def test_tail_wins_at_gap_12_float64_and_float32_agree():
    """A cheaper tail check for both dtypes: gap 12 over 2**14 tokens, P(lose) = 0.0946 per row."""
    p_lose = 1 - 1 / (1 + (2**14 - 1) * math.exp(-12))
    for dtype in DTYPES:
        x = np.full((2000, 2**14), -12.0, dtype)
        x[:, 0] = 0
        lost = np.sum(cf.gumbel_max(x, 5) != 0)
        sigma = math.sqrt(2000 * p_lose * (1 - p_lose))
        assert abs(lost - 2000 * p_lose) < 5 * sigma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", [1.0, 1e4, 1e7, 1e30])
def test_two_way_ties_are_fifty_fifty(dtype, score):
    x = np.full((20_000, 2), score, dtype)
    for ids in (cf.gumbel_max(x, 1), cf.sample_seeded(x, np.arange(20_000, dtype=np.int64))):
        frac = np.mean(ids == 0)
        assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / 20_000)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1e-6, 1e-7, 1e-30])
def test_ties_at_tiny_temperature(dtype, temperature):
    x = np.ascontiguousarray(np.broadcast_to(np.array([20.0, 20.0, 5.0], dtype), (20_000, 3)))
    ids = cf.sample_seeded(x, np.arange(20_000, dtype=np.int64) + 5, temperature)
    assert not np.any(ids == 2)
    assert abs(np.mean(ids == 0) - 0.5) < 5 * math.sqrt(0.25 / 20_000)


def test_seeded_draws_independent_of_threads_and_batch(threads):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((9, 70_000)) * 3).astype(np.float32)
    seeds = rng.integers(-(2**63), 2**63 - 1, 9, dtype=np.int64)
    temps = rng.uniform(0.3, 2.0, 9)
    full = cf.sample_seeded(x, seeds, temps)
    for r in range(9):
        assert cf.sample_seeded(x[r : r + 1].copy(), seeds[r : r + 1], temps[r : r + 1])[0] == full[r]
    perm = rng.permutation(9)
    assert np.array_equal(cf.sample_seeded(np.ascontiguousarray(x[perm]), seeds[perm], temps[perm]), full[perm])
    numba.set_num_threads(1)
    assert np.array_equal(cf.sample_seeded(x, seeds, temps), full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_tasks_and_block_tasks_agree(dtype):
    """Many short rows run one task per row (row max, draw and softmax passes on L2-resident
    data), one row runs as (row, block) tasks with a separate row-max pass: same bits."""
    rng = np.random.default_rng(17)
    rows, n = 12, 20_000
    assert K._whole_rows(rows, n) and not K._whole_rows(1, n)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.1, 5, (rows, 1))).astype(dtype)
    x[3, ::7] = -np.inf
    x[4, :1024] = -np.inf  # whole chunks masked
    seed, off = 99, 1234
    ids = cf.gumbel_max(x, seed, offset=off)
    y, a = cf.gumbel_softmax(x, seed, 0.6, offset=off)
    ly, la = cf.log_gumbel_softmax(x, seed, 0.6, offset=off)
    hy, ha = cf.gumbel_softmax(x, seed, 0.6, hard=True, offset=off)
    assert np.array_equal(ids, a) and np.array_equal(ids, la) and np.array_equal(ids, ha)
    for r in range(rows):
        row = np.ascontiguousarray(x[r : r + 1])
        pos = off + r * n
        assert cf.gumbel_max(row, seed, offset=pos)[0] == ids[r]
        assert np.array_equal(cf.gumbel_softmax(row, seed, 0.6, offset=pos)[0][0], y[r])
        assert np.array_equal(cf.log_gumbel_softmax(row, seed, 0.6, offset=pos)[0][0], ly[r])
        assert np.array_equal(cf.gumbel_softmax(row, seed, 0.6, hard=True, offset=pos)[0][0], hy[r])
    assert np.all(y[4, :1024] == 0) and np.all(ly[4, :1024] == -np.inf)
    assert np.allclose(y.astype(np.float64).sum(axis=1), 1, atol=1e-5)


def test_results_identical_at_one_and_two_threads():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 100_000)) * 2).astype(np.float32)
    results = []
    for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        numba.set_num_threads(n)
        y, a = cf.gumbel_softmax(x, 4, 0.7)
        ly, _ = cf.log_gumbel_softmax(x, 4, 0.7)
        noise = cf.gumbel_noise(np.empty_like(x), 4)
        results.append((cf.gumbel_max(x, 4), y, a, ly, cf.top_p_threshold(x, 0.9)[0], noise))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(results[0], results[-1], strict=False):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- gumbel_softmax


def softmax_ref(x: np.ndarray, g: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax((x - m + g) / tau) and its log, from x and the kernels' own noise g."""
    x64 = x.astype(np.float64)
    v = (x64 - x64.max(axis=1, keepdims=True)) + g.astype(np.float64)
    z = v / taus.astype(x.dtype).astype(np.float64).reshape(-1, 1)
    z = z - z.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        logy = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(logy), logy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 1000), (3, 40_000), (2, 7)])
def test_gumbel_softmax_against_float64_on_the_same_noise(dtype, shape):
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x[0, : shape[1] // 3] = -np.inf
    taus = np.array([0.5, 1.0, 2.0, 0.1][: shape[0]])
    g = cf.gumbel_noise(np.empty_like(x), 31, offset=2)
    y, argmax = cf.gumbel_softmax(x, 31, taus, offset=2)
    ly, argmax2 = cf.log_gumbel_softmax(x, 31, taus, offset=2)
    yref, lref = softmax_ref(x, g, taus)
    eps = EPS32 if dtype == np.float32 else 2.0**-53
    # rounding of v = x - m + g in x's dtype is amplified by |z| = |v| / tau
    shifted = np.where(np.isfinite(x), x.astype(np.float64) - x.max(axis=1, keepdims=True), 0.0)
    vabs = (np.abs(shifted) + np.abs(g) + 1) / taus.reshape(-1, 1)
    tol = 8 * eps * vabs
    tiny = np.finfo(dtype).tiny
    assert np.all(np.abs(y - yref) <= tol * yref + 4 * tiny)
    finite = np.isfinite(lref)
    assert np.array_equal(np.isneginf(ly), ~finite)  # masked entries: -inf exactly
    assert np.all(np.abs(ly[finite] - lref[finite]) <= (tol + 8 * eps * np.abs(lref))[finite])
    assert np.all(y[0, : shape[1] // 3] == 0) and np.all(ly[0, : shape[1] // 3] == -np.inf)
    assert np.allclose(y.astype(np.float64).sum(axis=1), 1, atol=64 * eps)
    assert np.array_equal(argmax, cf.gumbel_max(x, 31, offset=2))
    assert np.array_equal(argmax2, argmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_softmax_extreme_temperatures(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 5000)).astype(dtype)
    y, a = cf.gumbel_softmax(x, 2, 1e-30)
    assert np.array_equal(y, np.eye(5000, dtype=dtype)[a])
    y, _ = cf.gumbel_softmax(x, 2, 1e30)
    assert np.allclose(y, 1 / 5000, rtol=1e-5)
    ly, _ = cf.log_gumbel_softmax(x, 2, 1e-30)
    others = np.stack([np.delete(row, i) for row, i in zip(ly, a, strict=True)])
    assert np.all(ly[np.arange(3), a] == 0) and np.all(others < -1e20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_writes_the_one_hot(dtype):
    x = np.random.default_rng(10).standard_normal((4, 3000)).astype(dtype)
    y, a = cf.gumbel_softmax(x, 8, 0.5, hard=True)
    assert np.array_equal(a, cf.gumbel_max(x, 8))
    assert np.array_equal(y, np.eye(3000, dtype=dtype)[a])


def test_gumbel_softmax_distribution_of_argmax():
    logits = np.array([0.5, -0.5, 1.5, 0.0], np.float32)
    x = np.ascontiguousarray(np.broadcast_to(logits, (40_000, 4)))
    y, a = cf.gumbel_softmax(x, 77, 0.3)
    assert chisquare_counts(a, softmax64(logits)) > 1e-3
    assert np.array_equal(np.argmax(y, axis=1), a)


# --------------------------------------------------------------------------- top-k


def test_gumbel_topk_plackett_luce():
    """Ordered pairs (first, second) of Gumbel-top-2 against Plackett-Luce probabilities."""
    logits = np.array([1.0, 0.0, -0.5, 0.7], np.float32)
    w = softmax64(logits)
    x = np.ascontiguousarray(np.broadcast_to(logits, (40_000, 4)))
    vals, idx = cf.gumbel_topk(x, 3, 2)
    assert np.all(np.diff(vals, axis=1) <= 0)
    assert np.array_equal(idx[:, 0], cf.gumbel_max(x, 3))
    pairs = idx[:, 0] * 4 + idx[:, 1]
    probs = np.array([w[i] * w[j] / (1 - w[i]) if i != j else 0.0 for i in range(4) for j in range(4)])
    counts = np.bincount(pairs, minlength=16)
    keep = probs > 0
    assert np.all(counts[~keep] == 0)
    assert stats.chisquare(counts[keep], probs[keep] * 40_000).pvalue > 1e-3


# --------------------------------------------------------------------------- top-p


def top_p_sort_ref(x: np.ndarray, p: float, probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The sort recipe in float64: keep i iff the mass of strictly larger weights is < p Z."""
    th, cnt = [], []
    for row in x.astype(np.float64):
        w = row.copy() if probs else np.exp(row - row.max())
        Z = w.sum()
        if p >= 1.0:  # every token of positive probability (cumsums may round past Z)
            th.append(row[w > 0].min())
            cnt.append(int((w > 0).sum()))
            continue
        order = np.argsort(-w, kind="stable")
        ws = w[order]
        # mass strictly above each distinct value
        uniq, first = np.unique(-ws, return_index=True)
        before = np.concatenate([[0.0], np.cumsum(ws)])[first]
        kept_vals = -uniq[(before < p * Z) & (-uniq > 0)]
        vmin = kept_vals.min()
        keep = w >= vmin
        th.append(row[keep].min())
        cnt.append(int(keep.sum()))
    return np.array(th), np.array(cnt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("probs", "p", "kept"),
    [
        ([0.5, 0.3, 0.2], 0.8, 2),
        ([0.35, 0.1, 0.1, 0.45], 0.8, 2),
        ([0.6, 0.3, 0.1], 0.9, None),
        ([0.7, 0.2, 0.1], 0.9, None),
        ([0.4, 0.4, 0.2], 0.8, None),
        ([0.25, 0.25, 0.25, 0.25], 0.5, 4),
        ([0.25, 0.25, 0.25, 0.25], 1.0, 4),
        ([1.0, 0.0, 0.0], 1.0, 1),
    ],
)
def test_top_p_issue_cases(dtype, probs, p, kept):
    with np.errstate(divide="ignore"):
        x = np.log(np.array([probs], dtype))
    th, cnt = cf.top_p_threshold(x, p)
    th_ref, cnt_ref = top_p_sort_ref(x, p)
    assert np.array_equal(cnt, cnt_ref) and np.array_equal(th, th_ref)
    if kept is not None and (dtype == np.float32 or probs[0] == 0.25 or p == 1.0):
        assert cnt[0] == kept  # float64 logits of 0.5, 0.3 can sum to just below 0.8
    if probs == [0.35, 0.1, 0.1, 0.45] and dtype == np.float32:
        assert set(np.flatnonzero(x[0] >= th[0])) == {0, 3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_equals_sort_recipe(dtype, p):
    rng = np.random.default_rng(11)
    rows = [
        rng.standard_normal(5000),  # flat
        rng.standard_normal(5000) * 6,  # language-model-like, peaked
        np.round(rng.standard_normal(5000) * 2) / 2,  # many ties
        np.where(rng.random(5000) < 0.5, -np.inf, rng.standard_normal(5000)),  # masked
        np.zeros(5000),  # all tied
    ]
    x = np.stack(rows).astype(dtype)
    th, cnt = cf.top_p_threshold(x, p)
    th_ref, cnt_ref = top_p_sort_ref(x, p)
    assert np.array_equal(cnt, cnt_ref) and np.array_equal(th, th_ref)
    probs = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True).astype(np.float64)).astype(dtype)
    _th_p, cnt_p = cf.top_p_threshold(probs, p, probs=True)
    assert np.array_equal(cnt_p, top_p_sort_ref(probs, p, probs=True)[1])


def test_top_p_adversarial_pivots_fall_back_to_a_sort():
    # geometric weights: each pivot keeps few; the result must still equal the sort recipe
    x = np.stack([-np.arange(3000.0) * 0.01, np.linspace(0, -40, 3000)]).astype(np.float64)
    for p in (0.3, 0.999999):
        assert np.array_equal(cf.top_p_threshold(x, p)[1], top_p_sort_ref(x, p)[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_seeded_with_top_p_threshold_draws_from_the_nucleus(dtype):
    """Fused top-p: threshold, then the masked seeded draw; chi-square against the nucleus."""
    logits = np.log(np.array([0.35, 0.1, 0.1, 0.45, 0.0001], dtype))
    x = np.ascontiguousarray(np.broadcast_to(logits, (40_000, 5)))
    th, _cnt = cf.top_p_threshold(x, 0.8)
    ids = cf.sample_seeded(x, np.arange(40_000, dtype=np.int64), min_value=th)
    kept = np.where(logits >= th[0], softmax64(logits), 0.0)
    assert chisquare_counts(ids, kept) > 1e-3
    masked = np.where(x >= th[:, None].astype(dtype), x, -np.inf).astype(dtype)
    assert np.array_equal(ids, cf.sample_seeded(masked, np.arange(40_000, dtype=np.int64)))


def test_noise_loop_uses_512_bit_vectors_on_avx512():
    """The speed hint of _wide_vectors takes effect (zmm registers) where the CPU has AVX-512F,
    and leaves the values alone."""
    import llvmlite.binding as ll

    features = numba.config.CPU_FEATURES or ll.get_host_cpu_features().flatten()
    fresh = numba.njit(error_model="numpy", fastmath={"contract"})(K.noise32_chunk.py_func)  # uncached
    a, b = np.empty(1000, np.float32), np.empty(1000, np.float32)
    fresh(a, np.uint64(cf.mix64_int(5)), 77, 1000)
    K.noise32_chunk(b, np.uint64(cf.mix64_int(5)), 77, 1000)
    assert np.array_equal(a, b)
    if "+avx512f" not in features.split(","):
        pytest.skip("no AVX-512F on this CPU: nothing to check")
    asm = fresh.inspect_asm(fresh.signatures[0])
    # the float32 polynomials on zmm (without the hint LLVM keeps them on ymm, 8 lanes)
    assert re.search(r"vfn?madd\d+ps\s+%zmm", asm), "float32 FMAs not on 512-bit registers"


def test_docstring_examples():
    import doctest

    result = doctest.testmod(cf, extraglobs={"torch": torch, "np": np}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_unwritable_cache_falls_back_to_compiling(tmp_path):
    """No writable cache location (read-only install, no home): import works, with a warning."""
    import subprocess
    import sys

    code = (
        "import warnings, numpy as np\n"
        "from numba.core import caching\n"
        "impl = getattr(caching, 'CacheImpl', None) or caching._CacheImpl\n"
        "impl._locator_classes = []\n"  # as if every location were read-only
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from gumbelkit._kernels import cpu_fused as cf\n"
        "    assert cf.available()\n"
        "assert any('NUMBA_CACHE_DIR' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert cf.cache_info()['enabled'] is False\n"
        "print(cf.gumbel_noise(np.empty(3, np.float64), 7).round(6).tolist())\n"
    )
    src = str(Path(cf.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = torch_noise(7, np.arange(3)).round(6).tolist()
    assert res.stdout.strip().splitlines()[-1] == str(ref)


# --------------------------------------------------------------------------- the fused backward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7), (5, 40_000), (70, 1000)])
def test_softmax_backward_matches_float64(dtype, shape):
    rng = np.random.default_rng(0)
    y = rng.dirichlet(np.ones(shape[1]) * 0.3, size=shape[0]).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    tau = rng.uniform(0.1, 2.0, shape[0])
    got = cf.softmax_backward(y, g, tau)
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    want = y64 * (g64 - (y64 * g64).sum(-1, keepdims=True)) / tau[:, None]
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert got.dtype == dtype
    assert np.abs(got - want).max() <= tol * (1 + np.abs(g64).max())
    assert np.array_equal(cf.softmax_backward(y, g, float(tau[0]))[0], cf.softmax_backward(y[:1], g[:1], tau[0])[0])


def test_softmax_backward_keeps_nan_and_rejects_bad_input():
    y = np.full((1, 4), 0.25)
    g = np.array([[1.0, np.nan, 0.0, 0.0]])
    assert np.isnan(cf.softmax_backward(y, g)).all()  # a NaN gradient is not hidden
    with pytest.raises(ValueError, match="grad must match"):
        cf.softmax_backward(y, g[:, :3])
    with pytest.raises(ValueError, match="tau"):
        cf.softmax_backward(y, g, 0.0)


def test_eager_backward_uses_the_fused_kernel_and_agrees(monkeypatch):
    """The eager gradient (fused kernel) equals the plain-ops formula's to rounding."""
    import gumbelkit as gk
    from gumbelkit._kernels import gumbel_softmax as gsm

    monkeypatch.setenv("GUMBELKIT_BACKEND", "numba")
    calls = []
    real = gsm._fused_backward
    monkeypatch.setattr(gsm, "_fused_backward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(gsm, "_fused_backward", lambda *a: None)
        y = gk.gumbel_softmax(x, tau=0.4, hard=True, generator=torch.Generator().manual_seed(2))
        (g,) = torch.autograd.grad((y * w).sum(), x)
        grads.append(g)
    assert calls and calls[0] == 1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)

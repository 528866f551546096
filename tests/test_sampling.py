"""Token sampling (gumbelkit.sampling) and counter-based noise (gumbelkit._counter_noise).

Statistical tests: each uses its own fixed seeds; the threshold is p > 1e-3 (chi-square or
KS), so a correct sampler fails one of them under fresh seeds about once in a thousand runs.
The processed distribution is computed here in float64 straight from the definitions in
the docstring of ``sample`` (O(V^2), obviously right), not from the library's code.
"""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import gumbelkit._counter_noise as cn
import gumbelkit.sampling as sampling
import reference as ref
from gumbelkit._kernels import cpu_fused
from gumbelkit.noise import gumbel_noise_like
from gumbelkit.sampling import sample

# every test runs on the fused numba kernels (where installed; else the default) and on the torch path
pytestmark = pytest.mark.usefixtures("backend")
FUSED = cpu_fused.available()


@pytest.fixture(params=["fused", "torch"])
def backend(request, monkeypatch):
    """The fused kernels at every size (``GUMBELKIT_BACKEND=numba``: ``auto`` would send the
    small inputs of most tests to the torch path), and the torch path."""
    value = "torch" if request.param == "torch" else ("numba" if FUSED else "auto")
    monkeypatch.setenv("GUMBELKIT_BACKEND", value)
    return request.param


NEG_INF = float("-inf")
P_MIN = 1e-3
N_DRAWS = 200_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- the exact reference


def processed_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """The processed distribution of one row, in float64, from the definitions."""
    l = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(l.argmax(), len(l)).double()
    z = (l - l.max()) / temperature
    finite = z > NEG_INF
    keep = finite.clone()
    # "the n largest", ties included (all possible tokens when there are fewer)
    nth = z.sort(descending=True).values[min(min_tokens_to_keep, int(finite.sum())) - 1]
    at_least = finite & (z >= nth)
    if top_k and max(top_k, min_tokens_to_keep) < len(z):  # K1: ties with the k'-th included
        keep &= z >= z.sort(descending=True).values[max(top_k, min_tokens_to_keep) - 1]
    if top_p is not None and top_p < 1:  # K2: the mass of strictly more probable tokens < p
        pi = torch.softmax(z.masked_fill(~keep, NEG_INF), 0)
        greater = (z.unsqueeze(0) > z.unsqueeze(1)) & keep.unsqueeze(0)  # [i, j]: z_j > z_i
        keep &= ((greater.double() * pi.unsqueeze(0)).sum(1) < top_p) | at_least
    if min_p:  # K3
        keep &= (z >= z[keep].max() + math.log(min_p)) | at_least
    return torch.softmax(z.masked_fill(~keep, NEG_INF), 0)


def chi2_pvalue(ids: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of token counts against ``probs``; cells with expectation < 5 pooled."""
    counts = torch.bincount(ids, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0, "a token outside the processed distribution was drawn"
    expected = probs * counts.sum()
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if (~big & (probs > 0)).any():
        obs = torch.cat([obs, counts[~big].sum().reshape(1)])
        exp = torch.cat([exp, expected[~big].sum().reshape(1)])
    if len(obs) == 1:
        return 1.0
    return stats.chisquare(obs.numpy(), exp.numpy()).pvalue


def test_reference_on_a_hand_example():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()

    def expect(*probs):
        return torch.tensor(probs, dtype=torch.float64) / sum(probs)

    # top_p=0.65: 0.4 < 0.65 keeps 0.3; the mass before 0.2 is 0.7 >= 0.65, so 0.2 goes.
    assert torch.allclose(processed_probs(logits, top_p=0.65), expect(0.4, 0.3, 0, 0))
    assert torch.allclose(processed_probs(logits, top_p=0.75), expect(0.4, 0.3, 0.2, 0))
    assert torch.allclose(processed_probs(logits, top_k=2), expect(0.4, 0.3, 0, 0))
    assert torch.allclose(processed_probs(logits, min_p=0.5), expect(0.4, 0.3, 0.2, 0))
    assert torch.allclose(processed_probs(logits, temperature=0.5), expect(0.16, 0.09, 0.04, 0.01))
    ties = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert (processed_probs(ties, top_k=1) > 0).tolist() == [False, True, True, False]


# ----------------------------------------------------------- frequencies vs the exact law

LOGITS = torch.randn(24, generator=gen(1)) * 1.5
COMBOS = list(itertools.product([1.0, 0.6], [None, 7], [None, 0.8], [None, 0.1]))
# The generator only changes where the noise comes from: a few combinations suffice there.
GENERATOR_COMBOS = [
    (1.0, None, None, None),
    (0.6, None, 0.8, None),
    (1.0, 7, None, 0.1),
    (0.6, 7, 0.8, 0.1),
]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p, source",
    [(*c, "seeds") for c in COMBOS] + [(*c, "generator") for c in GENERATOR_COMBOS],
)
def test_frequencies_match_processed_distribution(temperature, top_k, top_p, min_p, source):
    case = COMBOS.index((temperature, top_k, top_p, min_p))
    rows = LOGITS.expand(N_DRAWS, -1)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if source == "seeds":
        ids = sample(rows, seeds=torch.arange(N_DRAWS) + N_DRAWS * case, **kwargs)
    else:
        ids = sample(rows, generator=gen(100 + case), **kwargs)
    probs = processed_probs(LOGITS, **kwargs)
    assert chi2_pvalue(ids, probs) > P_MIN


@pytest.fixture
def tiny_candidates(monkeypatch):
    """Force top-p through every stage: 2 candidates, then a histogram search of 4 bins per level
    that refines until at most 2 tokens are left (several levels), small float64 chunks."""
    monkeypatch.setattr(sampling, "_FIRST_CANDIDATES", 2)
    monkeypatch.setattr(sampling, "_SORT_FRACTION", 0.5)
    monkeypatch.setattr(sampling, "_BINS", 4)
    monkeypatch.setattr(sampling, "_CAP", 2)
    monkeypatch.setattr(sampling, "_CHUNK_ELEMENTS", 1 << 16)


@pytest.mark.parametrize("top_p, min_p, seed", [(0.3, None, 0), (0.9, None, 1), (0.97, 0.02, 2)])
def test_growing_candidates_match_processed_distribution(tiny_candidates, top_p, min_p, seed):
    logits = torch.randn(24, generator=gen(10 + seed))
    ids = sample(logits.expand(N_DRAWS, -1), top_p=top_p, min_p=min_p, seeds=torch.arange(N_DRAWS) * 7 + seed)
    assert chi2_pvalue(ids, processed_probs(logits, top_p=top_p, min_p=min_p)) > P_MIN


@pytest.mark.parametrize("top_k, top_p", [(2, None), (3, 0.6), (None, 0.5), (None, 0.75)])
def test_ties_at_the_boundary_are_kept(tiny_candidates, top_k, top_p):
    """Tied logits at the top-k / top-p boundary are all kept (also when the ties spill
    beyond the first candidate set), so the result never depends on an arbitrary tie order."""
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.0, -1.0])
    probs = processed_probs(logits, top_k=top_k, top_p=top_p)
    assert (probs > 0).sum() >= 4  # the tie group is kept whole
    ids = sample(logits.expand(N_DRAWS, -1), top_k=top_k, top_p=top_p, seeds=torch.arange(N_DRAWS))
    assert chi2_pvalue(ids, probs) > P_MIN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    logits = LOGITS.to(dtype)
    ids = sample(logits.expand(N_DRAWS, -1), temperature=0.8, top_p=0.9, seeds=torch.arange(N_DRAWS) + 5)
    assert chi2_pvalue(ids, processed_probs(logits, temperature=0.8, top_p=0.9)) > P_MIN


@pytest.mark.parametrize(
    "first, fraction, bins, cap, pack",
    [
        (2, 0.5, 4, 2, 0.125),
        (1 << 20, 0.25, 2048, 512, 0.125),
        (256, 1e-9, 2048, 512, 0.125),
        (1, 0.25, 3, 1, 0.125),
        (256, 0.25, 2048, 512, 0.0),
        (0, 0.25, 2048, 512, 1.0),
    ],
)
def test_candidate_strategy_never_changes_the_token(monkeypatch, first, fraction, bins, cap, pack):
    """The kept set is defined by values, and seeded noise by token id: candidates first or
    not, a many-level histogram search, one candidate set the size of the row, always the full
    sort, drawing over packed kept tokens or over whole rows: the same tokens and the same
    log-probabilities."""
    logits, params, seeds = _mixed_batch()
    expect = sample(logits, seeds=seeds, return_logprobs=True, **params)
    monkeypatch.setattr(sampling, "_FIRST_CANDIDATES", first)
    monkeypatch.setattr(sampling, "_SORT_FRACTION", fraction)
    monkeypatch.setattr(sampling, "_BINS", bins)
    monkeypatch.setattr(sampling, "_CAP", cap)
    monkeypatch.setattr(sampling, "_PACK_FRACTION", pack)
    got = sample(logits, seeds=seeds, return_logprobs=True, **params)
    assert torch.equal(got.ids, expect.ids)
    assert torch.equal(got.logprobs, expect.logprobs)


def test_nucleus_sizes_of_the_mixed_batch_reach_every_stage():
    """The mixed batch has nuclei smaller and larger than the histogram's final bin and than the
    packed-draw limit, so the tests above go through every stage with the default sizes."""
    logits, params, _ = _mixed_batch()
    sizes = [
        int((processed_probs(logits[r], top_p=params["top_p"][r].item()) > 0).sum())
        for r in range(64)
        if params["top_k"][r] == 0 and params["top_p"][r] < 1
    ]
    vocab = logits.shape[1]
    assert min(sizes) < sampling._CAP < max(sizes)
    assert min(sizes) < sampling._PACK_FRACTION * vocab < max(sizes)


# ------------------------------------------------------------------ greedy, log-probs


def test_greedy_is_argmax_per_row():
    logits = torch.randn(64, 500, generator=gen(5))
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # a tie: the lowest id wins
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert sample(logits, temperature=0.0)[3] == 10
    temps = torch.tensor([0.0, 1.0] * 32)
    out = sample(logits, temperature=temps, top_k=5, seeds=torch.arange(64), return_logprobs=True)
    assert torch.equal(out.ids[::2], logits[::2].argmax(-1))
    assert torch.equal(out.logprobs[::2], torch.zeros(32))
    assert (out.logprobs[1::2] < 0).all()


def test_logprobs_are_those_of_the_processed_distribution():
    logits = torch.randn(8, 300, generator=gen(6)) * 2
    settings = [
        dict(),
        dict(temperature=0.5),
        dict(top_k=10),
        dict(top_p=0.8),
        dict(min_p=0.05),
        dict(temperature=1.3, top_k=50, top_p=0.95, min_p=0.01),
        dict(top_k=1),
        dict(top_p=0.01),
    ]
    for kwargs in settings:
        for source in (dict(seeds=torch.arange(8)), dict(generator=gen(7))):
            out = sample(logits, return_logprobs=True, **kwargs, **source)
            for row in range(8):
                q = processed_probs(logits[row], **kwargs)
                assert q[out.ids[row]] > 0
                assert abs(out.logprobs[row].item() - q[out.ids[row]].log().item()) < 1e-5, kwargs


# ------------------------------------------------------------------- batch invariance


def _mixed_batch():
    """64 rows of different shapes and parameters: every path of `sample` in one batch."""
    g = gen(8)
    vocab = 3000
    scale = torch.tensor([0.2, 1.0, 3.0, 6.0]).repeat(16).unsqueeze(-1)
    logits = torch.randn(64, vocab, generator=g) * scale
    logits[5, 100:] = NEG_INF  # fewer possible tokens than candidates
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.5]).repeat_interleave(16)
    top_k = torch.tensor([0, 0, 40, 0, 3000, 1, 0, 7]).repeat(8)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0, 0.99, 0.3, 1.0]).repeat_interleave(8)
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0]).repeat(16)
    seeds = torch.randint(-(2**63), 2**63 - 1, (64,), generator=g)
    return logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), seeds


def test_batch_invariance():
    logits, params, seeds = _mixed_batch()
    full = sample(logits, seeds=seeds, return_logprobs=True, **params)
    # Permuted, and each row embedded at another position among other rows.
    perm = torch.randperm(64, generator=gen(9))
    shuffled = sample(
        logits[perm],
        seeds=seeds[perm],
        return_logprobs=True,
        **{k: v[perm] for k, v in params.items()},
    )
    assert torch.equal(shuffled.ids, full.ids[perm])
    assert torch.equal(shuffled.logprobs, full.logprobs[perm])
    for row in range(64):
        alone = sample(
            logits[row : row + 1],
            seeds=seeds[row : row + 1],
            return_logprobs=True,
            **{k: v[row].item() for k, v in params.items()},
        )  # scalars, batch of one
        assert alone.ids.item() == full.ids[row].item(), row
        assert torch.equal(alone.logprobs, full.logprobs[row : row + 1]), row


def test_a_row_does_not_depend_on_its_neighbours():
    logits, params, seeds = _mixed_batch()
    base = sample(logits, seeds=seeds, **params)
    other = logits.clone()
    other[1:] = torch.randn(63, logits.shape[1], generator=gen(10)) * 0.1  # flat neighbours: a full sort
    assert sample(other, seeds=seeds, **params)[0] == base[0]


def test_generator_reproducible_and_follows_the_noise_contract(monkeypatch):
    monkeypatch.setenv("GUMBELKIT_BACKEND", "torch")  # the torch path's noise (the fused one: below)
    logits = torch.randn(16, 100, generator=gen(11))
    a = sample(logits, top_p=0.9, temperature=0.8, generator=gen(12))
    assert torch.equal(a, sample(logits, top_p=0.9, temperature=0.8, generator=gen(12)))
    # One int64 seed is drawn from the generator; without truncation the noise is
    # gumbel_noise_like((logits - max) / T) from a generator seeded with the row stream's seed.
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=gen(13))
    z = (logits - logits.amax(-1, keepdim=True)) / 0.8
    stream = int(sampling._stream_seed(seed, sampling._STREAM_ROWS)) & (2**64 - 1)
    expect = (z + gumbel_noise_like(z, generator=gen(stream))).argmax(-1)
    assert torch.equal(sample(logits, temperature=0.8, generator=gen(13)), expect)


def test_seeded_noise_is_the_counter_stream():
    logits = torch.randn(4, 50, generator=gen(14))
    seeds = torch.tensor([0, 1, -5, 2**62])
    z = logits - logits.amax(-1, keepdim=True)  # shifted, then float64 noise
    expect = (z + cn.counter_gumbel(seeds.unsqueeze(-1), torch.arange(50), torch.float64)).argmax(-1)
    assert torch.equal(sample(logits, seeds=seeds), expect)


@given(
    st.integers(1, 6),
    st.integers(2, 60),
    st.floats(0.05, 1.0),
    st.integers(0, 8),
    st.floats(0.0, 0.5),
    st.integers(0, 2**31),
)
def test_property_token_is_kept_and_logprob_matches(batch, vocab, top_p, top_k, min_p, seed):
    g = gen(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    logits[torch.rand(batch, vocab, generator=g) < 0.2] = NEG_INF
    logits[:, 0] = 0.0  # every row has a possible token
    out = sample(
        logits,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seeds=torch.arange(batch) + seed,
        return_logprobs=True,
    )
    for row in range(batch):
        q = processed_probs(logits[row], top_k=top_k, top_p=top_p, min_p=min_p)
        assert q[out.ids[row]] > 0
        assert abs(out.logprobs[row].item() - q[out.ids[row]].log().item()) < 1e-4


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-0.5), ValueError, r"temperature must lie in \[0.0"),
        (dict(temperature=float("nan")), ValueError, "temperature must lie in"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature=torch.ones(3)), ValueError, r"shape \(2,\)"),
        (dict(temperature=torch.ones(2, dtype=torch.int64)), TypeError, "floating-point tensor"),
        (dict(temperature="hot"), TypeError, "temperature must be a float"),
        (dict(top_k=-1), ValueError, "top_k must lie in"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "integer tensor"),
        (dict(top_p=0.0), ValueError, r"top_p must lie in \(0.0, 1.0\]"),
        (dict(top_p=1.5), ValueError, "top_p must lie in"),
        (dict(top_p=torch.tensor([0.5, float("nan")])), ValueError, "top_p must lie in"),
        (dict(min_p=-0.1), ValueError, "min_p must lie in"),
        (dict(min_p=1.1), ValueError, "min_p must lie in"),
        (dict(seeds=torch.arange(2).int()), TypeError, "seeds must be an int64 tensor"),
        (dict(seeds=[1, 2]), TypeError, "seeds must be an int64 tensor"),
        (dict(seeds=torch.arange(3)), ValueError, r"seeds must have shape \(2,\)"),
        (dict(seeds=torch.arange(2), generator=torch.Generator()), ValueError, "not both"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(return_logprobs=1), TypeError, "return_logprobs must be a bool"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample(torch.zeros(2, 5), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(top_k=2),
        dict(top_p=0.5),
        dict(temperature=0.0),
        dict(min_p=0.1),
        dict(generator=torch.Generator()),
    ],
)
def test_bad_logits_name_the_row(kwargs):
    for value, match in (
        (float("nan"), r"row\(s\) \[1\] contain NaN"),
        (float("inf"), r"\[1\] contain \+inf"),
    ):
        logits = torch.zeros(3, 6)
        logits[1, 2] = value
        with pytest.raises(ValueError, match=match):
            sample(logits, **kwargs)
    logits = torch.zeros(3, 6)
    logits[2] = NEG_INF
    with pytest.raises(ValueError, match=r"\[2\] contain only -inf"):
        sample(logits, **kwargs)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"shape \(batch, vocab\).*unsqueeze"):
        sample(torch.zeros(5))
    with pytest.raises(ValueError, match="empty vocabulary"):
        sample(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="real floating-point"):
        sample(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        sample([[0.0, 1.0]])
    # Formerly "temperature is too small": logits / T overflows, the T -> 0 limit is greedy.
    assert sample(torch.tensor([[1e30, 0.0]]), temperature=1e-30).item() == 0
    assert sample(torch.zeros(0, 4), seeds=torch.zeros(0, dtype=torch.int64)).shape == (0,)


# ------------------------------------------------------------------ counter-based noise


def _py_mix64(z: int) -> int:
    """SplitMix64's finalizer on Python ints (Steele et al. 2014), the reference."""
    mask = 2**64 - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_matches_the_reference_and_the_published_splitmix64_stream():
    random = torch.randint(-(2**63), 2**63 - 1, (200,), generator=gen(15)).tolist()
    xs = [0, 1, 2, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF, *random]
    got = cn.mix64(torch.tensor(xs)).tolist()
    assert [v % 2**64 for v in got] == [_py_mix64(x) for x in xs]
    # SplitMix64 seeded with 1234567: its first outputs (the reference C implementation).
    state = torch.tensor(1234567) + torch.arange(1, 4) * cn.GAMMA
    assert [v % 2**64 for v in cn.mix64(state).tolist()] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
    ]


def test_counter_uniform_is_its_formula():
    seeds, pos = torch.tensor([[3], [-9]]), torch.arange(100)
    u = cn.counter_uniform(seeds, pos)
    for s, row in zip([3, -9], u.tolist(), strict=True):
        key = _py_mix64(s)
        for p, value in enumerate(row):
            h = _py_mix64(key + p * 0x9E3779B97F4A7C15)
            assert value == ((h >> 12) + 0.5) / 2**52


def test_counter_uniform_open_interval_at_the_extremes(monkeypatch):
    """The extreme hashes map to 2^-53 and 1 - 2^-53: never 0, never 1, Gumbel finite."""
    monkeypatch.setattr(cn, "_hash", lambda seeds, positions: torch.tensor([0, -1, 2**63 - 1, -(2**63)]))
    u = cn.counter_uniform(torch.tensor(0), torch.tensor(0))
    assert u[0] == 2.0**-53 and u[1] == 1 - 2.0**-53 and ((u > 0) & (u < 1)).all()
    g = cn.counter_gumbel(torch.tensor(0), torch.tensor(0))
    assert torch.isfinite(g).all() and g.min() > -4 and g.max() < 37


def test_counter_uniform_ks_across_positions_and_seeds():
    along = cn.counter_uniform(torch.tensor(42), torch.arange(N_DRAWS))
    across = cn.counter_uniform(torch.arange(N_DRAWS), torch.tensor(7))
    assert stats.kstest(along.numpy(), "uniform").pvalue > P_MIN
    assert stats.kstest(across.numpy(), "uniform").pvalue > P_MIN
    g = cn.counter_gumbel(torch.tensor(3), torch.arange(N_DRAWS))
    assert stats.kstest(g.numpy(), "gumbel_r").pvalue > P_MIN


def test_counter_uniform_independence():
    """Neighbouring positions, neighbouring seeds and the two halves of the bits look independent:
    correlations within 5 standard errors of 0, and a 16x16 chi-square on consecutive pairs."""
    n = N_DRAWS
    u = cn.counter_uniform(torch.arange(4).unsqueeze(-1), torch.arange(n))  # 4 adjacent seeds
    bound = 5 / math.sqrt(n)
    for a, b in [(u[0, :-1], u[0, 1:]), (u[0], u[1]), (u[1], u[2]), (u[0], u[3])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound
    cells = (u[0, ::2] * 16).long() * 16 + (u[0, 1::2] * 16).long()
    counts = torch.bincount(cells, minlength=256).double()
    assert stats.chisquare(counts.numpy()).pvalue > P_MIN


def test_counter_noise_is_layout_independent():
    """The same (seed, position) gives the same bits in any shape, slice or batch."""
    seeds = torch.tensor([5, -7, 2**40])
    full = cn.counter_gumbel(seeds.unsqueeze(-1), torch.arange(1003), torch.float32)
    for a, b in [(0, 1003), (3, 17), (500, 1003), (999, 1000)]:
        part = cn.counter_gumbel(seeds[1:2].unsqueeze(-1), torch.arange(a, b), torch.float32)
        assert torch.equal(part, full[1:2, a:b])
    assert torch.equal(cn.counter_gumbel(seeds[2], torch.arange(1003), torch.float32), full[2])
    shuffled = torch.randperm(1003, generator=gen(16))
    assert torch.equal(cn.counter_gumbel(seeds[0], shuffled, torch.float32), full[0, shuffled])


def test_counter_noise_bad_input():
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        cn.counter_uniform(torch.tensor([1.0]), torch.arange(3))
    with pytest.raises(TypeError, match="positions must be an int64"):
        cn.counter_uniform(torch.tensor([1]), [1, 2])
    with pytest.raises(ValueError, match="do not broadcast"):
        cn.counter_uniform(torch.arange(2), torch.arange(3))
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        cn.counter_gumbel(torch.tensor(1), torch.arange(3), dtype=torch.int64)
    with pytest.raises(TypeError, match="mix64 takes an int64 tensor"):
        cn.mix64(torch.tensor([1.0]))


@pytest.mark.parametrize(
    "module",
    ["gumbelkit.sampling", "gumbelkit._counter_noise", "gumbelkit.distributed", "gumbelkit._ddp"],
)
def test_docstring_examples(module):
    mod = __import__(module, fromlist=["_"])
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------- exactness at the edges (issue 11, items 2 and 3)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SOURCES = ["seeds", "generator"]
OPTIONS = [
    dict(),
    dict(top_k=2),
    dict(top_p=0.9),
    dict(min_p=0.5),
    dict(top_k=2, top_p=0.99, min_p=0.01, min_tokens_to_keep=2),
]


def _draw(rows: torch.Tensor, source: str, salt: int, **kwargs) -> torch.Tensor:
    if source == "seeds":
        return sample(rows, seeds=torch.arange(rows.shape[0]) + 1_000_003 * salt, **kwargs)
    return sample(rows, generator=gen(5000 + salt), **kwargs)


def _assert_fair(n0: int, n1: int, what: object) -> None:
    """Two outcomes of probability 1/2 each: |n0 - n1| within 5 binomial standard deviations."""
    assert abs(n0 - n1) <= 5 * math.sqrt(n0 + n1), (n0, n1, what)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("temperature", [1e-6, 1e-7, 1e-38, 1e-300])
def test_issue_example_tie_at_tiny_temperature(source, temperature):
    """sample([[20, 20, 5]], T) gives ids 0 and 1 with probability 1/2 each (was 0.74 / 1.0)."""
    ids = _draw(torch.tensor([[20.0, 20.0, 5.0]]).expand(20_000, -1), source, 1, temperature=temperature)
    counts = torch.bincount(ids, minlength=3).tolist()
    assert counts[2] == 0
    _assert_fair(counts[0], counts[1], temperature)


@pytest.mark.parametrize("option", range(len(OPTIONS)))
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_way_ties_are_fair_at_any_scale_and_temperature(dtype, source, option):
    """Rows [s, s, low]: ids 0 and 1 win equally often for scores s from 1 to 1e30 (what the
    dtype holds) and temperatures from 1 down to 1e-300, in every dtype, noise source and
    truncation path. 3000 rows per (s, T); a 5-sigma band per group."""
    scales = [1.0, -3.0, 1e4, 6e4] if dtype == torch.float16 else [1.0, -3.0, 1e4, 1e7, 1e30]
    temps = [1.0, 1e-3, 1e-6, 1e-7, 1e-38, 1e-300]
    n = 3000
    groups = list(itertools.product(scales, temps))
    rows = torch.cat([torch.tensor([s, s, s - max(abs(s) / 2, 2.0)], dtype=dtype).expand(n, -1) for s, _ in groups])
    temperature = torch.tensor([t for _, t in groups], dtype=torch.float64).repeat_interleave(n)
    ids = _draw(rows, source, option, temperature=temperature, **OPTIONS[option]).view(len(groups), n)
    for g, (s, t) in enumerate(groups):
        counts = torch.bincount(ids[g], minlength=3).tolist()
        if t <= 1e-3:
            assert counts[2] == 0, (s, t)
        _assert_fair(counts[0], counts[1], (s, t))


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=3), dict(top_p=0.99), dict(min_p=0.1)])
@pytest.mark.parametrize("source", SOURCES)
def test_noise_ties_are_broken_uniformly(monkeypatch, source, kwargs):
    monkeypatch.setenv("GUMBELKIT_BACKEND", "torch")  # patches the torch path's noise
    """With noise that always ties (zeros), the tied maxima win uniformly, not the lowest id."""
    monkeypatch.setattr(
        sampling, "_noise", lambda z, pos, seeds, noise_seed, stream: torch.zeros(z.shape, dtype=torch.float64)
    )
    logits = torch.tensor([[0.0, 0.0, 0.0, -1.0]]).expand(30_000, -1)
    counts = torch.bincount(_draw(logits, source, 2, **kwargs), minlength=4)
    assert counts[3] == 0
    assert stats.chisquare(counts[:3].numpy()).pvalue > P_MIN


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_and_tiny_temperatures_do_not_raise(dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0, NEG_INF]], dtype=dtype).expand(4000, -1)
    for t in (1e-38, 1e-300, 5e-324):
        out = sample(logits, temperature=t, seeds=torch.arange(4000), return_logprobs=True)
        counts = torch.bincount(out.ids, minlength=5).tolist()
        assert counts[0] == counts[3] == counts[4] == 0
        _assert_fair(counts[1], counts[2], t)
        assert torch.allclose(out.logprobs.double(), torch.full((4000,), -math.log(2), dtype=torch.float64), atol=1e-3)
    flat = sample(logits, temperature=1e30, seeds=torch.arange(4000))  # nearly uniform on 4 tokens
    assert torch.bincount(flat, minlength=5)[:4].min() > 800


NAMED_TOP_P = [
    ([0.5, 0.3, 0.2], 0.8, [True, True, False]),
    ([0.35, 0.1, 0.1, 0.45], 0.8, [True, False, False, True]),
    ([0.6, 0.3, 0.1], 0.9, None),
    ([0.7, 0.2, 0.1], 0.9, None),
    ([0.4, 0.4, 0.2], 0.8, None),
]


@pytest.mark.parametrize("probs, top_p, expect", NAMED_TOP_P)
def test_named_top_p_rows_match_the_exact_and_transformers_sets(probs, top_p, expect):
    logits = torch.log(torch.tensor([probs]))
    exact = ref.exact_top_p_keep(logits[0], top_p)
    if expect is not None:
        assert exact == expect
    assert (ref.hf_top_p(logits, top_p) > NEG_INF)[0].tolist() == exact  # transformers agrees
    assert sampling._kept_mask(logits, top_p=top_p)[0].tolist() == exact


STRATEGIES = {
    "default": {},
    "candidates": dict(_FIRST_CANDIDATES=2),
    "histogram": dict(_BINS=3, _CAP=1, _PACK_FRACTION=1.0),
    "sort": dict(_SORT_FRACTION=1e-9, _PACK_FRACTION=0.0),
}


def _variants(logits: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """The same rows through every path: plain, a no-op top-k (an extra impossible token), a
    no-op min-p, and both."""
    extra = torch.cat([logits, torch.full_like(logits[:, :1], NEG_INF)], -1)
    v = logits.shape[1]
    return [
        (logits, {}),
        (extra, dict(top_k=v)),
        (logits, dict(min_p=1e-12)),
        (extra, dict(top_k=v, min_p=1e-12)),
    ]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("probs, top_p, expect", NAMED_TOP_P)
def test_named_top_p_rows_on_every_path(monkeypatch, strategy, probs, top_p, expect):
    """The five rows of the issue draw only their exact nucleus, at its renormalized
    frequencies, on every path (candidates, histogram search, full sort; with and without a
    no-op top-k or min-p; seeds or generator)."""
    for name, value in STRATEGIES[strategy].items():
        monkeypatch.setattr(sampling, name, value)
    logits = torch.log(torch.tensor([probs]))
    keep = torch.tensor(ref.exact_top_p_keep(logits[0], top_p))
    q = torch.tensor(probs, dtype=torch.float64) * keep
    q /= q.sum()
    for salt, (rows, extra) in enumerate(_variants(logits)):
        for source in SOURCES:
            ids = _draw(rows.expand(20_000, -1), source, salt, top_p=top_p, **extra)
            assert chi2_pvalue(ids, torch.cat([q, torch.zeros(rows.shape[1] - len(q), dtype=q.dtype)])) > P_MIN


def _near_p_rows(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``dtype`` and per-row top_p within 1e-7 of an exact prefix mass (both sides)."""
    g = gen(seed)
    rows, ps = [], []
    for delta in (-1e-7, -3e-8, -1e-9, 1e-9, 3e-8, 1e-7):
        for _ in range(4):
            row = (torch.randn(12, generator=g) * 2).to(dtype)
            w = torch.exp(row.double() - row.double().max())
            masses = (w.sort(descending=True).values.cumsum(0) / w.sum()).tolist()
            j = int(torch.randint(0, 10, (), generator=g))
            rows.append(row)
            ps.append(masses[j] + delta)
    return torch.stack(rows), torch.tensor(ps, dtype=torch.float64)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_p_within_1e7_of_p_on_every_path(monkeypatch, strategy, dtype):
    """Rows whose prefix mass lies within 1e-7 of p (on either side) keep the exact set (exact
    rational arithmetic on the float64 weights): the kept mask, and every draw's token and
    log-probability, on every path and noise source."""
    for name, value in STRATEGIES[strategy].items():
        monkeypatch.setattr(sampling, name, value)
    logits, ps = _near_p_rows(dtype, seed=21 + DTYPES.index(dtype))
    exact = torch.tensor([ref.exact_top_p_keep(row, p) for row, p in zip(logits, ps.tolist(), strict=True)])
    assert torch.equal(sampling._kept_mask(logits, top_p=ps), exact)
    for salt, (rows, extra) in enumerate(_variants(logits)):
        keep = torch.cat([exact, torch.zeros(len(rows), rows.shape[1] - exact.shape[1], dtype=torch.bool)], -1)
        z = rows.double() - rows.double().amax(-1, keepdim=True)
        log_norm = torch.logsumexp(z.masked_fill(~keep, NEG_INF), -1)
        for rep in range(10):
            for source in SOURCES:
                batch = rows.repeat(20, 1)
                out = _draw(batch, source, 100 * salt + rep, top_p=ps.repeat(20), return_logprobs=True, **extra)
                kept = keep.repeat(20, 1).gather(-1, out.ids.unsqueeze(-1)).squeeze(-1)
                assert kept.all(), (strategy, salt, source)
                expect = z.repeat(20, 1).gather(-1, out.ids.unsqueeze(-1)).squeeze(-1) - log_norm.repeat(20)
                assert torch.allclose(out.logprobs.double(), expect, atol=1e-5)


def _sort_reference_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The sort recipe, tie-inclusive and in float64: sort, cumulative mass, the first token
    whose cumulative mass reaches p sets the threshold."""
    z = logits.double() - logits.double().amax(-1, keepdim=True)
    v, order = z.sort(-1, descending=True)
    cum = v.exp().cumsum(-1)
    j = (cum < top_p * cum[:, -1:]).sum(-1, keepdim=True)
    threshold = logits.gather(-1, order.gather(-1, j))
    return logits >= threshold


@pytest.mark.parametrize("kind", ["flat", "lm", "ties", "bf16", "masked"])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_sort_free_search_equals_the_sort_recipe(kind, top_p):
    """The histogram search keeps exactly the sort recipe's set: flat rows, LM-like rows, rows
    with many ties at the boundary (values on a coarse grid, bfloat16), rows with -inf."""
    g = gen(40)
    x = torch.randn(6, 20_000, generator=g)
    logits = {
        "flat": x * 0.1,
        "lm": x * 3,
        "ties": (x * 20).round() / 20,
        "bf16": (x * 0.5).bfloat16(),
        "masked": (x * 0.3).masked_fill(torch.rand(6, 20_000, generator=g) < 0.5, NEG_INF),
    }[kind]
    assert torch.equal(sampling._kept_mask(logits, top_p=top_p), _sort_reference_keep(logits, top_p))


def test_ties_at_the_top_p_boundary_are_kept_whole():
    """A tie group that crosses p is kept whole (transformers keeps a sort-order-dependent part)."""
    logits = torch.tensor([[2.0] + [1.0] * 5000 + [0.0] * 5000])
    for p in (0.01, 0.3, 0.6):
        keep = sampling._kept_mask(logits, top_p=p)[0]
        assert keep[:5001].all() and not keep[5001:].any()


# ------------------------------------------------------------------- min_tokens_to_keep


@pytest.mark.parametrize("n", [1, 2, 4])
def test_min_tokens_to_keep_matches_transformers(n):
    """Tie-free rows: the kept sets equal transformers' warpers' with min_tokens_to_keep."""
    logits = torch.randn(4, 30, generator=gen(41), dtype=torch.float64) * 2
    settings = itertools.product([0, 1, 5], [1.0, 0.05, 0.5], [None, 0.5, 0.99], [1.0, 0.7])
    for top_k, top_p, min_p, t in settings:
        ours = sampling._kept_mask(
            logits, temperature=t, top_k=top_k, top_p=top_p, min_p=min_p or 0.0, min_tokens_to_keep=n
        )
        theirs = (
            ref.hf_processed_probs(logits, temperature=t, top_k=top_k, top_p=top_p, min_p=min_p, min_tokens_to_keep=n)
            > 0
        )
        assert torch.equal(ours, theirs), (top_k, top_p, min_p, t, n)
        assert (ours.sum(-1) >= n).all()


def test_min_tokens_to_keep_frequencies_and_ties():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0, NEG_INF])
    for kwargs in (dict(top_k=1), dict(top_p=0.01), dict(min_p=1.0), dict(top_k=1, top_p=0.01, min_p=1.0)):
        probs = processed_probs(logits, min_tokens_to_keep=2, **kwargs)
        assert (probs > 0).tolist() == [True, True, True, True, False, False, False]  # ties kept
        for source in SOURCES:
            ids = _draw(logits.expand(N_DRAWS // 4, -1), source, 9, min_tokens_to_keep=2, **kwargs)
            assert chi2_pvalue(ids, probs) > P_MIN
    # more than the possible tokens: all possible tokens, never an impossible one
    ids = sample(logits.expand(1000, -1), top_k=1, min_tokens_to_keep=100, seeds=torch.arange(1000))
    assert ids.max() < 6
    per_row = sample(logits.expand(2, -1), top_k=1, min_tokens_to_keep=torch.tensor([1, 6]), seeds=torch.tensor([3, 4]))
    assert per_row[0] == 0


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, r"min_tokens_to_keep must lie in \[1"),
        (-2, ValueError, "min_tokens_to_keep must lie in"),
        (1.5, TypeError, "min_tokens_to_keep must be an int"),
        (True, TypeError, "min_tokens_to_keep must be an int"),
        (torch.tensor([1, 0]), ValueError, "min_tokens_to_keep must lie in"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
        (torch.tensor([1, 2, 3]), ValueError, r"shape \(2,\)"),
    ],
)
def test_min_tokens_to_keep_bad_values(value, error, match):
    with pytest.raises(error, match=match):
        sample(torch.zeros(2, 5), min_tokens_to_keep=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=torch.tensor([1.0, -1.0], dtype=torch.float64)), "temperature must lie in"),
        (dict(temperature=torch.tensor([1.0, float("inf")])), "temperature must be finite"),
        (dict(top_k=torch.tensor([1, -1])), "top_k must lie in"),
        (dict(top_p=torch.tensor([0.5, 0.0])), "top_p must lie in"),
        (dict(min_p=torch.tensor([0.5, 2.0])), "min_p must lie in"),
    ],
)
def test_bad_tensor_values_are_checked_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.zeros(2, 5), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=2**63), r"top_k must fit in int64, got 9223372036854775808; use 0 or None"),
        (dict(top_k=-(2**64)), r"top_k must fit in int64"),
        (dict(min_tokens_to_keep=2**70), r"min_tokens_to_keep must fit in int64"),
        (dict(top_k=-1), r"top_k must lie in .*, got -1$"),  # an int is shown as the int given
        (dict(min_tokens_to_keep=0), r"got 0$"),
    ],
)
def test_bad_python_ints_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.zeros(2, 5), **kwargs)


# ---------------------------------------------------------------------- the structure


def test_sample_impl_takes_tensors_and_a_seed():
    """_sample_impl: per-row tensors and one int64 seed; the wrapper draws that seed from the
    generator, so the generator path is _sample_impl with that seed."""
    logits = torch.randn(5, 40, generator=gen(50))
    params = (
        torch.full((5,), 0.9, dtype=torch.float64),
        torch.tensor([0, 3, 0, 10, 0]),
        torch.tensor([1.0, 0.8, 0.5, 1.0, 0.95], dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
        torch.ones(5, dtype=torch.int64),
    )
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=gen(51))
    ids, lp = sampling._sample_impl(logits, *params, None, seed, True)
    out = sample(
        logits, temperature=params[0], top_k=params[1], top_p=params[2], generator=gen(51), return_logprobs=True
    )
    assert torch.equal(ids, out.ids) and torch.equal(lp, out.logprobs)
    ids2, _ = sampling._sample_impl(logits, *params, torch.arange(5), None, False)
    assert torch.equal(ids2, sample(logits, temperature=0.9, top_k=params[1], top_p=params[2], seeds=torch.arange(5)))


# ---------------------------------------------------------------------- docs/sampling.md


def test_docs_sampling_examples_run(monkeypatch):
    """Every python block of docs/sampling.md runs from the repository root (they assert their
    own results)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).parent.parent
    monkeypatch.chdir(root)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    text = (root / "docs" / "sampling.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/sampling.md", "exec"), {"__name__": "docs_sampling"})


@pytest.mark.skipif(
    not __import__("gumbelkit._kernels.cpu_fused", fromlist=["x"]).available(), reason="numba is not installed"
)
def test_fused_whole_row_draw_is_the_seeded_kernel():
    # with numba, a whole-row draw is sample_seeded: argmax (x - max x) / T + G(seed_r, token id)
    from gumbelkit._kernels import cpu_fused

    x = torch.randn(12, 3000, generator=gen(70))  # past FUSED_MIN_ELEMENTS
    seeds = torch.arange(12) + 100
    want = torch.from_numpy(cpu_fused.sample_seeded(x.numpy(), seeds, 0.7))
    assert torch.equal(sample(x, temperature=0.7, seeds=seeds), want)
    # generator mode: reproducible, and every row is its own counter stream
    a = sample(x, temperature=0.7, generator=gen(71))
    assert torch.equal(a, sample(x, temperature=0.7, generator=gen(71)))


# ------------------------------------------------- the fused selection kernels (issue 13)

needs_numba = pytest.mark.skipif(not FUSED, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("rows, n", [(64, 5000), (2, 70_000), (3, 40), (1, 1)])
def test_kth_largest_is_topk_with_ties_and_minus_inf(rows, n):
    """The k-th largest value counting repeats, as torch.topk: ties, -inf entries, k from 1 to
    n, whole rows and rows split into blocks (few rows) alike."""
    g = gen(80 + n)
    x = torch.randn(rows, n, generator=g) * 3
    x[0, ::3] = x[0, ::3].round()  # many ties
    x[-1, torch.rand(n, generator=g) < 0.3] = NEG_INF
    for k in sorted({1, min(n, 2), min(n, 50), min(n, 1000), (n + 1) // 2, n}):
        want = torch.topk(x, k).values[:, -1]
        assert torch.equal(torch.from_numpy(cpu_fused.kth_largest(x.numpy(), k)), want), k
    ks = torch.randint(0, n + 1, (rows,), generator=g)
    got = torch.from_numpy(cpu_fused.kth_largest_rows(x.numpy(), ks.numpy()))
    want = torch.stack(
        [torch.topk(x[r], int(k)).values[-1] if k > 0 else torch.tensor(NEG_INF) for r, k in enumerate(ks)]
    )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="k must lie in"):
        cpu_fused.kth_largest(x.numpy(), n + 1)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, n", [(64, 3000), (2, 70_000)])
def test_sample_kept_is_sample_seeded_bit_for_bit(dtype, rows, n):
    """The skipping draw of sample() returns sample_seeded's token for every threshold
    (none, a top-k cut, a narrow cut, the row max), temperature and block split."""
    g = gen(90 + n)
    x = (torch.randn(rows, n, generator=g) * torch.linspace(0.1, 8, rows).unsqueeze(-1)).to(dtype)
    seeds = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g)
    keys = cpu_fused.row_keys(seeds.numpy())
    m = x.amax(-1)
    for temps in (torch.ones(rows, dtype=dtype), torch.rand(rows, generator=g, dtype=dtype) * 2 + 1e-3):
        for low in (
            torch.full((rows,), NEG_INF, dtype=dtype),
            torch.topk(x, 50).values[:, -1],
            torch.topk(x, 2).values[:, -1],
            m,
        ):
            want = cpu_fused.sample_seeded(x.numpy(), seeds, temps.numpy(), min_value=low.numpy())
            got = cpu_fused.sample_kept(x.numpy(), keys, m.numpy(), temps.numpy(), low.numpy())
            assert (got == want).all()


@needs_numba
@pytest.mark.parametrize("kind", ["flat", "lm", "ties"])
def test_fused_top_p_with_temperature_and_top_k_equals_the_sort_recipe(monkeypatch, kind):
    """The fused kept set with temperature and a top-k floor (float64 masses over the top-k
    survivors only) is the sort recipe's, on rows whose nucleus needs the sampled pivots."""
    monkeypatch.setenv("GUMBELKIT_BACKEND", "numba")
    g = gen(95)
    x = torch.randn(4, 30_000, generator=g)
    logits = {"flat": x * 0.1, "lm": x * 4, "ties": (x * 20).round() / 20}[kind]
    for t, k, p in [(0.7, 0, 0.9), (1.3, 20_000, 0.95), (1.0, 25_000, 0.5)]:
        z = logits.double() / t
        if k:
            kth = torch.topk(logits, k).values[:, -1:]
            z = z.masked_fill(logits < kth, NEG_INF)
        want = _sort_reference_keep(z, p) & (z > NEG_INF)
        assert torch.equal(sampling._kept_mask(logits, temperature=t, top_k=k, top_p=p), want), (t, k, p)


def test_top_k_frequencies_with_ties_at_the_cut():
    """top_k=50 on 400 tokens with tied values at the 50th: the kept set is every token >= the
    50th largest, drawn at the renormalized softmax frequencies."""
    g = gen(96)
    values = torch.cat([torch.rand(40, generator=g) * 3 + 0.5, torch.zeros(30), -1 - torch.rand(330, generator=g)])
    logits = values[torch.randperm(400, generator=g)]  # ranks 41-70 tie at 0
    probs = processed_probs(logits, top_k=50)
    assert (probs > 0).sum() == 70  # the tie at the cut is kept whole
    ids = sample(logits.expand(60_000, -1), top_k=50, seeds=torch.arange(60_000) + 7)
    assert chi2_pvalue(ids, probs) > P_MIN
    ids = sample(logits.expand(60_000, -1), top_k=50, generator=gen(97))
    assert chi2_pvalue(ids, probs) > P_MIN


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_sample_is_kth_largest_then_sample_kept(dtype):
    """The one-pass top-k kernel returns kth_largest's thresholds and sample_kept's tokens, bit
    for bit (ties at the k-th value, -inf entries, k from 1 to n), and sample(top_k=) gives a
    row the same token in a batch (one-pass kernel) as alone (the two kernels)."""
    g = gen(98)
    rows, n = 48, 3000
    x = (torch.randn(rows, n, generator=g) * torch.linspace(0.5, 6, rows).unsqueeze(-1)).to(dtype)
    x[::5] = (x[::5] * 4).round() / 4
    x[1, : n // 2] = NEG_INF
    ks = torch.tensor([1, 2, 50, 700, n - 1, n] * 8)
    seeds = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g)
    keys = cpu_fused.row_keys(seeds.numpy())
    m, temps = x.amax(-1), torch.rand(rows, generator=g, dtype=dtype) + 0.3
    ids, thr = cpu_fused.top_k_sample(x.numpy(), ks.numpy(), keys, m.numpy(), temps.numpy())
    assert torch.equal(torch.from_numpy(thr), torch.from_numpy(cpu_fused.kth_largest_rows(x.numpy(), ks.numpy())))
    assert (ids == cpu_fused.sample_kept(x.numpy(), keys, m.numpy(), temps.numpy(), thr)).all()
    batch = sample(x, top_k=ks, temperature=temps.double(), seeds=seeds, return_logprobs=True)
    for r in range(0, rows, 7):
        alone = sample(
            x[r : r + 1], top_k=int(ks[r]), temperature=float(temps[r]), seeds=seeds[r : r + 1], return_logprobs=True
        )
        assert alone.ids.item() == batch.ids[r].item() and torch.equal(alone.logprobs, batch.logprobs[r : r + 1])

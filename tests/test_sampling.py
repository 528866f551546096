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
from gumbelkit.noise import gumbel_noise_like
from gumbelkit.sampling import sample

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
) -> torch.Tensor:
    """The processed distribution of one row, in float64, from the definitions."""
    l = logits.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(l.argmax(), len(l)).double()
    z = l / temperature
    keep = z > NEG_INF
    if top_k and top_k < len(z):  # K1: at least the k-th largest value, ties included
        keep &= z >= z.sort(descending=True).values[top_k - 1]
    if top_p is not None and top_p < 1:  # K2: the mass of strictly more probable tokens < p
        pi = torch.softmax(z.masked_fill(~keep, NEG_INF), 0)
        greater = (z.unsqueeze(0) > z.unsqueeze(1)) & keep.unsqueeze(0)  # [i, j]: z_j > z_i
        keep &= (greater.double() * pi.unsqueeze(0)).sum(1) < top_p
    if min_p:  # K3
        keep &= z >= z[keep].max() + math.log(min_p)
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
    ids = sample(
        logits.expand(N_DRAWS, -1), top_p=top_p, min_p=min_p, seeds=torch.arange(N_DRAWS) * 7 + seed
    )
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
    ids = sample(
        logits.expand(N_DRAWS, -1), temperature=0.8, top_p=0.9, seeds=torch.arange(N_DRAWS) + 5
    )
    assert chi2_pvalue(ids, processed_probs(logits, temperature=0.8, top_p=0.9)) > P_MIN


@pytest.mark.parametrize(
    "first, fraction, bins, cap",
    [(2, 0.5, 4, 2), (1 << 20, 0.25, 2048, 512), (256, 1e-9, 2048, 512), (1, 0.25, 3, 1)],
)
def test_candidate_strategy_never_changes_the_token(monkeypatch, first, fraction, bins, cap):
    """The kept set is defined by values, and seeded noise by token id: tiny candidate sets
    with a many-level histogram search, one set the size of the row, or always the full sort
    give the same tokens and the same log-probabilities."""
    logits, params, seeds = _mixed_batch()
    expect = sample(logits, seeds=seeds, return_logprobs=True, **params)
    monkeypatch.setattr(sampling, "_FIRST_CANDIDATES", first)
    monkeypatch.setattr(sampling, "_SORT_FRACTION", fraction)
    monkeypatch.setattr(sampling, "_BINS", bins)
    monkeypatch.setattr(sampling, "_CAP", cap)
    got = sample(logits, seeds=seeds, return_logprobs=True, **params)
    assert torch.equal(got.ids, expect.ids)
    assert torch.equal(got.logprobs, expect.logprobs)


def test_nucleus_sizes_of_the_mixed_batch_reach_every_stage():
    """The mixed batch has nuclei inside the first candidate set and beyond it (the histogram
    search), so the tests above go through every stage with the default sizes."""
    logits, params, _ = _mixed_batch()
    sizes = [
        int((processed_probs(logits[r], top_p=params["top_p"][r].item()) > 0).sum())
        for r in range(64)
        if params["top_k"][r] == 0 and params["top_p"][r] < 1
    ]
    vocab = logits.shape[1]
    assert min(sizes) < sampling._FIRST_CANDIDATES < max(sizes)
    assert max(sizes) > sampling._CAP and max(sizes) > vocab / 2


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
    other[1:] = (
        torch.randn(63, logits.shape[1], generator=gen(10)) * 0.1
    )  # flat neighbours: a full sort
    assert sample(other, seeds=seeds, **params)[0] == base[0]


def test_generator_reproducible_and_follows_the_noise_contract():
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
    monkeypatch.setattr(
        cn, "_hash", lambda seeds, positions: torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    )
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
    result = doctest.testmod(
        mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0

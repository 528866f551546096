r"""Next-token sampling for language models with the Gumbel-Max trick.

:func:`sample` draws one token per row of ``(B, V)`` logits after the usual processing
(temperature, top-k, top-p, min-p, ``min_tokens_to_keep``), exactly from the processed
distribution. Every truncation is a threshold on the row's own logit values, found without
sorting the vocabulary (fused numba kernels where they serve: a streaming k-th-largest
selection and a quickselect by float64 mass; on the torch path :func:`torch.topk` and an
exact histogram search); the draw is a Gumbel-Max over the kept tokens, in float32 or
better, after shifting every row by its maximum. With ``seeds`` every row's token is a pure
function of its own seed and logits (batch-invariant sampling; see
:mod:`gumbelkit._counter_noise`).

Structure: :func:`sample` checks what it can see without reading tensor data (types, shapes,
dtypes, devices, Python numbers) and turns every parameter into a per-row tensor; the
private :func:`_sample_impl` takes only tensors and Python scalars, does all data-dependent
validation (in :func:`_check_data`) and the work, and returns ``(ids, logprobs)``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import torch

from ._counter_noise import GAMMA, counter_gumbel, counter_uniform, mix64
from ._kernels.dispatch import cpu_kernels
from ._kernels.ops import _neg_noise, draw_seed, register_random_op
from ._validation import check_generator, check_logits, compute_dtype

__all__ = ["SampleOutput", "sample"]

_NEG_INF = float("-inf")
# Top-p without top-k first looks at the _FIRST_CANDIDATES largest logits (with the row's
# float64 normalizer) and runs the histogram search only for the rows whose nucleus is not
# decided there (0: always the search; tests set it). A candidate set larger than
# _SORT_FRACTION of the vocabulary (a large top_k or min_tokens_to_keep) is a full sort.
_FIRST_CANDIDATES = 256
_SORT_FRACTION = 0.25
# The float64 passes of top-p run over chunks of rows of about this many elements (buffers
# that malloc reuses instead of fresh pages).
_CHUNK_ELEMENTS = 1 << 20
# Histogram search: bins per level, the crossing-bin size at which it stops refining, and
# the most levels it runs (each level divides the value range by _BINS).
_BINS = 2048
_CAP = 512
_MAX_LEVELS = 8
# Streams derived from the generator-mode seed (so two draws in one call never share noise).
_STREAM_CANDIDATES, _STREAM_ROWS, _STREAM_TIES, _STREAM_PACKED = 1, 2, 3, 4
# Rows that keep at most this fraction of the vocabulary draw noise for their kept tokens only.
_PACK_FRACTION = 0.125
# Seeds-mode tie-break uniforms come from counter_uniform(seed ^ _TIE_KEY, token_id).
_TIE_KEY = 0x5851F42D4C957F2D


class SampleOutput(NamedTuple):
    """Sampled ids ``(B,)`` (int64) and their log-probabilities under the processed distribution.

    Example:
        >>> logits = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        >>> out = sample(logits, top_k=2, seeds=torch.tensor([0]), return_logprobs=True)
        >>> out.ids.item() in (0, 1), out.logprobs.exp().tolist()  # two tokens kept, 1/2 each
        (True, [0.5])
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


# --------------------------------------------------------------------------- the wrapper

# name: (integer, default, low, high, low_open, high_open)
_RANGES: dict[str, tuple[bool, float, float, float, bool, bool]] = {
    "temperature": (False, 1.0, 0.0, math.inf, False, True),
    "top_k": (True, 0, 0, math.inf, False, False),
    "top_p": (False, 1.0, 0.0, 1.0, True, False),
    "min_p": (False, 0.0, 0.0, 1.0, False, False),
    "min_tokens_to_keep": (True, 1, 1, math.inf, False, False),
}


def _range_text(name: str) -> str:
    _, _, low, high, low_open, high_open = _RANGES[name]
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _out_of_range_message(name: str, got: object) -> str:
    if name == "temperature":
        if isinstance(got, float) and math.isinf(got) and got > 0:
            return "temperature must be finite (use a large finite value for a nearly uniform draw)"
        hint = "; use temperature=0 for greedy decoding"
    elif name == "top_k":
        hint = "; use 0 or None for no top-k"
    elif name == "top_p":
        hint = "; use 1.0 or None for no top-p"
    elif name == "min_p":
        hint = "; use 0.0 or None for no min-p"
    else:
        hint = "; use 1 to keep at least the most probable token"
    return f"{name} must lie in {_range_text(name)}{hint}, got {got}"


def _row_param(value: object, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """A Python number or a ``(B,)`` tensor as a ``(B,)`` int64 or float64 tensor.

    Reads only Python values, dtypes, shapes and devices; a Python number is range-checked
    here, a tensor's values by :func:`_check_data`.
    """
    integer, default, low, high, low_open, high_open = _RANGES[name]
    dtype = torch.int64 if integer else torch.float64
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if integer:
            ok = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        else:
            ok = value.is_floating_point()
        if not ok:
            kind = "an integer" if integer else "a floating-point"
            raise TypeError(f"{name} must be a number or {kind} tensor, got dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logits are on {device}; move it with .to()")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(
                f"{name} must be a scalar or a tensor of shape ({batch},) (one value per "
                f"row), got shape {tuple(value.shape)}"
            )
        return value.to(dtype).expand(batch).contiguous()
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
        raise TypeError(f"{name} must be {'an int' if integer else 'a float'} or a tensor, got {type(value).__name__}")
    if integer and not -(2**63) <= value < 2**63:
        hint = "; use 0 or None for no top-k" if name == "top_k" else ""
        raise ValueError(f"{name} must fit in int64, got {value}{hint}")
    v = float(value)
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    if not (above and below):  # NaN fails both
        raise ValueError(_out_of_range_message(name, value))
    return torch.full((batch,), value, dtype=dtype, device=device)


def _row_params(batch: int, device: torch.device, *values: object) -> list[torch.Tensor]:
    """``temperature, top_k, top_p, min_p, min_tokens_to_keep`` as checked ``(B,)`` tensors."""
    names = ("temperature", "top_k", "top_p", "min_p", "min_tokens_to_keep")
    return [_row_param(v, name, batch, device) for v, name in zip(values, names, strict=True)]


def _check_seeds(seeds: object, batch: int, device: torch.device) -> torch.Tensor | None:
    if seeds is None:
        return None
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
        got = seeds.dtype if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise TypeError(
            f"seeds must be an int64 tensor of shape ({batch},), got {got}; "
            "e.g. torch.tensor(request_seeds, dtype=torch.int64)"
        )
    if seeds.shape != (batch,):
        raise ValueError(f"seeds must have shape ({batch},) (one seed per row), got {tuple(seeds.shape)}")
    if seeds.device != device:
        raise ValueError(f"seeds are on {seeds.device} but logits are on {device}; move them with .to()")
    return seeds


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    min_tokens_to_keep: int | torch.Tensor = 1,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    return_logprobs: bool = False,
) -> torch.Tensor | SampleOutput:
    r"""Sample the next token of each row of ``(B, V)`` logits, with the Gumbel-Max trick.

    The processed distribution of a row, in the order Hugging Face ``generate`` applies it
    (temperature, top-k, top-p, min-p; see ``docs/sampling.md`` for transformers and vLLM),
    with :math:`n` = ``min_tokens_to_keep``:

    1. temperature: :math:`z = (\ell - \max_j \ell_j) / T`, the shift first, so that
       ties and near-ties survive any ``T`` (softmax is shift invariant). ``T = 0`` is greedy:
       :math:`\arg\max \ell`, the lowest id among ties, log-probability 0. A ``T`` so small
       that :math:`\ell / T` overflows gives the ``T -> 0`` limit: a uniform draw among the
       maxima.
    2. top-k (Fan et al. 2018): keep :math:`K_1 = \{i : z_i \ge z_{(k')}\}` with
       :math:`k' = \max(k, n)`: the ``k'`` largest and every token tied with the k'-th (all
       tokens if top-k is off).
    3. top-p, nucleus (Holtzman et al. 2020): with :math:`\pi = \operatorname{softmax}(z)` over
       :math:`K_1`, keep :math:`K_2 = \{i \in K_1 : \sum_{j \in K_1,\, \pi_j > \pi_i} \pi_j < p\}`,
       the most probable tokens until their mass reaches ``p`` (the token that crosses ``p``
       is kept, and so is every token tied with it), and at least the ``n`` largest.
    4. min-p (Nguyen et al. 2024): keep
       :math:`K_3 = \{i \in K_2 : \pi_i \ge p_{\min} \max_j \pi_j\}`, i.e.
       :math:`\ell_i \ge \max_j \ell_j + T \log p_{\min}` (float64), and at least the ``n``
       largest.
    5. the token is drawn from :math:`q_i = e^{z_i} / \sum_{j \in K_3} e^{z_j}` on :math:`K_3`
       as :math:`\arg\max_{i \in K_3} (z_i + g_i)` with Gumbel noise :math:`g` (Gumbel 1954;
       Maddison et al. 2014); ties of the scores are broken uniformly at random. The
       log-probability is :math:`\log q_i`.

    "The ``n`` largest" includes every token tied with the n-th largest, as top-k does; a
    row with fewer possible tokens keeps them all. Scores are computed in float32 for
    half-precision logits (float64 for float64); top-p's masses are float64 weights
    :math:`e^{z_i}` computed from the logits in float64, so the kept set is the exact one up
    to float64 rounding of the sums (about 1e-16 relative). ``-inf`` logits are impossible
    tokens.

    How: every rule keeps the tokens at or above a value, so the kept set is
    ``logits >= threshold`` per row. With the fused CPU kernels (numba; see
    :mod:`gumbelkit._kernels.dispatch` for when they serve) the k-th largest values come from
    a streaming selection, top-p's crossing value from a sort-free quickselect by float64
    mass over the tokens that can be kept, and the draw is one pass that skips every stretch
    of the row below the threshold or too low to win; the noise is the counter noise of the
    token id, so the token is :func:`gumbelkit._kernels.cpu_fused.sample_seeded`'s with the
    threshold as ``min_value``. The torch path takes top-k from :func:`torch.topk` of
    ``k' + 1`` logits and top-p from an exact histogram search (float64 masses per bin of
    values, refined inside the bin that crosses ``p``, then the few tokens of that bin
    sorted), and draws noise for the kept tokens only when they are at most an eighth of the
    vocabulary. Either way a flat row, whose nucleus is most of the vocabulary, costs a few
    passes instead of a sort. Timings: ``docs/benchmarks.md`` (``benchmarks/sampling_bench.py``).

    Args:
        logits: ``(B, V)`` floating-point logits.
        temperature: ``>= 0`` and finite; a float or a ``(B,)`` tensor (0 = greedy for that row).
        top_k: ``>= 0`` int or ``(B,)`` integer tensor; 0 or None = off, ``>= V`` = off.
        top_p: in ``(0, 1]``; a float or a ``(B,)`` tensor; 1 or None = off.
        min_p: in ``[0, 1]``; a float or a ``(B,)`` tensor; 0 or None = off.
        min_tokens_to_keep: ``>= 1`` int or ``(B,)`` integer tensor; top-k, top-p and min-p
            never keep fewer tokens (transformers' warpers' argument; default 1).
        generator: the random source when ``seeds`` is None: one int64 seed is drawn from it
            (``torch.randint``), from which the noise is made; the same state gives the same
            tokens.
        seeds: ``(B,)`` int64: row ``b`` uses the counter-based noise
            ``counter_gumbel(seeds[b], token_id)`` in float64 (:mod:`gumbelkit._counter_noise`),
            so its token depends only on its own seed, logits and parameters, never on the other
            rows, the batch size or the row's position. Excludes ``generator``.
        return_logprobs: also return :math:`\log q` of the sampled tokens.

    Not differentiable: ``logits`` are detached (the log-probabilities are values, for a
    score-function loss use :func:`gumbelkit.estimators.sample_with_log_prob`).

    Returns:
        ``(B,)`` int64 token ids, or a :class:`SampleOutput` ``(ids, logprobs)`` when
        ``return_logprobs`` (log-probabilities in the compute dtype).

    Raises:
        TypeError: a parameter of the wrong type (``logits`` not a floating tensor, a float
            ``top_k``, seeds not int64, ...).
        ValueError: a parameter out of range, shapes or devices that do not match, or logits
            with NaN, ``+inf`` or no possible token in some row (the rows are named).

    Example:
        >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 0.0]])
        >>> ids = sample(logits, temperature=0.7, top_k=2, seeds=torch.tensor([1, 2]))
        >>> ids.shape, bool((ids <= 1).all())  # top-k=2 keeps ids {0, 1} in both rows
        (torch.Size([2]), True)
        >>> sample(logits, temperature=0.0).tolist()  # greedy
        [0, 1]
        >>> out = sample(logits, top_p=0.5, seeds=torch.tensor([1, 2]), return_logprobs=True)
        >>> out.ids.tolist(), out.logprobs.tolist()  # the nucleus is one token in both rows
        ([0, 1], [0.0, 0.0])
        >>> sample(torch.tensor([[20.0, 20.0, 5.0]]), temperature=1e-38).item() in (0, 1)
        True
    """
    logits = check_logits(logits)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must have shape (batch, vocab), got {tuple(logits.shape)}; "
            "for a single row use logits.unsqueeze(0)"
        )
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension (shape (B, 0))")
    dev = logits.device
    check_generator(generator, dev)
    seeds = _check_seeds(seeds, batch, dev)
    if seeds is not None and generator is not None:
        raise ValueError("pass either seeds (counter-based, batch-invariant noise) or generator, not both")
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    params = _row_params(batch, dev, temperature, top_k, top_p, min_p, min_tokens_to_keep)
    noise_seed = None
    if seeds is None:
        noise_seed = torch.randint(
            -(2**63),
            2**63 - 1,
            (),
            dtype=torch.int64,
            generator=generator,
            device=generator.device if generator is not None else dev,
        )
    ids, logprobs = _sample_op(logits.detach(), *params, seeds, noise_seed, return_logprobs)
    return SampleOutput(ids, logprobs) if return_logprobs else ids


# ---------------------------------------------------------------- data-dependent checks


def _check_data(
    rowmax: torch.Tensor,
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_tokens_to_keep: torch.Tensor,
    extra: tuple[torch.Tensor, ...] = (),
) -> list[bool]:
    """Every check of :func:`_sample_impl` that reads tensor data, with one host sync.

    ``rowmax`` is ``logits.amax(-1)``: it is finite exactly when the row has no NaN, no
    ``+inf`` and at least one finite logit (amax propagates NaN). ``extra``: ``(B,)`` boolean
    tensors whose ``any()`` the caller needs on the host, read in the same sync; returns those.
    """
    inf = math.inf
    bad = {
        "temperature": ~((temperature >= 0) & (temperature < inf)),
        "top_k": top_k < 0,
        "top_p": ~((top_p > 0) & (top_p <= 1)),
        "min_p": ~((min_p >= 0) & (min_p <= 1)),
        "min_tokens_to_keep": min_tokens_to_keep < 1,
    }
    bad_rows = ~torch.isfinite(rowmax)
    flags = torch.stack([*bad.values(), bad_rows, *extra]).any(-1).tolist()  # one reduction, one sync
    if not any(flags[: len(bad) + 1]):
        return flags[len(bad) + 1 :]
    values = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "min_tokens_to_keep": min_tokens_to_keep,
    }
    for name, b in bad.items():
        if bool(b.any()):
            got = values[name][b]
            if name == "temperature" and bool(torch.isposinf(got).all()):
                raise ValueError(_out_of_range_message(name, math.inf))
            raise ValueError(_out_of_range_message(name, got[:4].tolist()))
    rows = bad_rows.nonzero().flatten()
    sub = logits[rows]
    for found, what in (
        (torch.isnan(sub).any(-1), "NaN; check the model that produced them"),
        (torch.isposinf(sub).any(-1), "+inf; use finite logits (-inf means 'impossible')"),
        (~(sub > _NEG_INF).any(-1), "only -inf: no token is possible"),
    ):
        if bool(found.any()):
            raise ValueError(f"logits of row(s) {rows[found][:8].tolist()} contain {what}")
    raise AssertionError("unreachable: a non-finite row maximum without NaN, +inf or all -inf")


# ------------------------------------------------------------------------ the work


def _sample_impl(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_tokens_to_keep: torch.Tensor,
    seeds: torch.Tensor | None,
    noise_seed: torch.Tensor | None,
    return_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of :func:`sample` on per-row tensors: validation of the data, then the draw.

    Args:
        logits: ``(B, V)`` floating logits, ``V >= 1``.
        temperature, top_p, min_p: ``(B,)`` float64; top_k, min_tokens_to_keep: ``(B,)`` int64
            (0 = off for top_k; 1 = off for top_p; 0 = off for min_p).
        seeds: ``(B,)`` int64 (counter-based noise) or None.
        noise_seed: 0-d int64 tensor, the noise seed when ``seeds`` is None.
        return_logprobs: compute the log-probabilities (zeros otherwise).

    Returns:
        ``(ids, logprobs)``: ``(B,)`` int64 and ``(B,)`` in the compute dtype.
    """
    batch, vocab = logits.shape
    dev = logits.device
    cdtype = compute_dtype(logits.dtype)
    ids = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(batch, dtype=cdtype, device=dev)
    if batch == 0:
        return ids, logprobs
    rowmax = logits.amax(-1)
    greedy = temperature == 0
    truncated = (top_k > 0) | (top_p < 1) | (min_p > 0) | (min_tokens_to_keep > 1)
    any_greedy, any_truncated = _check_data(
        rowmax, logits, temperature, top_k, top_p, min_p, min_tokens_to_keep, (greedy, truncated)
    )
    if any_greedy:
        g = greedy.nonzero().flatten()
        ids[g] = (logits if len(g) == batch else logits[g]).argmax(-1)  # the lowest id
        rows = (~greedy).nonzero().flatten()
        if rows.numel() == 0:
            return ids, logprobs
    else:
        rows = torch.arange(batch, device=dev)
    whole = rows.numel() == batch
    sub = logits if whole else logits[rows]

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or whole else t[rows]

    tok, lp = _sample_rows(
        sub,
        rowmax if whole else rowmax[rows],
        pick(temperature),
        pick(top_k),
        pick(top_p),
        pick(min_p),
        pick(min_tokens_to_keep),
        pick(seeds),
        noise_seed,
        rows,
        vocab,
        return_logprobs,
        any_truncated,
    )
    if whole:
        return tok, lp.to(cdtype)
    ids[rows] = tok
    if return_logprobs:
        logprobs[rows] = lp
    return ids, logprobs


@torch.library.custom_op("gumbelkit::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_tokens_to_keep: torch.Tensor,
    seeds: torch.Tensor | None,
    noise_seed: torch.Tensor | None,
    return_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sample_impl` as a registered operator (compile, export, vmap and fake tensors see one call)."""
    return _sample_impl(
        logits, temperature, top_k, top_p, min_p, min_tokens_to_keep, seeds, noise_seed, return_logprobs
    )


def _sample_fake(logits, temperature, top_k, top_p, min_p, min_tokens_to_keep, seeds, noise_seed, return_logprobs):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.int64),
        logits.new_empty((batch,), dtype=compute_dtype(logits.dtype)),
    )


register_random_op(_sample_op, _sample_fake)


class _Kept(NamedTuple):
    """The kept set of each row, ``logits >= threshold``, and the candidates it came from."""

    threshold: torch.Tensor  # (n,) in the logits dtype
    values: torch.Tensor | None  # (n, c) the c largest logits, descending (None: c = 0)
    ids: torch.Tensor | None  # (n, c) their token ids


def _thresholds(
    l: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_keep: torch.Tensor,
) -> _Kept:
    """Per row the smallest kept logit value: the kept set is ``l >= threshold``.

    Every rule keeps the tokens at or above a value (the sets are prefixes in value order),
    so the kept set after all of them is ``l >= min(max(t_k, t_p, t_m), t_n)``: ``t_k`` the
    k'-th largest logit, ``t_p`` the logit of the token that crosses ``p``, ``t_m`` the
    min-p bound rounded up to the logits dtype, ``t_n`` the n-th largest logit.
    """
    n, vocab = l.shape
    dtype = l.dtype
    neg = torch.full((n,), _NEG_INF, dtype=dtype, device=l.device)
    k = torch.where(top_k > 0, torch.maximum(top_k, min_keep), 0)
    k = torch.where(k >= vocab, 0, k)
    keep_n = min_keep.clamp(max=vocab)
    p_on = top_p < 1
    need = torch.where(k > 0, k + 1, 0)
    if _FIRST_CANDIDATES > 0:
        need = torch.where(p_on & (k == 0), need.clamp(min=_FIRST_CANDIDATES), need)
    need = torch.where(keep_n > 1, torch.maximum(need, keep_n + 1), need).clamp(max=vocab)
    c = int(need.max())
    values = ids = None
    if c > 0:
        if c > _SORT_FRACTION * vocab:
            c = vocab
            values, ids = l.sort(-1, descending=True)
        else:
            values, ids = l.topk(c, -1)

    def at(pos: torch.Tensor) -> torch.Tensor:
        assert values is not None
        return values.gather(-1, pos.clamp(0, c - 1).unsqueeze(-1)).squeeze(-1)

    t_n = torch.where(keep_n > 1, at(keep_n - 1), m) if bool((keep_n > 1).any()) else m
    t_k = neg
    spill = torch.zeros(n, dtype=torch.bool, device=l.device)
    if bool((k > 0).any()):
        t_k = torch.where(k > 0, at(k - 1), neg)
        spill = (k > 0) & (at(k) == t_k)  # the tie at the k'-th value goes past the candidates
    t_p = neg
    if bool(p_on.any()):
        t_p = _top_p_threshold(l, values, ids, m, temperature, top_p, k, t_k, spill)
    t_m = _round_up(m.double() + temperature * min_p.log(), dtype)
    threshold = torch.minimum(torch.maximum(torch.maximum(t_k, t_p), t_m), t_n)
    return _Kept(threshold, values, ids)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` that is ``>= x`` (float64), so ``l >= result`` iff ``l >= x``."""
    t = x.to(dtype)
    return torch.where(t.double() < x, torch.nextafter(t, torch.full_like(t, math.inf)), t)


def _z64(l: torch.Tensor, m: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``(l - m) / T`` in float64 (the difference is exact for float32 and half logits)."""
    z = torch.sub(l, m.double().unsqueeze(-1))  # promoted to float64 in one pass, a new tensor
    if bool((temperature != 1).any()):
        z.div_(temperature.unsqueeze(-1))
    return z


def _row_mass(l: torch.Tensor, m: torch.Tensor, temperature: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``sum exp(z)`` over ``l >= floor`` per row, float64, summed sequentially (so it does not
    depend on the batch around the row), over chunks of rows."""
    n, vocab = l.shape
    out = torch.empty(n, dtype=torch.float64, device=l.device)
    step = max(1, _CHUNK_ELEMENTS // vocab)
    masked = bool((floor > _NEG_INF).any())
    for s in range(0, n, step):
        e = min(n, s + step)
        z = _z64(l[s:e], m[s:e], temperature[s:e])
        if masked:
            z.masked_fill_(l[s:e] < floor[s:e].unsqueeze(-1), _NEG_INF)
        out[s:e] = z.exp_().cumsum_(-1)[:, -1]
    return out


def _top_p_threshold(
    l: torch.Tensor,
    values: torch.Tensor | None,
    ids: torch.Tensor | None,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    k: torch.Tensor,
    t_k: torch.Tensor,
    spill: torch.Tensor,
) -> torch.Tensor:
    """``t_p``: the logit of the token that crosses ``p`` (``-inf`` where top-p is off).

    The crossing value is the largest value ``v`` whose mass at or above it,
    ``g(v) = sum_{z_j >= v} w_j`` over ``K_1``, reaches ``p * Z`` (``Z = g(-inf)``): a token is
    kept iff the mass strictly above it is ``< p * Z``. Weights ``w = exp(z)`` are float64.
    Rows whose ``K_1`` lies among the candidates (top-k without a tie past the k'-th) use
    them; the others use the histogram search over the whole row.
    """
    n = l.shape[0]
    on = top_p < 1
    out = torch.full((n,), _NEG_INF, dtype=l.dtype, device=l.device)
    inside = on & (k > 0) & ~spill
    rest = on & ~inside
    screened = rest & False
    if _FIRST_CANDIDATES > 0 and values is not None and bool(rest.any()):
        screened = rest & _nucleus_among_candidates(l, values, m, temperature, top_p, t_k)
    try_candidates = values is not None and bool((inside | screened).any())
    if try_candidates:
        assert values is not None
        total = torch.ones(n, dtype=torch.float64, device=l.device)
        if bool(screened.all()):
            total = _row_mass(l, m, temperature, t_k)
        elif bool(screened.any()):
            o = screened.nonzero().flatten()
            total[o] = _row_mass(l[o], m[o], temperature[o], t_k[o])
        w = _z64(values, m, temperature).exp_()
        w.masked_fill_(values < t_k.unsqueeze(-1), 0.0)
        cum = w.cumsum_(-1)
        total = torch.where(inside, cum[:, -1], total)
        reach = cum >= (top_p * total).unsqueeze(-1)  # a suffix of each row: cum is non-decreasing
        first = (~reach).view(torch.uint8).sum(-1, dtype=torch.int32).clamp(max=values.shape[1] - 1)
        found = (inside | screened) & reach[:, -1]
        out = torch.where(found, values.gather(-1, first.long().unsqueeze(-1)).squeeze(-1), out)
        rest = on & ~found
    if bool(rest.all()):
        return _histogram_search(l, m, temperature, top_p, t_k)
    if bool(rest.any()):
        r = rest.nonzero().flatten()
        out[r] = _histogram_search(l[r], m[r], temperature[r], top_p[r], t_k[r])
    return out


def _nucleus_among_candidates(
    l: torch.Tensor,
    values: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    floor: torch.Tensor,
) -> torch.Tensor:
    """A cheap screen (compute dtype): does the nucleus clearly lie among the candidates?

    Only chooses the path (candidates with the exact float64 normalizer, or the histogram
    search); both decide exactly. A 1e-3 relative margin covers the screen's rounding.
    """
    z = _scaled(l, m, temperature)
    if bool((floor > _NEG_INF).any()):
        z.masked_fill_(l < floor.unsqueeze(-1), _NEG_INF)
    total = z.exp_().cumsum_(-1)[:, -1].double()  # sequential: the same for any batch
    w = _z64(values, m, temperature).exp_().masked_fill_(values < floor.unsqueeze(-1), 0.0)
    return w.sum(-1) >= top_p * total * (1 + 1e-3)


def _histogram_search(
    l: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    floor: torch.Tensor,
) -> torch.Tensor:
    """The crossing logit of each row (``K_1 = l >= floor``), over chunks of rows."""
    n, vocab = l.shape
    out = torch.empty(n, dtype=l.dtype, device=l.device)
    step = max(1, _CHUNK_ELEMENTS // vocab)
    for s in range(0, n, step):
        e = min(n, s + step)
        out[s:e] = _search_chunk(l[s:e], m[s:e], temperature[s:e], top_p[s:e], floor[s:e])
    return out


def _search_chunk(
    l: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    floor: torch.Tensor,
) -> torch.Tensor:
    """Exact threshold search without sorting the row (a radix select on values, by mass).

    Each level sorts the candidate tokens of a row into ``_BINS`` bins of equal width over
    their value range (a monotone map, so a higher bin holds only larger values and tied
    values share a bin), adds their float64 weights per bin (``scatter_add_``, sequential
    along the row, so the sums do not depend on the batch), and keeps the bin in which the
    mass from the top reaches ``p * Z`` (``Z``: the sum of all bins of the first level).
    Once that bin holds at most ``_CAP`` tokens (or only tied ones), its tokens are sorted
    and the crossing token found by a cumulative sum, as a full sort would.
    """
    r, vocab = l.shape
    dev = l.device
    inf = math.inf
    z = _z64(l, m, temperature)
    if bool((floor > _NEG_INF).any()):
        z.masked_fill_(l < floor.unsqueeze(-1), _NEG_INF)
    w = z.exp()
    lo = z.amin(-1)
    if bool(torch.isneginf(lo).any()):
        z.clamp_(min=-1e4)  # weight-0 tokens get finite values below every weighted one
        lo = z.amin(-1)
    hi = torch.zeros(r, dtype=torch.float64, device=dev)  # the row maximum is 0
    above = torch.zeros(r, dtype=torch.float64, device=dev)  # the mass above the candidates
    target = above
    count = torch.full((r,), vocab, dtype=torch.int32, device=dev)
    cand = torch.ones_like(l, dtype=torch.bool)
    shrink = _BINS * (1 - 2.0**-20)  # (z - lo) * scale stays below _BINS despite rounding
    for level in range(_MAX_LEVELS):
        active = (count > _CAP) & (hi > lo) if level else torch.ones_like(count, dtype=torch.bool)
        if level and not bool(active.any()):
            break
        span = hi - lo
        scale = torch.where(active & (span > 0), shrink / torch.where(span > 0, span, 1.0), 0.0)
        u = (z - lo.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        if level:
            u.clamp_(0, _BINS)
        idx = u.long()
        del u
        if level:
            idx.masked_fill_(~cand, _BINS)
        hist = torch.zeros(r, _BINS + 1, dtype=torch.float64, device=dev).scatter_add_(1, idx, w)
        hist[:, _BINS] = 0.0
        # suffix[b]: the mass of the candidates in bins >= b, summed from the top bin down.
        suffix = hist.flip(-1).cumsum(-1).flip(-1)
        if level == 0:
            target = top_p * suffix[:, 0]
        ok = (above.unsqueeze(-1) + suffix[:, :_BINS]) >= target.unsqueeze(-1)  # a prefix
        b = ok.view(torch.uint8).sum(-1, dtype=torch.int32).long() - 1
        lowest = (hist[:, :_BINS] > 0).view(torch.uint8).argmax(-1)
        b = torch.where(b < 0, lowest, b).unsqueeze(-1)
        new_cand = idx == b
        del idx
        all_active = level == 0 or bool(active.all())
        cand = new_cand if all_active else new_cand | (cand & ~active.unsqueeze(-1))
        above = torch.where(active, above + suffix.gather(-1, b + 1).squeeze(-1), above)
        count = torch.where(active, new_cand.view(torch.uint8).sum(-1, dtype=torch.int32), count)
        more = active & (count > _CAP)
        if bool(more.any()):  # the candidates' exact range for the next level
            lo = torch.where(more, torch.where(cand, z, inf).amin(-1), lo)
            hi = torch.where(more, torch.where(cand, z, -inf).amax(-1), hi)
    # Rows left with many candidates hold one tied value (or ran out of levels).
    tied = (count > _CAP) & ~(hi > lo)
    if bool(tied.any()):
        out = l.gather(-1, cand.view(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
        if bool(tied.all()):
            return out
        cand &= ~tied.unsqueeze(-1)
    nz = cand.nonzero()
    row, col = nz[:, 0], nz[:, 1]
    counts = torch.bincount(row, minlength=r)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(len(row), device=dev) - starts[row]
    width = int(counts.max())
    zs = torch.full((r, width), _NEG_INF, dtype=torch.float64, device=dev)
    ws = torch.zeros((r, width), dtype=torch.float64, device=dev)
    cols = torch.zeros((r, width), dtype=torch.int64, device=dev)
    zs[row, pos] = z[row, col]
    ws[row, pos] = w[row, col]
    cols[row, pos] = col
    zs, order = zs.sort(dim=-1, descending=True, stable=True)
    cum = above.unsqueeze(-1) + ws.gather(-1, order).cumsum(-1)
    reach = cum >= target.unsqueeze(-1)
    j = torch.where(reach[:, -1], (~reach).view(torch.uint8).sum(-1, dtype=torch.int32).long(), counts - 1)
    crossing = cols.gather(-1, order.gather(-1, j.clamp(0, width - 1).unsqueeze(-1)))
    found = l.gather(-1, crossing).squeeze(-1)
    return torch.where(tied, out, found) if bool(tied.any()) else found


def _kept_mask(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """The kept set of each row of ``(B, V)`` logits as a boolean mask (``temperature > 0``).

    What :func:`sample` draws from; for tests and documentation.
    """
    batch = logits.shape[0]
    dev = logits.device
    params = _row_params(batch, dev, temperature, top_k, top_p, min_p, min_tokens_to_keep)
    m = logits.amax(-1)
    _check_data(m, logits, *params)
    fused = _fused_kernels(logits, params[0])
    if fused is not None:
        x = logits.to(compute_dtype(logits.dtype)).contiguous()
        threshold = _fused_thresholds(fused, x, m, *params)
        return (x >= threshold.unsqueeze(-1)) & (x > _NEG_INF)
    kept = _thresholds(logits, m, *params)
    return (logits >= kept.threshold.unsqueeze(-1)) & (logits > _NEG_INF)


def _sample_rows(
    l: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_keep: torch.Tensor,
    seeds: torch.Tensor | None,
    noise_seed: torch.Tensor | None,
    rows: torch.Tensor,
    vocab: int,
    want_logprobs: bool,
    truncated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with ``T > 0``: thresholds, then a Gumbel-Max among the candidates when the kept
    set lies among them, else over the whole row with the threshold as a mask.
    ``truncated`` False: no row has top-k, top-p, min-p or ``min_tokens_to_keep > 1``."""
    n = l.shape[0]
    dev = l.device
    fused = _fused_kernels(l, temperature)
    if fused is not None:
        return _sample_rows_fused(
            fused, l, m, temperature, top_k, top_p, min_p, min_keep, seeds, noise_seed, rows, want_logprobs, truncated
        )
    if not truncated:  # the whole row, no threshold (what the groups below come to)
        z = _scaled(l, m, temperature)
        col = _gumbel_max(z, None, None, seeds, noise_seed, rows, vocab, _STREAM_ROWS)
        if not want_logprobs:
            return col, torch.zeros(n, dtype=z.dtype, device=dev)
        return col, _logprob(z, None, None, col, vocab)
    kept = _thresholds(l, m, temperature, top_k, top_p, min_p, min_keep)
    thr = kept.threshold
    token = torch.empty(n, dtype=torch.int64, device=dev)
    logprob = torch.zeros(n, dtype=compute_dtype(l.dtype), device=dev)
    fits = torch.zeros(n, dtype=torch.bool, device=dev)
    if kept.values is not None:
        c = kept.values.shape[1]
        fits = torch.ones_like(fits) if c == vocab else kept.values[:, -1] < thr
    # (rows, values, token ids or None for the whole row, kept mask or None, noise stream)
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]] = []
    if bool(fits.any()):
        index = fits.nonzero().flatten()
        assert kept.values is not None and kept.ids is not None
        v, ids = kept.values[index], kept.ids[index]
        keep = v >= thr[index].unsqueeze(-1)
        width = int(keep.view(torch.uint8).sum(-1, dtype=torch.int32).max())
        groups.append((index, v[:, :width], ids[:, :width], keep[:, :width], _STREAM_CANDIDATES))
    if not bool(fits.all()):
        index = (~fits).nonzero().flatten()
        v = l if index.numel() == n else l[index]
        t = thr[index]
        if not bool((t > _NEG_INF).any()):
            groups.append((index, v, None, None, _STREAM_ROWS))
        else:
            keep = v >= t.unsqueeze(-1)
            small = keep.view(torch.uint8).sum(-1, dtype=torch.int32) <= _PACK_FRACTION * vocab
            if bool(small.all()):
                ids, kmask = _pack(keep)
                groups.append((index, v.gather(-1, ids), ids, kmask, _STREAM_PACKED))
            elif bool(small.any()):  # few kept tokens: draw noise for those only
                sel = small.nonzero().flatten()
                ids, kmask = _pack(keep[sel])
                groups.append((index[sel], v[sel].gather(-1, ids), ids, kmask, _STREAM_PACKED))
            if not bool(small.any()):
                groups.append((index, v, None, keep, _STREAM_ROWS))
            elif not bool(small.all()):
                big = (~small).nonzero().flatten()
                groups.append((index[big], v[big], None, keep[big], _STREAM_ROWS))
    for index, v, ids, keep, stream in groups:
        everyone = index.numel() == n
        t_i = temperature if everyone else temperature[index]
        m_i = m if everyone else m[index]
        s_i = None if seeds is None else (seeds if everyone else seeds[index])
        z = _scaled(v, m_i, t_i)
        col = _gumbel_max(z, ids, keep, s_i, noise_seed, rows[index], vocab, stream)
        token[index] = col if ids is None else ids.gather(-1, col.unsqueeze(-1)).squeeze(-1)
        if want_logprobs:
            logprob[index] = _logprob(z, ids, keep, col, vocab)
    return token, logprob


# The fused kernels divide by T in the compute dtype; below this the torch path keeps the limit exact.
_FUSED_MIN_T = 1e-30


def _fused_kernels(l: torch.Tensor, temperature: torch.Tensor):
    """The fused numba kernels when they serve these rows (CPU, the backend's choice, every
    ``T >= _FUSED_MIN_T``), else None."""
    fused = cpu_kernels(l)
    if fused is None or not bool((temperature >= _FUSED_MIN_T).all()):
        return None
    return fused


def _fused_thresholds(
    fused,
    x: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_keep: torch.Tensor,
) -> torch.Tensor:
    """:func:`_thresholds` with the fused kernels, on ``x`` (the rows in the compute dtype,
    C-contiguous): per row ``min(max(t_k, t_p, t_m), t_n)`` in ``x``'s dtype.

    ``t_k`` and ``t_n`` are k-th largest values (a streaming selection, no sort); ``t_p`` is
    the exact crossing value of the float64 masses ``exp((x - m) / T)`` over ``x >= t_k``
    (a sort-free quickselect by mass, :func:`cpu_fused.top_p_threshold`); ``t_m`` is the
    min-p bound rounded up to ``x``'s dtype.
    """
    n, vocab = x.shape
    xn = x.numpy()
    neg = torch.full((n,), _NEG_INF, dtype=x.dtype)
    k = torch.where(top_k > 0, torch.maximum(top_k, min_keep), 0)
    k = torch.where(k >= vocab, 0, k)
    keep_n = min_keep.clamp(max=vocab)
    m_x = m.to(x.dtype)
    t_k = neg
    if bool((k > 0).any()):
        t_k = torch.from_numpy(fused.kth_largest_rows(xn, k.numpy()))
    t_n = m_x
    if bool((keep_n > 1).any()):
        t_n = torch.from_numpy(fused.kth_largest_rows(xn, torch.where(keep_n > 1, keep_n, 0).numpy()))
        t_n = torch.where(keep_n > 1, t_n, m_x)
    t_p = neg
    p_on = top_p < 1
    if bool(p_on.any()):
        ps = torch.where(p_on, top_p, 2.0)  # > 1: off
        th, _ = fused.top_p_rows(xn, ps.numpy(), temperature.numpy(), t_k.double().numpy(), m.double().numpy())
        t_p = torch.from_numpy(th).to(x.dtype)  # a value of x: exact
    t_m = neg
    if bool((min_p > 0).any()):
        t_m = _round_up(m.double() + temperature * min_p.log(), x.dtype)
    return torch.minimum(torch.maximum(torch.maximum(t_k, t_p), t_m), t_n)


def _sample_rows_fused(
    fused,
    l: torch.Tensor,
    m: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_keep: torch.Tensor,
    seeds: torch.Tensor | None,
    noise_seed: torch.Tensor | None,
    rows: torch.Tensor,
    want_logprobs: bool,
    truncated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_sample_rows` with the fused kernels: the threshold of every row, then one
    draw ``argmax_{x >= threshold} (x - m) / T + G(seed_r, token id)`` that skips the
    stretches of the row that cannot win (:func:`cpu_fused.sample_kept`); without any
    truncation, :func:`cpu_fused.sample_seeded` (the same token, bit for bit).

    Seeds mode uses each row's seed; generator mode gives row ``r`` of the batch the seed
    ``mix64(stream_seed + r * GAMMA)``, so both are counter streams with position = token id.
    """
    cdtype = compute_dtype(l.dtype)
    x = l.to(cdtype).contiguous()
    if seeds is None:
        assert noise_seed is not None
        seeds = mix64(_stream_seed(noise_seed, _STREAM_ROWS) + rows * GAMMA)
    if not truncated:
        temps = None if not bool((temperature != 1).any()) else temperature.to(cdtype).numpy()
        col = torch.from_numpy(fused.sample_seeded(x.numpy(), seeds.contiguous(), temps))
        keep = None
    else:
        keys = fused.row_keys(seeds.contiguous().numpy())
        t_x = temperature.to(cdtype).numpy()
        n, vocab = x.shape
        k = torch.where(top_k > 0, torch.maximum(top_k, min_keep), 0)
        only_k = (k > 0) & (k < vocab) & (top_p >= 1) & (min_p <= 0)  # then min_keep <= k' changes nothing
        if n >= 2 * torch.get_num_threads() and bool(only_k.all()):  # top-k alone: one pass per row
            ids, thr = fused.top_k_sample(x.numpy(), k.numpy(), keys, m.to(cdtype).numpy(), t_x)
            col, thr = torch.from_numpy(ids), torch.from_numpy(thr)
        else:
            thr = _fused_thresholds(fused, x, m, temperature, top_k, top_p, min_p, min_keep)
            col = torch.from_numpy(fused.sample_kept(x.numpy(), keys, m.to(cdtype).numpy(), t_x, thr.numpy()))
        keep = x >= thr.unsqueeze(-1) if want_logprobs else None
    if not want_logprobs:
        return col, torch.zeros(l.shape[0], dtype=cdtype)
    return col, _logprob(_scaled(l, m, temperature), None, keep, col, l.shape[1])


def _pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column ids of the True entries of each row, left-aligned in id order, and which
    entries of that ``(n, width)`` block are real (the rest repeat column 0, masked off)."""
    n = mask.shape[0]
    nz = mask.nonzero()
    row, col = nz[:, 0], nz[:, 1]
    counts = torch.bincount(row, minlength=n)
    pos = torch.arange(len(row), device=mask.device) - (counts.cumsum(0) - counts)[row]
    width = int(counts.max())
    ids = torch.zeros((n, width), dtype=torch.int64, device=mask.device)
    ids[row, pos] = col
    real = torch.arange(width, device=mask.device) < counts.unsqueeze(-1)
    return ids, real


def _scaled(v: torch.Tensor, m: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``z = (v - m) / T`` in the compute dtype, shifted first (``0`` at the maximum).

    A ``T`` that rounds to 0 in the compute dtype gives the ``T -> 0`` limit: 0 at the
    maxima, ``-inf`` elsewhere (``(v - m) / T`` overflows to ``-inf`` by itself otherwise).
    """
    cdtype = compute_dtype(v.dtype)
    z = v.to(cdtype) - m.to(cdtype).unsqueeze(-1)
    t = temperature.to(cdtype)
    if not bool((t != 1).any()):
        return z
    under = t == 0
    if bool(under.any()):
        r = under.nonzero().flatten()
        z[r] = torch.where(z[r] == 0, 0.0, _NEG_INF).to(cdtype)
        t = torch.where(under, 1.0, t).to(cdtype)
    return z.div_(t.unsqueeze(-1))


def _stream_seed(noise_seed: torch.Tensor, stream: int) -> torch.Tensor:
    """An int64 seed for one stream, derived from the call's noise seed (SplitMix64)."""
    x = noise_seed.reshape(1).to(torch.int64) + torch.tensor([stream], device=noise_seed.device) * GAMMA
    return mix64(x)[0]


def _mix64_int(x: int) -> int:
    """SplitMix64's finalizer on a Python int's low 64 bits (unsigned), ``mix64`` without tensors."""
    z = x & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _noise(
    z: torch.Tensor, pos: torch.Tensor, seeds: torch.Tensor | None, noise_seed: torch.Tensor | None, stream: int
) -> torch.Tensor:
    """Gumbel noise for the scores ``z`` (``pos``: the token ids of its columns).

    Seeds mode: ``counter_gumbel(seed, token_id)`` in float64. Otherwise
    :func:`gumbelkit.noise.gumbel_noise_like` from a generator seeded with a seed derived
    from ``noise_seed`` (float32 or better).
    """
    if seeds is not None:
        return counter_gumbel(seeds.unsqueeze(-1), pos, dtype=torch.float64)
    assert noise_seed is not None
    seed = _mix64_int(int(noise_seed) + stream * GAMMA)  # = _stream_seed, as a Python int
    gen = torch.Generator(device=z.device).manual_seed(seed)
    # gumbel_noise_like(z, generator=gen) without its operator's dispatch (z is float32/64)
    return _neg_noise(draw_seed(gen, z.device), z.shape, z.dtype, z.device).neg_()


def _gumbel_max(
    z: torch.Tensor,
    ids: torch.Tensor | None,
    keep: torch.Tensor | None,
    seeds: torch.Tensor | None,
    noise_seed: torch.Tensor | None,
    rows: torch.Tensor,
    vocab: int,
    stream: int,
) -> torch.Tensor:
    """``argmax(z + g)`` over the kept columns; ties of the score broken uniformly at random.

    Returns the winning columns. ``ids`` maps columns to token ids (``None``: column j is
    token j); ``rows`` are the rows' positions in the batch (generator mode's tie-break).
    """
    pos = ids if ids is not None else torch.arange(z.shape[-1], device=z.device)
    score = _noise(z, pos, seeds, noise_seed, stream).add_(z)
    if keep is not None:
        score.masked_fill_(~keep, _NEG_INF)
    col = score.argmax(-1, keepdim=True)
    best = score.gather(-1, col)
    tied = ((score == best).view(torch.uint8).sum(-1, dtype=torch.int32) > 1).nonzero().flatten()
    if tied.numel():
        # A uniform per (row, token) orders the tied maxima: each wins with equal probability.
        p = pos if pos.dim() == 1 else pos[tied]
        if seeds is not None:
            key = seeds[tied] ^ _signed64(_TIE_KEY)
            u = counter_uniform(key.unsqueeze(-1), p)
        else:
            assert noise_seed is not None
            u = counter_uniform(_stream_seed(noise_seed, _STREAM_TIES), rows[tied].unsqueeze(-1) * vocab + p)
        u = torch.where(score[tied] == best[tied], u, -1.0)
        col[tied] = u.argmax(-1, keepdim=True)
    return col.squeeze(-1)


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _logprob(
    z: torch.Tensor, ids: torch.Tensor | None, keep: torch.Tensor | None, col: torch.Tensor, vocab: int
) -> torch.Tensor:
    """``z[col] - log sum_{kept} exp(z)``, the sum taken in token-id order.

    The maximum of a kept set is 0, so no shift is needed; summing in id order with a
    sequential cumulative sum makes the result the same bits whether the row was drawn among
    candidates or over the whole vocabulary, alone or in any batch.
    """
    e = z.exp()
    if keep is not None:
        e.masked_fill_(~keep, 0.0)
    if ids is not None:
        order = torch.where(keep, ids, vocab) if keep is not None else ids
        e = e.gather(-1, order.argsort(-1))
    total = e.cumsum(-1)[:, -1]
    return z.gather(-1, col.unsqueeze(-1)).squeeze(-1) - total.log()

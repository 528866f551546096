r"""Next-token sampling for language models with the Gumbel-Max trick.

:func:`sample` draws one token per row of ``(B, V)`` logits after the usual processing
(temperature, top-k, top-p, min-p), exactly from the processed distribution, without
sorting the vocabulary where it can avoid it: top-k is one :func:`torch.topk`, top-p looks
at a growing set of the largest logits until its mass reaches ``top_p``, and the draw is a
Gumbel-Max over the kept tokens only. With ``seeds`` every row's token is a pure function
of its own seed and logits (batch-invariant sampling; see :mod:`gumbelkit._counter_noise`).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import torch

from ._counter_noise import counter_gumbel
from ._validation import check_generator, check_logits, compute_dtype
from .noise import gumbel_noise_like

__all__ = ["SampleOutput", "sample"]

_NEG_INF = float("-inf")
# Top-p without top-k first looks at the _FIRST_CANDIDATES largest logits, then at _GROWTH
# times more for the rows whose nucleus did not fit, and sorts the whole row once the
# candidate set would exceed _SORT_FRACTION of the vocabulary (tests lower these).
_FIRST_CANDIDATES = 256
_GROWTH = 8
_SORT_FRACTION = 0.25


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


class _Rows(NamedTuple):
    """The per-row parameters of one group of rows (all tensors of shape ``(n,)``)."""

    index: torch.Tensor  # positions of the rows in the batch
    local: torch.Tensor  # positions of the rows in the group's logits
    temperature: torch.Tensor  # > 0, compute dtype
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float64, 1 = off
    min_p: torch.Tensor  # float64, 0 = off
    seeds: torch.Tensor | None

    def take(self, i: torch.Tensor) -> _Rows:
        return _Rows(*(t if t is None else t[i] for t in self))


def _row_param(
    value: object,
    name: str,
    batch: int,
    device: torch.device,
    *,
    integer: bool,
    default: float,
    low: float,
    high: float,
    low_open: bool,
) -> torch.Tensor:
    """A scalar or a ``(B,)`` tensor, checked to lie in its range, as a ``(B,)`` tensor."""
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
            raise ValueError(
                f"{name} is on {value.device} but logits are on {device}; move it with .to()"
            )
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(
                f"{name} must be a scalar or a tensor of shape ({batch},) (one value per "
                f"row), got shape {tuple(value.shape)}"
            )
        t = value.to(dtype).expand(batch)
    else:
        if isinstance(value, bool) or not isinstance(value, Integral if integer else Real):
            raise TypeError(
                f"{name} must be {'an int' if integer else 'a float'} or a tensor, "
                f"got {type(value).__name__}"
            )
        t = torch.full((batch,), value, dtype=dtype, device=device)
    bad = ~((t > low) if low_open else (t >= low)) | ~(t <= high)  # NaN fails both
    if bool(bad.any()):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {bounds}, got {t[bad][:4].tolist()}")
    return t


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
        raise ValueError(
            f"seeds must have shape ({batch},) (one seed per row), got {tuple(seeds.shape)}"
        )
    if seeds.device != device:
        raise ValueError(
            f"seeds are on {seeds.device} but logits are on {device}; move them with .to()"
        )
    return seeds


def _check_scores(
    best: torch.Tensor, logits: torch.Tensor, local: torch.Tensor, index: torch.Tensor
) -> None:
    """Explain a non-finite best score: row ``i`` is ``logits[local[i]]``, batch row ``index[i]``.

    The best score is computed anyway, so valid input costs one small check; the diagnosis
    (bad logits, an empty row, or a temperature so small that ``logits / T`` overflows) runs
    only on error.
    """
    if bool(torch.isfinite(best).all()):
        return
    rows = (~torch.isfinite(best)).nonzero().flatten()
    bad = logits[local[rows]]
    for found, what in (
        (torch.isnan(bad).any(-1), "NaN; check the model that produced them"),
        (torch.isposinf(bad).any(-1), "+inf; use finite logits (-inf means 'impossible')"),
        (~(bad > _NEG_INF).any(-1), "only -inf: no token is possible"),
    ):
        if bool(found.any()):
            raise ValueError(f"logits of row(s) {index[rows[found]][:8].tolist()} contain {what}")
    raise ValueError(
        f"temperature is too small for the logits of row(s) {index[rows][:8].tolist()}: "
        "logits / temperature overflows; use temperature=0 for greedy decoding, a larger "
        "temperature, or float64 logits"
    )


def _cum_logsumexp(z: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)`` as a function of each row alone, whatever the batch around it.

    torch.logsumexp reduces in an order that depends on the batch shape (one row is split
    across threads, many rows are not), so its last bit can change with the batch. A
    cumulative sum accumulates each row sequentially (in double precision on the CPU), which
    batch-invariant sampling needs.
    """
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = (z - m).exp_().cumsum(-1)[..., -1:]
    return (total.log_() + m).squeeze(-1)


def _gumbel_max(
    z: torch.Tensor,
    ids: torch.Tensor | None,
    keep: torch.Tensor | None,
    rows: _Rows,
    generator: torch.Generator | None,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-Max over the kept entries of ``z``: ``argmax(z + g)``, ties to the lowest token id.

    ``ids`` maps columns to token ids (``None``: column j is token j); ``logits`` (the
    group's) only serve to explain an error. Returns the token ids and the winners' columns.
    """
    if rows.seeds is not None:
        pos = ids if ids is not None else torch.arange(z.shape[-1], device=z.device)
        noise = counter_gumbel(rows.seeds.unsqueeze(-1), pos, dtype=z.dtype)
    else:
        noise = gumbel_noise_like(z, generator=generator)
    score = noise.add_(z)
    if keep is not None:
        score.masked_fill_(~keep, _NEG_INF)
    col = score.argmax(-1, keepdim=True)  # the first maximum
    best = score.gather(-1, col)
    _check_scores(best.squeeze(-1), logits, rows.local, rows.index)
    if ids is None:
        return col.squeeze(-1), col.squeeze(-1)
    token = ids.gather(-1, col)
    tied = ((score == best).sum(-1) > 1).nonzero().flatten()
    if tied.numel():
        # Candidates are sorted by logit, not by id: an exact tie goes to the lowest id.
        s, i = score[tied], ids[tied]
        token[tied] = torch.where(s == best[tied], i, torch.iinfo(torch.int64).max).amin(
            -1, keepdim=True
        )
        col[tied] = (i == token[tied]).to(torch.uint8).argmax(-1, keepdim=True)
    return token.squeeze(-1), col.squeeze(-1)


def _logprob(z: torch.Tensor, keep: torch.Tensor | None, col: torch.Tensor) -> torch.Tensor:
    zk = z if keep is None else z.masked_fill(~keep, _NEG_INF)
    return z.gather(-1, col.unsqueeze(-1)).squeeze(-1) - _cum_logsumexp(zk)


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``z = logits / T`` in the compute dtype (``l / 1 == l`` exactly, so T = 1 skips the pass)."""
    z = logits.to(compute_dtype(logits.dtype))
    return z / temperature.unsqueeze(-1) if bool((temperature != 1).any()) else z


def _min_p_keep(z: torch.Tensor, zmax: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """min-p: keep ``z >= max z + log(min_p)`` (evaluated in float64)."""
    return z.double() >= zmax.double() + min_p.log().unsqueeze(-1)


def _dense(
    logits: torch.Tensor, rows: _Rows, generator: torch.Generator | None, want_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows without top-k/top-p: Gumbel-Max over the whole vocabulary (min-p as a mask)."""
    z = _scaled(logits, rows.temperature)
    keep = None
    if bool((rows.min_p > 0).any()):
        keep = _min_p_keep(z, z.amax(-1, keepdim=True), rows.min_p)
    token, col = _gumbel_max(z, None, keep, rows, generator, logits)
    return token, (_logprob(z, keep, col) if want_logprobs else None)


def _truncate(
    v: torch.Tensor, z: torch.Tensor, rows: _Rows, norm: torch.Tensor | None, complete: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept mask over candidates, whether the candidates sufficed, and how many are needed.

    ``v``: the ``c`` largest logits of each row, descending; ``z = v / temperature``;
    ``norm``: logsumexp of the whole row of ``z`` (used by rows with top-p but no top-k);
    ``complete``: ``(n, 1)``, the candidates hold every token that can be kept. The kept set
    is a prefix of each row. ``need`` is a lower bound on the candidates a row whose nucleus
    did not fit needs: the missing mass over the probability of the last candidate.
    """
    c = v.shape[-1]
    k = rows.top_k.unsqueeze(-1)
    last = v[:, -1:]
    keep = v > _NEG_INF
    ok = complete.clone()
    need = torch.zeros_like(ok, dtype=torch.float64)
    if bool((k > 0).any()):
        # top-k keeps every token at least as large as the k-th largest (ties included): the
        # candidates suffice once the last one is strictly below the k-th value.
        kth = torch.where(k > 0, v.gather(-1, (k - 1).clamp(0, c - 1)), _NEG_INF)
        keep &= v >= kth
        ok |= (k > 0) & (last < kth)

    p = rows.top_p.unsqueeze(-1)
    if bool((p < 1).any()):
        # pi over K1 (the whole row when top-k is off). The mass before position j is the
        # prefix sum S[j-1], non-decreasing, so the positions with mass before < p are a
        # prefix of each row: the first one, and each j >= 1 with S[j-1] < p.
        zk = z.masked_fill(~keep, _NEG_INF).double()
        if norm is None:
            logz = _cum_logsumexp(zk).unsqueeze(-1)
        elif bool(((k > 0) & (p < 1)).any()):
            logz = torch.where(k > 0, _cum_logsumexp(zk).unsqueeze(-1), norm.double().unsqueeze(-1))
        else:
            logz = norm.double().unsqueeze(-1)
        mass = zk.sub_(logz).exp_().cumsum(-1)
        n_below = (mass[:, :-1] < p).sum(-1, keepdim=True) + 1
        j = torch.minimum(n_below, keep.sum(-1, keepdim=True)) - 1  # the last position kept
        thresh = v.gather(-1, j)
        keep &= (v >= thresh) | (p >= 1)
        # top-p alone: the nucleus must end inside the candidates, with no tie left outside.
        ok |= (k == 0) & (n_below < c) & (last < thresh)
        last_prob = zk[:, -1:].exp().clamp(min=torch.finfo(torch.float64).tiny)
        need = c + (p - mass[:, -1:]).clamp(min=0) / last_prob

    if bool((rows.min_p > 0).any()):
        keep &= _min_p_keep(z, z[:, :1], rows.min_p)
    return keep, ok.squeeze(-1), need.squeeze(-1)


def _truncated(
    logits: torch.Tensor, rows: _Rows, generator: torch.Generator | None, want_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows with top-k or top-p: Gumbel-Max among the kept tokens of a candidate set.

    The candidates are the ``c`` largest logits of the pending rows (``torch.topk``, or a
    full sort when ``c`` exceeds ``_SORT_FRACTION`` of the row); rows whose kept set may
    extend past them try again with more.
    """
    n, vocab = logits.shape
    cdtype = compute_dtype(logits.dtype)
    token = torch.empty(n, dtype=torch.int64, device=logits.device)
    logprob = torch.empty(n, dtype=cdtype, device=logits.device) if want_logprobs else None

    # Rows with top-p but no top-k normalize over the whole row.
    norm = None
    p_only = ((rows.top_k == 0) & (rows.top_p < 1)).nonzero().flatten()
    if p_only.numel() == n:
        norm = _cum_logsumexp(_scaled(logits, rows.temperature))
    elif p_only.numel():
        norm = torch.zeros(n, dtype=cdtype, device=logits.device)
        norm[p_only] = _cum_logsumexp(_scaled(logits[p_only], rows.temperature[p_only]))

    def draw(
        z: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, r: _Rows, at: torch.Tensor
    ) -> None:
        t, col = _gumbel_max(z, ids, keep, r, generator, logits)
        token[at] = t
        if logprob is not None:
            logprob[at] = _logprob(z, keep, col)

    want = torch.where(rows.top_k > 0, rows.top_k + 1, _FIRST_CANDIDATES).clamp(max=vocab)
    pending = torch.arange(n, device=logits.device)
    while pending.numel():
        c = int(want[pending].max())
        if c > _SORT_FRACTION * vocab:
            c = vocab
        everyone = len(pending) == n
        r = rows if everyone else rows.take(pending)
        sub = logits if everyone else logits[pending]
        v, ids = sub.sort(-1, descending=True) if c == vocab else sub.topk(c, -1)
        del sub
        z = _scaled(v, r.temperature)
        _check_scores(z[:, 0], logits, r.local, r.index)
        complete = (v[:, -1:] == _NEG_INF) | (c == vocab)
        keep, ok, need = _truncate(
            v.to(cdtype), z, r, None if norm is None else norm[pending], complete
        )
        # The draw needs only the columns up to the longest kept prefix.
        width = int(keep.sum(-1).max())
        z, ids, keep = z[:, :width], ids[:, :width], keep[:, :width]
        if bool(ok.all()):
            draw(z, ids, keep, r, pending)
            break
        done = ok.nonzero().flatten()
        if done.numel():
            draw(z[done], ids[done], keep[done], r.take(done), pending[done])
        pending, need = pending[~ok], need[~ok]
        want[pending] = need.clamp(max=vocab).ceil().long().clamp(min=min(vocab, c * _GROWTH))
    return token, logprob


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    return_logprobs: bool = False,
) -> torch.Tensor | SampleOutput:
    r"""Sample the next token of each row of ``(B, V)`` logits, with the Gumbel-Max trick.

    The processed distribution of a row, in the order common engines apply it (Hugging Face
    ``generate``: temperature, top-k, top-p, min-p):

    1. temperature: :math:`z = \ell / T`. ``T = 0`` means greedy: the token is
       :math:`\arg\max \ell` (the lowest id among ties) and its log-probability is 0.
    2. top-k (Fan et al. 2018): keep :math:`K_1 = \{i : z_i \ge z_{(k)}\}`, the ``k`` largest
       and every token tied with the k-th (all tokens if top-k is off).
    3. top-p, nucleus (Holtzman et al. 2020): with :math:`\pi = \operatorname{softmax}(z)` over
       :math:`K_1`, keep :math:`K_2 = \{i \in K_1 : \sum_{j \in K_1,\, \pi_j > \pi_i} \pi_j < p\}`:
       the most probable tokens until their mass reaches ``p`` (the token that crosses ``p`` is
       kept, and so is every token tied with it).
    4. min-p (Nguyen et al. 2024): keep
       :math:`K_3 = \{i \in K_2 : \pi_i \ge p_{\min} \max_j \pi_j\}`,
       i.e. :math:`z_i \ge \max_j z_j + \log p_{\min}`.
    5. the token is drawn from :math:`q_i = e^{z_i} / \sum_{j \in K_3} e^{z_j}` on :math:`K_3`
       as :math:`\arg\max_{i \in K_3} (z_i + g_i)` with Gumbel noise :math:`g` (Gumbel 1954;
       Maddison et al. 2014), ties to the lowest id; the log-probability is :math:`\log q_i`.

    Scores are computed in float32 for half-precision logits (float64 for float64), the top-p
    masses in float64; the sets above are exact except where a mass lies within rounding of
    ``p``. ``-inf`` logits are impossible tokens.

    Only the kept tokens are drawn: top-k is :func:`torch.topk` of ``k + 1`` logits; top-p
    without top-k takes the 256 largest logits, then at least 8 times more for the rows whose
    nucleus did not fit (more when the missing mass shows that is not enough), and sorts a row
    only when more than a quarter of its vocabulary is needed.

    Args:
        logits: ``(B, V)`` floating-point logits.
        temperature: ``>= 0``; a float or a ``(B,)`` tensor (0 = greedy for that row).
        top_k: ``>= 0`` int or ``(B,)`` integer tensor; 0 or None = off, ``>= V`` = off.
        top_p: in ``(0, 1]``; a float or a ``(B,)`` tensor; 1 or None = off.
        min_p: in ``[0, 1]``; a float or a ``(B,)`` tensor; 0 or None = off.
        generator: the random source when ``seeds`` is None: the noise is drawn with
            :func:`gumbelkit.noise.gumbel_noise_like` over the scores of the candidates (the
            whole row when nothing truncates); the same state gives the same tokens.
        seeds: ``(B,)`` int64: row ``b`` uses the counter-based noise
            ``counter_gumbel(seeds[b], token_id)`` (:mod:`gumbelkit._counter_noise`), so its
            token depends only on its own seed, logits and parameters, never on the other rows,
            the batch size or the row's position. Excludes ``generator``.
        return_logprobs: also return :math:`\log q` of the sampled tokens.

    Returns:
        ``(B,)`` int64 token ids, or a :class:`SampleOutput` ``(ids, logprobs)`` when
        ``return_logprobs`` (log-probabilities in the compute dtype).

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
        raise ValueError(
            "pass either seeds (counter-based, batch-invariant noise) or generator, not both"
        )
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be a bool, got {type(return_logprobs).__name__}")
    cdtype = compute_dtype(logits.dtype)
    temp = _row_param(
        temperature,
        "temperature",
        batch,
        dev,
        integer=False,
        default=1.0,
        low=0.0,
        high=math.inf,
        low_open=False,
    )
    if bool(torch.isinf(temp).any()):
        raise ValueError("temperature must be finite")
    k = _row_param(
        top_k, "top_k", batch, dev, integer=True, default=0, low=0, high=math.inf, low_open=False
    )
    k = torch.where(k >= vocab, 0, k)
    p = _row_param(
        top_p, "top_p", batch, dev, integer=False, default=1.0, low=0.0, high=1.0, low_open=True
    )
    mp = _row_param(
        min_p, "min_p", batch, dev, integer=False, default=0.0, low=0.0, high=1.0, low_open=False
    )

    ids = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(batch, dtype=cdtype, device=dev)
    greedy = temp == 0
    truncated = (k > 0) | (p < 1)
    if bool(greedy.any()):
        g = greedy.nonzero().flatten()
        sub = logits if len(g) == batch else logits[g]
        col = sub.argmax(-1, keepdim=True)  # the first maximum: the lowest id
        _check_scores(sub.gather(-1, col).squeeze(-1), sub, torch.arange(len(g), device=dev), g)
        ids[g] = col.squeeze(-1)
    for select, run in ((~greedy & ~truncated, _dense), (~greedy & truncated, _truncated)):
        if not bool(select.any()):
            continue
        index = select.nonzero().flatten()
        rows = _Rows(
            index,
            torch.arange(len(index), device=dev),
            temp[index].to(cdtype),
            k[index],
            p[index],
            mp[index],
            None if seeds is None else seeds[index],
        )
        whole = len(index) == batch
        tok, lp = run(logits if whole else logits[index], rows, generator, return_logprobs)
        ids[index] = tok
        if lp is not None:
            logprobs[index] = lp
    return SampleOutput(ids, logprobs) if return_logprobs else ids

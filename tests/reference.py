"""Naive float64 reference formulas, shared by tests and benchmarks.

Written straight from the papers, with no attention to speed or memory, so that the
optimized library code can be checked against something obviously right.
"""

from __future__ import annotations

import itertools
import math

import torch

EULER_GAMMA = 0.5772156649015329


def perturbed(logits: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    x = logits.double() + noise.double()
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return x


def gumbel_softmax(logits: torch.Tensor, noise: torch.Tensor, tau: float | torch.Tensor = 1.0,
                   dim: int = -1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau) in float64 (Jang et al. 2017, eq. 1)."""
    tau = tau.double() if isinstance(tau, torch.Tensor) else tau
    return torch.softmax(perturbed(logits, noise, mask) / tau, dim)


def log_gumbel_softmax(logits: torch.Tensor, noise: torch.Tensor, tau: float | torch.Tensor = 1.0,
                       dim: int = -1, mask: torch.Tensor | None = None) -> torch.Tensor:
    tau = tau.double() if isinstance(tau, torch.Tensor) else tau
    return torch.log_softmax(perturbed(logits, noise, mask) / tau, dim)


def torch_gumbel_noise(x: torch.Tensor) -> torch.Tensor:
    """The noise torch.nn.functional.gumbel_softmax draws from the global generator."""
    return -torch.empty_like(x, memory_format=torch.legacy_contiguous_format).exponential_().log()


def plackett_luce_prob(probs: list[float], seq: tuple[int, ...]) -> float:
    """P(first pick seq[0], then seq[1], ...) under Plackett-Luce sampling without replacement."""
    p, left = 1.0, 1.0
    for i in seq:
        p *= probs[i] / left
        left -= probs[i]
    return p


def plackett_luce_table(probs: list[float], k: int) -> dict[tuple[int, ...], float]:
    return {seq: plackett_luce_prob(probs, seq) for seq in itertools.permutations(range(len(probs)), k)}


def gumbel_cdf(x: float, loc: float = 0.0, scale: float = 1.0) -> float:
    return math.exp(-math.exp(-(x - loc) / scale))


# ------------------------------------------------ transformers' sampling warpers (reference)
# transformers is not a dependency: these reproduce, line for line, the logic of its
# TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper
# (transformers/generation/logits_process.py, v4.4x), applied in the order generate() adds
# them: temperature, top-k, top-p, min-p. They compute in the dtype of the scores, as
# transformers does. Removed tokens get -inf.


def hf_top_k(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """TopKLogitsWarper: remove scores below the k-th largest (ties with it are kept)."""
    top_k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    indices_to_remove = scores < torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(indices_to_remove, float("-inf"))


def hf_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """TopPLogitsWarper: sort ascending, remove the tokens whose cumulative probability is
    <= 1 - top_p, always keep the min_tokens_to_keep last (most probable) ones."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -min_tokens_to_keep:] = 0
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    return scores.masked_fill(indices_to_remove, float("-inf"))


def hf_min_p(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """MinPLogitsWarper: remove tokens with probability < min_p * (top probability), keeping
    the min_tokens_to_keep most probable."""
    probs = torch.softmax(scores, dim=-1)
    top_probs = probs.amax(dim=-1, keepdim=True)
    tokens_to_remove = probs < min_p * top_probs
    sorted_indices = torch.argsort(scores, descending=True, dim=-1)
    sorted_indices_to_remove = torch.gather(tokens_to_remove, dim=-1, index=sorted_indices)
    sorted_indices_to_remove[..., :min_tokens_to_keep] = False
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    return scores.masked_fill(indices_to_remove, float("-inf"))


def hf_processed_probs(scores: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, min_p: float | None = None,
                       min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The distribution transformers' generate(do_sample=True) samples from, for (B, V) scores.

    The warpers are added only when active, as in GenerationMixin._get_logits_processor:
    temperature != 1, top_k != 0, top_p < 1, min_p not None.
    """
    if temperature != 1.0:
        if not temperature > 0:
            raise ValueError("transformers requires a strictly positive temperature")
        scores = scores / temperature
    if top_k:
        scores = hf_top_k(scores, top_k, min_tokens_to_keep)
    if top_p is not None and top_p < 1.0:
        scores = hf_top_p(scores, top_p, min_tokens_to_keep)
    if min_p is not None:
        scores = hf_min_p(scores, min_p, min_tokens_to_keep)
    return torch.softmax(scores, dim=-1)


def exact_top_p_keep(row: torch.Tensor, top_p: float) -> list[bool]:
    """Which tokens of one row top-p keeps, decided in exact rational arithmetic on the float64
    weights exp(l_i - max l): token i is kept iff the mass of strictly larger logits < p."""
    from fractions import Fraction

    values = [float(v) for v in row.double()]
    top = max(values)
    weights = [Fraction(math.exp(v - top)) if v != float("-inf") else Fraction(0) for v in values]
    total = sum(weights)
    p = Fraction(top_p)
    return [
        v != float("-inf") and sum(w for u, w in zip(values, weights, strict=True) if u > v) < p * total
        for v in values
    ]

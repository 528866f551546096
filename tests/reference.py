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

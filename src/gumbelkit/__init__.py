"""gumbelkit: Gumbel-Max, Gumbel-top-k and Gumbel-Softmax (Concrete) done right, for PyTorch.

Example:
    >>> import torch, gumbelkit as gk
    >>> gen = torch.Generator().manual_seed(0)
    >>> y = gk.gumbel_softmax(torch.randn(4, 10), tau=0.5, hard=True, generator=gen)
    >>> y.sum(-1).tolist()
    [1.0, 1.0, 1.0, 1.0]
"""

from . import distributions, estimators, nn, schedules, structured
from .functional import gumbel_max, gumbel_softmax, gumbel_topk, log_gumbel_softmax
from .nn import CategoricalVAE, GumbelSoftmax, GumbelVectorQuantizer
from .noise import gumbel_noise, gumbel_noise_like, rng_context
from .sampling import SampleOutput, sample
from .schedules import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LearnableTemperature,
    LinearSchedule,
)
from .structured import gumbel_sinkhorn, matching, relaxed_topk

__version__ = "0.1.0"

__all__ = [
    "CategoricalVAE",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "GumbelSoftmax",
    "GumbelVectorQuantizer",
    "LearnableTemperature",
    "LinearSchedule",
    "SampleOutput",
    "__version__",
    "distributions",
    "estimators",
    "gumbel_max",
    "gumbel_noise",
    "gumbel_noise_like",
    "gumbel_sinkhorn",
    "gumbel_softmax",
    "gumbel_topk",
    "log_gumbel_softmax",
    "matching",
    "nn",
    "relaxed_topk",
    "rng_context",
    "sample",
    "schedules",
    "structured",
]

"""``torch.nn`` modules built on the Gumbel-Softmax.

- :class:`GumbelSoftmax`: the relaxed (or straight-through hard) sample as a layer, with a
  documented choice of what it does in ``eval()`` mode.
- :class:`GumbelVectorQuantizer`: the codebook quantizer of wav2vec 2.0.
- :class:`CategoricalVAE`: the encoder / decoder / bounds of a VAE with categorical latents,
  used by ``gumbelkit demo``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ._kernels.estimators import row_max
from ._validation import (
    check_generator,
    check_logits,
    check_mask,
    check_tau,
    compute_dtype,
    normalize_dim,
)
from .distributions import HardConcrete
from .functional import gumbel_max, gumbel_softmax, log_gumbel_softmax

__all__ = [
    "CategoricalVAE",
    "GumbelSoftmax",
    "GumbelVectorQuantizer",
    "L0Gate",
    "VAEOutput",
    "VQOutput",
]

EVAL_MODES = ("sample", "argmax", "softmax")


def _check_positive_tau(tau: object) -> None:
    if isinstance(tau, nn.Module):
        return
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float or an nn.Module returning a tensor "
                        f"(e.g. LearnableTemperature), got {type(tau).__name__}")
    if not 0 < tau < math.inf:  # comparisons, not math.isfinite: also for a float traced by compile
        raise ValueError(f"tau must be finite and > 0, got {tau}")


class GumbelSoftmax(nn.Module):
    r"""The Gumbel-Softmax (Concrete) sample as a layer (Jang et al. 2017; Maddison et al. 2017).

    .. math::
        y = \operatorname{softmax}\big((\mathrm{logits} + g) / \tau\big), \qquad
        g \sim \operatorname{Gumbel}(0, 1)

    In training mode the layer samples (:func:`gumbelkit.gumbel_softmax`, or
    :func:`gumbelkit.log_gumbel_softmax` with ``log=True``). In ``eval()`` mode it does what
    ``eval_mode`` says:

    - ``"sample"``: the same as in training (a stochastic layer at test time too);
    - ``"argmax"``: the one-hot of ``argmax(logits)``, the mode of the categorical (no noise,
      no gradient);
    - ``"softmax"``: the noiseless ``softmax(logits / tau)``.

    With ``log=True`` every mode returns the log of its value (``-inf`` for exact zeros).
    Anneal the temperature by assigning ``layer.tau = schedule(step)``, or pass a module such as
    :class:`gumbelkit.schedules.LearnableTemperature` as ``tau`` to learn it.

    Args:
        tau: temperature > 0, a float or an ``nn.Module`` whose ``forward()`` returns it.
        hard: straight-through one-hot samples (exact categorical draws, relaxed gradients).
        dim: the category dimension.
        eval_mode: ``"sample"``, ``"argmax"`` or ``"softmax"`` (see above).
        log: return log-probabilities (stable in log space; cannot be combined with ``hard``).

    Example:
        >>> layer = GumbelSoftmax(tau=0.5, hard=True)
        >>> y = layer(torch.randn(4, 6), generator=torch.Generator().manual_seed(0))
        >>> y.sum(-1).tolist()
        [1.0, 1.0, 1.0, 1.0]
        >>> layer.eval_mode = "argmax"
        >>> layer.eval()(torch.tensor([[0.0, 3.0, 1.0]])).tolist()
        [[0.0, 1.0, 0.0]]
    """

    def __init__(self, tau: float | nn.Module = 1.0, hard: bool = False, dim: int = -1, *,
                 eval_mode: str = "sample", log: bool = False) -> None:
        super().__init__()
        _check_positive_tau(tau)
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        if hard and log:
            raise ValueError("hard=True and log=True cannot be combined: the log of a one-hot sample "
                             "is 0 / -inf; use log=True for a loss on log-probabilities, hard=True "
                             "for discrete samples")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {dim!r}")
        self.tau, self.hard, self.dim, self.eval_mode, self.log = tau, hard, dim, eval_mode, log

    def temperature(self) -> float | torch.Tensor:
        """The current temperature (calls ``tau`` when it is a module)."""
        return self.tau() if isinstance(self.tau, nn.Module) else self.tau

    def forward(self, logits: torch.Tensor, *, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        tau = self.temperature()
        if self.training or self.eval_mode == "sample":
            if self.log:
                return log_gumbel_softmax(logits, tau, self.dim, generator=generator, mask=mask)
            return gumbel_softmax(logits, tau, self.hard, dim=self.dim, generator=generator, mask=mask)
        logits = check_logits(logits)
        dim = normalize_dim(self.dim, logits.dim())
        check_generator(generator, logits.device)
        mask = check_mask(mask, logits)
        tau = check_tau(tau, logits, dim)
        x = logits.to(compute_dtype(logits.dtype))
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        x = x - row_max(x.detach(), dim)  # an operator: NaN, +inf or no allowed category raise under compile too
        if self.eval_mode == "argmax":
            out = torch.zeros_like(x).scatter_(dim, x.detach().argmax(dim, keepdim=True), 1.0)
            out = out.log() if self.log else out
        else:
            x = x / tau
            out = x.log_softmax(dim) if self.log else x.softmax(dim)
        return out.to(logits.dtype)

    def extra_repr(self) -> str:
        tau = "module" if isinstance(self.tau, nn.Module) else self.tau
        return (f"tau={tau}, hard={self.hard}, dim={self.dim}, eval_mode={self.eval_mode!r}, "
                f"log={self.log}")


class VQOutput(NamedTuple):
    """What :class:`GumbelVectorQuantizer` returns."""

    x: torch.Tensor
    """The quantized vectors ``(..., vq_dim)``, in the dtype of the input."""
    codes: torch.Tensor
    """The chosen codebook entry of each group, int64 ``(..., groups)``."""
    logits: torch.Tensor
    """The selection logits ``(..., groups, num_vars)``, in float32 (float64 for float64 input)."""
    code_perplexity: torch.Tensor
    """Sum over groups of exp(entropy) of the batch-averaged hard one-hot codes."""
    prob_perplexity: torch.Tensor
    """Sum over groups of exp(entropy) of the batch-averaged softmax probabilities."""
    diversity_loss: torch.Tensor
    """``(G V - prob_perplexity) / (G V)``: 0 when every entry is used equally."""


class GumbelVectorQuantizer(nn.Module):
    r"""Product quantization with a straight-through Gumbel-Softmax (wav2vec 2.0).

    The input is projected to ``groups`` x ``num_vars`` logits; each group picks one of its
    ``num_vars`` codebook vectors by a hard straight-through Gumbel-Softmax sample (one-hot in
    the forward pass, relaxed gradients in the backward pass), and the chosen vectors of the
    groups are concatenated (Baevski et al. 2020, "wav2vec 2.0", section 2 and eq. 1):

    .. math::
        p_{g,v} = \frac{\exp((l_{g,v} + n_v)/\tau)}{\sum_k \exp((l_{g,k} + n_k)/\tau)},\quad
        q = \big[e_{1, \arg\max_v p_{1,v}}; \dots; e_{G, \arg\max_v p_{G,v}}\big]

    The diversity loss pushes the batch-averaged selection probabilities
    :math:`\bar p_g` towards uniform, as in the fairseq implementation of wav2vec 2.0:
    :math:`L_d = (GV - \sum_g \exp H(\bar p_g)) / (GV)`.

    The projection, the sampling and the perplexities are computed in float32 (float64 for
    float64 input) with autocast switched off, because low-precision softmax statistics are
    unreliable; the quantized output is cast back to the input's dtype. Evaluation mode uses
    ``eval_mode`` like :class:`GumbelSoftmax` (default ``"argmax"``: the most likely entry, no
    noise, as in wav2vec 2.0). Anneal ``tau`` by assignment (wav2vec 2.0 goes from 2 to 0.5).

    Args:
        dim: the input feature size.
        num_vars: codebook entries per group (``V``).
        groups: number of groups (``G``).
        vq_dim: the output size, divisible by ``groups`` (default ``dim``).
        tau: the Gumbel-Softmax temperature, a float or a temperature module.
        eval_mode: ``"argmax"`` (default), ``"sample"`` or ``"softmax"`` (a soft mixture).

    Example:
        >>> vq = GumbelVectorQuantizer(dim=16, num_vars=8, groups=2, vq_dim=12)
        >>> out = vq(torch.randn(3, 5, 16), generator=torch.Generator().manual_seed(0))
        >>> out.x.shape, out.codes.shape, bool(0 <= out.diversity_loss < 1)
        (torch.Size([3, 5, 12]), torch.Size([3, 5, 2]), True)
    """

    def __init__(self, dim: int, num_vars: int, groups: int = 2, vq_dim: int | None = None, *,
                 tau: float | nn.Module = 2.0, eval_mode: str = "argmax") -> None:
        super().__init__()
        vq_dim = dim if vq_dim is None else vq_dim
        for name, value in (("dim", dim), ("num_vars", num_vars), ("groups", groups),
                            ("vq_dim", vq_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if vq_dim % groups:
            raise ValueError(f"vq_dim={vq_dim} must be divisible by groups={groups}")
        self.dim, self.num_vars, self.groups, self.vq_dim = dim, num_vars, groups, vq_dim
        self.select = GumbelSoftmax(tau, hard=True, eval_mode=eval_mode)
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        self.codebook = nn.Parameter(torch.empty(groups, num_vars, vq_dim // groups))
        # fairseq's initialization: unit-variance logits at the start, codebook in U(0, 1)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.uniform_(self.codebook)

    @property
    def tau(self) -> float | nn.Module:
        return self.select.tau

    @tau.setter
    def tau(self, value: float | nn.Module) -> None:
        _check_positive_tau(value)
        self.select.tau = value

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> VQOutput:
        x = check_logits(x, "x")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features in its last dimension but the quantizer "
                             f"was built with dim={self.dim}")
        cdtype = compute_dtype(x.dtype)
        g, v = self.groups, self.num_vars
        with torch.autocast(_autocast_device(x), enabled=False):
            logits = F.linear(x.to(cdtype), self.weight_proj.weight.to(cdtype),
                              self.weight_proj.bias.to(cdtype)).unflatten(-1, (g, v))
            onehot = self.select(logits, generator=generator)
            q = torch.einsum("...gv,gvd->...gd", onehot, self.codebook.to(cdtype)).flatten(-2)
            avg_probs = logits.softmax(-1).reshape(-1, g, v).mean(0)
            avg_codes = onehot.detach().reshape(-1, g, v).mean(0)
            prob_perplexity = _perplexity(avg_probs)
            code_perplexity = _perplexity(avg_codes)
        return VQOutput(
            x=q.to(x.dtype),
            codes=onehot.detach().argmax(-1),
            logits=logits,
            code_perplexity=code_perplexity,
            prob_perplexity=prob_perplexity,
            diversity_loss=(g * v - prob_perplexity) / (g * v),
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_vars={self.num_vars}, groups={self.groups}, vq_dim={self.vq_dim}"


def _autocast_device(x: torch.Tensor) -> str:
    """``x``'s device type for ``torch.autocast`` (meta tensors, which autocast rejects, use the CPU's)."""
    return "cpu" if x.device.type == "meta" else x.device.type


def _perplexity(avg: torch.Tensor) -> torch.Tensor:
    """``sum_g exp(H(avg[g]))`` for per-group distributions ``avg`` of shape ``(G, V)``."""
    return torch.exp(-torch.special.xlogy(avg, avg).sum(-1)).sum()


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAEOutput(NamedTuple):
    """What :meth:`CategoricalVAE.forward` returns; the last three are per example ``(batch,)``."""

    logits: torch.Tensor
    r"""Logits of :math:`q(z \mid x)`, ``(batch, n_latents, n_classes)``."""
    z: torch.Tensor
    """The codes the decoder saw (one-hot, or relaxed for a soft estimator)."""
    nll: torch.Tensor
    r""":math:`-\log p(x \mid z)`, differentiable: with ``kl``, the training loss."""
    kl: torch.Tensor
    r""":math:`\mathrm{KL}(q(z \mid x) \,\|\, p(z))`, exact and differentiable."""
    neg_elbo: torch.Tensor
    """Single-sample estimate of -ELBO with the discrete codes ``argmax z`` (no gradient)."""


class CategoricalVAE(nn.Module):
    r"""A VAE with ``n_latents`` categorical latents of ``n_classes`` classes each (Jang et al. 2017).

    Encoder: an MLP from the (flattened, binary) input to logits of shape
    ``(batch, n_latents, n_classes)`` for :math:`q(z \mid x)`, a product of categoricals.
    Decoder: an MLP from the flattened one-hot (or relaxed) codes to Bernoulli logits of
    :math:`p(x \mid z)`. The prior :math:`p(z)` is uniform. Per example,

    .. math::
        -\mathrm{ELBO}(x) = \mathbb E_{q(z\mid x)}[-\log p(x \mid z)]
        + \mathrm{KL}(q(z\mid x) \,\|\, p(z)),\quad
        \mathrm{KL} = \sum_{n} \Big(\sum_k q_{nk} \log q_{nk} + \log K\Big)

    where the KL is exact (:meth:`kl`) and the expectation is estimated with samples
    :math:`z` from a gradient estimator (:meth:`nll`). The model does not pick the estimator:
    :meth:`forward` takes the sampling function (logits -> codes), so a training loop (or a
    ``DistributedDataParallel`` wrapper, which only sees ``forward``) decides.

    Example:
        >>> import gumbelkit as gk
        >>> gen = torch.Generator().manual_seed(0)
        >>> vae = CategoricalVAE(in_features=64, n_latents=4, n_classes=5, hidden=(32,))
        >>> x = torch.randint(0, 2, (8, 64), generator=gen).float()
        >>> out = vae(x, lambda logits: gk.gumbel_softmax(logits, 1.0, hard=True, generator=gen))
        >>> loss = out.nll + out.kl  # one value per example, differentiable
        >>> loss.shape, bool(torch.equal(loss.detach(), out.neg_elbo)), bool((out.kl >= 0).all())
        (torch.Size([8]), True, True)
    """

    def __init__(self, in_features: int, n_latents: int = 8, n_classes: int = 8,
                 hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("n_latents", n_latents),
                            ("n_classes", n_classes), *(("hidden", h) for h in hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (a categorical needs two classes), got {n_classes}")
        self.in_features, self.n_latents, self.n_classes = in_features, n_latents, n_classes
        codes = n_latents * n_classes
        self.encoder = _mlp([in_features, *hidden, codes])
        self.decoder = _mlp([codes, *reversed(hidden), in_features])

    def forward(self, x: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor]) -> VAEOutput:
        """Encode ``x``, draw codes ``z = sample(logits)``, and score them (see :class:`VAEOutput`)."""
        logits = self.encode(x)
        z = sample(logits)
        nll, kl = self.nll(x, z), self.kl(logits)
        with torch.no_grad():
            codes = F.one_hot(z.argmax(-1), self.n_classes).to(z.dtype)
            hard_nll = self.nll(x, codes)  # no data-dependent shortcut: compile, export and vmap trace this
        return VAEOutput(logits, z, nll, kl, hard_nll + kl.detach())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of :math:`q(z\\mid x)`, shape ``(batch, n_latents, n_classes)``."""
        return self.encoder(x.flatten(1)).unflatten(-1, (self.n_latents, self.n_classes))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of :math:`p(x\\mid z)` for codes ``(..., n_latents, n_classes)``."""
        return self.decoder(z.flatten(-2))

    def nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r""":math:`-\log p(x \mid z)` per example: binary cross-entropy with logits, summed."""
        x_logits = self.decode(z)
        x = x.flatten(1).to(x_logits.dtype).expand_as(x_logits)
        return F.binary_cross_entropy_with_logits(x_logits, x, reduction="none").sum(-1)

    @staticmethod
    def kl(logits: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\mathrm{KL}(q \,\|\, \mathrm{uniform})` per example, summed over latents."""
        log_q = logits.log_softmax(-1)
        return (log_q.exp() * log_q).sum(-1).add(math.log(logits.shape[-1])).sum(-1)

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` one-hot codes from the uniform prior, shape ``(n, n_latents, n_classes)``."""
        device = next(self.parameters()).device if device is None else device
        logits = torch.zeros(n, self.n_latents, self.n_classes, device=device)
        return F.one_hot(gumbel_max(logits, generator=generator), self.n_classes).float()

    @torch.no_grad()
    def importance_bound(self, x: torch.Tensor, m: int, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        r"""The ``m``-sample importance-weighted bound on :math:`\log p(x)` per example.

        .. math::
            \mathcal L_m(x) = \log \frac1m \sum_{i=1}^m
            \frac{p(x \mid z_i)\, p(z_i)}{q(z_i \mid x)}, \qquad z_i \sim q(z \mid x)

        with exact discrete samples drawn by :func:`gumbelkit.gumbel_max` (Burda, Grosse and
        Salakhutdinov 2016). :math:`\mathcal L_1` is an unbiased estimate of the ELBO and
        :math:`\mathcal L_m` increases towards :math:`\log p(x)` as ``m`` grows.
        """
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (the number of importance samples) must be a positive int, got {m!r}")
        logits = self.encode(x)
        log_q_all = logits.log_softmax(-1)
        idx = gumbel_max(log_q_all.expand(m, *log_q_all.shape), generator=generator)
        log_q = log_q_all.expand(m, *log_q_all.shape).gather(-1, idx.unsqueeze(-1)).sum((-2, -1))
        log_prior = -self.n_latents * math.log(self.n_classes)
        log_px_z = -self.nll(x, F.one_hot(idx, self.n_classes).to(logits.dtype))
        return torch.logsumexp(log_px_z + log_prior - log_q, 0) - math.log(m)


class L0Gate(nn.Module):
    r"""Hard Concrete gates for L0 regularization (Louizos, Welling and Kingma 2018).

    Holds one learnable :math:`\log\alpha` per gate; ``forward(x)`` multiplies the trailing
    dimensions ``shape`` of ``x`` by gates :math:`z \sim` :class:`~gumbelkit.distributions.HardConcrete`
    :math:`(\tau, \log\alpha; \gamma, \zeta)`, which are exactly 0 with positive probability:

    .. math::
        z = \min\big(1, \max(0, \gamma + (\zeta - \gamma)\,\sigma((\log\alpha + g_1 - g_2)/\tau))\big),
        \qquad \mathbb E\,\|z\|_0 = \sum_j \sigma\big(\log\alpha_j - \tau\log(-\gamma/\zeta)\big).

    In training mode every leading index of ``x`` (every example) gets its own gates, as in the
    paper's code; in ``eval()`` mode the gates are the deterministic median
    :math:`\min(1, \max(0, \gamma + (\zeta-\gamma)\,\sigma(\log\alpha/\tau)))` (the paper's
    test-time estimator uses :math:`\sigma(\log\alpha)`, the same at :math:`\tau = 1`). Add
    ``lam * gate.expected_l0()`` to the loss to penalize the expected number of open gates.

    Args:
        shape: the gated trailing shape of the input (an int or a tuple).
        temperature: :math:`\tau > 0` (the paper: 2/3).
        lower: :math:`\gamma < 0` (the paper: -0.1).
        upper: :math:`\zeta > 1` (the paper: 1.1).
        init_prob_nonzero: the probability in (0, 1) that each gate is nonzero at initialization.

    Example:
        >>> gate = L0Gate(5)
        >>> y = gate(torch.ones(3, 5), generator=torch.Generator().manual_seed(0))
        >>> y.shape, round(gate.expected_l0().item(), 2)  # 5 gates, each open w.p. 0.9
        (torch.Size([3, 5]), 4.5)
        >>> [round(v, 2) for v in gate.eval()(torch.ones(2, 5))[0].tolist()]  # the median gates
        [0.75, 0.75, 0.75, 0.75, 0.75]
    """

    def __init__(self, shape: int | Sequence[int], temperature: float = 2 / 3, lower: float = -0.1,
                 upper: float = 1.1, *, init_prob_nonzero: float = 0.9) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"shape must be a positive int or a non-empty tuple of them, got {shape!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not 0 < init_prob_nonzero < 1:
            raise ValueError(f"init_prob_nonzero must be in (0, 1), got {init_prob_nonzero!r}")
        # checks temperature > 0, lower < 0 and upper > 1 with the distribution's messages
        HardConcrete(temperature, torch.zeros(()), lower=lower, upper=upper, validate_args=True)
        self.shape, self.temperature, self.lower, self.upper = shape, float(temperature), lower, upper
        self.init_prob_nonzero = float(init_prob_nonzero)
        self.log_alpha = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every :math:`\\log\\alpha` so that ``P(z != 0) = init_prob_nonzero``."""
        p = self.init_prob_nonzero
        with torch.no_grad():
            self.log_alpha.fill_(math.log(p / (1 - p)) + self.temperature * math.log(-self.lower / self.upper))

    def distribution(self) -> HardConcrete:
        """The gates' :class:`~gumbelkit.distributions.HardConcrete` distribution."""
        # the gate checks its own arguments at construction: no per-call data-dependent validation
        return HardConcrete(self.temperature, self.log_alpha, lower=self.lower, upper=self.upper,
                            validate_args=False)

    def expected_l0(self) -> torch.Tensor:
        """The expected number of nonzero gates, differentiable in ``log_alpha`` (the L0 penalty)."""
        return self.distribution().prob_nonzero().sum()

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        x = check_logits(x, "x")
        n = len(self.shape)
        if tuple(x.shape[x.dim() - n:]) != self.shape:
            raise ValueError(f"x of shape {tuple(x.shape)} does not end in the gate shape {self.shape}")
        d = self.distribution()
        if self.training:
            z = d.rsample(x.shape[: x.dim() - n], generator=generator)
        else:
            z = d.icdf(torch.tensor(0.5, device=x.device))
        return x * z.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, temperature={self.temperature:.4g}, lower={self.lower}, "
                f"upper={self.upper}")

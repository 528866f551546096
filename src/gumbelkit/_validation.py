"""Argument checks shared by every public function.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and says
what to change, so bad input never turns into a silent NaN deep inside a kernel.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

__all__ = [
    "DimError",
    "check_generator",
    "check_logits",
    "check_mask",
    "check_rows",
    "check_tau",
    "check_tau_values",
    "compute_dtype",
    "normalize_dim",
]


class DimError(ValueError, IndexError):
    """A ``dim`` out of range: a ``ValueError`` that ``except IndexError`` (torch's habit) catches too."""


def check_logits(logits: object, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.is_complex() or not logits.is_floating_point():
        raise TypeError(
            f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {logits.dtype}; convert it with {name}.float()"
        )
    if logits.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the categories), got a 0-d tensor")
    return logits


def normalize_dim(dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise DimError(f"dim={dim} is out of range for a tensor with {ndim} dimension(s); "
                       f"use a value in [{-ndim}, {ndim - 1}]")
    return dim % ndim


def check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = generator.device
    same = gdev.type == device.type and (
        gdev.index is None or device.index is None or gdev.index == device.index
    )
    if not same:
        raise ValueError(
            f"generator is on device {gdev} but the tensor is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def check_tau(tau: object, logits: torch.Tensor, dim: int) -> float | torch.Tensor:
    """A positive finite float, or a positive finite tensor with size 1 along ``dim``."""
    hint = "; for the tau -> 0 limit use gumbel_max (or hard=True)"
    if isinstance(tau, torch.Tensor):
        if tau.is_complex() or not tau.is_floating_point():
            raise TypeError(f"tau must be a float or a floating-point tensor, got dtype {tau.dtype}")
        if tau.device != logits.device:
            raise ValueError(f"tau is on {tau.device} but logits are on {logits.device}; move it with .to()")
        if tau.dim() > logits.dim():
            raise ValueError(f"tau of shape {tuple(tau.shape)} has more dimensions than logits "
                             f"{tuple(logits.shape)}; it must broadcast against logits")
        try:
            shape = torch.broadcast_shapes(tau.shape, logits.shape)
        except RuntimeError:
            shape = None
        if shape != logits.shape:
            raise ValueError(f"tau of shape {tuple(tau.shape)} does not broadcast to logits of shape "
                             f"{tuple(logits.shape)}")
        offset = logits.dim() - tau.dim()
        if dim >= offset and tau.shape[dim - offset] != 1:
            raise ValueError(
                f"tau of shape {tuple(tau.shape)} varies along the category dimension dim={dim}; "
                "use one temperature per distribution (size 1 along dim, e.g. tau.unsqueeze(dim))"
            )
        from ._kernels.ops import checked_tau  # an operator: the value check runs under compile and export too

        return checked_tau(tau)
    if isinstance(tau, bool) or not isinstance(tau, Real):
        raise TypeError(f"tau must be a float or a tensor, got {type(tau).__name__}")
    tau = float(tau)
    if not 0 < tau < math.inf:  # comparisons, not math.isfinite: also for a float traced by compile
        raise ValueError(f"tau must be finite and > 0, got {tau}{hint}")
    return tau


def check_tau_values(tau: torch.Tensor) -> None:
    """Raise unless every value of a tensor temperature is finite and > 0 (reads the data)."""
    with torch.no_grad():
        bad = ~(torch.isfinite(tau) & (tau > 0))
        if bool(bad.any()):
            raise ValueError(f"tau must be finite and > 0 everywhere, got {tau[bad].flatten()[:4].tolist()}"
                             "; for the tau -> 0 limit use gumbel_max (or hard=True)")


def check_mask(mask: object, logits: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = allowed), got {got}; use mask.bool()")
    if mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}; move it with .to()")
    try:
        shape = torch.broadcast_shapes(mask.shape, logits.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to logits of shape "
                         f"{tuple(logits.shape)}")
    return mask


def check_rows(row_max: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None, dim: int) -> None:
    """Raise when a row's maximum perturbed score shows a NaN, a +inf or no allowed category.

    The row maximum is computed anyway by every sampler, so validation costs one small
    reduction instead of extra passes over the logits; the slow diagnosis runs only on error.
    """
    if row_max.numel() == 0:
        return
    if row_max.is_cuda and torch.cuda.is_current_stream_capturing():
        # no host sync inside a CUDA graph: an on-device assert (raised at the next sync) instead
        torch._assert_async(torch.isfinite(row_max).all(), "gumbelkit: logits with NaN, +inf or no allowed category")
        return
    if bool(torch.isfinite(row_max).all()):
        return
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN; check the model that produced them")
    if bool(torch.isposinf(logits).any()):
        raise ValueError("logits contain +inf; use finite logits (-inf is allowed and means 'impossible')")
    allowed = logits != float("-inf")
    if mask is not None:
        allowed = allowed & mask
    empty = ~allowed.any(dim)
    raise ValueError(
        f"{int(empty.sum())} row(s) have no allowed category (every entry is masked out or -inf), "
        "e.g. at batch index "
        f"{[int(i) for i in empty.nonzero()[0].tolist()]}; every row needs at least one allowed category"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

r"""Checks that read tensor data, as one registered operator: ``torch.ops.gumbelkit.check``.

A check such as "every temperature is finite and > 0" or "this value lies on the simplex" has
to look at the data, and Python code that does (``bool(t.all())``) cannot be traced:
``torch.compile(fullgraph=True)`` and ``torch.export`` refuse it, ``torch.func.vmap`` cannot
batch it and meta or fake tensors have no data to read. Inside an operator the check is one
opaque call that every tracer sees, while its real implementation still raises the same
``ValueError`` with the same message, eagerly, from a compiled graph and from an exported
program (when the bad data arrives at run time).

:func:`check` follows the pattern of ``checked_tau`` in :mod:`.ops`: it returns a 0-d zero
of ``x``'s dtype that the caller adds to a result (``param + check(param.detach(), ...)``), so
the check is used and never dead-code eliminated, and autograd, ``torch.func`` transforms and
forward-mode AD see only a plain addition of a constant. Its pieces:

- the implementation: look the check up by ``kind`` (:func:`register_check`), compute the
  per-element validity, and raise ``ValueError(message(x))`` unless it holds everywhere (the
  message is built only on failure); during CUDA graph capture an on-device assert instead;
- a fake implementation (a 0-d tensor: shape and dtype only), for meta, FakeTensor, compile
  and export;
- a vmap rule that checks every batch element at once: the vmap dimensions go in front and
  ``vmap_dims`` counts them, so the message names the first failing element alone, exactly
  as an unbatched call would;
- an autograd formula with no gradient for ``x`` (callers pass ``x.detach()`` anyway).

Every registered check must be elementwise or reduce over trailing dimensions only, so that
leading (vmap) dimensions survive in the validity tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["check", "register_check"]

Valid = Callable[[Tensor, str, int, "torch.dtype | None"], Tensor]
Message = Callable[[Tensor, str, int, "torch.dtype | None"], str]

_CHECKS: dict[str, tuple[Valid, Message]] = {}


def register_check(kind: str, valid: Valid, message: Message) -> None:
    """Register the check ``kind`` for :func:`check`.

    ``valid(x, context, n, dtype)`` returns a bool tensor, true where ``x`` is valid
    (elementwise, or reduced over trailing dimensions only); ``message(x, context, n, dtype)``
    the ``ValueError`` message for an ``x`` that failed it.
    """
    _CHECKS[kind] = (valid, message)


def _lookup(kind: str) -> tuple[Valid, Message]:
    if kind not in _CHECKS:  # e.g. an exported program loaded before gumbelkit's modules registered theirs
        import gumbelkit.distributions  # noqa: F401  (registers its checks)
    try:
        return _CHECKS[kind]
    except KeyError:
        raise ValueError(f"unknown check kind {kind!r}; known: {sorted(_CHECKS)}") from None


@torch.library.custom_op("gumbelkit::check", mutates_args=())
def check(x: Tensor, kind: str, context: str, n: int, dtype: torch.dtype | None, vmap_dims: int) -> Tensor:
    """A 0-d zero of ``x``'s dtype, after raising ``ValueError`` unless ``x`` passes the check ``kind``.

    Args:
        x: the tensor to check (pass it detached); its first ``vmap_dims`` dimensions are vmap
            batch dimensions (0 from user code; the vmap rule adds them).
        kind: a check registered with :func:`register_check`.
        context, n, dtype: handed to the check (e.g. the argument's name, a count, the dtype
            the value will be used in); ``""``, ``0`` and ``None`` when unused.

    Returns:
        ``torch.zeros((), dtype=x.dtype, device=x.device)``: add it to a result, so the check runs.

    Raises:
        ValueError: the check's own message, for the first failing element under vmap.

    Example:
        >>> from gumbelkit import distributions  # registers the distributions' checks
        >>> t = torch.tensor([0.5, -1.0])
        >>> check(t, "positive_finite", "temperature", 0, None, 0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: temperature of shape (2,) must satisfy PositiveFinite(> 0 and finite); invalid values: [-1.0]
    """
    valid, message = _lookup(kind)
    with torch.no_grad():
        ok = valid(x, context, n, dtype)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # no host sync inside a CUDA graph: an on-device assert (raised at the next sync) instead
            torch._assert_async(ok.all(), f"gumbelkit: {context or 'value'} failed the check {kind!r}")
        elif not bool(ok.all()):
            element = x
            if vmap_dims:
                lead = x.shape[:vmap_dims]
                per_element = ok.reshape(math.prod(lead), -1).all(-1)
                first = int((~per_element).nonzero()[0, 0])
                element = x.reshape(-1, *x.shape[vmap_dims:])[first]
            raise ValueError(message(element, context, n, dtype))
    return x.new_zeros(())


@check.register_fake
def _check_fake(x: Tensor, kind: str, context: str, n: int, dtype: torch.dtype | None, vmap_dims: int) -> Tensor:
    return x.new_empty(())


def _check_vmap(
    info, in_dims, x: Tensor, kind: str, context: str, n: int, dtype: torch.dtype | None, vmap_dims: int
) -> tuple[Tensor, None]:
    if in_dims[0] is None:
        return check(x, kind, context, n, dtype, vmap_dims), None
    return check(x.movedim(in_dims[0], 0), kind, context, n, dtype, vmap_dims + 1), None


check.register_vmap(_check_vmap)
check.register_autograd(lambda ctx, grad: (None, None, None, None, None, None))

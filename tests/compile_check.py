"""A compiled run of a sampler next to its eager run: outputs and gradients, for the tests to compare."""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_and_compiled(
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    upstream: torch.Tensor,
    *,
    fullgraph: bool = False,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eager out, eager grad, compiled out, compiled grad)`` of ``f`` at ``x0``, the gradients
    of ``(out * upstream).sum()``.

    ``torch.compile`` starts afresh (no recompile limit across tests) and inductor uses torch's
    random ops (``fallback_random``). ``seed`` reseeds torch's default generator before each run,
    for functions drawn without ``generator=``.
    """
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        x = x0.clone().requires_grad_(True)
        with torch._inductor.config.patch(fallback_random=True):
            if seed is not None:
                torch.manual_seed(seed)
            out = torch.compile(f, fullgraph=fullgraph)(x) if compiled else f(x)
        (out * upstream).sum().backward()
        runs += [out, x.grad]
    return runs[0], runs[1], runs[2], runs[3]

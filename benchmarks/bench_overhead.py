"""Call overhead and compiled-vs-eager speed of gumbelkit's operators, next to torch.

    python benchmarks/bench_overhead.py

Prints microseconds per call on 4x8 logits (where the call overhead is everything) for
``F.gumbel_softmax`` and gumbelkit's samplers, and milliseconds per call at 512x32768 for the
eager call and the same call under ``torch.compile`` (default and ``fullgraph=True``), on the
default kernels and on the torch path (``GUMBELKIT_BACKEND=torch``). Minimum over repeats.
"""

from __future__ import annotations

import os
import timeit
import warnings

import torch
import torch.nn.functional as F

import gumbelkit as gk


def per_call(fn, number: int, repeat: int = 5) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    small = torch.randn(4, 8)
    print("| call, 4x8 logits | torch | gumbelkit (default kernels) | gumbelkit (torch path) |")
    print("|---|---:|---:|---:|")
    calls = {
        "gumbel_softmax": (lambda: F.gumbel_softmax(small, 0.5), lambda: gk.gumbel_softmax(small, 0.5)),
        "gumbel_softmax hard": (lambda: F.gumbel_softmax(small, 0.5, hard=True),
                                lambda: gk.gumbel_softmax(small, 0.5, hard=True)),
        "gumbel_max vs multinomial": (lambda: torch.multinomial(torch.softmax(small, -1), 1),
                                      lambda: gk.gumbel_max(small)),
        "sample vs multinomial": (lambda: torch.multinomial(torch.softmax(small / 0.8, -1), 1),
                                  lambda: gk.sample(small, temperature=0.8)),
    }
    for name, (base, ours) in calls.items():
        t_base = per_call(base, 2000)
        t_auto = per_call(ours, 2000)
        os.environ["GUMBELKIT_BACKEND"] = "torch"
        t_torch = per_call(ours, 2000)
        os.environ.pop("GUMBELKIT_BACKEND")
        print(f"| {name} | {t_base * 1e6:.0f} us | {t_auto * 1e6:.0f} us | {t_torch * 1e6:.0f} us |")
    x = torch.randn(512, 32768)
    print()
    print("| 512x32768 float32, forward | eager | compiled | compiled fullgraph |")
    print("|---|---:|---:|---:|")
    for backend in ("auto", "torch"):
        os.environ["GUMBELKIT_BACKEND"] = backend
        for name, fn in (("gumbel_softmax", lambda t: gk.gumbel_softmax(t, 0.5)),
                         ("gumbel_max", lambda t: gk.gumbel_max(t))):
            torch._dynamo.reset()
            eager = per_call(lambda fn=fn: fn(x), 3)
            compiled = torch.compile(fn)
            t_c = per_call(lambda compiled=compiled: compiled(x), 3)
            full = torch.compile(fn, fullgraph=True)
            t_f = per_call(lambda full=full: full(x), 3)
            label = f"{name} ({'default kernels' if backend == 'auto' else 'torch path'})"
            print(f"| {label} | {eager * 1e3:.1f} ms | {t_c * 1e3:.1f} ms | {t_f * 1e3:.1f} ms |")
    print()
    base = per_call(lambda: F.gumbel_softmax(x, 0.5), 3)
    print(f"torch F.gumbel_softmax at 512x32768: {base * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

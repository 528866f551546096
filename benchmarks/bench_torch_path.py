"""The torch path (no fused kernels) at 512x32768 float32 against F.gumbel_softmax.

    GUMBELKIT_BACKEND=torch python benchmarks/bench_torch_path.py
    PYTHONPATH=<another checkout>/src python benchmarks/bench_torch_path.py   # an older version, to compare

Prints the minimum over 5 repeats of 3 calls each, with 2 threads, of ``gk.gumbel_softmax`` (forward),
``gk.gumbel_max`` and ``F.gumbel_softmax``. Run the versions alternately on a shared machine.
"""

import timeit

import torch
import torch.nn.functional as F

import gumbelkit as gk


def per_call_ms(fn, number: int = 3) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e3


if __name__ == "__main__":
    torch.set_num_threads(2)
    x = torch.randn(512, 32768)
    print(gk.__file__)
    print(f"gumbel_softmax fwd {per_call_ms(lambda: gk.gumbel_softmax(x, 0.5)):.1f} ms; "
          f"gumbel_max {per_call_ms(lambda: gk.gumbel_max(x)):.1f} ms; "
          f"F.gumbel_softmax {per_call_ms(lambda: F.gumbel_softmax(x, 0.5)):.1f} ms")

"""gumbelkit's gradient estimators vs their reference repositories' formulations in plain torch.

Forward + backward of each estimator on the same logits, alternating runs, medians and the
ratio baseline / gumbelkit (> 1: gumbelkit is faster). The baselines follow the authors' code:
a ``torch.multinomial`` or ``F.gumbel_softmax`` sample, then the estimator written as a
``D - sg(p) + p`` surrogate that autograd differentiates (ReinMax: Liu et al. 2023, Algorithm 2;
GST: Fan et al. 2022's ``gst_mover``; Gumbel-Rao: Paulus et al. 2021's truncated-Gumbel
construction with ``exponential_`` draws).

    python benchmarks/bench_estimators.py [--shape 1024 1024] [--write-docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gumbelkit.estimators as est
from bench_core import machine, quantiles, time_pair

ROOT = Path(__file__).resolve().parent.parent
TAU = 1.0
K_RAO = 10


def _one_hot_sample(logits: torch.Tensor) -> torch.Tensor:
    idx = torch.multinomial(torch.softmax(logits, -1), 1)
    return torch.zeros_like(logits).scatter_(-1, idx, 1.0)


def base_st(logits):
    return _one_hot_sample(logits.detach()) + (p := torch.softmax(logits / TAU, -1)) - p.detach()


def base_st_gs(logits):
    return F.gumbel_softmax(logits, TAU, hard=True)


def base_reinmax(logits):
    d = _one_hot_sample(logits.detach())
    pi0 = torch.softmax(logits, -1)
    pi1 = (d + torch.softmax(logits / TAU, -1)) / 2
    pi1 = torch.softmax((torch.log(pi1) - logits).detach() + logits, -1)
    pi2 = 2 * pi1 - 0.5 * pi0
    return pi2 - pi2.detach() + d


def base_gst(logits, gap=1.0):
    t = logits.detach()
    d = F.gumbel_softmax(t, hard=True)
    max_logit = t.amax(-1, keepdim=True)
    move = (max_logit - t) * d
    move2 = (t - max_logit + gap).clamp(min=0.0) * (1 - d)
    p = torch.softmax((logits + (move - move2)) / TAU, -1)
    return d + p - p.detach()


def base_gumbel_rao(logits):
    t = logits.detach()
    d = _one_hot_sample(t)
    e = torch.empty((K_RAO, *t.shape)).exponential_()
    e_i = (d * e).sum(-1, keepdim=True)
    z = t.exp().sum(-1, keepdim=True)
    adjusted = d * (-torch.log(e_i) + torch.log(z)) + (1 - d) * -torch.log(e / t.exp() + e_i / z)
    p = torch.softmax((logits + (adjusted - t)) / TAU, -1).mean(0)
    return d + p - p.detach()


CASES = {
    "st": (base_st, lambda x, g: est.straight_through(x, TAU, generator=g)),
    "st-gs": (base_st_gs, lambda x, g: est.st_gumbel_softmax(x, TAU, generator=g)),
    "reinmax": (base_reinmax, lambda x, g: est.reinmax(x, TAU, generator=g)),
    "gst": (base_gst, lambda x, g: est.gapped_straight_through(x, TAU, gap=1.0, generator=g)),
    f"gumbel-rao k={K_RAO}": (base_gumbel_rao, lambda x, g: est.gumbel_rao(x, K_RAO, TAU, generator=g)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=[1024, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--write-docs", action="store_true", help="write docs/benchmarks_estimators.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.shape, generator=torch.Generator().manual_seed(0))
    leaf = x.clone().requires_grad_()
    up = torch.randn_like(x)
    g = torch.Generator().manual_seed(1)
    rows = []
    for name, (base, ours) in CASES.items():
        def run(fn, *extra):
            def step():
                fn(leaf, *extra).backward(up)
                leaf.grad = None
            return step

        tb, to = time_pair(run(base), run(ours, g), args.rounds, args.min_time)
        qb, qo = quantiles(tb), quantiles(to)
        rows.append((name, qb[1] * 1e3, qo[1] * 1e3, qb[1] / qo[1]))
        print(f"{name:16s} reference {qb[1] * 1e3:8.2f} ms  gumbelkit {qo[1] * 1e3:8.2f} ms  x{qb[1] / qo[1]:.2f}",
              flush=True)
    if args.write_docs:
        shape = "x".join(map(str, args.shape))
        lines = ["# Benchmarks: gradient estimators (forward + backward)", "",
                 "Produced by:", "", "    python benchmarks/bench_estimators.py "
                 + " ".join(argv if argv is not None else sys.argv[1:]), "",
                 f"Machine: {machine()}. Shape {shape} float32, tau = {TAU}. Median of alternating runs; "
                 "ratio = reference time / gumbelkit time.", "",
                 "| estimator | reference formulation (plain torch) ms | gumbelkit ms | ratio |", "|---|---|---|---|"]
        lines += [f"| {n} | {b:.2f} | {o:.2f} | {r:.2f} |" for n, b, o, r in rows]
        (ROOT / "docs" / "benchmarks_estimators.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

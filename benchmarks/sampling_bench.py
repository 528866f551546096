"""Next-token sampling through the public API, ``gumbelkit.sample``, against the torch recipes.

    python benchmarks/sampling_bench.py [--rounds 5] [--batch 64] [--vocab 128256] [--write-docs]

Issue 13's sampling targets, all measured in one run at (64, 128256) float32 (a Llama-3
vocabulary) with 2 threads, the sides of each case alternating round by round (so load from
other processes hits them alike), the minimum over the rounds of each side reported (the CPU
is shared; the minimum is the least disturbed):

* top_p = 0.9: ``sample(logits, top_p=0.9)`` (generator and seeds) vs the sort recipe
  (softmax, sort descending, cumsum, mask ``cum - p_sorted >= p``, multinomial, gather) on
  LM-like rows ``sigma_r * randn`` with ``sigma_r`` spread over [3, 6] (target >= 8x) and on
  flat rows ``randn`` (target >= 2x) and ``0.1 * randn`` (nucleus 88% of the vocabulary);
* top_k = 50: ``sample(logits, top_k=50)`` vs ``torch.topk(x, 50)`` + ``multinomial(softmax(
  values))`` (target >= 2x);
* no truncation: ``sample(seeds=)`` vs ``sample(generator=)`` (target: within 1.2x), both in
  ns per element (target <= 2), next to the raw fused kernel ``cpu_fused.sample_seeded`` (the
  public call's overhead over it), ``multinomial(softmax(x))`` and a plain copy (the memory floor);
* small inputs (4x8): ``sample(temperature=0.8)`` vs ``multinomial(softmax(x / 0.8))`` in
  microseconds (the call overhead).

Prints a markdown table; ``--write-docs`` also writes it into docs/benchmarks_sampling.md between
``<!-- sampling:start -->`` and ``<!-- sampling:end -->`` (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import gumbelkit as gk
from gumbelkit._kernels import cpu_fused

THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- sampling:start -->", "<!-- sampling:end -->"


def lm_like_logits(batch: int, vocab: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """``sigma_r * randn`` with ``sigma_r`` spread evenly over [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.linspace(low, high, batch).unsqueeze(-1)
    return torch.randn(batch, vocab, generator=gen) * sigma


def nucleus_sizes(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(logits.double(), -1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < p).sum(-1)


def sort_recipe_top_p(logits: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """softmax, sort, cumsum, mask, multinomial: keep the tokens whose preceding mass is < p."""
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    cum = sorted_probs.cumsum(-1)
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs >= p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


def topk_recipe_top_k(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """torch.topk, softmax of the k values, multinomial: the leanest plain-torch top-k."""
    values, order = logits.topk(k, -1)
    choice = torch.multinomial(torch.softmax(values, -1), 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


def measure(sides: dict[str, object], rounds: int, min_time: float) -> dict[str, float]:
    """Seconds per call of each zero-argument callable: the minimum over ``rounds`` rounds, the
    sides alternating within a round; each round runs a side for at least ``min_time`` s."""
    numbers = {}
    for name, fn in sides.items():  # warm up (compiles, caches) and size the inner loop
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        numbers[name] = max(1, int(min_time / once))
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            number = numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / number)
    return best


def run(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(THREADS)
    shape = (args.batch, args.vocab)
    elements = args.batch * args.vocab
    gen = torch.Generator().manual_seed(1)
    seeds = torch.arange(args.batch)
    lm = lm_like_logits(*shape, 3.0, 6.0)
    flat = lm_like_logits(*shape, 1.0, 1.0, seed=1)
    very_flat = lm_like_logits(*shape, 0.1, 0.1, seed=2)
    lines = [
        f"`python benchmarks/sampling_bench.py --rounds {args.rounds} --min-time {args.min_time}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{THREADS} threads, {'numba ' + __import__('numba').__version__ if cpu_fused.available() else 'no numba'}, "
        f"backend `{os.environ.get('GUMBELKIT_BACKEND', 'auto') or 'auto'}`; shape {shape[0]}x{shape[1]} float32; "
        f"minimum over {args.rounds} alternating rounds; load average before the run "
        f"{os.getloadavg()[0]:.1f}.",
        "",
    ]
    for name, rows in (("LM-like", lm), ("randn", flat), ("0.1*randn", very_flat)):
        sizes = nucleus_sizes(rows, 0.9)
        lines.append(
            f"- top-p = 0.9 nucleus sizes, {name}: min {int(sizes.min())}, median {int(sizes.median())}, "
            f"max {int(sizes.max())} of {args.vocab}"
        )
    lines += [
        "",
        "| case | baseline | baseline ms | `sample(generator=)` ms | ratio | `sample(seeds=)` ms | ratio | target |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def row(case, base_name, base, ours_gen, ours_seed, target):
        t = measure({"base": base, "gen": ours_gen, "seed": ours_seed}, args.rounds, args.min_time)
        r_gen, r_seed = t["base"] / t["gen"], t["base"] / t["seed"]
        verdict = "" if target is None else f">= {target:g}x: {'met' if min(r_gen, r_seed) >= target else 'MISSED'}"
        line = (
            f"| {case} | {base_name} | {t['base'] * 1e3:.1f} | {t['gen'] * 1e3:.1f} | {r_gen:.1f}x | "
            f"{t['seed'] * 1e3:.1f} | {r_seed:.1f}x | {verdict} |"
        )
        print(line, flush=True)
        lines.append(line)

    for case, rows, target in (
        ("top_p=0.9, LM-like", lm, 8.0),
        ("top_p=0.9, randn", flat, 2.0),
        ("top_p=0.9, 0.1*randn", very_flat, 2.0),
    ):
        row(
            case,
            "sort recipe",
            lambda rows=rows: sort_recipe_top_p(rows, 0.9, gen),
            lambda rows=rows: gk.sample(rows, top_p=0.9, generator=gen),
            lambda rows=rows: gk.sample(rows, top_p=0.9, seeds=seeds),
            target,
        )
    row(
        "top_k=50, LM-like",
        "topk + multinomial",
        lambda: topk_recipe_top_k(lm, 50, gen),
        lambda: gk.sample(lm, top_k=50, generator=gen),
        lambda: gk.sample(lm, top_k=50, seeds=seeds),
        2.0,
    )

    # no truncation: public call vs the raw kernel, ns per element
    out = torch.empty_like(lm)
    x = lm.numpy()
    sides = {
        "copy (memory floor)": lambda: out.copy_(lm),
        "multinomial(softmax(x))": lambda: torch.multinomial(torch.softmax(lm, -1), 1, generator=gen),
        "sample(generator=)": lambda: gk.sample(lm, generator=gen),
        "sample(seeds=)": lambda: gk.sample(lm, seeds=seeds),
    }
    if cpu_fused.available():
        sides["raw kernel cpu_fused.sample_seeded"] = lambda: cpu_fused.sample_seeded(x, seeds)
    t = measure(sides, args.rounds, args.min_time)
    lines += ["", "| no truncation, LM-like | ms | ns / element | vs raw kernel |", "|---|---:|---:|---:|"]
    raw = t.get("raw kernel cpu_fused.sample_seeded")
    for name, sec in t.items():
        rel = f"{sec / raw:.2f}x" if raw else "-"
        line = f"| {name} | {sec * 1e3:.2f} | {sec / elements * 1e9:.2f} | {rel} |"
        print(line, flush=True)
        lines.append(line)
    lines.append(
        f"\n`sample(seeds=)` / `sample(generator=)`: {t['sample(seeds=)'] / t['sample(generator=)']:.2f} "
        "(target: within 1.2x either way; <= 2 ns/element each)."
    )

    small = torch.randn(4, 8)
    t = measure(
        {
            "multinomial(softmax(x / 0.8))": lambda: torch.multinomial(torch.softmax(small / 0.8, -1), 1),
            "sample(temperature=0.8)": lambda: gk.sample(small, temperature=0.8),
            "sample(temperature=0.8, top_p=0.9, seeds=)": lambda: gk.sample(
                small, temperature=0.8, top_p=0.9, seeds=seeds[:4]
            ),
        },
        args.rounds,
        0.2,
    )
    lines += ["", "| 4x8 logits (call overhead) | us per call |", "|---|---:|"]
    for name, sec in t.items():
        line = f"| {name} | {sec * 1e6:.0f} |"
        print(line, flush=True)
        lines.append(line)
    return lines


def write_docs(lines: list[str]) -> None:
    path = ROOT / "docs" / "benchmarks_sampling.md"
    text = path.read_text()
    block = f"{START}\n" + "\n".join(lines) + f"\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per side per round")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks_sampling.md")
    args = parser.parse_args()
    lines = run(args)
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines)


if __name__ == "__main__":
    main()

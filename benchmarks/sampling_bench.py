"""Next-token sampling: gumbelkit.sampling.sample against the sort-based torch recipe.

    python benchmarks/sampling_bench.py [--rounds 7] [--batch 64] [--vocab 128256]

Times, at (64, 128256) float32 on 2 threads with torch.utils.benchmark, alternating the
sides round by round (so load from other processes hits both alike) and reporting the
minimum over the rounds of each side (the CPU is shared; the minimum is the least disturbed):

* top_p = 0.9: ``sample(logits, top_p=0.9)`` vs the recipe most engines started from:
  softmax, sort, cumsum, mask the tail, multinomial (target: >= 2x faster);
* top_k = 50: ``sample(logits, top_k=50)`` vs the same sort-based recipe keeping the first 50
  sorted tokens (target: >= 3x), and, for context, two leaner torch recipes (top-k mask +
  softmax + multinomial; topk + softmax of the k values + multinomial);
* the seeded (batch-invariant) variants of ``sample``.

Top-p is timed on four kinds of rows (the nucleus sizes are printed): LM-like rows
``sigma_r * N(0, 1)`` with ``sigma_r`` spread over [3, 6] (nuclei of 1 to a few thousand
tokens), ``3 * N(0, 1)``, Zipf-like rows (probabilities proportional to rank^-1.1, ranks
shuffled), and flat rows ``0.1 * N(0, 1)`` whose nucleus is ~88% of the vocabulary, the worst
case of a partial selection (gumbelkit's threshold search does not sort there either).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from gumbelkit.sampling import sample

THREADS = 2


def lm_like_logits(batch: int, vocab: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
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


def sort_recipe_top_k(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """softmax, sort, keep the first k, multinomial."""
    sorted_probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
    choice = torch.multinomial(sorted_probs[:, :k], 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


def mask_recipe_top_k(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Hugging Face's TopKLogitsWarper, then softmax and multinomial."""
    kth = logits.topk(k, -1).values[:, -1:]
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def topk_recipe_top_k(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """torch.topk, softmax of the k values, multinomial: the leanest plain-torch top-k."""
    values, order = logits.topk(k, -1)
    choice = torch.multinomial(torch.softmax(values, -1), 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


def timer(fn, *args) -> benchmark.Timer:
    return benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=THREADS)


def zipf_logits(batch: int, vocab: int, exponent: float = 1.1, seed: int = 2) -> torch.Tensor:
    """log of probabilities proportional to rank^-exponent, the ranks shuffled per row."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(batch, vocab, generator=gen), -1).float() + 1
    return -exponent * ranks.log()


def measure(
    sides: dict[str, benchmark.Timer], rounds: int, min_run_time: float
) -> dict[str, float]:
    """Fastest median seconds per call of each side over ``rounds`` alternating measurements."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, t in sides.items():
            times[name].append(t.blocked_autorange(min_run_time=min_run_time).median)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(THREADS)
    console = Console(width=130)
    shape = (args.batch, args.vocab)
    gen = torch.Generator().manual_seed(1)
    seeds = torch.arange(args.batch)
    lm = lm_like_logits(*shape, 3.0, 6.0)
    lm3 = lm_like_logits(*shape, 3.0, 3.0, seed=3)
    zipf = zipf_logits(*shape)
    flat = lm_like_logits(*shape, 0.1, 0.1, seed=1)
    console.print(
        f"shape {shape} float32, {THREADS} threads, {args.rounds} alternating rounds (min of rounds)"
    )
    for name, rows in (("LM-like sigma 3..6", lm), ("3*randn", lm3), ("Zipf 1.1", zipf), ("flat 0.1*randn", flat)):
        sizes = nucleus_sizes(rows, 0.9)
        console.print(
            f"  top-p=0.9 nucleus sizes, {name}: min {int(sizes.min())}, median "
            f"{int(sizes.median())}, max {int(sizes.max())}"
        )

    cases = [
        ("top_p=0.9 LM-like", "sort recipe", lm, {"top_p": 0.9}, sort_recipe_top_p, 0.9, 8.0),
        ("top_p=0.9 3*randn", "sort recipe", lm3, {"top_p": 0.9}, sort_recipe_top_p, 0.9, 8.0),
        ("top_p=0.9 Zipf", "sort recipe", zipf, {"top_p": 0.9}, sort_recipe_top_p, 0.9, 8.0),
        ("top_p=0.9 flat", "sort recipe", flat, {"top_p": 0.9}, sort_recipe_top_p, 0.9, 2.0),
        ("top_k=50", "sort recipe", lm, {"top_k": 50}, sort_recipe_top_k, 50, 3.0),
        ("top_k=50", "top-k mask recipe", lm, {"top_k": 50}, mask_recipe_top_k, 50, None),
        ("top_k=50", "topk + multinomial", lm, {"top_k": 50}, topk_recipe_top_k, 50, None),
    ]
    table = Table(
        title="sample() vs torch recipes: ms per call, min over rounds (ratio = recipe / gumbelkit)"
    )
    for col in (
        "case",
        "baseline",
        "baseline ms",
        "gumbelkit ms",
        "ratio",
        "seeded ms",
        "seeded ratio",
        "target",
    ):
        table.add_column(col, justify="right" if "ms" in col or "ratio" in col else "left")
    for name, base_name, logits, kwargs, recipe, param, target in cases:
        medians = measure(
            {
                "base": timer(recipe, logits, param, gen),
                "ours": timer(lambda x, kw: sample(x, generator=gen, **kw), logits, kwargs),
                "seeded": timer(lambda x, kw: sample(x, seeds=seeds, **kw), logits, kwargs),
            },
            args.rounds,
            args.min_run_time,
        )
        ratio = medians["base"] / medians["ours"]
        verdict = (
            "-" if target is None else f">= {target:g}x: {'met' if ratio >= target else 'MISSED'}"
        )
        table.add_row(
            name,
            base_name,
            f"{medians['base'] * 1e3:.1f}",
            f"{medians['ours'] * 1e3:.1f}",
            f"{ratio:.2f}x",
            f"{medians['seeded'] * 1e3:.1f}",
            f"{medians['base'] / medians['seeded']:.2f}x",
            verdict,
        )
        console.print(f"  {name:<28} vs {base_name:<20} ratio {ratio:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()

r"""Exact-gradient benchmark of the gradient estimators (``gumbelkit estimators``).

On problems small enough to enumerate every combination of categories (:math:`C^L \le 4096`),
the exact gradient :math:`g^* = \nabla_\theta\,\mathbb E_{z\sim p_\theta}[f(z)]` is a finite sum.
Each method draws ``draws`` independent gradient estimates :math:`g` (vectorized: one batch row
per draw) and is scored by

* relative bias :math:`\lVert\bar g - g^*\rVert / \lVert g^*\rVert` (with its Monte Carlo
  standard error :math:`\text{rel. std}/\sqrt{\text{draws}}`: an unbiased method reads about
  that much),
* relative standard deviation :math:`\sqrt{\mathbb E\lVert g - \bar g\rVert^2} / \lVert g^*\rVert`
  of a single estimate,
* cosine similarity to :math:`g^*`: the mean over draws of :math:`\cos(g, g^*)` (how often a
  single step points the right way) and :math:`\cos(\bar g, g^*)` (the direction of the mean).

Problems: a random decoder loss over :math:`L = 4` latents with :math:`C = 8` categories, and
the quadratic toys :math:`\mathbb E[(z - t)^2]` with :math:`t = 0.45` and :math:`t = 0.499`
(Tucker et al. 2017), where :math:`z` is the first coordinate of a 2-class one-hot, over 6
latents. The library entry points are :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import estimators as est

DEFAULT_TAUS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
MAX_COMBINATIONS = 4096


@dataclass(frozen=True)
class Problem:
    """A loss ``loss(z)`` of one-hot ``z`` of shape ``(..., L, C)``, at logits of shape (L, C)."""

    name: str
    title: str
    logits: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Row:
    problem: str
    method: str
    tau: float | None  # None: the method has no temperature
    bias: float
    bias_se: float
    std: float
    cos_mean: float
    cos_of_mean: float


def decoder_problem(latents: int = 4, categories: int = 8, seed: int = 0) -> Problem:
    """Bernoulli negative log-likelihood of a fixed binary image under a random MLP decoder."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    logits = torch.randn(latents, categories, generator=g, dtype=f64)
    w1 = torch.randn(latents * categories, 32, generator=g, dtype=f64) / math.sqrt(latents)
    b1 = torch.randn(32, generator=g, dtype=f64) * 0.1
    w2 = torch.randn(32, 16, generator=g, dtype=f64) * (2 / math.sqrt(32))
    x = (torch.rand(16, generator=g, dtype=f64) < 0.5).to(f64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z.flatten(-2) @ w1 + b1) @ w2
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return bce(out, x.expand_as(out), reduction="none").sum(-1)

    return Problem("decoder", f"decoder NLL, L={latents} latents x C={categories} categories",
                   logits, loss)


def quadratic_problem(target: float, latents: int = 6, seed: int = 1) -> Problem:
    """:math:`\\frac1L\\sum_l (z_l - t)^2`, :math:`z_l` the first coordinate of a 2-class one-hot."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(latents, 2, generator=g, dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return (z[..., 0] - target).square().mean(-1)

    return Problem(f"quadratic-{target}", f"E[(z - {target})^2], L={latents} binary latents",
                   logits, loss)


def default_problems() -> list[Problem]:
    return [decoder_problem(), quadratic_problem(0.45), quadratic_problem(0.499)]


def exact_gradient(problem: Problem) -> torch.Tensor:
    """:math:`\\nabla_\\theta \\sum_z p_\\theta(z) f(z)` by enumerating all :math:`C^L` one-hot z."""
    latents, categories = problem.logits.shape
    if categories ** latents > MAX_COMBINATIONS:
        raise ValueError(f"{categories}^{latents} combinations is more than {MAX_COMBINATIONS}")
    combos = torch.tensor(list(itertools.product(range(categories), repeat=latents)))
    z = torch.nn.functional.one_hot(combos, categories).to(problem.logits.dtype)
    theta = problem.logits.detach().clone().requires_grad_(True)
    log_p = (z * torch.log_softmax(theta, -1)).sum((-2, -1))
    (grad,) = torch.autograd.grad((log_p.exp() * problem.loss(z)).sum(), theta)
    return grad


def estimate(problem: Problem, method: str, tau: float, draws: int, generator: torch.Generator,
             *, k: int = 10, gap: float = 1.0, n_samples: int = 4) -> torch.Tensor:
    """``draws`` independent gradient estimates, shape ``(draws, L, C)``."""
    theta = problem.logits.expand(draws, *problem.logits.shape).clone().requires_grad_(True)
    entry = est.ESTIMATORS[method]
    if entry.kind == "pathwise":
        kw: dict[str, object] = {"gumbel-rao": {"k": k}, "gst": {"gap": gap}}.get(method, {})
        z = est.sample(theta, method, tau=tau, generator=generator, **kw)
        problem.loss(z).sum().backward()
    else:
        z, log_p = est.sample_with_log_prob(theta, n_samples, generator=generator)
        entry.function(log_p.sum(-1), problem.loss(z)).sum().backward()
    return theta.grad


def score(grads: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Relative bias (and its s.e.), relative std and cosine similarities of the estimates."""
    g, star = grads.flatten(1), exact.flatten()
    norm, mean = star.norm(), g.mean(0)
    std = (g - mean).square().sum(1).mean().sqrt() / norm
    cos = torch.nn.functional.cosine_similarity(g, star.expand_as(g), dim=1)
    return {
        "bias": float((mean - star).norm() / norm),
        "bias_se": float(std / math.sqrt(g.shape[0])),
        "std": float(std),
        "cos_mean": float(cos.mean()),
        "cos_of_mean": float(torch.nn.functional.cosine_similarity(mean, star, dim=0)),
    }


def _seed(*parts: object) -> int:
    """A seed per (problem, method, tau) job, independent of which other jobs run."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def evaluate(problems: Sequence[Problem], methods: Sequence[str], taus: Sequence[float],
             draws: int, seed: int = 0, *, k: int = 10, gap: float = 1.0, n_samples: int = 4,
             progress: Callable[[int], None] | None = None) -> list[Row]:
    """Score every method at every temperature (once for methods without one) on every problem."""
    rows = []
    for problem in problems:
        exact = exact_gradient(problem)
        for method in methods:
            for tau in (taus if est.ESTIMATORS[method].tau else (None,)):
                g = torch.Generator().manual_seed(_seed(seed, problem.name, method, tau))
                grads = estimate(problem, method, 1.0 if tau is None else tau, draws, g,
                                 k=k, gap=gap, n_samples=n_samples)
                rows.append(Row(problem.name, method, tau, **score(grads, exact)))
                if progress is not None:
                    progress(1)
    return rows


def _label(method: str, k: int, gap: float, n_samples: int) -> str:
    extra = {"gumbel-rao": f"k={k}", "gst": f"gap={gap:g}", "decoupled-st-gs": "tau_f=1",
             "reinforce": f"n={n_samples}", "rloo": f"n={n_samples}"}.get(method)
    return f"{method} ({extra})" if extra else method


def markdown(rows: Sequence[Row], problems: Sequence[Problem], command: str, seconds: float,
             labels: dict[str, str], image: str | None) -> str:
    lines = [
        "# Gradient estimators against the exact gradient",
        "",
        f"Generated by `{command}` (or `python benchmarks/estimator_bias.py` with the same "
        f"options) in {seconds:.0f} s, torch {torch.__version__}, float64. The numbers are "
        "deterministic for a given seed.",
        "",
        "Each method draws independent single-sample gradient estimates g of "
        "g* = grad E[f(z)], computed exactly by enumerating every category combination. "
        "Columns: relative bias ||mean(g) - g*|| / ||g*|| with its Monte Carlo standard error "
        "(an unbiased method reads about one s.e.), relative standard deviation of one "
        "estimate, mean cosine similarity cos(g, g*) of single estimates, and cosine of the "
        "mean cos(mean(g), g*). Temperature-free methods (REINFORCE, RLOO) have one row, "
        "with tau shown as -.",
        "",
    ]
    if image:
        lines += [f"![bias and std against tau]({image})", ""]
    lines += summary(rows, problems, labels)
    for problem in problems:
        lines += [f"## {problem.name}: {problem.title}", "",
                  "| method | tau | rel. bias | ± s.e. | rel. std | mean cos(g, g*) | cos(mean g, g*) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.problem == problem.name):
            tau = "-" if r.tau is None else f"{r.tau:g}"
            lines.append(f"| {labels[r.method]} | {tau} | {r.bias:.4f} | {r.bias_se:.4f} | "
                         f"{r.std:.3f} | {r.cos_mean:.3f} | {r.cos_of_mean:.3f} |")
        lines.append("")
    return "\n".join(lines)


def summary(rows: Sequence[Row], problems: Sequence[Problem], labels: dict[str, str],
            tau: float = 1.0) -> list[str]:
    """Markdown lines: relative bias / relative std of every method at ``tau``, all problems."""
    chosen = [r for r in rows if r.tau is None or r.tau == tau]
    if not any(r.tau == tau for r in chosen):
        return []
    lines = [f"## Summary at tau = {tau:g} (relative bias / relative std)", "",
             "| method | " + " | ".join(p.name for p in problems) + " |",
             "|---|" + "---:|" * len(problems)]
    for method in dict.fromkeys(r.method for r in chosen):
        cells = {r.problem: f"{r.bias:.3f} / {r.std:.3f}" for r in chosen if r.method == method}
        lines.append(f"| {labels[method]} | "
                     + " | ".join(cells.get(p.name, "") for p in problems) + " |")
    return [*lines, ""]


def plot(rows: Sequence[Row], problems: Sequence[Problem], labels: dict[str, str],
         path: Path) -> None:
    """Bias (top) and std (bottom) against tau, one line per method, one column per problem."""
    from matplotlib.figure import Figure  # lazy: matplotlib is an optional dependency

    fig = Figure(figsize=(5.2 * len(problems), 8.0), layout="constrained")
    axes = fig.subplots(2, len(problems), squeeze=False, sharex=True)
    methods = list(dict.fromkeys(r.method for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for col, problem in enumerate(problems):
        for row, (field, name) in enumerate((("bias", "relative bias"), ("std", "relative std"))):
            ax = axes[row][col]
            for m in methods:
                mine = [r for r in rows if r.problem == problem.name and r.method == m]
                if not mine:
                    continue
                if mine[0].tau is None:
                    ax.axhline(getattr(mine[0], field), color=colors[m], ls="--", label=labels[m])
                else:
                    ax.plot([r.tau for r in mine], [getattr(r, field) for r in mine], "o-",
                            color=colors[m], label=labels[m], ms=4)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel(name)
            if row == 0:
                ax.set_title(problem.name)
            else:
                ax.set_xlabel("tau")
    # one legend for all panels, below them, where it hides no data
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 5), fontsize=9,
               frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser, default_out: Path = Path("docs")) -> None:
    """The options of ``gumbelkit estimators`` (default ``--out gumbelkit-estimators``, a fresh
    directory) and of ``benchmarks/estimator_bias.py`` (default ``docs``, run from the repository
    to regenerate its pages)."""
    parser.add_argument("--out", type=Path, default=default_out,
                        help="directory for estimators_bias.md and images/estimators_bias.png "
                             f"(default: {default_out})")
    parser.add_argument("--draws", type=int, default=10_000,
                        help="gradient estimates per method and temperature (default: 10000)")
    parser.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS),
                        help="temperatures (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=est.available(), choices=est.available(),
                        metavar="METHOD", help=f"methods (default: all of {est.available()})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--k", type=int, default=10, help="gumbel-rao noise draws (default: 10)")
    parser.add_argument("--gap", type=float, default=1.0, help="gst gap (default: 1.0)")
    parser.add_argument("--n-samples", type=int, default=4,
                        help="samples (loss evaluations) per reinforce/rloo estimate (default: 4)")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")


def check_arguments(args: argparse.Namespace) -> None:
    """Every option checked before any work, and ``--out`` created and probed for writing.

    Raises:
        ValueError: an option out of range or an unwritable ``--out`` (the option is named).
    """
    if args.draws < 2:
        raise ValueError(f"--draws must be >= 2, got {args.draws}")
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {args.n_samples}")
    if args.n_samples < 2 and "rloo" in args.methods:
        raise ValueError(f"--n-samples must be >= 2 for rloo (its baseline for each sample is the "
                         f"mean loss of the others), got {args.n_samples}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if not all(math.isfinite(t) and t > 0 for t in args.taus):
        raise ValueError(f"--taus must be positive finite numbers, got {args.taus}")
    if not (math.isfinite(args.gap) and args.gap > 0):
        raise ValueError(f"--gap must be a positive finite number, got {args.gap}")
    if not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be an int from 0 to 2**63 - 1, got {args.seed}")
    out = Path(args.out)
    try:
        (out if args.no_plot else out / "images").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".gumbelkit-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"--out {out} is not a writable directory ({err.strerror or err}); "
                         "pass an --out you can write to") from err


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write the markdown table (and the plot); return an exit status."""
    check_arguments(args)
    from rich.console import Console  # lazy: rich is an optional dependency
    from rich.progress import Progress

    problems = default_problems()
    jobs = len(problems) * sum(len(args.taus) if est.ESTIMATORS[m].tau else 1 for m in args.methods)
    start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("estimating gradients", total=jobs)
        rows = evaluate(problems, args.methods, args.taus, args.draws, args.seed, k=args.k,
                        gap=args.gap, n_samples=args.n_samples,
                        progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - start
    labels = {m: _label(m, args.k, args.gap, args.n_samples) for m in args.methods}
    out = Path(args.out)
    image = None
    if not args.no_plot:
        plot(rows, problems, labels, out / "images" / "estimators_bias.png")
        image = "images/estimators_bias.png"
    command = (f"gumbelkit estimators --draws {args.draws} --seed {args.seed} --k {args.k} "
               f"--gap {args.gap:g} --n-samples {args.n_samples}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators_bias.md").write_text(markdown(rows, problems, command, seconds, labels, image))
    Console().print(f"wrote {out / 'estimators_bias.md'}"
                    + ("" if args.no_plot else f" and {out / image}") + f" ({seconds:.1f} s)")
    return 0

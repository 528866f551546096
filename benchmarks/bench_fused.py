"""Fused numba CPU kernels (gumbelkit._kernels.cpu_fused) against torch and the memory floor.

    python benchmarks/bench_fused.py [--repeats 5] [--max-size 1e8] [--out docs/benchmarks_fused.md]

Every figure comes from one run: ns per element (wall time / elements, the minimum over
``--repeats`` rounds, the sides alternating within a round so that load from other processes
hits them alike) for each fused kernel, its torch baseline and a plain copy (the memory floor),
on float32 with 2 torch threads and 2 numba threads, at 512x32768 and 64x128256 (a Llama-3
vocabulary) and over sizes 1e3 .. 1e8 for a plot. Compile times (cold, into an empty
``NUMBA_CACHE_DIR``, and from that cache) are measured in fresh processes.

Torch baselines: ``F.gumbel_softmax`` (forward), ``multinomial(softmax(x))``, noise by
``exponential_().log_().neg_()``, the sort recipe of top-p (softmax, sort, cumsum, mask,
multinomial), Gumbel-top-k as noise + ``torch.topk``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

THREADS = 2
NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites the tables above -->"
ROOT = Path(__file__).resolve().parents[1]


def lm_like(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Language-model-like rows: sigma_r * N(0, 1), sigma_r spread over [3, 6]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=gen) * torch.linspace(3.0, 6.0, rows).unsqueeze(-1)


def sort_recipe_top_p(logits: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    cum = sorted_probs.cumsum(-1)
    sorted_probs = sorted_probs.masked_fill(cum - sorted_probs >= p, 0.0)
    return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=gen)).squeeze(-1)


def fused_top_p(cf, x: np.ndarray, p: float, seeds: np.ndarray) -> np.ndarray:
    """Nucleus threshold without a sort, mask, then the seeded fused sampler."""
    th, _ = cf.top_p_threshold(x, p)
    return cf.sample_seeded(x, seeds, min_value=th)


def torch_noise(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).exponential_().log_().neg_()


def cases(cf, x_t: torch.Tensor, kind: str = "all") -> dict[str, tuple[str, object]]:
    """name -> (group, zero-argument callable) for one input."""
    x = x_t.numpy()
    rows = x.shape[0]
    out = np.empty_like(x)
    out_t = torch.empty_like(x_t)
    seeds = np.arange(rows, dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    c: dict[str, tuple[str, object]] = {
        "copy (memory floor)": ("floor", lambda: out_t.copy_(x_t)),
        "fused gumbel_noise": ("noise", lambda: cf.gumbel_noise(out, 1)),
        "torch noise (exponential, log)": ("noise", lambda: torch_noise(x_t)),
        "fused gumbel_max": ("gumbel_max", lambda: cf.gumbel_max(x, 1)),
        "fused sample_seeded": ("gumbel_max", lambda: cf.sample_seeded(x, seeds)),
        "fused sample_seeded T=0.7": ("gumbel_max", lambda: cf.sample_seeded(x, seeds, 0.7)),
        "torch multinomial(softmax(x))": (
            "gumbel_max",
            lambda: torch.multinomial(torch.softmax(x_t, -1), 1, generator=gen),
        ),
        "torch (x + noise).argmax": ("gumbel_max", lambda: (x_t + torch_noise(x_t)).argmax(-1)),
        "fused gumbel_softmax": ("gumbel_softmax", lambda: cf.gumbel_softmax(x, 1, 0.5, out=out)),
        "fused log_gumbel_softmax": ("gumbel_softmax", lambda: cf.log_gumbel_softmax(x, 1, 0.5, out=out)),
        "torch F.gumbel_softmax": ("gumbel_softmax", lambda: F.gumbel_softmax(x_t, tau=0.5)),
    }
    if kind == "all":
        c["fused gumbel_topk k=50"] = ("topk", lambda: cf.gumbel_topk(x, 1, 50))
        c["torch noise + topk k=50"] = ("topk", lambda: (x_t + torch_noise(x_t)).topk(50, -1))
        c["torch topk k=50 + multinomial"] = (
            "topk",
            lambda: torch.multinomial(torch.softmax(x_t.topk(50, -1).values, -1), 1, generator=gen),
        )
    return c


def top_p_cases(cf, x_t: torch.Tensor, label: str) -> dict[str, tuple[str, object]]:
    x = x_t.numpy()
    seeds = np.arange(x.shape[0], dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    return {
        f"fused top_p_threshold ({label})": (f"top_p {label}", lambda: cf.top_p_threshold(x, 0.9)),
        f"fused top-p sample ({label})": (f"top_p {label}", lambda: fused_top_p(cf, x, 0.9, seeds)),
        f"torch sort recipe top-p ({label})": (f"top_p {label}", lambda: sort_recipe_top_p(x_t, 0.9, gen)),
    }


CPU: dict[str, float] = {}  # name -> minimum process CPU seconds per call (all threads), last measure()


def measure(sides: dict[str, tuple[str, object]], repeats: int, budget: float = 0.3) -> dict[str, float]:
    """Minimum wall seconds per call of each side over ``repeats`` alternating rounds.

    Also records in ``CPU`` the minimum process CPU time per call (summed over threads): it
    does not count time spent waiting for a core that other processes hold.
    """
    best = {name: float("inf") for name in sides}
    CPU.clear()
    CPU.update({name: float("inf") for name in sides})
    for _, fn in sides.values():  # warm-up (compiles numba kernels, allocates)
        fn()
    for _ in range(repeats):
        for name, (_, fn) in sides.items():
            start = time.perf_counter()
            calls = 0
            while calls == 0 or (time.perf_counter() - start < budget / repeats and calls < 50):
                t1, c1 = time.perf_counter(), time.process_time()
                fn()
                best[name] = min(best[name], time.perf_counter() - t1)
                CPU[name] = min(CPU[name], time.process_time() - c1)
                calls += 1
    return best


COMPILE_SNIPPET = textwrap.dedent(
    """
    import time, json, numpy as np
    t0 = time.perf_counter()
    from gumbelkit._kernels import cpu_fused as cf
    cf.available()
    t_import = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    times = {"import": t_import}
    for name, fn in [
        ("gumbel_noise", lambda: cf.gumbel_noise(np.empty_like(x), 1)),
        ("gumbel_max", lambda: cf.gumbel_max(x, 1)),
        ("sample_seeded", lambda: cf.sample_seeded(x, np.arange(4))),
        ("sample_seeded T", lambda: cf.sample_seeded(x, np.arange(4), 0.5)),
        ("gumbel_softmax", lambda: cf.gumbel_softmax(x, 1, 0.5)),
        ("top_p_threshold", lambda: cf.top_p_threshold(x, 0.9)),
    ]:
        t = time.perf_counter(); fn(); times[name] = time.perf_counter() - t
    print(json.dumps(times))
    """
)


def compile_times() -> tuple[dict[str, float], dict[str, float]]:
    """(cold, cached) seconds per kernel's first call, in fresh processes sharing a new cache."""
    import json

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT / "src"))
        runs = []
        for _ in range(2):
            cmd = [sys.executable, "-c", COMPILE_SNIPPET]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return runs[0], runs[1]


def sizes_sweep(cf, max_size: float, repeats: int) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    size = 1000
    while size <= max_size:
        n = min(size, 32768)
        rows = max(1, size // n)
        x_t = torch.randn(rows, n)
        sides = cases(cf, x_t, kind="sweep")
        res = measure(sides, max(1, repeats if size < 1e7 else 2), budget=0.2 if size < 1e7 else 0.0)
        for name, t in res.items():
            curves.setdefault(name, []).append((rows * n, t / (rows * n) * 1e9))
        figures = ", ".join(f"{k.split(' ', 1)[1]} {v * 1e9 / (rows * n):.2f}" for k, v in res.items())
        print(f"  size {rows * n:.0e}: {figures}", flush=True)
        del x_t, sides
        size *= 10
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-size", type=float, default=1e8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_fused.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "benchmarks_fused.png")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    parser.add_argument("--shapes", default="512x32768,64x128256", help="comma-separated ROWSxN shapes")
    args = parser.parse_args()

    from gumbelkit._kernels import cpu_fused as cf

    if not cf.available():
        sys.exit(cf.HINT)
    import numba

    torch.set_num_threads(THREADS)
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    load = os.getloadavg()[0]
    lines = [
        "# Fused CPU kernels (numba): benchmark",
        "",
        f"`python benchmarks/bench_fused.py` on {os.cpu_count()} CPUs, torch {torch.__version__}, numba "
        f"{numba.__version__}, {THREADS} torch threads and {numba.get_num_threads()} numba threads, float32. "
        f"ns per element = wall time / elements, the minimum over {args.repeats} alternating rounds. "
        f"Load average at the start: {load:.1f} (other processes share the CPU: absolute figures are "
        "inflated by them; the copy row in the same run is the memory floor to compare against).",
        "",
    ]
    if not args.no_compile:
        cold, cached = compile_times()
        lines += ["## Compile time (first call, fresh process)", ""]
        lines += ["| kernel | cold (s) | from cache (s) |", "|---|---:|---:|"]
        lines += [f"| {k} | {cold[k]:.2f} | {cached[k]:.2f} |" for k in cold]
        lines += [""]
        print("\n".join(lines[-len(cold) - 4:]), flush=True)

    tables = []
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        x_t = torch.randn(*shape)
        sides = cases(cf, x_t)
        sides.update(top_p_cases(cf, x_t, "flat rows"))
        sides.update(top_p_cases(cf, lm_like(*shape), "LM-like rows"))
        res = measure(sides, args.repeats)
        n = shape[0] * shape[1]
        copy = res["copy (memory floor)"]
        rows_md = [f"## {shape[0]} x {shape[1]}", ""]
        rows_md += [
            "| group | kernel | ms | ns/element | x copy | CPU ns/element (all threads) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, t in res.items():
            rows_md.append(
                f"| {sides[name][0]} | {name} | {t * 1e3:.2f} | {t / n * 1e9:.2f} | {t / copy:.1f} "
                f"| {CPU[name] / n * 1e9:.2f} |"
            )
        speed = {
            "gumbel_max vs multinomial(softmax)": res["torch multinomial(softmax(x))"] / res["fused gumbel_max"],
            "sample_seeded vs multinomial(softmax)": res["torch multinomial(softmax(x))"] / res["fused sample_seeded"],
            "gumbel_softmax fwd vs F.gumbel_softmax": res["torch F.gumbel_softmax"] / res["fused gumbel_softmax"],
            "top-p sample vs sort recipe, flat": res["torch sort recipe top-p (flat rows)"]
            / res["fused top-p sample (flat rows)"],
            "top-p sample vs sort recipe, LM-like": res["torch sort recipe top-p (LM-like rows)"]
            / res["fused top-p sample (LM-like rows)"],
            "gumbel_topk vs noise + topk": res["torch noise + topk k=50"] / res["fused gumbel_topk k=50"],
        }
        rows_md += ["", "Speed-ups in this run: " + "; ".join(f"{k} **{v:.1f}x**" for k, v in speed.items()), ""]
        tables += rows_md
        print("\n".join(rows_md), flush=True)
        del x_t, sides
    lines += tables

    print("size sweep", flush=True)
    curves = sizes_sweep(cf, args.max_size, args.repeats)
    plot_link = os.path.relpath(args.plot, args.out.parent)
    lines += ["## ns/element against size", "", f"![ns per element against size]({plot_link})", ""]
    header = "| kernel | " + " | ".join(f"{n:.0e}" for n, _ in next(iter(curves.values()))) + " |"
    lines += [header, "|---|" + "---:|" * len(next(iter(curves.values())))]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for _, v in pts) + " |" for name, pts in curves.items()]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, pts in curves.items():
            style = "-" if name.startswith("fused") else ("--" if name.startswith("torch") else ":")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements (rows x min(n, 32768))")
        ax.set_ylabel("ns per element (min over rounds)")
        ax.set_title("fused numba kernels vs torch, float32, 2 threads")
        ax.legend(fontsize=7)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    except ImportError:
        lines += ["", "(matplotlib missing: no plot)"]
    notes = ""  # hand-written analysis below the marker survives a rerun
    if args.out.exists() and NOTES_MARKER in args.out.read_text():
        notes = args.out.read_text().split(NOTES_MARKER, 1)[1]
    args.out.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + notes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

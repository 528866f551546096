"""gumbelkit vs torch on the core operations, side by side in one process.

Times each gumbelkit function against its torch baseline with alternating runs (A, B, A, B, ...)
so that drift on a shared machine hits both sides alike, and reports medians, 20/80 %
quantiles and the ratio baseline / gumbelkit (> 1 means gumbelkit is faster). Peak memory of
each forward is measured in a fresh subprocess per side: the growth of peak resident memory
(ru_maxrss, reset through /proc/self/clear_refs where Linux allows) over the resident size
just before the call, with the inputs already allocated.

    python benchmarks/bench_core.py                      # full run, prints a table
    python benchmarks/bench_core.py --write-docs         # ... and writes docs/benchmarks.md + chart
    python benchmarks/bench_core.py --quick              # small shapes, a smoke test
    python benchmarks/bench_core.py --device cuda        # GPU: fused Triton kernels vs torch, and vs a copy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

import gumbelkit as gk

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 1024), (512, 32768), (64, 131072)]
GPU_SHAPES = [(4096, 32768)]
QUICK_SHAPES = [(64, 256)]
TAU = 0.5

# Targets from the performance issue: minimum speed-up (baseline time / gumbelkit time).
TARGETS = {
    "gumbel_softmax fwd": 4.0,
    "gumbel_softmax fwd+bwd soft": 3.5,
    "gumbel_softmax fwd+bwd hard": 3.5,
    "gumbel_max": 3.5,
    "gumbel_topk k=8": 3.0,
}
MEMORY_TARGET = 0.6  # gumbelkit peak growth / torch peak growth, forward pass
GPU_TARGETS = {"gumbel_softmax fwd+bwd soft": 2.0, "gumbel_softmax fwd+bwd hard": 2.0,
               "gumbel_softmax fwd vs copy": 1 / 1.5}


def target_for(row: dict) -> float | None:
    if row["dtype"] != "float32":
        return None
    return (GPU_TARGETS if row.get("device") == "cuda" else TARGETS).get(row["op"])


@dataclass
class Case:
    op: str
    baseline_name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    make: Callable[[torch.Tensor, torch.Generator], tuple[Callable[[], object], Callable[[], object]]]


def _fwd(x, g):
    return (lambda: F.gumbel_softmax(x, TAU)), (lambda: gk.gumbel_softmax(x, TAU, generator=g))


def _fwd_bwd(hard: bool):
    def make(x, g):
        leaf = x.detach().clone().requires_grad_()
        up = torch.randn_like(x)

        def base():
            F.gumbel_softmax(leaf, TAU, hard=hard).backward(up)
            leaf.grad = None

        def ours():
            gk.gumbel_softmax(leaf, TAU, hard=hard, generator=g).backward(up)
            leaf.grad = None

        return base, ours

    return make


def _max(x, g):
    return (lambda: torch.multinomial(torch.softmax(x, -1), 1)), (lambda: gk.gumbel_max(x, generator=g))


def _topk(x, g):
    return (lambda: torch.multinomial(torch.softmax(x, -1), 8, replacement=False)), (
        lambda: gk.gumbel_topk(x, 8, generator=g))


def _log(x, g):
    tau = torch.tensor(TAU, dtype=x.dtype)
    return (lambda: ExpRelaxedCategorical(tau, logits=x).rsample()), (
        lambda: gk.log_gumbel_softmax(x, TAU, generator=g))


OPS: dict[str, tuple[str, Callable]] = {
    "gumbel_softmax fwd": ("F.gumbel_softmax", _fwd),
    "gumbel_softmax fwd+bwd soft": ("F.gumbel_softmax", _fwd_bwd(False)),
    "gumbel_softmax fwd+bwd hard": ("F.gumbel_softmax", _fwd_bwd(True)),
    "gumbel_max": ("multinomial(softmax, 1)", _max),
    "gumbel_topk k=8": ("multinomial(softmax, 8, no repl.)", _topk),
    "log_gumbel_softmax": ("ExpRelaxedCategorical.rsample", _log),
}
# GPU target: the fused forward within 1.5x of a device-to-device copy of the same tensor.
COPY_OP = "gumbel_softmax fwd vs copy"
OPS_GPU = {COPY_OP: ("x.clone() (copy)", lambda x, g: ((lambda: x.clone()), (lambda: gk.gumbel_softmax(
    x, TAU, generator=g))))}
MEMORY_OPS = {"gumbel_softmax fwd", "gumbel_max", "gumbel_topk k=8", "log_gumbel_softmax"}


def cases(shapes: list[tuple[int, int]], with_bf16: bool = True) -> list[Case]:
    out = [Case(op, base, s, torch.float32, make) for s in shapes for op, (base, make) in OPS.items()]
    if with_bf16:
        s = shapes[0]
        out += [Case(op, OPS[op][0], s, torch.bfloat16, OPS[op][1])
                for op in ("gumbel_softmax fwd", "gumbel_softmax fwd+bwd soft")]
    return out


def _synced(fn: Callable, device: torch.device) -> Callable:
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def time_pair(base: Callable, ours: Callable, rounds: int, min_time: float) -> tuple[list[float], list[float]]:
    """Alternate the two sides ``rounds`` times (after a warm-up) and return all timings."""
    base(), ours()
    tb, to = [], []
    start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - start < min_time:
        for fn, acc in ((base, tb), (ours, to)) if r % 2 == 0 else ((ours, to), (base, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
        r += 1
    return tb, to


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
    return q[1], statistics.median(ts), q[7]


# ----------------------------------------------------------------------------- memory

def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _peak_kb(reset: bool) -> int:
    """Peak resident memory: VmHWM (which clear_refs resets) when available, else ru_maxrss."""
    if reset:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory_child(op: str, side: str, shape: tuple[int, int], dtype: str) -> None:
    torch.set_num_threads(2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(1)
    base, ours = OPS[op][1](x, g)
    fn = base if side == "torch" else ours
    # one warm-up call on a small input: JIT compilation (numba kernels loaded from their cache)
    # and allocator pools are a one-off cost of the process, not memory of the call
    OPS[op][1](x[:2].contiguous(), g)[1 if side != "torch" else 0]()
    try:  # reset the peak (VmHWM) so ru_maxrss measures this call only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _rss_kb()
    out = fn()
    peak = _peak_kb(reset)
    del out
    print(json.dumps({"growth_kb": max(0, peak - before), "reset": reset}))


def measure_memory(op: str, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS on free
    res = {}
    for side in ("torch", "gumbelkit"):
        cmd = [sys.executable, __file__, "--memory-child", op, side, "x".join(map(str, shape)),
               str(dtype).removeprefix("torch.")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])["growth_kb"] / 1024
    return res


# ----------------------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if device.type == "cuda":
        todo = [Case(op, base, s, torch.float32, make) for s in GPU_SHAPES
                for op, (base, make) in {**OPS, **OPS_GPU}.items()]
        args.memory = False
    else:
        todo = cases(QUICK_SHAPES if args.quick else SHAPES, with_bf16=not args.quick)
    if args.ops:
        todo = [c for c in todo if any(o in c.op for o in args.ops)]
    for i, c in enumerate(todo):
        x = torch.randn(c.shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=c.dtype)
        base, ours = c.make(x, torch.Generator(device=device).manual_seed(1))
        tb, to = time_pair(_synced(base, device), _synced(ours, device), args.rounds, args.min_time)
        qb, qo = quantiles(tb), quantiles(to)
        row = {"op": c.op, "baseline": c.baseline_name, "shape": list(c.shape),
               "dtype": str(c.dtype).removeprefix("torch."), "torch_ms": qb[1] * 1e3, "gk_ms": qo[1] * 1e3,
               "torch_q20_q80": [qb[0] * 1e3, qb[2] * 1e3], "gk_q20_q80": [qo[0] * 1e3, qo[2] * 1e3],
               "ratio": qb[1] / qo[1], "runs": len(tb)}
        if args.memory and c.op in MEMORY_OPS and c.dtype == torch.float32:
            mem = measure_memory(c.op, c.shape, c.dtype)
            row["torch_mb"], row["gk_mb"] = mem["torch"], mem["gumbelkit"]
            row["mem_ratio"] = mem["gumbelkit"] / mem["torch"] if mem["torch"] > 0 else float("nan")
        row["device"] = device.type
        rows.append(row)
        print(f"[{i + 1}/{len(todo)}] {c.op:28s} {c.shape!s:14s} {row['dtype']:8s} "
              f"torch {row['torch_ms']:8.2f} ms  gumbelkit {row['gk_ms']:8.2f} ms  x{row['ratio']:.2f}"
              + (f"  mem {row['gk_mb']:.1f}/{row['torch_mb']:.1f} MB" if "gk_mb" in row else ""),
              flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    t = Table(title="gumbelkit vs torch (median ms; ratio = torch / gumbelkit)")
    for col in ("operation", "shape", "dtype", "torch", "gumbelkit", "ratio", "target", "peak MB gk/torch"):
        t.add_column(col)
    for r in rows:
        target = target_for(r)
        ok = "" if target is None else ("met" if r["ratio"] >= target else "MISSED")
        mem = f"{r['gk_mb']:.1f}/{r['torch_mb']:.1f}" if "gk_mb" in r else ""
        t.add_row(r["op"], "x".join(map(str, r["shape"])), r["dtype"], f"{r['torch_ms']:.2f}",
                  f"{r['gk_ms']:.2f}", f"{r['ratio']:.2f}", f">= {target} {ok}" if target else "", mem)
    Console().print(t)


def write_docs(rows: list[dict], command: str, md: Path, png: Path) -> None:
    lines = [
        "# Benchmarks: gumbelkit vs torch",
        "",
        "Produced by:",
        "",
        f"    {command}",
        "",
        f"Machine: {machine()}.",
        "",
        "Median wall time over alternating runs (gumbelkit and the torch baseline take turns in the "
        "same process); q20-q80 in brackets. Ratio = torch time / gumbelkit time (> 1: gumbelkit is "
        "faster). Peak memory: growth of peak resident memory of the forward call over the resident "
        "size just before it, inputs already allocated, each side in a fresh subprocess.",
        "",
        "| operation | baseline | shape | dtype | torch ms | gumbelkit ms | ratio | target | "
        "peak MB torch | peak MB gumbelkit | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = target_for(r)
        tgt = "" if target is None else f">= {target}: {'met' if r['ratio'] >= target else '**missed**'}"
        mem = (f"{r['torch_mb']:.1f} | {r['gk_mb']:.1f} | {r['mem_ratio']:.2f} "
               f"({'met' if r['mem_ratio'] <= MEMORY_TARGET else '**missed**'})") if "gk_mb" in r else " | | "
        lines.append(
            f"| {r['op']} | {r['baseline']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | "
            f"{r['torch_ms']:.2f} [{r['torch_q20_q80'][0]:.2f}-{r['torch_q20_q80'][1]:.2f}] | "
            f"{r['gk_ms']:.2f} [{r['gk_q20_q80'][0]:.2f}-{r['gk_q20_q80'][1]:.2f}] | "
            f"{r['ratio']:.2f} | {tgt} | {mem} |")
    lines += ["", f"![speed-ups]({os.path.relpath(png, md.parent)})", ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    old = md.read_text() if md.exists() else ""
    marker = "<!-- analysis -->"
    analysis = old[old.index(marker):] if marker in old else marker + "\n"
    md.write_text("\n".join(lines) + "\n" + analysis)
    plot(rows, png)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{'x'.join(map(str, r['shape']))} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.5))
    colors = ["tab:green" if r["ratio"] >= (target_for(r) or 1.0) else "tab:orange" for r in rows]
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the torch baseline (torch time / gumbelkit time)")
    ax.set_title("gumbelkit vs torch, CPU")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the Triton kernels")
    p.add_argument("--rounds", type=int, default=15, help="minimum alternating rounds per case")
    p.add_argument("--min-time", type=float, default=1.0, help="minimum seconds per case")
    p.add_argument("--quick", action="store_true", help="tiny shapes, no bf16 (smoke test)")
    p.add_argument("--ops", nargs="*", help="only operations whose name contains one of these")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--md", type=Path, help="default: docs/benchmarks.md (cpu) or docs/benchmarks_gpu.md")
    p.add_argument("--png", type=Path, help="default: docs/images/benchmarks[_gpu].png")
    p.add_argument("--json", type=Path, help="also dump the rows as JSON")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        op, side, shape, dtype = args.memory_child
        measure_memory_child(op, side, tuple(int(s) for s in shape.split("x")), dtype)
        return 0
    rows = run(args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write_docs:
        suffix = "_gpu" if args.device.startswith("cuda") else ""
        args.md = args.md or ROOT / "docs" / f"benchmarks{suffix}.md"
        args.png = args.png or ROOT / "docs" / "images" / f"benchmarks{suffix}.png"
        command = "python benchmarks/bench_core.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(rows, command.strip(), args.md, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark scripts run (a smoke test: tiny shapes, no timing assertions)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_core_quick(tmp_path):
    bench = load("bench_core")
    out = tmp_path / "rows.json"
    md, png = tmp_path / "b.md", tmp_path / "b.png"
    assert bench.main(["--quick", "--rounds", "2", "--min-time", "0", "--threads", "1", "--json", str(out),
                       "--write-docs", "--md", str(md), "--png", str(png), "--ops", "fwd", "gumbel_max"]) == 0
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} >= {"gumbel_softmax fwd", "gumbel_max"}
    for r in rows:
        assert r["torch_ms"] > 0 and r["gk_ms"] > 0 and r["ratio"] > 0
        if r["op"] == "gumbel_softmax fwd":
            assert r["torch_mb"] >= 0 and r["gk_mb"] >= 0
    assert "| gumbel_max |" in md.read_text() and png.stat().st_size > 0

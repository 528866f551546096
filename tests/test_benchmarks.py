"""The benchmark scripts run as users run them (a smoke test: tiny shapes, no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_core_quick(tmp_path):
    out, md, png = tmp_path / "rows.json", tmp_path / "b.md", tmp_path / "b.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick", "--rounds", "2", "--min-time", "0",
           "--threads", "1", "--json", str(out), "--write-docs", "--md", str(md), "--png", str(png),
           "--ops", "fwd", "gumbel_max"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} >= {"gumbel_softmax fwd", "gumbel_max"}
    for r in rows:
        assert r["torch_ms"] > 0 and r["gk_ms"] > 0 and r["ratio"] > 0
        if r["op"] == "gumbel_softmax fwd":
            assert r["torch_mb"] >= 0 and r["gk_mb"] >= 0
    assert "| gumbel_max |" in md.read_text() and png.stat().st_size > 0


def test_bench_estimators_quick():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_estimators.py"), "--shape", "8", "16", "--rounds", "1",
           "--min-time", "0", "--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    for name in ("st-gs", "reinmax", "gst", "gumbel-rao"):
        assert name in out

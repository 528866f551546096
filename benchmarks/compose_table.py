"""Run the composability matrix (tests/compose_matrix.py) and write it as a table to docs/compose.md.

Usage: python benchmarks/compose_table.py [--write-docs] [--rows SUBSTRING]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import compose_matrix as cm  # noqa: E402

MARK = {"pass": "✓", "n/a": "·"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/compose.md")
    parser.add_argument("--rows", default="", help="only rows whose name contains this")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 256
    rows = [r for r in cm.ROWS if args.rows in r]
    results = {}
    for r in rows:
        for c in cm.COLUMNS:
            results[r, c] = cm.run_cell(r, c)
            if results[r, c].startswith("FAIL"):
                print(f"{r} | {c}: {results[r, c]}", flush=True)
    cols = list(cm.COLUMNS)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(MARK.get(results[r, c], "✗") for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        page = ROOT / "docs" / "compose.md"
        text = page.read_text()
        start, end = "<!-- matrix:start -->", "<!-- matrix:end -->"
        head, rest = text.split(start)
        _, tail = rest.split(end)
        page.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    main()

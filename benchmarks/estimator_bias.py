"""Bias, variance and cosine of every gradient estimator against the exact gradient.

Writes docs/estimators_bias.md and docs/images/estimators_bias.png; the same run as the
``gumbelkit estimators`` command (see gumbelkit._estimator_report for the problems and metrics).

    python benchmarks/estimator_bias.py                 # defaults: 10000 draws, 6 temperatures
    python benchmarks/estimator_bias.py --draws 2000 --methods st-gs reinmax --out /tmp/x
"""

from __future__ import annotations

import argparse
import sys

from gumbelkit import _estimator_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _estimator_report.add_arguments(parser)
    return _estimator_report.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

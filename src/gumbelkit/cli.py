"""The ``gumbelkit`` command: ``gumbelkit demo`` and ``gumbelkit classify``.

Only argument parsing lives here; the work is in :mod:`gumbelkit.demo`. Each subcommand is one
entry of ``COMMANDS``: (help, a function adding its options, a function running it). Options
that mirror a config dataclass are generated from its fields, so adding a setting is one field
plus one help string.

Run ``gumbelkit demo --help`` (or ``python -m gumbelkit.cli demo --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__

__all__ = ["build_parser", "main"]

DEMO_HELP = {
    "estimator": "gradient estimator for the discrete codes",
    "samples": "codes drawn per image for the score-function estimators (reinforce, rloo)",
    "latents": "N, the number of categorical latent variables",
    "classes": "K, the number of classes of each latent variable",
    "hidden": "hidden layer sizes of the encoder (the decoder mirrors them)",
    "steps": "total training steps (with --resume: train on up to this step)",
    "batch_size": "minibatch size",
    "lr": "Adam learning rate",
    "seed": "seed of the initialization, the batches and every Gumbel draw",
    "out": "output directory (metrics.json, PNGs, checkpoint.pt)",
    "device": "torch device, e.g. cpu or cuda",
    "data": "data set: scikit-learn's bundled 8x8 digits, or MNIST IDX files from --data-dir",
    "data_dir": "folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
    "schedule": "temperature schedule from --tau0 down to --tau-min",
    "tau0": "initial temperature",
    "tau_min": "final / minimum temperature",
    "anneal_rate": "exponential schedule: tau = max(tau_min, tau0 * exp(-rate * t))",
    "anneal_every": "exponential schedule: update tau every this many steps",
    "importance_samples": "m, the number of importance samples of the test log-likelihood bound",
    "checkpoint_every": "also save checkpoint.pt every this many steps",
    "threads": "torch CPU threads (1 suits these small models and busy machines)",
    "quiet": "no progress bar and no summary table",
    "dist_timeout": "seconds a rank waits for the others under torchrun before failing",
}

CLASSIFY_HELP = {
    "tau": "temperature of the Gumbel-Softmax layer",
    "steps": "training steps for each of the two classifiers",
    "batch_size": "minibatch size",
    "lr": "Adam learning rate",
    "hidden": "hidden layer size of the MLP",
    "seed": "seed of the initialization, the batches and every Gumbel draw",
    "eval_samples": "hard samples per test image for the sampled accuracy",
    "threads": "torch CPU threads",
    "quiet": "print nothing",
}


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type, helps: dict[str, str],
                        choices: dict[str, Sequence[str]]) -> None:
    """One ``--option`` per dataclass field. Options the user does not give are left out of
    the namespace (the dataclass supplies the default), so ``--resume`` can tell them apart."""
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"help": f"{helps[f.name]} (default: {default})",
                                  "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=int, metavar="H")
        elif f.name in choices:
            kwargs["choices"] = list(choices[f.name])
        else:
            kwargs["type"] = str if default is None else type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _given(args: argparse.Namespace, config_cls: type) -> dict[str, Any]:
    """The settings given on the command line, as ``config_cls`` keywords."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def _demo_options(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .demo import SCHEDULES, DemoConfig, available_estimators

    _add_config_options(parser, DemoConfig, DEMO_HELP,
                        {"estimator": available_estimators(), "data": DATASETS,
                         "schedule": SCHEDULES})
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (settings not given are taken from it)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    given = _given(args, DemoConfig)
    run_demo(DemoConfig(**given), resume=args.resume, explicit=set(given))
    return 0


def _classify_options(parser: argparse.ArgumentParser) -> None:
    from .demo import ClassifyConfig

    _add_config_options(parser, ClassifyConfig, CLASSIFY_HELP, {})


def _run_classify(args: argparse.Namespace) -> int:
    from .demo import ClassifyConfig, run_classify

    run_classify(ClassifyConfig(**_given(args, ClassifyConfig)))
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

def _estimators_options(p: argparse.ArgumentParser) -> None:
    from . import _estimator_report

    _estimator_report.add_arguments(p)


def _run_estimators(args: argparse.Namespace) -> int:
    from . import _estimator_report

    return _estimator_report.run(args)


COMMANDS: dict[str, Command] = {
    "demo": ("train a categorical VAE with Gumbel-Softmax latents on digits (or MNIST), with "
             "live progress, plots, metrics and a resumable checkpoint", _demo_options, _run_demo),
    "classify": ("train a digits classifier through a Gumbel-Softmax layer and compare it with "
                 "a plain softmax classifier", _classify_options, _run_classify),
    "estimators": ("measure each gradient estimator's bias, standard deviation and cosine against the "
                   "exact gradient on enumerable problems; writes a markdown table and a plot",
                   _estimators_options, _run_estimators),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gumbelkit`` parser, one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="gumbelkit", description="Gumbel-Max and Gumbel-Softmax tools for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gumbelkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_options, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_options(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gumbelkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:  # bad settings or files: a message, not a traceback
        print(f"gumbelkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gumbelkit {args.command}: interrupted (a demo continues from its last checkpoint "
              "with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

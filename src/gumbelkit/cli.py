"""The ``gumbelkit`` command: ``gumbelkit demo``, ``gumbelkit classify`` and ``gumbelkit estimators``.

Only argument parsing and error reporting live here; the work is in :mod:`gumbelkit.demo` and
:mod:`gumbelkit._estimator_report`. Each subcommand is one entry of ``COMMANDS``: (help, a
function adding its options, a function running it, a function naming the optional packages it
needs). Options that mirror a config dataclass are generated from its fields, so adding a
setting is one field plus one help string.

Every problem a user can fix (a bad setting, a missing package, an unwritable directory, a
damaged checkpoint, a process group that does not form) is reported by :func:`main` as one
line, ``gumbelkit COMMAND: error: ...``, with exit status 2, before any training starts where
it can be checked beforehand. Ctrl-C during ``demo`` training saves a checkpoint and exits
with status 130 after saying how to resume.

Run ``gumbelkit demo --help`` (or ``python -m gumbelkit.cli demo --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import __version__

__all__ = ["COMMANDS", "Command", "MissingExtrasError", "build_parser", "main"]

INSTALL_HINT = "pip install 'gumbelkit[demo]'"
# import name -> distribution name, for the message
_DISTRIBUTIONS = {"rich": "rich", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}

DEMO_HELP = {
    "estimator": "gradient estimator for the discrete codes",
    "samples": "codes drawn per image for the score-function estimators (reinforce; rloo needs >= 2)",
    "latents": "N, the number of categorical latent variables",
    "classes": "K, the number of classes of each latent variable",
    "hidden": "hidden layer sizes of the encoder (the decoder mirrors them)",
    "steps": "total training steps (with --resume: train up to this step; default there: the "
             "checkpoint's target)",
    "batch_size": "minibatch size",
    "lr": "Adam learning rate",
    "seed": "seed of the initialization, the batches and every Gumbel draw (0 .. 2**63 - 1)",
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
    "checkpoint_every": "also save checkpoint.pt every this many steps (and always on Ctrl-C)",
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
    "seed": "seed of the initialization, the batches and every Gumbel draw (0 .. 2**63 - 1)",
    "eval_samples": "hard samples per test image for the sampled accuracy",
    "threads": "torch CPU threads",
    "quiet": "print nothing",
}


class MissingExtrasError(ImportError):
    """Optional packages a subcommand needs are not installed (the message says how to fix it)."""


class Extras(NamedTuple):
    """Import names a subcommand cannot run without, and those it uses when present."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


def _missing(names: Sequence[str]) -> list[str]:
    """The import names among ``names`` that cannot be imported (no import is done)."""
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or hidden package counts as missing
            found = False
        if not found:
            out.append(name)
    return out


def check_extras(command: str, extras: Extras) -> list[str]:
    """Raise :class:`MissingExtrasError` when a required package is missing; return the missing
    optional ones (the caller says what it skips without them)."""
    missing_required = _missing(extras.required)
    missing_optional = _missing(extras.optional)
    if missing_required:
        names = [_DISTRIBUTIONS.get(n, n) for n in missing_required + missing_optional]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        raise MissingExtrasError(f"`gumbelkit {command}` needs {listed} (not installed); "
                                 f"install with: {INSTALL_HINT}")
    return missing_optional


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type, helps: dict[str, str],
                        choices: dict[str, Sequence[str]]) -> None:
    """One ``--option`` per dataclass field, with a default of None: options the user does not
    give stay None (the dataclass, or with ``--resume`` the checkpoint, supplies the value), so
    they can be told apart from options given with the default value."""
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"help": f"{helps[f.name]} (default: {default})", "default": None}
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
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def _demo_options(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .demo import SCHEDULES, DemoConfig, available_estimators

    _add_config_options(parser, DemoConfig, DEMO_HELP,
                        {"estimator": available_estimators(), "data": DATASETS,
                         "schedule": SCHEDULES})
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt: settings not given are taken from it, "
                             "so the original command with --resume appended continues the run")


def _demo_extras(args: argparse.Namespace) -> Extras:
    # the progress bar and table need rich; the bundled digits need scikit-learn; without
    # matplotlib the demo still trains and writes metrics.json and the checkpoint
    data = args.data
    if args.resume and data is None:
        data = "digits" if _checkpoint_data(args) == "digits" else "mnist"
    return Extras(("rich", "sklearn") if data in (None, "digits") else ("rich",), ("matplotlib",))


def _checkpoint_data(args: argparse.Namespace) -> str | None:
    """The ``data`` setting of the checkpoint ``--resume`` will read, when it can be read."""
    from .demo import CHECKPOINT, DemoConfig, read_checkpoint

    try:
        return read_checkpoint(Path(args.out or DemoConfig().out) / CHECKPOINT)["config"]["data"]
    except (ValueError, OSError):
        return None  # the run itself reports an unreadable checkpoint


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    given = _given(args, DemoConfig)
    run_demo(DemoConfig(**given) if not args.resume else None, resume=args.resume,
             given=given, plots="matplotlib" not in args.missing_optional)
    return 0


def _classify_options(parser: argparse.ArgumentParser) -> None:
    from .demo import ClassifyConfig

    _add_config_options(parser, ClassifyConfig, CLASSIFY_HELP, {})


def _run_classify(args: argparse.Namespace) -> int:
    from .demo import ClassifyConfig, run_classify

    run_classify(ClassifyConfig(**_given(args, ClassifyConfig)))
    return 0


def _estimators_options(p: argparse.ArgumentParser) -> None:
    from . import _estimator_report

    _estimator_report.add_arguments(p, default_out=Path("gumbelkit-estimators"))


def _estimators_extras(args: argparse.Namespace) -> Extras:
    return Extras(("rich",), () if args.no_plot else ("matplotlib",))


def _run_estimators(args: argparse.Namespace) -> int:
    from . import _estimator_report

    if "matplotlib" in args.missing_optional:
        args.no_plot = True
        print(f"gumbelkit estimators: matplotlib is not installed: writing the table without the "
              f"plot ({INSTALL_HINT} for it)", file=sys.stderr)
    return _estimator_report.run(args)


class Command(NamedTuple):
    """A subcommand: its help, a function adding its options, one running it (returning the
    exit status) and one naming the optional packages it needs for the parsed arguments."""

    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    extras: Callable[[argparse.Namespace], Extras]


COMMANDS: dict[str, Command] = {
    "demo": Command("train a categorical VAE with Gumbel-Softmax latents on digits (or MNIST), "
                    "with live progress, plots, metrics and a resumable checkpoint",
                    _demo_options, _run_demo, _demo_extras),
    "classify": Command("train a digits classifier through a Gumbel-Softmax layer and compare it "
                        "with a plain softmax classifier", _classify_options, _run_classify,
                        lambda args: Extras(("rich", "sklearn"))),
    "estimators": Command("measure each gradient estimator's bias, standard deviation and cosine "
                          "against the exact gradient on enumerable problems; writes a markdown "
                          "table and a plot", _estimators_options, _run_estimators,
                          _estimators_extras),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gumbelkit`` parser, one subparser per entry of ``COMMANDS``.

    Example:
        >>> build_parser().parse_args(["demo", "--steps", "10"]).steps
        10
    """
    parser = argparse.ArgumentParser(
        prog="gumbelkit", description="Gumbel-Max and Gumbel-Softmax tools for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gumbelkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_options(p)
        p.set_defaults(run=command.run, extras=command.extras)
    return parser


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (collapsed whitespace, at most 600 characters)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _user_errors() -> tuple[type[BaseException], ...]:
    from ._ddp import DistributedSetupError

    return (ValueError, OSError, MissingExtrasError, DistributedSetupError)


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted run: the same one plus ``--resume``."""
    words = ["gumbelkit", *argv]
    return shlex.join(words if "--resume" in argv else [*words, "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gumbelkit`` console script; returns the exit status.

    0: done; 2: a usage error, reported as one line on stderr (argparse's own errors included);
    130: interrupted by Ctrl-C (the demo saves a checkpoint first and prints the command that
    resumes it).

    Example:
        >>> main(["demo", "--steps", "0"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    prog = f"gumbelkit {args.command}"
    from .demo import TrainingInterrupted

    try:
        args.missing_optional = check_extras(args.command, args.extras(args))
        return args.run(args)
    except TrainingInterrupted as stop:
        print(f"{prog}: interrupted at step {stop.step}; saved {stop.checkpoint}; resume with: "
              f"{_resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:  # bad settings, files or environment: a message, not a traceback
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

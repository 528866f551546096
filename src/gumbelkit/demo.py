"""The training behind ``gumbelkit demo`` (a categorical VAE) and ``gumbelkit classify``.

``run_demo`` trains :class:`gumbelkit.nn.CategoricalVAE` on binarized digits (or MNIST) with a
gradient estimator for the discrete codes and an annealed temperature, then writes to the
output directory: ``metrics.json``, ``curves.png``, ``reconstructions.png``, ``samples.png``
and ``checkpoint.pt`` (which ``--resume`` continues from).

The pieces are separate so that other setups are small changes: :func:`build` makes the model
and optimizer (wrap the model in ``DistributedDataParallel`` there), :func:`train` runs the
loop on any batch iterator (give each rank its own shard), :func:`sample_latent` is the one
place where the estimator is chosen, and the loss stays per example until the loop averages it
(so a score-function surrogate can be added per example).

rich, matplotlib and scikit-learn (the ``demo`` extra) are imported only when needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from . import _ddp, estimators
from .data import DATASETS, Dataset, batches, load_dataset, load_digits
from .functional import gumbel_max, gumbel_softmax
from .nn import CategoricalVAE, GumbelSoftmax
from .schedules import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    TemperatureSchedule,
)

__all__ = [
    "ClassifyConfig",
    "DemoConfig",
    "History",
    "TrainingInterrupted",
    "available_estimators",
    "build",
    "evaluate",
    "make_schedule",
    "read_checkpoint",
    "run_classify",
    "run_demo",
    "sample_latent",
    "train",
]

BUILTIN_ESTIMATORS = ("st-gs", "soft")
SCHEDULES = ("exponential", "constant", "linear", "cosine")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "gumbelkit-demo-1"
_INSTALL_HINT = "pip install 'gumbelkit[demo]'"
# settings that may differ between a checkpoint and the run that resumes it
# (data_dir: the same files may have moved)
RESUMABLE = ("steps", "out", "device", "quiet", "importance_samples", "checkpoint_every", "threads",
             "dist_timeout", "data_dir")


@dataclass
class DemoConfig:
    """Settings of ``gumbelkit demo`` (the command-line options, one for one)."""

    estimator: str = "st-gs"
    samples: int = 4
    latents: int = 20
    classes: int = 10
    hidden: tuple[int, ...] = (256, 128)
    steps: int = 6000
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    out: str = "gumbelkit-demo"
    device: str = "cpu"
    data: str = "digits"
    data_dir: str | None = None
    schedule: str = "exponential"
    tau0: float = 1.0
    tau_min: float = 0.5
    anneal_rate: float = 1.5e-4
    anneal_every: int = 100
    importance_samples: int = 100
    dist_timeout: float = 120.0
    checkpoint_every: int = 1000
    threads: int = 1
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, ints=("samples", "latents", "classes", "steps", "batch_size", "anneal_every",
                                  "importance_samples", "checkpoint_every", "threads"),
                      floats=("lr", "tau0", "tau_min", "dist_timeout"))
        if self.classes < 2:
            raise ValueError(f"--classes must be >= 2 (a categorical needs two classes), "
                             f"got {self.classes}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                  for h in self.hidden):
            raise ValueError(f"--hidden must be one or more positive ints, got {self.hidden!r}")
        _check_estimator(self.estimator)
        if self.data not in DATASETS:
            raise ValueError(f"--data must be one of {DATASETS}, got {self.data!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check_seed(self.seed)
        if self.estimator == "rloo" and self.samples < 2:
            raise ValueError(f"--estimator rloo needs --samples 2 or more (its baseline for each "
                             f"sample is the mean loss of the others), got --samples {self.samples}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise ValueError(f"--data-dir must be a path, got {self.data_dir!r}")


SEED_MAX = 2**63 - 1


def _check_seed(seed: object) -> None:
    """Seeds go to ``torch.Generator.manual_seed`` (with small offsets): 0 .. 2**63 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"--seed must be an int from 0 to 2**63 - 1 ({SEED_MAX}), got {seed!r}")


def _check_fields(config: object, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """Positive ints and positive finite floats, named by their command-line option."""
    for name in ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
    for name in floats:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


# ----------------------------------------------------------------------------- estimators

def available_estimators() -> list[str]:
    """``st-gs`` and ``soft``, then every method of :mod:`gumbelkit.estimators`.

    Pathwise methods go through :func:`sample_latent`; score-function methods (REINFORCE,
    RLOO) train on a surrogate built from the per-sample loss (see :func:`train`).

    Example:
        >>> available_estimators()[:2]
        ['st-gs', 'soft']
    """
    return list(BUILTIN_ESTIMATORS) + [n for n in estimators.available() if n not in BUILTIN_ESTIMATORS]


def _check_estimator(name: str) -> None:
    if name not in available_estimators():
        raise ValueError(f"unknown estimator {name!r}; choose one of {available_estimators()}")


def _is_score_function(name: str) -> bool:
    return name in estimators.available("score-function")


def sample_latent(logits: torch.Tensor, estimator: str, *, tau: float | torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes for ``logits`` (last dim = classes) whose backward pass is the estimator's gradient.

    ``"st-gs"``: straight-through Gumbel-Softmax, exact one-hot samples with the relaxed
    gradient (Jang et al. 2017, ``gumbel_softmax(hard=True)``). ``"soft"``: the relaxed sample
    itself (the Concrete relaxation, Maddison et al. 2017). Any other name is passed to
    ``gumbelkit.estimators.sample``.

    Example:
        >>> logits = torch.zeros(2, 3, 4, requires_grad=True)
        >>> z = sample_latent(logits, "st-gs", tau=0.5, generator=torch.Generator().manual_seed(0))
        >>> z.sum(-1).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if estimator in BUILTIN_ESTIMATORS:
        return gumbel_softmax(logits, tau, hard=estimator == "st-gs", generator=generator)
    _check_estimator(estimator)
    return estimators.sample(logits, estimator, tau=tau, dim=-1, generator=generator)


def make_schedule(config: DemoConfig) -> TemperatureSchedule:
    """The temperature schedule named by ``config.schedule``, from ``tau0`` down to ``tau_min``
    (linear and cosine reach ``tau_min`` at ``config.steps``).

    Example:
        >>> make_schedule(DemoConfig(schedule="linear", steps=10))(5)
        0.75
    """
    if config.schedule == "exponential":
        return ExponentialSchedule(config.tau0, config.anneal_rate, config.tau_min,
                                   config.anneal_every)
    if config.schedule == "constant":
        return ConstantSchedule(config.tau0)
    cls = LinearSchedule if config.schedule == "linear" else CosineSchedule
    return cls(config.tau0, config.tau_min, config.steps)


# ----------------------------------------------------------------------------- training

@dataclass
class History:
    """Per-step training record (batch means)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    neg_elbo: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration, then restored. The models
    are small: one thread is as fast as several on an idle machine and far faster on a busy one
    (no threads spinning while they wait for a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` with the global RNG seeded, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def build(config: DemoConfig, in_features: int, device: torch.device
          ) -> tuple[CategoricalVAE, torch.optim.Optimizer]:
    """The model (initialized from ``config.seed``) and its Adam optimizer (see :func:`train`)."""
    model = _seeded(config.seed, lambda: CategoricalVAE(
        in_features, config.latents, config.classes, config.hidden)).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=config.lr)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Iterator[torch.Tensor], *,
          estimator: str, schedule: TemperatureSchedule, generator: torch.Generator,
          start: int, stop: int, history: History, samples: int = 4,
          on_step: Callable[[int, History], None] | None = None) -> None:
    """Steps ``start`` .. ``stop - 1``: one batch from ``data`` each, appending to ``history``.

    Each step minimizes the mean over the batch of the single-sample -ELBO estimate
    ``nll(x, z) + KL(q(z|x) || uniform)`` with ``z = sample_latent(logits, estimator, tau)``,
    ``tau = schedule(step)``: the categorical VAE of Jang et al. (2017). Score-function
    estimators (``reinforce``, ``rloo``) instead draw ``samples`` exact codes per image and
    minimize ``reinforce_surrogate(log q(z|x), nll(x, z)) + KL``, whose value is the same
    -ELBO estimate averaged over the samples (Williams 1992; Kool et al. 2019 for RLOO).

    Example:
        >>> cfg = DemoConfig(latents=4, classes=4, hidden=(32,))
        >>> model, optimizer = build(cfg, in_features=64, device=torch.device("cpu"))
        >>> x = load_digits().train_x
        >>> history = History()
        >>> train(model, optimizer, batches(x, 100, seed=0), estimator="st-gs",
        ...       schedule=make_schedule(cfg), generator=torch.Generator().manual_seed(0),
        ...       start=0, stop=30, history=history)
        >>> len(history.loss), history.neg_elbo[-1] < history.neg_elbo[0]
        (30, True)
        >>> neg_elbo, neg_bound = evaluate(model, x[:200], m=10, seed=0)
        >>> neg_bound <= neg_elbo + 1.0  # the 10-sample bound is (about) tighter
        True
    """
    model.train()
    score_function = _is_score_function(estimator)
    for step in range(start, stop):
        x = next(data)
        tau = schedule(step)
        if score_function:
            log_q: list[torch.Tensor] = []

            def draw(logits: torch.Tensor, log_q: list[torch.Tensor] = log_q) -> torch.Tensor:
                z, lq = estimators.sample_with_log_prob(logits, samples, generator=generator)
                log_q.append(lq.sum(-1))
                return z  # (samples, batch, latents, classes): nll comes out (samples, batch)

            out = model(x, draw)
            surrogate = estimators.ESTIMATORS[estimator].function(log_q[0], out.nll)
            loss = (surrogate + out.kl).mean()
            neg_elbo = out.neg_elbo.mean()
        else:
            out = model(x, lambda logits, tau=tau: sample_latent(logits, estimator, tau=tau,
                                                                   generator=generator))
            loss = (out.nll + out.kl).mean()
            neg_elbo = out.neg_elbo.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.step.append(step)
        history.loss.append(loss.item())
        history.neg_elbo.append(neg_elbo.item())
        history.tau.append(tau)
        if on_step is not None:
            on_step(step, history)


@torch.no_grad()
def evaluate(model: CategoricalVAE, x: torch.Tensor, *, m: int, seed: int,
             batch_size: int = 500) -> tuple[float, float]:
    """Mean -ELBO (exact KL, one exact sample of ``z`` per example) and the mean ``m``-sample
    importance-weighted bound ``-L_m`` (an upper bound on ``-log p(x)``, Burda et al. 2016), in
    nats per example; see :meth:`CategoricalVAE.importance_bound` and :func:`train`."""
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    neg_elbo = neg_bound = 0.0
    for chunk in x.split(batch_size):
        out = model(chunk, lambda logits: F.one_hot(gumbel_max(logits, generator=generator),
                                                    model.n_classes).to(logits.dtype))
        neg_elbo += out.neg_elbo.sum().item()
        neg_bound -= model.importance_bound(chunk, m, generator=generator).sum().item()
    return neg_elbo / len(x), neg_bound / len(x)


# ----------------------------------------------------------------------------- checkpoints

class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after step ``step`` (1-based count); ``checkpoint`` holds the state
    after that step, so ``--resume`` continues exactly where the run stopped."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, config: DemoConfig, history: History,
                     train_time: float) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": len(history.step),
        "generator": generator.get_state(),
        "config": dataclasses.asdict(config),
        "history": dataclasses.asdict(history),
        "train_time_s": train_time,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    except (OSError, RuntimeError) as err:  # torch.save reports an unwritable path as RuntimeError
        raise OSError(f"cannot write the checkpoint {path} ({' '.join(str(err).split())}); "
                      "check that --out is writable and has free space") from err


def _bad_checkpoint(path: Path, why: str) -> ValueError:
    return ValueError(f"--resume: cannot read the checkpoint {path} ({why}); it is damaged or not a "
                      "gumbelkit demo checkpoint: remove it or use another --out")


_CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "step": int, "generator": torch.Tensor,
                    "config": dict, "history": dict, "train_time_s": float}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``gumbelkit demo`` checkpoint (with ``torch.load(weights_only=True)``) and check
    its structure: the keys and their types, a config that :class:`DemoConfig` accepts, and a
    history as long as the step count.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is empty, truncated, not a torch file, or a torch file of another
            structure; the message starts with ``--resume: cannot read the checkpoint PATH``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume first "
                                "(or pass the --out directory of an earlier run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # every failure of a foreign file means the same
        why = "empty file" if path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
        raise _bad_checkpoint(path, " ".join(why.split())[:300]) from err
    if not isinstance(state, dict):
        raise _bad_checkpoint(path, f"it holds a {type(state).__name__}, not a dict")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise _bad_checkpoint(path, f"no {key!r} entry of type {kind.__name__}")
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = set(state["config"]) - names
    if unknown:
        raise _bad_checkpoint(path, f"unknown settings {sorted(unknown)}")
    try:
        saved = dict(state["config"])
        if isinstance(saved.get("hidden"), list):
            saved["hidden"] = tuple(saved["hidden"])
        state["config"] = dataclasses.asdict(DemoConfig(**saved))
        history = History(**state["history"])
    except (TypeError, ValueError) as err:
        raise _bad_checkpoint(path, f"invalid settings or history: {err}") from err
    lengths = {len(getattr(history, f.name)) for f in dataclasses.fields(History)}
    if lengths != {state["step"]}:
        raise _bad_checkpoint(path, f"the history does not match step {state['step']}")
    return state


def _resumed_config(path: Path, saved: dict[str, Any], given: dict[str, Any]) -> DemoConfig:
    """The checkpoint's settings with those given on the command line put in; a given setting
    that would change the trained model (anything outside ``RESUMABLE``) must equal the saved one."""
    for name, value in given.items():
        if name in RESUMABLE:
            continue
        old = saved[name]
        same = tuple(value) == tuple(old) if name == "hidden" else value == old
        if not same:
            shown = tuple(value) if name == "hidden" else value
            raise ValueError(f"--resume: the checkpoint {path} was trained with {name}={old!r} "
                             f"but {name}={shown!r} was given; use the same value or a new --out")
    return DemoConfig(**{**saved, **given, "out": str(path.parent)})


def _restore(path: Path, state: dict[str, Any], model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, generator: torch.Generator,
             info: _ddp.DistInfo, seed: int) -> None:
    """Model, optimizer and noise generator from the checkpoint. The checkpoint holds rank 0's
    generator only: under torchrun every rank instead reseeds from (seed, rank, step), so the
    ranks keep drawing independent noise (the run then differs from an uninterrupted one)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if info.distributed:
            generator.manual_seed(zlib.crc32(f"resume {seed} {info.rank} {state['step']}".encode()))
        else:
            generator.set_state(state["generator"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise _bad_checkpoint(path, f"its tensors do not fit the model: {' '.join(str(err).split())[:300]}"
                              ) from err


# ----------------------------------------------------------------------------- pictures

def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend is touched

    return Figure(figsize=(width, height), dpi=100)


def _mosaic(rows: list[torch.Tensor], shape: tuple[int, int], gap: int = 1) -> torch.Tensor:
    """One image of ``len(rows)`` rows of ``rows[r].shape[0]`` images each, ``gap`` pixels apart
    (the gaps are blank, i.e. 0 on the gray_r scale)."""
    h, w = shape
    cols = rows[0].shape[0]
    canvas = torch.zeros(len(rows) * (h + gap) + gap, cols * (w + gap) + gap)
    for r, images in enumerate(rows):
        for c in range(cols):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y:y + h, x:x + w] = images[c].reshape(shape).float().cpu()
    return canvas


def _save_mosaic(rows: list[torch.Tensor], shape: tuple[int, int], labels: list[str], title: str,
                 path: Path, inches_per_image: float = 0.55) -> None:
    """The images as one picture with a frame around each, the row labels left, no margins."""
    mosaic = _mosaic(rows, shape)
    h, w = mosaic.shape
    scale = inches_per_image / (shape[1] + 1)
    fig = _figure(w * scale + (0.9 if any(labels) else 0.1), h * scale + 0.45)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    step = shape[0] + 1
    ax.set_yticks([1 + step * r + shape[0] / 2 - 0.5 for r in range(len(rows))], labels)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    for r in range(len(rows)):  # a light frame around each image
        for c in range(rows[0].shape[0]):
            ax.add_patch(_rectangle(c * (shape[1] + 1) + 0.5, r * step + 0.5, shape[1], shape[0]))
    ax.set_title(title)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)


def _rectangle(x: float, y: float, w: float, h: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="0.75", linewidth=0.6)


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def _plot_curves(history: History, path: Path, title: str) -> None:
    """Three panels over the steps: the training loss, the -ELBO of the discrete codes (each raw
    and as a moving average, on the same y scale) and the temperature. Separate panels, because
    for straight-through estimators the two curves are identical and would hide each other."""
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3, sharex=True)
    width = max(1, len(history.step) // 50)
    same = history.loss == history.neg_elbo
    panels = (("training loss" + (" (= -ELBO for this estimator)" if same else ""), history.loss, "tab:blue"),
              ("-ELBO of the discrete codes", history.neg_elbo, "tab:orange"))
    for ax, (name, values, color) in zip(axes[:2], panels, strict=True):
        ax.plot(history.step, values, color=color, alpha=0.25, linewidth=0.6, label="per batch")
        ax.plot(history.step, _moving_average(values, width), color=color, linewidth=1.6,
                label=f"moving average ({width} steps)")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("nats per image")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    low = min(min(history.loss), min(history.neg_elbo))
    high = max(max(history.loss), max(history.neg_elbo))
    pad = 0.03 * (high - low or 1.0)
    for ax in axes[:2]:
        ax.set_ylim(low - pad, high + pad)
    axes[2].plot(history.step, history.tau, color="tab:green")
    axes[2].set_title("temperature tau", fontsize=10)
    axes[2].grid(True, alpha=0.3)
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def _plot_reconstructions(model: CategoricalVAE, x: torch.Tensor, shape: tuple[int, int],
                         path: Path) -> None:
    """Test images (top) and the decoder's pixel probabilities for their most likely codes."""
    model.eval()
    codes = F.one_hot(model.encode(x).argmax(-1), model.n_classes).to(x.dtype)
    recon = torch.sigmoid(model.decode(codes))
    _save_mosaic([x, recon], shape, ["input", "reconstruction"],
                 "test images and their reconstructions (most likely code)", path)


@torch.no_grad()
def _plot_samples(model: CategoricalVAE, shape: tuple[int, int], path: Path, *, seed: int,
                 rows: int = 6, cols: int = 12) -> None:
    """Pixel probabilities decoded from codes drawn from the uniform prior."""
    model.eval()
    device = next(model.parameters()).device
    codes = model.sample_prior(rows * cols, generator=torch.Generator(device).manual_seed(seed))
    images = torch.sigmoid(model.decode(codes)).view(rows, cols, -1)
    _save_mosaic(list(images), shape, [""] * rows, "decoded from codes drawn from the uniform prior",
                 path)


# ----------------------------------------------------------------------------- the demo

def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {name!r} is not usable here ({err}); try --device cpu") from err
    return device


def _progress(console: Any, quiet: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.2f} -ELBO {task.fields[neg_elbo]:.2f} "
                   "tau {task.fields[tau]:.3f}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=quiet,
    )


def run_demo(config: DemoConfig | None = None, *, resume: bool = False,
             given: dict[str, Any] | None = None, plots: bool | None = None,
             console: Any = None) -> dict[str, Any]:
    """Train (or continue), evaluate, and write every output file; returns the metrics dict.

    Without ``resume``, ``config`` holds the settings. With ``resume``, the run continues from
    ``OUT/checkpoint.pt`` (``OUT`` is ``given["out"]``, else ``config.out``, else the default):
    ``given`` names the settings the user gave (default: the fields of ``config`` that differ
    from :class:`DemoConfig`'s defaults); the others come from the checkpoint, ``steps``
    included (so a resumed run trains to its original target), and a given setting outside
    ``RESUMABLE`` must agree with the checkpoint's.

    Everything checkable is checked before training: the settings, the device, that ``out`` is
    a writable directory, the checkpoint, and that the data set has training and test images.
    ``plots=False`` (default: whether matplotlib is installed) skips the PNGs; metrics.json
    and the checkpoint are written either way. Ctrl-C during training finishes the current
    step, saves the checkpoint and raises :class:`TrainingInterrupted`. Runs with
    ``config.threads`` torch threads.

    Raises:
        ValueError: bad settings, a checkpoint that cannot be read or does not match, an
            unwritable ``out``, an empty data set.
        FileNotFoundError: a missing checkpoint (with ``resume``) or data file.
        TrainingInterrupted: Ctrl-C during training (after saving the checkpoint).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> cfg = DemoConfig(steps=20, latents=4, classes=4, hidden=(32,), importance_samples=2,
        ...                  out=out, quiet=True)
        >>> metrics = run_demo(cfg)
        >>> sorted(p.name for p in Path(out).iterdir())
        ['checkpoint.pt', 'curves.png', 'metrics.json', 'reconstructions.png', 'samples.png']
        >>> sorted(metrics["final"])
        ['test_importance_bound', 'test_neg_elbo', 'train_neg_elbo']
        >>> run_demo(resume=True, given={"out": out, "steps": 30})["resumed_from_step"]
        20
    """
    state = None
    if resume:
        if given is None:
            defaults = DemoConfig()
            given = {f.name: getattr(config, f.name) for f in dataclasses.fields(DemoConfig)
                     if config is not None and getattr(config, f.name) != getattr(defaults, f.name)}
        out = given.get("out") or (config.out if config is not None else DemoConfig.out)
        path = Path(out) / CHECKPOINT
        state = read_checkpoint(path)
        config = _resumed_config(path, state["config"], given)
    elif config is None:
        config = DemoConfig(**(given or {}))
    if plots is None:
        plots = importlib.util.find_spec("matplotlib") is not None
    with _threads(config.threads):
        return _run_demo(config, state=state, plots=plots, console=console)


def _check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and write (and remove) a probe file there, so a directory that cannot
    take the outputs is reported now rather than at the first checkpoint."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".gumbelkit-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"--out {out_dir} is not a writable directory ({err.strerror or err}); "
                         "pass an --out you can write to") from err


def _check_data(data: Dataset, config: DemoConfig, world_size: int) -> None:
    where = f" in {config.data_dir}" if config.data == "mnist" else ""
    for split, x in (("training", data.train_x), ("test", data.test_x)):
        if len(x) == 0:
            raise ValueError(f"the {data.name} data set{where} has 0 {split} images; the demo needs "
                             "at least one to " + ("train on" if split == "training" else "evaluate"))
    if len(data.train_x) < world_size:
        raise ValueError(f"{len(data.train_x)} training images cannot be split over {world_size} ranks")


class _StopOnInterrupt:
    """While active (in the main thread of a single process), the first Ctrl-C only sets
    ``requested``: training stops after the current step and saves a checkpoint. A second
    Ctrl-C raises ``KeyboardInterrupt`` at once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


class _Stop(Exception):
    """Raised from the step callback to leave the training loop after a Ctrl-C."""


def _run_demo(config: DemoConfig, *, state: dict[str, Any] | None, plots: bool,
              console: Any) -> dict[str, Any]:
    from rich.console import Console

    console = console or Console()
    started = time.perf_counter()
    out_dir = Path(config.out)
    ckpt_path = out_dir / CHECKPOINT
    schedule = make_schedule(config)
    device = _device(config.device)
    start = state["step"] if state is not None else 0
    if start >= config.steps:
        raise ValueError(f"--resume: the checkpoint {ckpt_path} is already at step {start}; "
                         f"pass --steps larger than {start} to train further")
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes files
        _check_out_dir(out_dir)
    if not plots:
        print("gumbelkit demo: matplotlib is not installed: no plots; metrics.json and the "
              f"checkpoint are written as usual ({_INSTALL_HINT} for the plots)", file=sys.stderr)
    # under torchrun: one process per rank, gloo on CPU / nccl on GPU, DDP; else a single process
    info = _ddp.init_from_env(device=None if device.type == "cuda" else device,  # cuda: one GPU per rank
                              timeout=config.dist_timeout)
    device = info.device if info.distributed else device
    if not info.is_main:
        config = dataclasses.replace(config, quiet=True)
    data: Dataset = load_dataset(config.data, config.data_dir)
    _check_data(data, config, info.world_size)
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    model, optimizer = build(config, train_x.shape[1], device)
    generator = _ddp.rank_generator(config.seed, info)  # seed + rank: independent noise per rank
    history, train_time = History(), 0.0
    if state is not None:
        _restore(ckpt_path, state, model, optimizer, generator, info, config.seed)
        history = History(**state["history"])
        train_time = state["train_time_s"]

    # every rank draws the same global batch and keeps its own slice of it
    global_batch = min(config.batch_size, len(train_x) // info.world_size) * info.world_size
    batch_iter = (_ddp.local_batch(b, info)
                  for b in batches(train_x, global_batch, seed=config.seed, start_step=start))
    ddp_model = _ddp.wrap_model(model, info)
    t0 = time.perf_counter()
    stop = _StopOnInterrupt(enabled=not info.distributed)
    with stop, _progress(console, config.quiet) as progress:
        task = progress.add_task(config.estimator, total=config.steps,
                                 completed=start, loss=math.nan, neg_elbo=math.nan,
                                 tau=schedule(start))
        ema: dict[str, float] = {}

        def on_step(step: int, h: History) -> None:
            for key in ("loss", "neg_elbo"):  # smoothed for a readable bar
                ema[key] = 0.95 * ema.get(key, getattr(h, key)[-1]) + 0.05 * getattr(h, key)[-1]
            progress.update(task, advance=1, tau=h.tau[-1], **ema)
            if stop.requested:
                raise _Stop
            if info.is_main and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_checkpoint(ckpt_path, model, optimizer, generator, config, history,
                                 train_time + time.perf_counter() - t0)

        try:
            train(ddp_model, optimizer, batch_iter, estimator=config.estimator, schedule=schedule,
                  generator=generator, start=start, stop=config.steps, history=history,
                  samples=config.samples, on_step=on_step)
        except _Stop:
            progress.stop()
            _save_checkpoint(ckpt_path, model, optimizer, generator, config, history,
                             train_time + time.perf_counter() - t0)
            raise TrainingInterrupted(len(history.step), ckpt_path) from None
    train_time += time.perf_counter() - t0
    del ddp_model, batch_iter  # DDP must not outlive the process group
    in_sync = _ddp.replicas_in_sync(model, info)
    _ddp.cleanup(info)
    if not in_sync:
        raise RuntimeError("the ranks' parameters diverged during data-parallel training")
    if not info.is_main:
        return {}
    _save_checkpoint(ckpt_path, model, optimizer, generator, config, history, train_time)

    m = config.importance_samples
    train_elbo, _ = evaluate(model, train_x, m=1, seed=config.seed + 1)
    test_elbo, test_bound = evaluate(model, test_x, m=m, seed=config.seed + 2)
    images = ["curves.png", "reconstructions.png", "samples.png"] if plots else []
    metrics = {
        "config": dataclasses.asdict(config),
        "world_size": info.world_size,
        "steps": history.step,
        "loss": history.loss,
        "neg_elbo": history.neg_elbo,
        "tau": history.tau,
        "final": {
            "train_neg_elbo": train_elbo,
            "test_neg_elbo": test_elbo,
            "test_importance_bound": {"m": m, "neg_log_likelihood_bound": test_bound},
        },
        "resumed_from_step": start if state is not None else None,
        "images": images,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - started,
    }
    # one line per key: readable, and the per-step lists stay compact
    lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in metrics.items())
    (out_dir / "metrics.json").write_text("{\n" + lines + "\n}\n")
    if plots:  # after metrics.json, so the numbers are saved whatever happens to the plots
        title = f"{config.estimator}, {config.latents}x{config.classes} latents, {data.name}"
        _plot_curves(history, out_dir / "curves.png", title)
        _plot_reconstructions(model, test_x[:12], data.image_shape, out_dir / "reconstructions.png")
        _plot_samples(model, data.image_shape, out_dir / "samples.png", seed=config.seed + 3)
    if not config.quiet:
        _summary(console, config, metrics, out_dir)
    return metrics


def _summary(console: Any, config: DemoConfig, metrics: dict[str, Any], out_dir: Path) -> None:
    from rich.table import Table

    final = metrics["final"]
    bound = final["test_importance_bound"]
    table = Table(title=f"gumbelkit demo: categorical VAE ({config.estimator}, {config.data})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{len(metrics['steps'])}"),
        ("first / last batch -ELBO", f"{metrics['neg_elbo'][0]:.2f} / {metrics['neg_elbo'][-1]:.2f}"),
        ("final tau", f"{metrics['tau'][-1]:.3f}"),
        ("train -ELBO (nats/image)", f"{final['train_neg_elbo']:.3f}"),
        ("test -ELBO (nats/image)", f"{final['test_neg_elbo']:.3f}"),
        (f"test -log p(x) bound, m={bound['m']}", f"{bound['neg_log_likelihood_bound']:.3f}"),
        ("training time", f"{metrics['train_time_s']:.1f} s"),
        ("wall time", f"{metrics['wall_time_s']:.1f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    files = ", ".join(["metrics.json", *metrics["images"]])
    skipped = "" if metrics["images"] else f" (no plots: matplotlib is not installed; {_INSTALL_HINT})"
    console.print(f"wrote {files} and {CHECKPOINT} to {out_dir}{skipped}")


# ----------------------------------------------------------------------------- classify

@dataclass
class ClassifyConfig:
    """Settings of ``gumbelkit classify``."""

    tau: float = 1.0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    hidden: int = 128
    seed: int = 0
    eval_samples: int = 20
    threads: int = 1
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, ints=("steps", "batch_size", "hidden", "eval_samples", "threads"),
                      floats=("tau", "lr"))
        _check_seed(self.seed)


def _classifier(config: ClassifyConfig) -> torch.nn.Module:
    return _seeded(config.seed, lambda: torch.nn.Sequential(
        torch.nn.Linear(64, config.hidden), torch.nn.ReLU(), torch.nn.Linear(config.hidden, 10)))


def run_classify(config: ClassifyConfig, *, console: Any = None) -> dict[str, Any]:
    """Train both classifiers and print their test accuracies (see :func:`_run_classify`).

    Example:
        >>> results = run_classify(ClassifyConfig(steps=200, quiet=True))["results"]
        >>> sorted(results), results["gumbel-softmax"]["argmax_accuracy"] > 0.8
        (['gumbel-softmax', 'softmax'], True)
    """
    with _threads(config.threads):
        return _run_classify(config, console)


def _run_classify(config: ClassifyConfig, console: Any) -> dict[str, Any]:
    r"""The seed document's example done right: classify digits through a Gumbel-Softmax layer.

    The seed's version multiplied the noise by the temperature and fed the relaxed sample
    (probabilities) to ``cross_entropy``, which applies a second softmax. Here the network's
    logits go through :class:`gumbelkit.nn.GumbelSoftmax` with ``log=True``, i.e.
    :math:`\log y = \operatorname{log\_softmax}((\mathrm{logits} + g)/\tau)`, and the loss is
    the negative log-likelihood of the label under that sample, ``nll_loss(log y, label)``.
    At test time the prediction is a hard sample (a Gumbel-Max draw from
    softmax(logits), the ``tau -> 0`` limit); accuracy is averaged over ``eval_samples`` draws.
    A plain softmax classifier (``cross_entropy`` on the logits, same network and
    initialization, same batches) is the baseline.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    started = time.perf_counter()
    data = load_digits(binarize=False)
    layer = GumbelSoftmax(config.tau, log=True)
    generator = torch.Generator().manual_seed(config.seed)
    losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "gumbel-softmax": lambda logits, y: F.nll_loss(layer(logits, generator=generator), y),
        "softmax": F.cross_entropy,
    }
    results: dict[str, dict[str, float]] = {}
    for name, loss_fn in losses.items():
        net = _classifier(config)
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        stream = batches(torch.arange(len(data.train_y)), config.batch_size, seed=config.seed)
        for _ in range(config.steps):
            idx = next(stream)
            loss = loss_fn(net(data.train_x[idx]), data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = net(data.test_x)
            eval_gen = torch.Generator().manual_seed(config.seed + 1)
            draws = gumbel_max(logits.expand(config.eval_samples, *logits.shape), generator=eval_gen)
            results[name] = {
                "hard_sample_accuracy": (draws == data.test_y).float().mean().item(),
                "argmax_accuracy": (logits.argmax(-1) == data.test_y).float().mean().item(),
                "final_train_loss": loss.item(),
            }
    metrics = {"config": dataclasses.asdict(config), "results": results,
               "test_size": len(data.test_y), "wall_time_s": time.perf_counter() - started}
    if not config.quiet:
        table = Table(title=f"digits: test accuracy on {len(data.test_y)} images")
        for col in ("model", "loss", "hard sample", "argmax"):
            table.add_column(col, justify="left" if col in ("model", "loss") else "right")
        for name, r in results.items():
            label, loss_name = ((f"Gumbel-Softmax (tau={config.tau:g})", "nll(log y)")
                                if name != "softmax" else ("plain softmax", "cross-entropy"))
            table.add_row(label, loss_name, f"{r['hard_sample_accuracy']:.3f}",
                          f"{r['argmax_accuracy']:.3f}")
        console.print(table)
        console.print(f"hard-sample accuracy averaged over {config.eval_samples} draws per test "
                      f"image; wall time {metrics['wall_time_s']:.1f} s")
    return metrics

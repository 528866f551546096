"""Data-parallel training helpers for ``torchrun --nproc_per_node N -m gumbelkit.cli demo``.

DistributedDataParallel (Li et al. 2020) keeps one model replica per process and averages
gradients with an all-reduce after each backward pass, so replicas that start equal stay
equal. What the Gumbel tools add: each rank must draw *independent* noise (a generator
seeded ``seed + rank``; equal seeds would make N ranks repeat one sample N times), and each
rank must see a different part of every batch.

Everything here degrades to a single process when the script is not launched by torchrun,
so the same demo code runs both ways.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "DistributedSetupError",
    "cleanup",
    "init_from_env",
    "local_batch",
    "mean_across_ranks",
    "rank_generator",
    "replicas_in_sync",
    "shard_indices",
    "wrap_model",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
    """The process group cannot form (a rank never joined, or torchrun's variables are missing).

    The message is one line: the ``gumbelkit`` command prints it as its error.
    """


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``err``'s message (c10d errors carry a multi-line trace)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DistInfo(NamedTuple):
    """Where this process stands: its rank, the number of ranks, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that should print, plot and write files."""
        return self.rank == 0


def init_from_env(
    *, backend: str | None = None, timeout: float = 60.0, device: str | torch.device | None = None
) -> DistInfo:
    """Join the process group that torchrun describes in the environment, with a timeout.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. Without ``WORLD_SIZE`` (a plain ``python -m gumbelkit.cli demo``) or with
    ``WORLD_SIZE=1`` this returns a single-process :class:`DistInfo` and starts nothing.
    The backend defaults to ``nccl`` for CUDA devices (one GPU per local rank) and ``gloo``
    on the CPU. ``timeout`` bounds the rendezvous and every later collective (DDP's gradient
    all-reduce included), so a rank that dies makes the others fail instead of hang.

    Example:
        >>> init_from_env()  # not launched by torchrun: a single process
        DistInfo(rank=0, world_size=1, local_rank=0, device=device(type='cpu'))
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(device=torch.device(device or "cpu"))
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with "
            "torchrun --nproc_per_node N, which sets all of " + ", ".join(_ENV)
        )
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"))
    )
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, dist.DistError) as err:
            addr = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise DistributedSetupError(
                f"rank {rank}: the {backend} group of {world} ranks at {addr} did not form "
                f"within {timeout:g} s: a rank never joined or cannot reach {addr} "
                f"({type(err).__name__}: {_first_line(err)}); start all ranks with torchrun, or "
                "raise --dist-timeout"
            ) from err
    return DistInfo(rank, world, local, dev)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model itself.

    DDP broadcasts rank 0's parameters and buffers at construction, so every replica starts
    from the same weights whatever each rank initialized.
    """
    if not info.distributed:
        return model
    model = model.to(info.device)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_generator(seed: int, info: DistInfo) -> torch.Generator:
    """A generator seeded ``seed + rank``: independent Gumbel noise on every rank, reproducible.

    Example:
        >>> g0, g1 = rank_generator(7, DistInfo(0, 2)), rank_generator(7, DistInfo(1, 2))
        >>> torch.rand(3, generator=g0).equal(torch.rand(3, generator=g1))
        False
    """
    return torch.Generator(device=info.device).manual_seed(seed + info.rank)


def shard_indices(
    n: int, info: DistInfo, *, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> torch.Tensor:
    """This rank's indices into a data set of ``n`` rows, as ``DistributedSampler`` chooses them.

    The (shuffled with ``seed + epoch``) index list is padded by wrapping around to a multiple
    of ``world_size`` so every rank gets ``ceil(n / world_size)`` rows (DDP needs the same
    number of steps on every rank); rank ``r`` takes every ``world_size``-th index from ``r``.

    Example:
        >>> [shard_indices(5, DistInfo(r, 2), shuffle=False).tolist() for r in range(2)]
        [[0, 2, 4], [1, 3, 0]]
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of rows, got {n}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    total = -(-n // info.world_size) * info.world_size
    order = order.repeat(-(-total // n))[:total]
    return order[info.rank :: info.world_size]


def local_batch(batch: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's rows of a global batch (rows ``rank, rank + N, ...``).

    Feed every rank the same global batch of ``batch_size * world_size`` rows (e.g. from
    :func:`gumbelkit.data.batches` with the same seed): the ranks then split it, and the
    averaged gradient is that of the global batch.

    Example:
        >>> local_batch(torch.arange(6), DistInfo(1, 3)).tolist()
        [1, 4]
    """
    if batch.shape[0] % info.world_size:
        raise ValueError(
            f"a global batch of {batch.shape[0]} rows does not split evenly over "
            f"{info.world_size} ranks; use a multiple of {info.world_size}"
        )
    return batch[info.rank :: info.world_size]


def mean_across_ranks(value: float | torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over all ranks (for logging a loss); the value itself when single.

    Example:
        >>> mean_across_ranks(2.5, DistInfo())
        2.5
    """
    t = torch.as_tensor(value).detach().reshape(1).to(info.device, torch.float64, copy=True)
    if info.distributed:
        dist.all_reduce(t)
        t /= info.world_size
    return float(t)


def replicas_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """True on every rank when all ranks hold bit-identical parameters (rank 0's are broadcast).

    Example:
        >>> replicas_in_sync(torch.nn.Linear(2, 2), DistInfo())
        True
    """
    if not info.distributed:
        return True
    params = [p.detach().reshape(-1).double() for p in model.parameters()]
    flat = torch.cat(params).to(info.device) if params else torch.zeros(0, device=info.device)
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(flat, ref))], device=info.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def cleanup(info: DistInfo) -> None:
    """Leave the process group after every rank got here (a no-op for a single process).

    Drop the DDP model (and any loss or output still holding its autograd graph) first: DDP
    keeps its own reference to the group, and a gloo group that outlives
    ``destroy_process_group`` until interpreter shutdown can abort the process at exit
    ("terminate called without an active exception"). The barrier makes sure no peer is
    still inside a collective when the group goes.
    """
    if info.distributed and dist.is_initialized():
        gc.collect()  # reference cycles that still hold the group
        dist.barrier()
        dist.destroy_process_group()

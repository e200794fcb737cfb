"""Data-parallel training from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

A plain ``python -m m2d pretrain`` is world size 1; ``torchrun --nproc_per_node N m2d pretrain``
starts N processes that join a process group (gloo on CPU, nccl on GPU). Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = 'cpu') -> DistEnv:
    """Join the process group when torchrun started us; pick this process's device."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {device}: CUDA is not available on this machine (use --device cpu)')
        if world > 1 or dev.index is None:
            dev = torch.device('cuda', local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == 'cuda' else None)
        log.info('rank %d/%d joined the %s process group on %s', rank, world, backend, dev)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(env: DistEnv) -> None:
    """Every process waits here for the others (nothing when alone)."""
    if env.distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group. A finished run has met in a `barrier` after its last checkpoint: a
    rank that tears down its gloo group while a peer still writes a checkpoint can abort at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_and_any(value: torch.Tensor, flag: bool, env: DistEnv) -> tuple[float, bool]:
    """The mean of a scalar tensor over all processes and whether any process's `flag` is set, in one
    all-reduce (a sum of ``[value, flag]``): the loop shares stop requests at no extra cost."""
    if not env.distributed:
        return value.item(), bool(flag)
    both = torch.stack([value.detach().float().reshape(()), value.new_tensor(float(flag), dtype=torch.float32)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    both[0] /= env.world_size  # in float32, as the mean was computed before
    mean, votes = both.tolist()  # one device sync
    return mean, votes > 0


def gather_errors(error: str | None, env: DistEnv) -> list[tuple[int, str]]:
    """Every process's `error` (None: no error), as (rank, message) pairs; every rank gets the same list,
    so all of them stop together, none waits in a later collective for one that has left."""
    if not env.distributed:
        return [(0, error)] if error else []
    errors: list[str | None] = [None] * env.world_size
    dist.all_gather_object(errors, error)
    return [(rank, e) for rank, e in enumerate(errors) if e]


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when alone)."""
    if not env.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can start mid-epoch and yields ``(epoch, index)`` keys.

    The key lets the dataset seed each item from (seed, epoch, index) (see `m2d.train.seeding`),
    so an item is the same whichever process or worker loads it, and whether or not the run
    was interrupted. ``set_epoch(epoch, start)`` skips the first `start` indices of this rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = int(start)

    def indices(self) -> np.ndarray:
        """This rank's indices of the epoch (int64), those of `DistributedSampler`: the seeded
        permutation padded cyclically to a multiple of the world size, every `num_replicas`-th."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        if self.drop_last:
            order = order[:self.total_size]
        elif self.total_size > n:
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # An array, not a list of 2 million Python ints and tuples: keys are made as they are taken.
        return _keys(self.epoch, self.indices()[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _keys(epoch: int, indices: np.ndarray, chunk: int = 4096) -> Iterator[tuple[int, int]]:
    for begin in range(0, len(indices), chunk):
        for i in indices[begin:begin + chunk].tolist():
            yield epoch, i

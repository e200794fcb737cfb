"""Per-item randomness: every random crop and mask depends only on (seed, epoch, index).

`SeededItems` wraps a dataset; item ``(epoch, i)`` is produced with the global torch, numpy and
``random`` generators seeded from ``(seed, epoch, i)``, and it gets its own
mask drawn from a generator with that seed. Hence:

- a run resumed mid-epoch sees exactly the samples and masks of an uninterrupted run;
- the result of a step does not depend on how the batch is split over processes or loader
  workers (one step of 8 samples on 1 process = 4 + 4 on 2 processes);
- masks are drawn in the loader workers, off the training step's critical path.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..masking import Mask

EVAL_EPOCH = 1_000_000  # the "epoch" of the fixed feature-evaluation sample


def _mix64(z: int) -> int:
    """SplitMix64's finalizer: a well-mixed 64-bit value from a 64-bit input."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_M64 = (1 << 64) - 1


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed from (seed, epoch, index, stream); distinct inputs give unrelated seeds."""
    z = _mix64(seed & _M64)
    for v in (epoch, index, stream):
        z = _mix64(z ^ (v & _M64))
    return z >> 1


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = 'cpu') -> torch.Generator:
    """A generator for randomness drawn per step (e.g. batch-level structured masks)."""
    return torch.Generator(device=device).manual_seed(item_seed(seed, rank, step, stream=7))


class SeededItems(Dataset):
    """A dataset view indexed by ``(epoch, index)`` keys (see `ResumableSampler`).

    Items become dicts: ``{'x': tensor, 'index': int, ...}`` (dataset dicts keep their keys), plus
    ``'ids_restore'`` ``[L]`` and ``'len_keep'`` when `mask_fn` is given. `mask_fn(generator)`
    draws one sample's `Mask` (batch of 1).
    """

    def __init__(self, dataset: Dataset, seed: int, mask_fn: Callable[[torch.Generator], Mask] | None = None):
        self.dataset = dataset
        self.seed = int(seed)
        self.mask_fn = mask_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (EVAL_EPOCH, key)
        s = item_seed(self.seed, epoch, index)
        # Reseed rather than save and restore (which costs ~10x more): in loader workers the global
        # generators serve only the items; in the main process (num_workers=0) training draws
        # nothing from them (masks come with the items or from `step_generator`).
        torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also queues CUDA seeding
        np.random.seed(s & 0xFFFFFFFF)
        random.seed(s)
        item = self.dataset[index]
        item = dict(item) if isinstance(item, dict) else {'x': item}
        item['index'] = index
        if self.mask_fn is not None:
            mask = self.mask_fn(torch.Generator().manual_seed(item_seed(self.seed, epoch, index, stream=1)))
            item['ids_restore'] = mask.ids_restore[0]
            item['len_keep'] = mask.len_keep
        return item

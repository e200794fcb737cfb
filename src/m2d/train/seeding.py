"""Per-item randomness: every random crop and mask depends only on (seed, epoch, index).

`SeededItems` wraps a dataset; item ``(epoch, i)`` is produced with the global torch, numpy and
``random`` generators seeded from ``(seed, epoch, i)``, and it gets its own
mask drawn from a generator with that seed. Hence:

- a run resumed mid-epoch sees exactly the samples and masks of an uninterrupted run;
- the result of a step does not depend on how the batch is split over processes or loader
  workers (one step of 8 samples on 1 process = 4 + 4 on 2 processes);
- masks are drawn in the loader workers, off the training step's critical path.

A batch of items (`SeededItems.__getitems__`, which PyTorch's loader calls) writes each crop
straight into its slot of one batch tensor (in shared memory inside a loader worker) when the
dataset can (`LMSDataset.item_into`); `collate` then hands that tensor on without the copy
``default_collate`` makes. The values are those of the items one by one.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

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


def freeze_inherited_objects(worker_id: int = 0) -> None:
    """A loader worker's init: move the objects inherited from the parent out of the garbage
    collector's reach (`gc.freeze`). A full collection in a forked worker otherwise writes to every
    inherited object's header and so copies their pages: ~37 MB private per worker measured here
    (benchmarks/scale.py), whatever the list length. Objects the worker makes are collected as usual."""
    gc.freeze()


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 batch; in a loader worker in shared memory, as ``default_collate`` makes it
    (the worker would otherwise copy it there to send it)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    elem = torch.empty(0, dtype=torch.float32)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


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
        self._mask_generator: torch.Generator | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_mask_generator': None}

    def __len__(self) -> int:
        return len(self.dataset)

    def _seed_globals(self, epoch: int, index: int) -> None:
        s = item_seed(self.seed, epoch, index)
        # Reseed rather than save and restore (which costs ~10x more): in loader workers the global
        # generators serve only the items; in the main process (num_workers=0) training draws
        # nothing from them (masks come with the items or from `step_generator`).
        torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also queues CUDA seeding
        np.random.seed(s & 0xFFFFFFFF)
        random.seed(s)

    def _add_mask(self, item: dict[str, Any], epoch: int, index: int) -> None:
        if self.mask_fn is None:
            return
        # One generator per process, reseeded per item: the same draws as a new one (manual_seed
        # resets its whole state), without building a generator per item.
        if self._mask_generator is None:
            self._mask_generator = torch.Generator()
        mask = self.mask_fn(self._mask_generator.manual_seed(item_seed(self.seed, epoch, index, stream=1)))
        item['ids_restore'] = mask.ids_restore[0]
        item['len_keep'] = mask.len_keep

    @staticmethod
    def _key(key: tuple[int, int] | int) -> tuple[int, int]:
        return key if isinstance(key, tuple) else (EVAL_EPOCH, key)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = self._key(key)
        self._seed_globals(epoch, index)
        item = self.dataset[index]
        item = dict(item) if isinstance(item, dict) else {'x': item}
        item['index'] = index
        self._add_mask(item, epoch, index)
        return item

    def __getitems__(self, keys: Sequence[tuple[int, int] | int]) -> list[dict[str, Any]]:
        """The items of `keys`; with a dataset that has ``item_into`` their 'x' are the consecutive
        slots of one batch tensor (see `collate`)."""
        item_into = getattr(self.dataset, 'item_into', None)
        if item_into is None or not keys:
            return [self[k] for k in keys]
        items, batch = [], None
        for b, key in enumerate(keys):
            epoch, index = self._key(key)
            self._seed_globals(epoch, index)
            if batch is None:
                first = item_into(index)
                batch = _batch_tensor((len(keys), *first.shape))
                x = batch[0].copy_(first)
            else:
                x = item_into(index, batch[b])
            item = {'x': x, 'index': index}
            self._add_mask(item, epoch, index)
            items.append(item)
        return items


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except that 'x' tensors which already are the consecutive slots of one
    batch tensor (`SeededItems.__getitems__`) are handed on as that tensor, not copied."""
    batch = _whole_batch([it.get('x') for it in items]) if items and isinstance(items[0], dict) else None
    if batch is None:
        return default_collate(items)
    rest = default_collate([{k: v for k, v in it.items() if k != 'x'} for it in items])
    return {k: batch if k == 'x' else rest[k] for k in items[0]}


def _whole_batch(xs: list) -> torch.Tensor | None:
    """The tensor ``[len(xs), ...]`` whose slots the `xs` are, in order, or None."""
    x0 = xs[0]
    if not isinstance(x0, torch.Tensor) or not x0.is_contiguous():
        return None
    storage, n = x0.untyped_storage(), x0.numel()
    if x0.storage_offset() != 0 or storage.nbytes() != len(xs) * n * x0.element_size():
        return None
    for b, x in enumerate(xs):
        if (not isinstance(x, torch.Tensor) or x.untyped_storage().data_ptr() != storage.data_ptr()
                or x.storage_offset() != b * n or x.shape != x0.shape or x.dtype != x0.dtype or not x.is_contiguous()):
            return None
    return x0.new_empty(0).set_(storage, 0, (len(xs), *x0.shape))

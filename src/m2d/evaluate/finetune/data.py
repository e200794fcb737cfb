"""Clips of a fine-tuning run: what serves as validation, waveforms and targets, loaders, the audio cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..tasks import Clip, Task, carve_stratified_valid, load_clip
from .settings import FinetuneError

log = logging.getLogger(__name__)

CACHE_BYTES = 4 << 30  # train/valid/test waveforms kept in memory up to this size; read per batch beyond

AudioCache = dict[tuple[str, bool], np.ndarray]  # (path, whole file?) -> waveform; shared by the folds of a task


@dataclass
class Splits:
    """The clips a run trains, validates and tests on, and where its validation clips come from:
    ``'valid'`` (the task's own), ``'carved'`` (``--valid_fraction`` of train) or ``'test'`` (EVAR's
    fallback when a task has no valid split: the test score is then the best of the epochs' test
    scores, an optimistic number)."""

    train: list[Clip]
    valid: list[Clip]
    test: list[Clip]
    validation: str

    @property
    def valid_is_test(self) -> bool:
        return self.validation == 'test'


def choose_splits(task: Task, valid_fraction: float | None, seed: int) -> Splits:
    """The task's train/valid/test clips; without a valid split, validate on test (EVAR) or, with
    `valid_fraction`, on a stratified part of train carved with `seed`."""
    if task.split('valid'):
        if valid_fraction is not None:
            raise FinetuneError(f'--valid_fraction {valid_fraction}: {task.name} has its own valid split '
                                f'({len(task.split("valid"))} clips); the option is for tasks without one')
        return Splits(task.split('train'), task.split('valid'), task.split('test'), 'valid')
    if valid_fraction is None:
        return Splits(task.split('train'), task.split('test'), task.split('test'), 'test')
    clips = carve_stratified_valid(task.clips, seed, valid_fraction)
    by = {k: [c for c in clips if c.split == k] for k in ('train', 'valid', 'test')}
    if not by['valid']:
        raise FinetuneError(f'--valid_fraction {valid_fraction}: carves no clip from the {len(by["train"])} '
                            'train clips; use a larger fraction')
    return Splits(by['train'], by['valid'], by['test'], 'carved')


class ClipData(torch.utils.data.Dataset):
    """Waveforms ``[unit_samples]`` and float targets ``[C]`` of a split.

    Train clips (``random_crop``) are read whole and cropped at a random place each time (short
    ones zero-padded); others are cropped from the start (`load_clip`). With a `cache` dict, audio
    read once is kept there (the same dict may serve several runs over the same clips).
    """

    def __init__(self, clips: list[Clip], targets: np.ndarray, sample_rate: int, unit_samples: int,
                 random_crop: bool, cache: AudioCache | None):
        self.clips, self.targets = clips, torch.from_numpy(targets.astype(np.float32))
        self.sample_rate, self.unit_samples, self.random_crop = sample_rate, unit_samples, random_crop
        self.cache = cache

    def __len__(self) -> int:
        return len(self.clips)

    def _read(self, i: int) -> np.ndarray:
        key = (str(self.clips[i].path), self.random_crop)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        from ...audio import load_audio

        path = self.clips[i].path
        wav = load_audio(path, self.sample_rate) if self.random_crop else load_clip(path, self.sample_rate,
                                                                                     self.unit_samples)
        if self.cache is not None:
            self.cache[key] = wav
        return wav

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        wav = self._read(i)
        n = self.unit_samples
        if len(wav) > n:
            # EVAR's start in [0, len - n); torch's RNG: seeded by the run, differently in each worker
            start = int(torch.randint(0, len(wav) - n, ())) if self.random_crop else 0
            wav = wav[start:start + n]
        elif len(wav) < n:
            wav = np.pad(wav, (0, n - len(wav)))
        return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), self.targets[i]

    def keep(self, indices: list[int]) -> None:
        """Keep only the clips at `indices` (in that order)."""
        self.clips = [self.clips[i] for i in indices]
        self.targets = self.targets[indices]


def one_hot_targets(task: Task, clips: list[Clip]) -> np.ndarray:
    """``[N, C]`` float32 targets: one-hot, or multi-hot for a multi-label task."""
    y = task.targets(clips)
    if task.multilabel:
        return y.astype(np.float32)
    return np.eye(len(task.classes), dtype=np.float32)[y]


def make_loader(data: ClipData, batch_size: int, shuffle: bool, seed: int, workers: int):
    """A DataLoader over `data` (shuffled with `seed` for training). EVAR keeps a short last batch;
    a last batch of one clip is dropped, as BatchNorm cannot train on it."""
    gen = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(data) > batch_size and len(data) % batch_size == 1
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=workers, drop_last=drop_last)


def preload(data: ClipData, name: str, progress: bool, threads: int = 4) -> list[tuple[str, str]]:
    """Read every clip of `data` once into its cache (a few reader threads); unreadable clips are
    dropped from `data` with a warning and returned as (path, reason)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from ...audio import AudioError

    def read(i: int) -> str | None:
        try:
            data._read(i)
            return None
        except AudioError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = list(tqdm(pool.map(read, range(len(data))), total=len(data), desc=f'reading {name}', leave=False,
                           disable=not progress, unit='clip'))
    failed = [(str(data.clips[i].path), e) for i, e in enumerate(errors) if e is not None]
    if failed:
        keep = [i for i, e in enumerate(errors) if e is None]
        log.warning('%s: skipped %d unreadable clip(s) of %d (first: %s)', name, len(failed), len(data), failed[0][1])
        if not keep:
            raise FinetuneError(f'the {name} split: none of its {len(failed)} clips could be read ({failed[0][1]})')
        data.keep(keep)
    return failed


def split_data(task: Task, splits: Splits, sample_rate: int, unit_samples: int, workers: int,
               cache: AudioCache | None, progress: bool) -> tuple[dict[str, ClipData], dict[str, list[tuple[str, str]]]]:
    """`ClipData` per split (``valid`` is the test data when validating on test) and the unreadable clips
    skipped per split. Without workers and when the clips fit in `CACHE_BYTES`, every clip is read
    now into `cache` (a new dict when None), so a fold run reuses what the runs before it read."""
    clips = {'train': splits.train, 'test': splits.test, **({} if splits.valid_is_test else {'valid': splits.valid})}
    fits = workers == 0 and sum(len(v) for v in clips.values()) * unit_samples * 4 <= CACHE_BYTES
    cache = (cache if cache is not None else {}) if fits else None
    data = {k: ClipData(v, one_hot_targets(task, v), sample_rate, unit_samples, random_crop=(k == 'train'), cache=cache)
            for k, v in clips.items()}
    skipped = {k: preload(d, k, progress) for k, d in data.items()} if cache is not None else {}
    data['valid'] = data.get('valid', data['test'])
    return data, skipped

"""Clips of a fine-tuning run: what serves as validation, waveforms and targets, loaders, the audio cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...data.pathtable import PathTable
from ...train.seeding import freeze_inherited_objects
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
    """Clips of a split and their float targets ``[C]``, without one Python object per clip.

    File names are a `PathTable` (two numpy buffers) and labels two numpy arrays (class ids back to
    back, and where each clip's ids end), so DataLoader workers forked from the process touch no
    per-clip object (AudioSet's 2M clips: ~30 MB here, not GBs of copied pages). A clip is a waveform
    ``[unit_samples]`` (audio files) or, for a ``.npy`` file (EVAR's ``as`` task with ``--data_path``:
    log-mel ``[F, T]`` or ``[1, F, T]``), a log-mel ``[F, unit_frames]`` cropped or zero-padded in
    frames as EVAR's ``ASSpectrogramDataset`` does. Train clips (``random_crop``) are cropped at a
    random place each time (EVAR's start in ``[0, len - unit)``), others from the start. With a `cache`
    dict, what is read once is kept there (the same dict may serve several runs over the same clips).
    """

    def __init__(self, paths: PathTable, label_ids: np.ndarray, label_ends: np.ndarray, num_classes: int,
                 sample_rate: int, unit_samples: int, random_crop: bool, cache: AudioCache | None,
                 unit_frames: int | None = None):
        self.paths = paths
        self.label_ids = np.asarray(label_ids, dtype=np.int32)
        self.label_ends = np.asarray(label_ends, dtype=np.int64)
        self.num_classes = num_classes
        self.sample_rate, self.unit_samples, self.random_crop = sample_rate, unit_samples, random_crop
        self.unit_frames = unit_frames
        self.cache = cache

    @classmethod
    def from_clips(cls, task: Task, clips: list[Clip], sample_rate: int, unit_samples: int, random_crop: bool,
                   cache: AudioCache | None, unit_frames: int | None = None) -> 'ClipData':
        """The clips of one split of `task`."""
        ids, ends = label_arrays(task, clips)
        return cls(PathTable.from_names(str(c.path) for c in clips), ids, ends, len(task.classes), sample_rate,
                   unit_samples, random_crop, cache, unit_frames)

    def __len__(self) -> int:
        return len(self.paths)

    def labels_of(self, i: int) -> np.ndarray:
        """Class ids of clip `i`."""
        return self.label_ids[(self.label_ends[i - 1] if i else 0):self.label_ends[i]]

    def target(self, i: int) -> torch.Tensor:
        """Float target ``[C]`` of clip `i`: one-hot, or multi-hot for a multi-label task."""
        y = torch.zeros(self.num_classes, dtype=torch.float32)
        y[torch.from_numpy(self.labels_of(i).astype(np.int64))] = 1.0
        return y

    def _read(self, i: int) -> np.ndarray:
        path = self.paths[i]
        key = (path, self.random_crop)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        if path.endswith('.npy'):
            wav = read_lms(path)
        else:
            from ...audio import load_audio

            wav = load_audio(path, self.sample_rate) if self.random_crop else load_clip(path, self.sample_rate,
                                                                                         self.unit_samples)
        if self.cache is not None:
            self.cache[key] = wav
        return wav

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._read(i)
        n = self.unit_samples if x.ndim == 1 else (self.unit_frames or x.shape[-1])
        length = x.shape[-1]
        if length > n:
            # EVAR's start in [0, len - n); torch's RNG: seeded by the run, differently in each worker
            start = int(torch.randint(0, length - n, ())) if self.random_crop else 0
            x = x[..., start:start + n]
        elif length < n:
            x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - length)])
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.target(i)

    def keep(self, indices: list[int]) -> None:
        """Keep only the clips at `indices` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        parts = [self.labels_of(int(i)) for i in idx]
        self.label_ids = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        self.label_ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
        self.paths = self.paths.take(idx)


def read_lms(path: str) -> np.ndarray:
    """A log-mel clip saved as .npy (``[F, T]`` or ``[1, F, T]``, as the reference's ``wav_to_lms.py``
    writes them) -> float32 ``[F, T]``."""
    from ...audio import AudioError

    try:
        x = np.load(path)
    except (OSError, ValueError) as e:
        raise AudioError(f'{path}: not a readable .npy log-mel clip ({e})') from None
    x = np.asarray(x, dtype=np.float32)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise AudioError(f'{path}: a log-mel clip must be [F, T] or [1, F, T], got shape {x.shape}')
    return x


def label_arrays(task: Task, clips: list[Clip]) -> tuple[np.ndarray, np.ndarray]:
    """Class ids of `clips` back to back (int32) and where each clip's ids end (int64)."""
    index = {c: i for i, c in enumerate(task.classes)}
    ids = np.fromiter((index[label] for c in clips for label in c.labels), dtype=np.int32)
    ends = np.cumsum(np.fromiter((len(c.labels) for c in clips), dtype=np.int64, count=len(clips)), dtype=np.int64)
    return ids, ends


def audioset_sample_weights(label_ids: np.ndarray, label_ends: np.ndarray, count_offset: float = 0.01) -> np.ndarray:
    """Per-clip sampling weights of AudioSet fine-tuning: ``(Σ_labels 1000 / (n_label + offset)) ** (1/1.5)``,
    with ``n_label`` the number of clips of each label in the list.

    The formula of AudioMAE's ``gen_weight.py`` as EVAR's ``evar/utils/make_as_metadata.py`` writes it
    into ``evar/metadata/weight_as.csv`` (offset 0.01; computed over the train split), the file EVAR's
    ``as`` task samples by; nttcslab/m2d's ``util/make_as_weighted_list.py`` uses offset 100 for its
    M2D-AS pre-training list.
    """
    label_ids = np.asarray(label_ids, dtype=np.int64)
    counts = np.bincount(label_ids, minlength=int(label_ids.max()) + 1 if label_ids.size else 0)
    label_weight = 1000.0 / (counts + count_offset)
    ends = np.asarray(label_ends, dtype=np.int64)
    lengths = np.diff(ends, prepend=0)
    clip_of_label = np.repeat(np.arange(len(ends)), lengths)
    # per clip, its labels' weights summed in order (as EVAR's loop does)
    sums = np.bincount(clip_of_label, weights=label_weight[label_ids], minlength=len(ends))
    return np.power(sums, 1.0 / 1.5)


class WeightedEpochSampler(torch.utils.data.Sampler):
    """`num_samples` clip indices per epoch drawn by weight without replacement (torch's
    ``WeightedRandomSampler(weights, num_samples, replacement=False)``, as EVAR's ``as`` task); a
    seeded generator, so a run is reproducible."""

    def __init__(self, weights: np.ndarray, num_samples: int, generator: torch.Generator):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.num_samples = min(int(num_samples), len(self.weights))
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        yield from torch.multinomial(self.weights, self.num_samples, replacement=False,
                                     generator=self.generator).tolist()


def make_loader(data: ClipData, batch_size: int, shuffle: bool, seed: int, workers: int, weighted_sampling: int = 0):
    """A DataLoader over `data` (shuffled with `seed` for training; with `weighted_sampling` N, N clips
    per epoch drawn by `audioset_sample_weights`, as EVAR's ``as`` task). EVAR keeps a short last
    batch; a last batch of one clip is dropped, as BatchNorm cannot train on it."""
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if shuffle and weighted_sampling:
        sampler = WeightedEpochSampler(audioset_sample_weights(data.label_ids, data.label_ends), weighted_sampling, gen)
        shuffle = False
    n = len(sampler) if sampler is not None else len(data)
    drop_last = (shuffle or sampler is not None) and n > batch_size and n % batch_size == 1
    # workers keep the objects they inherit out of their collector's reach, so those pages stay shared
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       generator=None if sampler is not None else gen, num_workers=workers,
                                       drop_last=drop_last,
                                       worker_init_fn=freeze_inherited_objects if workers else None)


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
    failed = [(data.paths[i], e) for i, e in enumerate(errors) if e is not None]
    if failed:
        keep = [i for i, e in enumerate(errors) if e is None]
        log.warning('%s: skipped %d unreadable clip(s) of %d (first: %s)', name, len(failed), len(data), failed[0][1])
        if not keep:
            raise FinetuneError(f'the {name} split: none of its {len(failed)} clips could be read ({failed[0][1]})')
        data.keep(keep)
    return failed


def split_data(task: Task, splits: Splits, sample_rate: int, unit_samples: int, workers: int,
               cache: AudioCache | None, progress: bool,
               unit_frames: int | None = None) -> tuple[dict[str, ClipData], dict[str, list[tuple[str, str]]]]:
    """`ClipData` per split (``valid`` is the test data when validating on test) and the unreadable clips
    skipped per split. Without workers and when the clips fit in `CACHE_BYTES`, every clip is read
    now into `cache` (a new dict when None), so a fold run reuses what the runs before it read."""
    clips = {'train': splits.train, 'test': splits.test, **({} if splits.valid_is_test else {'valid': splits.valid})}
    fits = workers == 0 and sum(len(v) for v in clips.values()) * unit_samples * 4 <= CACHE_BYTES
    cache = (cache if cache is not None else {}) if fits else None
    data = {k: ClipData.from_clips(task, v, sample_rate, unit_samples, random_crop=(k == 'train'), cache=cache,
                                   unit_frames=unit_frames) for k, v in clips.items()}
    skipped = {k: preload(d, k, progress) for k, d in data.items()} if cache is not None else {}
    data['valid'] = data.get('valid', data['test'])
    return data, skipped

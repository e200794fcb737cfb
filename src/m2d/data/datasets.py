"""Training datasets over prepared log-mel `.npy` files (``[1, 80, T]``).

- `LMSDataset`: crop (random or from the start) to `crop_frames`, zero-pad on the right (or repeat
  short clips), normalize with (mean, std). Names are held in a `PathTable` (no Python object per
  file); float16 files are read as their exact float32 values.
- `compute_norm_stats`: mean and std (+ eps) of ~10,000 random crops, as the reference computes
  before training (a quirk kept on purpose: the zero padding of short clips counts).
- `NoiseMixDataset`: M2D-S background-noise mixing in the linear power domain.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .filelist import DataError, resolve_list
from .npyread import NpyReader
from .pathtable import PathTable
from .stats import RunningStats

log = logging.getLogger(__name__)

EPS = float(torch.finfo(torch.float32).eps)


def inflate_files(files: Sequence, min_size: int) -> Sequence:
    """Repeat a list cyclically up to `min_size` items (the reference's `--min_ds_size`); a
    `PathTable` stays one (`PathTable.repeat_to`), anything else becomes a list."""
    if isinstance(files, PathTable):
        return files.repeat_to(min_size)
    files = list(files)
    if not files or len(files) >= min_size:
        return files
    return [files[i % len(files)] for i in range(min_size)]


def _resolve_files(files: str | Path | Sequence[str | Path],
                   data_root: str | Path | None) -> tuple[PathTable, Path | None]:
    if isinstance(files, (str, Path)):
        return resolve_list(files, data_root)
    if isinstance(files, PathTable):
        return files, None if data_root is None else Path(data_root)
    return PathTable.from_names(str(f) for f in files), None if data_root is None else Path(data_root)


_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class LMSDataset(Dataset):
    """Log-mel `.npy` files as float32 tensors ``[1, 80, crop_frames]``.

    files: paths, a CSV list (column `file_name`) or a folder of `.npy`. data_root: the folder the
    names are relative to (for a CSV: guessed from the CSV's place when None). norm_stats: (mean, std)
    applied as ``(x - mean) / std``; None leaves values as they are (see `compute_norm_stats`).
    random_crop: crop at a random start (else from the start). repeat_short: repeat clips shorter
    than `crop_frames` instead of zero padding. min_ds_size: repeat the list up to this length.
    Files may be float32 or float16 (values read as float32, exactly).
    """

    def __init__(self, files: str | Path | Sequence[str | Path], data_root: str | Path | None = None,
                 crop_frames: int = 608, norm_stats: Sequence[float] | None = None, random_crop: bool = True,
                 repeat_short: bool = False, min_ds_size: int = 0):
        if crop_frames <= 0:
            raise ValueError(f'crop_frames={crop_frames}: must be positive')
        names, self.data_root = _resolve_files(files, data_root)
        if not names:
            raise DataError(f'{files if isinstance(files, (str, Path)) else "files"}: the file list is empty')
        self.original_size = len(names)
        self.files = inflate_files(names, min_ds_size)
        if len(self.files) > len(names):
            log.info('file list inflated from %d to %d items (min_ds_size)', len(names), len(self.files))
        self.crop_frames = int(crop_frames)
        self.norm_stats = None if norm_stats is None else (float(norm_stats[0]), float(norm_stats[1]))
        self.random_crop = random_crop
        self.repeat_short = repeat_short
        self.last_crop_start = 0
        self._reader = NpyReader()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        name = Path(self.files[index])
        return name if self.data_root is None else self.data_root / name

    def load(self, index: int) -> torch.Tensor:
        """The whole LMS of item `index` as float32 ``[1, F, T]``."""
        path = self.path(index)
        try:
            lms = np.load(path)
        except Exception as e:
            raise OSError(f'{path}: cannot load the log-mel file ({e})') from e
        if lms.ndim == 2:
            lms = lms[None]
        if lms.ndim != 3:
            raise ValueError(f'{path}: expected a log-mel array [1, F, T], got shape {lms.shape}')
        return torch.from_numpy(np.ascontiguousarray(lms, dtype=np.float32))

    def crop(self, lms: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop or pad ``[..., T]`` to `crop_frames` (repeat-padding or zero-padding on the right)."""
        n, length = self.crop_frames, lms.shape[-1]
        if self.repeat_short and 0 < length < n:
            lms = lms.repeat(*([1] * (lms.dim() - 1)), math.ceil(n / length))
            length = lms.shape[-1]
        start = 0
        if length > n and self.random_crop:
            start = int(torch.randint(0, length - n + 1, (1,), generator=generator))
        self.last_crop_start = start
        lms = lms[..., start:start + n]
        if lms.shape[-1] < n:
            lms = torch.nn.functional.pad(lms, (0, n - lms.shape[-1]))
        return lms.contiguous()

    def raw_item(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cropped, not normalized."""
        src = self._fast_crop(index, generator)
        if src is None:
            return self.crop(self.load(index), generator)
        return torch.empty(src.shape, dtype=torch.float32).copy_(torch.from_numpy(src))

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        if self.norm_stats is None:
            return lms
        mean, std = self.norm_stats
        return (lms - mean) / std

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.item_into(index)

    def item_into(self, index: int, out: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Item `index` (cropped and normalized, as ``normalize(raw_item(index))``, bit for bit),
        written into `out` (float32, contiguous, e.g. a slot of a batch) when given.

        The common case, a float32 or float16 file at least a crop long, is read into a reused
        buffer (`NpyReader`), cropped, converted and normalized in one pass into `out`; the rest
        (short clips, other dtypes, unreadable files and their errors) takes the `raw_item` path.
        """
        src = self._fast_crop(index, generator)
        if src is None:
            x = self.normalize(self.crop(self.load(index), generator))
            return x if out is None else out.copy_(x)
        if out is None:
            out = torch.empty(src.shape, dtype=torch.float32)
        elif tuple(out.shape) != src.shape:
            raise ValueError(f'{self.path(index)}: item shape {src.shape} differs from the batch\'s {tuple(out.shape)}')
        out.copy_(torch.from_numpy(src))  # float16 -> float32 is exact (and vectorized in torch, not numpy)
        if self.norm_stats is not None:  # the kernels of ``(x - mean) / std``, in place
            mean, std = self.norm_stats
            out.sub_(mean).div_(std)
        return out

    def _fast_crop(self, index: int, generator: torch.Generator | None) -> np.ndarray | None:
        """The crop of item `index` as a view of the reader's buffer, drawing the crop start as
        `crop` does; None when the file needs the general path (nothing drawn then)."""
        name = self.files[index]
        try:  # os.path.join: the path `path()` gives, without building Path objects
            arr = self._reader.read(name if self.data_root is None else os.path.join(self.data_root, name))
        except OSError:
            return None
        n = self.crop_frames
        if arr is None or arr.ndim not in (2, 3) or arr.dtype not in _FAST_DTYPES or arr.shape[-1] < n:
            return None
        if arr.ndim == 2:
            arr = arr[None]
        length, start = arr.shape[-1], 0
        if length > n and self.random_crop:
            start = int(torch.randint(0, length - n + 1, (1,), generator=generator))
        self.last_crop_start = start
        return arr[..., start:start + n]

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(files={len(self)}, crop_frames={self.crop_frames}, '
                f'random_crop={self.random_crop}, repeat_short={self.repeat_short}, norm_stats={self.norm_stats})')


def compute_norm_stats(dataset_or_files: LMSDataset | str | Path | Sequence[str | Path], n_samples: int = 10000,
                       crop_frames: int = 608, seed: int = 0, data_root: str | Path | None = None,
                       progress: bool = False) -> tuple[float, float]:
    """(mean, std + eps) over all values of `n_samples` crops of randomly drawn items (with
    replacement), as the reference computes normalization statistics (std unbiased; zero padding of
    short clips counts). Streams, so memory stays bounded. `crop_frames` and `data_root` apply
    when files are given; a dataset uses its own settings."""
    from tqdm import tqdm

    ds = dataset_or_files if isinstance(dataset_or_files, LMSDataset) else \
        LMSDataset(dataset_or_files, data_root=data_root, crop_frames=crop_frames)
    if n_samples <= 0:
        raise ValueError(f'n_samples={n_samples}: must be positive')
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    acc = RunningStats()
    for i in tqdm(rng.integers(0, len(ds), size=n_samples), desc='norm stats', unit='crop', disable=not progress):
        acc.update(ds.raw_item(int(i), gen).numpy())
    mean, std = acc.mean, acc.std(ddof=1)
    log.info('normalization statistics from %d crops: mean %.6f, std %.6f', n_samples, mean, std)
    return float(mean), float(std) + EPS


def log_mix_exp(noise: torch.Tensor, clean: torch.Tensor, ratio: float) -> torch.Tensor:
    """``log(max(ratio·exp(noise) + (1 - ratio)·exp(clean), eps))``: mixing in the linear power domain."""
    mixed = ratio * noise.exp() + (1.0 - ratio) * clean.exp()
    return torch.log(torch.clamp(mixed, min=torch.finfo(mixed.dtype).eps))


class NoiseMixDataset(Dataset):
    """M2D-S denoising input: item ``{'clean': clean / std, 'x': mix(noise, clean) / std}``.

    clean, noise: `LMSDataset`s (or anything `LMSDataset` accepts; the noise set then repeats short
    clips). Each set is mean-subtracted with its own mean (computed from `n_norm_samples` crops when
    the set has no `norm_stats`); both outputs are divided by the clean set's std. The noise item is
    drawn uniformly per item from torch's global generator, which the trainer seeds per sample, so
    a resumed run mixes the same noise as an uninterrupted one. `norm_stats` is the
    clean set's (mean, std), the statistics to store with the model. The datasets given are changed
    in place (their std is set to 1), as the reference does.
    """

    def __init__(self, clean, noise=None, noise_ratio: float = 0.2, n_norm_samples: int = 5000, seed: int = 0,
                 crop_frames: int = 608, data_root: str | Path | None = None):
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError(f'noise_ratio={noise_ratio}: must be in [0, 1]')
        self.clean = clean if isinstance(clean, LMSDataset) else \
            LMSDataset(clean, data_root=data_root, crop_frames=crop_frames)
        if self.clean.norm_stats is None:
            self.clean.norm_stats = compute_norm_stats(self.clean, n_norm_samples, seed=seed)
        self.norm_stats = self.clean.norm_stats
        self.std = self.norm_stats[1]
        self.clean.norm_stats = (self.norm_stats[0], 1.0)  # mean-subtract only; scale below
        self.noise_ratio = float(noise_ratio)
        self.noise = None
        if noise is not None and noise_ratio > 0:
            self.noise = noise if isinstance(noise, LMSDataset) else \
                LMSDataset(noise, data_root=data_root, crop_frames=self.clean.crop_frames, repeat_short=True)
            if self.noise.crop_frames != self.clean.crop_frames:
                raise ValueError(f'crop_frames differ: clean {self.clean.crop_frames}, noise {self.noise.crop_frames}')
            if self.noise.norm_stats is None:
                self.noise.norm_stats = compute_norm_stats(self.noise, n_norm_samples, seed=seed + 1)
            self.noise.norm_stats = (self.noise.norm_stats[0], 1.0)

    def __len__(self) -> int:
        return len(self.clean)

    def next_noise_index(self) -> int:
        """A uniformly drawn noise item (no state kept between items: resumable and worker-independent)."""
        return int(torch.randint(len(self.noise), ()))

    def mix(self, clean: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The mixture of mean-subtracted clean and noise LMS (before the division by std)."""
        if noise is None or self.noise_ratio == 0:
            return clean.clone()
        if self.noise_ratio >= 1.0:
            return noise.clone()
        return log_mix_exp(noise, clean, self.noise_ratio)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clean = self.clean[index]
        noise = self.noise[self.next_noise_index()] if self.noise is not None else None
        mixed = self.mix(clean, noise)
        return {'clean': clean / self.std, 'x': mixed / self.std}

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(clean={self.clean!r}, noise={self.noise!r}, noise_ratio={self.noise_ratio}, '
                f'norm_stats={self.norm_stats})')

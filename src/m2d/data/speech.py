"""Speech datasets for M2D-S / M2D-X: LMS crops with aligned teacher features and background noise.

M2D-S items are dicts (the trainer's contract):

- ``'x'``: the model input ``[1, 80, crop_frames]``: clean speech with background noise mixed in
  (METHOD.md "Noise mixing"), normalized with the clean set's statistics;
- ``'clean'``: the same crop without noise, normalized;
- ``'target_offline'``: teacher features of the clean crop, one vector per time patch
  ``[crop_frames // patch_width, D]`` (M2D-S; M2D-X computes it at training time from 'clean').

Teacher features are at 50 Hz, half the LMS frame rate (100 Hz): LMS frames ``2k, 2k+1`` belong to
teacher frame ``k``. A crop therefore starts at an even LMS frame, and an 80x4 patch (4 frames)
gets the mean of its 2 teacher frames, an 80x2 patch exactly one. (The reference draws any LMS
start ``j`` and uses teacher frame ``j // 2``, half a teacher frame off for odd ``j``.) As in the
reference, crops start within the valid teacher frames (``arr_2``, at least one crop's worth), so
the zero padding of short clips is only reached by clips shorter than a crop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..normstats import parse_mean_std
from .datasets import EPS, LMSDataset, NoiseMixDataset, compute_norm_stats, inflate_files, log_mix_exp
from .filelist import DataError, guess_data_root, read_file_list
from .pathtable import PathTable
from .stats import RunningStats

log = logging.getLogger(__name__)

TEACHER_HOP = 2  # LMS frames (100 Hz) per teacher frame (50 Hz)
N_NORM_SAMPLES = 5000  # crops used for each set's statistics when noise is mixed in, as the reference


class SpeechTeacherDataset(Dataset):
    """``.npz`` files (``arr_0`` LMS ``[1, 80, T]``, ``arr_1`` teacher ``[1, T2, D]``, ``arr_2`` valid T2)
    cropped together; item = dict 'x', 'clean' (normalized LMS ``[1, 80, crop_frames]``) and
    'target_offline' ``[crop_frames // patch_width, D]``.

    Args:
        files: CSV (column ``file_name``) or list of ``.npz`` paths, relative to `data_root` (held
            in a `PathTable`: no Python object per name).
        crop_frames: LMS frames per item (a multiple of `patch_width`).
        patch_width: LMS frames per time patch (even: 2 -> 1 teacher frame per patch, 4 -> 2 averaged).
        norm_stats: (mean, std) of the clean LMS; None computes them from random crops.
        random_crop: random crop start (even frame) within the valid part, else from the start.
        min_ds_size: repeat the list up to this many items per epoch.
        noise: optional background noise: an `LMSDataset` (its raw crops are used) or a list/CSV of
            LMS ``.npy`` files (read with `LMSDataset`, short clips repeated).
        noise_ratio: α of the mixture ``log(α·exp(noise) + (1 − α)·exp(clean))``.
        noise_norm_stats: (mean, std) of the noise set; None computes them.
    """

    def __init__(self, files: str | Path | Sequence[str | Path], data_root: str | Path | None = None,
                 crop_frames: int = 208, patch_width: int = 4, norm_stats: Sequence[float] | None = None,
                 random_crop: bool = True, min_ds_size: int = 0, noise: LMSDataset | str | Path | Sequence | None = None,
                 noise_ratio: float = 0.2, noise_norm_stats: Sequence[float] | None = None,
                 n_norm_samples: int = N_NORM_SAMPLES):
        if patch_width < TEACHER_HOP or patch_width % TEACHER_HOP:
            raise ValueError(f'patch_width={patch_width}: must be a multiple of {TEACHER_HOP} LMS frames '
                             '(teacher features are at half the LMS frame rate)')
        if crop_frames % patch_width:
            raise ValueError(f'crop_frames={crop_frames} is not a multiple of patch_width={patch_width}')
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError(f'noise_ratio={noise_ratio} must be in [0, 1]')
        noise_root = data_root  # None: the noise list's own place decides (LMSDataset guesses)
        if isinstance(files, (str, Path)):
            listed = read_file_list(files)
            data_root = data_root if data_root is not None else guess_data_root(files, listed)
        else:
            listed = PathTable.from_names(str(f) for f in files)
        if not listed:
            raise DataError(f'{files if isinstance(files, (str, Path)) else "files"}: the file list is empty')
        self.data_root = Path(data_root) if data_root is not None else None
        self.original_size = len(listed)
        self.files = inflate_files(listed, min_ds_size)
        self.crop_frames = crop_frames
        self.patch_width = patch_width
        self.teacher_frames = crop_frames // TEACHER_HOP
        self.random_crop = random_crop
        self.noise_ratio = float(noise_ratio)
        if noise is not None and not isinstance(noise, LMSDataset):
            noise = LMSDataset(noise, data_root=noise_root, crop_frames=crop_frames, norm_stats=None,
                               random_crop=random_crop, repeat_short=True)
        self.noise = noise if noise is not None and self.noise_ratio > 0 else None
        if norm_stats is None:
            norm_stats = self.compute_norm_stats(n_norm_samples)
        self.norm_stats = (float(norm_stats[0]), float(norm_stats[1]))
        if self.noise is not None and noise_norm_stats is None:
            noise_norm_stats = self.noise.norm_stats or compute_norm_stats(self.noise, n_samples=n_norm_samples, seed=1)
        self.noise_norm_stats = None if noise_norm_stats is None else (float(noise_norm_stats[0]),
                                                                       float(noise_norm_stats[1]))

    def __len__(self) -> int:
        return len(self.files)

    def compute_norm_stats(self, n_samples: int = N_NORM_SAMPLES, seed: int = 0) -> tuple[float, float]:
        """(mean, std + eps) of the LMS values of `n_samples` random crops (files drawn with replacement),
        as `m2d.data.datasets.compute_norm_stats` does for plain LMS files."""
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(int(seed))
        acc = RunningStats()
        for i in rng.integers(0, len(self), size=n_samples):
            acc.update(self.crop(*self.load(int(i)), generator=gen)[0].numpy())
        mean, std = float(acc.mean), acc.std(ddof=1) + EPS
        log.info('speech set statistics from %d crops: mean %.4f, std %.4f', n_samples, mean, std)
        return mean, std

    def path(self, index: int) -> Path:
        f = Path(self.files[index])
        return self.data_root / f if self.data_root is not None and not f.is_absolute() else f

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Raw LMS ``[1, 80, T]``, teacher ``[T2, D]`` (float32) and the valid teacher length of one file."""
        path = self.path(index)
        try:
            with np.load(path) as z:
                lms, emb, valid = z['arr_0'], z['arr_1'], int(z['arr_2'])
        except Exception as e:
            raise OSError(f'{path}: cannot read a speech .npz (arr_0 LMS, arr_1 teacher, arr_2 length): {e}') from e
        if lms.ndim == 2:
            lms = lms[None]
        if emb.ndim == 3:
            emb = emb[0]
        if lms.ndim != 3 or emb.ndim != 2:
            raise ValueError(f'{path}: expected arr_0 [1, 80, T] and arr_1 [1, T2, D], got '
                             f'{lms.shape} and {emb.shape}')
        return torch.from_numpy(lms.astype(np.float32)), torch.from_numpy(emb.astype(np.float32)), valid

    def crop(self, lms: torch.Tensor, emb: torch.Tensor, valid: int,
             start: int | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop ``crop_frames`` LMS frames and the matching teacher frames, averaged per patch.

        The crop start (teacher frame `start`, LMS frame ``2 * start``) is drawn within the valid
        teacher frames (at least one crop's worth, as the reference). Returns the raw LMS crop
        ``[1, 80, crop_frames]`` and ``[crop_frames // patch_width, D]``.
        """
        n = self.teacher_frames
        usable = min(max(valid, n), emb.shape[0], lms.shape[-1] // TEACHER_HOP)
        if start is None:
            start = int(torch.randint(0, max(usable - n, 0) + 1, (1,), generator=generator)) if self.random_crop else 0
        x = lms[..., TEACHER_HOP * start:TEACHER_HOP * start + self.crop_frames]
        y = emb[start:start + n]
        if x.shape[-1] < self.crop_frames:  # a clip shorter than the crop: zero-pad, as LMSDataset does
            x = torch.nn.functional.pad(x, (0, self.crop_frames - x.shape[-1]))
        if y.shape[0] < n:  # repeat the last teacher frame
            if y.shape[0] == 0:
                raise ValueError(f'crop start {start} is past the {emb.shape[0]} teacher frames')
            y = torch.cat([y, y[-1:].expand(n - y.shape[0], -1)])
        per_patch = self.patch_width // TEACHER_HOP
        if per_patch > 1:
            y = y.reshape(n // per_patch, per_patch, -1).mean(1)
        return x, y

    def _noise_index(self) -> int:
        # Drawn per item from torch's generator (the reference cycles a permutation instead): an item
        # depends only on the RNG state it is made with, so the trainer's per-item seeding replays it.
        return int(torch.randint(0, len(self.noise), (1,)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        lms, emb = self.crop(*self.load(index))
        mean, std = self.norm_stats
        clean = lms - mean
        x = clean
        if self.noise is not None:
            noise = self.noise.raw_item(self._noise_index()) - self.noise_norm_stats[0]
            x = log_mix_exp(noise, clean, self.noise_ratio) if self.noise_ratio < 1.0 else noise
        return {'x': x / std, 'clean': clean / std, 'target_offline': emb}

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({len(self)} items, crop_frames={self.crop_frames}, '
                f'patch_width={self.patch_width}, noise_ratio={self.noise_ratio if self.noise is not None else 0})')


# ----- the trainer's entry point -----------------------------------------------------------------

def _size(value: Any, name: str) -> tuple[int, int]:
    """'80x208', (80, 208), [80, 208] or 208 -> (80, 208)."""
    if isinstance(value, str):
        parts = value.lower().replace(',', 'x').split('x')
        try:
            nums = [int(p) for p in parts if p.strip()]
        except ValueError:
            nums = []
        if len(nums) != 2:
            raise ValueError(f'--{name} {value!r}: expected FxT such as 80x208')
        return nums[0], nums[1]
    if isinstance(value, int):
        return 80, value
    if len(value) != 2:
        raise ValueError(f'--{name} {value!r}: expected two numbers (F, T)')
    return int(value[0]), int(value[1])


def _stats(value: Any) -> tuple[float, float] | None:
    if value is None or value == '' or (isinstance(value, str) and value.lower() == 'none'):
        return None
    return parse_mean_std(value, '--norm_stats', ValueError)


def build_speech_dataset(args: Any) -> Dataset:
    """The M2D-S / M2D-X training set from the trainer's arguments.

    Reads ``args.csv_main``, ``data_path``, ``input_size``, ``patch_size``, ``norm_stats``,
    ``csv_bg_noise``, ``noise_ratio``, ``min_ds_size``, ``teacher`` and, when present, ``model`` and
    ``norm_stats_samples``. M2D-S (no teacher): the main list holds ``.npz`` files from
    ``m2d teacher-features`` (`SpeechTeacherDataset`). M2D-X (``teacher`` weights, or an
    ``m2d_x_*`` model): plain LMS ``.npy`` files (`NoiseMixDataset`), items carry 'clean' for the
    trainer's runtime teacher. Background noise
    (``csv_bg_noise``, LMS ``.npy``) is mixed in when ``noise_ratio > 0``. The returned dataset has
    ``norm_stats`` (mean, std of the clean set) for the checkpoint.
    """
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if not g('csv_main'):
        raise DataError('--csv_main is required: the CSV listing the speech files')
    crop = _size(g('input_size', (80, 208)), 'input_size')[1]
    pw = _size(g('patch_size', (80, 4)), 'patch_size')[1]
    root = g('data_path')
    norm_stats = _stats(g('norm_stats'))
    ratio = float(g('noise_ratio', 0.0) or 0.0)
    min_ds = int(g('min_ds_size', 0) or 0)
    noise = None
    if ratio > 0:
        if not g('csv_bg_noise'):
            raise DataError(f'--noise_ratio {ratio} needs --csv_bg_noise (a CSV of background-noise LMS .npy files)')
        noise = LMSDataset(g('csv_bg_noise'), data_root=root, crop_frames=crop, norm_stats=None,
                           random_crop=True, repeat_short=True)
    n_total = int(g('norm_stats_samples', 0) or 2 * N_NORM_SAMPLES)
    n_stats = n_total // 2 if noise is not None else n_total  # the reference: half per set when mixing
    model = str(g('model', '') or '')
    if model.startswith('m2d_s_') and g('teacher'):
        raise ValueError(f'--teacher is for M2D-X models (m2d_x_vit_*); --model {model} learns from the '
                         'teacher features stored in the .npz files of --csv_main')
    if g('teacher') or model.startswith('m2d_x_'):
        # M2D-X: plain LMS files; NoiseMixDataset gives {'clean', 'x'} and the trainer's runtime
        # teacher turns 'clean' into target_offline.
        clean = LMSDataset(g('csv_main'), data_root=root, crop_frames=crop, norm_stats=norm_stats, random_crop=True,
                           min_ds_size=min_ds)
        ds: Dataset = NoiseMixDataset(clean, noise, noise_ratio=ratio, n_norm_samples=n_stats)
    else:
        ds = SpeechTeacherDataset(g('csv_main'), root, crop_frames=crop, patch_width=pw, norm_stats=norm_stats,
                                  min_ds_size=min_ds, noise=noise, noise_ratio=ratio, n_norm_samples=n_stats)
    log.info('speech training set: %r, norm_stats %.4f/%.4f', ds, *ds.norm_stats)
    return ds

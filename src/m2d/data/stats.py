"""Normalization statistics (mean, std of all log-mel values) of a folder or file list, streaming:
one file in memory at a time, accumulated in float64 with Chan's parallel update."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
from .filelist import DataError, resolve_list

log = logging.getLogger(__name__)

_BLOCK = 1 << 22  # values per float64 block


def merge_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of two parts -> of their union (Chan's parallel merge)."""
    (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
    total = na + nb
    if total == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean_a
    return total, mean_a + delta * nb / total, m2_a + m2_b + delta * delta * na * nb / total


class RunningStats:
    """Count, mean and sum of squared deviations of a stream of arrays (float64, numerically stable)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        flat = np.asarray(values).reshape(-1)
        if flat.size > _BLOCK:  # bounded float64 copies for hour-long files
            for i in range(0, flat.size, _BLOCK):
                self.update(flat[i:i + _BLOCK])
            return
        x = flat.astype(np.float64)
        n = x.size
        if n == 0:
            return
        mean = float(x.mean())
        self.count, self.mean, self.m2 = merge_moments((self.count, self.mean, self.m2),
                                                       (n, mean, float(np.square(x - mean).sum())))

    def std(self, ddof: int = 1) -> float:
        return math.sqrt(self.m2 / (self.count - ddof)) if self.count > ddof else float('nan')


def lms_stats(source: str | Path, max_files: int | None = None, seed: int = 0, crop_frames: int | None = None,
              data_root: str | Path | None = None, progress: bool = True) -> dict:
    """Mean and std of the log-mel values of the `.npy` files in a folder or CSV list.

    max_files: a random sample (seeded) of that many files. crop_frames: use one random crop per file,
    zero-padded when shorter, as the training datasets do. Returns a JSON-ready dict with mean,
    std (unbiased), files, values, unreadable (files skipped with a warning).
    """
    from tqdm import tqdm

    names, root = resolve_list(source, data_root)
    files = [root / n for n in names]
    if not files:
        raise DataError(f'{source}: no .npy files listed')
    rng = random.Random(seed)
    if max_files is not None and 0 < max_files < len(files):
        files = rng.sample(files, max_files)
    acc, unreadable = RunningStats(), []
    for path in tqdm(files, desc='stats', unit='file', disable=not progress):
        try:
            lms = np.load(path, mmap_mode='r')
        except Exception as e:
            log.warning('%s: cannot load (%s); skipped', path, e)
            unreadable.append(str(path))
            continue
        if crop_frames:
            t = lms.shape[-1]
            start = rng.randint(0, t - crop_frames) if t > crop_frames else 0
            lms = np.asarray(lms[..., start:start + crop_frames], dtype=np.float32)
            if lms.shape[-1] < crop_frames:
                lms = np.pad(lms, [(0, 0)] * (lms.ndim - 1) + [(0, crop_frames - lms.shape[-1])])
        acc.update(lms)
    if acc.count == 0:
        raise DataError(f'{source}: none of the {len(files)} files could be read')
    return {'mean': acc.mean, 'std': acc.std(ddof=1), 'files': len(files) - len(unreadable),
            'values': acc.count, 'unreadable': len(unreadable), 'source': str(source),
            'max_files': max_files, 'seed': seed, 'crop_frames': crop_frames}


def write_stats_json(stats: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + '\n')
    return path

"""Normalization statistics (mean, std of all log-mel values) of a folder or file list, streaming:
one file in memory at a time, accumulated in float64 with Chan's parallel update. By default a
seeded random sample of `SAMPLE_FILES` files is read, with the standard errors of the estimates."""

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


SAMPLE_FILES = 10_000  # files `m2d stats` reads by default (a seeded random sample; all when fewer)


def sampling_errors(parts: list[tuple[int, float, float]], population: int) -> tuple[float, float]:
    """Standard errors of the mean and std merged from `parts` ((count, mean, m2) of each file of a
    random sample drawn without replacement from `population` files).

    Files are the sampled units (their values are not independent), so the error comes from how
    the files differ: the ratio estimator's linearized variance, with the finite-population
    correction. Returns (mean_se, std_se).
    """
    k = len(parts)
    if k < 2:
        return float('nan'), float('nan')
    n = np.array([c for c, _, _ in parts], np.float64)
    m = np.array([mu for _, mu, _ in parts], np.float64)
    m2 = np.array([v for _, _, v in parts], np.float64)
    total = n.sum()
    mean = float((n * m).sum() / total)
    var = float((m2 + n * (m - mean) ** 2).sum() / total)
    scale = math.sqrt(max(0.0, 1.0 - k / population) / k) / n.mean()
    mean_se = scale * float(np.std(n * (m - mean), ddof=1))
    var_se = scale * float(np.std(m2 + n * (m - mean) ** 2 - n * var, ddof=1))
    return mean_se, var_se / (2 * math.sqrt(var)) if var > 0 else float('nan')


def lms_stats(source: str | Path, max_files: int | None = SAMPLE_FILES, seed: int = 0,
              crop_frames: int | None = None, data_root: str | Path | None = None, progress: bool = True) -> dict:
    """Mean and std of the log-mel values of the `.npy` files (float32 or float16) in a folder or CSV list.

    max_files: read a random sample (seeded) of that many files, default `SAMPLE_FILES`; every file
    when there are no more than that, or with max_files None (``--all``). crop_frames: use one random
    crop per file, zero-padded when shorter, as the training datasets do. Returns a JSON-ready dict
    with mean, std (unbiased), files (read), files_total (listed), sample (what was read, in words),
    values, unreadable (files skipped with a warning) and, for a sample, mean_se/std_se: the standard
    errors of the estimates (`sampling_errors`).
    """
    from tqdm import tqdm

    names, root = resolve_list(source, data_root)
    total = len(names)
    if not total:
        raise DataError(f'{source}: no .npy files listed')
    if max_files is not None and max_files < 1:
        raise ValueError(f'max_files={max_files}: must be at least 1 (None reads every file)')
    rng = random.Random(seed)
    sampled = max_files is not None and max_files < total
    chosen = rng.sample(range(total), max_files) if sampled else range(total)
    acc, unreadable, parts = RunningStats(), [], []
    for i in tqdm(chosen, desc='stats', unit='file', disable=not progress):
        path = root / names[i]
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
        if sampled:
            one = RunningStats()
            one.update(lms)
            parts.append((one.count, one.mean, one.m2))
            acc.count, acc.mean, acc.m2 = merge_moments((acc.count, acc.mean, acc.m2), parts[-1])
        else:
            acc.update(lms)
    read = len(chosen) - len(unreadable)
    if acc.count == 0:
        raise DataError(f'{source}: none of the {len(chosen)} files could be read')
    out = {'mean': acc.mean, 'std': acc.std(ddof=1), 'files': read, 'files_total': total,
           'sample': (f'random sample of {len(chosen)} of {total} files (seed {seed}); --all reads every file'
                      if sampled else f'all {total} files'),
           'values': acc.count, 'unreadable': len(unreadable), 'source': str(source),
           'max_files': max_files, 'seed': seed, 'crop_frames': crop_frames}
    if sampled:
        out['mean_se'], out['std_se'] = sampling_errors(parts, total)
        log.info('stats of a random sample of %d of %d files (seed %d): mean %.4f +- %.4f, std %.4f +- %.4f '
                 '(standard errors)', read, total, seed, out['mean'], out['mean_se'], out['std'], out['std_se'])
    return out


def write_stats_json(stats: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + '\n')
    return path

"""How far `m2d stats`'s default sample is from reading every file, and what it saves.

    python benchmarks/stats_sample.py LMS_FOLDER --json results/stats_sample.json

1. Real data: every file of LMS_FOLDER (e.g. FSDD converted with `m2d convert`) is read once for its
   moments (count, mean, sum of squared deviations); then, for each sample size and each of
   `--seeds` seeds, the files `lms_stats` would draw (``random.Random(seed).sample``) are merged
   exactly as `lms_stats` merges them, and the sampled mean/std are compared with all files'.
   The standard errors `lms_stats` reports (`m2d.data.stats.sampling_errors`) are checked too:
   the share of seeds whose error is within 2 and 3 of them.
2. A bigger synthetic set (`--synthetic N` files, moments only): the real files' moments repeated
   with a per-file loudness offset (normal, `--offset_sd` in log-mel units) and a 10-s length spread,
   so that files differ more than FSDD's do (AudioSet mixes loud and quiet clips), sampled with the
   default `SAMPLE_FILES`.
3. Time: `lms_stats` with the default sample vs `--all` on LMS_FOLDER (with `--time_files` >
   SAMPLE_FILES hard links, so the default samples).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from m2d.data.stats import SAMPLE_FILES, RunningStats, lms_stats, merge_moments, sampling_errors


def file_moments(folder: Path) -> list[tuple[int, float, float]]:
    from m2d.data.filelist import list_npy_files

    out = []
    for name in list_npy_files(folder):
        acc = RunningStats()
        acc.update(np.load(folder / name))
        out.append((acc.count, acc.mean, acc.m2))
    return out


def merged(parts) -> tuple[float, float]:
    acc = (0, 0.0, 0.0)
    for p in parts:
        acc = merge_moments(acc, p)
    n, mean, m2 = acc
    return mean, (m2 / (n - 1)) ** 0.5


def study(moments, sizes, seeds: int) -> list[dict]:
    full_mean, full_std = merged(moments)
    rows = []
    for k in sizes:
        if k >= len(moments):
            continue
        em, es, cover2, cover3, se_m, se_s = [], [], 0, 0, [], []
        for seed in range(seeds):
            idx = random.Random(seed).sample(range(len(moments)), k)
            parts = [moments[i] for i in idx]
            mean, std = merged(parts)
            mse, sse = sampling_errors(parts, len(moments))
            em.append(abs(mean - full_mean))
            es.append(abs(std - full_std))
            se_m.append(mse)
            se_s.append(sse)
            cover2 += em[-1] <= 2 * mse and es[-1] <= 2 * sse
            cover3 += em[-1] <= 3 * mse and es[-1] <= 3 * sse
        rows.append({'files': len(moments), 'sample': k, 'seeds': seeds, 'full_mean': full_mean, 'full_std': full_std,
                     'mean_abs_err_median': statistics.median(em), 'mean_abs_err_p95': float(np.percentile(em, 95)),
                     'mean_abs_err_max': max(em), 'std_abs_err_median': statistics.median(es),
                     'std_abs_err_p95': float(np.percentile(es, 95)), 'std_abs_err_max': max(es),
                     'mean_se_median': statistics.median(se_m), 'std_se_median': statistics.median(se_s),
                     'within_2se': cover2 / seeds, 'within_3se': cover3 / seeds})
        r = rows[-1]
        print(f"{r['files']} files, sample {k}: |d mean| median {r['mean_abs_err_median']:.4f} p95 "
              f"{r['mean_abs_err_p95']:.4f} max {r['mean_abs_err_max']:.4f} (se {r['mean_se_median']:.4f}); |d std| "
              f"median {r['std_abs_err_median']:.4f} p95 {r['std_abs_err_p95']:.4f} max {r['std_abs_err_max']:.4f} "
              f"(se {r['std_se_median']:.4f}); within 2/3 se: {r['within_2se']:.2f}/{r['within_3se']:.2f}", flush=True)
    return rows


def synthetic(moments, n: int, offset_sd: float, seed: int = 0) -> list[tuple[int, float, float]]:
    """`n` files: real files' moments, each shifted by a loudness offset and rescaled in length."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(moments), n)
    shift = rng.normal(0.0, offset_sd, n)
    scale = rng.uniform(0.5, 10.0, n)  # lengths spread over 20x (a constant per-file value spread keeps m2/count)
    out = []
    for i, d, s in zip(pick, shift, scale):
        c, m, m2 = moments[i]
        c2 = max(2, int(round(c * s)))
        out.append((c2, m + float(d), m2 * c2 / c))
    return out


def time_stats(folder: Path, n_files: int) -> dict:
    """Seconds of lms_stats, default sample vs all, on `n_files` hard links to the folder's files."""
    from m2d.data.filelist import list_npy_files

    names = list_npy_files(folder)
    with tempfile.TemporaryDirectory(prefix='stats_time_', dir=folder.parent) as tmp:
        tmp = Path(tmp)
        for i in range(n_files):
            os.link(folder / names[i % len(names)], tmp / f'{i:07d}.npy')
        out = {'files': n_files, 'sample_files': min(SAMPLE_FILES, n_files)}
        for what, k in (('sample', SAMPLE_FILES), ('all', None)):
            t0 = time.perf_counter()
            lms_stats(tmp, max_files=k, progress=False)
            out[f'{what}_s'] = time.perf_counter() - t0
    print(f"stats time on {n_files} files: default sample {out['sample_s']:.1f} s, --all {out['all_s']:.1f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', type=Path)
    p.add_argument('--sizes', type=int, nargs='+', default=[100, 300, 1000])
    p.add_argument('--seeds', type=int, default=200)
    p.add_argument('--synthetic', type=int, default=200_000)
    p.add_argument('--offset_sd', type=float, default=1.5)
    p.add_argument('--time_files', type=int, default=0, help='also time default vs --all on this many hard links')
    p.add_argument('--json', default=None)
    args = p.parse_args()
    moments = file_moments(args.folder)
    out = {'load_avg': os.getloadavg(), 'real': study(moments, args.sizes, args.seeds)}
    if args.synthetic:
        syn = synthetic(moments, args.synthetic, args.offset_sd)
        out['synthetic'] = {'offset_sd': args.offset_sd, 'rows': study(syn, [SAMPLE_FILES], args.seeds)}
    if args.time_files:
        out['time'] = time_stats(args.folder, args.time_files)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == '__main__':
    main()

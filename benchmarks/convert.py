"""Throughput of `m2d convert` against a baseline built like the reference converter.

The baseline follows the reference's `wav_to_lms.py`: a `multiprocessing.Pool` mapping over
files, each task `librosa.load(path, sr=16000, mono=True)`, zero-padding to `--min-seconds`,
nnAudio's `MelSpectrogram` with the 16 kHz preset, `log(x + eps)`, `np.save`; the converter object
travels with every task as in the reference. The pool uses the 'spawn' start method: with the
reference's default ('fork' on Linux) the workers hang in their first torch op here (torch 2.13 CPU;
the parent already ran torch ops building the converter). Both sides use the same worker count and
`--min-seconds`, start from an empty output folder, and are timed from the start of the conversion
call to its end (pool start included, interpreter start and imports excluded).

Inputs: FSDD recordings (8 kHz; ../shared/data/fsdd/recordings) and 2-s 16 kHz clips made from
them (resampled with soxr and tiled). Needs the benchmark-only extras: `pip install librosa nnAudio`.

    python benchmarks/convert.py [--files 500 --clips 300 --workers 2 --min-seconds 6.1 0 --json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FSDD = ROOT.parent / 'shared' / 'data' / 'fsdd' / 'recordings'


# ---------------------------------------------------------------- baseline (reference-like) ----

class BaselineToLogMel:
    """nnAudio MelSpectrogram (16 kHz preset) then log(x + eps), as the reference converter."""

    def __init__(self):
        from nnAudio.features import MelSpectrogram

        self.to_spec = MelSpectrogram(sr=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80,
                                      fmin=50, fmax=8000, center=True, power=2, verbose=False)

    def __call__(self, audio):
        import torch

        x = self.to_spec(torch.tensor(audio))
        return (x + torch.finfo().eps).log()


def _baseline_worker(args):
    import librosa

    subpath, from_dir, to_dir, min_seconds, to_lms = args
    to_name = Path(to_dir) / (subpath[:-len('.wav')] + '.npy')
    if to_name.exists():
        return ''
    try:
        wav, _ = librosa.load(str(Path(from_dir) / subpath), sr=16000, mono=True)
        if min_seconds:
            n = int(16000 * min_seconds)
            if len(wav) < n:
                wav = np.pad(wav, (0, n - len(wav)))
        lms = to_lms(wav)
    except Exception as e:  # the reference prints and goes on
        return f'ERROR {subpath}: {e}'
    to_name.parent.mkdir(parents=True, exist_ok=True)
    np.save(to_name, lms)
    return to_name.name


def run_baseline(src: Path, dest: Path, workers: int, min_seconds: float) -> tuple[int, float]:
    files = sorted(p.name for p in src.glob('*.wav'))
    to_lms = BaselineToLogMel()
    t0 = time.perf_counter()
    with mp.get_context('spawn').Pool(workers) as pool:
        done = list(pool.imap(_baseline_worker, [(f, str(src), str(dest), min_seconds, to_lms) for f in files]))
    elapsed = time.perf_counter() - t0
    return sum(1 for d in done if d and not d.startswith('ERROR')), elapsed


# --------------------------------------------------------------------------------- ours --------

def run_m2d(src: Path, dest: Path, workers: int, min_seconds: float) -> tuple[int, float]:
    from m2d.data.convert import convert

    t0 = time.perf_counter()
    s = convert(src, dest, sr=16000, workers=workers, min_seconds=min_seconds, progress=False)
    return s.converted, time.perf_counter() - t0


# ------------------------------------------------------------------------------- inputs --------

def prepare_inputs(fsdd: Path, work: Path, n_files: int, n_clips: int) -> dict[str, Path]:
    import soundfile as sf

    from m2d.audio import load_audio

    names = sorted(p.name for p in fsdd.glob('*.wav'))
    if len(names) < max(n_files, 1):
        raise SystemExit(f'{fsdd}: {len(names)} wavs, need {n_files}')
    step = max(1, len(names) // n_files)
    a = work / 'fsdd_8k'
    a.mkdir()
    for name in names[::step][:n_files]:
        (a / name).symlink_to(fsdd / name)
    b = work / 'clips_16k'
    b.mkdir()
    step = max(1, len(names) // n_clips)
    for i, name in enumerate(names[::step][:n_clips]):
        wav = load_audio(fsdd / name, 16000)
        wav = np.tile(wav, -(-32000 // len(wav)))[:32000]
        sf.write(str(b / f'clip_{i:04d}.wav'), wav, 16000, subtype='PCM_16')
    return {f'FSDD 8 kHz ({n_files} files)': a, f'2-s 16 kHz clips ({n_clips} files)': b}


def max_difference(dir_a: Path, dir_b: Path, n: int = 5) -> float:
    worst = 0.0
    for p in sorted(dir_a.glob('*.npy'))[:n]:
        x, y = np.load(p), np.load(dir_b / p.name)
        worst = max(worst, float(np.abs(x.reshape(y.shape) - y).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fsdd', type=Path, default=DEFAULT_FSDD, help='folder of FSDD wavs')
    ap.add_argument('--files', type=int, default=500, help='FSDD files (8 kHz)')
    ap.add_argument('--clips', type=int, default=300, help='2-s 16 kHz clips')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--min-seconds', type=float, nargs='+', default=[6.1, 0.0])
    ap.add_argument('--json', type=Path, default=None, help='write the results here')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        import librosa  # noqa: F401  (checked here, used in the workers)
        import nnAudio  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'the baseline needs librosa and nnAudio (pip install librosa nnAudio): {e}')

    results = []
    with tempfile.TemporaryDirectory(prefix='m2d-bench-') as tmp:
        work = Path(tmp)
        inputs = prepare_inputs(args.fsdd, work, args.files, args.clips)
        for label, src in inputs.items():
            for min_s in args.min_seconds:
                out_b, out_m = work / 'out_baseline', work / 'out_m2d'
                n_b, t_b = run_baseline(src, out_b, args.workers, min_s)
                n_m, t_m = run_m2d(src, out_m, args.workers, min_s)
                diff = max_difference(out_m, out_b)
                r = {'input': label, 'min_seconds': min_s, 'workers': args.workers,
                     'baseline_files': n_b, 'baseline_s': round(t_b, 3), 'baseline_files_per_s': round(n_b / t_b, 2),
                     'm2d_files': n_m, 'm2d_s': round(t_m, 3), 'm2d_files_per_s': round(n_m / t_m, 2),
                     'speedup': round((n_m / t_m) / (n_b / t_b), 2), 'max_abs_diff': diff}
                results.append(r)
                print(f"{label:<32} min_seconds={min_s:<4} baseline {r['baseline_files_per_s']:7.1f} files/s   "
                      f"m2d convert {r['m2d_files_per_s']:7.1f} files/s   x{r['speedup']:.2f}   "
                      f"(max |diff| {diff:.1e})", flush=True)
                shutil.rmtree(out_b)
                shutil.rmtree(out_m)
    print(f'machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}')
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Real-time factor and peak memory of `m2d predict --timeline` over a long recording.

    python benchmarks/tagging.py                         # a 60-min file, fp32 and bf16, CPU
    python benchmarks/tagging.py --minutes 10 --json out.json

The weights are a ViT-Base-sized stand-in of the released AS-FT file (80x1001 frames, 16x16
patches, 768-d, 12 blocks, 527-class EVAR head; random, seeded): the cost is the released model's.
The recording is synthesized (a chirp plus noise, 16 kHz mono PCM-16) and written block by block.
Each precision runs in its own process, so that its peak resident memory (``ru_maxrss``) is its
own; the process reports its resident memory after loading the model too, so that the growth due to
the recording can be read off. Real-time factor = wall time of the timeline / audio duration
(smaller is faster), with per-window throughput. Figures are medians over `--runs`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))  # the AS-FT stand-in writer lives with the test fixtures

NAME = 'm2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly'


def rss_mb() -> float:
    """Current resident memory of this process in MB (Linux /proc)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def write_recording(path: Path, minutes: float, sr: int = 16000) -> Path:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    n, block = int(minutes * 60 * sr), 60 * sr
    with sf.SoundFile(str(path), 'w', sr, 1, subtype='PCM_16') as f:
        for s in range(0, n, block):
            t = np.arange(s, min(s + block, n)) / sr
            f.write((0.3 * np.sin(2 * np.pi * (300 + 50 * np.sin(t / 7)) * t)
                     + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return path


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: load, then the timeline of the file; prints JSON."""
    import torch

    from m2d.evaluate.predict import load_classifier
    from m2d.evaluate.timeline import timeline_file

    torch.set_num_threads(args.threads)
    before = rss_mb()
    clf = load_classifier(args.weights, bf16=args.precision == 'bf16')
    loaded = rss_mb()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        track = timeline_file(clf, args.audio, hop_sec=args.hop, batch_size=args.batch_size)
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    n = len(track.starts)
    print(json.dumps({'precision': args.precision, 'duration_s': track.duration, 'windows': n, 'runs': args.runs,
                      'wall_s': times, 'median_wall_s': wall, 'real_time_factor': wall / track.duration,
                      'windows_per_s': n / wall, 'x_real_time': track.duration / wall,
                      'cpu_capability': torch.backends.cpu.get_cpu_capability(),
                      'load_average_end': os.getloadavg(),
                      'rss_start_mb': before, 'rss_after_load_mb': loaded, 'peak_rss_mb': peak_rss_mb(),
                      'rss_growth_over_load_mb': peak_rss_mb() - loaded}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--minutes', type=float, default=60.0)
    ap.add_argument('--precision', default='fp32,bf16')
    ap.add_argument('--hop', type=float, default=5.0, help='seconds (default: half of the 10-s window)')
    ap.add_argument('--batch_size', type=int, default=8)
    ap.add_argument('--threads', type=int, default=torch_threads())
    ap.add_argument('--runs', type=int, default=1)
    ap.add_argument('--json', default=None, help='write the results here too')
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--weights', help=argparse.SUPPRESS)
    ap.add_argument('--audio', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from conftest import write_as_ft_standin

    with tempfile.TemporaryDirectory() as tmp:
        weights = write_as_ft_standin(Path(tmp), name=NAME, embed_dim=768, depth=12)
        audio = write_recording(Path(tmp) / 'recording.wav', args.minutes)
        results = []
        for precision in args.precision.split(','):
            cmd = [sys.executable, __file__, '--child', '--weights', str(weights), '--audio', str(audio),
                   '--precision', precision, '--hop', str(args.hop), '--batch_size', str(args.batch_size),
                   '--threads', str(args.threads), '--runs', str(args.runs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f'{precision}: {r["duration_s"] / 60:.0f} min, {r["windows"]} windows in {r["median_wall_s"]:.1f} s: '
                  f'RTF {r["real_time_factor"]:.4f} ({r["x_real_time"]:.0f}x real time, {r["windows_per_s"]:.2f} windows/s); '
                  f'RSS {r["rss_after_load_mb"]:.0f} MB after loading, peak {r["peak_rss_mb"]:.0f} MB', flush=True)
        report = {'model': NAME + ' (ViT-Base stand-in, random weights)', 'minutes': args.minutes,
                  'hop_s': args.hop, 'batch_size': args.batch_size, 'threads': args.threads,
                  'audio': '16 kHz mono PCM-16 WAV, synthesized', 'machine': platform.processor() or platform.machine(),
                  'cpu_count': os.cpu_count(), 'load_average': os.getloadavg(), 'results': results}
    if args.json:
        from m2d.fileio import atomic_path
        with atomic_path(args.json) as t:
            Path(t).write_text(json.dumps(report, indent=1))


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == '__main__':
    main()

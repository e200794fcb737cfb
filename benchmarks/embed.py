"""Embedding extraction throughput of `m2d linear-eval` (clips/s): the whole job, as a task runs it.

    python benchmarks/embed.py                        # CPU, ViT-Base fixture, 4-s and 10-s clips, fp32 + bf16
    python benchmarks/embed.py --device cuda --clips 64 --json out.json

Each measurement runs `m2d.evaluate.embed.model_embeddings` over a task of synthetic 16-kHz wav
files (no cache): audio read ahead in the jobs engine's threads, cropped to the unit, encoded in
batches, averaged over time. The median over `--runs` runs is reported (after one warm-up run),
with the load average (other processes on the machine skew the figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from m2d.evaluate.embed import model_embeddings
from m2d.evaluate.tasks import Clip, Task
from m2d.fileio import atomic_path
from m2d.runtime import RuntimeM2D

log = logging.getLogger('benchmarks.embed')
FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'


def make_task(folder: Path, n: int, seconds: float, sr: int = 16000) -> Task:
    """`n` synthetic clips of `seconds` s (noise + tones) as a task (the splits do not matter here)."""
    rng = np.random.default_rng(0)
    clips = []
    for i in range(n):
        t = np.arange(int(seconds * sr)) / sr
        wav = 0.05 * rng.standard_normal(len(t)) + 0.1 * np.sin(2 * np.pi * (200 + 50 * i) * t)
        path = folder / f'{seconds:g}s_{i}.wav'
        sf.write(path, wav.astype(np.float32), sr)
        clips.append(Clip(path, path.stem, (str(i % 2),), ('train', 'valid', 'test')[i % 3]))
    return Task(name=f'bench{seconds:g}s', clips=clips, classes=['0', '1'], multilabel=False, unit_sec=seconds)


def weight_file(tmp: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.spec_from_file_location('official_checkpoint', FIXTURES / 'official_checkpoint.py')
    if spec is None:
        sys.exit(f'no --weights and no fixtures at {FIXTURES}')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_fixture(tmp, 'm2d_vit_base_16k')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--weights', default=None, help='weight file (default: the ViT-Base fixture, written to a temp dir)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--seconds', default='4,10', help='clip lengths, comma-separated (default 4,10)')
    p.add_argument('--clips', type=int, default=8, help='clips per run (default 8)')
    p.add_argument('--runs', type=int, default=3, help='measured runs per setting (default 3)')
    p.add_argument('--batch_size', type=int, default=8, help='clips encoded together (default 8)')
    p.add_argument('--precisions', default='float32,bf16')
    p.add_argument('--json', default=None, help='write the results here')
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = weight_file(tmp, args.weights)
        for seconds in (float(s) for s in args.seconds.split(',')):
            task = make_task(tmp, args.clips, seconds)
            for precision in args.precisions.split(','):
                runtime = RuntimeM2D(weights, bf16=precision == 'bf16').to(args.device)
                times = []
                for r in range(args.runs + 1):
                    t0 = time.perf_counter()
                    emb = model_embeddings(runtime, task, identity={'bench': r}, batch_size=args.batch_size,
                                           device=args.device, use_cache=False, progress=False)
                    if args.device.startswith('cuda'):
                        torch.cuda.synchronize()
                    if r:  # the first run warms up
                        times.append(time.perf_counter() - t0)
                    assert len(emb.keys) == args.clips and not emb.failed
                median = statistics.median(times)
                row = {'seconds': seconds, 'precision': precision, 'clips': args.clips, 'median_s': median,
                       'clips_per_s': args.clips / median, 'audio_s_per_s': args.clips * seconds / median}
                results.append(row)
                print(f'{seconds:>5g}-s clips, {precision:<8}: {row["clips_per_s"]:7.2f} clips/s '
                      f'({row["audio_s_per_s"]:.1f} s of audio per s; median of {args.runs})', flush=True)
    info = {'device': args.device, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'machine': platform.machine(), 'load_average': os.getloadavg(), 'weights': str(args.weights or
            'fixture m2d_vit_base_16k (ViT-Base, 80x608p16x16)'), 'batch_size': args.batch_size, 'results': results}
    print(f'load average {info["load_average"][0]:.1f} on {os.cpu_count()} CPUs')
    if args.json:
        with atomic_path(args.json) as tmp_json:
            Path(tmp_json).write_text(json.dumps(info, indent=1) + '\n')


if __name__ == '__main__':
    main()

"""Peak memory and speed of `m2d encode` on long recordings (ViT-Base, one file per run).

    python benchmarks/encode_long.py --minutes 10 30 60 --json results/encode_long_cpu.json

Each point (length x precision x repeat) runs in a fresh subprocess that loads the model, resets
the kernel's peak-RSS counter (``/proc/self/clear_refs``), encodes one synthesized 16-kHz mono WAV
with `encode_files` (as ``m2d encode FILE --output DIR``) and reports: the peak resident memory
while encoding (``VmHWM`` after the reset: the model, the audio blocks, one pass of windows), the
process's peak over its whole life (``VmHWM`` before the reset and at the end: loading the weights included) and the encode
wall time; real-time factor = wall / audio duration. The weights are a randomly initialized ViT-Base
of the release geometry (80x608, 16x16 patches, 768-d, 12 blocks) saved encoder-only; ``--model
tiny`` (192-d, 12 blocks, 1/16 of the compute) checks the memory column at lengths a loaded
machine cannot encode with ViT-Base in the time at hand. ``--checkpoint training`` saves instead a
full training checkpoint as `m2d pretrain` writes it (``{'model': online + decoder + EMA target,
'optimizer': AdamW state, 'scaler', 'epoch', 'step', 'args'}``, about 1.7 GB for ViT-Base): the
process peak then shows what loading such a file costs. Medians over
`--repeats` runs per point go into the JSON and the printed table.

    python benchmarks/encode_long.py --minutes 60 --precisions fp32 --checkpoint training
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

import numpy as np

SR = 16000


def write_recording(path: Path, minutes: float, seed: int = 0) -> Path:
    """A synthesized recording (gliding tones, noise bursts, silence), written a minute at a time."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    with sf.SoundFile(path, 'w', SR, 1, 'PCM_16') as f:
        for m in range(int(np.ceil(minutes))):
            n = int(SR * 60 * min(1.0, minutes - m))
            t = np.arange(n) / SR
            x = 0.2 * np.sin(2 * np.pi * (300 + 200 * np.sin(0.1 * t + m)) * t)
            x += 0.05 * rng.standard_normal(n) * (np.sin(0.5 * t) > 0)
            f.write(x.astype(np.float32))
    return path


WIDTHS = {'base': (768, 12), 'tiny': (192, 3)}  # embed_dim, heads (12 blocks, 80x608, 16x16 patches)


def write_training_checkpoint(folder: Path, width: str = 'base') -> Path:
    """A full M2D training checkpoint (online encoder, decoder, EMA target, AdamW state after one
    step), in the container `m2d.train.state` writes."""
    import argparse as ap

    import torch

    from m2d.models import create_model
    from m2d.optim import param_groups

    torch.manual_seed(0)
    dim, heads = WIDTHS[width]
    model = create_model('m2d', img_size=[80, 608], patch_size=[16, 16], embed_dim=dim, depth=12, num_heads=heads,
                         decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_stats=(-7.8, 4.6))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = 1e-3 * torch.randn_like(p)
    opt.step()  # fills exp_avg / exp_avg_sq
    path = folder / f'm2d_vit_{width}-80x608p16x16-221006-mr7-training' / 'checkpoint-last.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scaler': {}, 'epoch': 10, 'step': 1000,
                'iter_in_epoch': 0, 'args': ap.Namespace(model=f'm2d_vit_{width}')}, path)
    return path


def write_weights(folder: Path, width: str = 'base') -> Path:
    import argparse as ap

    import torch

    from m2d.vit import ViTConfig, ViTEncoder

    torch.manual_seed(0)
    dim, heads = WIDTHS[width]
    enc = ViTEncoder(ViTConfig(embed_dim=dim, num_heads=heads))
    sd = dict(enc.state_dict(), norm_stats=torch.tensor([-7.8, 4.6]))
    path = folder / f'm2d_vit_{width}-80x608p16x16-221006-mr7' / 'checkpoint-300.pth'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'epoch': 300, 'args': ap.Namespace(model='m2d_vit_base')}, path)
    return path


def _vm_hwm_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def child(args: argparse.Namespace) -> None:
    """One point: load, reset the peak counter, encode, report JSON on stdout."""
    import torch

    from m2d.encode_files import encode_files
    from m2d.runtime import RuntimeM2D

    runtime = RuntimeM2D(args.weights, bf16=args.bf16)
    load_peak = _vm_hwm_mb()  # this process's own peak so far (ru_maxrss would include the parent's: see below)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # VmHWM := current RSS
    loaded = _vm_hwm_mb()
    t0 = time.perf_counter()
    r = encode_files(runtime, [args.child], output_dir=args.out, progress=False, device='cpu')
    wall = time.perf_counter() - t0
    if r.failed:
        raise SystemExit(f'failed: {r.failed}')
    shape = np.load(next(Path(args.out).glob('*.npy')), mmap_mode='r').shape
    encode_peak = _vm_hwm_mb()
    # The process peak is taken from VmHWM, not ru_maxrss: Linux carries the parent's peak across
    # fork + exec into the child's ru_maxrss, which made every child report the driver's peak
    # (2.4 GB after it had written a training checkpoint).
    print(json.dumps({'rss_after_load_mb': loaded, 'peak_rss_load_mb': load_peak, 'peak_rss_encode_mb': encode_peak,
                      'peak_rss_process_mb': max(load_peak, encode_peak),
                      'ru_maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'wall_s': wall, 'shape': shape, 'threads': torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, nargs='+', default=[10, 30, 60])
    p.add_argument('--precisions', nargs='+', default=['bf16', 'fp32'], choices=['bf16', 'fp32'])
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--model', choices=sorted(WIDTHS), default='base', help='ViT width (default: base)')
    p.add_argument('--checkpoint', choices=['encoder', 'training'], default='encoder',
                   help='weight file: encoder-only (default) or a full training checkpoint with optimizer state')
    p.add_argument('--json', default=None)
    p.add_argument('--workdir', default=None, help='where recordings, weights and outputs go (default: a temp dir)')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--weights', default=None, help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    p.add_argument('--bf16', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix='encode_long_'))
    work.mkdir(parents=True, exist_ok=True)
    weights = (write_training_checkpoint if args.checkpoint == 'training' else write_weights)(work, args.model)
    print(f'weights: {weights} ({weights.stat().st_size / 2**20:.0f} MiB)', flush=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / 'src'))
    results = []
    for minutes in args.minutes:
        wav = work / f'rec_{minutes:g}min.wav'
        if not wav.exists():
            write_recording(wav, minutes)
        for prec in args.precisions:
            runs = []
            for k in range(args.repeats):
                out = work / f'out_{minutes:g}_{prec}_{k}'
                cmd = [sys.executable, __file__, '--child', str(wav), '--weights', str(weights), '--out', str(out)]
                load0 = os.getloadavg()[0]
                res = subprocess.run(cmd + (['--bf16'] if prec == 'bf16' else []), env=env, capture_output=True,
                                     text=True)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                run = json.loads(res.stdout.strip().splitlines()[-1])
                run.update(load_avg_before=load0, load_avg_after=os.getloadavg()[0])
                runs.append(run)
                for f in out.glob('*.npy'):
                    f.unlink()
                print(f'{args.model} {minutes:g} min {prec} run {k}: {run}', flush=True)
            med = {key: statistics.median(r[key] for r in runs)
                   for key in ('rss_after_load_mb', 'peak_rss_load_mb', 'peak_rss_encode_mb', 'peak_rss_process_mb',
                               'wall_s')}
            point = {'model': f'ViT-{args.model}', 'checkpoint': args.checkpoint, 'minutes': minutes, 'precision': prec, 'repeats': len(runs), **med,
                     'rtf': med['wall_s'] / (60 * minutes), 'runs': runs}
            results.append(point)
            if args.json:
                _save(args.json, results)
    print('| model | length | precision | peak RSS while encoding (MB) | peak RSS of the process (MB) | wall (s) | RTF |')
    print('|---|---|---|---|---|---|---|')
    for r in results:
        print(f"| {r['model']} | {r['minutes']:g} min | {r['precision']} | {r['peak_rss_encode_mb']:.0f} | "
              f"{r['peak_rss_process_mb']:.0f} | {r['wall_s']:.0f} | {r['rtf']:.3f} |")


def _save(path: str, results: list) -> None:
    from m2d.fileio import atomic_path

    import torch

    meta = {'machine': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
            'torch': torch.__version__, 'time_utc': time.strftime('%Y-%m-%d %H:%M', time.gmtime())}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({'meta': meta, 'results': results}, indent=1))


if __name__ == '__main__':
    main()

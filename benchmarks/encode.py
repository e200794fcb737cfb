"""Encode throughput of RuntimeM2D next to this machine's matmul peak, measured in the same run.

    python benchmarks/encode.py                      # CPU, ViT-Base fixture, 4 x 10-s clips
    python benchmarks/encode.py --device cuda --json out.json

The work per clip is computed from the model geometry (matmul FLOPs of every token through every
block, attention, patch embedding), so "% of peak" says how close encoding runs to the physical limit
that a 2048x2048 matmul reaches on the same device in the same precision. The bf16/fp32 speed-up
is reported next to the bf16/fp32 peak ratio of the same run, with the load average (other
processes on the machine skew the figures).

    python benchmarks/encode.py --profile            # adds a table of where the time goes
    python benchmarks/encode.py --keep_freed_memory  # glibc malloc keeps freed blocks (see src/m2d/malloc.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from m2d import RuntimeM2D
from m2d.checkpoint import load_checkpoint
from m2d.fileio import atomic_path
from m2d.vit import ViTConfig

from m2d.malloc import keep_freed_memory, malloc_env
from profiling import profile_table

log = logging.getLogger('benchmarks.encode')
FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'


def chunk_tokens(cfg: ViTConfig, frames: int) -> list[int]:
    """Tokens (cls included) of each chunk RuntimeM2D encodes for an LMS of `frames` frames."""
    (f, unit), (ph, pw) = cfg.input_size, cfg.patch_size
    fp, tp = cfg.grid_size
    n_full, rest = divmod(frames, unit)
    tokens = [fp * tp + 1] * n_full
    if rest:
        tokens.append(fp * math.ceil(rest / pw) + 1)
    return tokens


def encode_flops(cfg: ViTConfig, frames: int) -> dict[str, float]:
    """FLOPs (multiply-add = 2) to encode one clip: per-token matmuls, attention, patch embedding."""
    D, depth = cfg.embed_dim, cfg.depth
    hidden = int(D * cfg.mlp_ratio)
    ph, pw = cfg.patch_size
    per_token_block = 2 * (D * 3 * D + D * D + 2 * D * hidden)  # qkv, proj, fc1, fc2
    tokens = chunk_tokens(cfg, frames)
    linear = sum(tokens) * per_token_block * depth
    attention = sum(4 * n * n * D for n in tokens) * depth  # q @ k^T and attn @ v
    patch = sum(n - 1 for n in tokens) * 2 * D * ph * pw * cfg.in_chans
    return {'tokens': tokens, 'linear': linear, 'attention': attention, 'patch_embed': patch,
            'total': linear + attention + patch}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, runs: int = 20) -> float:
    """Best-of-`runs` GFLOP/s of an n x n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    best = float('inf')
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def time_encode(rt: RuntimeM2D, wav: torch.Tensor, warmup: int, runs: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            _sync(wav.device)
            t = time.perf_counter()
            rt.encode(wav)
            _sync(wav.device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times


def fixture_weights(folder: Path) -> Path:
    """Write the ViT-Base stand-in checkpoint with the fixtures' official_checkpoint module."""
    src = FIXTURES / 'official_checkpoint.py'
    if not src.is_file():
        raise SystemExit(f'{src} is absent: pass --weights PATH to a ViT-Base weight file')
    spec = importlib.util.spec_from_file_location('official_checkpoint', src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_fixture(folder, 'm2d_vit_base_16k')


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    load = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else fixture_weights(Path(tmp))
        ckpt = load_checkpoint(weights)
    rt32 = RuntimeM2D(checkpoint=ckpt).to(device)
    rt16 = RuntimeM2D(checkpoint=ckpt, bf16=True).to(device)
    del ckpt
    samples = int(args.seconds * rt32.sample_rate)
    wav = (0.1 * torch.randn(args.batch, samples, generator=torch.Generator().manual_seed(0))).to(device)
    frames = 1 + samples // rt32.to_spec.config.hop_length
    flops = encode_flops(rt32.cfg, frames)

    # The peak is measured before and after the encode runs and the best kept: on a shared machine a
    # single measurement can land in a busy moment and flatter the encode numbers.
    peaks = {'float32': matmul_peak(device, torch.float32), 'bfloat16': matmul_peak(device, torch.bfloat16)}
    timings = {p: time_encode(rt, wav, args.warmup, args.runs) for p, rt in (('float32', rt32), ('bfloat16', rt16))}
    peaks = {p: max(v, matmul_peak(device, getattr(torch, p))) for p, v in peaks.items()}
    profiles = {}
    if args.profile:
        for precision, rt in (('float32', rt32), ('bfloat16', rt16)):
            with torch.inference_mode():
                profiles[precision] = profile_table(lambda: [rt.encode(wav) for _ in range(2)], 2,
                                                    f'encode {precision}, {args.batch} x {args.seconds:g}-s clips')
    rows = []
    for precision, times in timings.items():
        med = statistics.median(times)
        gflops = args.batch * flops['total'] / med / 1e9
        rows.append({'precision': precision, 'median_s': med, 'min_s': min(times), 'clips_per_s': args.batch / med,
                     'gflop_per_s': gflops, 'peak_gflop_per_s': peaks[precision],
                     'pct_of_peak': 100 * gflops / peaks[precision]})
        if precision in profiles:
            rows[-1]['profile_table'], rows[-1]['profile_ms_per_batch'] = profiles[precision]
    report = {
        'device': str(device), 'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                                               else platform.processor() or platform.machine()),
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'batch': args.batch, 'seconds': args.seconds, 'frames': frames, 'runs': args.runs, 'warmup': args.warmup,
        'chunk_tokens': flops['tokens'], 'gflop_per_clip': flops['total'] / 1e9,
        'gflop_breakdown': {k: flops[k] / 1e9 for k in ('linear', 'attention', 'patch_embed')},
        'load_average': load, 'load_average_end': os.getloadavg(), 'malloc_env': malloc_env(),
        'keep_freed_memory': args.keep_freed_memory, 'results': rows,
    }
    by = {r['precision']: r for r in rows}
    if 'float32' in by and 'bfloat16' in by:
        speedup = by['float32']['median_s'] / by['bfloat16']['median_s']
        ratio = peaks['bfloat16'] / peaks['float32']
        report['bf16_vs_fp32'] = {'speedup': speedup, 'peak_ratio': ratio, 'speedup_over_peak_ratio': speedup / ratio}
    if device.type == 'cuda':  # what the attention and float32 matmuls may use on this GPU
        report['cuda'] = {'flash_sdp': torch.backends.cuda.flash_sdp_enabled(),
                          'mem_efficient_sdp': torch.backends.cuda.mem_efficient_sdp_enabled(),
                          'allow_tf32': torch.backends.cuda.matmul.allow_tf32}
    return report


def table(report: dict) -> str:
    lines = [f"encode {report['batch']} x {report['seconds']:g}-s clips on {report['device']} "
             f"({report['device_name']}, {report['threads']} threads, torch {report['torch']}); "
             f"{report['gflop_per_clip']:.1f} GFLOP per clip (chunks of {report['chunk_tokens']} tokens)",
             f"{'precision':<10} {'clips/s':>8} {'median s':>9} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'% of peak':>10} "
             f"{'best clips/s':>13}"]
    for r in report['results']:
        lines.append(f"{r['precision']:<10} {r['clips_per_s']:>8.2f} {r['median_s']:>9.3f} {r['gflop_per_s']:>9.0f} "
                     f"{r['peak_gflop_per_s']:>13.0f} {r['pct_of_peak']:>9.1f}% {report['batch'] / r['min_s']:>13.2f}")
    if 'bf16_vs_fp32' in report:
        c = report['bf16_vs_fp32']
        lines.append(f"bf16/fp32: {c['speedup']:.2f}x faster, matmul peak ratio {c['peak_ratio']:.2f}x "
                     f"({100 * c['speedup_over_peak_ratio']:.0f}% of it); load average {report['load_average'][0]:.1f} "
                     f"at the start, {report['load_average_end'][0]:.1f} at the end")
    for r in report['results']:
        if 'profile_table' in r:
            lines += ['', r['profile_table']]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--weights', help='a ViT-Base weight file (default: the fixtures\' stand-in, written to a temp dir)')
    p.add_argument('--batch', type=int, default=4, help='clips per batch (default 4)')
    p.add_argument('--seconds', type=float, default=10.0, help='clip length in seconds (default 10)')
    p.add_argument('--runs', type=int, default=5, help='timed runs; the median is reported (default 5)')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs first (default 1)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s choice)')
    p.add_argument('--profile', action='store_true', help='also profile 2 encodes per precision (where the time goes)')
    p.add_argument('--keep_freed_memory', action='store_true',
                   help='let glibc malloc keep freed memory (fewer page faults; see src/m2d/malloc.py)')
    p.add_argument('--json', help='also write the report to this JSON file')
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    logging.basicConfig(level=logging.WARNING)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available')
    report = run(args)
    print(table(report))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())

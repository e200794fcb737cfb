"""Pre-training throughput: one full M2D ViT-Base training step next to this machine's matmul peak.

    python benchmarks/pretrain.py                         # CPU: float32 and bf16 autocast
    python benchmarks/pretrain.py --device cuda --steps 20 --json out.json

A step is what `m2d.train.loop` does per optimizer update: forward (online encoder on the
visible patches, EMA target on the masked ones, decoder), loss read-back, backward, gradient
clipping (foreach), AdamW (fused where supported) and the EMA update (foreach). Masks are drawn
before timing, as the loader workers do in training. Default geometry: batch 8, 80x608 input,
16x16 patches, mask ratio 0.7, decoder 8 x 512-d.

The work per sample is derived from the geometry: matmul FLOPs of the linear layers of every
token through every block (forward + backward = 3x forward for the trained online encoder and
decoder, 1x for the no-grad target) -- about 81 GFLOP per sample, the count the issue's reference
numbers use; attention, patch embedding and the decoder's input/output projections are reported
separately. "% of peak" compares the achieved FLOP rate with the best of 20 runs of a 2048x2048
matmul measured in the same run, in the same precision (on CUDA also against an 8192x8192 matmul:
the MFU column GPU figures are usually given in). With both precisions the result also
gives the bf16/fp32 step speed-up next to the bf16/fp32 peak ratio of the same run, and the load
average of the machine (other processes skew the figures).

    python benchmarks/pretrain.py --profile    # adds a table of where the step's time goes
    python benchmarks/pretrain.py --compile    # torch.compile the blocks (slow first steps)

With ``--threads 1`` the result also gives "% of peak by CPU time" (the step's and the matmul's
process CPU time instead of wall time): on a machine shared with other jobs that figure does not
count the time spent waiting for a core, only the time the work itself ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

from m2d.masking import random_mask
from m2d.models import create_model
from m2d.train.config import TrainConfig
from m2d.train.loop import apply_update, make_optimizer

from m2d.malloc import keep_freed_memory, malloc_env
from profiling import profile_table

log = logging.getLogger('benchmarks.pretrain')


def step_flops(embed_dim: int = 768, depth: int = 12, dec_dim: int = 512, dec_depth: int = 8,
               input_size: tuple[int, int] = (80, 608), patch: tuple[int, int] = (16, 16), mask_ratio: float = 0.7,
               mlp_ratio: float = 4.0) -> dict[str, float]:
    """FLOPs (multiply-add = 2) of one training sample, from the geometry."""
    fp, tp = input_size[0] // patch[0], input_size[1] // patch[1]
    L = fp * tp
    keep = int(L * (1 - mask_ratio))
    n_enc, n_tgt, n_dec = keep + 1, L - keep + 1, L + 1  # cls included

    def block_linear(n: int, d: int) -> float:
        return 2 * n * d * d * (4 + 2 * mlp_ratio) * 1.0  # qkv 3d^2 + proj d^2 + mlp 2*ratio*d^2

    def block_attn(n: int, d: int) -> float:
        return 4.0 * n * n * d

    fwd_online = depth * block_linear(n_enc, embed_dim) + dec_depth * block_linear(n_dec, dec_dim)
    fwd_target = depth * block_linear(n_tgt, embed_dim)
    linear = 3 * fwd_online + fwd_target
    attention = 3 * (depth * block_attn(n_enc, embed_dim) + dec_depth * block_attn(n_dec, dec_dim)) \
        + depth * block_attn(n_tgt, embed_dim)
    other = 3 * (2 * L * patch[0] * patch[1] * embed_dim  # patch embedding
                 + 2 * n_enc * embed_dim * dec_dim  # decoder_embed
                 + 2 * (L - keep) * dec_dim * embed_dim)  # decoder_pred (masked tokens)
    return {'tokens': {'online_encoder': n_enc, 'target': n_tgt, 'decoder': n_dec}, 'linear_blocks': linear,
            'attention': attention, 'other': other, 'total': linear + attention + other}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, runs: int = 20,
                by_cpu_time: bool = False) -> float:
    """Best FLOP/s of an n x n matmul over `runs` runs (timed by process CPU time if `by_cpu_time`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = time.process_time if by_cpu_time else time.perf_counter
    best = float('inf')
    for _ in range(runs + 2):
        _sync(device)
        t0 = clock()
        torch.mm(a, b)
        _sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_step(device: torch.device, bf16: bool, batch: int, steps: int, warmup: int, cfg: TrainConfig,
               compile_blocks: bool = False, profile: bool = False) -> dict:
    torch.manual_seed(0)
    model = create_model('m2d', **cfg.model_config(), norm_stats=(0.0, 1.0)).to(device).train()
    if compile_blocks:
        model.compile_blocks()
    optimizer = make_optimizer(model, cfg, 1e-4, device)
    params = [p for p in model.parameters() if p.requires_grad]
    L = cfg.grid_size[0] * cfg.grid_size[1]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 1, *cfg.input_hw, generator=g).to(device) for _ in range(2)]
    masks = [random_mask(batch, L, cfg.mask_ratio, generator=g).to(device) for _ in range(2)]
    losses = []

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(xs[i % 2], mask=masks[i % 2])
        losses.append(loss.item())
        loss.backward()
        apply_update(model, optimizer, params, cfg.clip_grad, 0.99995)
        _sync(device)

    times, cpu_times = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out = {'step_s_median': statistics.median(times), 'step_s_best': min(times), 'loss': losses[-1],
           'step_cpu_s_median': statistics.median(cpu_times)}
    if profile:
        table, rows = profile_table(lambda: [step(i) for i in range(2)], 2,
                                    f'{"bf16" if bf16 else "fp32"} training step, batch {batch}')
        out['profile_ms_per_step'] = rows
        out['profile_table'] = table
        log.info('%s', table)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=3, help='timed steps per precision (default %(default)s)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--precisions', default='fp32,bf16', help='comma list of fp32, bf16')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    p.add_argument('--compile', action='store_true', help='torch.compile the encoder, target and decoder blocks')
    p.add_argument('--profile', action='store_true', help='also profile 2 steps per precision: where the time goes')
    p.add_argument('--keep_freed_memory', action='store_true',
                   help='let glibc malloc keep freed memory (fewer page faults; see src/m2d/malloc.py)')
    p.add_argument('--json', default=None, help='also write the result here')
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig(model='m2d_vit_base', device=args.device)
    flops = step_flops(input_size=cfg.input_hw, patch=cfg.patch_hw, mask_ratio=cfg.mask_ratio,
                       dec_dim=cfg.decoder_embed_dim, dec_depth=cfg.decoder_depth)
    result = {'device': str(device), 'cpu': platform.processor() or platform.machine(),
              'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
              'torch': torch.__version__, 'threads': torch.get_num_threads(), 'batch': args.batch,
              'input_size': list(cfg.input_hw), 'patch_size': list(cfg.patch_hw), 'mask_ratio': cfg.mask_ratio,
              'gflop_per_sample': flops['linear_blocks'] / 1e9,
              'gflop_per_sample_with_attention_and_embeddings': flops['total'] / 1e9,
              'tokens': flops['tokens'], 'compile': args.compile,
              'keep_freed_memory': args.keep_freed_memory, 'malloc_env': malloc_env(),
              'load_average': {'start': os.getloadavg()}, 'results': {}}
    for name in args.precisions.split(','):
        name = name.strip()
        if name not in ('fp32', 'bf16'):
            p.error(f'--precisions: unknown precision {name!r} (fp32, bf16)')
        bf16 = name == 'bf16'
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = matmul_peak(device, dtype)
        r = bench_step(device, bf16, args.batch, args.steps, args.warmup, cfg, args.compile, args.profile)
        peak = max(peak, matmul_peak(device, dtype))  # best of before and after: a busy moment flatters the step
        sps = args.batch / r['step_s_median']
        achieved = sps * flops['linear_blocks']
        result['results'][name] = {
            'samples_per_s': sps, 'step_s_median': r['step_s_median'], 'step_s_best': r['step_s_best'],
            'achieved_gflops': achieved / 1e9, 'matmul_peak_gflops': peak / 1e9,
            'percent_of_peak': 100 * achieved / peak, 'loss': r['loss'], 'load_average_after': os.getloadavg(),
            'step_cpu_s_median': r['step_cpu_s_median'],
            **{k: v for k, v in r.items() if k.startswith('profile')}}
        if device.type == 'cpu' and torch.get_num_threads() == 1:  # CPU time: robust to waiting for a busy core
            cpu_rate = args.batch * flops['linear_blocks'] / r['step_cpu_s_median']
            cpu_peak = matmul_peak(device, dtype, by_cpu_time=True)
            result['results'][name].update({'matmul_peak_by_cpu_time_gflops': cpu_peak / 1e9,
                                            'percent_of_peak_by_cpu_time': 100 * cpu_rate / cpu_peak})
        if device.type == 'cuda':  # MFU against the large-matmul peak, as GPU figures are usually given
            big = matmul_peak(device, dtype, n=8192, runs=10)
            result['results'][name].update({'matmul_peak_8192_gflops': big / 1e9, 'mfu_8192': 100 * achieved / big})
            log.info('%s: MFU %.1f%% of the 8192x8192 matmul peak %.0f GFLOP/s', name, 100 * achieved / big, big / 1e9)
        log.info('%s: %.2f samples/s (step %.2f s), %.0f GFLOP/s = %.0f%% of the %s matmul peak %.0f GFLOP/s',
                 name, sps, r['step_s_median'], achieved / 1e9, 100 * achieved / peak, name, peak / 1e9)
    res = result['results']
    if 'fp32' in res and 'bf16' in res:
        speedup = res['fp32']['step_s_median'] / res['bf16']['step_s_median']
        ratio = res['bf16']['matmul_peak_gflops'] / res['fp32']['matmul_peak_gflops']
        result['bf16_vs_fp32'] = {'step_speedup': speedup, 'peak_ratio': ratio,
                                  'speedup_over_peak_ratio': speedup / ratio}
        log.info('bf16/fp32: step %.2fx, matmul peak %.2fx (the step reaches %.0f%% of the peak ratio)',
                 speedup, ratio, 100 * speedup / ratio)
    result['load_average']['end'] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from m2d.fileio import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

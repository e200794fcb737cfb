"""`m2d demo`: synthesize a labeled sound collection, pre-train a tiny M2D on it, evaluate, report."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
Stages (each is an m2d command; the report lists the exact command lines):
  1. data        8 synthesized timbres (4 vowel-like formant patterns; brass, reed, bar and buzz
                 partials), each over 2 octaves of pitch with random vibrato/tremolo, envelope,
                 loudness and noise (-5..15 dB SNR); 0.95-s WAV files, one sub-folder per class;
                 or your --data_dir
  2. convert     the train split's audio to log-mel .npy files (m2d convert)
  3. pretrain    a tiny M2D (ViT-Tiny width, 2 blocks) from scratch on those files (m2d pretrain),
                 bf16 where the device supports it, with a progress bar and the effective-rank monitor
  4. linear-eval the checkpoint against a random encoder of the same shape and raw log-mel features,
                 on held-out test clips, over --seeds probe seeds (m2d linear-eval)
  5. report      OUTPUT_DIR/report.md and report.json: result table, curves, mask figure, embedding map

examples:
  m2d demo                                   # ~3 minutes on a 2-core CPU (see the report's timings)
  m2d demo --quick                           # a tiny run (seconds): few clips, one epoch, one seed
  m2d demo --data_dir my_sounds/             # your audio, one sub-folder per class
  m2d demo --task fsdd-digits --data_dir data/fsdd --epochs 40
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..demo import DemoConfig

    d = DemoConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('--output_dir', '--output-dir', dest='output_dir', default=str(d.output_dir), metavar='DIR',
                        help='report folder (default %(default)s)')
    parser.add_argument('--work_dir', '--work-dir', dest='work_dir', default=None, metavar='DIR',
                        help='audio, log-mel files, run folder and embedding cache (default OUTPUT_DIR/work)')
    g = parser.add_argument_group('data (default: synthesized)')
    g.add_argument('--data_dir', '--data-dir', dest='data_dir', default=None, metavar='DIR',
                   help='your labeled audio: one sub-folder per class, or the folder of --csv / --task')
    g.add_argument('--csv', default=None, metavar='FILE', help='with --data_dir: file_name,label[,split]')
    g.add_argument('--task', default=None, metavar='NAME', help='with --data_dir: fsdd-digits or fsdd-speakers')
    g.add_argument('--clips_per_class', '--clips-per-class', dest='clips_per_class', type=int, default=None,
                   metavar='N', help=f'synthesized clips per class (default {d.clips_per_class})')
    g = parser.add_argument_group('pre-training and evaluation')
    g.add_argument('--epochs', type=int, default=None, help=f'pre-training epochs (default {d.epochs})')
    g.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=None,
                   help=f'pre-training batch (default {d.batch_size})')
    g.add_argument('--mask_ratio', '--mask-ratio', dest='mask_ratio', type=float, default=None,
                   help=f'masked fraction of patches (default {d.mask_ratio})')
    g.add_argument('--seeds', type=int, default=None, help=f'linear-probe seeds (default {d.seeds})')
    g.add_argument('--seed', type=int, default=None, help=f'data, split and pre-training seed (default {d.seed})')
    g.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    bf = g.add_mutually_exclusive_group()
    bf.add_argument('--bf16', dest='bf16', action='store_const', const=True, default=None,
                    help='bfloat16 pre-training (default: when the device supports it natively)')
    bf.add_argument('--no_bf16', '--no-bf16', dest='bf16', action='store_const', const=False, help='float32 only')
    parser.add_argument('--quick', action='store_true',
                        help='a tiny run for a first look and the tests: 8 clips per class, 1 epoch, 1 seed')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bars')


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo
    from . import CommandError

    given = {k: getattr(args, k) for k in ('clips_per_class', 'epochs', 'batch_size', 'mask_ratio', 'seeds', 'seed')
             if getattr(args, k) is not None}
    for k in ('clips_per_class', 'epochs', 'batch_size', 'seeds'):
        if k in given and given[k] < 1:
            raise CommandError(f'--{k} {given[k]}: must be at least 1')
    if 'mask_ratio' in given and not 0 < given['mask_ratio'] < 1:
        raise CommandError(f'--mask_ratio {given["mask_ratio"]}: must be between 0 and 1')
    if (args.csv or args.task) and not args.data_dir:
        raise CommandError('--csv and --task need --data_dir (the folder of the audio files)')
    paths = dict(output_dir=Path(args.output_dir), work_dir=Path(args.work_dir) if args.work_dir else None,
                 data_dir=Path(args.data_dir) if args.data_dir else None, csv=Path(args.csv) if args.csv else None,
                 task=args.task, device=args.device, bf16=args.bf16, progress=not args.quiet)
    cfg = DemoConfig.quick_run(**paths, **given) if args.quick else DemoConfig(**paths, **given)
    result = run_demo(cfg)
    print(f'report: {result.report_md}')
    print(result.verdict)
    return 0

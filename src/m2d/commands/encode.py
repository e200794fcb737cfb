"""`m2d encode INPUTS... --weights NAME_OR_PATH (--output DIR | --npz FILE)`: audio -> M2D features."""

from __future__ import annotations

import argparse

from ..audio import AUDIO_SUFFIXES
from . import CommandError

EPILOG = """\
Outputs mirror the input tree: DIR/sub/clip.npy for INPUT/sub/clip.wav (a file given directly goes to
DIR/clip.npy). Shapes per file: [T', D] (T' time steps: 6.25 per second with 16x16 patches, 50 with 80x2); with
--pool mean [D]; with --layers a leading layer axis [L, T', D]. With --npz, one .npz keyed by the
relative path without suffix, e.g. np.load(FILE)['sub/clip'].

Recordings longer than 16 model windows (97 s for 608-frame models) are streamed: read in blocks,
encoded 16 windows at a time, appended to their .npy (memory does not grow with the length; same
features). --npz holds all features in memory and refuses a file whose features exceed 512 MB.

examples:
  m2d encode clips/ --weights m2d_vit_base-80x608p16x16-221006-mr7 --output feats/
  m2d encode a.wav b.flac --weights ckpt/checkpoint-300.pth --npz feats.npz --pool mean
  m2d encode clips/ --weights W.pth --output feats/ --layers all --device cuda --bf16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('inputs', nargs='+', metavar='INPUT', help='audio files or folders (searched recursively)')
    parser.add_argument('--weights', '-w', required=True, metavar='NAME_OR_PATH',
                        help='a released model name (downloaded once; see `m2d download --list`) or a weight '
                             'file (.pth or .safetensors)')
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument('--output', '-o', metavar='DIR', help='write one float32 .npy per input file under DIR')
    out.add_argument('--npz', metavar='FILE', help='write all features into one .npz file instead')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=8,
                        help='clips of equal length encoded together (default 8)')
    parser.add_argument('--layers', default=None, metavar='SPEC',
                        help='per-layer outputs: "all" or indices such as "0,6,11" or "-1" (default: the final output)')
    parser.add_argument('--pool', choices=['none', 'mean'], default='none',
                        help='mean: average over time (one vector per file)')
    parser.add_argument('--bf16', action='store_true', help='encode in bfloat16 (GPUs, CPUs with avx512_bf16/AMX)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the encoder (for many clips of one length): compiles about a minute '
                             'per input shape, then runs faster')
    parser.add_argument('--flat', action='store_true',
                        help='one vector per patch [Fp*T\', D] instead of stacking frequency patches')
    parser.add_argument('--trust', action='store_true',
                        help='allow weight files that need code to unpickle (only for trusted files)')
    parser.add_argument('--suffix', default=','.join(AUDIO_SUFFIXES), metavar='LIST',
                        help='audio file suffixes searched in folders, comma-separated (default: %(default)s)')
    parser.add_argument('--skip_existing', '--skip-existing', dest='skip_existing', action='store_true',
                        help='leave files whose .npy already exists')
    parser.add_argument('--workers', type=int, default=2, help='threads reading audio ahead (default 2)')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import hub
    from ..encode_files import encode_files, parse_layers
    from ..runtime import RuntimeM2D

    if args.batch_size < 1:
        raise CommandError(f'--batch_size {args.batch_size}: must be at least 1')
    names = (x.strip().lower() for x in args.suffix.split(','))
    suffixes = tuple(s if s.startswith('.') else f'.{s}' for s in names if s)
    try:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise CommandError(f'--device {args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise CommandError(f'--device {args.device}: CUDA is not available in this torch build or machine')
    runtime = RuntimeM2D(hub.weights_path(args.weights), flat_features=args.flat, bf16=args.bf16, trust=args.trust)
    if args.compile:
        runtime.compile()
    layers = parse_layers(args.layers, runtime.cfg.depth)

    result = encode_files(runtime, args.inputs, output_dir=args.output, npz=args.npz,
                          batch_size=args.batch_size, layers=layers, pool=args.pool, device=device,
                          suffixes=suffixes, skip_existing=args.skip_existing, num_workers=args.workers,
                          progress=not args.quiet)
    print(result.summary())
    return 0 if result.encoded or result.skipped else 1

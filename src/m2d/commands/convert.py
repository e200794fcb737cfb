"""`m2d convert SRC DEST`: audio files to log-mel `.npy` files (float32 [1, 80, T]) for pre-training."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('src', help='folder of audio files (searched recursively) or one audio file')
    parser.add_argument('dest', help='output folder; SRC/a/b.wav becomes DEST/a/b.npy')
    parser.add_argument('--sr', type=int, default=16000, choices=[16000, 32000],
                        help='front-end preset (sample rate the audio is resampled to); default 16000')
    parser.add_argument('--workers', type=int, default=None,
                        help='worker processes (default: CPU count; 0: convert in this process)')
    parser.add_argument('--overwrite', action='store_true', help='convert again files whose output exists')
    parser.add_argument('--min_seconds', '--min-seconds', dest='min_seconds', type=float, default=0.0,
                        help='zero-pad shorter clips at the end to this duration (the reference uses 6.1); default 0')
    parser.add_argument('--suffix', action='append', default=None, metavar='SUFFIX',
                        help='only files with this suffix (repeatable, case-insensitive), e.g. --suffix .flac')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.convert import convert

    s = convert(args.src, args.dest, sr=args.sr, workers=args.workers, overwrite=args.overwrite,
                min_seconds=args.min_seconds, suffixes=args.suffix, progress=not args.no_progress)
    print(f'{s}; file list: {s.files_csv}' + (f'; failures: {s.failures_csv}' if s.failed else ''))
    return s.exit_code

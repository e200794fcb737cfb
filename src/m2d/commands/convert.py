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
    parser.add_argument('--min-seconds', type=float, default=0.0,
                        help='zero-pad shorter clips at the end to this duration (the reference uses 6.1); default 0')
    parser.add_argument('--suffix', action='append', default=None, metavar='SUFFIX',
                        help='only files with this suffix (repeatable, case-insensitive), e.g. --suffix .flac')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.convert import convert

    s = convert(args.src, args.dest, sr=args.sr, workers=args.workers, overwrite=args.overwrite,
                min_seconds=args.min_seconds, suffixes=args.suffix, progress=not args.no_progress)
    print(s)
    if s.failed:
        print(f'{len(s.failed)} files failed; reasons in {s.failures_csv}')
        for _, reason in s.failed[:5]:
            print(f'  {reason}')
    print(f'file list: {s.files_csv}')
    return s.exit_code

"""`m2d convert SRC DEST`: audio files to log-mel `.npy` files (float32 or float16 [1, 80, T]) for
pre-training; `--shard K/N` splits one conversion across machines."""

from __future__ import annotations

import argparse

EPILOG = '''many machines, one DEST (a shared file system):
  m2d convert SRC DEST --shard K/N     on machine K = 1..N (e.g. K=$SLURM_ARRAY_TASK_ID with --array=1-N)
  m2d filelist DEST                    once every part is done: writes DEST/files.csv
Part K takes the files at positions K-1, K-1+N, K-1+2N, ... of the sorted source list (round-robin,
K counted from 1), so the parts are balanced and together give exactly the files of one run. Each part
locks only itself (a run without --shard excludes them all), and writes DEST/files.shard-K-of-N.csv
(its outputs) and, when files failed, DEST/convert_failures.shard-K-of-N.csv. Use the same N and the
same SRC/--files on every machine.

--dtype float16 halves the bytes; on real speech (FSDD) the log-mel values (about -16 to 5) change by
at most 0.0039 (relative 4.9e-4, rms 0.0022: float16 rounding); `m2d stats` and training read either.'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
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
    parser.add_argument('--shard', default=None, metavar='K/N',
                        help='convert only part K (1..N) of N of the sorted source list (round-robin); see below')
    parser.add_argument('--files', default=None, metavar='LIST',
                        help='convert the files this list names (paths relative to SRC; text: one a line, or CSV '
                             'with a file_name column) instead of searching SRC')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16'],
                        help='value type of the .npy files (float16: half the bytes); default float32')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.convert import convert

    s = convert(args.src, args.dest, sr=args.sr, workers=args.workers, overwrite=args.overwrite,
                min_seconds=args.min_seconds, suffixes=args.suffix, progress=not args.no_progress,
                shard=args.shard, files=args.files, dtype=args.dtype)
    print(f'{s}; file list: {s.files_csv}' + (f'; failures: {s.failures_csv}' if s.failed else ''))
    return s.exit_code

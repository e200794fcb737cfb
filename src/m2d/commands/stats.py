"""`m2d stats DIR_OR_CSV`: mean and std of log-mel values (normalization statistics), streaming,
from a seeded random sample of files by default (`--all`: every file)."""

from __future__ import annotations

import argparse
import json

EPILOG = '''By default a seeded random sample of {n:,} files is read (every file when there are no
more): the output says so ("sample": N of M files, seed) and gives the standard errors of the two
estimates (mean_se, std_se). Measured over 200 seeds: on a synthetic 200,000-file set built from real
log-mel (FSDD; values about -10.7 +- 4.8) with louder and quieter files, a sample of 10,000 files was
off by at most 0.080 (mean) and 0.033 (std), 95 % of seeds within 0.057 and 0.019; the sampled values
were within 3 reported standard errors of the exact ones for 98-99 % of seeds (README, "Prepare
data"). --all reads every file (exact; for 2 M AudioSet files about 640 GB).'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.stats import SAMPLE_FILES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG.format(n=SAMPLE_FILES)
    parser.add_argument('source', help='folder of .npy files (float32 or float16) or a CSV list (column file_name)')
    parser.add_argument('--data_root', '--data-root', dest='data_root', default=None,
                        help='folder the CSV paths are relative to (default: the CSV folder, else its parent)')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--max_files', '--max-files', dest='max_files', type=int, default=SAMPLE_FILES,
                       help=f'read a seeded random sample of this many files (default {SAMPLE_FILES:,}; '
                            'every file when there are no more)')
    which.add_argument('--all', dest='max_files', action='store_const', const=None,
                       help='read every file (exact values, as before the sampling default)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the file sample and crops (default 0)')
    parser.add_argument('--crop_frames', '--crop-frames', dest='crop_frames', type=int, default=None,
                        help='one random crop of this many frames per file, zero-padded as in training')
    parser.add_argument('--json', default=None, help='also write the result to this JSON file')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.stats import lms_stats, write_stats_json

    if args.max_files is not None and args.max_files < 1:
        raise ValueError(f'--max_files {args.max_files}: must be at least 1 (--all reads every file)')
    stats = lms_stats(args.source, max_files=args.max_files, seed=args.seed, crop_frames=args.crop_frames,
                      data_root=args.data_root, progress=not args.no_progress)
    if args.json:
        write_stats_json(stats, args.json)
    print(json.dumps(stats, indent=2))
    return 0

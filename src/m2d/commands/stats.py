"""`m2d stats DIR_OR_CSV`: mean and std of log-mel values (normalization statistics), streaming."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('source', help='folder of .npy files or a CSV list (column file_name)')
    parser.add_argument('--data_root', '--data-root', dest='data_root', default=None,
                        help='folder the CSV paths are relative to (default: the CSV folder, else its parent)')
    parser.add_argument('--max_files', '--max-files', dest='max_files', type=int, default=None,
                        help='use a random sample of this many files')
    parser.add_argument('--seed', type=int, default=0, help='seed of the file sample and crops (default 0)')
    parser.add_argument('--crop_frames', '--crop-frames', dest='crop_frames', type=int, default=None,
                        help='one random crop of this many frames per file, zero-padded as in training')
    parser.add_argument('--json', default=None, help='also write the result to this JSON file')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.stats import lms_stats, write_stats_json

    stats = lms_stats(args.source, max_files=args.max_files, seed=args.seed, crop_frames=args.crop_frames,
                      data_root=args.data_root, progress=not args.no_progress)
    if args.json:
        write_stats_json(stats, args.json)
    print(json.dumps(stats, indent=2))
    return 0

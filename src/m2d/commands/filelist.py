"""`m2d filelist DIR`: write DIR/files.csv listing the `.npy` files under DIR (paths relative to DIR's parent)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('dir', help='folder of .npy log-mel files (e.g. data/lms_fsdd)')
    parser.add_argument('--csv', default=None, help='output CSV (default: DIR/files.csv)')


def run(args: argparse.Namespace) -> int:
    from ..data.filelist import list_npy_files, write_filelist

    names = list_npy_files(args.dir)
    path = write_filelist(args.dir, args.csv, names=names)
    print(f'{path}: {len(names)} files')
    return 0

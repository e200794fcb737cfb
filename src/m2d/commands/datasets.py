"""`m2d datasets NAME DEST`: download and prepare public datasets (fsdd: Free Spoken Digit Dataset)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('name', choices=['fsdd'], help='fsdd: Free Spoken Digit Dataset (3,000 8-kHz wavs)')
    parser.add_argument('dest', help='output folder (recordings/ and metadata.csv are written there)')
    parser.add_argument('--source', default=None,
                        help='URL of the repository zip (default: the public GitHub archive), a local zip, '
                             'or a local folder of recordings')
    parser.add_argument('--link', action='store_true', help='symlink the files of a local --source folder')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from ..data.fsdd import prepare_fsdd

    r = prepare_fsdd(args.dest, args.source, link=args.link, progress=not args.no_progress)
    print(f'{r.recordings}: {r.files} recordings ({r.added} added); metadata: {r.metadata}')
    print(f'next: m2d convert {r.recordings} DATA/lms_fsdd')
    return 0

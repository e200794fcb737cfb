"""`m2d superb install S3PRL_ROOT`: register the M2D upstream in an s3prl checkout."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('action', choices=['install'], help='install: write s3prl/upstream/m2d and register it')
    parser.add_argument('s3prl_root', help='root of an s3prl checkout (the folder holding s3prl/hub.py)')


def run(args: argparse.Namespace) -> int:
    from ..superb.install import install

    path = install(args.s3prl_root)
    print(f'installed the m2d upstream in {path}; use -u m2d -k CKPT,MEAN,STD (and -u m2d_calcnorm for the statistics)')
    return 0

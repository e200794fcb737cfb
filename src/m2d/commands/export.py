"""`m2d export WEIGHTS OUT.safetensors`: the encoder (+ norm_stats, head, CLAP projections) as safetensors."""

from __future__ import annotations

import argparse

from . import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('weights', metavar='WEIGHTS', help='a weight file (.pth/.safetensors) or a released model name')
    parser.add_argument('output', metavar='OUT.safetensors', help='the safetensors file to write')
    parser.add_argument('--trust', action='store_true',
                        help='allow weight files that need code to unpickle (only for trusted files)')


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import hub
    from ..checkpoint import export_encoder

    if Path(args.output).suffix != '.safetensors':
        raise CommandError(f'{args.output}: the output name must end with .safetensors')
    src = hub.weights_path(args.weights)
    out = export_encoder(src, args.output, trust=args.trust)
    print(f'wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) from {src}')
    return 0

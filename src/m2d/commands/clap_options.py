"""Options shared by the M2D-CLAP evaluation commands (`m2d zeroshot`, `m2d retrieval`): how the
text encoder, clips and captions are encoded and cached, and where the report goes."""

from __future__ import annotations

import argparse


def add_encoding_arguments(parser: argparse.ArgumentParser, output_default: str, batch_help: str) -> None:
    """`--text_encoder`, batch sizes, `--output_dir`, cache, failure limit, device, precision."""
    parser.add_argument('--text_encoder', '--text-encoder', dest='text_encoder', default=None, metavar='NAME_OR_DIR',
                        help="the CLAP text encoder (Hugging Face name or local folder; default: the one the weight "
                             "file's name implies)")
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=16,
                        help=f'{batch_help} (default 16)')
    parser.add_argument('--text_batch_size', '--text-batch-size', dest='text_batch_size', type=int, default=64,
                        help='captions encoded together (default 64)')
    parser.add_argument('--output_dir', '--output-dir', dest='output_dir', default=None, metavar='DIR',
                        help=f'report folder (default {output_default})')
    parser.add_argument('--cache_dir', '--cache-dir', dest='cache_dir', default=None, metavar='DIR',
                        help='embedding cache (default $M2D_CACHE/embeddings or ~/.cache/m2d/embeddings)')
    parser.add_argument('--no_cache', '--no-cache', dest='no_cache', action='store_true',
                        help='neither read nor write cached embeddings')
    parser.add_argument('--max_failed', '--max-failed', dest='max_failed', type=float, default=0.01, metavar='F',
                        help='the largest fraction of unreadable clips left out (reported) before it is an error')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--bf16', action='store_true', help='encode audio in bfloat16')
    parser.add_argument('--trust', action='store_true', help='allow weight files that need code to unpickle')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bars')


def encoding_options(args: argparse.Namespace) -> dict:
    """The keyword arguments `add_encoding_arguments`' options give (less `--output_dir`)."""
    return dict(batch_size=args.batch_size, text_batch_size=args.text_batch_size, text_encoder=args.text_encoder,
                device=args.device, bf16=args.bf16, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                max_failed=args.max_failed, progress=not args.quiet, trust=args.trust)

"""`m2d retrieval`: text-audio retrieval (recall@K both ways) of M2D-CLAP weight files on a caption CSV."""

from __future__ import annotations

import argparse

from . import CommandError

EPILOG = """\
The caption CSV: file_name and caption columns, either caption_1 ... caption_N on one row per clip
(Clotho) or caption on one row per caption (AudioCaps, EVAR's metadata), optional split column
(--split, default test when the column exists). Every clip is encoded whole (as EVAR's
retr_a2t_t2a.py; --unit_sec S crops/pads instead), every caption by the CLAP text encoder, scores
are cosines. text->audio: each caption is a query, a hit when its clip is in the top K; audio->text:
each clip is a query, a hit when any of its captions is in the top K (WavCaps' a2t/t2a, used by
EVAR). Also mAP@10, median and mean rank, as there.

Output: OUTPUT_DIR/report.json and report.md; default OUTPUT_DIR eval/<weights-name>/retrieval-<csv name>/.

examples:
  m2d retrieval --weights m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025 --captions clotho_captions_evaluation.csv \\
      --data_dir clotho/evaluation --device cuda
  m2d retrieval --weights CLAP.pth --captions audiocaps.csv --data_dir audiocaps/ --split test
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('--weights', '-w', nargs='+', required=True, metavar='W',
                        help='M2D-CLAP weight files or released model names')
    parser.add_argument('--captions', required=True, metavar='CSV', help='caption CSV (file_name + caption columns)')
    parser.add_argument('--data_dir', '--data-dir', dest='data_dir', required=True, metavar='DIR',
                        help='folder the file names are relative to')
    parser.add_argument('--split', default=None, help='rows of this split only (default: test when there is a split '
                                                      'column)')
    parser.add_argument('--ks', default='1,5,10', metavar='K,K,...', help='recall cut-offs (default 1,5,10)')
    parser.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                        help='crop/pad every clip to S seconds (default: each clip whole)')
    parser.add_argument('--text_encoder', '--text-encoder', dest='text_encoder', default=None, metavar='NAME_OR_DIR',
                        help="the CLAP text encoder (default: the one the weight file's name implies)")
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=16,
                        help='clips of equal length encoded together (default 16)')
    parser.add_argument('--text_batch_size', '--text-batch-size', dest='text_batch_size', type=int, default=64,
                        help='captions encoded together (default 64)')
    parser.add_argument('--output_dir', '--output-dir', dest='output_dir', default=None, metavar='DIR',
                        help='report folder (default eval/<weights-name>/retrieval-<csv name>/; with several --weights, '
                             'one sub-folder each)')
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


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(',') if k.strip())
    except ValueError:
        raise CommandError(f'--ks {text!r}: expected whole numbers such as 1,5,10') from None
    if not ks or min(ks) < 1:
        raise CommandError(f'--ks {text!r}: expected whole numbers of at least 1')
    return ks


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..evaluate.linear import weights_name
    from ..evaluate.retrieval import evaluate_retrieval, read_caption_csv, summary_line

    data = read_caption_csv(args.captions, args.data_dir, args.split)
    opts = dict(unit_sec=args.unit_sec, ks=_ks(args.ks), batch_size=args.batch_size,
                text_batch_size=args.text_batch_size, text_encoder=args.text_encoder, device=args.device,
                bf16=args.bf16, cache_dir=args.cache_dir, use_cache=not args.no_cache, max_failed=args.max_failed,
                progress=not args.quiet, trust=args.trust)
    for w in args.weights:
        out = args.output_dir
        if out is not None and len(args.weights) > 1:
            out = Path(out) / weights_name(w)
        report = evaluate_retrieval(w, data, out, **opts)
        print(f'retrieval: {report["weights_name"]} on {data.name} ({report["data"]["clips"]} clips, '
              f'{report["data"]["captions"]} captions): {summary_line(report)} -> {report["output_dir"]}/report.md')
    return 0

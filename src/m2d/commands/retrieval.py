"""`m2d retrieval`: text-audio retrieval (recall@K both ways) of M2D-CLAP weight files on a caption CSV."""

from __future__ import annotations

import argparse

from . import CommandError
from .clap_options import add_encoding_arguments, encoding_options

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
    add_encoding_arguments(parser, 'eval/<weights-name>/retrieval-<csv name>/; with several --weights, one '
                           'sub-folder each', 'clips of equal length encoded together')


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

    from ..evaluate.linear import weight_folders
    from ..evaluate.retrieval import evaluate_retrieval, read_caption_csv, summary_line

    data = read_caption_csv(args.captions, args.data_dir, args.split)
    opts = dict(unit_sec=args.unit_sec, ks=_ks(args.ks), **encoding_options(args))
    for w, sub in zip(args.weights, weight_folders(args.weights)):
        out = args.output_dir
        if out is not None and len(args.weights) > 1:
            out = Path(out) / sub
        report = evaluate_retrieval(w, data, out, **opts)
        print(f'retrieval: {report["weights_name"]} on {data.name} ({report["data"]["clips"]} clips, '
              f'{report["data"]["captions"]} captions): {summary_line(report)} -> {report["output_dir"]}/report.md')
    return 0

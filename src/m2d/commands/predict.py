"""`m2d predict FILES... --weights FT_FILE [--top K] [--json]`: top-k labels of audio files."""

from __future__ import annotations

import argparse

from . import CommandError

EPILOG = """\
FT_FILE is a fine-tuned weight file: one written by `m2d finetune` (labels by name; sigmoid
probabilities for a multi-label task, softmax otherwise) or one fine-tuned by EVAR (labels are class
indices such as #3; add --multilabel for a multi-label task). Files are cropped/zero-padded to the
length the model was fine-tuned on (--unit_sec 0: the whole file).

examples:
  m2d predict clip.wav --weights eval/W/fsdd-digits/finetune/m2d_vit_base-80x608p16x16p16k-fsdd-digits/weights_best.pth
  m2d predict clips/*.wav --weights FT.pth --top 3 --json > predictions.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('files', nargs='+', metavar='FILE', help='audio files (folders are searched recursively)')
    parser.add_argument('--weights', '-w', required=True, metavar='FT_FILE', help='a fine-tuned weight file')
    parser.add_argument('--top', type=int, default=5, metavar='K', help='labels shown per file (default %(default)s)')
    parser.add_argument('--json', action='store_true', help='print JSON: [{"file", "top": [{"label", "index", "probability"}]}]')
    parser.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                        help='crop/pad each file to S seconds (default: the fine-tuning length; 0: whole file)')
    parser.add_argument('--multilabel', action='store_true',
                        help='sigmoid probabilities (for EVAR files of multi-label tasks, which do not say)')
    parser.add_argument('--device', default=None, help='torch device (default cuda if available, else cpu)')
    parser.add_argument('--trust', action='store_true', help='allow weight files that need code to unpickle')


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..audio import find_audio_files
    from ..evaluate.predict import load_classifier, predict_files
    from ..runtime import resolve_device

    if args.top < 1:
        raise CommandError(f'--top {args.top}: must be at least 1')
    if args.unit_sec is not None and args.unit_sec < 0:
        raise CommandError(f'--unit_sec {args.unit_sec}: must be >= 0')
    files = []
    for f in args.files:
        p = Path(f)
        if p.is_dir():
            found = find_audio_files(p)
            if not found:
                raise CommandError(f'{p}: no audio files in this folder')
            files += found
        elif not p.is_file():
            raise CommandError(f'{p}: no such file')
        else:
            files.append(p)
    clf = load_classifier(args.weights, multilabel=True if args.multilabel else None, trust=args.trust)
    results = predict_files(clf, files, top=args.top, unit_sec=args.unit_sec, device=resolve_device(args.device))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(r['file'] + '\t' + '  '.join(f'{t["label"]} {t["probability"]:.3f}' for t in r['top']))
    return 0

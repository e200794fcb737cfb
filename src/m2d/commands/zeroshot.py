"""`m2d zeroshot`: zero-shot classification of labeled audio tasks with M2D-CLAP weight files."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError
from .clap_options import add_encoding_arguments, encoding_options

EPILOG = """\
The protocol is EVAR's (zeroshot.py): one caption per class ("{label} can be heard", with EVAR's
wording per task: CREMA-D's six sentences, "<genre> music" for GTZAN, "the musical instrument sound
of <family>" for NSynth, AudioSet display names for as20k; "_" becomes a space), each test clip
cropped/zero-padded to the task's unit and encoded whole, cosine similarity, accuracy (mAP for
multi-label tasks). A fold task scores every fold's held-out clips and pools the predictions into
one score, as EVAR; the per-fold scores are in the report. Nothing is trained.

Tasks as `m2d linear-eval` takes them: --task esc50|us8k|spcv2|vc1|voxforge|cremad|gtzan|nsynth|
surge|fsd50k|as20k with --data_dir DIR holding TASK.csv (as `m2d datasets TASK DIR` writes it), a
CSV (--csv FILE --data_dir DIR: file_name,label[,split|fold]; without split/fold every clip is
scored), or a folder of class sub-folders. --suite evar --data_dir ROOT: the M2D-CLAP paper's seven
zero-shot tasks from ROOT/<task>/, the published results beside.

Output: OUTPUT_DIR/report.json and report.md; default OUTPUT_DIR eval/<weights-name>/zeroshot-<task>/.
A suite (or several --weights) also writes OUTPUT_DIR/summary.md and summary.json. CLAP audio
embeddings are cached (~/.cache/m2d/embeddings, or $M2D_CACHE).

examples:
  m2d zeroshot --weights m2d_clap_vit_base-80x608p16x16-240128 --task esc50 --data_dir data/esc50
  m2d zeroshot --weights m2d_clap_vit_base-80x608p16x16-240128 --suite evar --data_dir data --device cuda
  m2d zeroshot --weights CLAP.pth --csv my_sounds.csv --data_dir my_sounds/ --template "the sound of {label}"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('--weights', '-w', nargs='+', required=True, metavar='W',
                        help='M2D-CLAP weight files or released model names; several are compared')
    src = parser.add_argument_group('task (one of)')
    src.add_argument('--task', default=None, metavar='NAME', help="one of EVAR's tasks (read from DATA_DIR/NAME.csv)")
    src.add_argument('--csv', default=None, metavar='FILE', help='CSV with file_name,label[,split|fold]')
    src.add_argument('--data_dir', '--data-dir', dest='data_dir', default=None, metavar='DIR',
                     help='audio folder (of the task, of the CSV, or with one sub-folder per class); ROOT for a suite')
    src.add_argument('--suite', default=None, metavar='evar|FILE',
                     help="'evar' with --data_dir ROOT: the M2D-CLAP paper's zero-shot table; or a TOML/YAML task list")
    src.add_argument('--fold', default=None, metavar='K', help='score only fold K of a fold task (default: every fold)')
    parser.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                        help="crop/pad every clip to S seconds (default: EVAR's unit for its tasks, else the longest "
                             'clip, at most 10 s)')
    parser.add_argument('--template', default=None, metavar='TEXT',
                        help='caption sentence, {label} = the class name (default "{label} can be heard", EVAR)')
    add_encoding_arguments(parser, 'eval/<weights-name>/zeroshot-<task>/, eval/zeroshot-evar/ for the suite',
                           'clips encoded together')


def options(args: argparse.Namespace) -> dict:
    """`ZeroShotOptions` keyword arguments from the command line."""
    from ..evaluate.captions import EVAR_TEMPLATE

    return dict(template=args.template or EVAR_TEMPLATE, fold=args.fold, **encoding_options(args))


def run(args: argparse.Namespace) -> int:
    from ..evaluate import zeroshot

    if args.suite is not None:
        is_evar = args.suite.lower() == 'evar' and not Path(args.suite).is_file()
        if args.task or args.csv or (not is_evar and args.data_dir):
            raise CommandError('--suite lists its own tasks: give --data_dir ROOT with --suite evar, and no --task or '
                               '--csv')
        summary = zeroshot.run_zeroshot_suite(args.weights, args.suite, args.data_dir, args.output_dir,
                                              unit_sec=args.unit_sec, **options(args))
        out = Path(args.output_dir) if args.output_dir else Path('eval') / (
            'zeroshot-evar' if is_evar else f'zeroshot-{Path(args.suite).stem}')
        print((out / 'summary.md').read_text(encoding='utf-8'), end='')
        errors, gaps = summary['errors'], summary.get('gaps') or {}
        print(f'zeroshot: {len(summary["rows"])} rows x {len(summary["tasks"])} tasks -> {out}/summary.md'
              + (f' ({len(gaps)} missing)' if gaps else '') + (f' ({len(errors)} failed: see the summary)' if errors
                                                                else ''))
        return 1 if errors else 0

    task = zeroshot.load_zeroshot_task(args.task, csv=args.csv, data_dir=args.data_dir, unit_sec=args.unit_sec)
    result = zeroshot.zeroshot_eval(args.weights, task, args.output_dir, **options(args))
    for r in result.get('reports', [result]):
        m = r['model']
        folds = f' (pooled over {len(m["per_fold"])} folds; plain fold mean {100 * m["fold_mean"]:.2f} %)' \
            if 'per_fold' in m else ''
        print(f'zeroshot: {r["weights_name"]} on {task.name}: {r["metric"]} {100 * m["mean"]:.2f} % on '
              f'{m["n_test"]} clips{folds} -> {r["output_dir"]}/report.md')
    return 0

"""`m2d linear-eval`: linear evaluation of weight files on a labeled audio task or a suite of tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError

EPILOG = """\
The protocol is EVAR's (lineareval.py and its TorchMLPClassifier2): a linear layer on standardized
embeddings, Adam lr 3e-5 (weight decay 1e-8), batch min(200, N), at most 200 epochs, early stopping
after 20 epochs without a better validation score, best-validation weights tested; a fold task runs
every fold as the test set (10 % of train carved for validation) and reports the mean over folds.

A task is one of EVAR's by name (--task esc50|us8k|spcv1|spcv2|vc1|voxforge|cremad|gtzan|nsynth|surge|
fsd50k|as20k|nspitch|nsvelocity|cremad_gender with --data_dir DIR holding TASK.csv, as `m2d datasets
TASK DIR` writes it, or EVAR's own --csv evar/metadata/TASK.csv --data_dir evar/work/16k/TASK), a
built-in one (--task fsdd-digits|fsdd-speakers with --data_dir holding recordings/), a CSV (--csv FILE
--data_dir DIR: columns file_name,label and split or fold), or a folder whose sub-folders are the
classes (--data_dir DIR alone). Without a split or fold column the clips are split 70/10/20
(stratified, --seed). Every report also gives two baselines computed the same way: raw log-mel
statistics and a randomly initialized encoder of the same shape.

Output: OUTPUT_DIR/report.json and report.md (+ figures); default OUTPUT_DIR eval/<weights-name>/<task>/.
Several --weights or --suite also write OUTPUT_DIR/summary.md and summary.json (rows: weight files
and baselines, columns: tasks). Embeddings are cached (~/.cache/m2d/embeddings, or $M2D_CACHE), so
a second run on the same weights and task starts at the classifier.

examples:
  m2d linear-eval --weights m2d_vit_base-80x608p16x16-221006-mr7 --task esc50 --data_dir data/esc50
  m2d linear-eval --weights A.pth B.pth --suite evar --data_dir data     # the seed README's table
  m2d linear-eval --weights m2d_vit_base-80x608p16x16-221006-mr7 --task fsdd-digits --data_dir data/fsdd
  m2d linear-eval --weights runs/RUN/checkpoint-300.pth --csv evar/metadata/cremad.csv \\
      --data_dir evar/work/16k/cremad --unit_sec 2.5
  m2d linear-eval --weights a.pth b.pth --data_dir my_sounds/ --per_layer
  m2d linear-eval --weights W.pth --suite evar.toml --output_dir eval/evar --device cuda
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('--weights', '-w', nargs='+', required=True, metavar='W',
                        help='weight files (.pth, .safetensors) or released model names; several are compared')
    src = parser.add_argument_group('task (one of)')
    src.add_argument('--task', default=None, metavar='NAME',
                     help="one of EVAR's tasks (esc50, us8k, ..., read from DATA_DIR/NAME.csv) or a built-in one "
                          '(fsdd-digits, fsdd-speakers)')
    src.add_argument('--csv', default=None, metavar='FILE', help='CSV with file_name,label[,split] (labels a;b: multi-label)')
    src.add_argument('--data_dir', '--data-dir', dest='data_dir', default=None, metavar='DIR',
                     help='audio folder (of the CSV, of the FSDD recordings, or with one sub-folder per class)')
    src.add_argument('--suite', default=None, metavar='FILE|evar',
                     help="TOML/YAML list of tasks: one summary table; 'evar' with --data_dir ROOT: the nine tasks "
                          "of the seed README's table from ROOT/<task>/, published rows beside")
    src.add_argument('--fold', default=None, metavar='K', help='run only fold K of a fold task (default: every fold)')
    parser.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                        help="crop/pad every clip to S seconds (default: EVAR's unit for its tasks, else the longest clip, "
                             'at most 10 s)')
    parser.add_argument('--layers', default=None, metavar='SPEC',
                        help='"all" or layer indices such as "0,6,-1": time-means concatenated (default: last layer)')
    parser.add_argument('--per_layer', '--per-layer', dest='per_layer', action='store_true',
                        help='also one result per layer (all layers unless --layers) and a plot against depth')
    parser.add_argument('--seeds', type=int, default=3, help='probe trainings with seeds SEED..SEED+N-1 (default 3)')
    parser.add_argument('--seed', type=int, default=0,
                        help='first seed; also the split seed of tasks without a split column (default 0)')
    parser.add_argument('--lr', type=float, default=3e-5, help='Adam learning rate of the probe (default 3e-5)')
    parser.add_argument('--epochs', type=int, default=200, help='maximum probe epochs (default 200)')
    parser.add_argument('--patience', type=int, default=20,
                        help='stop after N epochs without validation improvement (default 20)')
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=None,
                        help="probe batch size (default EVAR's min(200, N), N = training clips)")
    parser.add_argument('--weight_decay', '--weight-decay', dest='weight_decay', type=float, default=1e-8,
                        help='Adam weight decay of the probe (default 1e-8, EVAR)')
    parser.add_argument('--embed_batch_size', '--embed-batch-size', dest='embed_batch_size', type=int, default=16,
                        help='clips encoded together (default 16)')
    parser.add_argument('--norm_stats', '--norm-stats', dest='norm_stats', default=None, metavar='auto|MEAN,STD',
                        help="normalization: the weight file's (default), auto (the train split's), or MEAN,STD")
    parser.add_argument('--no_baselines', '--no-baselines', dest='no_baselines', action='store_true',
                        help='skip the log-mel and random-encoder baselines')
    parser.add_argument('--random_seed', '--random-seed', dest='random_seed', type=int, default=0,
                        help='initialization seed of the random-encoder baseline (default 0)')
    parser.add_argument('--output_dir', '--output-dir', dest='output_dir', default=None, metavar='DIR',
                        help='report folder (default eval/<weights-name>/<task>/, eval/suite-<name>/ for a suite)')
    parser.add_argument('--cache_dir', '--cache-dir', dest='cache_dir', default=None, metavar='DIR',
                        help='embedding cache (default $M2D_CACHE/embeddings or ~/.cache/m2d/embeddings)')
    parser.add_argument('--no_cache', '--no-cache', dest='no_cache', action='store_true',
                        help='neither read nor write cached embeddings')
    parser.add_argument('--max_failed', '--max-failed', dest='max_failed', type=float, default=0.01, metavar='F',
                        help='the largest fraction of unreadable clips skipped (reported) before it is an error '
                             '(default 0.01)')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--bf16', action='store_true', help='encode in bfloat16 (GPUs, CPUs with AMX/avx512_bf16)')
    parser.add_argument('--no_figures', '--no-figures', dest='no_figures', action='store_true', help='no figures')
    parser.add_argument('--trust', action='store_true', help='allow weight files that need code to unpickle')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bars')


def _options(args: argparse.Namespace) -> dict:
    if args.max_failed < 0 or args.max_failed > 1:
        raise CommandError(f'--max_failed {args.max_failed}: expected a fraction between 0 and 1')
    return dict(layers=args.layers, per_layer=args.per_layer, seeds=args.seeds, seed=args.seed, lr=args.lr,
                epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                weight_decay=args.weight_decay, fold=args.fold, norm_stats=args.norm_stats,
                baselines=not args.no_baselines, random_seed=args.random_seed, device=args.device, bf16=args.bf16,
                embed_batch_size=args.embed_batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                max_failed=args.max_failed, figures=not args.no_figures, progress=not args.quiet, trust=args.trust)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.report import pct

    if args.suite is not None and args.suite.lower() == 'evar' and not Path(args.suite).is_file():
        if args.task or args.csv or not args.data_dir:
            raise CommandError('--suite evar reads ROOT/<task>/<task>.csv: give --data_dir ROOT (and no --task or --csv)')
        from ..evaluate.suite import run_evar_suite

        summary = run_evar_suite(args.weights, args.data_dir, args.output_dir, unit_sec=args.unit_sec,
                                 split_seed=args.seed, **_options(args))
        return _print_summary(summary, args.output_dir or Path('eval') / 'suite-evar')
    if args.suite is not None:
        if args.task or args.csv or args.data_dir:
            raise CommandError('--suite FILE lists its own tasks; do not combine it with --task, --csv or --data_dir')
        from ..evaluate.suite import run_suite

        summary = run_suite(args.weights, args.suite, args.output_dir, unit_sec=args.unit_sec, split_seed=args.seed,
                            **_options(args))
        return _print_summary(summary, args.output_dir or Path('eval') / f'suite-{Path(args.suite).stem}')

    from ..evaluate import linear_eval, load_task

    task = load_task(args.task, csv=args.csv, data_dir=args.data_dir, unit_sec=args.unit_sec, seed=args.seed)
    result = linear_eval(args.weights, task, args.output_dir, **_options(args))
    reports = result.get('reports', [result])
    for r in reports:
        print(f'linear-eval: {r["weights_name"]} on {task.name}: {r["metric"]} {pct(r["model"])}'
              + (f' (random {pct(r.get("random"))}, log-mel {pct(r.get("logmel"))})' if 'random' in r else '')
              + f' -> {r["output_dir"]}/report.md')
    return 0


def _print_summary(summary: dict, out) -> int:
    """The summary table on stdout (it is the product), then where it was written."""
    print((Path(out) / 'summary.md').read_text(encoding='utf-8'), end='')
    gaps, errors = summary.get('gaps') or {}, summary['errors']
    print(f'linear-eval: {len(summary["rows"])} rows x {len(summary["tasks"])} tasks -> {out}/summary.md'
          + (f' ({len(gaps)} missing)' if gaps else '')
          + (f' ({len(errors)} failed: see the summary)' if errors else ''))
    return 1 if errors else 0

"""`m2d superb ACTION`: SUPERB (s3prl) from nothing to the five task results.

    m2d superb install ~/s3prl                                  # register the m2d upstream
    m2d superb stats KS --s3prl_root ~/s3prl --ckpt W.pth       # task statistics -> -k W.pth,MEAN,STD
    m2d superb run KS --ckpt W.pth --s3prl_root ~/s3prl         # preflight, s3prl train + evaluate
    m2d superb report ~/s3prl/s3prl/result/downstream/*         # one table of the results
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

TASK_HELP = 'PR (ctc/libriphone), KS (speech_commands), IC (fluent_commands), SID (voxceleb1), ER (emotion)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = 'examples:\n' + __doc__.split('\n', 2)[2]
    sub = parser.add_subparsers(dest='action', required=True, metavar='ACTION')

    for action, help in (('install', 'write s3prl/upstream/m2d and register it in s3prl/hub.py'),
                         ('uninstall', 'remove the m2d upstream: revert hub.py, delete s3prl/upstream/m2d')):
        p = sub.add_parser(action, help=help)
        p.add_argument('s3prl_root', help='root of an s3prl checkout (the folder holding s3prl/hub.py)')
        p.add_argument('--dry_run', '--dry-run', dest='dry_run', action='store_true',
                       help='only show what would change')

    p = sub.add_parser('stats', formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a task's normalization statistics (mean, std of its log-mel) -> -k CKPT,MEAN,STD",
                       epilog='examples:\n'
                              '  m2d superb stats KS --s3prl_root ~/s3prl --ckpt W.pth   # the training split of KS\n'
                              '  m2d superb stats my_clips/ --batch_size 8                # any folder or CSV\n'
                              '  m2d superb stats --preset voxceleb1 --ckpt W.pth         # the published numbers\n'
                              'The statistic is that of the padded batches s3prl feeds the upstream (see\n'
                              'm2d.superb.stats); batch size, crops and gains follow the downstream config.')
    p.add_argument('source', nargs='?', help=f'a task ({TASK_HELP}), or a folder / CSV of audio files')
    p.add_argument('--s3prl_root', '--s3prl-root', dest='s3prl_root', default='.',
                   help='root of the s3prl checkout whose downstream config names the data (default .)')
    p.add_argument('--preset', default=None, help='print the published statistics of a task instead (no audio read)')
    p.add_argument('--ckpt', default='CKPT', help='weight file to put in the printed -k argument')
    p.add_argument('--max_files', '--max-files', dest='max_files', type=int, default=None,
                   help='read only this many files (a random sample) for a quick estimate')
    p.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=None,
                   help="waveforms padded together (default: the task config's training batch size; 1 for a folder)")
    p.add_argument('--seed', type=int, default=0, help='seed of the file order, draws and crops (default 0)')
    p.add_argument('--json', default=None, help='also write the result to this JSON file')
    p.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true', help='no progress bar')

    p = sub.add_parser('run', formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="s3prl's train and evaluate steps of a task, as the reference's task scripts",
                       epilog='examples:\n'
                              '  m2d superb run KS --ckpt /w/m2d_s_vit_base-80x608p80x2-230220/checkpoint-1000.pth '
                              '--s3prl_root ~/s3prl --dry-run\n'
                              '  m2d superb run ER --ckpt W.pth --stats=-13.04,3.62 --seed 7 --gpu 0\n'
                              '  m2d superb run KS --ckpt W.pth --device cpu -o "config.runner.total_steps=6,,'
                              'config.runner.eval_step=3"   # a smoke run\n'
                              'Before the first s3prl command a preflight checks that --python imports s3prl, the\n'
                              "task's downstream and their imports, that the device exists and that the config's\n"
                              'data roots do; --dry-run prints the commands and its findings.')
    p.add_argument('task', help=TASK_HELP)
    p.add_argument('--ckpt', required=True, help='M2D weight file (or a released model name)')
    p.add_argument('--stats', nargs='+', default=None, metavar='MEAN,STD',
                   help='the task statistics as --stats=MEAN,STD, --stats MEAN STD (a negative MEAN needs one '
                        'of these two spellings) or a JSON file of `m2d superb stats --json`; '
                        'default: the published statistics of the task')
    p.add_argument('--seed', type=int, default=7, help='s3prl --seed, also in the experiment name (default 7)')
    p.add_argument('--lr', default=None,
                   help="learning rate (default: the task script's: PR/IC/SID 1e-3, KS 1e-4, ER 1e-5)")
    p.add_argument('--s3prl_root', '--s3prl-root', dest='s3prl_root', default='.', help='root of the s3prl checkout')
    p.add_argument('--upstream', default='m2d', help='s3prl upstream name (default m2d)')
    p.add_argument('--folds', default=None, help='ER only: comma-separated folds to run (default all five)')
    p.add_argument('--device', default=None, metavar='cpu|cuda[:N]',
                   help="s3prl's --device for every command (default: cuda when --python's torch has CUDA, else cpu)")
    p.add_argument('-o', '--override', dest='override', action='append', default=None, metavar='KEY=VALUE,,...',
                   help='s3prl overrides ("config.runner.total_steps=100,,config.downstream_expert.datarc.'
                        'batch_size=8"), appended to the training command\'s own -o; may be repeated')
    p.add_argument('--gpu', default=None, help='set CUDA_VISIBLE_DEVICES for s3prl')
    p.add_argument('--no_preflight', '--no-preflight', dest='preflight', action='store_false',
                   help='skip the checks before the first s3prl command')
    p.add_argument('--python', default=sys.executable, help='Python that runs s3prl (default: this one)')
    p.add_argument('--dry_run', '--dry-run', dest='dry_run', action='store_true',
                   help="print the s3prl commands and the preflight's findings; run nothing")

    p = sub.add_parser('report', help="one table of the test results in s3prl experiment folders")
    p.add_argument('expdirs', nargs='+', metavar='EXP_DIR',
                   help='s3prl experiment folders (result/downstream/NAME), or a folder holding them')


def run(args: argparse.Namespace) -> int:
    actions = {'install': _install, 'uninstall': _uninstall, 'stats': _stats, 'run': _run, 'report': _report}
    return actions[args.action](args)


def _install(args: argparse.Namespace) -> int:
    from ..superb.install import install

    path, changes = install(args.s3prl_root, dry_run=args.dry_run)
    if args.dry_run:
        print('\n'.join(f'would {c}' for c in changes) or f'nothing to do: the m2d upstream is installed in {path}')
    else:
        print(f'installed the m2d upstream in {path} ({len(changes)} changes); use -u m2d -k CKPT,MEAN,STD')
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from ..superb.install import uninstall

    changes = uninstall(args.s3prl_root, dry_run=args.dry_run)
    prefix = 'would ' if args.dry_run else ''
    print('\n'.join(prefix + c for c in changes) or 'nothing to do: the m2d upstream is not installed')
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from ..fileio import atomic_path
    from ..superb import SuperbError
    from ..superb.stats import folder_split, split_stats, task_split
    from ..superb.tasks import ckpt_argument, get_task

    ckpt = ckpt_argument(args.ckpt) if args.ckpt != 'CKPT' else 'CKPT'
    if args.preset:
        task = get_task(args.preset)
        mean, std = task.stats
        print(f'{task.name} ({task.downstream}): published statistics mean={mean} std={std}')
        print(f'-k {ckpt},{mean},{std}')
        return 0
    if not args.source:
        raise SuperbError('give a task (KS, IC, ER, PR, SID), a folder or CSV of audio, or --preset TASK')
    if args.max_files is not None and args.max_files < 1:
        raise SuperbError(f'--max_files {args.max_files}: must be at least 1')
    if Path(args.source).exists():
        split = folder_split(args.source, args.batch_size or 1, args.seed, args.max_files)
    else:
        try:
            get_task(args.source)
        except SuperbError:
            raise SuperbError(f'{args.source}: not a SUPERB task (PR, KS, IC, SID, ER) and no such folder or '
                              'CSV file') from None
        split = task_split(args.source, args.s3prl_root, args.seed, args.max_files)
        if args.batch_size:
            split.batch_size = args.batch_size
    if split.batch_size < 1:
        raise SuperbError(f'--batch_size {split.batch_size}: must be at least 1')
    log.info('%s: %d files in padded batches of %d%s', split.name, len(split.draws), split.batch_size,
             ''.join(f'; {n}' for n in split.notes))
    stats = split_stats(split, seed=args.seed, progress=not args.no_progress)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(stats, indent=2) + '\n')
    print(f'{stats["task"]}: mean={stats["mean"]} std={stats["std"]} over {stats["values"]} values of '
          f'{stats["files"]} files (padded batches of {stats["batch_size"]}, {stats["failed"]} unreadable)')
    print(f'-k {ckpt},{stats["mean"]},{stats["std"]}')
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..superb import SuperbError
    from ..superb.preflight import Preflight, preflight
    from ..superb.report import format_table, read_result
    from ..superb.tasks import (check_device, find_s3prl_dir, get_task, parse_lr, parse_overrides, shell_join,
                                 task_commands)

    task = get_task(args.task)
    stats = _stats_argument(args.stats) if args.stats else None
    if stats is None:
        log.info('%s: using the published statistics mean=%s std=%s (your own: m2d superb stats %s)',
                 task.name, *task.stats, task.name)
    folds = [f.strip() for f in args.folds.split(',')] if args.folds else None
    lr = parse_lr(args.lr) if args.lr else None
    device = check_device(args.device) if args.device is not None else None
    overrides = parse_overrides(args.override)
    task_commands(task, args.ckpt, stats, args.seed, lr, args.upstream, args.python, folds)  # argument errors first
    s3prl_dir = find_s3prl_dir(args.s3prl_root, required=not args.dry_run)
    env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': str(args.gpu)} if args.gpu is not None else {}))
    if args.preflight:
        check = preflight(task, s3prl_dir, args.python, args.upstream, overrides, env, device)
    else:
        check = Preflight(device=device or ('cuda' if _local_cuda() else 'cpu'))
    steps = task_commands(task, args.ckpt, stats, args.seed, lr, args.upstream, args.python, folds,
                          check.device, overrides)
    gpu_prefix = f'CUDA_VISIBLE_DEVICES={args.gpu} ' if args.gpu is not None else ''
    if args.dry_run:
        if not (s3prl_dir / 'run_downstream.py').is_file():
            log.warning('%s: no run_downstream.py there (yet); the commands run in that folder', s3prl_dir)
        print(f'cd {shlex.quote(str(s3prl_dir))}')
        for step in steps:
            print(gpu_prefix + shell_join(step.train))
            print(gpu_prefix + shell_join(step.evaluate, step.evaluate_env))
        if args.preflight:
            for finding in check.findings + [check.pip_line] if check.findings else [_ready_line(check)]:
                if finding:
                    print(f'# preflight: {finding}')
        return 0
    if check.findings:
        raise SuperbError(check.message(task))
    if args.preflight:
        log.info('preflight: %s', _ready_line(check))
    results = []
    for step in steps:
        expdir = s3prl_dir / step.expdir
        started = time.time()
        _s3prl(task, step, 'train', step.train, env, s3prl_dir)
        best = expdir / 'dev-best.ckpt'
        if not best.is_file() or best.stat().st_mtime < started - 1:
            raise SuperbError(f'{task.name}: s3prl training of {step.name} wrote no new dev-best.ckpt in {expdir} '
                              '(it does so at a dev evaluation, every config.runner.eval_step steps)')
        log.info('%s evaluate: s3prl reads back its own dev-best.ckpt with a bare torch.load, which torch >= 2.6 '
                 'refuses (it holds an argparse.Namespace); so %s for this s3prl process only (the m2d upstream '
                 'still loads M2D weights with weights_only=True)', step.name,
                 ' '.join(f'{k}={v}' for k, v in step.evaluate_env.items()))
        _s3prl(task, step, 'evaluate', step.evaluate, dict(env, **step.evaluate_env), s3prl_dir)
        results.append(read_result(expdir))
        print(f'{step.name}: {results[-1].metric} {results[-1].value:.2f} (in {expdir}/'
              f'{"test-hyp.ark" if task.metric == "per" else "log.log"})')
    print(format_table(results))
    return 0


def _s3prl(task, step, what: str, argv: list[str], env: dict[str, str], s3prl_dir: Path) -> None:
    """Run one s3prl command in its folder; a SuperbError naming the step when it fails."""
    from ..superb import SuperbError
    from ..superb.tasks import shell_join

    log.info('%s %s: %s', step.name, what, shell_join(argv, {k: v for k, v in env.items() if os.environ.get(k) != v}))
    code = subprocess.run(argv, cwd=s3prl_dir, env=env).returncode
    if code != 0:
        raise SuperbError(f'{task.name}: s3prl {what} of {step.name} failed (exit status {code}); '
                          f'its output is above, its folder {s3prl_dir / step.expdir}')


def _ready_line(check) -> str:
    info = check.probe or {}
    return (f'ready (s3prl from {info.get("s3prl")}, torch {info.get("torch")}, device {check.device}; '
            'imports and data roots found)')


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _stats_argument(values: list[str]) -> tuple[str, str]:
    """--stats MEAN,STD | MEAN STD | FILE.json (written by `m2d superb stats --json`)."""
    import json

    from ..superb import SuperbError
    from ..superb.tasks import parse_stats

    if len(values) == 1 and values[0].lower().endswith('.json'):
        try:
            saved = json.loads(Path(values[0]).read_text())
            return parse_stats(f'{saved["mean"]!r},{saved["std"]!r}', f'--stats {values[0]}')
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SuperbError(f'--stats {values[0]}: not a statistics file of m2d superb stats --json ({e})') from None
    return parse_stats(','.join(values))


def _experiment_dirs(paths: list[str]) -> list[Path]:
    from ..superb.report import NAME_RE

    out = []
    for p in map(Path, paths):
        looks_done = (p / 'log.log').exists() or (p / 'test-hyp.ark').exists() or any(p.glob('args_*.yaml'))
        if p.is_dir() and not looks_done and not NAME_RE.search(p.name):
            out += sorted(d for d in p.iterdir() if d.is_dir() and NAME_RE.search(d.name))
        else:
            out.append(p)
    return out


def _report(args: argparse.Namespace) -> int:
    from ..superb import SuperbError
    from ..superb.report import format_table, read_result

    dirs = _experiment_dirs(args.expdirs)
    if not dirs:
        raise SuperbError(f'{" ".join(args.expdirs)}: no s3prl experiment folders')
    print(format_table([read_result(d) for d in dirs]))
    return 0

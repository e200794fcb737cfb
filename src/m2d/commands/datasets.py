"""`m2d datasets TASK DEST`: prepare EVAR's downstream tasks (and FSDD) from their official
distributions: audio to mono WAV at one rate, `DEST/<task>.csv` by EVAR's rules, `DEST/PREPARED.json`."""

from __future__ import annotations

import argparse

from . import CommandError

EPILOG = """\
tasks: esc50 us8k spcv1 spcv2 vc1 voxforge cremad gtzan nsynth surge fsd50k as20k (EVAR's names) and
fsdd (the Free Spoken Digit Dataset: recordings/ and metadata.csv). `m2d datasets --list` shows each
task's size, license, whether it downloads, and the --source layout it expects.

DEST receives the audio under EVAR's relative paths (mono 16-bit WAV at --sample_rate),
DEST/<task>.csv (file_name,label,split|fold; nsynth also writes nspitch.csv and nsvelocity.csv,
cremad also cremad_gender.csv), DEST/PREPARED.json, and DEST/datasets_failures.csv when clips are
missing or unreadable. An interrupted run continues where it stopped; a finished DEST is left as it is.

examples:
  m2d datasets esc50 data/evar/esc50                       # downloads the ESC-50 archive
  m2d datasets gtzan data/evar/gtzan --source downloads/genres.tar.gz
  m2d datasets nsynth data/evar/nsynth --source nsynth-train.jsonwav.tar.gz \\
      --source nsynth-valid.jsonwav.tar.gz --source nsynth-test.jsonwav.tar.gz
  m2d linear-eval --weights W.pth --csv data/evar/esc50/esc50.csv --data_dir data/evar/esc50
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('name', nargs='?', metavar='TASK', help='a task (see below) or fsdd')
    parser.add_argument('dest', nargs='?', metavar='DEST', help='output folder')
    parser.add_argument('--list', action='store_true', help='list the tasks and exit')
    parser.add_argument('--source', action='append', default=None, metavar='PATH_OR_URL',
                        help='the dataset as published: a folder, a zip or tar(.gz) archive, or a URL '
                             '(repeat for datasets shipped in several archives; default: download where possible)')
    parser.add_argument('--sample_rate', '--sample-rate', dest='sample_rate', type=int, default=16000,
                        help='output rate: 16000 (default) or 32000 (the 32-kHz models)')
    parser.add_argument('--workers', type=int, default=2, help='worker processes (default 2; 0: this process)')
    parser.add_argument('--split_file', '--split-file', dest='split_file', action='append', default=None,
                        metavar='F', help='a split list replacing the shipped one, or one the task needs '
                                          '(see --list); repeat for several')
    parser.add_argument('--link', action='store_true', help='fsdd: symlink the files of a local --source folder')
    parser.add_argument('--no_progress', '--no-progress', dest='no_progress', action='store_true',
                        help='no progress bar')


def _list() -> int:
    from ..data.tasks import TASKS, get_spec

    for t in TASKS:
        s = get_spec(t)
        size = f'{s.size:,} clips' if s.size else 'size varies'
        derived = f' (+ {", ".join(s.derived)})' if s.derived else ''
        print(f'{t}{derived}: {s.title}, {size}, {s.column}s; license: {s.license}; '
              f'{"downloads" if s.urls else "no download: " + s.where}')
        print(f'    --source: {s.layout}')
        if s.split_file:
            print(f'    --split_file: {s.split_file}')
    print('fsdd: Free Spoken Digit Dataset, 3,000 clips; license: CC BY-SA 4.0; downloads')
    return 0


def _fsdd(args: argparse.Namespace) -> int:
    from ..data.fsdd import prepare_fsdd

    if args.source and len(args.source) > 1:
        raise CommandError('--source: fsdd takes one source')
    r = prepare_fsdd(args.dest, args.source[0] if args.source else None, link=args.link,
                     progress=not args.no_progress)
    print(f'{r.recordings}: {r.files} recordings ({r.added} added); metadata: {r.metadata}')
    print(f'next: m2d convert {r.recordings} DATA/lms_fsdd')
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    if not args.name or not args.dest:
        raise CommandError('give TASK and DEST (or --list)')
    if args.name == 'fsdd':
        return _fsdd(args)
    from ..data.tasks import DatasetError
    from ..data.tasks.prepare import prepare_task

    if args.workers < 0:
        raise CommandError(f'--workers {args.workers}: must be 0 or more')
    try:
        r = prepare_task(args.name, args.dest, args.source, sample_rate=args.sample_rate, workers=args.workers,
                         split_files=args.split_file, progress=not args.no_progress)
    except DatasetError as e:
        raise CommandError(str(e)) from None
    if r.already:
        print(f'{r.dest}: {r.task} is already prepared ({r.rows} files); nothing to do')
        return 0
    counts = ', '.join(f'{k}: {v}' for k, v in r.counts.items())
    official = f' of the official {r.official}' if r.official else ''
    print(f'{r.task}: {r.rows}{official} files in {r.dest} ({counts}); {r.summary}')
    print('metadata: ' + ', '.join(map(str, r.csvs)))
    if r.summary.failed:
        print(f'{len(r.summary.failed)} files missing or unreadable: {r.summary.failures_csv}')
    return 0 if r.rows else 1

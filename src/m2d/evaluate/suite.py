"""Suites: several tasks evaluated in one command, summarized in one table (rows = weight files and
baselines, columns = tasks), the shape of the results table in M2D's README.

A suite file is TOML (or YAML when PyYAML is installed), a list of tasks; relative paths are relative
to the suite file::

    # evar.toml
    [[task]]
    name = "cremad"
    csv = "evar/metadata/cremad.csv"      # EVAR's metadata, as it is
    data_dir = "evar/work/16k/cremad"
    unit_sec = 2.5

    [[task]]
    name = "digits"
    task = "fsdd-digits"                  # a built-in task
    data_dir = "data/fsdd"

Keys per task: ``name``, one of ``task``/``csv``/``data_dir`` as for a single task, optional
``unit_sec`` and ``seed`` (the split seed). YAML: the same keys in a list (or under ``task:``).

The built-in suite ``evar`` (`run_evar_suite`) needs no file: the nine tasks of the seed README's
table from ``ROOT/<task>/<task>.csv`` (as `m2d datasets` writes them), summarized in that table's
shape and order with the published rows of the three released weights beside the evaluated ones;
a task missing under ROOT is a listed gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import M2DError
from .evar import PUBLISHED, SEED_TABLE_TASKS
from .linear import LinearOptions, evaluate_weights, weights_name
from .summary import write_summary
from .tasks import load_task

log = logging.getLogger(__name__)

TASK_KEYS = {'name', 'task', 'csv', 'data_dir', 'unit_sec', 'seed'}


class SuiteError(M2DError):
    """A suite file that cannot be used; the message names the file and the entry."""


def read_suite(path: str | Path) -> list[dict[str, Any]]:
    """The task entries of a suite file, with paths made absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f'--suite {path}: no such file')
    text = path.read_text(encoding='utf-8')
    if path.suffix.lower() in ('.yaml', '.yml'):
        try:
            import yaml
        except ImportError:
            raise SuiteError(f'--suite {path}: reading YAML needs PyYAML (pip install pyyaml); or write the suite '
                             'in TOML') from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SuiteError(f'--suite {path}: not valid YAML ({str(e).splitlines()[0]})') from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SuiteError(f'--suite {path}: not valid TOML ({e})') from None
    if isinstance(data, dict):
        data = data.get('task', data.get('tasks'))
    if not isinstance(data, list) or not data:
        raise SuiteError(f'--suite {path}: expected a list of tasks ([[task]] entries in TOML)')
    entries, names = [], set()
    for i, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise SuiteError(f'--suite {path}: task {i} is not a table of keys')
        unknown = sorted(set(entry) - TASK_KEYS)
        if unknown:
            raise SuiteError(f'--suite {path}: task {i}: unknown key(s) {", ".join(unknown)} '
                             f'(known: {", ".join(sorted(TASK_KEYS))})')
        if not any(k in entry for k in ('task', 'csv', 'data_dir')):
            raise SuiteError(f'--suite {path}: task {i}: needs task, csv or data_dir')
        e = dict(entry)
        for key in ('csv', 'data_dir'):
            if key in e:
                p = Path(str(e[key])).expanduser()
                e[key] = str(p if p.is_absolute() else (path.parent / p))
        e.setdefault('name', e.get('task') or Path(e.get('csv') or e['data_dir']).stem)
        if e['name'] in names:
            raise SuiteError(f'--suite {path}: two tasks are named {e["name"]!r}')
        names.add(e['name'])
        entries.append(e)
    return entries


def load_suite_task(entry: dict[str, Any], unit_sec: float | None = None, seed: int = 0):
    """The Task of one suite entry (its own unit_sec/seed win over the command line's)."""
    task = load_task(entry.get('task'), csv=entry.get('csv'), data_dir=entry.get('data_dir'),
                     unit_sec=entry.get('unit_sec', unit_sec), seed=int(entry.get('seed', seed)))
    task.name = entry['name']
    return task


def run_suite(weights: list[str | Path], suite: str | Path, output_dir: str | Path | None = None,
              unit_sec: float | None = None, split_seed: int = 0, **options) -> dict:
    """Linear evaluation of every weight file on every task of `suite`; writes
    ``OUTPUT_DIR/<weights-name>/<task>/report.*`` and ``OUTPUT_DIR/summary.{md,json}`` (default
    OUTPUT_DIR: ``eval/suite-<suite stem>/``). A task that fails is recorded in the summary and the
    others go on."""
    opts = LinearOptions.from_kwargs(options)
    out = Path(output_dir) if output_dir is not None else Path('eval') / f'suite-{Path(suite).stem}'
    return _run_entries(weights, read_suite(suite), out, opts, unit_sec, split_seed)


def evar_entries(root: str | Path, tasks: tuple[str, ...] = SEED_TABLE_TASKS,
                 suite: str = 'evar suite') -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The suite entries of `tasks` (default: the seed table's) found under `root`
    (``ROOT/<task>/<task>.csv``), and the missing ones with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise SuiteError(f'--data_dir {root}: no such folder (the evar suite reads ROOT/<task>/<task>.csv)')
    entries, gaps = [], {}
    for name in tasks:
        folder = root / name
        if (folder / f'{name}.csv').is_file():
            entries.append({'name': name, 'task': name, 'data_dir': str(folder)})
        else:
            gaps[name] = f'no {folder / (name + ".csv")} (prepare it with `m2d datasets {name} {folder}`)'
            log.warning('%s: %s is missing: %s', suite, name, gaps[name])
    return entries, gaps


def run_evar_suite(weights: list[str | Path], data_dir: str | Path, output_dir: str | Path | None = None,
                   unit_sec: float | None = None, split_seed: int = 0, **options) -> dict:
    """The seed README's table in one command: every weight file on the nine tasks under `data_dir`
    (``ROOT/<task>/<task>.csv``), ``summary.md`` in that table's order with the published rows beside
    (default OUTPUT_DIR: ``eval/suite-evar/``)."""
    opts = LinearOptions.from_kwargs(options)
    entries, gaps = evar_entries(data_dir)
    out = Path(output_dir) if output_dir is not None else Path('eval') / 'suite-evar'
    published = [{'name': name, 'results': dict(zip(SEED_TABLE_TASKS, values))} for name, values in PUBLISHED.items()]
    return _run_entries(weights, entries, out, opts, unit_sec, split_seed, task_order=list(SEED_TABLE_TASKS),
                        gaps=gaps, published=published, title='EVAR linear evaluation: the seed README\'s table')


def _run_entries(weights: list[str | Path], entries: list[dict[str, Any]], out: Path, opts: LinearOptions,
                 unit_sec: float | None, split_seed: int, task_order: list[str] | None = None, **summary_extra) -> dict:
    return run_suite_entries(weights, entries, out, lambda entry: load_suite_task(entry, unit_sec, split_seed),
                             lambda w, task, folder: evaluate_weights(w, task, folder, opts), 'suite',
                             task_order, **summary_extra)


def run_suite_entries(weights: list[str | Path], entries: list[dict[str, Any]], out: Path,
                      load: Callable[[dict[str, Any]], Any], evaluate: Callable[[str | Path, Any, Path], dict],
                      what: str = 'suite', task_order: list[str] | None = None, **summary_extra) -> dict:
    """Every weight file on every entry's task (`load(entry)`, `evaluate(weights, task, folder)` into
    ``out/<weights-name>/<task>``), then ``summary.md``. One task or weight file that fails is listed
    in the summary's errors and never stops the others."""
    reports, errors = [], {}
    for entry in entries:
        try:
            task = load(entry)
        except (M2DError, OSError, ValueError) as e:  # one bad task never stops the others
            errors[entry['name']] = str(e)
            log.error('%s task %s: %s', what, entry['name'], e)
            continue
        for w in weights:
            try:
                reports.append(evaluate(w, task, out / weights_name(w) / task.name))
            except (M2DError, OSError, ValueError) as e:
                errors[f'{entry["name"]} / {weights_name(w)}'] = str(e)
                log.error('%s task %s with %s: %s', what, entry['name'], w, e)
    return write_summary(reports, out, task_order=task_order or [e['name'] for e in entries], errors=errors,
                         **summary_extra)

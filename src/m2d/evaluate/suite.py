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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import M2DError
from ..fileio import atomic_path
from .report import pct
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
    from .linear import LinearOptions, evaluate_weights, weights_name

    opts = LinearOptions.from_kwargs(options)
    entries = read_suite(suite)
    out = Path(output_dir) if output_dir is not None else Path('eval') / f'suite-{Path(suite).stem}'
    reports, errors = [], {}
    for entry in entries:
        try:
            task = load_suite_task(entry, unit_sec, split_seed)
        except (M2DError, OSError, ValueError) as e:  # one bad task never stops the others
            errors[entry['name']] = str(e)
            log.error('suite task %s: %s', entry['name'], e)
            continue
        for w in weights:
            try:
                reports.append(evaluate_weights(w, task, out / weights_name(w) / task.name, opts))
            except (M2DError, OSError, ValueError) as e:
                errors[f'{entry["name"]} / {weights_name(w)}'] = str(e)
                log.error('suite task %s with %s: %s', entry['name'], w, e)
    summary = write_summary(reports, out, task_order=[e['name'] for e in entries], errors=errors)
    return summary


def _random_label(report: dict) -> str:
    g = report['settings']['geometry']
    (f, t), (ph, pw) = g['input_size'], g['patch_size']
    return f'random encoder {g["embed_dim"]}-d x{g["depth"]} {f}x{t}p{ph}x{pw} (baseline)'


def summarize(reports: list[dict], task_order: list[str] | None = None) -> dict[str, Any]:
    """Rows (weight files, then baselines) x columns (tasks) of the reports' test results."""
    tasks = list(dict.fromkeys((task_order or []) + [r['task']['name'] for r in reports]))
    rows: dict[str, dict[str, Any]] = {}

    def put(name: str, kind: str, task: str, entry: dict, metric: str, weights: str | None = None) -> None:
        row = rows.setdefault(name, {'name': name, 'kind': kind, 'weights': weights, 'results': {}})
        row['results'][task] = {'metric': metric, **{k: entry[k] for k in ('mean', 'std', 'per_seed')}}

    for r in reports:
        put(r['weights_name'], 'weights', r['task']['name'], r['model'], r['metric'], r['weights'])
    for r in reports:
        if 'logmel' in r:
            put('log-mel mean+std per bin (baseline)', 'baseline', r['task']['name'], r['logmel'], r['metric'])
        if 'random' in r:
            put(_random_label(r), 'baseline', r['task']['name'], r['random'], r['metric'])
    metrics = {r['task']['name']: r['metric'] for r in reports}
    return {'tasks': tasks, 'metrics': metrics, 'rows': list(rows.values())}


def summary_markdown(summary: dict[str, Any]) -> str:
    """Two tables: means as in M2D's README (``89.8%``), then mean ± std; errors listed below."""
    tasks = summary['tasks']

    def table(cell) -> list[str]:
        lines = ['| weight | ' + ' | '.join(tasks) + ' |', '|:---|' + '|'.join(':---' for _ in tasks) + '|']
        for row in summary['rows']:
            lines.append(f'| {row["name"]} | ' + ' | '.join(cell(row['results'].get(t)) for t in tasks) + ' |')
        return lines

    metric_note = ', '.join(f'{t}: {m}' for t, m in summary['metrics'].items())
    out = ['# Linear evaluation summary', '', f'Test results ({metric_note}); mean over seeds.', '']
    out += table(lambda e: '-' if e is None else f'{100 * e["mean"]:.1f}%')
    out += ['', 'Mean ± std over seeds:', '']
    out += table(lambda e: '-' if e is None else pct(e))
    if summary.get('errors'):
        out += ['', '## Failed', '']
        out += [f'- {name}: {msg}' for name, msg in summary['errors'].items()]
    return '\n'.join(out) + '\n'


def write_summary(reports: list[dict], out: str | Path, task_order: list[str] | None = None,
                  errors: dict[str, str] | None = None) -> dict[str, Any]:
    """``out/summary.json`` and ``out/summary.md`` from reports; returns the summary."""
    out = Path(out)
    summary = summarize(reports, task_order)
    summary['errors'] = errors or {}
    summary['report_files'] = [str(Path(r['output_dir']) / 'report.json') for r in reports if 'output_dir' in r]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / 'summary.json') as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + '\n')
    with atomic_path(out / 'summary.md') as tmp:
        tmp.write_text(summary_markdown(summary))
    log.info('summary: %s', out / 'summary.md')
    return summary

"""The summary table of several linear evaluations: rows = weight files and baselines, columns = tasks
(the shape of the results table in M2D's README), as ``summary.md`` and ``summary.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..fileio import atomic_path
from .report import pct

log = logging.getLogger(__name__)


def _random_label(report: dict) -> str:
    g = report['settings']['geometry']
    (f, t), (ph, pw) = g['input_size'], g['patch_size']
    return f'random encoder {g["embed_dim"]}-d x{g["depth"]} {f}x{t}p{ph}x{pw} (baseline)'


def _row_names(reports: list[dict]) -> dict[str, str]:
    """The row name of each weight file: its ``weights_name``, with the file's position among the distinct
    files appended (``NAME-2``, as the report folders) where different files have the same name."""
    files = {r['weights']: r['weights_name'] for r in reports}
    names = list(files.values())
    return {w: n if names.count(n) == 1 else f'{n}-{i + 1}' for i, (w, n) in enumerate(files.items())}


def summarize(reports: list[dict], task_order: list[str] | None = None) -> dict[str, Any]:
    """Rows (weight files, then baselines) x columns (tasks) of the reports' test results."""
    tasks = list(dict.fromkeys((task_order or []) + [r['task']['name'] for r in reports]))
    rows: dict[str, dict[str, Any]] = {}

    def put(name: str, kind: str, task: str, entry: dict, metric: str, weights: str | None = None) -> None:
        row = rows.setdefault(name, {'name': name, 'kind': kind, 'weights': weights, 'results': {}})
        row['results'][task] = {'metric': metric, **{k: entry[k] for k in ('mean', 'std', 'per_seed', 'per_fold')
                                                     if k in entry}}

    names = _row_names(reports)
    for r in reports:
        put(names[r['weights']], 'weights', r['task']['name'], r['model'], r['metric'], r['weights'])
    for r in reports:
        if 'logmel' in r:
            put('log-mel mean+std per bin (baseline)', 'baseline', r['task']['name'], r['logmel'], r['metric'])
        if 'random' in r:
            put(_random_label(r), 'baseline', r['task']['name'], r['random'], r['metric'])
    metrics = {r['task']['name']: r['metric'] for r in reports}
    return {'tasks': tasks, 'metrics': metrics, 'rows': list(rows.values())}


def summary_markdown(summary: dict[str, Any]) -> str:
    """Two tables: means as in M2D's README (``89.8%``; published rows, when given, below the evaluated
    ones), then mean ± std; gaps (tasks not evaluated) and errors listed below."""
    tasks, gaps = summary['tasks'], summary.get('gaps') or {}

    def table(rows: list[dict], cell, evaluated: bool = True) -> list[str]:
        lines = ['| weight | ' + ' | '.join(tasks) + ' |', '|:---|' + '|'.join(':---' for _ in tasks) + '|']
        for row in rows:
            cells = ['missing' if evaluated and t in gaps else cell(row['results'].get(t)) for t in tasks]
            lines.append(f'| {row["name"]} | ' + ' | '.join(cells) + ' |')
        return lines

    metric_note = ', '.join(f'{t}: {m}' for t, m in summary['metrics'].items())
    description = summary.get('description') or 'Test results ({metrics}); mean over seeds (and over folds for fold tasks).'
    out = [f'# {summary.get("title") or "Linear evaluation summary"}', '', description.replace('{metrics}', metric_note),
           '']
    out += table(summary['rows'], lambda e: '-' if e is None else f'{100 * e["mean"]:.1f}%')
    if summary.get('published'):
        out += table([{'name': f'{p["name"]} (published)', 'results': p['results']} for p in summary['published']],
                     lambda v: '-' if v is None else f'{v:.1f}%', evaluated=False)[2:]
        out += ['', summary.get('published_note')
                or 'Rows marked (published) are the seed README\'s results for the released weights (EVAR).']
    if summary.get('spread', True):
        out += ['', 'Mean ± std over seeds:', '']
        out += table(summary['rows'], lambda e: '-' if e is None else pct(e))
    if gaps:
        out += ['', '## Gaps', '']
        out += [f'- {name}: {why}' for name, why in gaps.items()]
    if summary.get('errors'):
        out += ['', '## Failed', '']
        out += [f'- {name}: {msg}' for name, msg in summary['errors'].items()]
    return '\n'.join(out) + '\n'


def write_summary(reports: list[dict], out: str | Path, task_order: list[str] | None = None,
                  errors: dict[str, str] | None = None, gaps: dict[str, str] | None = None,
                  published: list[dict] | None = None, title: str | None = None, description: str | None = None,
                  published_note: str | None = None, spread: bool = True) -> dict[str, Any]:
    """``out/summary.json`` and ``out/summary.md`` from reports (+ `gaps`: tasks not evaluated and why,
    `published`: rows ``{'name', 'results': {task: percent}}`` printed beside, with `published_note`
    below them); `description` replaces the line under the title (``{metrics}``: the tasks' metrics),
    `spread=False` leaves out the mean ± std table (results without seeds); returns the summary."""
    out = Path(out)
    summary = summarize(reports, task_order)
    summary['errors'] = errors or {}
    summary['gaps'] = gaps or {}
    if published:
        summary['published'] = published
    for key, value in (('title', title), ('description', description), ('published_note', published_note)):
        if value:
            summary[key] = value
    if not spread:
        summary['spread'] = False
    summary['report_files'] = [str(Path(r['output_dir']) / 'report.json') for r in reports if 'output_dir' in r]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / 'summary.json') as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + '\n')
    with atomic_path(out / 'summary.md') as tmp:
        tmp.write_text(summary_markdown(summary))
    log.info('summary: %s', out / 'summary.md')
    return summary

"""report.md of a linear evaluation: results against both baselines, the task, settings, per-layer
and per-class results, figures and timings, for a person to read (report.json holds the same data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_path

ROW_NAMES = {'model': 'model', 'random': 'random encoder, same shape (baseline)',
             'logmel': 'log-mel mean+std per bin (baseline)'}


def pct(entry: dict | None, digits: int = 2) -> str:
    """``93.10 ± 0.42 %`` from ``{'mean', 'std'}`` (values in [0, 1]); '-' when absent."""
    if not entry:
        return '-'
    return f'{100 * entry["mean"]:.{digits}f} ± {100 * entry["std"]:.{digits}f} %'


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The text of report.md."""
    task, st, metric = report['task'], report['settings'], report['metric']
    n_seeds = len(report['model']['per_seed'])
    out = [f'# Linear evaluation: {report["weights_name"]} on {task["name"]}', '']
    skipped = report.get('skipped', {})
    if skipped.get('count'):
        by = skipped['by_split']
        if by.get('test'):
            out += [f'> **Warning: the test set is smaller than the task\'s.** {by["test"]} of {task["clips"]["test"]} '
                    f'test clips could not be read; the results are on the other '
                    f'{task["clips"]["test"] - by["test"]}.', '']
        out += [f'> {skipped["count"]} clip(s) could not be read and were skipped (train {by["train"]}, '
                f'valid {by["valid"]}, test {by["test"]}); see `skipped` in report.json.', '']

    rows = []
    for key in ('model', 'random', 'logmel'):
        if key in report:
            e = report[key]
            rows.append([ROW_NAMES[key], f'**{pct(e)}**' if key == 'model' else pct(e), e.get('dim', ''),
                         ', '.join(f'{100 * v:.2f}' for v in e['per_seed'])])
    out += _table(['representation', f'test {metric} (mean ± std, {n_seeds} seeds)', 'dim', 'per seed (%)'], rows)
    if task.get('folds'):
        out += ['', f'Per fold (test {metric}, mean over seeds; the task score is their mean):', '']
        out += _table(['representation', *[f'fold {f}' for f in task['folds']]],
                      [[ROW_NAMES[k], *[f'{100 * v:.2f}' for v in report[k]['per_fold']]]
                       for k in ('model', 'random', 'logmel') if k in report])
    out += ['', f'Weights: `{report["weights"]}` (sha256 {report["weights_sha256"][:12]}…)', '']
    out += [f'> Note: {note}' for note in report.get('notes', [])] + ([''] if report.get('notes') else [])

    out += ['## Task', '']
    c = task['clips']
    out += [f'- {task["name"]} ({task["source"]}): {len(task["classes"])} classes, '
            f'{"multi-label (mAP)" if task["multilabel"] else "single-label (accuracy)"}']
    if not task.get('folds'):
        out += [f'- clips: {c["train"]} train / {c["valid"]} valid / {c["test"]} test']
    out += [f'- unit {task["unit_sec"]:g} s (cropped from the start or zero-padded)']
    if task.get('folds'):
        out += [f'- folds: {", ".join(task["folds"])} run as the test set in turn (of {", ".join(task["all_folds"])}); '
                'test clips per fold: ' + ', '.join(f'{k}: {v}' for k, v in task['clips'].items())]
    out += [f'- {note}' for note in task.get('notes', [])]
    for key in ('license', 'citation'):
        if task.get(key):
            out += [f'- data {key}: {task[key]}']
    g = st['geometry']
    out += ['', '## Settings', '',
            f'- encoder: input {g["input_size"][0]}x{g["input_size"][1]}, patch {g["patch_size"][0]}x{g["patch_size"][1]}, '
            f'{g["embed_dim"]}-d, {g["depth"]} layers, {g["sample_rate"]} Hz',
            f'- embedding: time-mean of layer(s) {", ".join(str(v) for v in st["layers"])} '
            f'({st["embedding_dim"]}-d); normalization mean {st["norm_stats"][0]:.4f}, std {st["norm_stats"][1]:.4f} '
            f'({st.get("norm_stats_note") or st["norm_stats_source"]})',
            f'- seeds {st["seed"]}..{st["seed"] + st["seeds"] - 1}; device {st["device"]}'
            f'{", bf16" if st["bf16"] else ""}; batch used {report["model"].get("batch_size")}; validation clips '
            f'{sorted(set(report["model"].get("n_valid", [])))}',
            f'- best epochs: {report["model"].get("best_epoch")}']
    proto = report.get('protocol')
    if proto:
        out += ['', f'## Linear probe: {proto["name"]}', '']
        out += [f'- {k}: {v}' for k, v in proto.items() if k != 'name']

    if report.get('per_layer'):
        out += ['', '## Per layer', '']
        out += _table(['layer', f'test {metric}'], [[r['layer'], pct(r)] for r in report['per_layer']])

    figures = report.get('figures') or {}
    if figures or report.get('figures_note'):
        out += ['', '## Figures', '']
        captions = {'confusion': 'Confusion matrix (first seed; rows: true class)',
                    'map': 't-SNE map of the test embeddings, coloured by class',
                    'per_layer': f'Test {metric} of each layer alone'}
        for key, name in figures.items():
            out += [f'{captions.get(key, key)}:', '', f'![{key}]({name})', '']
        if report.get('figures_note'):
            out += [f'_{report["figures_note"]}_', '']

    if report.get('class_accuracy'):
        what = 'average precision' if report.get('class_metric') == 'AP' else 'accuracy'
        out += ['', f'## Class-wise {what} (model, mean over seeds)', '']
        items = sorted(report['class_accuracy'].items(), key=lambda kv: (kv[1] is None, kv[1] if kv[1] is not None else 0))
        out += _table(['class', what], [[k, '-' if v is None else f'{100 * v:.1f} %'] for k, v in items])

    t = report.get('timings', {})
    out += ['', '## Timings', '']
    rows = []
    for key, label in (('load_s', 'load weights'), ('norm_stats_s', 'normalization statistics'),
                       ('embed_model_s', 'model embeddings'), ('probe_model_s', 'model probe (all seeds)'),
                       ('probe_per_layer_s', 'per-layer probes'), ('embed_random_s', 'random-encoder embeddings'),
                       ('probe_random_s', 'random-encoder probe'), ('embed_logmel_s', 'log-mel features'),
                       ('probe_logmel_s', 'log-mel probe'), ('total_s', 'total')):
        if t.get(key) is not None:
            cached = t.get(key.replace('_s', '_cached'))
            rows.append([label, f'{t[key]:.1f} s' + (' (from the cache; time of the original run)' if cached else '')])
    out += _table(['stage', 'time'], rows)
    if t.get('embed_clips_per_s'):
        out += ['', f'Model embedding extraction: {t["embed_clips_per_s"]:.1f} clips/s.']
    out += ['', f'_m2d {report.get("m2d_version", "")}, {report.get("created", "")}_', '']
    return '\n'.join(out)


def write_markdown(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(markdown(report))
    return path

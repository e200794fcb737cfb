"""report.md of a zero-shot classification or a text-audio retrieval evaluation, for a person to read
(report.json holds the same data)."""

from __future__ import annotations

from typing import Any

from .report import _table


def _skipped(report: dict[str, Any]) -> list[str]:
    n = report.get('skipped', {}).get('count', 0)
    if not n:
        return []
    return [f'> **{n} clip(s) could not be read and are left out of the scores**; see `skipped` in report.json.', '']


def _footer(report: dict[str, Any]) -> list[str]:
    t = report.get('timings', {})
    rows = [[label, f'{t[key]:.1f} s' + (' (from the cache; time of the original run)' if key == 'audio_s'
                                         and t.get('audio_cached') else '')]
            for key, label in (('load_s', 'load weights'), ('text_s', 'text embeddings'),
                               ('audio_s', 'audio embeddings'), ('total_s', 'total')) if t.get(key) is not None]
    out = ['', '## Timings', ''] + _table(['stage', 'time'], rows)
    if t.get('audio_clips_per_s'):
        out += ['', f'Audio embedding extraction: {t["audio_clips_per_s"]:.1f} clips/s.']
    return out + ['', f'_m2d {report.get("m2d_version", "")}, {report.get("created", "")}_', '']


def _settings(report: dict[str, Any]) -> list[str]:
    st = report['settings']
    unit = st.get('unit_sec')
    return ['', '## Settings', '',
            f'- weights: `{report["weights"]}` (sha256 {report["weights_sha256"][:12]}…)',
            f'- audio: {st["sample_rate"]} Hz, ' + (f'{unit:g} s per clip (cropped from the start or zero-padded)'
                                                    if unit else 'each clip whole'),
            f'- normalization mean {st["norm_stats"][0]:.4f}, std {st["norm_stats"][1]:.4f} (the weight file\'s)',
            f'- text encoder: {st.get("text_encoder") or "the one the weight file implies"}; device {st["device"]}'
            + (', bf16' if st.get('bf16') else '')]


def zeroshot_markdown(report: dict[str, Any]) -> str:
    task, metric, m = report['task'], report['metric'], report['model']
    out = [f'# Zero-shot classification: {report["weights_name"]} on {task["name"]}', ''] + _skipped(report)
    out += [f'**Test {metric}: {100 * m["mean"]:.2f} %** on {m["n_test"]} clips'
            + (' (all folds pooled, as EVAR)' if task.get('folds') else ''), '']
    if task.get('folds'):
        out += _table(['fold', *task['folds'], 'plain mean'],
                      [[metric, *[f'{100 * v:.2f}' for v in m['per_fold']], f'{100 * m["fold_mean"]:.2f}']])
        out += ['']
    out += ['## Task', '', f'- {task["name"]} ({task["source"]}): {len(task["classes"])} classes, '
            f'{"multi-label (mAP)" if task["multilabel"] else "single-label (accuracy)"}']
    out += ['- test clips: ' + ', '.join(f'{k}: {v}' for k, v in task['clips'].items())]
    out += [f'- {note}' for note in task.get('notes', [])]
    for key in ('license', 'citation'):
        if task.get(key):
            out += [f'- data {key}: {task[key]}']
    out += _settings(report)
    out += [f'- caption template: `{report["settings"]["template"]}`']
    out += ['', f'## Protocol: {report["protocol"]["name"]}', '']
    out += [f'- {k}: {v}' for k, v in report['protocol'].items() if k != 'name']
    what = 'average precision' if report.get('class_metric') == 'AP' else 'accuracy'
    items = sorted(report['class_accuracy'].items(), key=lambda kv: (kv[1] is None, kv[1] if kv[1] is not None else 0))
    out += ['', f'## Captions and class-wise {what}', '']
    out += _table(['class', 'caption', what], [[k, report['captions'][k], '-' if v is None else f'{100 * v:.1f} %']
                                               for k, v in items])
    return '\n'.join(out + _footer(report))


def retrieval_markdown(report: dict[str, Any]) -> str:
    data, r = report['data'], report['results']
    ks = report['settings']['ks']
    out = [f'# Text-audio retrieval: {report["weights_name"]} on {data["name"]}', ''] + _skipped(report)
    rows = []
    for key, label in (('text_to_audio', 'text → audio'), ('audio_to_text', 'audio → text')):
        e = r[key]
        rows.append([label, *[f'{e[f"R@{k}"]:.2f}' for k in ks], f'{e["mAP@10"]:.2f}', f'{e["median_rank"]:g}',
                     f'{e["mean_rank"]:.1f}', e['queries']])
    out += _table(['direction', *[f'R@{k}' for k in ks], 'mAP@10', 'median rank', 'mean rank', 'queries'], rows)
    out += ['', 'Recall in %. text → audio: each caption is a query, a hit when its clip is in the top K. '
            'audio → text: each clip is a query, a hit when any of its captions is in the top K '
            '(WavCaps\' a2t/t2a, which EVAR\'s retr_a2t_t2a.py uses; mAP@10 as there).', '']
    out += ['## Data', '', f'- {data["source"]}: {data["clips"]} clips, {data["captions"]} captions '
            f'({data["captions_per_clip"]} per clip)' + (f', split {data["split"]}' if data.get('split') else '')]
    out += _settings(report)
    return '\n'.join(out + _footer(report))


def markdown(report: dict[str, Any]) -> str:
    """The text of report.md for a zero-shot (``kind: zeroshot``) or retrieval (``kind: retrieval``) report."""
    return retrieval_markdown(report) if report.get('kind') == 'retrieval' else zeroshot_markdown(report)

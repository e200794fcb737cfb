"""Reports of `m2d finetune`: ``report.json``, ``report.md``, learning curves and the confusion matrix
of one run, and the summary of a fold task (the mean over folds, as EVAR reports it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...fileio import atomic_path

REPORT_JSON, REPORT_MD = 'report.json', 'report.md'
CURVES_PNG, CONFUSION_PNG = 'learning_curves.png', 'confusion_matrix.png'
OPTIMISTIC = ('validated on the test split (the task has no valid split; EVAR does the same): the test score is '
              'the best of the epochs\' test scores, an optimistic number; --valid_fraction F validates on a part '
              'of train instead')
def plot_curves(report: dict[str, Any], path: Path) -> Path | None:
    """Training and validation loss, validation metric per epoch; None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    curves, metric = report['curves'], report['metric']
    ep = [c['epoch'] for c in curves]
    fig = Figure(figsize=(10, 3.5))
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(ep, [c['train_loss'] for c in curves], label='train')
    ax_loss.plot(ep, [c['valid_loss'] for c in curves], label='valid')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_loss.legend()
    ax_metric.plot(ep, [c[f'valid_{metric}'] for c in curves], marker='o', ms=3, label=f'valid {metric}')
    ax_metric.axvline(report['best_epoch'], color='gray', ls='--', lw=1, label=f'best epoch {report["best_epoch"]}')
    ax_metric.axhline(report['test'], color='C2', ls=':', lw=1, label=f'test {report["test"]:.3f}')
    ax_metric.set(xlabel='epoch', ylabel=metric, title=f'validation {metric}')
    ax_metric.legend(loc='lower right')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    return path


def plot_confusion(report: dict[str, Any], cm: np.ndarray, path: Path) -> Path | None:
    """The test confusion matrix of the best checkpoint; None when matplotlib is missing."""
    try:
        from ..plots import confusion_figure

        fig = confusion_figure(cm, report['task']['classes'], f'{report["task"]["name"]}: test, fine-tuned '
                               f'(epoch {report["best_epoch"]})')
    except ImportError:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches='tight', format='png')
    return path


def recipe_lines(report: dict[str, Any]) -> list[str]:
    """The report.md lines naming the recipe (if any) and the reference's equivalent command line."""
    r = report.get('recipe')
    lines = [f'- recipe: `{r["name"]}` (nttcslab/m2d `{r["script"]}`, EVAR task `{r["task"]}`)'] if r else []
    if report.get('reference_command'):
        lines.append(f'- the reference (in EVAR\'s folder): `{report["reference_command"]}`')
    return lines


def validation_lines(validation: dict[str, Any]) -> list[str]:
    """The report.md line saying what served as validation (flagged when it was the test split)."""
    if validation['split'] == 'test':
        return [f'- **validation: {OPTIMISTIC}**']
    if validation['split'] == 'carved':
        return [f'- validation: {validation["fraction"]:g} of the train clips, stratified, carved with the seed '
                '(the task has no valid split)']
    return ['- validation: the task\'s valid split']


def write_report(report: dict[str, Any], output_dir: str | Path, confusion: np.ndarray | None = None) -> None:
    """``report.json``, ``report.md`` and, with matplotlib, ``learning_curves.png`` and
    ``confusion_matrix.png`` (single-label tasks, given the test `confusion` counts) in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    figure = plot_curves(report, output_dir / CURVES_PNG)
    cm_figure = plot_confusion(report, confusion, output_dir / CONFUSION_PNG) if confusion is not None else None
    t, st, tm = report['task'], report['settings'], report['timings']
    lines = [f'# Fine-tuning {report["model_name"]} on {t["name"]}', '',
             f'- weights: `{report["weights"]}`',
             f'- task: {t["name"]} ({len(t["classes"])} classes, {"multi-label" if t["multilabel"] else "single-label"}, '
             f'{t["counts"]["train"]} train / {t["counts"]["valid"]} valid / {t["counts"]["test"]} test clips, '
             f'unit {t["unit_sec"]:g} s)',
             f'- **test {report["metric"]}: {report["test"]:.4f}** with the best-validation checkpoint '
             f'(epoch {report["best_epoch"]}, valid {report["valid_best"]:.4f}; {report["epochs_run"]} epochs run'
             f'{", early stop" if report["early_stopped"] else ""})',
             *validation_lines(report['validation']),
             *recipe_lines(report),
             f'- checkpoint: `{report["checkpoint"]}`',
             f'- time: {tm["total_s"]:.1f} s in all, {tm["per_epoch_s"]:.2f} s per epoch, '
             f'{tm["train_clips_per_s"]:.1f} training clips/s, on {st["device"]}', '',
             '| setting | value |', '|---|---|']
    keys = ('optim', 'lr', 'batch_size', 'epochs', 'warmup_epochs', 'mixup', 'rrc', 'freq_mask', 'time_mask',
            'training_mask', 'dur_frames', 'freeze_embed', 'weighted_sampling', 'patience', 'seed', 'norm_stats',
            'valid_fraction', 'bf16')
    lines += [f'| {k} | {st[k]} |' for k in keys]
    lines.append('')
    if figure is not None:
        lines += [f'![learning curves]({CURVES_PNG})', '']
    else:
        lines += ['(learning-curve figure not drawn: matplotlib is not installed; the curves are in report.json)', '']
    if cm_figure is not None:
        lines += [f'![confusion matrix]({CONFUSION_PNG})', '']
    if report['skipped']:
        lines += ['Skipped unreadable clips: ' + ', '.join(f'{k} {len(v)}' for k, v in report['skipped'].items()), '']
    with atomic_path(output_dir / REPORT_MD) as tmp:
        tmp.write_text('\n'.join(lines))


def write_fold_report(summary: dict[str, Any], output_dir: str | Path) -> None:
    """``report.json`` and ``report.md`` of a fold task: the score per fold and their mean (each fold's
    own report, curves and checkpoint are in ``fold<K>/``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    metric, folds = summary['metric'], summary['fold_runs']
    lines = [f'# Fine-tuning {summary["model_name"]} on {summary["task"]["name"]}: {len(folds)} fold(s)', '',
             f'- weights: `{summary["weights"]}`',
             f'- **test {metric}: {summary["test"]:.4f}**, the mean over folds '
             f'{", ".join(f["fold"] for f in folds)} (each fold is the test set in turn, the others train; EVAR)',
             *validation_lines(summary['validation']),
             *recipe_lines(summary),
             f'- time: {summary["timings"]["total_s"]:.1f} s in all', '',
             f'| fold | test {metric} | best epoch | valid | epochs run | report |', '|---|---|---|---|---|---|']
    lines += [f'| {f["fold"]} | {f["test"]:.4f} | {f["best_epoch"]} | {f["valid_best"]:.4f} | {f["epochs_run"]} | '
              f'[fold{f["fold"]}/{REPORT_MD}](fold{f["fold"]}/{REPORT_MD}) |' for f in folds]
    lines.append('')
    with atomic_path(output_dir / REPORT_MD) as tmp:
        tmp.write_text('\n'.join(lines))

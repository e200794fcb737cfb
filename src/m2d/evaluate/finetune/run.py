"""`finetune`: one run per task, or one per fold of a fold task (every fold, averaged, as EVAR)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import Checkpoint, load_checkpoint
from ...runtime import resolve_device
from .. import metrics
from ..tasks import Task
from .data import AudioCache, choose_splits, make_loader, split_data
from .files import BestWeights, checkpoint_path, default_output_dir, model_name
from .loop import fit, predict_logits
from .model import FinetuneModel, checkpoint_for_frames
from .optim import make_optimizer
from .recipes import evar_command_line, get_recipe
from .report import write_fold_report, write_report
from .scoring import class_accuracy, evaluate_scores
from .settings import FinetuneError, FinetuneSettings, parse_norm_stats

log = logging.getLogger(__name__)


def finetune(weights: str | Path, task: Task, output_dir: str | Path | None = None,
             settings: FinetuneSettings | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune the encoder of `weights` with EVAR's head on `task`; returns the report dict.

    A task without folds: one run, writing ``OUTPUT_DIR/report.json``, ``report.md``,
    ``learning_curves.png`` (with matplotlib) and the best-validation checkpoint
    ``OUTPUT_DIR/<m2d_name>-<task>/weights_best.pth``. A fold task: one such run per fold (or only
    ``fold``) in ``OUTPUT_DIR/fold<K>/``, each with a fresh model, and a summary report in
    ``OUTPUT_DIR`` whose ``test`` is the mean over folds. `options` override fields of `settings`.
    """
    t_start = time.perf_counter()
    try:
        s = dataclasses.replace(settings or FinetuneSettings(), **options)
    except TypeError as e:
        raise FinetuneError(f'finetune(): {e}') from None
    s.check()
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(weights, task)
    if s.fold is not None and not task.folds:
        raise FinetuneError(f'--fold {s.fold}: {task.source or task.name} has no fold column')
    ckpt = load_checkpoint(weights, trust=s.trust)
    if not task.folds:
        return run_one(weights, ckpt, task, output_dir, s)
    folds = [str(s.fold)] if s.fold is not None else task.folds
    if folds[0] not in task.folds:
        raise FinetuneError(f'--fold {s.fold}: not a fold of {task.name} (folds: {", ".join(task.folds)})')
    cache: AudioCache = {}  # each clip is read once for all folds (when the task fits in memory)
    runs = []
    for k in folds:
        log.info('fold %s of %s (%d folds)', k, task.name, len(task.folds))
        runs.append(run_one(weights, ckpt, task.for_fold(k), output_dir / f'fold{k}', s, cache, fold=k))
    summary = fold_summary(task, runs, output_dir, time.perf_counter() - t_start)
    write_fold_report(summary, output_dir)
    log.info('%s on %s: test %s %.4f, the mean over folds %s', summary['model_name'], task.name, summary['metric'],
             summary['test'], ', '.join(folds))
    return summary


def fold_summary(task: Task, runs: list[dict[str, Any]], output_dir: Path, total_s: float) -> dict[str, Any]:
    """The report of a fold task from its fold runs: ``test`` = the mean of the folds' test scores."""
    scores = [r['test'] for r in runs]
    mean = float(np.mean(scores))
    first = runs[0]
    return {
        'task': {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
                 'unit_sec': task.unit_sec, 'folds': [r['fold'] for r in runs], 'notes': task.notes},
        'weights': first['weights'],
        'model_name': first['model_name'],
        'settings': first['settings'],
        'recipe': first['recipe'],
        'reference_command': first['reference_command'],
        'metric': first['metric'],
        'validation': first['validation'],
        'test': mean,
        'model': {'mean': mean, 'std': 0.0, 'per_seed': [mean], 'per_fold': scores},
        'fold_runs': [{'fold': r['fold'], 'test': r['test'], 'best_epoch': r['best_epoch'],
                       'valid_best': r['valid_best'], 'epochs_run': r['epochs_run'], 'checkpoint': r['checkpoint'],
                       'output_dir': r['output_dir']} for r in runs],
        'checkpoint': [r['checkpoint'] for r in runs],
        'output_dir': str(output_dir),
        'timings': {'total_s': total_s, 'per_fold_s': [r['timings']['total_s'] for r in runs]},
    }


def run_one(weights: str | Path, ckpt: Checkpoint, task: Task, output_dir: Path, s: FinetuneSettings,
            cache: AudioCache | None = None, fold: str | None = None) -> dict[str, Any]:
    """One fine-tuning run of a fresh model on `task`'s splits (`fold`: the test fold of a fold task, for
    the report); writes its reports and checkpoint."""
    t_start = time.perf_counter()
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator().manual_seed(s.seed)

    if s.dur_frames is not None:  # the encoder of dur_frames frames; its files are named for them (80x1001...)
        ckpt = checkpoint_for_frames(ckpt, s.dur_frames)
    name, sr = model_name(ckpt), ckpt.sample_rate
    unit_samples = int(round(task.unit_sec * sr))
    splits = choose_splits(task, s.valid_fraction, s.seed)
    t0 = time.perf_counter()
    unit_frames = s.dur_frames or int(round(task.unit_sec * 100)) + 1  # .npy log-mel clips: 10 ms hops
    data, skipped = split_data(task, splits, sr, unit_samples, s.workers, cache, s.progress, unit_frames)
    t_read = time.perf_counter() - t0
    if len(data['train']) < 2:
        raise FinetuneError(f'{task.source}: fine-tuning needs at least 2 train clips, got {len(data["train"])}')

    model, norm_source = _make_model(ckpt, task, s)
    model.freq_mask, model.time_mask, model.rrc, model.generator = s.freq_mask, s.time_mask, s.rrc, gen
    model.to(device)
    norm_used = tuple(float(v) for v in model.runtime.norm_stats.cpu())

    train_loader = make_loader(data['train'], s.batch_size, True, s.seed, s.workers, s.weighted_sampling)
    valid_loader = make_loader(data['valid'], s.batch_size, False, s.seed, s.workers)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], s)
    metric = 'mAP' if task.multilabel else 'accuracy'
    log.info('fine-tuning %s on %s: %d train / %d valid (%s) / %d test clips, %s, lr %g, batch %d, %d epochs, on %s',
             name, task.name, len(data['train']), len(data['valid']), splits.validation, len(data['test']), s.optim,
             s.lr, s.batch_size, s.epochs, device)

    ckpt_path = checkpoint_path(output_dir, name, task.name)
    info = {'task': task.name, 'multilabel': task.multilabel, 'metric': metric, 'unit_sec': task.unit_sec,
            'sample_rate': sr, 'source_weights': str(weights)}
    best = BestWeights(ckpt_path, task.classes, name, info)
    t_train = time.perf_counter()
    result = fit(model, train_loader, valid_loader, optimizer, s, best, rng, device, task.multilabel, metric,
                 desc=f'fine-tune {task.name}')
    curves = result.curves
    t_train = time.perf_counter() - t_train

    t0 = time.perf_counter()
    if splits.valid_is_test:  # the best epoch's validation pass was the test pass (EVAR reports it as is)
        t_logits, t_targets, test = result.best_logits, result.targets, best.score
    else:
        model.load_state_dict(best.state)
        t_logits, t_targets = predict_logits(model, make_loader(data['test'], s.batch_size, False, s.seed, s.workers),
                                             device, s.bf16, s.progress, 'test')
        test = evaluate_scores(t_logits, t_targets, task.multilabel)
    t_test = time.perf_counter() - t0
    n_train_seen = len(curves) * len(train_loader) * s.batch_size
    recipe = get_recipe(s.recipe) if s.recipe else None
    report = {
        'task': {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
                 'unit_sec': task.unit_sec, 'counts': {k: len(data[k]) for k in ('train', 'valid', 'test')},
                 'notes': task.notes},
        'fold': fold,
        'weights': str(weights),
        'model_name': name,
        'settings': {**{k: v for k, v in asdict(s).items() if k not in ('progress', 'trust')},
                     'norm_stats': list(norm_used), 'norm_stats_source': norm_source, 'device': str(device),
                     'flat_features': s.training_mask > 0},
        'recipe': None if recipe is None else {'name': recipe.name, 'script': recipe.script, 'task': recipe.task},
        'reference_command': evar_command_line(task.name, str(weights), s, s.data_path),
        'metric': metric,
        'validation': {'split': splits.validation, 'fraction': s.valid_fraction,
                       'optimistic': splits.valid_is_test},
        'test': test,
        'model': {'mean': test, 'std': 0.0, 'per_seed': [test]},
        'best_epoch': best.epoch,
        'valid_best': best.score,
        'epochs_run': len(curves),
        'early_stopped': len(curves) < s.epochs,
        'checkpoint': str(ckpt_path),
        'checkpoint_writes': best.writes,
        'output_dir': str(output_dir),
        'curves': curves,
        'class_accuracy': {} if task.multilabel else class_accuracy(t_logits, t_targets, task.classes),
        'skipped': {k: [{'path': p, 'reason': r} for p, r in v] for k, v in skipped.items() if v},
        'timings': {'read_s': t_read, 'train_s': t_train, 'per_epoch_s': t_train / max(len(curves), 1),
                    'test_s': t_test, 'total_s': time.perf_counter() - t_start,
                    'train_clips_per_s': n_train_seen / max(sum(c['train_seconds'] for c in curves), 1e-9)},
    }
    cm = None if task.multilabel else metrics.confusion_matrix(t_targets.argmax(1), t_logits.argmax(1), len(task.classes))
    write_report(report, output_dir, cm)
    log.info('%s on %s: test %s %.4f (best valid %.4f at epoch %d, validated on %s); checkpoint %s', name, task.name,
             metric, test, best.score, best.epoch, splits.validation, ckpt_path)
    return report


def _make_model(ckpt: Checkpoint, task: Task, s: FinetuneSettings) -> tuple[FinetuneModel, str]:
    """A fresh `FinetuneModel` with the normalization statistics asked for, and their source."""
    norm = parse_norm_stats(s.norm_stats)
    model = FinetuneModel(ckpt, len(task.classes), s.training_mask, dur_frames=s.dur_frames,
                          freeze_embed=s.freeze_embed)
    if norm == 'auto':
        from ..embed import auto_norm_stats

        norm = auto_norm_stats(model.runtime, task, seed=s.seed, progress=s.progress)
    if norm is not None:
        model.runtime.norm_stats.copy_(torch.tensor(norm, dtype=torch.float32))
    return model, 'weights' if s.norm_stats is None else 'auto (train split)' if s.norm_stats == 'auto' else 'given'


"""Zero-shot classification of a labeled task with an M2D-CLAP weight file, EVAR's protocol.

    >>> report = zeroshot_eval('m2d_clap_vit_base-80x608p16x16-240128', load_zeroshot_task('esc50', data_dir='data/esc50'))
    >>> report['model']['mean']     # accuracy (mAP for multi-label tasks), in [0, 1]

EVAR (nttcslab/eval-audio-repr ``zeroshot.py``, ``zeroshot_downstream``) does, and so does this:

- one caption per class (`captions.class_to_caption`), encoded by the CLAP text encoder;
- the test clips of every fold (fold tasks: each fold's held-out clips; split tasks: the test
  split), each cropped from the start or zero-padded to the task's unit length (EVAR's
  ``unit_samples``; its ``original_data=True`` only means it reads the original files and resamples
  them to the model's rate on load, which `load_clip` always does), encoded whole by
  ``encode_audio`` (``audio_proj`` of the mean over every patch of the unit);
- scores = cosine similarity of each clip to each caption (softmax/sigmoid of them in EVAR changes no
  ranking); accuracy of the highest-scoring class, or mAP (macro over classes) for multi-label tasks;
- **the predictions of all folds are pooled into one score** (EVAR concatenates them before the
  metric), not the mean of per-fold scores: for accuracy the pooled score is the mean over folds
  weighted by their clip counts. The per-fold scores and their plain mean are in the report too.

Nothing is trained: a CSV without a split or fold column (or a folder task) has every clip scored.
Classes are every label of the task, sorted (EVAR takes the train split's labels; the same classes
for its tasks).
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import M2DError
from ..fileio import atomic_path
from . import metrics
from .captions import EVAR_TEMPLATE, class_to_caption
from .clap_embed import EncodingOptions, audio_embeddings, check_failed, cosine_similarity, load_clap, text_embeddings
from .evar import EVAR_TASKS, PUBLISHED_ZEROSHOT, ZEROSHOT_TABLE_TASKS
from .linear import json_default
from .suite import evar_entries, read_suite, run_suite_entries
from .tasks import Clip, Task, TaskError, load_task

log = logging.getLogger(__name__)


@dataclass
class ZeroShotOptions(EncodingOptions):
    """Settings of a zero-shot evaluation (`m2d zeroshot`'s options)."""

    template: str = EVAR_TEMPLATE        # caption sentence; {label} is the (EVAR-worded) class name
    fold: str | None = None              # one fold of a fold task (default: every fold)

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> ZeroShotOptions:
        opts = cls.checked(options, 'zeroshot')
        if opts.fold is not None:
            opts.fold = str(opts.fold)
        return opts


# ---------------------------------------------------------------------------------------------
# the task and its test clips


def _has_split_column(csv: Path) -> bool:
    with open(csv, newline='', encoding='utf-8-sig') as f:
        header = next(csv_module.reader(f), [])
    return any(c.strip() in ('split', 'fold') for c in header)


def load_zeroshot_task(task: str | None = None, *, csv: str | Path | None = None, data_dir: str | Path | None = None,
                       unit_sec: float | None = None) -> Task:
    """A task as `load_task` reads it (EVAR's by name, built-in, CSV, folder), without the checks a
    trained classifier needs; a CSV without split/fold column, or a folder, has every clip as test."""
    loaded = load_task(task, csv=csv, data_dir=data_dir, unit_sec=unit_sec, check=False)
    if task in EVAR_TASKS and csv is None:
        csv = Path(data_dir) / f'{task}.csv'
    made_split = (csv is not None and not _has_split_column(Path(csv))) or (task is None and csv is None)
    if made_split:
        loaded.clips = [dataclasses.replace(c, split='test') for c in loaded.clips]
        loaded.notes = [n for n in loaded.notes if 'split' not in n] + [
            'no split or fold column: every clip is scored (zero-shot trains nothing)']
    if len(loaded.classes) < 2:
        raise TaskError(f'{loaded.source}: only one class ({", ".join(loaded.classes) or "none"}); zero-shot '
                        'classification needs at least two')
    if not loaded.folds and not loaded.split('test'):
        raise TaskError(f'{loaded.source}: no test clips (split column values: train/valid only)')
    return loaded


def test_folds(task: Task, fold: str | None = None) -> list[tuple[str | None, list[Clip]]]:
    """(fold id, test clips) to score: each fold's held-out clips (or only `fold`), or (None, the test
    split) for a task with a split."""
    if not task.folds:
        if fold is not None:
            log.warning('%s has a split, not folds: --fold %s is ignored for it', task.name, fold)
        return [(None, task.split('test'))]
    folds = task.folds if fold is None else [str(fold)]
    return [(f, task.for_fold(f).split('test')) for f in folds]


# ---------------------------------------------------------------------------------------------
# scores


def task_score(task: Task, clips: list[Clip], scores: np.ndarray) -> float:
    """Accuracy (single-label) or mAP (multi-label, EVAR's macro mean) of `scores` ``[len(clips), C]``."""
    return metrics.score(task.targets(clips), scores, task.multilabel)


def fold_scores(task: Task, folds: list[tuple[str | None, list[Clip]]], sim: dict[str, np.ndarray]) -> dict[str, Any]:
    """The pooled score over all folds' test clips (EVAR: predictions concatenated, one metric), the
    score of each fold and their plain mean; clips without a similarity row (unreadable) are left out."""
    per_fold, pooled_clips = [], []
    for _, clips in folds:
        present = [c for c in clips if c.key in sim]
        if not present:
            raise M2DError(f'{task.name}: no test clip of a fold could be encoded')
        per_fold.append(task_score(task, present, np.stack([sim[c.key] for c in present])))
        pooled_clips += present
    pooled = task_score(task, pooled_clips, np.stack([sim[c.key] for c in pooled_clips]))
    entry = {'mean': pooled, 'std': 0.0, 'per_seed': [pooled], 'n_test': len(pooled_clips)}
    if folds[0][0] is not None:
        entry.update(per_fold=per_fold, fold_mean=float(np.mean(per_fold)))
    return entry


def class_results(task: Task, clips: list[Clip], scores: np.ndarray) -> dict[str, float | None]:
    """Per-class accuracy (single-label) or average precision (multi-label) over the scored clips."""
    y = task.targets(clips)
    C = len(task.classes)
    per = (metrics.class_average_precision(y, scores) if task.multilabel
           else metrics.class_accuracy(y, scores.argmax(1), C))
    return {c: (None if np.isnan(v) else float(v)) for c, v in zip(task.classes, per)}


# ---------------------------------------------------------------------------------------------
# one weight file on one task


def weights_task_dir(name: str, task: Task) -> Path:
    """``eval/<weights-name>/zeroshot-<task>/`` (beside linear-eval's ``eval/<weights-name>/<task>/``)."""
    return Path('eval') / name / f'zeroshot-{task.name}'


def _task_info(task: Task, folds: list[tuple[str | None, list[Clip]]]) -> dict[str, Any]:
    info = {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
            'unit_sec': task.unit_sec, 'notes': [n for n in task.notes if not n.startswith('fold ')]}
    if folds[0][0] is not None:
        info['folds'] = [f for f, _ in folds]
        info['all_folds'] = task.folds
        info['clips'] = {f: len(c) for f, c in folds}
    else:
        info['clips'] = {'test': len(folds[0][1])}
    for key in ('license', 'citation', 'source_url'):
        if task.prepared.get(key):
            info[key] = task.prepared[key]
    return info


PROTOCOL = {
    'name': "EVAR's zero-shot protocol (zeroshot.py)",
    'captions': "one per class: EVAR's class_to_caption wording, '_' -> ' ', then the template",
    'audio': "each test clip cropped from the start / zero-padded to the task's unit, encoded whole "
             '(audio_proj of the mean over every patch)',
    'similarity': 'cosine of the CLAP audio and text embeddings',
    'metric': 'accuracy of the highest-similarity class; mAP (macro over classes) for multi-label tasks',
    'folds': "every fold's held-out clips; the predictions of all folds pooled into one score (EVAR), "
             'per-fold scores and their plain mean reported beside',
}


def evaluate_zeroshot(weights: str | Path, task: Task, output_dir: str | Path | None,
                      opts: ZeroShotOptions, wording: str | None = None) -> dict[str, Any]:
    """Zero-shot evaluation of one weight file on `task`; writes ``report.json``/``report.md`` and
    returns the report. `wording`: the task whose EVAR caption wording applies (default ``task.name``)."""
    from ..runtime import resolve_device

    clock, timings = time.perf_counter(), {}
    device = str(resolve_device(opts.device))
    folds = test_folds(task, opts.fold)
    t0 = time.perf_counter()
    loaded = load_clap(weights, bf16=opts.bf16, trust=opts.trust, text_encoder=opts.text_encoder)
    timings['load_s'] = time.perf_counter() - t0

    captions = class_to_caption(wording or task.name, task.classes, opts.template)
    log.info('%s captions: %s ...', task.name, captions[:3])
    t0 = time.perf_counter()
    loaded.runtime.to(device).eval()
    text = text_embeddings(loaded.runtime, captions, opts.text_batch_size)
    timings['text_s'] = time.perf_counter() - t0

    clips = list({c.key: c for _, cs in folds for c in cs}.values())
    emb = audio_embeddings(loaded, clips, name=task.name, unit_sec=task.unit_sec, batch_size=opts.batch_size,
                           device=device, cache_dir=opts.cache_dir, use_cache=opts.use_cache, progress=opts.progress)
    timings.update(audio_s=emb.seconds, audio_cached=emb.cached,
                   audio_clips_per_s=len(emb.keys) / emb.seconds if emb.seconds > 0 else None)
    check_failed(task.name, emb.failed, len(clips), opts.max_failed)

    sim_matrix = cosine_similarity(emb.x[:, 0], text)
    sim = dict(zip(emb.keys, sim_matrix))
    entry = fold_scores(task, folds, sim)
    scored = [c for _, cs in folds for c in cs if c.key in sim]
    metric = 'mAP' if task.multilabel else 'accuracy'
    report: dict[str, Any] = {
        'kind': 'zeroshot', 'task': _task_info(task, folds), 'weights': str(loaded.path),
        'weights_name': loaded.name, 'weights_sha256': loaded.sha256, 'metric': metric, 'protocol': PROTOCOL,
        'model': {**entry, 'dim': int(emb.x.shape[-1])},
        'captions': dict(zip(task.classes, captions)),
        'class_accuracy': class_results(task, scored, np.stack([sim[c.key] for c in scored])),
        'class_metric': 'AP' if task.multilabel else 'accuracy',
        'settings': {**{k: v for k, v in asdict(opts).items() if k not in ('progress', 'cache_dir', 'use_cache')},
                     'device': device, 'unit_sec': task.unit_sec, 'sample_rate': int(loaded.runtime.sample_rate),
                     'norm_stats': [float(v) for v in loaded.runtime.norm_stats.tolist()]},
        'skipped': {'count': len(emb.failed), 'files': [list(f) for f in emb.failed[:50]]},
    }
    timings['total_s'] = time.perf_counter() - clock
    report.update(timings=timings, created=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  m2d_version=__version__)
    out = Path(output_dir) if output_dir is not None else weights_task_dir(loaded.name, task)
    report['output_dir'] = str(out)
    write_report(report, out)
    log.info('%s on %s: zero-shot %s %.2f %% -> %s', loaded.name, task.name, metric, 100 * entry['mean'],
             out / 'report.json')
    return report


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``out/report.json`` and ``out/report.md`` (written to temporary names, then renamed)."""
    from .zeroshot_report import markdown

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / 'report.json') as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=json_default) + '\n')
    with atomic_path(out / 'report.md') as tmp:
        tmp.write_text(markdown(report))
    return out / 'report.json'


# ---------------------------------------------------------------------------------------------
# entry points: one task, several weight files, the paper's table


def zeroshot_eval(weights: str | Path | list[str | Path], task: Task, output_dir: str | Path | None = None,
                  **options) -> dict[str, Any]:
    """Zero-shot evaluation of one weight file (returns its report) or several (each report in
    ``output_dir/<weights-name>/``, default each its own folder; ``summary.md``/``.json`` in
    `output_dir`, default ``eval/zeroshot-compare/<task>/``; returns the summary with ``'reports'``).
    Options: `ZeroShotOptions`."""
    from .linear import evaluate_each

    opts = ZeroShotOptions.from_kwargs(options)
    return evaluate_each(weights, task, output_dir, lambda w, out: evaluate_zeroshot(w, task, out, opts),
                         Path('eval') / 'zeroshot-compare' / task.name, **SUMMARY_TEXT)


SUMMARY_TEXT = {
    'title': 'Zero-shot classification summary',
    'description': "Zero-shot test results ({metrics}); EVAR's protocol: fold tasks pool the predictions of "
                   'every fold into one score.',
    'spread': False,
    'published_note': "Rows marked (published) are M2D-CLAP's zero-shot results in the Interspeech 2024 paper "
                      '(Table 5, arXiv:2406.02032; the AudioSet column is the AudioSet eval set, as20k\'s test split).',
}


def evar_zeroshot_entries(root: str | Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The suite entries of the paper's zero-shot tasks found under `root` (``ROOT/<task>/<task>.csv``),
    and the missing ones with the reason."""
    return evar_entries(root, tuple(ZEROSHOT_TABLE_TASKS), 'zero-shot evar suite')


def run_zeroshot_suite(weights: list[str | Path], suite: str | Path, data_dir: str | Path | None = None,
                       output_dir: str | Path | None = None, unit_sec: float | None = None, **options) -> dict:
    """Every weight file on every task of a suite: ``'evar'`` (the paper's seven zero-shot tasks from
    ``DATA_DIR/<task>/<task>.csv``, published rows beside) or a suite file (`suite.read_suite`'s
    format); reports in ``OUTPUT_DIR/<weights-name>/<task>/``, the table in ``OUTPUT_DIR/summary.md``
    (default OUTPUT_DIR ``eval/zeroshot-<suite>/``). A task that fails is listed and the others go on."""
    opts = ZeroShotOptions.from_kwargs(options)
    extra: dict[str, Any] = dict(SUMMARY_TEXT)
    if str(suite).lower() == 'evar' and not Path(suite).is_file():
        if data_dir is None:
            raise M2DError('--suite evar reads ROOT/<task>/<task>.csv: give --data_dir ROOT')
        entries, gaps = evar_zeroshot_entries(data_dir)
        order = list(ZEROSHOT_TABLE_TASKS)
        extra.update(gaps=gaps, published=[{'name': n, 'results': dict(zip(ZEROSHOT_TABLE_TASKS, v))}
                                           for n, v in PUBLISHED_ZEROSHOT.items()],
                     title="Zero-shot classification: the M2D-CLAP paper's table")
        name = 'evar'
    else:
        entries = read_suite(suite)
        order = [e['name'] for e in entries]
        extra.pop('published_note')
        name = Path(suite).stem
    out = Path(output_dir) if output_dir is not None else Path('eval') / f'zeroshot-{name}'

    wording: dict[str, str] = {}  # entry name -> the task's own name, which EVAR's caption wording goes by

    def load(entry: dict[str, Any]) -> Task:
        task = load_zeroshot_task(entry.get('task'), csv=entry.get('csv'), data_dir=entry.get('data_dir'),
                                  unit_sec=entry.get('unit_sec', unit_sec))
        wording[entry['name']] = task.name
        task.name = entry['name']
        return task

    def evaluate(w: str | Path, task: Task, folder: Path) -> dict[str, Any]:
        return evaluate_zeroshot(w, task, folder, opts, wording=wording[task.name])

    return run_suite_entries(weights, entries, out, load, evaluate, 'zero-shot suite', order, **extra)

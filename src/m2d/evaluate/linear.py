"""Linear evaluation of weight files on a task: embeddings -> linear probe over seeds -> report.

    >>> report = linear_eval('run/checkpoint-300.pth', load_task('fsdd-digits', data_dir='fsdd'))
    >>> report['model'], report['random'], report['logmel']   # {'mean', 'std', 'per_seed'} each

For each weight file: load it once, pick the normalization statistics (the file's, or ``'auto'``:
computed on the train split), extract the clip embeddings (cached), train the linear probe with
every seed, and do the same for the two baselines (raw log-mel statistics and a random encoder of
the same shape). Unreadable clips are skipped and counted in the report; a test clip that could
not be read is flagged prominently, and more than `max_failed` of the task is an error. The report
goes to ``OUTPUT_DIR/report.json`` and ``report.md`` (with figures when matplotlib is installed).
Several weight files are evaluated one after the other and compared in ``summary.md``/``.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import M2DError
from ..fileio import atomic_path
from . import metrics
from .embed import (EmbeddingError, Embeddings, auto_norm_stats, file_sha256, logmel_embeddings, model_embeddings,
                    parse_layers)
from .probe import ProbeResult, Split, probe
from .report import pct
from .tasks import SPLITS, Task

log = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 50


@dataclass
class LinearOptions:
    """Settings of a linear evaluation (the options of `linear_eval` and `m2d linear-eval`)."""

    layers: str | Sequence[int] | None = None  # None: last layer; 'all' or indices: concatenated
    per_layer: bool = False                    # one result per layer (and a plot against depth)
    seeds: int = 3
    seed: int = 0                              # first probe seed (seeds are seed, seed+1, ...)
    lr: float = 3e-5
    epochs: int = 200
    patience: int = 20
    batch_size: int = 128
    norm_stats: str | Sequence[float] | None = None  # None: the weight file's; 'auto': the train split's
    baselines: bool = True
    random_seed: int = 0                       # initialization of the random encoder
    device: str | None = None                  # default: cuda if available, else cpu
    bf16: bool = False
    embed_batch_size: int = 16
    cache_dir: str | None = None
    use_cache: bool = True
    max_failed: float = 0.01                   # the largest fraction of unreadable clips that is skipped
    figures: bool = True
    progress: bool = True
    trust: bool = False

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> LinearOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise M2DError(f'linear_eval: unknown option(s) {", ".join(unknown)} (known: {", ".join(sorted(names))})')
        opts = cls(**options)
        for name in ('seeds', 'epochs', 'patience', 'batch_size', 'embed_batch_size'):
            if getattr(opts, name) < 1:
                raise M2DError(f'--{name} {getattr(opts, name)}: must be at least 1')
        if not opts.lr > 0:
            raise M2DError(f'--lr {opts.lr}: must be positive')
        return opts


def weights_name(path: str | Path) -> str:
    """A readable name of a weight file: ``FOLDER_STEM`` when the folder is a run/release folder
    (``m2d_vit_base-80x608p16x16-221006-mr7_checkpoint-300``), else the file's stem."""
    from ..checkpoint import parse_model_name

    path = Path(path)
    if parse_model_name(path.parent.name):
        return f'{path.parent.name}_{path.stem}'
    return path.stem


def default_output_dir(weights: str | Path, task: Task) -> Path:
    """``eval/<weights-name>/<task>/`` under the current folder."""
    return Path('eval') / weights_name(weights) / task.name


# ---------------------------------------------------------------------------------------------
# probing embeddings


def split_features(task: Task, emb: Embeddings, layers: Sequence[int] | None = None) -> dict[str, Split]:
    """Train/valid/test features (the vectors of `layers` concatenated; default all of `emb`) and
    targets (clips that failed are left out)."""
    out = {}
    for s in SPLITS:
        clips = task.split(s)
        x, present = emb.features(clips, layers)
        out[s] = Split(x, task.targets(clips)[present])
        if len(x) == 0:
            raise EmbeddingError(f'{task.source}: no clip of the {s} split could be embedded')
    return out


def run_probe(task: Task, emb: Embeddings, opts: LinearOptions, device: str, desc: str,
              layers: Sequence[int] | None = None) -> ProbeResult:
    """The linear probe with every seed on `emb` (the vectors of `layers` concatenated; default all)."""
    sp = split_features(task, emb, layers)
    return probe(sp['train'], sp['valid'], sp['test'], multilabel=task.multilabel, n_classes=len(task.classes),
                 seeds=opts.seeds, seed=opts.seed, lr=opts.lr, epochs=opts.epochs, patience=opts.patience,
                 batch_size=opts.batch_size, device=device, progress=opts.progress, desc=desc)


def check_failures(task: Task, emb: Embeddings, max_failed: float) -> dict[str, Any]:
    """Count the clips that could not be embedded; error when more than `max_failed` of the task failed.

    Returns ``{'count', 'by_split', 'files'}`` for the report; warns loudly when test clips are missing.
    """
    by_path = {str(c.path): c for c in task.clips}
    by_split = {s: 0 for s in SPLITS}
    for path, _ in emb.failed:
        clip = by_path.get(path)
        if clip is not None:
            by_split[clip.split] += 1
    n, total = len(emb.failed), len(task.clips)
    info = {'count': n, 'by_split': by_split, 'files': [list(f) for f in emb.failed[:MAX_LISTED_FAILURES]]}
    if not n:
        return info
    if n > max_failed * total:
        path, reason = emb.failed[0]
        raise EmbeddingError(f'{task.source}: {n} of {total} clips could not be read ({100 * n / total:.1f} %, more '
                             f'than the {100 * max_failed:g} % that may be skipped); first: {reason}')
    log.warning('%s: %d of %d clips could not be read and are skipped (train %d, valid %d, test %d); first: %s',
                task.name, n, total, by_split['train'], by_split['valid'], by_split['test'], emb.failed[0][1])
    if by_split['test']:
        n_test = len(task.split('test'))
        log.warning('THE TEST SET IS SMALLER: %d of %d test clips of %s could not be read; the results are on %d '
                    'test clips', by_split['test'], n_test, task.name, n_test - by_split['test'])
    return info


def _class_results(task: Task, result: ProbeResult, emb: Embeddings) -> tuple[dict[str, float | None], list | None]:
    """Per-class accuracy (single-label; per-class AP for multi-label), averaged over seeds, and the
    confusion matrix of the first seed (single-label only)."""
    test = task.split('test')
    _, present = emb.features(test)
    y = task.targets(test)[present]
    C = len(task.classes)
    if task.multilabel:
        per = np.nanmean([metrics.class_average_precision(y, f.test_scores) for f in result.fits], axis=0)
        return {c: (None if np.isnan(v) else float(v)) for c, v in zip(task.classes, per)}, None
    per = np.mean([metrics.class_accuracy(y, f.test_scores.argmax(1), C) for f in result.fits], axis=0)
    cm = metrics.confusion_matrix(y, result.fits[0].test_scores.argmax(1), C)
    return {c: (None if np.isnan(v) else float(v)) for c, v in zip(task.classes, per)}, cm.tolist()


def _entry(result: ProbeResult, emb: Embeddings) -> dict[str, Any]:
    return {**result.summary(), 'valid': [f.valid for f in result.fits], 'best_epoch': [f.best_epoch for f in result.fits],
            'epochs_run': [f.epochs_run for f in result.fits], 'dim': emb.dim}


def convergence_note(name: str, entry: dict[str, Any], opts: LinearOptions) -> str | None:
    """A warning when the probe never stopped early and its best epoch is near the last one with every
    seed: the validation metric was still improving, so the result says more about the optimization
    (lr x steps) than about the representation."""
    near_end = all(b > 0.9 * opts.epochs for b in entry['best_epoch'])
    if near_end and all(e == opts.epochs for e in entry['epochs_run']):
        return (f'{name}: the probe was still improving at epoch {opts.epochs} (best epochs {entry["best_epoch"]}); '
                f'it is under-trained at lr {opts.lr:g} - compare with a larger --lr or more --epochs')
    return None


# ---------------------------------------------------------------------------------------------
# one weight file


_BASELINE_MEMO: dict[str, tuple[dict, float, float, bool]] = {}  # same baseline, same task, same options


def _norm_stats(opts: LinearOptions, runtime, task: Task) -> tuple[tuple[float, float], str]:
    if opts.norm_stats is None:
        return tuple(float(v) for v in runtime.norm_stats.tolist()), 'weights'
    if isinstance(opts.norm_stats, str):
        if opts.norm_stats.strip().lower() == 'auto':
            return auto_norm_stats(runtime, task, seed=opts.seed, cache_dir=opts.cache_dir, use_cache=opts.use_cache,
                                   progress=opts.progress), 'auto (train split)'
        try:
            values = [float(v) for v in opts.norm_stats.split(',')]
        except ValueError:
            values = []
    else:
        values = [float(v) for v in opts.norm_stats]
    if len(values) != 2 or not values[1] > 0:
        raise M2DError(f'--norm_stats {opts.norm_stats!r}: expected "auto" or MEAN,STD (STD > 0)')
    return (values[0], values[1]), 'given'


def evaluate_weights(weights: str | Path, task: Task, output_dir: str | Path | None, opts: LinearOptions) -> dict:
    """Linear evaluation of one weight file on `task`; writes and returns the report."""
    from .. import hub
    from ..checkpoint import load_checkpoint
    from ..runtime import RuntimeM2D, resolve_device
    from .baselines import random_identity, random_runtime

    t_start = time.perf_counter()
    timings: dict[str, Any] = {}
    device = str(resolve_device(opts.device))
    path = hub.weights_path(weights)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(path, trust=opts.trust)
    runtime = RuntimeM2D(checkpoint=ckpt, bf16=opts.bf16)
    timings['load_s'] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats, stats_source = _norm_stats(opts, runtime, task)
    runtime.norm_stats.copy_(torch.tensor(stats))
    timings['norm_stats_s'] = time.perf_counter() - t0

    depth = runtime.cfg.depth
    layers = parse_layers(opts.layers, depth)  # None: the last layer (the final output)
    model_layers = layers if layers is not None else [depth - 1]
    extract = (layers or list(range(depth))) if opts.per_layer else layers
    sha = file_sha256(path)
    emb = model_embeddings(runtime, task, identity={'weights_sha256': sha}, layers=extract,
                           batch_size=opts.embed_batch_size, device=device, cache_dir=opts.cache_dir,
                           use_cache=opts.use_cache, progress=opts.progress)
    timings['embed_model_s'] = emb.seconds
    timings['embed_model_cached'] = emb.cached
    timings['embed_clips_per_s'] = len(emb.keys) / emb.seconds if emb.seconds > 0 else None
    skipped = check_failures(task, emb, opts.max_failed)

    report: dict[str, Any] = {
        'task': {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
                 'unit_sec': task.unit_sec, 'clips': task.counts(), 'notes': task.notes},
        'weights': str(path),
        'weights_name': weights_name(path),
        'weights_sha256': sha,
        'settings': {**{k: v for k, v in asdict(opts).items() if k not in ('progress', 'cache_dir', 'use_cache')},
                     'layers': model_layers, 'device': device,
                     'norm_stats': list(stats), 'norm_stats_source': stats_source,
                     'geometry': {'input_size': list(ckpt.vit.input_size), 'patch_size': list(ckpt.vit.patch_size),
                                  'embed_dim': ckpt.vit.embed_dim, 'depth': depth, 'sample_rate': ckpt.sample_rate},
                     'embedding_dim': emb.x.shape[2] * len(model_layers)},
        'metric': 'mAP' if task.multilabel else 'accuracy',
    }

    t0 = time.perf_counter()
    name = weights_name(path)
    result = run_probe(task, emb, opts, device, name, layers=model_layers)  # concatenated
    report['model'] = {**_entry(result, emb), 'dim': emb.x.shape[2] * len(model_layers)}
    timings['probe_model_s'] = time.perf_counter() - t0
    if opts.per_layer:
        t0 = time.perf_counter()
        report['per_layer'] = []
        for layer in emb.layers:
            r = run_probe(task, emb, opts, device, f'{name} layer {layer}', layers=[layer])
            report['per_layer'].append({'layer': layer, **r.summary()})
        timings['probe_per_layer_s'] = time.perf_counter() - t0
    report['class_accuracy'], report['confusion_matrix'] = _class_results(task, result, emb)
    if task.multilabel:
        report['class_metric'] = 'AP'

    embeddings = {'model': emb}
    if opts.baselines:
        baseline_layers = None if layers is None else list(layers)
        rand_identity = random_identity(ckpt, opts.random_seed)
        for kind in ('logmel', 'random'):
            t0 = time.perf_counter()
            memo_key = json.dumps([kind, task.fingerprint(), task.unit_sec, rand_identity if kind == 'random' else
                                   ckpt.sample_rate, baseline_layers, stats, opts.bf16,
                                   {k: v for k, v in asdict(opts).items() if k in ('seeds', 'seed', 'lr', 'epochs',
                                                                                   'patience', 'batch_size')}],
                                  sort_keys=True, default=str)
            if memo_key in _BASELINE_MEMO:
                entry, embed_s, probe_s, _ = _BASELINE_MEMO[memo_key]
                cached = True  # not recomputed; the times are those of the first computation
                log.info('%s baseline: reused from the evaluation of an earlier weight file', kind)
            else:
                if kind == 'logmel':
                    b_emb = logmel_embeddings(task, ckpt.sample_rate, cache_dir=opts.cache_dir,
                                              use_cache=opts.use_cache, progress=opts.progress)
                else:
                    b_emb = model_embeddings(random_runtime(runtime, ckpt, opts.random_seed), task, name='random',
                                             identity=rand_identity, layers=baseline_layers,
                                             batch_size=opts.embed_batch_size, device=device,
                                             cache_dir=opts.cache_dir, use_cache=opts.use_cache,
                                             progress=opts.progress)
                check_failures(task, b_emb, opts.max_failed)
                embed_s, cached = b_emb.seconds, b_emb.cached
                t1 = time.perf_counter()
                entry = _entry(run_probe(task, b_emb, opts, device, f'{kind} baseline'), b_emb)
                probe_s = time.perf_counter() - t1
                _BASELINE_MEMO[memo_key] = (entry, embed_s, probe_s, cached)
                embeddings[kind] = b_emb
            report[kind] = entry
            timings[f'embed_{kind}_s'] = embed_s
            timings[f'embed_{kind}_cached'] = cached
            timings[f'probe_{kind}_s'] = probe_s

    report['skipped'] = skipped
    notes = [convergence_note(k, report[k], opts) for k in ('model', 'random', 'logmel') if k in report]
    report['notes'] = [n for n in notes if n]
    for note in report['notes']:
        log.warning('%s', note)
    timings['total_s'] = time.perf_counter() - t_start
    report['timings'] = timings
    report['created'] = datetime.now(timezone.utc).isoformat(timespec='seconds')
    report['m2d_version'] = __version__

    out = Path(output_dir) if output_dir is not None else default_output_dir(path, task)
    report['output_dir'] = str(out)
    write_report(report, out, task, emb, figures=opts.figures)
    log.info('%s on %s: %s %s (log-mel %s, random %s) -> %s', name, task.name, report['metric'],
             pct(report['model']), pct(report.get('logmel')), pct(report.get('random')), out / 'report.json')
    return report


def write_report(report: dict, out: Path, task: Task, emb: Embeddings, figures: bool = True) -> Path:
    """``out/report.json`` and ``out/report.md`` (figures beside them when matplotlib is installed)."""
    from .report import write_markdown

    out.mkdir(parents=True, exist_ok=True)
    report['figures'] = {}
    if figures:
        from .plots import report_figures

        report['figures'] = report_figures(report, out, task, emb)
    with atomic_path(out / 'report.json') as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=_json_default) + '\n')
    write_markdown(report, out / 'report.md')
    return out / 'report.json'


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f'not JSON serializable: {type(o).__name__}')


# ---------------------------------------------------------------------------------------------
# the public entry point


def linear_eval(weights: str | Path | Sequence[str | Path], task: Task, output_dir: str | Path | None = None,
                **options) -> dict:
    """Linear evaluation of one weight file (or several, compared) on `task`; options: `LinearOptions`.

    One weight file: returns the report also written to ``output_dir/report.json`` (default
    ``eval/<weights-name>/<task>/``). Several: each report goes to ``output_dir/<weights-name>/``
    (default: each its own default folder) and the comparison to ``output_dir/summary.json`` and
    ``summary.md`` (default ``eval/compare/<task>/``); returns the summary with the reports under
    ``'reports'``.
    """
    opts = LinearOptions.from_kwargs(options)
    if isinstance(weights, (str, Path)):
        return evaluate_weights(weights, task, output_dir, opts)
    weights = list(weights)
    if not weights:
        raise M2DError('--weights: no weight file given')
    if len(weights) == 1:
        return evaluate_weights(weights[0], task, output_dir, opts)
    from .suite import write_summary

    reports, names = [], [weights_name(w) for w in weights]
    for i, w in enumerate(weights):
        sub = names[i] if names.count(names[i]) == 1 else f'{names[i]}-{i + 1}'
        out = Path(output_dir) / sub if output_dir is not None else None
        reports.append(evaluate_weights(w, task, out, opts))
    summary_dir = Path(output_dir) if output_dir is not None else Path('eval') / 'compare' / task.name
    summary = write_summary(reports, summary_dir)
    summary['reports'] = reports
    return summary

"""Linear evaluation of weight files on a task, EVAR's protocol: embeddings -> linear probe -> report.

    >>> report = linear_eval('run/checkpoint-300.pth', load_task('fsdd-digits', data_dir='fsdd'))
    >>> report['model'], report['random'], report['logmel']   # {'mean', 'std', 'per_seed'} each

For each weight file: load it once, pick the normalization statistics (the file's, as EVAR, or
``'auto'``: computed on the train split), extract the clip embeddings once (cached), train EVAR's
linear probe (`probe`) with every seed on every fold (a fold task runs each fold as the test set in
turn, reusing the same embeddings; the score is the mean over folds, ``per_fold`` in the report),
and do the same for the two baselines (raw log-mel statistics and a random encoder of the same
shape). Unreadable clips are skipped and counted in the report; a test clip that could
not be read is flagged prominently, and more than `max_failed` of the task is an error. The report
goes to ``OUTPUT_DIR/report.json`` and ``report.md`` (with figures when matplotlib is installed).
Several weight files are evaluated one after the other and compared in ``summary.md``/``.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..encode_files import parse_layers
from ..errors import M2DError
from ..fileio import atomic_path
from ..normstats import parse_mean_std
from . import metrics
from .embed import EmbeddingError, Embeddings, auto_norm_stats, file_sha256, logmel_embeddings, model_embeddings
from .probe import ADAM_BETAS, ADAM_EPS, ProbeResult, Split, probe
from .report import pct
from .summary import write_summary
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
    lr: float = 3e-5                           # EVAR's lr_lineareval (config/m2d.yaml)
    epochs: int = 200                          # max_iter
    patience: int = 20                         # n_iter_no_change (early_stop_epochs)
    batch_size: int | None = None              # None: EVAR's min(200, N)
    weight_decay: float = 1e-8                 # the classifier's alpha
    fold: str | None = None                    # one fold of a fold task (default: every fold)
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
            if getattr(opts, name) is not None and getattr(opts, name) < 1:
                raise M2DError(f'--{name} {getattr(opts, name)}: must be at least 1')
        if not opts.lr > 0:
            raise M2DError(f'--lr {opts.lr}: must be positive')
        if not opts.weight_decay >= 0:
            raise M2DError(f'--weight_decay {opts.weight_decay}: must be 0 or more')
        if opts.fold is not None:
            opts.fold = str(opts.fold)
        return opts


PROBE_OPTIONS = ('seeds', 'seed', 'lr', 'epochs', 'patience', 'batch_size', 'weight_decay', 'fold')


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
# probing embeddings, fold by fold


def fold_tasks(task: Task, fold: str | int | None = None) -> list[tuple[str | None, Task]]:
    """The (fold id, task) pairs to probe: every fold as the test set in turn (a fold task), only `fold`
    when given, or the task itself (fold id None) when it has a split (`fold` is then ignored)."""
    if not task.folds:
        if fold is not None:
            log.warning('%s has a split, not folds: --fold %s is ignored for it', task.name, fold)
        return [(None, task)]
    if fold is not None:
        return [(str(fold), task.for_fold(fold))]
    return [(f, task.for_fold(f)) for f in task.folds]


def split_features(task: Task, emb: Embeddings, layers: Sequence[int] | None = None) -> dict[str, Split | None]:
    """Train/valid/test features (the vectors of `layers` concatenated; default all of `emb`) and
    targets (clips that failed are left out); valid is None when the task has no valid split."""
    out: dict[str, Split | None] = {}
    for s in SPLITS:
        clips = task.split(s)
        if s == 'valid' and not clips:
            out[s] = None  # the probe carves EVAR's 10 % from train
            continue
        x, present = emb.features(clips, layers)
        out[s] = Split(x, task.targets(clips)[present])
        if len(x) == 0:
            raise EmbeddingError(f'{task.source}: no clip of the {s} split could be embedded')
    return out


@dataclass
class FoldResults:
    """Probe results of one representation: one `ProbeResult` per fold (a single one without folds)."""

    folds: list[str | None]
    results: list[ProbeResult]
    targets: list[np.ndarray]      # per fold: the test targets of the embedded test clips

    @property
    def per_seed(self) -> list[float]:
        """One score per seed: its mean over folds."""
        return [float(v) for v in np.mean([r.per_seed for r in self.results], axis=0)]

    @property
    def fits(self) -> list:
        return [f for r in self.results for f in r.fits]

    def summary(self) -> dict[str, Any]:
        """``{'mean', 'std', 'per_seed'}`` over seeds (+ ``'per_fold'``, each the mean over seeds, with folds)."""
        per_seed = self.per_seed
        out = {'mean': float(np.mean(per_seed)),
               'std': float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0, 'per_seed': per_seed}
        if self.folds != [None]:
            out['per_fold'] = [r.mean for r in self.results]
        return out


def run_probe(tasks: list[tuple[str | None, Task]], emb: Embeddings, opts: LinearOptions, device: str, desc: str,
              layers: Sequence[int] | None = None) -> FoldResults:
    """The linear probe with every seed on every fold of `tasks` (the vectors of `layers` concatenated;
    default all). The embeddings are the same for every fold: computed once per clip."""
    results, targets = [], []
    for fold, task in tasks:
        sp = split_features(task, emb, layers)
        name = desc if fold is None else f'{desc} fold {fold}'
        results.append(probe(sp['train'], sp['valid'], sp['test'], multilabel=task.multilabel,
                             n_classes=len(task.classes), seeds=opts.seeds, seed=opts.seed, lr=opts.lr,
                             epochs=opts.epochs, patience=opts.patience, batch_size=opts.batch_size,
                             weight_decay=opts.weight_decay, device=device, progress=opts.progress, desc=name))
        targets.append(sp['test'].y)
    return FoldResults([f for f, _ in tasks], results, targets)


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


def _class_results(task: Task, result: FoldResults) -> tuple[dict[str, float | None], list | None]:
    """Per-class accuracy (single-label; per-class AP for multi-label) over the test clips of every fold,
    averaged over seeds, and the confusion matrix of the first seed (single-label only)."""
    y = np.concatenate(result.targets)
    n_seeds = len(result.results[0].fits)
    scores = [np.concatenate([r.fits[s].test_scores for r in result.results]) for s in range(n_seeds)]
    C = len(task.classes)
    if task.multilabel:
        per = np.nanmean([metrics.class_average_precision(y, sc) for sc in scores], axis=0)
        return {c: (None if np.isnan(v) else float(v)) for c, v in zip(task.classes, per)}, None
    per = np.mean([metrics.class_accuracy(y, sc.argmax(1), C) for sc in scores], axis=0)
    cm = metrics.confusion_matrix(y, scores[0].argmax(1), C)
    return {c: (None if np.isnan(v) else float(v)) for c, v in zip(task.classes, per)}, cm.tolist()


def _entry(result: FoldResults, dim: int) -> dict[str, Any]:
    fits = result.fits
    return {**result.summary(), 'valid': [f.valid for f in fits], 'best_epoch': [f.best_epoch for f in fits],
            'epochs_run': [f.epochs_run for f in fits], 'batch_size': sorted({f.batch_size for f in fits}),
            'n_valid': [f.n_valid for f in fits], 'dim': dim}


def convergence_note(name: str, entry: dict[str, Any], opts: LinearOptions) -> str | None:
    """A warning when the probe never stopped early and its best epoch is near the last one with every
    seed: the validation metric was still improving, so the result says more about the optimization
    (lr x steps) than about the representation."""
    near_end = all(b > 0.9 * opts.epochs for b in entry['best_epoch'])
    if near_end and all(e == opts.epochs for e in entry['epochs_run']):
        return (f'{name}: the probe was still improving at epoch {opts.epochs} (best epochs {entry["best_epoch"]}); '
                f'it is under-trained at lr {opts.lr:g} - compare with a larger --lr or more --epochs')
    return None


def protocol(opts: LinearOptions) -> dict[str, Any]:
    """The probe's settings as report.json lists them, and whether they are EVAR's."""
    evar = {'lr': 3e-5, 'epochs': 200, 'patience': 20, 'batch_size': None, 'weight_decay': 1e-8}
    changed = sorted(k for k, v in evar.items() if getattr(opts, k) != v)
    return {'name': 'EVAR protocol' + (f' (changed: {", ".join(changed)})' if changed else ''),
            'classifier': "TorchMLPClassifier2(hidden_layer_sizes=(), max_iter=epochs, early_stopping=True, "
                          "n_iter_no_change=patience, standard_scaler=True, mixup=False), as EVAR's lineareval.py",
            'lr': opts.lr, 'max_epochs': opts.epochs, 'early_stop_patience': opts.patience,
            'batch_size': opts.batch_size or 'min(200, N)', 'optimizer': 'Adam', 'betas': list(ADAM_BETAS),
            'eps': ADAM_EPS, 'weight_decay': opts.weight_decay, 'scaler': 'StandardScaler (train statistics)',
            'loss': 'cross-entropy / classes (single-label), BCE on sigmoid (multi-label)',
            'early_stopping': 'validation metric >= best (ties move to the later epoch); stop after `patience` '
                              'epochs without improvement; best-validation weights are tested',
            'validation': "the task's valid split; without one, a random 10 % of train with every class present "
                          '(train_test_sure_split, 100 draws)',
            'folds': 'every fold is the test set in turn; the task score is the mean over folds'}


# ---------------------------------------------------------------------------------------------
# one weight file: load -> statistics -> embed -> probe -> baselines -> report


_BASELINE_MEMO: dict[str, tuple[dict, float, float, bool]] = {}  # same baseline, same task, same options


@dataclass
class Loaded:
    """A weight file ready to embed with."""

    path: Path
    ckpt: Any        # m2d.checkpoint.Checkpoint
    runtime: Any     # m2d.runtime.RuntimeM2D
    sha256: str
    name: str


def load_weights(weights: str | Path, opts: LinearOptions) -> Loaded:
    """Resolve (released names too), read and wrap a weight file in a `RuntimeM2D`."""
    from .. import hub
    from ..checkpoint import load_checkpoint
    from ..runtime import RuntimeM2D

    path = hub.weights_path(weights)
    ckpt = load_checkpoint(path, trust=opts.trust)
    return Loaded(path, ckpt, RuntimeM2D(checkpoint=ckpt, bf16=opts.bf16), file_sha256(path), weights_name(path))


def choose_norm_stats(opts: LinearOptions, loaded: Loaded, task: Task) -> tuple[tuple[float, float], str, str]:
    """The normalization statistics, their source ('weights', 'default', 'auto (train split)' or 'given')
    and a sentence saying so. Default as EVAR with config/m2d.yaml: the weight file's ``norm_stats``
    (the reference's get_backbone writes them over the yaml's mean/std and AR_M2D.precompute keeps
    them), or the yaml's -7.1, 4.2 for a file without them (the 2022 releases)."""
    from ..checkpoint import DEFAULT_NORM_STATS

    spec = opts.norm_stats
    if spec is None:
        if loaded.ckpt.has_norm_stats:
            return tuple(loaded.ckpt.norm_stats), 'weights', f'from the weight file ({loaded.path.name}), as EVAR'
        return (tuple(DEFAULT_NORM_STATS), 'default',
                "the weight file has none: EVAR's config/m2d.yaml values -7.1, 4.2, as EVAR")
    if isinstance(spec, str) and spec.strip().lower() == 'auto':
        stats = auto_norm_stats(loaded.runtime, task, seed=opts.seed, cache_dir=opts.cache_dir,
                                use_cache=opts.use_cache, progress=opts.progress)
        return stats, 'auto (train split)', 'computed on the train split (--norm_stats auto; not EVAR)'
    return (parse_mean_std(spec, '--norm_stats', expected='"auto" or MEAN,STD'), 'given',
            'given with --norm_stats (not EVAR)')


def embed_model(loaded: Loaded, task: Task, opts: LinearOptions, device: str,
                layers: list[int] | None) -> Embeddings:
    """The model's clip embeddings of every clip (all folds share them), cached."""
    return model_embeddings(loaded.runtime, task, identity={'weights_sha256': loaded.sha256}, layers=layers,
                            batch_size=opts.embed_batch_size, device=device, cache_dir=opts.cache_dir,
                            use_cache=opts.use_cache, progress=opts.progress)


def probe_baselines(loaded: Loaded, task: Task, folds: list[tuple[str | None, Task]], opts: LinearOptions,
                    device: str, layers: list[int] | None, stats: tuple[float, float],
                    timings: dict[str, Any]) -> dict[str, dict]:
    """Log-mel and random-encoder entries (memoized across weight files of the same geometry)."""
    from .baselines import random_identity, random_runtime

    out = {}
    rand_identity = random_identity(loaded.ckpt, opts.random_seed)
    for kind in ('logmel', 'random'):
        t0 = time.perf_counter()
        memo_key = json.dumps([kind, task.fingerprint(), [f for f, _ in folds], task.unit_sec,
                               rand_identity if kind == 'random' else loaded.ckpt.sample_rate, layers, stats,
                               opts.bf16, {k: v for k, v in asdict(opts).items() if k in PROBE_OPTIONS}],
                              sort_keys=True, default=str)
        if memo_key in _BASELINE_MEMO:
            entry, embed_s, probe_s, cached = _BASELINE_MEMO[memo_key]
            cached = True  # not recomputed; the times are those of the first computation
            log.info('%s baseline: reused from the evaluation of an earlier weight file', kind)
        else:
            if kind == 'logmel':
                emb = logmel_embeddings(task, loaded.ckpt.sample_rate, cache_dir=opts.cache_dir,
                                        use_cache=opts.use_cache, progress=opts.progress)
            else:
                emb = model_embeddings(random_runtime(loaded.runtime, loaded.ckpt, opts.random_seed), task,
                                       name='random', identity=rand_identity, layers=layers,
                                       batch_size=opts.embed_batch_size, device=device, cache_dir=opts.cache_dir,
                                       use_cache=opts.use_cache, progress=opts.progress)
            check_failures(task, emb, opts.max_failed)
            embed_s, cached = emb.seconds, emb.cached
            t1 = time.perf_counter()
            entry = _entry(run_probe(folds, emb, opts, device, f'{kind} baseline'), emb.dim)
            probe_s = time.perf_counter() - t1
            _BASELINE_MEMO[memo_key] = (entry, embed_s, probe_s, cached)
        out[kind] = entry
        timings[f'embed_{kind}_s'] = embed_s
        timings[f'embed_{kind}_cached'] = cached
        timings[f'probe_{kind}_s'] = probe_s
        log.debug('%s baseline: %.1f s', kind, time.perf_counter() - t0)
    return out


def task_info(task: Task, folds: list[tuple[str | None, Task]]) -> dict[str, Any]:
    """report.json's ``task``: what was evaluated, its folds, and the data's license and citation."""
    info = {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
            'unit_sec': task.unit_sec, 'clips': task.counts(), 'notes': task.notes}
    if task.folds:  # the loaded task's own hold-out (its first fold) is not what runs
        info['notes'] = [n for n in task.notes if not n.startswith('fold ')]
        info['folds'] = [f for f, _ in folds]
        info['all_folds'] = task.folds
        info['clips'] = {f: t.counts()['test'] for f, t in folds}  # test clips per fold
    for key in ('license', 'citation', 'source_url'):
        if task.prepared.get(key):
            info[key] = task.prepared[key]
    return info


@contextmanager
def _timed(timings: dict[str, Any], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def report_header(task: Task, folds: list[tuple[str | None, Task]], loaded: Loaded, opts: LinearOptions,
                  device: str, stats: tuple[tuple[float, float], str, str], layers: list[int], dim: int) -> dict:
    """The report's task, weights, protocol and settings (before any result)."""
    vit = loaded.ckpt.vit
    return {
        'task': task_info(task, folds), 'weights': str(loaded.path), 'weights_name': loaded.name,
        'weights_sha256': loaded.sha256, 'protocol': protocol(opts),
        'settings': {**{k: v for k, v in asdict(opts).items() if k not in ('progress', 'cache_dir', 'use_cache')},
                     'layers': layers, 'device': device,
                     'norm_stats': list(stats[0]), 'norm_stats_source': stats[1], 'norm_stats_note': stats[2],
                     'geometry': {'input_size': list(vit.input_size), 'patch_size': list(vit.patch_size),
                                  'embed_dim': vit.embed_dim, 'depth': vit.depth,
                                  'sample_rate': loaded.ckpt.sample_rate},
                     'embedding_dim': dim},
        'metric': 'mAP' if task.multilabel else 'accuracy',
    }


def probe_model(task: Task, folds: list[tuple[str | None, Task]], emb: Embeddings, opts: LinearOptions, device: str,
                name: str, layers: list[int], timings: dict[str, Any]) -> dict[str, Any]:
    """The model's entry (its layers concatenated), per-layer results with `per_layer`, class results."""
    out: dict[str, Any] = {}
    with _timed(timings, 'probe_model_s'):
        result = run_probe(folds, emb, opts, device, name, layers=layers)
        out['model'] = _entry(result, emb.x.shape[2] * len(layers))
    if opts.per_layer:
        with _timed(timings, 'probe_per_layer_s'):
            out['per_layer'] = [{'layer': layer, **run_probe(folds, emb, opts, device, f'{name} layer {layer}',
                                                             layers=[layer]).summary()} for layer in emb.layers]
    out['class_accuracy'], out['confusion_matrix'] = _class_results(task, result)
    if task.multilabel:
        out['class_metric'] = 'AP'
    return out


def evaluate_weights(weights: str | Path, task: Task, output_dir: str | Path | None, opts: LinearOptions) -> dict:
    """Linear evaluation of one weight file on `task` (every fold of a fold task); writes and returns the
    report. The steps: load -> normalization statistics -> embed -> probe -> baselines -> report."""
    from ..runtime import resolve_device

    clock, timings = time.perf_counter(), {}
    device = str(resolve_device(opts.device))
    folds = fold_tasks(task, opts.fold)

    with _timed(timings, 'load_s'):
        loaded = load_weights(weights, opts)

    with _timed(timings, 'norm_stats_s'):
        stats = choose_norm_stats(opts, loaded, task)
        loaded.runtime.norm_stats.copy_(torch.tensor(stats[0]))
    log.info('%s: normalization mean %.4f, std %.4f %s', loaded.name, *stats[0], stats[2])

    depth = loaded.runtime.cfg.depth
    layers = parse_layers(opts.layers, depth)  # None: the last layer (the final output)
    model_layers = layers if layers is not None else [depth - 1]
    emb = embed_model(loaded, task, opts, device, (layers or list(range(depth))) if opts.per_layer else layers)
    timings.update(embed_model_s=emb.seconds, embed_model_cached=emb.cached,
                   embed_clips_per_s=len(emb.keys) / emb.seconds if emb.seconds > 0 else None)
    skipped = check_failures(task, emb, opts.max_failed)

    report = report_header(task, folds, loaded, opts, device, stats, model_layers, emb.x.shape[2] * len(model_layers))
    report.update(probe_model(task, folds, emb, opts, device, loaded.name, model_layers, timings))

    if opts.baselines:
        report.update(probe_baselines(loaded, task, folds, opts, device, layers, stats[0], timings))

    report['skipped'] = skipped
    report['notes'] = [n for n in (convergence_note(k, report[k], opts) for k in ('model', 'random', 'logmel')
                                   if k in report) if n]
    for note in report['notes']:
        log.warning('%s', note)
    timings['total_s'] = time.perf_counter() - clock
    report.update(timings=timings, created=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  m2d_version=__version__)
    out = Path(output_dir) if output_dir is not None else default_output_dir(loaded.path, task)
    report['output_dir'] = str(out)
    write_report(report, out, folds[0][1], emb, figures=opts.figures)
    log.info('%s on %s: %s %s (log-mel %s, random %s) -> %s', loaded.name, task.name, report['metric'],
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
        tmp.write_text(json.dumps(report, indent=1, default=json_default) + '\n')
    write_markdown(report, out / 'report.md')
    return out / 'report.json'


def json_default(o: Any) -> Any:
    """`json.dumps`' ``default`` for reports: numpy scalars, paths, tuples."""
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
    return evaluate_each(weights, task, output_dir, lambda w, out: evaluate_weights(w, task, out, opts),
                         Path('eval') / 'compare' / task.name)


def weight_folders(weights: Sequence[str | Path]) -> list[str]:
    """One sub-folder name per weight file when several are evaluated: its `weights_name`, with the
    file's position appended (``NAME-2``) where two files have the same name."""
    names = [weights_name(w) for w in weights]
    return [n if names.count(n) == 1 else f'{n}-{i + 1}' for i, n in enumerate(names)]


def evaluate_each(weights: str | Path | Sequence[str | Path], task: Task, output_dir: str | Path | None,
                  evaluate: Callable[[str | Path, Path | None], dict], compare_dir: Path, **summary_extra) -> dict:
    """`evaluate(weights, output_dir)` of one weight file (returns its report), or of each of several into
    ``output_dir/<weights-name>/`` (`weight_folders`; no `output_dir`: each its own default folder), then
    ``summary.md``/``.json`` in `output_dir` (default `compare_dir`; `summary_extra`: `write_summary`'s
    wording); returns the summary with the reports under ``'reports'``."""
    if isinstance(weights, (str, Path)):
        return evaluate(weights, output_dir)
    weights = list(weights)
    if not weights:
        raise M2DError('--weights: no weight file given')
    if len(weights) == 1:
        return evaluate(weights[0], output_dir)
    reports = [evaluate(w, Path(output_dir) / sub if output_dir is not None else None)
               for w, sub in zip(weights, weight_folders(weights))]
    summary = write_summary(reports, Path(output_dir) if output_dir is not None else compare_dir, **summary_extra)
    summary['reports'] = reports
    return summary

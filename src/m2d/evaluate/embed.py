"""Clip embeddings of a task, extracted on the jobs engine and cached on disk.

A clip embedding is the time average of `RuntimeM2D.encode` over the clip cropped/padded to the
task's unit length: ``[Fp*D]`` (3840-d for ViT-Base) from the last layer, or one such vector per
chosen layer. Extraction is a `m2d.jobs` job over the task's clips (clips read ahead in threads,
encoded in batches, an unreadable clip reported and skipped, never stopping the others).

The result is cached under ``CACHE/embeddings`` (``$M2D_CACHE``, default ``~/.cache/m2d``) per
(weight file content, task and clip list, layers, unit length, normalization statistics, bf16), so
a second evaluation of the same weights on the same task starts at the classifier. Baselines use
the same machinery: `logmel_embeddings` (mean and std of each mel bin over time) and any runtime
(e.g. the randomly initialized encoder of `baselines.random_runtime`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import M2DError
from ..fileio import atomic_path
from .tasks import Clip, Task, load_clip

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MAX_NORM_STATS_CLIPS = 10000  # clips drawn from train for --norm_stats auto


class EmbeddingError(M2DError):
    """Embeddings that cannot be used (too many unreadable clips, a bad --layers value, ...)."""


@dataclass
class Embeddings:
    """Embeddings of a task's clips: ``x[i]`` belongs to clip ``keys[i]``.

    `x` is ``[N, n_layers, D]`` float32: one vector per requested layer (a single one for the last
    layer, or the 160-d log-mel statistics). Clips that could not be read are in `failed`.
    """

    name: str                          # 'model', 'random', 'logmel', ...
    keys: list[str]
    x: np.ndarray
    layers: list[int]                  # encoder layer index of each vector; [] for log-mel
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0               # extraction time when computed (kept in the cache)
    cached: bool = False
    norm_stats: tuple[float, float] | None = None

    def features(self, clips: Sequence[Clip], layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Features of `clips` ``[n, len(layers)*D]`` (the vectors of `layers` concatenated; default all
        vectors) and a boolean mask ``[len(clips)]`` of the clips that have one (failed clips are absent)."""
        index = {k: i for i, k in enumerate(self.keys)}
        present = np.array([c.key in index for c in clips], dtype=bool)
        rows = [index[c.key] for c in clips if c.key in index]
        x = self.x[rows]
        if layers is not None:
            x = x[:, [self.layers.index(i) for i in layers]]
        return x.reshape(len(rows), -1), present

    @property
    def dim(self) -> int:
        return int(np.prod(self.x.shape[1:]))


# ---------------------------------------------------------------------------------------------
# cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else ``$M2D_CACHE/embeddings``, else ``~/.cache/m2d/embeddings``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from ..hub import cache_dir as weights_cache

    return weights_cache() / 'embeddings'


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (remembered per path, size and mtime within this process)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 22), b''):
                h.update(block)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def cache_file(root: Path, task: Task, identity: dict[str, Any]) -> Path:
    """Cache path for a task and what the embeddings depend on (`identity`, JSON-serializable)."""
    ident = json.dumps({**identity, 'task': task.name, 'clips': task.fingerprint(), 'unit_sec': task.unit_sec,
                        'version': CACHE_VERSION}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    safe = ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in task.name)
    return root / f'{safe}-{identity.get("kind", "emb")}-{digest}.npz'


def _save(path: Path, emb: Embeddings, identity: dict[str, Any]) -> None:
    meta = {'identity': identity, 'name': emb.name, 'layers': emb.layers, 'failed': emb.failed,
            'seconds': emb.seconds, 'norm_stats': emb.norm_stats}
    with atomic_path(path) as tmp:
        np.savez(tmp, x=emb.x, keys=np.array(emb.keys, dtype=str), meta=np.array(json.dumps(meta)))
    log.info('cached %s embeddings in %s', emb.name, path)


def _load(path: Path) -> Embeddings | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z['meta']))
            emb = Embeddings(name=meta['name'], keys=[str(k) for k in z['keys']], x=z['x'], layers=meta['layers'],
                             failed=[tuple(f) for f in meta['failed']], seconds=meta['seconds'], cached=True,
                             norm_stats=tuple(meta['norm_stats']) if meta['norm_stats'] else None)
    except Exception as e:  # a damaged cache file is recomputed, not fatal
        log.warning('%s: unreadable embedding cache (%s); recomputing', path, e)
        return None
    log.info('%s embeddings from the cache: %s', emb.name, path)
    return emb


# ---------------------------------------------------------------------------------------------
# extraction on the jobs engine


def run_clips(task: Task, clips: Sequence[Clip], name: str, read: Callable[[Clip], Any],
              transform: Callable[[list[Any]], list[np.ndarray]], batch_size: int, progress: bool
              ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], float]:
    """Run `transform` over batches of `read(clip)` for `clips` as a jobs-engine job; returns
    (key -> output, failures (path, reason), seconds)."""
    from .. import jobs

    by_key = {c.key: c for c in clips}
    plan = jobs.plan(None, name=name, items=[(c.path, c.key) for c in clips])
    t0 = time.perf_counter()
    summary = jobs.run(plan, read=lambda item: read(by_key[item.key]), transform=transform,
                       batch_key=lambda x: getattr(x, 'shape', None), batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    summary = jobs.finish(summary, plan)  # logs the one-line result (no files: results stay in memory)
    return dict(summary.results), [(str(p), str(r)) for p, r in summary.failed], seconds


def model_embeddings(runtime, task: Task, *, name: str = 'model', identity: dict[str, Any] | None = None,
                     layers: Sequence[int] | None = None, batch_size: int = 16, device: str | torch.device = 'cpu',
                     cache_dir: str | Path | None = None, use_cache: bool = True, progress: bool = True
                     ) -> Embeddings:
    """Embeddings of every clip of `task` by a `RuntimeM2D` (time-mean of `encode`, per chosen layer).

    `identity` names what the embeddings depend on besides the task (default: the SHA-256 of the
    weight file); with `use_cache` they are read from / written to the cache. The runtime's current
    `norm_stats` are used (and are part of the cache key).
    """
    depth = runtime.cfg.depth
    layer_list = list(layers) if layers is not None else [depth - 1]
    norm_stats = tuple(round(float(v), 6) for v in runtime.norm_stats.tolist())
    if identity is None:
        identity = {'weights_sha256': file_sha256(runtime.weight_file)}
    identity = {**identity, 'kind': name, 'layers': layer_list, 'norm_stats': norm_stats, 'bf16': bool(runtime.bf16),
                'sample_rate': runtime.sample_rate}
    path = cache_file(cache_root(cache_dir), task, identity)
    if use_cache and path.is_file():
        emb = _load(path)
        if emb is not None:
            return emb

    runtime = runtime.to(device).eval()
    sr, unit = runtime.sample_rate, int(round(task.unit_sec * runtime.sample_rate))
    want_layers = layers is not None

    def encode(batch: list[np.ndarray]) -> list[np.ndarray]:
        wav = torch.from_numpy(np.stack(batch)).to(device)
        with torch.inference_mode():
            out = runtime.encode(wav, return_layers=want_layers)
            per_layer = [out[i] for i in layer_list] if want_layers else [out]
            emb = torch.stack([h.float().mean(1) for h in per_layer], dim=1)  # [B, n_layers, D]
        return list(emb.cpu().numpy())

    results, failed, seconds = run_clips(task, task.clips, f'embed-{name}', lambda c: load_clip(c.path, sr, unit),
                                         encode, batch_size, progress)
    emb = _collect(name, task, results, failed, seconds, layer_list, norm_stats)
    if use_cache:
        _save(path, emb, identity)
    return emb


def logmel_embeddings(task: Task, sample_rate: int = 16000, *, cache_dir: str | Path | None = None,
                      use_cache: bool = True, batch_size: int = 32, progress: bool = True) -> Embeddings:
    """The raw log-mel baseline: mean and std of each of the 80 mel bins over time ``[160]`` per clip."""
    from ..audio import LogMelSpectrogram, preset

    identity = {'kind': 'logmel', 'sample_rate': sample_rate}
    path = cache_file(cache_root(cache_dir), task, identity)
    if use_cache and path.is_file():
        emb = _load(path)
        if emb is not None:
            return emb
    to_spec = LogMelSpectrogram(preset(sample_rate))
    unit = int(round(task.unit_sec * sample_rate))

    def stats(batch: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            lms = to_spec(torch.from_numpy(np.stack(batch)))[:, 0]  # [B, 80, T]
            emb = torch.cat([lms.mean(-1), lms.std(-1)], dim=-1)[:, None]  # [B, 1, 160]
        return list(emb.numpy())

    results, failed, seconds = run_clips(task, task.clips, 'embed-logmel', lambda c: load_clip(c.path, sample_rate, unit),
                                         stats, batch_size, progress)
    emb = _collect('logmel', task, results, failed, seconds, [], None)
    if use_cache:
        _save(path, emb, identity)
    return emb


def _collect(name: str, task: Task, results: dict[str, np.ndarray], failed: list[tuple[str, str]], seconds: float,
             layers: list[int], norm_stats) -> Embeddings:
    keys = [c.key for c in task.clips if c.key in results]
    if not keys:
        first = failed[0] if failed else ('?', 'no result')
        raise EmbeddingError(f'{task.source}: no clip could be embedded ({len(failed)} failed; first: {first[0]}: '
                             f'{first[1]})')
    x = np.stack([np.asarray(results[k], dtype=np.float32) for k in keys])
    missing = len(task.clips) - len(keys)
    if missing and not failed:  # results lost without a reason would shrink the test set silently
        failed = [(str(c.path), 'no result') for c in task.clips if c.key not in results]
    log.info('%s: %s embeddings %s for %d clips in %.1f s (%.1f clips/s)%s', task.name, name, tuple(x.shape[1:]),
             len(keys), seconds, len(keys) / max(seconds, 1e-9), f', {len(failed)} failed' if failed else '')
    return Embeddings(name=name, keys=keys, x=x, layers=layers, failed=failed, seconds=seconds, norm_stats=norm_stats)


# ---------------------------------------------------------------------------------------------
# normalization statistics


def auto_norm_stats(runtime, task: Task, *, seed: int = 0, cache_dir: str | Path | None = None,
                    use_cache: bool = True, batch_size: int = 32, progress: bool = True) -> tuple[float, float]:
    """Mean and std of all log-mel values of the train clips (cropped/padded to the unit; at most
    10,000 clips drawn by `seed`), computed with the runtime's front-end; cached per task."""
    train = task.split('train')
    if len(train) > MAX_NORM_STATS_CLIPS:
        idx = np.sort(np.random.default_rng(seed).choice(len(train), MAX_NORM_STATS_CLIPS, replace=False))
        train = [train[i] for i in idx]
    identity = {'kind': 'normstats', 'sample_rate': runtime.sample_rate, 'n': len(train), 'seed': seed}
    path = cache_file(cache_root(cache_dir), task, identity).with_suffix('.json')
    if use_cache and path.is_file():
        try:
            stats = json.loads(path.read_text())['norm_stats']
            log.info('norm_stats %.4f/%.4f from the cache: %s', *stats, path)
            return float(stats[0]), float(stats[1])
        except (ValueError, KeyError, OSError):
            pass
    sr, unit = runtime.sample_rate, int(round(task.unit_sec * runtime.sample_rate))
    to_spec = runtime.to_spec

    def moments(batch: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            lms = to_spec(torch.from_numpy(np.stack(batch))).double().flatten(1)
            return list(torch.stack([lms.sum(1), lms.square().sum(1), torch.full_like(lms[:, 0], lms.shape[1])],
                                    1).numpy())

    results, failed, _ = run_clips(task, train, 'norm-stats', lambda c: load_clip(c.path, sr, unit), moments,
                                   batch_size, progress)
    if not results:
        raise EmbeddingError(f'{task.source}: --norm_stats auto: no train clip could be read')
    s, s2, n = np.sum(np.stack(list(results.values())), axis=0)
    mean = s / n
    std = float(np.sqrt(max(s2 / n - mean ** 2, 0.0)))
    stats = (float(mean), std)
    log.info('norm_stats auto on %d train clips of %s: mean %.4f, std %.4f', len(results), task.name, *stats)
    if use_cache:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({'norm_stats': stats, 'identity': identity}))
    return stats

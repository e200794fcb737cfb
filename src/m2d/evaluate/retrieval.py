"""Text-audio retrieval with an M2D-CLAP weight file: recall@K in both directions on a caption CSV.

The caption CSV has ``file_name`` and one or more caption columns: ``caption_1 ... caption_5`` on
one row per clip (Clotho's shape), or ``caption`` on one row per caption (AudioCaps' shape, and
EVAR's metadata), or both; an optional ``split`` column selects the clips (default: ``test`` when
the column exists). Every clip is encoded whole by default (EVAR's ``retr_a2t_t2a.py`` encodes each
file at its full length), every caption by the CLAP text encoder; scores are cosines.

How several captions per clip count (WavCaps' ``retrieval/tools/utils.py`` ``a2t``/``t2a``, which
EVAR's ``retr_a2t_t2a.py`` calls; the M2D-CLAP paper reports its recalls with that script):

- **text → audio**: every caption is a query over all clips; its rank is that of its own clip; R@K
  is the percentage of captions whose clip is in the top K; mAP@10 is the mean of 1/rank over the
  captions whose clip is in the top 10 (0 for the others).
- **audio → text**: every clip is a query over all captions; its rank is that of its best-ranked
  caption, so a hit at K means ANY of its captions is in the top K; mAP@10 averages, per clip,
  ``sum_i i / rank_i`` over its captions in the top 10 (in rank order), divided by its number of
  captions.

Median rank is ``floor(median(rank0)) + 1`` and mean rank ``mean(rank0) + 1`` (ranks from 1), as
there. Ties (equal scores) are ranked by position in the CSV, the earlier first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import M2DError
from .clap_embed import EncodingOptions, audio_embeddings, check_failed, cosine_similarity, load_clap, text_embeddings
from .tasks import SPLIT_ALIASES, Clip, read_csv_rows

log = logging.getLogger(__name__)

CAPTION_COLUMN = re.compile(r'^caption(?:[_ -]?\d+)?$', re.IGNORECASE)
DEFAULT_KS = (1, 5, 10)
QUERY_CHUNK = 1024  # queries ranked at once (bounds the comparison matrix)


class RetrievalError(M2DError):
    """A caption CSV or option that retrieval cannot use; the message names it."""


@dataclass
class CaptionData:
    """Clips and their captions: ``captions[j]`` describes ``clips[caption_clip[j]]``."""

    name: str
    source: str
    split: str | None
    clips: list[Clip]
    captions: list[str]
    caption_clip: np.ndarray  # [n_captions] int64

    def subset(self, keys: set[str]) -> CaptionData:
        """Only the clips in `keys` (e.g. those that could be read) and their captions."""
        keep = [i for i, c in enumerate(self.clips) if c.key in keys]
        new_index = {old: new for new, old in enumerate(keep)}
        cap = [j for j, i in enumerate(self.caption_clip) if int(i) in new_index]
        return CaptionData(self.name, self.source, self.split, [self.clips[i] for i in keep],
                           [self.captions[j] for j in cap],
                           np.array([new_index[int(self.caption_clip[j])] for j in cap], dtype=np.int64))


def read_caption_csv(csv: str | Path, data_dir: str | Path, split: str | None = None) -> CaptionData:
    """Clips and captions of a caption CSV (see the module's docstring); `split` selects rows by the
    ``split`` column (default ``test`` when there is one)."""
    csv, data_dir = Path(csv), Path(data_dir)
    columns, rows = read_csv_rows(csv, data_dir, '--captions', RetrievalError)
    caption_columns = [c for c in columns if CAPTION_COLUMN.match(c)]
    if 'file_name' not in columns or not caption_columns:
        raise RetrievalError(f'{csv}: expected a file_name column and caption columns (caption, or caption_1 ... '
                             f'caption_N); columns: {", ".join(columns) or "none"}')
    if split is not None and 'split' not in columns:
        raise RetrievalError(f'--split {split}: {csv} has no split column')
    if 'split' in columns:
        split = SPLIT_ALIASES.get((split or 'test').lower())
        if split is None:
            raise RetrievalError(f'--split {split}: expected one of train, valid, test')
        rows = [r for r in rows if SPLIT_ALIASES.get(r['split'].lower()) == split]
        if not rows:
            raise RetrievalError(f'{csv}: no row with split {split}')
    clips: dict[str, Clip] = {}
    index: dict[str, int] = {}
    captions, owner, absent = [], [], []
    for line, row in enumerate(rows, start=2):
        name = row['file_name']
        if not name:
            raise RetrievalError(f'{csv}:{line}: empty file_name')
        if name not in index:
            path = data_dir / name
            if not path.is_file():
                absent.append(name)
                index[name] = -1
                continue
            index[name] = len(clips)
            clips[name] = Clip(path, Path(name).with_suffix('').as_posix(), (), 'test')
        if index[name] < 0:
            continue
        for column in caption_columns:
            if row[column]:
                captions.append(row[column])
                owner.append(index[name])
    if absent:
        raise RetrievalError(f'{csv}: {len(absent)} listed file(s) are not in {data_dir} (first: {absent[0]})')
    counts = np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(clips))
    if len(clips) < 2 or (counts == 0).any():
        bare = [name for name, i in index.items() if i >= 0 and counts[i] == 0]
        raise RetrievalError(f'{csv}: ' + (f'{len(bare)} clip(s) have no caption (first: {bare[0]})' if bare
                                           else 'retrieval needs at least two clips'))
    return CaptionData(csv.stem, str(csv), split, list(clips.values()), captions, np.asarray(owner, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# ranks and recalls


def _ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column `target[q]` in each row `scores[q]` (descending; ties: lower index first)."""
    rows = np.arange(len(target))
    true = scores[rows, target][:, None]
    before = np.arange(scores.shape[1])[None, :] < target[:, None]
    return (scores > true).sum(1) + ((scores == true) & before).sum(1)


def text_to_audio_ranks(sim: np.ndarray, caption_clip: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each caption's clip among all clips, `sim` ``[n_clips, n_captions]``."""
    out = np.empty(len(caption_clip), dtype=np.int64)
    for s in range(0, len(caption_clip), QUERY_CHUNK):
        q = np.arange(s, min(s + QUERY_CHUNK, len(caption_clip)))
        out[q] = _ranks(sim[:, q].T, caption_clip[q])
    return out


def audio_to_text_caption_ranks(sim: np.ndarray, caption_clip: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each caption among all captions when its own clip is the query."""
    out = np.empty(len(caption_clip), dtype=np.int64)
    for s in range(0, len(caption_clip), QUERY_CHUNK):
        q = np.arange(s, min(s + QUERY_CHUNK, len(caption_clip)))
        out[q] = _ranks(sim[caption_clip[q]], q)
    return out


def _summary(ranks: np.ndarray, ks: Sequence[int], map10: float) -> dict[str, float]:
    out = {f'R@{k}': float(100.0 * np.mean(ranks < k)) for k in ks}
    out.update({'mAP@10': float(map10), 'median_rank': float(np.floor(np.median(ranks)) + 1),
                'mean_rank': float(ranks.mean() + 1), 'queries': int(len(ranks))})
    return out


def retrieval_metrics(sim: np.ndarray, caption_clip: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """Recall@K (percent), mAP@10, median and mean rank in both directions from `sim` ``[n_clips,
    n_captions]`` (higher = more similar) and the clip of each caption (see the module's docstring)."""
    sim = np.asarray(sim)
    caption_clip = np.asarray(caption_clip, dtype=np.int64)
    n_clips, n_captions = sim.shape
    if len(caption_clip) != n_captions:
        raise ValueError(f'{len(caption_clip)} caption owners for {n_captions} caption columns of the similarity')
    t2a = text_to_audio_ranks(sim, caption_clip)
    t2a_map = 100.0 * np.where(t2a < 10, 1.0 / (t2a + 1), 0.0).sum() / n_captions
    cap_ranks = audio_to_text_caption_ranks(sim, caption_clip)
    a2t = np.full(n_clips, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(a2t, caption_clip, cap_ranks)
    ap10 = np.zeros(n_clips)
    for clip in range(n_clips):
        own = cap_ranks[caption_clip == clip]
        hits = np.sort(own[own < 10]) + 1
        ap10[clip] = np.sum(np.arange(1, len(hits) + 1) / hits) / max(len(own), 1)
    return {'text_to_audio': _summary(t2a, ks, t2a_map), 'audio_to_text': _summary(a2t, ks, 100.0 * ap10.mean())}


# ---------------------------------------------------------------------------------------------
# evaluation of a weight file


@dataclass
class RetrievalOptions(EncodingOptions):
    """Settings of a retrieval evaluation (`m2d retrieval`'s options)."""

    unit_sec: float | None = None       # None: every clip whole (EVAR); else cropped/zero-padded to it
    ks: tuple[int, ...] = DEFAULT_KS

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> RetrievalOptions:
        opts = cls.checked(options, 'retrieval')
        opts.ks = tuple(int(k) for k in opts.ks)
        if not opts.ks or min(opts.ks) < 1:
            raise M2DError(f'--ks {opts.ks}: every K must be at least 1')
        if opts.unit_sec is not None and not opts.unit_sec > 0:
            raise M2DError(f'--unit_sec {opts.unit_sec}: must be positive')
        return opts


def evaluate_retrieval(weights: str | Path, data: CaptionData, output_dir: str | Path | None = None,
                       **options) -> dict[str, Any]:
    """Text-audio retrieval of one weight file on `data`; writes ``report.json``/``report.md`` (default
    ``eval/<weights-name>/retrieval-<csv name>/``) and returns the report."""
    from ..runtime import resolve_device
    from .zeroshot import write_report

    opts = RetrievalOptions.from_kwargs(options)
    clock, timings = time.perf_counter(), {}
    device = str(resolve_device(opts.device))
    t0 = time.perf_counter()
    loaded = load_clap(weights, bf16=opts.bf16, trust=opts.trust, text_encoder=opts.text_encoder)
    timings['load_s'] = time.perf_counter() - t0
    loaded.runtime.to(device).eval()

    emb = audio_embeddings(loaded, data.clips, name=data.name, unit_sec=opts.unit_sec, batch_size=opts.batch_size,
                           device=device, cache_dir=opts.cache_dir, use_cache=opts.use_cache, progress=opts.progress)
    timings.update(audio_s=emb.seconds, audio_cached=emb.cached,
                   audio_clips_per_s=len(emb.keys) / emb.seconds if emb.seconds > 0 else None)
    check_failed(data.name, emb.failed, len(data.clips), opts.max_failed)
    scored = data.subset(set(emb.keys))
    row = {k: i for i, k in enumerate(emb.keys)}
    audio = emb.x[[row[c.key] for c in scored.clips], 0]

    t0 = time.perf_counter()
    text = text_embeddings(loaded.runtime, scored.captions, opts.text_batch_size)
    timings['text_s'] = time.perf_counter() - t0
    results = retrieval_metrics(cosine_similarity(audio, text), scored.caption_clip, opts.ks)

    per_clip = np.bincount(scored.caption_clip, minlength=len(scored.clips))
    lo, hi = int(per_clip.min()), int(per_clip.max())
    report: dict[str, Any] = {
        'kind': 'retrieval', 'weights': str(loaded.path), 'weights_name': loaded.name, 'weights_sha256': loaded.sha256,
        'data': {'name': data.name, 'source': data.source, 'split': data.split, 'clips': len(scored.clips),
                 'captions': len(scored.captions), 'captions_per_clip': lo if lo == hi else f'{lo}-{hi}'},
        'results': results,
        'settings': {**{k: v for k, v in asdict(opts).items() if k not in ('progress', 'cache_dir', 'use_cache')},
                     'ks': list(opts.ks), 'device': device, 'sample_rate': int(loaded.runtime.sample_rate),
                     'norm_stats': [float(v) for v in loaded.runtime.norm_stats.tolist()]},
        'skipped': {'count': len(emb.failed), 'files': [list(f) for f in emb.failed[:50]]},
    }
    timings['total_s'] = time.perf_counter() - clock
    report.update(timings=timings, created=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  m2d_version=__version__)
    out = Path(output_dir) if output_dir is not None else Path('eval') / loaded.name / f'retrieval-{data.name}'
    report['output_dir'] = str(out)
    write_report(report, out)
    t2a, a2t = results['text_to_audio'], results['audio_to_text']
    log.info('%s on %s: text->audio R@1 %.2f, audio->text R@1 %.2f -> %s', loaded.name, data.name, t2a['R@1'],
             a2t['R@1'], out / 'report.json')
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line per direction for a command's output."""
    ks = report['settings']['ks']
    parts = []
    for key, label in (('text_to_audio', 'text->audio'), ('audio_to_text', 'audio->text')):
        e = report['results'][key]
        parts.append(f'{label} ' + ' '.join(f'R@{k} {e[f"R@{k}"]:.2f}' for k in ks))
    return '; '.join(parts)


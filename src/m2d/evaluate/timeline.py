"""What is in a recording, and when: class probabilities over sliding windows, and merged events.

A recording of any length is read as a stream of blocks (`m2d.audio.stream_audio`), cut into
windows of the model's input length every `hop` samples (`m2d.streaming.sliding_windows`, the cutter
`encode` uses over log-mel frames), and the windows are scored in batches, each as that clip alone
(a fine-tuned head, or M2D-CLAP zero-shot over given labels), so
memory stays bounded by one block, one batch of windows and the probability track (C floats per
window: about 2 KB per window for AudioSet). The last window may run past the end; it is zero-padded
and reported as ending with the recording.

    >>> track = timeline(m2d.load(NAME), wav, hop_sec=5.0)   # a waveform at the model's sample rate
    >>> events(track, threshold=0.5)                     # [Event(start, end, label, peak), ...]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import M2DError
from ..streaming import sliding_windows

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8  # windows scored together


class TimelineError(M2DError, ValueError):
    """A timeline setting that cannot be used; the message names the option."""


def num_windows(n_samples: int, window: int, hop: int) -> int:
    """Windows needed to cover `n_samples`: one, plus one per `hop` until a window reaches the end."""
    if n_samples <= 0:
        return 0
    return 1 + math.ceil(max(0, n_samples - window) / hop)


def check_hop(hop: int, window: int, sample_rate: int) -> None:
    """TimelineError unless ``0 < hop <= window`` (samples)."""
    if hop <= 0 or hop > window:
        raise TimelineError(f'--hop {hop / sample_rate:g}: must be positive and at most the window '
                            f'({window / sample_rate:g} s)')


@dataclass
class Timeline:
    """Per-window class probabilities of one recording."""

    starts: np.ndarray        # [N] seconds
    ends: np.ndarray          # [N] seconds
    probs: np.ndarray         # [N, C] float32
    classes: list[str]        # C names (or '#i')
    duration: float           # seconds
    similarity: np.ndarray | None = None  # [N, C] zero-shot cosines (M2D-CLAP), else None

    def top(self, k: int) -> list[dict[str, Any]]:
        """Rows ``{'start', 'end', 'label', 'p'}`` (zero-shot: and ``'similarity'``): the top-`k` labels of
        each window, most probable (most similar) first."""
        k = max(1, min(k, self.probs.shape[1]))
        rank = self.similarity if self.similarity is not None else self.probs
        rows = []
        for n, (s, e, p) in enumerate(zip(self.starts, self.ends, self.probs)):
            for i in np.argsort(-rank[n], kind='stable')[:k]:
                row = {'start': round(float(s), 3), 'end': round(float(e), 3), 'label': self.classes[i]}
                if self.similarity is not None:
                    row['similarity'] = round(float(self.similarity[n, i]), 4)
                row['p'] = round(float(p[i]), 4)
                rows.append(row)
        return rows


class Event(NamedTuple):
    """A label above the threshold over consecutive windows."""

    start: float
    end: float
    label: str
    peak: float


def events(track: Timeline, threshold: float = 0.5) -> list[Event]:
    """Merge, per class, runs of consecutive windows with probability above `threshold` into events
    ``(start of the first window, end of the last, label, peak probability)``, ordered by start."""
    if not 0 < threshold < 1:
        raise TimelineError(f'--threshold {threshold:g}: must be between 0 and 1 (exclusive)')
    found = []
    above = track.probs > threshold                                   # [N, C]
    for c in np.flatnonzero(above.any(0)):
        on = np.concatenate([[False], above[:, c], [False]])
        edges = np.flatnonzero(on[1:] != on[:-1])                      # run starts and ends (exclusive)
        for a, b in zip(edges[::2], edges[1::2]):
            found.append(Event(round(float(track.starts[a]), 3), round(float(track.ends[b - 1]), 3),
                               track.classes[c], round(float(track.probs[a:b, c].max()), 4)))
    return sorted(found, key=lambda e: (e.start, -e.peak, e.label))


def _score(clf, blocks: Iterable[np.ndarray], hop: int, batch_size: int, progress_total: int | None,
           desc: str, device: torch.device) -> tuple[list[int], list[int], dict[str, list[np.ndarray]], int]:
    from tqdm.auto import tqdm

    window = clf.window_samples
    starts, ends, batch = [], [], []
    scores: dict[str, list[np.ndarray]] = {}  # 'p' (and 'similarity'): per batch [b, C]
    n_samples = 0

    def flush():
        x = torch.from_numpy(np.stack([w for _, _, w in batch])).to(device)
        for key, value in clf.scores(x).items():
            scores.setdefault(key, []).append(value.cpu().numpy().astype(np.float32))
        starts.extend(s for s, _, _ in batch)
        ends.extend(e for _, e, _ in batch)
        batch.clear()

    def counted(it):
        nonlocal n_samples
        for b in it:
            n_samples += len(b)
            yield b

    with tqdm(total=progress_total, desc=desc, unit='win', disable=progress_total is None or progress_total < 4,
              leave=False) as bar:
        for item in sliding_windows(counted(blocks), window, hop):
            batch.append(item)
            if len(batch) == batch_size:
                flush()
                bar.update(batch_size)
        if batch:
            bar.update(len(batch))
            flush()
    return starts, ends, scores, n_samples


def _timeline(clf, blocks, hop_sec, batch_size, total_samples, desc, device) -> Timeline:
    from .predict import as_classifier

    clf = as_classifier(clf)
    sr = clf.runtime.sample_rate
    window = clf.window_samples
    hop = int(round((window / sr / 2 if hop_sec is None else hop_sec) * sr))
    check_hop(hop, window, sr)
    if batch_size < 1:
        raise TimelineError(f'--batch_size {batch_size}: must be at least 1')
    device = torch.device(device)
    clf.runtime.to(device).eval()
    expected = num_windows(total_samples, window, hop) if total_samples else None
    starts, ends, scores, n = _score(clf, blocks, hop, batch_size, expected, desc, device)
    C = clf.num_classes

    def track(key):
        return np.concatenate(scores[key]) if key in scores else np.zeros((0, C), np.float32)

    zero_shot = 'similarity' in scores or hasattr(clf, 'text_embeddings')
    return Timeline(np.asarray(starts, np.float64) / sr, np.asarray(ends, np.float64) / sr, track('p'),
                    [clf.label(i) for i in range(C)], n / sr, track('similarity') if zero_shot else None)


def timeline(clf, wav: np.ndarray | torch.Tensor, hop_sec: float | None = None, batch_size: int = DEFAULT_BATCH,
             device: str | torch.device = 'cpu') -> Timeline:
    """Class probabilities over a waveform ``[samples]`` at the model's rate, in windows of the model's
    input length every `hop_sec` seconds (default half a window). `clf`: an `m2d.evaluate.predict.Classifier`,
    a fine-tuned runtime (``m2d.load`` of a file with a head), or a `ZeroShotClassifier` (M2D-CLAP with
    labels: each window's cosines are kept in `Timeline.similarity`)."""
    wav = np.asarray(wav.detach().cpu() if isinstance(wav, torch.Tensor) else wav, np.float32).reshape(-1)
    return _timeline(clf, [wav], hop_sec, batch_size, len(wav), 'timeline', device)


def timeline_file(clf, path: str | Path, hop_sec: float | None = None, batch_size: int = DEFAULT_BATCH,
                  device: str | torch.device = 'cpu', block_sec: float = 60.0) -> Timeline:
    """`timeline` of an audio file of any length, read as a stream (`m2d.audio.stream_audio`): memory is
    bounded by one block of `block_sec` seconds, one batch of windows and the probability track."""
    from ..audio import audio_duration, stream_audio
    from .predict import as_classifier

    clf = as_classifier(clf)
    sr = clf.runtime.sample_rate
    total = int(round(audio_duration(path) * sr))
    blocks = stream_audio(path, sr, block_samples=max(1, int(block_sec * sr)))
    return _timeline(clf, blocks, hop_sec, batch_size, total, Path(path).name, device)


def logmel_overview(blocks: Iterable[np.ndarray], to_spec: torch.nn.Module, total_samples: int,
                    max_columns: int = 1200) -> np.ndarray:
    """A log-mel picture ``[n_mels, <= max_columns]`` of a stream of blocks, frames averaged in groups so
    that a recording of `total_samples` fits `max_columns` columns (for the `--plot` background)."""
    hop = to_spec.config.hop_length
    group = max(1, math.ceil((total_samples // hop + 1) / max_columns))
    columns, rest = [], None
    carry = np.zeros(0, np.float32)
    for block in blocks:
        x = np.concatenate([carry, np.asarray(block, np.float32)])
        usable = (len(x) // hop) * hop
        if usable == 0:
            carry = x
            continue
        carry = x[usable:]
        with torch.no_grad():
            frames = to_spec(torch.from_numpy(x[:usable]))[0, 0, :, :usable // hop].numpy()  # [F, usable/hop]
        rest = frames if rest is None else np.concatenate([rest, frames], axis=1)
        n = rest.shape[1] // group * group
        if n:
            columns.append(rest[:, :n].reshape(rest.shape[0], -1, group).mean(-1))
            rest = rest[:, n:]
    if rest is not None and rest.shape[1]:
        columns.append(rest.mean(1, keepdims=True))
    return np.concatenate(columns, axis=1) if columns else np.zeros((to_spec.config.n_mels, 0), np.float32)


def plot_timeline(track: Timeline, lms: np.ndarray, path: str | Path, top: int = 5, title: str = '') -> Path:
    """PNG of the `top` classes (highest peak probability) against time over the log-mel picture `lms`.

    Needs matplotlib (``pip install matplotlib``); TimelineError naming --plot when it is missing.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TimelineError('--plot needs matplotlib, which is not installed (pip install matplotlib)') from None
    from ..fileio import atomic_path

    path = Path(path)
    fig = Figure(figsize=(12, 5.5))
    ax_spec, ax_p = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [1, 1.3]})
    dur = max(track.duration, 1e-6)
    ax_spec.imshow(lms, origin='lower', aspect='auto', extent=(0, dur, 0, lms.shape[0]), cmap='magma')
    ax_spec.set_ylabel('mel bin')
    ax_spec.set_title(title or 'log-mel and class probabilities')
    order = np.argsort(-track.probs.max(0), kind='stable')[:max(1, top)] if len(track.probs) else []
    centres = (track.starts + track.ends) / 2
    for c in order:
        ax_p.plot(centres, track.probs[:, c], marker='.', label=track.classes[c])
    ax_p.set_ylim(0, 1)
    ax_p.set_xlim(0, dur)
    ax_p.set_xlabel('time (s)')
    ax_p.set_ylabel('probability')
    if len(order):
        ax_p.legend(loc='upper right', fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches='tight')
    return path

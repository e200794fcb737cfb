"""Synthesized sound classes: a small labeled audio collection made without the network.

Every class is a *temporal pattern* of a harmonic sound (a glide, a vibrato, a trill, repeated
plucks, ...). What is not the class varies from clip to clip over the same ranges for every class:
the pitch (two octaves), the timbre (number of harmonics, spectral tilt, odd-only harmonics),
the envelope (attack, release, onset, length), the loudness and the background noise (white or
pink, 5-30 dB SNR). The average spectrum of a clip therefore says little about its class; the
spectro-temporal shape says it all, which is what a pre-trained audio encoder is expected to capture.

Each clip is drawn from its own generator seeded by ``(seed, class index, clip index)``, so a
collection is identical for a seed whatever the number of clips per class.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import M2DError
from ..fileio import atomic_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
LABELS_CSV = 'labels.csv'


@dataclass(frozen=True)
class Voice:
    """The per-clip nuisance draws shared by every class."""

    f0: float            # Hz, log-uniform over two octaves
    harmonics: np.ndarray  # [K] amplitude of harmonic k+1 (zeros for the skipped ones)
    gain: float          # linear, -12..0 dB
    onset: float         # s
    length: float        # s, sounding part
    attack: float        # s
    release: float       # s
    snr_db: float
    pink: bool


def _voice(rng: np.random.Generator, seconds: float) -> Voice:
    k = np.arange(1, 13)
    n = int(rng.integers(4, 13))
    amps = k.astype(np.float64) ** -rng.uniform(0.5, 1.5) * rng.uniform(0.5, 1.0, k.size)
    amps[n:] = 0.0
    if rng.random() < 0.2:  # clarinet-like: odd harmonics only
        amps[1::2] = 0.0
    onset = rng.uniform(0.0, 0.2 * seconds)
    length = rng.uniform(0.7, 0.95) * (seconds - onset)
    return Voice(f0=float(150.0 * 2 ** rng.uniform(0, 2)), harmonics=amps / amps.sum(),
                 gain=float(10 ** (-rng.uniform(0, 12) / 20)), onset=float(onset), length=float(length),
                 attack=float(rng.uniform(0.005, 0.05)), release=float(rng.uniform(0.02, 0.2)),
                 snr_db=float(rng.uniform(5, 30)), pink=bool(rng.random() < 0.5))


def _harmonic(f0_track: np.ndarray, harmonics: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A harmonic sound following the fundamental track ``f0_track`` (Hz per sample) ``[N]``.

    Harmonics above 0.45 sr fade out (no aliasing); each starts at a random phase.
    """
    phase = 2 * np.pi * np.cumsum(f0_track) / sr
    out = np.zeros_like(f0_track)
    for k, a in enumerate(harmonics, start=1):
        if a <= 0:
            continue
        fade = np.clip((0.45 * sr - k * f0_track) / (0.05 * sr), 0.0, 1.0)
        out += a * fade * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _envelope(t: np.ndarray, v: Voice) -> np.ndarray:
    """Attack-sustain-release gate of the sounding part ``[N]`` (0 outside it)."""
    u = t - v.onset
    rise = np.clip(u / v.attack, 0.0, 1.0)
    fall = np.clip((v.length - u) / v.release, 0.0, 1.0)
    return np.where((u >= 0) & (u <= v.length), rise * fall, 0.0)


def _local(t: np.ndarray, v: Voice) -> np.ndarray:
    """Time since the onset, clipped to the sounding part (for glides and modulations)."""
    return np.clip(t - v.onset, 0.0, v.length)


# ----- the classes: (t [N] seconds, voice, rng) -> (f0 track [N], amplitude [N]) -------------------

def _tone(t, v, rng):
    return np.full_like(t, v.f0), _envelope(t, v)


def _vibrato(t, v, rng):
    rate, depth = rng.uniform(4, 8), rng.uniform(0.06, 0.12)
    return v.f0 * 2 ** (depth * np.sin(2 * np.pi * rate * _local(t, v))), _envelope(t, v)


def _rise(t, v, rng):
    octaves = rng.uniform(0.5, 1.5)
    return v.f0 * 2 ** (octaves * (_local(t, v) / v.length - 0.5)), _envelope(t, v)


def _fall(t, v, rng):
    octaves = rng.uniform(0.5, 1.5)
    return v.f0 * 2 ** (-octaves * (_local(t, v) / v.length - 0.5)), _envelope(t, v)


def _tremolo(t, v, rng):
    rate, depth = rng.uniform(5, 12), rng.uniform(0.7, 1.0)
    am = 1 - depth * 0.5 * (1 - np.cos(2 * np.pi * rate * _local(t, v)))
    return np.full_like(t, v.f0), _envelope(t, v) * am


def _plucks(t, v, rng):
    rate, decay = rng.uniform(3, 8), rng.uniform(15, 40)
    phase = (_local(t, v) * rate) % 1.0 / rate  # time since the last pluck
    return np.full_like(t, v.f0), _envelope(t, v) * np.exp(-decay * phase)


def _trill(t, v, rng):
    rate, semis = rng.uniform(4, 10), rng.integers(3, 8)
    upper = np.floor(_local(t, v) * rate) % 2
    return v.f0 * 2 ** (upper * semis / 12), _envelope(t, v)


def _arpeggio(t, v, rng):
    steps = np.array([0, 4, 7, 12, 16]) if rng.random() < 0.5 else np.array([0, 3, 7, 12, 15])
    n = int(rng.integers(3, 6))
    idx = np.minimum((_local(t, v) / v.length * n).astype(int), n - 1)
    return v.f0 * 2 ** (steps[idx] / 12), _envelope(t, v)


CLASSES: dict[str, Callable] = {
    'tone': _tone, 'vibrato': _vibrato, 'rise': _rise, 'fall': _fall,
    'tremolo': _tremolo, 'plucks': _plucks, 'trill': _trill, 'arpeggio': _arpeggio,
}


def _noise(n: int, pink: bool, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if not pink:
        return white
    spec = np.fft.rfft(white)
    spec[1:] /= np.sqrt(np.arange(1, spec.size))
    spec[0] = 0
    return np.fft.irfft(spec, n)


def synthesize(label: str, rng: np.random.Generator, seconds: float = 2.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One clip of class `label` (a key of `CLASSES`): float32 ``[seconds * sr]`` within [-1, 1]."""
    if label not in CLASSES:
        raise M2DError(f'unknown sound class {label!r}; choose from {", ".join(CLASSES)}')
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    v = _voice(rng, seconds)
    f0, amp = CLASSES[label](t, v, rng)
    x = _harmonic(f0, v.harmonics, sr, rng) * amp
    noise = _noise(n, v.pink, rng)
    signal_rms = np.sqrt(np.mean(x[amp > 0.5] ** 2)) if np.any(amp > 0.5) else 1e-3
    noise *= signal_rms / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * 10 ** (-v.snr_db / 20)
    y = x + noise
    y *= v.gain * 0.9 / (np.abs(y).max() + 1e-9)
    return y.astype(np.float32)


def clip_rng(seed: int, class_index: int, clip_index: int) -> np.random.Generator:
    """The generator of one clip: the same clip for the same (seed, class, index) on every machine."""
    return np.random.default_rng([seed, class_index, clip_index])


def make_collection(dest: str | Path, clips_per_class: int = 100, seconds: float = 2.0, seed: int = 0,
                    classes: Sequence[str] | None = None, sr: int = SAMPLE_RATE) -> Path:
    """Write ``dest/CLASS/CLASS_NNNN.wav`` (16-bit PCM) and ``dest/labels.csv`` (file_name, label).

    The folder is a task for ``load_task(data_dir=dest)`` (sub-folders are the classes). Existing
    files are kept (a rerun with the same arguments only adds what is missing). Returns `dest`.
    """
    import soundfile as sf

    if clips_per_class < 1:
        raise M2DError(f'clips_per_class must be >= 1, got {clips_per_class}')
    names = list(classes or CLASSES)
    dest = Path(dest)
    rows = []
    for ci, label in enumerate(names):
        for i in range(clips_per_class):
            rel = Path(label) / f'{label}_{i:04d}.wav'
            rows.append((rel.as_posix(), label))
            path = dest / rel
            if path.exists():
                continue
            wav = synthesize(label, clip_rng(seed, ci, i), seconds, sr)
            with atomic_path(path) as tmp:
                sf.write(tmp, wav, sr, subtype='PCM_16')
    with atomic_path(dest / LABELS_CSV) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name', 'label'])
        w.writerows(rows)
    log.info('%s: %d clips of %d classes (%.1f s, %d Hz)', dest, len(rows), len(names), seconds, sr)
    return dest

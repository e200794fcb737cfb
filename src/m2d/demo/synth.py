"""Synthesized sound classes: a small labeled audio collection made without the network.

Every class is a *timbre*: a spectral envelope (vowel-like formant resonances) or a partial
structure (all harmonics, odd harmonics only, stretched inharmonic partials) of a pitched sound.
What is not the class varies from clip to clip over the same ranges for every class: the pitch
(two octaves), a small random tilt and formant shift, a vibrato or tremolo or neither, the envelope
(attack, release, onset, length), the loudness and the background noise (white or pink, 0-20 dB
SNR). Some classes differ in their average spectrum, others only in how their partials are spaced
(which moves with the pitch), so the mean log-mel spectrum solves part of the task, not all of it.

Each clip is drawn from its own generator seeded by ``(seed, class index, clip index)``, so a
collection is identical for a seed whatever the number of clips per class.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import M2DError
from ..fileio import atomic_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
LABELS_CSV = 'labels.csv'
N_PARTIALS = 24


@dataclass(frozen=True)
class Timbre:
    """One class: the partials' frequency ratios and the spectral envelope they are weighted by."""

    partials: str = 'harmonic'                     # 'harmonic', 'odd' (odd harmonics only) or 'bar' (inharmonic)
    formants: tuple[float, ...] = ()               # Hz; resonance peaks of the envelope (none: a plain tilt)
    tilt: float = 1.0                              # the envelope falls as frequency ** -tilt


CLASSES: dict[str, Timbre] = {
    'vowel_a': Timbre(formants=(730, 1090, 2440), tilt=0.5),
    'vowel_e': Timbre(formants=(530, 1840, 2480), tilt=0.5),
    'vowel_i': Timbre(formants=(270, 2290, 3010), tilt=0.5),
    'vowel_u': Timbre(formants=(300, 870, 2240), tilt=0.5),
    'brass': Timbre('harmonic'),
    'reed': Timbre('odd'),
    'bar': Timbre('bar'),
    'buzz': Timbre('harmonic', tilt=0.3),
}

# partial frequency ratios: a free bar's modes (a xylophone-like inharmonic series), then harmonics
_RATIOS = {
    'harmonic': np.arange(1, N_PARTIALS + 1, dtype=np.float64),
    'odd': np.arange(1, 2 * N_PARTIALS, 2, dtype=np.float64),
    'bar': ((2 * np.arange(1, N_PARTIALS + 1) + 1) / 3.0112) ** 2,
}


@dataclass(frozen=True)
class Voice:
    """The per-clip nuisance draws shared by every class."""

    f0: float            # Hz, log-uniform over two octaves
    tilt: float          # added to the class's tilt
    shift: float         # formant frequencies are multiplied by it
    modulation: str      # 'none', 'vibrato' or 'tremolo'
    rate: float          # Hz, of the modulation
    depth: float         # octaves (vibrato) or amplitude fraction (tremolo)
    gain: float          # linear, -12..0 dB
    onset: float         # s
    length: float        # s, sounding part
    attack: float        # s
    release: float       # s
    snr_db: float
    pink: bool


def _voice(rng: np.random.Generator, seconds: float) -> Voice:
    onset = rng.uniform(0.0, 0.15 * seconds)
    modulation = str(rng.choice(['none', 'vibrato', 'tremolo']))
    return Voice(f0=float(110.0 * 2 ** rng.uniform(0, 2)), tilt=float(rng.uniform(-0.5, 0.5)),
                 shift=float(2 ** rng.uniform(-0.25, 0.25)), modulation=modulation,
                 rate=float(rng.uniform(4, 8)),
                 depth=float(rng.uniform(0.02, 0.05) if modulation == 'vibrato' else rng.uniform(0.3, 0.6)),
                 gain=float(10 ** (-rng.uniform(0, 12) / 20)), onset=float(onset),
                 length=float(rng.uniform(0.75, 0.95) * (seconds - onset)),
                 attack=float(rng.uniform(0.005, 0.05)), release=float(rng.uniform(0.02, 0.15)),
                 snr_db=float(rng.uniform(-5, 15)), pink=bool(rng.random() < 0.5))


def envelope_gain(freqs: np.ndarray, timbre: Timbre, v: Voice) -> np.ndarray:
    """The spectral envelope of `timbre` for voice `v` at `freqs` (Hz): a tilt times formant peaks."""
    gain = (np.maximum(freqs, 50.0) / 100.0) ** -(timbre.tilt + v.tilt)
    if timbre.formants:
        peaks = sum(1.0 / (1.0 + ((freqs - f * v.shift) / (0.06 * f + 40.0)) ** 2) for f in timbre.formants)
        gain = gain * (0.05 + peaks)
    return gain


def _gate(t: np.ndarray, v: Voice) -> np.ndarray:
    """Attack-sustain-release gate of the sounding part ``[N]`` (0 outside it)."""
    u = t - v.onset
    rise = np.clip(u / v.attack, 0.0, 1.0)
    fall = np.clip((v.length - u) / v.release, 0.0, 1.0)
    return np.where((u >= 0) & (u <= v.length), rise * fall, 0.0)


def _noise(n: int, pink: bool, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if not pink:
        return white
    spec = np.fft.rfft(white)
    spec[1:] /= np.sqrt(np.arange(1, spec.size))
    spec[0] = 0
    return np.fft.irfft(spec, n)


def synthesize(label: str, rng: np.random.Generator, seconds: float = 1.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One clip of class `label` (a key of `CLASSES`): float32 ``[seconds * sr]`` within [-1, 1]."""
    if label not in CLASSES:
        raise M2DError(f'unknown sound class {label!r}; choose from {", ".join(CLASSES)}')
    timbre = CLASSES[label]
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    v = _voice(rng, seconds)
    local = np.clip(t - v.onset, 0.0, v.length)
    amp = _gate(t, v)
    f0 = np.full(n, v.f0)
    if v.modulation == 'vibrato':
        f0 = v.f0 * 2 ** (v.depth * np.sin(2 * np.pi * v.rate * local))
    elif v.modulation == 'tremolo':
        amp = amp * (1 - v.depth * 0.5 * (1 - np.cos(2 * np.pi * v.rate * local)))
    ratios = _RATIOS[timbre.partials]
    weights = envelope_gain(ratios * v.f0, timbre, v)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = np.zeros(n)
    for r, a in zip(ratios, weights / weights.max()):
        if r * v.f0 * 2 ** 0.06 > 0.45 * sr:  # no aliasing, vibrato included
            break
        x += a * np.sin(r * phase + rng.uniform(0, 2 * np.pi))
    x *= amp
    noise = _noise(n, v.pink, rng)
    signal_rms = np.sqrt(np.mean(x[amp > 0.5] ** 2)) if np.any(amp > 0.5) else 1e-3
    noise *= signal_rms / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * 10 ** (-v.snr_db / 20)
    y = x + noise
    y *= v.gain * 0.9 / (np.abs(y).max() + 1e-9)
    return y.astype(np.float32)


def clip_rng(seed: int, class_index: int, clip_index: int) -> np.random.Generator:
    """The generator of one clip: the same clip for the same (seed, class, index) on every machine."""
    return np.random.default_rng([seed, class_index, clip_index])


def make_collection(dest: str | Path, clips_per_class: int = 100, seconds: float = 1.0, seed: int = 0,
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
    log.info('%s: %d clips of %d classes (%.2f s, %d Hz)', dest, len(rows), len(names), seconds, sr)
    return dest

"""Audio input and the log-mel front-end of M2D.

`load_audio` reads a file as the models expect it (mono, resampled, float32) and refuses files that
cannot be used (unreadable, empty, cut short, non-finite samples) with an `AudioError` naming the
file; `read_audio` does the same in bounded memory for long files, and `stream_audio` yields a
file block by block for recordings of any length.

The front-end reproduces the reference (nnAudio ``MelSpectrogram`` + ``log(x + eps)``) with
``torch.stft`` and a Slaney mel filterbank, so it runs on any device without extra packages.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import M2DError

log = logging.getLogger(__name__)

LOG_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07, as torch.finfo().eps in the reference
AUDIO_SUFFIXES = ('.wav', '.flac', '.ogg', '.mp3', '.aif', '.aiff', '.opus')


@dataclass(frozen=True)
class FrontEndConfig:
    """STFT and mel parameters of one M2D preset."""

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0


PRESETS = {
    16000: FrontEndConfig(16000, 400, 400, 160, 80, 50.0, 8000.0),
    32000: FrontEndConfig(32000, 800, 800, 320, 80, 50.0, 16000.0),
}


def preset(sample_rate: int) -> FrontEndConfig:
    """The front-end preset for 16 kHz or 32 kHz models."""
    if sample_rate not in PRESETS:
        raise ValueError(f'no front-end preset for sample_rate={sample_rate}; choose one of {sorted(PRESETS)}')
    return PRESETS[sample_rate]


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Slaney-scale, Slaney-normalized triangular filters ``[n_mels, n_fft // 2 + 1]`` (float32)."""
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMelSpectrogram(nn.Module):
    """Waveforms ``[B, samples]`` (or ``[samples]``) to log-mel ``[B, 1, n_mels, 1 + samples // hop]``."""

    def __init__(self, config: FrontEndConfig = PRESETS[16000]):
        super().__init__()
        self.config = config
        c = config
        self.register_buffer('window', torch.hann_window(c.win_length, periodic=True), persistent=False)
        fb = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
        self.register_buffer('mel_fb', torch.from_numpy(fb), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f'expected waveforms [batch, samples], got shape {tuple(wav.shape)}')
        c = self.config
        wav = wav.float()
        pad = c.n_fft // 2
        # Reflect padding needs more samples than the pad; tiny inputs fall back to zero padding.
        mode = 'reflect' if wav.shape[-1] > pad else 'constant'
        x = torch.nn.functional.pad(wav[:, None], (pad, pad), mode=mode)[:, 0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x, c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                              window=self.window, center=False, return_complex=True)
            power = spec.real.square() + spec.imag.square()  # [B, n_fft//2+1, T]
            mel = torch.matmul(self.mel_fb, power)
            return torch.log(mel + LOG_EPS)[:, None]


def num_frames(samples: int, hop_length: int) -> int:
    """Frames the front-end gives for a clip of `samples` samples."""
    return 1 + samples // hop_length


class AudioError(M2DError, ValueError):
    """An audio file that cannot be used; the message names the file."""


_COMPRESSED = ('.flac', '.ogg', '.mp3', '.opus')
# Files larger than this many bytes (a quarter of it for compressed formats) are read and resampled
# block by block by `read_audio`.
_STREAM_BYTES = 64 << 20
_STREAM_BLOCK = 1 << 20  # samples per block when streaming


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Read any file libsndfile reads, mix to mono, resample with soxr; returns float32 ``[samples]``.

    Raises `AudioError` naming the file when it is missing, unreadable, empty, cut short (a WAV or
    AIFF header promising more data than the file holds) or holds NaN/infinite samples.
    """
    import soundfile as sf
    import soxr

    path = _audio_file(path)
    try:
        data, sr = sf.read(str(path), dtype='float32', always_2d=True)
    except Exception as e:  # libsndfile's own errors are terse; name the file.
        raise AudioError(f'{path}: cannot read audio ({e})') from None
    check_complete(path)
    wav = _nonempty(path, _mono(path, data))
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate, quality='HQ')
    return np.ascontiguousarray(wav, dtype=np.float32)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """`load_audio` in bounded memory: large files are decoded and resampled block by block."""
    path = _audio_file(path)
    limit = _STREAM_BYTES // 4 if path.suffix.lower() in _COMPRESSED else _STREAM_BYTES
    if path.stat().st_size <= limit:
        return load_audio(path, sample_rate)
    parts = list(stream_audio(path, sample_rate))
    return _nonempty(path, np.concatenate(parts) if parts else np.zeros(0, np.float32))


def stream_audio(path: str | Path, sample_rate: int = 16000,
                 block_samples: int = _STREAM_BLOCK) -> Iterator[np.ndarray]:
    """Mono float32 blocks of a file at `sample_rate`, in order, in memory bounded by `block_samples`.

    The file is decoded `block_samples` source frames at a time and resampled with soxr's streaming
    resampler, so the concatenated blocks equal `load_audio` up to float32 round-off. Blocks may be
    empty or of uneven length (the resampler's delay). Raises `AudioError` naming the file on the
    same problems as `load_audio`; an empty file raises once the stream ends without a sample.
    """
    import soundfile as sf
    import soxr

    path = _audio_file(path)
    if block_samples < 1:
        raise ValueError(f'block_samples must be positive, got {block_samples}')
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(f'{path}: cannot read audio ({e})') from None
    check_complete(path)
    produced = 0
    with f:
        stream = (soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype='float32', quality='HQ')
                  if f.samplerate != sample_rate else None)
        while True:
            try:
                block = f.read(block_samples, dtype='float32', always_2d=True)
            except Exception as e:
                raise AudioError(f'{path}: cannot read audio ({e})') from None
            if block.shape[0] == 0:
                break
            mono = _mono(path, block)
            out = stream.resample_chunk(mono) if stream else mono.copy()
            produced += out.size
            yield np.ascontiguousarray(out, dtype=np.float32)
        if stream is not None:
            out = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            produced += out.size
            yield np.ascontiguousarray(out, dtype=np.float32)
    if produced == 0:
        raise AudioError(f'{path}: the file holds no audio samples')


def audio_duration(path: str | Path) -> float:
    """Length of an audio file in seconds from its header (no decoding); `AudioError` when unreadable."""
    import soundfile as sf

    path = _audio_file(path)
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(f'{path}: cannot read audio ({e})') from None
    return info.frames / info.samplerate if info.samplerate else 0.0


def _audio_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AudioError(f'{path}: not a file' if path.exists() else f'{path}: no such file')
    return path


def _mono(path: Path, data: np.ndarray) -> np.ndarray:
    """``[samples, channels]`` -> ``[samples]``, refusing non-finite samples."""
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(f'{path}: audio contains NaN or infinite samples')
    return wav


def _nonempty(path: Path, wav: np.ndarray) -> np.ndarray:
    if wav.size == 0:
        raise AudioError(f'{path}: the file holds no audio samples')
    return np.ascontiguousarray(wav, dtype=np.float32)


# container -> (byte order, form types, the chunk holding the samples)
_CONTAINERS = {b'RIFF': ('<', (b'WAVE',), b'data'), b'RIFX': ('>', (b'WAVE',), b'data'),
               b'FORM': ('>', (b'AIFF', b'AIFC'), b'SSND')}


def check_complete(path: str | Path) -> None:
    """Raise `AudioError` when a WAV or AIFF header promises more sample bytes than the file holds.

    libsndfile reads such a file (a copy cut short) without a word, as a shorter clip. Headers
    with an unknown length (0 or 0xFFFFFFFF, as written to a pipe) and other formats pass.
    """
    with open(path, 'rb') as f:
        head = f.read(12)
        kind = _CONTAINERS.get(head[:4])
        if len(head) < 12 or kind is None or head[8:12] not in kind[1]:
            return
        order, _, samples_chunk = kind
        size = os.fstat(f.fileno()).st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack(f'{order}4sI', f.read(8))
            if chunk == samples_chunk:
                held = size - pos - 8
                if n not in (0, 0xFFFFFFFF) and n > held:
                    raise AudioError(f'{path}: the file is truncated: its header promises {n} bytes of audio '
                                     f'data, the file holds {held} (a copy cut short?)')
                return
            pos += 8 + n + (n & 1)  # chunks are padded to an even size


def find_audio_files(root: str | Path, suffixes: tuple[str, ...] = AUDIO_SUFFIXES) -> list[Path]:
    """Audio files under `root` (recursive, case-insensitive suffixes), sorted; `root` may be a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such file or folder')
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in root.rglob('*') if p.name.lower().endswith(suffixes) and not p.is_dir())

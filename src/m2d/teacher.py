"""Offline teachers for M2D-S / M2D-X: HuBERT features of clean speech, or a frozen M2D.

M2D-S (denoising distillation) learns, beside the M2D target, to predict the features of a speech
teacher computed on the clean input. The features are computed once, offline, with
`extract_teacher_features` (``m2d teacher-features``), and stored beside the log-mel spectrogram in
one ``.npz`` per file:

- ``arr_0``: LMS ``[1, 80, T]`` (16 kHz front-end, the clip zero-padded to ``min_seconds``),
- ``arr_1``: teacher hidden states ``[1, T2, D]`` at 50 Hz (several layers are concatenated along D,
  as the reference does),
- ``arr_2``: the number of valid teacher frames: ``T2 * original samples // padded samples``.

M2D-X uses any M2D model as the teacher instead, at training time: `runtime_teacher`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import PRESETS, LogMelSpectrogram, find_audio_files, load_audio
from .fileio import atomic_path, is_temporary

log = logging.getLogger(__name__)

DEFAULT_TEACHER = 'facebook/hubert-base-ls960'
TEACHER_SAMPLE_RATE = 16000
WAV_NORM_EPS = 1e-7  # as Wav2Vec2FeatureExtractor's zero-mean unit-variance normalization


# ----- HuBERT ------------------------------------------------------------------------------------

def _import_hubert():
    try:
        from transformers import HubertModel
    except ImportError as e:
        raise ImportError('the HuBERT teacher needs the `transformers` package: '
                          "pip install 'm2d[speech]' (or pip install transformers)") from e
    return HubertModel


def load_hubert(name_or_path: str | Path = DEFAULT_TEACHER, device: str | torch.device = 'cpu') -> nn.Module:
    """A frozen HuggingFace ``HubertModel`` from a hub name or a local folder, in eval mode."""
    HubertModel = _import_hubert()
    try:
        model = HubertModel.from_pretrained(str(name_or_path))
    except OSError as e:
        raise OSError(f'cannot load the HuBERT teacher {name_or_path!r}: {e}') from e
    model.eval().requires_grad_(False)
    return model.to(device)


def normalize_wav(wav: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per waveform ``[B, N]`` (what the reference's wav2vec2 processor does)."""
    mean = wav.mean(-1, keepdim=True)
    var = wav.var(-1, keepdim=True, unbiased=False)
    return (wav - mean) / torch.sqrt(var + WAV_NORM_EPS)


def _hubert_frames(model: nn.Module, samples: int) -> int:
    """Frames the HuBERT conv stack gives for `samples` input samples."""
    n = samples
    for k, s in zip(model.config.conv_kernel, model.config.conv_stride):
        n = (n - k) // s + 1
    return max(n, 0)


def check_layers(model: nn.Module, layers: Sequence[int]) -> None:
    """Raise ValueError unless every index is one of the model's ``hidden_states`` (0..num_hidden_layers)."""
    n_layers = model.config.num_hidden_layers
    if not layers:
        raise ValueError('no teacher layers given')
    for i in layers:
        if not 0 <= i <= n_layers:
            raise ValueError(f'teacher layer {i} does not exist: hidden_states has indices 0..{n_layers}')


@torch.no_grad()
def teacher_features(model: nn.Module, wav_batch: torch.Tensor | Sequence[np.ndarray | torch.Tensor],
                     layers: Sequence[int] = (9,), min_samples: int = 0, normalize: bool = True,
                     lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HuBERT hidden states of waveforms at 16 kHz.

    Each waveform is zero-padded to `min_samples` (7 s in M2D-S), normalized (zero mean, unit
    variance over the padded clip, as the reference), then the batch is zero-padded to its longest
    clip. HuBERT-base normalizes its first conv layer over time, so batching clips of different
    padded lengths changes the features slightly; `extract_teacher_features` batches equal lengths.

    Args:
        model: a ``HubertModel``.
        wav_batch: ``[B, N]`` tensor or a list of 1-D waveforms.
        layers: indices into ``hidden_states`` (0 is the projected CNN output, i is block i);
            several layers are concatenated along the feature axis.
        min_samples: pad each clip to at least this many samples.
        normalize: per-clip zero-mean unit-variance normalization of the waveform.
        lengths: the original samples of each clip when `wav_batch` is already padded.

    Returns:
        features ``[B, T2, D * len(layers)]`` (float32, on the model's device) and the valid frames
        ``[B]`` (``frames of the padded clip * original samples // padded samples``).
    """
    if isinstance(wav_batch, torch.Tensor):
        if wav_batch.dim() == 1:
            wav_batch = wav_batch[None]
        if wav_batch.dim() != 2:
            raise ValueError(f'expected waveforms [batch, samples], got shape {tuple(wav_batch.shape)}')
        wavs = list(wav_batch)
    else:
        wavs = [torch.as_tensor(np.asarray(w, dtype=np.float32)).reshape(-1) for w in wav_batch]
    if not wavs:
        raise ValueError('teacher_features got an empty batch')
    orig = list(lengths) if lengths is not None else [w.shape[-1] for w in wavs]
    if len(orig) != len(wavs):
        raise ValueError(f'{len(orig)} lengths given for {len(wavs)} waveforms')
    check_layers(model, layers)
    device = next(model.parameters()).device
    padded = []
    for w in wavs:
        w = w.float().to(device)
        if w.shape[-1] < min_samples:
            w = F.pad(w, (0, min_samples - w.shape[-1]))
        padded.append(normalize_wav(w[None])[0] if normalize else w)
    plen = [w.shape[-1] for w in padded]
    batch = torch.stack([F.pad(w, (0, max(plen) - w.shape[-1])) for w in padded])
    hidden = model(batch, output_hidden_states=True).hidden_states
    feats = torch.cat([hidden[i] for i in layers], dim=-1).float()
    valid = torch.tensor([_hubert_frames(model, p) * o // p for p, o in zip(plen, orig)], dtype=torch.long)
    return feats, valid


# ----- offline extraction ------------------------------------------------------------------------

@dataclass
class ExtractSummary:
    """What `extract_teacher_features` did."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    files_csv: Path | None = None


def list_npz_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the ``.npz`` files under `folder` (sorted, no leftovers of killed writes)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*.npz') if not is_temporary(p))


def _load(path: Path) -> tuple[Path, np.ndarray | None, str]:
    try:
        wav = load_audio(path, TEACHER_SAMPLE_RATE)
    except Exception as e:  # AudioError and anything libsndfile/soxr raise: report, go on
        return path, None, str(e)
    return path, wav, ''


def extract_teacher_features(src: str | Path, dest: str | Path, teacher: str | Path | nn.Module = DEFAULT_TEACHER,
                             sr: int = TEACHER_SAMPLE_RATE, min_seconds: float = 7.0, layers: Sequence[int] = (9,),
                             batch_size: int = 8, overwrite: bool = False, progress: bool = True,
                             device: str | torch.device = 'cpu', dtype: str = 'float32',
                             suffixes: tuple[str, ...] | None = None, workers: int = 2) -> ExtractSummary:
    """Write ``DEST/<relative path>.npz`` (LMS, teacher features, valid length) for each audio file under `src`.

    Clips shorter than `min_seconds` are zero-padded (for both the LMS and the teacher). Clips of the
    same padded length are batched together, so each file gets exactly the features it would get
    alone. Existing outputs are skipped unless `overwrite`; files are written atomically, so a killed
    run can be restarted. Failures are logged, listed in ``DEST/teacher_failures.csv`` and returned.
    Finally ``DEST/files.csv`` lists all ``.npz`` files (paths relative to dest's parent).

    Args:
        teacher: a HuBERT name/folder (`load_hubert`) or a loaded ``HubertModel``.
        sr: sample rate of the LMS and of the teacher input; only 16000 (HuBERT's rate).
        dtype: storage type of ``arr_1``: 'float32' (the reference) or 'float16' (half the disk).
    """
    from tqdm import tqdm

    if sr != TEACHER_SAMPLE_RATE:
        raise ValueError(f'sr={sr}: HuBERT teachers and the M2D-S LMS use {TEACHER_SAMPLE_RATE} Hz')
    if dtype not in ('float32', 'float16'):
        raise ValueError(f"dtype={dtype!r}: choose 'float32' or 'float16'")
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be >= 1')
    src, dest = Path(src), Path(dest)
    files = find_audio_files(src, *([suffixes] if suffixes else []))
    base = src if src.is_dir() else src.parent
    summary = ExtractSummary()
    todo = []
    for f in files:
        out = dest / f.relative_to(base).with_suffix('.npz')
        if out.exists() and not overwrite:
            summary.skipped += 1
        else:
            todo.append((f, out))
    log.info('%s: %d audio files, %d to do, %d already done', src, len(files), len(todo), summary.skipped)
    model = None
    if todo:
        model = load_hubert(teacher, device) if not isinstance(teacher, nn.Module) else teacher.eval()
        device = next(model.parameters()).device
        check_layers(model, layers)
    to_lms = LogMelSpectrogram(PRESETS[sr]).to(device)
    min_samples = int(round(min_seconds * sr))
    outputs = dict(todo)

    def run_group(items: list[tuple[Path, np.ndarray]]) -> None:
        wavs = [torch.from_numpy(w) for _, w in items]
        try:
            feats, valid = teacher_features(model, wavs, layers=layers, min_samples=min_samples)
        except Exception as e:
            if len(items) > 1:  # isolate the failing file
                for it in items:
                    run_group([it])
                return
            summary.failed.append((str(items[0][0]), f'teacher failed: {e}'))
            log.warning('%s: teacher failed: %s', items[0][0], e)
            return
        for (path, wav), feat, n in zip(items, feats, valid):
            try:
                w = torch.from_numpy(wav).to(device)
                if w.shape[-1] < min_samples:
                    w = F.pad(w, (0, min_samples - w.shape[-1]))
                lms = to_lms(w[None])[0].cpu().numpy().astype(np.float32)  # [1, 80, T]
                out = outputs[path]
                with atomic_path(out) as tmp:
                    np.savez(tmp, lms, feat[None].cpu().numpy().astype(dtype), np.int64(n))
                summary.written += 1
            except Exception as e:
                summary.failed.append((str(path), f'write failed: {e}'))
                log.warning('%s: write failed: %s', path, e)

    window = max(batch_size * 8, 32)
    bar = tqdm(total=len(todo), unit='file', desc='teacher features', disable=not progress)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(todo), window):
            chunk = [f for f, _ in todo[start:start + window]]
            groups: dict[int, list[tuple[Path, np.ndarray]]] = {}
            for path, wav, err in pool.map(_load, chunk):
                if wav is None:
                    summary.failed.append((str(path), err))
                    log.warning('%s', err)
                    bar.update(1)
                    continue
                groups.setdefault(max(len(wav), min_samples), []).append((path, wav))
            for items in groups.values():
                for i in range(0, len(items), batch_size):
                    run_group(items[i:i + batch_size])
                    bar.update(len(items[i:i + batch_size]))
    bar.close()

    failures_csv = dest / 'teacher_failures.csv'
    if summary.failed:
        with atomic_path(failures_csv) as tmp, open(tmp, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['file', 'reason'])
            w.writerows(summary.failed)
    elif failures_csv.exists():  # from an earlier run whose failures were retried now
        failures_csv.unlink()
    if dest.is_dir():
        from .data.filelist import write_filelist
        summary.files_csv = write_filelist(dest, names=list_npz_files(dest))
    log.info('teacher features: %d written, %d skipped, %d failed', summary.written, summary.skipped,
             len(summary.failed))
    return summary


# ----- M2D-X: a frozen M2D as the teacher --------------------------------------------------------

class RuntimeTeacher(nn.Module):
    """A frozen `RuntimeM2D` whose ``encode_lms`` of the clean input is the offline target.

    Call it with the clean, normalized LMS ``[B, 1, 80, T]``; returns ``[B, T', D]`` (no gradient).
    With `frames`, the time axis is averaged (or repeated) to that many steps, e.g. the student's
    Tp when teacher and student patch widths differ.
    If `input_norm_stats` (the student's mean, std) is given and differs from the teacher's own
    ``norm_stats``, the input is re-normalized to the teacher's statistics first.
    """

    def __init__(self, runtime: nn.Module, input_norm_stats: Sequence[float] | None = None):
        super().__init__()
        self.runtime = runtime.eval().requires_grad_(False)
        self.input_norm_stats = None if input_norm_stats is None else tuple(float(v) for v in input_norm_stats)

    def train(self, mode: bool = True) -> RuntimeTeacher:  # always frozen in eval mode
        return super().train(False)

    @property
    def feature_d(self) -> int:
        return self.runtime.feature_d

    @torch.no_grad()
    def forward(self, clean_lms: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        x = clean_lms.to(self.runtime.norm_stats.device).float()
        if self.input_norm_stats is not None:
            mean, std = self.input_norm_stats
            x = self.runtime.normalize_batch(x * std + mean)
        y = self.runtime.encode_lms(x)
        if frames is not None and y.shape[1] != frames:
            y = match_frames(y, frames)
        return y


def match_frames(y: torch.Tensor, frames: int) -> torch.Tensor:
    """Resample ``[B, T, D]`` features to `frames` steps: averages when shrinking, repeats when growing."""
    t = y.shape[1]
    if t > frames:
        return F.adaptive_avg_pool1d(y.transpose(1, 2), frames).transpose(1, 2)
    idx = torch.div(torch.arange(frames, device=y.device) * t, frames, rounding_mode='floor')
    return y[:, idx]


def runtime_teacher(weights: str | Path, device: str | torch.device = 'cpu',
                    input_norm_stats: Sequence[float] | None = None, trust: bool = False) -> Callable:
    """M2D-X offline teacher: callable(clean_lms ``[B, 1, 80, T]``) -> ``[B, T', D]``, frozen, on `device`."""
    from .runtime import RuntimeM2D

    rt = RuntimeM2D(weights, trust=trust)
    log.info('M2D-X teacher: %s (feature_d %d)', weights, rt.feature_d)
    return RuntimeTeacher(rt, input_norm_stats).to(device)

"""HuBERT teacher features of clean speech for M2D-S, computed offline (``m2d teacher-features``).

M2D-S (denoising distillation) learns, beside the M2D target, to predict the features of a speech
teacher computed on the clean input. `extract_teacher_features` (a job of `m2d.jobs`) stores them
beside the log-mel spectrogram in one ``.npz`` per file, the layout `m2d.data.speech` reads:

- ``arr_0``: LMS ``[1, 80, T]`` (16 kHz front-end, the clip zero-padded to ``min_seconds``),
- ``arr_1``: teacher hidden states ``[1, T2, D]`` at 50 Hz (several layers are concatenated along D,
  as the reference does),
- ``arr_2``: the number of valid teacher frames: ``T2 * original samples // padded samples``.

M2D-X uses a frozen M2D as the teacher instead, at training time: `m2d.teacher`.

Unlike `m2d encode` and `m2d convert`, this has no bounded-memory path for long recordings: every
HuBERT feature depends on the whole clip (the waveform is normalized over the clip, HuBERT-base's
first convolution is group-normalized over all time steps, and the transformer attends over every
frame), so features computed window by window would differ from the reference's. M2D-S pre-trains
on utterances (LibriSpeech: at most 35 s); cut long recordings into segments first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import jobs
from ..audio import AUDIO_SUFFIXES, PRESETS, LogMelSpectrogram, load_audio
from ..fileio import atomic_path
from .filelist import write_filelist

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
class ExtractSummary(jobs.Summary):
    """What `extract_teacher_features` did (`written` is `done`)."""

    @property
    def written(self) -> int:
        return self.done


class _Teacher:
    """The transform of the job: equal-length waveforms -> (LMS, teacher features, valid frames) each."""

    def __init__(self, model: nn.Module, layers: Sequence[int], min_samples: int, dtype: str):
        self.model, self.layers, self.min_samples, self.dtype = model, tuple(layers), min_samples, dtype
        self.device = next(model.parameters()).device
        self.to_lms = LogMelSpectrogram(PRESETS[TEACHER_SAMPLE_RATE]).to(self.device)

    @torch.no_grad()
    def __call__(self, wavs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        feats, valid = teacher_features(self.model, wavs, layers=self.layers, min_samples=self.min_samples)
        padded = torch.stack([F.pad(w, (0, max(0, self.min_samples - len(w))))
                              for w in (torch.from_numpy(w).to(self.device) for w in wavs)])
        lms = self.to_lms(padded).cpu().numpy().astype(np.float32)  # [B, 1, 80, T]
        feats = feats[:, None].cpu().numpy().astype(self.dtype)  # [B, 1, T2, D]
        return list(zip(lms, feats, valid.tolist()))


def _save(item: jobs.Item, out: tuple[np.ndarray, np.ndarray, int]) -> None:
    lms, feat, n = out
    with atomic_path(item.dst) as tmp:
        np.savez(tmp, lms, feat, np.int64(n))


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
        workers: threads reading audio ahead.
    """
    if sr != TEACHER_SAMPLE_RATE:
        raise ValueError(f'sr={sr}: HuBERT teachers and the M2D-S LMS use {TEACHER_SAMPLE_RATE} Hz')
    if dtype not in ('float32', 'float16'):
        raise ValueError(f"dtype={dtype!r}: choose 'float32' or 'float16'")
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size} must be >= 1')
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f'{src}: no such file or folder')
    min_samples = int(round(min_seconds * sr))
    plan = jobs.plan(src, dest, name='teacher', out_suffix='.npz', suffixes=suffixes or AUDIO_SUFFIXES,
                     overwrite=overwrite)
    try:
        model = None
        if plan.todo:  # all done: no need to load the teacher
            model = load_hubert(teacher, device) if not isinstance(teacher, nn.Module) else teacher.eval()
            check_layers(model, layers)
    except BaseException:
        plan.release()
        raise
    s = jobs.run(plan, read=lambda item: load_audio(item.src, sr),
                 transform=_Teacher(model, layers, min_samples, dtype) if model is not None else None,
                 write=_save, batch_key=lambda wav: max(len(wav), min_samples), batch_size=batch_size,
                 threads=workers, progress=progress)
    return ExtractSummary(**vars(jobs.finish(s, plan, files_csv=write_filelist)))

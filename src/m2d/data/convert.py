"""`m2d convert`: audio files to log-mel spectrogram `.npy` files for pre-training.

`SRC/a/b.wav` becomes `DEST/a/b.npy` holding float32 (or, with ``dtype='float16'``, the float32
values cast to float16) ``[1, 80, T]`` (the layout of the reference's prepared folders); recordings
longer than `_MAX_FRAMES` frames (5 min) are decoded, transformed and written block by block, so
memory does not grow with their length. A job of `m2d.jobs`: files are converted in worker
processes, each output is written under a temporary name and renamed, so an interrupted run leaves only whole files, and a
rerun skips what exists, removes the temporaries of the interrupted run and converts the rest. Files
that cannot be converted are reported (summary and `DEST/convert_failures.csv`) and never stop the run.

Many machines: ``shard=Shard(K, N)`` converts part K of N of the sorted source list (round-robin,
`m2d.jobs.Shard`); parts run at once into one DEST, each writing ``files.shard-K-of-N.csv`` and
``convert_failures.shard-K-of-N.csv``; ``m2d filelist DEST`` then writes ``files.csv``. `files`:
a text (one path a line) or CSV (column `file_name`) list of paths relative to SRC, instead of
walking SRC. `plan_convert` is the planning step alone.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import jobs
from ..errors import M2DError
from ..audio import AUDIO_SUFFIXES, AudioError, audio_duration, read_audio, stream_audio
from ..fileio import atomic_path
from .filelist import write_filelist

log = logging.getLogger(__name__)

# Clips with more frames than this are transformed in pieces (bounded memory for hour-long files).
_MAX_FRAMES = 30000
_CHECK_BYTES = 1 << 20  # files larger than this are checked for being long (streamed, not read whole)
_WRITTEN = object()  # a long file written by the transform itself
DTYPES = ('float32', 'float16')


@dataclass(frozen=True)
class _LongFile:
    """A recording longer than `_MAX_FRAMES` frames: decoded, transformed and written block by block."""

    item: jobs.Item


@dataclass
class ConvertSummary(jobs.Summary):
    """What one `convert` run did (`converted` is `done`)."""

    @property
    def converted(self) -> int:
        return self.done


def wav_to_lms(frontend, wav: np.ndarray, max_frames: int | None = None) -> np.ndarray:
    """Log-mel ``[1, n_mels, T]`` (float32 numpy) of a mono waveform with `frontend`
    (`m2d.audio.LogMelSpectrogram`). Long clips are transformed in overlapping pieces whose frames
    equal those of the whole-clip transform, so memory stays bounded."""
    import torch

    max_frames = max_frames or _MAX_FRAMES
    c = frontend.config
    hop, half = c.hop_length, c.n_fft // 2
    n = len(wav)
    total = 1 + n // hop
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    with torch.inference_mode():
        if total <= max_frames:
            return frontend(x)[0].numpy()
        margin = -(-half // hop) + 1  # frames whose window may reach past a piece's start
        pieces = []
        for f0 in range(0, total, max_frames):
            f1 = min(total, f0 + max_frames)
            a = max(0, f0 - margin) * hop
            b = n if f1 == total else min(n, (f1 - 1) * hop + half + hop)
            lms = frontend(x[a:b])[0]
            j0 = f0 - a // hop
            pieces.append(lms[..., j0:j0 + (f1 - f0)])
        return torch.cat(pieces, dim=-1).numpy()


_STATE: dict = {}


def _init_worker(sample_rate: int, min_samples: int, dtype: str = 'float32') -> None:
    """Per process: one torch thread (tiny transforms run fastest so, and leave the cores to the
    other workers) and the front-end."""
    import torch

    from ..audio import LogMelSpectrogram, preset

    torch.set_num_threads(1)
    _STATE.update(frontend=LogMelSpectrogram(preset(sample_rate)).eval(), sr=sample_rate, min_samples=min_samples,
                  dtype=np.dtype(dtype))


def _read(item: jobs.Item) -> np.ndarray | _LongFile:
    sr, hop = _STATE['sr'], _STATE['frontend'].config.hop_length
    if item.src.is_file() and item.src.stat().st_size > _CHECK_BYTES and audio_duration(item.src) * sr > _MAX_FRAMES * hop:
        return _LongFile(item)
    return read_audio(item.src, sr)


def _finite(lms):
    if not np.isfinite(np.asarray(lms)).all():
        raise AudioError('the log-mel spectrogram has non-finite values (samples far out of range?)')
    return lms


def _stream_long(f: _LongFile) -> object:
    """Log-mel of a long file, block by block, into its output (`m2d.streaming.save_time_last`)."""
    import torch

    from ..streaming import LogMelStream, save_time_last

    stream = LogMelStream(_STATE['frontend'])

    def pieces():
        with torch.inference_mode():
            for block in stream_audio(f.item.src, _STATE['sr']):
                yield from (_finite(x[0, 0]) for x in stream.feed(torch.from_numpy(block)))
            if stream.samples < _STATE['min_samples']:
                yield from (_finite(x[0, 0]) for x in stream.feed(torch.zeros(_STATE['min_samples'] - stream.samples)))
            yield from (_finite(x[0, 0]) for x in stream.finish())

    with atomic_path(f.item.dst) as tmp:
        save_time_last(tmp, pieces(), dtype=_STATE['dtype'])
    return _WRITTEN


def _transform(wavs: list[np.ndarray | _LongFile]) -> list[np.ndarray | object]:
    out = []
    for wav in wavs:
        if isinstance(wav, _LongFile):
            out.append(_stream_long(wav))
            continue
        if len(wav) < _STATE['min_samples']:
            wav = np.pad(wav, (0, _STATE['min_samples'] - len(wav)))
        lms = _finite(wav_to_lms(_STATE['frontend'], wav))
        out.append(np.ascontiguousarray(lms, dtype=np.float32).astype(_STATE['dtype'], copy=False))
    return out


def _write(item: jobs.Item, lms: np.ndarray | object) -> None:
    if lms is _WRITTEN:
        return
    with atomic_path(item.dst) as tmp, open(tmp, 'wb') as f:
        np.save(f, lms)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def read_source_list(path: str | Path) -> list[str]:
    """The paths a `--files` list names: a CSV with a `file_name` column (the header says so), else
    text with one path a line (blank lines skipped). Paths are relative to the source folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--files {path}: no such file list')
    with open(path, newline='', encoding='utf-8') as f:
        first = f.readline()
        f.seek(0)
        if 'file_name' in next(csv.reader([first]), []):
            names = [n for row in csv.DictReader(f) if (n := row['file_name']).strip()]
        else:
            names = [n for line in f if (n := line.rstrip('\r\n')).strip()]
    if not names:
        raise ConvertError(f'--files {path}: the list names no files')
    return names


class ConvertError(M2DError, ValueError):
    """A conversion that cannot start as asked (a bad --files list, --dtype, ...)."""


def plan_convert(src: str | Path, dest: str | Path, *, shard: jobs.Shard | str | None = None,
                 files: str | Path | Sequence[str] | None = None, suffixes: Sequence[str] | None = None,
                 overwrite: bool = False) -> jobs.Plan:
    """The planning step of `convert` alone: source -> output pairs of `src` (walked, or the paths of
    the list `files`, a file or a sequence of names) for part `shard` ('K/N'), with DEST locked.
    Call ``plan.release()`` when done with it (`convert` hands it to `jobs.finish`)."""
    src = Path(src)
    if not src.exists() and not src.is_symlink():
        raise FileNotFoundError(f'{src}: no such file or folder')
    if isinstance(shard, str):
        shard = jobs.Shard.parse(shard)
    names = None
    if files is not None:
        if not src.is_dir():
            raise ConvertError(f'{src}: --files needs SRC to be the folder the listed paths are relative to')
        names = read_source_list(files) if isinstance(files, (str, os.PathLike)) else files
    return jobs.plan(src, dest, name='convert', suffixes=suffixes or AUDIO_SUFFIXES, overwrite=overwrite,
                     names=names, shard=shard)


def convert(src: str | Path, dest: str | Path, sr: int = 16000, workers: int | None = None,
            overwrite: bool = False, min_seconds: float = 0.0, suffixes: Sequence[str] | None = None,
            progress: bool = True, chunk_size: int | None = None, main_helps: bool = True,
            shard: jobs.Shard | str | None = None, files: str | Path | Sequence[str] | None = None,
            dtype: str = 'float32') -> ConvertSummary:
    """Convert the audio files under `src` to log-mel `.npy` files under `dest`.

    sr: 16000 or 32000 (the front-end preset). workers: processes (default: CPU count; 0 converts in
    this process). overwrite: redo existing outputs. min_seconds: zero-pad shorter clips at the end
    (the reference pads to 6.1 s). suffixes: audio suffixes to take (case-insensitive).
    chunk_size: files per worker task (default: up to 16). main_helps: this process converts too
    while the workers start. shard: 'K/N' or `jobs.Shard`: part K (1..N) of the sorted source list,
    round-robin. files: a list of paths relative to `src` (text or CSV, see `read_source_list`) instead
    of walking it. dtype: 'float32' or 'float16' (the float32 log-mel cast to float16: half the bytes;
    outputs already there are kept as they are unless `overwrite`).
    Writes `dest/files.csv` (all `.npy` under `dest`) and, when files failed, `dest/convert_failures.csv`;
    a part of a sharded run writes `dest/files.shard-K-of-N.csv` (its own outputs) and
    `dest/convert_failures.shard-K-of-N.csv` instead.
    Raises `jobs.JobError` when another job writes into `dest` (or the same part into it).
    """
    from ..audio import preset

    preset(sr)  # validates sr
    if min_seconds < 0 or not math.isfinite(min_seconds):
        raise ValueError(f'min_seconds={min_seconds}: must be a finite number >= 0')
    if dtype not in DTYPES:
        raise ConvertError(f'--dtype {dtype}: must be one of {", ".join(DTYPES)}')
    plan = plan_convert(src, dest, shard=shard, files=files, suffixes=suffixes, overwrite=overwrite)
    workers = default_workers() if workers is None else int(workers)
    s = jobs.run(plan, read=_read, transform=_transform, write=_write, processes=max(0, workers),
                 init=_init_worker, init_args=(sr, int(sr * min_seconds), dtype), progress=progress,
                 chunk_size=chunk_size, main_helps=main_helps)
    return ConvertSummary(**vars(jobs.finish(s, plan, files_csv=write_filelist)))

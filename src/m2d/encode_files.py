"""Encode audio files into M2D features on disk (the library behind `m2d encode`).

A job of `m2d.jobs`: files are read ahead in background threads (soundfile and soxr release the
GIL), clips of equal length are encoded together in batches, and every output is written
atomically, so an interrupted run never leaves a truncated ``.npy``. A file that fails (unreadable,
empty, cut short, ...) is recorded with the reason and the run goes on.

Long recordings (more than `m2d.streaming.STREAM_WINDOWS` model windows) are not read whole: they
are decoded block by block, encoded a bounded batch of windows at a time (`RuntimeM2D.iter_encode`)
and their frames appended to the ``.npy`` as they come, so memory does not grow with the length.
With ``npz`` their features are held until the end, so a file whose features exceed `NPZ_MAX_MB`
fails with a message to use per-file output.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import jobs
from .audio import AUDIO_SUFFIXES, audio_duration, load_audio, num_frames, stream_audio
from .errors import M2DError
from .fileio import atomic_path
from .streaming import STREAM_WINDOWS, NpyStream, RunningMean, feature_frames

POOLS = ('none', 'mean')
NPZ_MAX_MB = 512  # features of one file --npz holds in memory; longer recordings need per-file .npy


class TooLongForNpz(M2DError, ValueError):
    """A recording whose features are too large to collect into one ``.npz``."""


@dataclass(frozen=True)
class _LongFile:
    """A recording encoded in bounded memory: read while it is encoded, not by the reader threads."""

    item: jobs.Item
    seconds: float


_WRITTEN = object()  # the encoder wrote the output itself


@dataclass
class EncodeResult:
    """What `encode_files` did: outputs written (relative key -> path or npz key) and failures."""

    encoded: dict[str, Path] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    npz: Path | None = None

    def summary(self) -> str:
        """A few lines for a person: counts, then each failed file and why."""
        lines = [f'encoded {len(self.encoded)} file(s)'
                 + (f' into {self.npz}' if self.npz else '')
                 + (f', skipped {len(self.skipped)} already encoded' if self.skipped else '')
                 + f', {len(self.failed)} failed']
        lines += [f'  FAILED {reason}' for _, reason in self.failed]  # each reason names its file
        return '\n'.join(lines)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays as an ``.npz`` (what ``np.load`` reads) atomically; any string works as a key."""
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, array in arrays.items():
            with z.open(f'{key}.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return path


class LayerSpecError(M2DError, ValueError):
    """A ``--layers`` value that names no layers of the encoder."""


def parse_layers(spec: str | Sequence[int] | None, depth: int) -> list[int] | None:
    """``None``/``''``/``'last'`` -> None (the final output only); ``'all'`` -> every layer;
    ``'0,6,-1'`` or a list of indices -> those layers (negative from the end, duplicates dropped)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ('', 'last')):
        return None
    if isinstance(spec, str):
        if spec.strip().lower() == 'all':
            return list(range(depth))
        try:
            spec = [int(p) for p in spec.split(',')]
        except ValueError:
            raise LayerSpecError(f'--layers {spec!r}: expected "all" or comma-separated layer indices') from None
    layers: list[int] = []
    for i in map(int, spec):
        if not -depth <= i < depth:
            raise LayerSpecError(f'--layers: layer {i} is out of range for a {depth}-layer encoder')
        if i % depth not in layers:
            layers.append(i % depth)
    return layers


class _Encoder:
    """Runs the runtime on one equal-length batch and shapes each clip's output; streams long files."""

    def __init__(self, runtime, device: torch.device, layers: list[int] | None, pool: str, to_npz: bool,
                 progress: bool):
        self.runtime, self.device, self.layers, self.pool = runtime, device, layers, pool
        self.to_npz, self.progress = to_npz, progress

    @torch.inference_mode()
    def __call__(self, wavs: list) -> list:
        if isinstance(wavs[0], _LongFile):  # batch keys keep long files alone
            return [self._long(w) for w in wavs]
        x = torch.from_numpy(np.stack(wavs)).to(self.device)
        if self.layers is None:
            y = self.runtime.encode(x)  # [B, T', D]
        else:
            per_layer = self.runtime.encode(x, return_layers=True)
            y = torch.stack([per_layer[i] for i in self.layers], dim=1)  # [B, L, T', D]
        if self.pool == 'mean':
            y = y.mean(dim=-2)
        y = y.float().cpu().numpy()
        return [np.ascontiguousarray(a, dtype=np.float32) for a in y]

    def _steps(self, f: _LongFile) -> int:
        """Time steps of the features of a long file (from its header's duration)."""
        rt = self.runtime
        return feature_frames(rt, num_frames(round(f.seconds * rt.sample_rate), rt.to_spec.config.hop_length))

    def _pieces(self, f: _LongFile):
        """[t, D] (or [L, t, D]) float32 pieces of a long file, in order, with a progress bar."""
        from tqdm import tqdm

        rt = self.runtime
        blocks = stream_audio(f.item.src, rt.sample_rate)
        with tqdm(total=self._steps(f), unit='frame', desc=f.item.key, leave=False, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for y in rt.iter_encode(blocks, return_layers=self.layers is not None):
                piece = y[0] if self.layers is None else torch.stack([y[i][0] for i in self.layers])
                bar.update(piece.shape[-2])
                yield piece.float().cpu()

    def _long(self, f: _LongFile):
        if self.pool == 'mean':
            mean = RunningMean()
            for piece in self._pieces(f):
                mean.add(piece)
            return mean.mean().numpy()
        if self.to_npz:
            mb = self._steps(f) * self.runtime.feature_d * 4 * len(self.layers or [0]) / 2**20
            if mb > NPZ_MAX_MB:
                raise TooLongForNpz(f'{f.item.src}: {f.seconds / 60:.1f} min of audio gives {mb:.0f} MB of features, '
                                    f'more than --npz collects per file ({NPZ_MAX_MB} MB); encode it with '
                                    '--output DIR (one .npy per file, written as it is encoded)')
            return np.ascontiguousarray(torch.cat(list(self._pieces(f)), dim=-2).numpy(), dtype=np.float32)
        with atomic_path(f.item.dst) as tmp, NpyStream(tmp, layers=len(self.layers) if self.layers else None) as out:
            for piece in self._pieces(f):
                out.append(piece)
        return _WRITTEN


def _reader(sample_rate: int, long_seconds: float):
    """read(item) of the job: the waveform of a clip, or a `_LongFile` for a long recording."""
    def read(item: jobs.Item):
        seconds = audio_duration(item.src)
        if seconds > long_seconds:
            return _LongFile(item, seconds)
        return load_audio(item.src, sample_rate)
    return read


def _batch_key(x) -> object:
    return ('long', x.item.key) if isinstance(x, _LongFile) else len(x)


def encode_files(runtime, inputs: Iterable[str | Path], output_dir: str | Path | None = None,
                 npz: str | Path | None = None, batch_size: int = 8, layers: list[int] | None = None,
                 pool: str = 'none', device: str | torch.device | None = None,
                 suffixes: Sequence[str] = AUDIO_SUFFIXES, skip_existing: bool = False,
                 num_workers: int = 2, progress: bool = True, long_seconds: float | None = None) -> EncodeResult:
    """Encode every audio file under `inputs` with `runtime` (a RuntimeM2D).

    Outputs: ``output_dir/<relative path>.npy`` per file (float32), or one ``npz`` file keyed by the
    relative path without suffix (e.g. ``'speaker1/take2'``). Shapes per file: ``[T', D]``; with
    `pool` 'mean' ``[D]``; with `layers` a leading layer axis ``[L, T', D]`` / ``[L, D]``.
    Clips of equal length are batched (up to `batch_size`); others are encoded on their own.
    A job of `m2d.jobs`: `num_workers` threads read ahead; a second job into `output_dir` is refused.
    Files longer than `long_seconds` (default: `STREAM_WINDOWS` model windows) are streamed in
    bounded memory (same features); with `npz` those whose features exceed `NPZ_MAX_MB` fail.
    """
    if (output_dir is None) == (npz is None):
        raise ValueError('give exactly one of output_dir (a .npy per file) or npz (one file)')
    if pool not in POOLS:
        raise ValueError(f'pool {pool!r}: expected one of {POOLS}')
    if batch_size < 1:
        raise ValueError(f'batch_size {batch_size}: must be at least 1')
    device = torch.device(device) if device is not None else next(runtime.parameters()).device
    runtime = runtime.to(device).eval()
    sample_rate = runtime.sample_rate

    if long_seconds is None:
        long_seconds = STREAM_WINDOWS * runtime.cfg.input_size[1] * runtime.to_spec.config.hop_length / sample_rate

    plan = jobs.plan(list(inputs), output_dir, name='encode', suffixes=suffixes, overwrite=not skip_existing)
    s = jobs.run(plan, read=_reader(sample_rate, long_seconds),
                 transform=_Encoder(runtime, device, layers, pool, to_npz=npz is not None, progress=progress),
                 write=_save if output_dir is not None else None,
                 batch_key=_batch_key, batch_size=batch_size, threads=num_workers, progress=progress)
    jobs.finish(s, plan, failures_csv=False)
    result = EncodeResult(skipped=[item.src for item in plan.skipped], failed=[(Path(f), r) for f, r in s.failed],
                          npz=Path(npz) if npz is not None else None)
    if result.npz is None:
        result.encoded = {key: plan.dest / f'{key}.npy' for key in s.done_keys}
    elif s.results:
        write_npz(result.npz, s.results)
        result.encoded = dict.fromkeys(s.done_keys, result.npz)
    return result


def _save(item: jobs.Item, feature: np.ndarray) -> None:
    if feature is _WRITTEN:
        return
    with atomic_path(item.dst) as tmp:
        np.save(tmp, feature)

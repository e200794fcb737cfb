"""Encode audio files into M2D features on disk (the library behind `m2d encode`).

A job of `m2d.jobs`: files are read ahead in background threads (soundfile and soxr release the
GIL), clips of equal length are encoded together in batches, and every output is written
atomically, so an interrupted run never leaves a truncated ``.npy``. A file that fails (unreadable,
empty, cut short, ...) is recorded with the reason and the run goes on.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import jobs
from .audio import AUDIO_SUFFIXES, load_audio
from .errors import M2DError
from .fileio import atomic_path

POOLS = ('none', 'mean')


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
    """Runs the runtime on one equal-length batch and shapes each clip's output."""

    def __init__(self, runtime, device: torch.device, layers: list[int] | None, pool: str):
        self.runtime, self.device, self.layers, self.pool = runtime, device, layers, pool

    @torch.inference_mode()
    def __call__(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
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


def encode_files(runtime, inputs: Iterable[str | Path], output_dir: str | Path | None = None,
                 npz: str | Path | None = None, batch_size: int = 8, layers: list[int] | None = None,
                 pool: str = 'none', device: str | torch.device | None = None,
                 suffixes: Sequence[str] = AUDIO_SUFFIXES, skip_existing: bool = False,
                 num_workers: int = 2, progress: bool = True) -> EncodeResult:
    """Encode every audio file under `inputs` with `runtime` (a RuntimeM2D).

    Outputs: ``output_dir/<relative path>.npy`` per file (float32), or one ``npz`` file keyed by the
    relative path without suffix (e.g. ``'speaker1/take2'``). Shapes per file: ``[T', D]``; with
    `pool` 'mean' ``[D]``; with `layers` a leading layer axis ``[L, T', D]`` / ``[L, D]``.
    Clips of equal length are batched (up to `batch_size`); others are encoded on their own.
    A job of `m2d.jobs`: `num_workers` threads read ahead; a second job into `output_dir` is refused.
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

    plan = jobs.plan(list(inputs), output_dir, name='encode', suffixes=suffixes, overwrite=not skip_existing)
    s = jobs.run(plan, read=lambda item: load_audio(item.src, sample_rate),
                 transform=_Encoder(runtime, device, layers, pool), write=_save if output_dir is not None else None,
                 batch_key=len, batch_size=batch_size, threads=num_workers, progress=progress)
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
    with atomic_path(item.dst) as tmp:
        np.save(tmp, feature)

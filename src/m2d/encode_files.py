"""Encode audio files into M2D features on disk (the library behind `m2d encode`).

Files are read ahead in background threads (soundfile and soxr release the GIL), clips of equal
length are encoded together in batches, and every output is written atomically, so an interrupted
run never leaves a truncated ``.npy``. A file that fails (unreadable, empty, ...) is recorded with
the reason and the run goes on.
"""

from __future__ import annotations

import logging
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .audio import AUDIO_SUFFIXES, find_audio_files, load_audio
from .fileio import atomic_path

log = logging.getLogger(__name__)

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
        lines += [f'  FAILED {path}: {reason}' for path, reason in self.failed]
        return '\n'.join(lines)


@dataclass(frozen=True)
class _Item:
    path: Path
    key: str  # relative path without the audio suffix, POSIX separators


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays as an ``.npz`` (what ``np.load`` reads) atomically; any string works as a key."""
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, array in arrays.items():
            with z.open(f'{key}.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return path


def parse_layers(spec: str | None, depth: int) -> list[int] | None:
    """``None``/``''`` -> None (final output only); ``'all'`` -> every layer; ``'0,6,11'`` or ``'-1'`` -> those."""
    if spec is None or spec.strip() == '':
        return None
    if spec.strip().lower() == 'all':
        return list(range(depth))
    layers = []
    for part in spec.split(','):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f'--layers {spec!r}: expected "all" or comma-separated layer indices') from None
        if not -depth <= i < depth:
            raise ValueError(f'--layers {spec!r}: layer {i} is out of range for a {depth}-layer encoder')
        layers.append(i % depth)
    return layers


def collect_inputs(inputs: Iterable[str | Path], suffixes: Sequence[str] = AUDIO_SUFFIXES
                   ) -> tuple[list[_Item], list[tuple[Path, str]]]:
    """Audio files under `inputs` (files or folders, recursive) with their output keys.

    A folder's files are keyed by their path relative to that folder, a file by its name; a key
    that two inputs share is reported as a failure for the second one.
    """
    items, failed, seen = [], [], {}
    for inp in inputs:
        inp = Path(inp)
        if inp.is_dir():
            pairs = [(p, p.relative_to(inp)) for p in find_audio_files(inp, tuple(suffixes))]
            if not pairs:
                failed.append((inp, f'no audio files ({", ".join(suffixes)}) in this folder'))
        elif inp.exists():
            pairs = [(inp, Path(inp.name))]
        else:
            failed.append((inp, 'no such file or folder'))
            continue
        for path, rel in pairs:
            key = rel.with_suffix('').as_posix()
            if key in seen:
                failed.append((path, f'same output name {key!r} as {seen[key]}'))
                continue
            seen[key] = path
            items.append(_Item(path, key))
    return items, failed


def _read_ahead(items: Sequence[_Item], sample_rate: int, workers: int, window: int
                ) -> Iterator[tuple[_Item, np.ndarray | Exception]]:
    """Yield (item, waveform or the exception) in order, loading up to `window` files ahead."""
    def load(item: _Item) -> np.ndarray | Exception:
        try:
            return load_audio(item.path, sample_rate)
        except Exception as e:  # reported per file; the run goes on
            return e

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[_Item, Future]] = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield item, fut.result()


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
    """
    from tqdm import tqdm

    if (output_dir is None) == (npz is None):
        raise ValueError('give exactly one of output_dir (a .npy per file) or npz (one file)')
    if pool not in POOLS:
        raise ValueError(f'pool {pool!r}: expected one of {POOLS}')
    if batch_size < 1:
        raise ValueError(f'batch_size {batch_size}: must be at least 1')
    device = torch.device(device) if device is not None else next(runtime.parameters()).device
    runtime = runtime.to(device).eval()
    encoder = _Encoder(runtime, device, layers, pool)
    out_root = Path(output_dir) if output_dir is not None else None

    items, failed = collect_inputs(inputs, suffixes)
    result = EncodeResult(failed=failed, npz=Path(npz) if npz is not None else None)
    if out_root is not None and skip_existing:
        todo = []
        for item in items:
            (result.skipped if (out_root / f'{item.key}.npy').exists() else todo).append(item)
        items = todo
    arrays: dict[str, np.ndarray] = {}

    def emit(item: _Item, feature: np.ndarray) -> None:
        if out_root is None:
            arrays[item.key] = feature
            result.encoded[item.key] = result.npz
            return
        dst = out_root / f'{item.key}.npy'
        with atomic_path(dst) as tmp:
            np.save(tmp, feature)
        result.encoded[item.key] = dst

    def run(batch: list[tuple[_Item, np.ndarray]], bar) -> None:
        try:
            features = encoder([w for _, w in batch])
        except Exception as e:
            if len(batch) > 1:  # find the culprit (or survive an out-of-memory batch) one clip at a time
                log.debug('batch of %d failed (%s); encoding one by one', len(batch), e)
                for one in batch:
                    run([one], bar)
                return
            item = batch[0][0]
            result.failed.append((item.path, f'encoding failed: {type(e).__name__}: {e}'))
            bar.update(1)
            return
        for (item, _), feature in zip(batch, features):
            try:
                emit(item, feature)
            except OSError as e:
                result.failed.append((item.path, f'cannot write the output: {e}'))
            bar.update(1)

    pending: dict[int, list[tuple[_Item, np.ndarray]]] = {}  # clip length -> clips waiting for a batch
    max_waiting = 4 * batch_size
    with tqdm(total=len(items), unit='file', desc='encode', disable=not progress) as bar:
        window = max(2 * batch_size, 8)
        for item, wav in _read_ahead(items, runtime.sample_rate, num_workers, window):
            if isinstance(wav, Exception):
                result.failed.append((item.path, str(wav) if str(wav).startswith(str(item.path))
                                      else f'{type(wav).__name__}: {wav}'))
                bar.update(1)
                continue
            group = pending.setdefault(len(wav), [])
            group.append((item, wav))
            if len(group) == batch_size:
                run(pending.pop(len(wav)), bar)
            elif sum(map(len, pending.values())) > max_waiting:  # many lengths: flush the largest group
                run(pending.pop(max(pending, key=lambda n: len(pending[n]))), bar)
        for length in list(pending):
            run(pending.pop(length), bar)

    if result.npz is not None and arrays:
        write_npz(result.npz, arrays)
    if result.failed:
        log.warning('%d file(s) failed; see the summary', len(result.failed))
    return result

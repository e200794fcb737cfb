"""`m2d convert`: audio files to log-mel spectrogram `.npy` files for pre-training.

`SRC/a/b.wav` becomes `DEST/a/b.npy` holding float32 ``[1, 80, T]`` (the layout of the reference's
prepared folders). Work is spread over worker processes in chunks of files; each output is written
under a temporary name and renamed, so an interrupted run leaves only whole files, and a rerun skips
what exists, removes the temporaries of the interrupted run and converts the rest. Files that cannot
be converted are reported (summary and `DEST/convert_failures.csv`) and never stop the run.
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio import AUDIO_SUFFIXES, AudioError, load_audio
from ..fileio import atomic_path, is_temporary
from .filelist import FILES_CSV, write_filelist

log = logging.getLogger(__name__)

FAILURES_CSV = 'convert_failures.csv'
_COMPRESSED = ('.flac', '.ogg', '.mp3', '.opus')
# Files larger than this many bytes (a quarter of it for compressed formats) are read and
# resampled block by block instead of at once.
_STREAM_BYTES = 64 << 20
_STREAM_BLOCK = 1 << 20  # samples per block when streaming
# Clips with more frames than this are transformed in pieces (bounded memory for hour-long files).
_MAX_FRAMES = 30000


@dataclass
class ConvertSummary:
    """What one `convert` run did."""

    found: int = 0
    converted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source file, reason)
    removed_temporaries: int = 0
    seconds: float = 0.0
    files_csv: Path | None = None
    failures_csv: Path | None = None

    @property
    def files_per_second(self) -> float:
        return self.converted / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """Non-zero only when nothing was converted and something failed."""
        return 1 if self.converted == 0 and self.failed else 0

    def __str__(self) -> str:
        return (f'converted {self.converted}, skipped {self.skipped} (already present), failed {len(self.failed)}'
                f' of {self.found} files in {self.seconds:.1f} s ({self.files_per_second:.1f} files/s)')


# ----------------------------------------------------------------------------------------------
# Per-file work (runs in the worker processes)

def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """`m2d.audio.load_audio`, but large files are decoded and resampled block by block."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # load_audio names the problem (missing file, dangling link)
    limit = _STREAM_BYTES // 4 if path.suffix.lower() in _COMPRESSED else _STREAM_BYTES
    if size <= limit or not path.is_file():
        return load_audio(path, sample_rate)
    return _read_streaming(path, sample_rate)


def _read_streaming(path: Path, sample_rate: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise AudioError(f'{path}: cannot read audio ({e})') from None
    parts = []
    with f:
        stream = (soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype='float32', quality='HQ')
                  if f.samplerate != sample_rate else None)
        while True:
            try:
                block = f.read(_STREAM_BLOCK, dtype='float32', always_2d=True)
            except Exception as e:
                raise AudioError(f'{path}: cannot read audio ({e})') from None
            if block.shape[0] == 0:
                break
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            if not np.isfinite(mono).all():
                raise AudioError(f'{path}: audio contains NaN or infinite samples')
            parts.append(stream.resample_chunk(mono) if stream else mono.copy())
        if stream is not None:
            parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    wav = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if wav.size == 0:
        raise AudioError(f'{path}: the file holds no audio samples')
    return np.ascontiguousarray(wav, dtype=np.float32)


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


def _init_worker(sample_rate: int, min_samples: int, threads: int | None = 1) -> None:
    import torch

    from ..audio import LogMelSpectrogram, preset

    if threads:
        torch.set_num_threads(threads)
    _STATE.update(frontend=LogMelSpectrogram(preset(sample_rate)).eval(), sr=sample_rate, min_samples=min_samples)


def _convert_file(src: str, dst: str) -> None:
    wav = read_audio(src, _STATE['sr'])
    if len(wav) < _STATE['min_samples']:
        wav = np.pad(wav, (0, _STATE['min_samples'] - len(wav)))
    lms = wav_to_lms(_STATE['frontend'], wav)
    if not np.isfinite(lms).all():
        raise AudioError(f'{src}: the log-mel spectrogram has non-finite values (samples far out of range?)')
    with atomic_path(dst) as tmp, open(tmp, 'wb') as f:
        np.save(f, np.ascontiguousarray(lms, dtype=np.float32))


def _convert_chunk(items: Sequence[tuple[str, str]]) -> list[str | None]:
    """Convert (source, output) pairs; returns None per success or the failure reason."""
    results: list[str | None] = []
    for src, dst in items:
        try:
            _convert_file(src, dst)
            results.append(None)
        except AudioError as e:
            results.append(str(e))
        except MemoryError:
            results.append(f'{src}: out of memory')
        except Exception as e:  # a bad input must never stop the run
            results.append(f'{src}: {type(e).__name__}: {e}')
    return results


# ----------------------------------------------------------------------------------------------
# Planning (main process)

def _scan_sources(src: Path, suffixes: tuple[str, ...]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(source file, relative output name) pairs and (path, reason) failures for folders named like audio."""
    if src.is_file() or (src.is_symlink() and not src.exists()):
        return [(src, Path(src.name).with_suffix('.npy').as_posix())], []
    if not src.is_dir():
        raise FileNotFoundError(f'{src}: no such file or folder')
    found, bad = [], []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        rel = Path(root).relative_to(src)
        for d in dirs:
            if d.lower().endswith(suffixes):
                bad.append((str(Path(root) / d), f'{Path(root) / d}: a folder named like an audio file'))
        for name in names:
            if name.lower().endswith(suffixes) and not is_temporary(name):
                found.append((Path(root) / name, (rel / name).with_suffix('.npy').as_posix()))
    found.sort(key=lambda x: x[1])
    return found, bad


def _scan_outputs(dest: Path) -> tuple[set[str], int]:
    """Existing outputs under `dest` (relative names) and the number of removed temporaries."""
    existing, removed = set(), 0
    if not dest.is_dir():
        return existing, removed
    for root, _, names in os.walk(dest):
        rel = Path(root).relative_to(dest)
        for name in names:
            if is_temporary(name):
                try:
                    (Path(root) / name).unlink()
                    removed += 1
                except OSError as e:
                    log.warning('cannot remove the leftover %s: %s', Path(root) / name, e)
            elif name.endswith('.npy'):
                existing.add((rel / name).as_posix())
    return existing, removed


def _write_failures(path: Path, failed: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'reason'])
        w.writerows(sorted(failed))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def convert(src: str | Path, dest: str | Path, sr: int = 16000, workers: int | None = None,
            overwrite: bool = False, min_seconds: float = 0.0, suffixes: Sequence[str] | None = None,
            progress: bool = True, chunk_size: int | None = None, main_helps: bool = True) -> ConvertSummary:
    """Convert the audio files under `src` to log-mel `.npy` files under `dest`.

    sr: 16000 or 32000 (the front-end preset). workers: processes (default: CPU count; 0 converts in
    this process). overwrite: redo existing outputs. min_seconds: zero-pad shorter clips at the end
    (the reference pads to 6.1 s). suffixes: audio suffixes to take (case-insensitive).
    chunk_size: files per worker task (default: up to 16). main_helps: this process converts too
    while the workers start.
    Writes `dest/files.csv` (all `.npy` under `dest`) and, when files failed, `dest/convert_failures.csv`.
    """
    from ..audio import preset

    preset(sr)  # validates sr
    if min_seconds < 0 or not math.isfinite(min_seconds):
        raise ValueError(f'min_seconds={min_seconds}: must be a finite number >= 0')
    src, dest = Path(src), Path(dest)
    suffixes = tuple(('.' + s.lstrip('.')).lower() for s in (suffixes or AUDIO_SUFFIXES))
    t0 = time.perf_counter()
    summary = ConvertSummary()

    sources, summary.failed = _scan_sources(src, suffixes)
    summary.found = len(sources)
    dest.mkdir(parents=True, exist_ok=True)
    existing, summary.removed_temporaries = _scan_outputs(dest)
    if summary.removed_temporaries:
        log.info('%s: removed %d temporary files left by an interrupted run', dest, summary.removed_temporaries)

    todo, owner = [], {}
    for path, rel in sources:
        if rel in owner:
            summary.failed.append((str(path), f'{path}: same output {rel} as {owner[rel]}; not converted'))
            continue
        owner[rel] = path
        if rel in existing and not overwrite:
            summary.skipped += 1
        else:
            todo.append((str(path), str(dest / rel)))
    log.info('%s: %d audio files, %d to convert, %d already converted', src, len(sources), len(todo), summary.skipped)

    workers = default_workers() if workers is None else int(workers)
    min_samples = int(sr * min_seconds)
    done: list[str] = []
    if todo:
        done = _run(todo, summary, sr, min_samples, workers, chunk_size, progress, main_helps)
    rel_of = {str(dest / rel): rel for _, rel in sources}
    existing.update(rel_of[d] for d in done)

    summary.files_csv = write_filelist(dest, dest / FILES_CSV, names=existing)
    failures = dest / FAILURES_CSV
    if summary.failed:
        _write_failures(failures, summary.failed)
        summary.failures_csv = failures
    elif failures.exists():
        failures.unlink()  # stale report of an earlier run
    summary.seconds = time.perf_counter() - t0
    log.info('%s', summary)
    return summary


class _LocalFrontEnd:
    """Converting in this process: one torch thread while converting (tiny transforms run fastest so
    and leave the cores to the workers), the caller's setting restored afterwards."""

    def __init__(self, sr: int, min_samples: int):
        self.args = (sr, min_samples)
        self.threads: int | None = None

    def __call__(self, chunk):
        import torch

        if self.threads is None:
            self.threads = torch.get_num_threads()
            _init_worker(*self.args, threads=1)
        return _convert_chunk(chunk)

    def close(self):
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


def _worker_loop(tasks, results, sr: int, min_samples: int) -> None:
    """A worker process: announce readiness, then convert chunks until told to stop."""
    _init_worker(sr, min_samples, 1)
    pid = os.getpid()
    results.put(('ready', pid, -1, None))
    while (item := tasks.get()) is not None:
        k, chunk = item
        results.put(('start', pid, k, None))
        results.put(('done', pid, k, _convert_chunk(chunk)))


def _remove_partial_outputs(items: Sequence[tuple[str, str]]) -> None:
    """Remove the temporary files a killed worker may have left for these outputs."""
    import glob

    for _, dst in items:
        d = Path(dst)
        for tmp in d.parent.glob(f'.{glob.escape(d.name)}.*'):
            if is_temporary(tmp):
                tmp.unlink(missing_ok=True)


class _Workers:
    """A set of worker processes with their own task and result queues."""

    def __init__(self, n: int, sr: int, min_samples: int):
        ctx = mp.get_context('spawn')
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs: dict[int, mp.process.BaseProcess] = {}
        for _ in range(n):
            p = ctx.Process(target=_worker_loop, args=(self.tasks, self.results, sr, min_samples), daemon=True)
            p.start()
            self.procs[p.pid] = p
        self.ready: set[int] = set()

    def dead(self) -> list[mp.process.BaseProcess]:
        return [p for p in self.procs.values() if not p.is_alive()]

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.join()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()


def _run(todo: list[tuple[str, str]], summary: ConvertSummary, sr: int, min_samples: int, workers: int,
         chunk_size: int | None, progress: bool, main_helps: bool = True) -> list[str]:
    """Convert `todo`; fills `summary` (converted, failed) and returns the outputs written.

    Worker processes ('spawn') take chunks of files from a queue. While they start (importing torch
    takes seconds), this process converts chunks itself, so small jobs finish without waiting.
    When a worker dies (a crash in a decoder, a kill), its queues may be left locked, so all workers
    are replaced; the chunk it held is retried file by file, and a file that kills a worker on its
    own fails with that reason. Workers are terminated at the end rather than torn down one by one.
    """
    from tqdm import tqdm

    done: list[str] = []
    bar = tqdm(total=len(todo), unit='file', desc='convert', disable=not progress, dynamic_ncols=True)

    def collect(items, results):
        for (s, d), reason in zip(items, results):
            if reason is None:
                done.append(d)
                summary.converted += 1
            else:
                summary.failed.append((s, reason))
                log.debug('failed: %s', reason)
        bar.update(len(items))
        if summary.failed:
            bar.set_postfix(failed=len(summary.failed), refresh=False)

    local = _LocalFrontEnd(sr, min_samples)
    pool: _Workers | None = None
    try:
        if workers <= 0:
            for chunk in _chunks(todo, 16):
                collect(chunk, local(chunk))
            return done
        workers = min(workers, len(todo))
        size = chunk_size or max(1, min(16, len(todo) // (workers * 8)))
        chunks = _chunks(todo, size)
        pending = list(range(len(chunks)))[::-1]  # a stack: pop() gives the next chunk
        sent: dict[int, int | None] = {}  # chunk -> pid of the worker converting it (None: queued)
        failed_starts = 0
        pool = _Workers(workers, sr, min_samples)
        while pending or sent:
            while pending and pool.ready and len(sent) < 2 * len(pool.ready):
                k = pending.pop()
                sent[k] = None
                pool.tasks.put((k, chunks[k]))
            wait = 0.5
            if pending and main_helps and len(pool.ready) < len(pool.procs):
                k = pending.pop()  # the workers are still starting: convert here meanwhile
                collect(chunks[k], local(chunks[k]))
                wait = 0.0
            while True:
                try:
                    kind, pid, k, payload = pool.results.get(timeout=wait) if wait else pool.results.get_nowait()
                except queue.Empty:
                    break
                wait = 0.0
                if kind == 'ready':
                    pool.ready.add(pid)
                elif kind == 'start':
                    sent[k] = pid
                elif kind == 'done':
                    sent.pop(k, None)
                    collect(chunks[k], payload)
            dead = pool.dead()
            if not dead:
                continue
            pool.stop()
            for p in dead:
                log.warning('a worker process died (exit code %s); restarting the workers', p.exitcode)
                failed_starts += p.pid not in pool.ready
                for k in [k for k, owner in sent.items() if owner == p.pid]:
                    del sent[k]
                    _remove_partial_outputs(chunks[k])
                    if len(chunks[k]) > 1:  # find the culprit: retry its files one by one
                        for item in chunks[k][::-1]:
                            chunks.append([item])
                            pending.append(len(chunks) - 1)
                    else:
                        collect(chunks[k], [f'{chunks[k][0][0]}: the worker process died (exit code {p.exitcode}) '
                                            'while converting this file'])
            pending.extend(sorted(sent, reverse=True))  # queued or held by a live worker: redo
            sent.clear()
            main_helps = False  # never risk this process on a file that may crash
            if failed_starts >= 2:
                log.warning('worker processes fail to start; converting in this process')
                pool = None
                while pending:
                    k = pending.pop()
                    collect(chunks[k], local(chunks[k]))
                break
            pool = _Workers(workers, sr, min_samples)
        return done
    finally:
        bar.close()
        local.close()
        if pool is not None:
            pool.stop()

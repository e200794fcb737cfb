"""Recordings of any length in bounded memory: log-mel frames from waveform blocks, the model's
windows encoded a bounded batch at a time, features appended to a ``.npy`` as they come.

The results equal the in-memory path (`RuntimeM2D.encode`) up to float32 round-off:

- `LogMelStream` computes each piece of frames on the samples it needs plus the STFT context of its
  neighbours; the front-end's centered frames see reflect padding only at the true ends of the
  recording, as in the whole-waveform transform.
- `encode_stream` cuts windows at the same frame boundaries (multiples of the model's input
  length), normalizes with the checkpoint's statistics and hands whole windows, and at the end the
  last partial window, to `RuntimeM2D.encode_lms`, which pads it as it does in memory.
- `sliding_windows` is the one window cutter over a stream along time: log-mel frames for
  `encode_stream`, waveform samples for the tagging and zero-shot timelines (`m2d.evaluate.timeline`).
- `NpyStream` writes frames to an open file and fixes the header's shape when it is closed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

STREAM_WINDOWS = 16  # model windows encoded together in one pass of the bounded path
PIECE_FRAMES = 2048  # log-mel frames computed per front-end call
_HEADER_BYTES = 128  # fixed .npy header (format 1.0) so that the final shape can be written in place


# ----- log-mel frames ---------------------------------------------------------------------------

class LogMelStream:
    """Log-mel frames of a waveform fed block by block, equal to `frontend` on the whole waveform.

    ``feed(block)`` (``[samples]`` or ``[B, samples]``) yields frames ``[B, 1, F, t]`` as soon as
    their STFT windows are complete; ``finish()`` yields the rest (frames reaching the end use the
    reflect padding of the true end). Frames come in pieces of at most `piece_frames`; the samples
    held are those of one piece plus a window of context.
    """

    def __init__(self, frontend, piece_frames: int = PIECE_FRAMES):
        c = frontend.config
        self.frontend, self.hop, self.half = frontend, c.hop_length, c.n_fft // 2
        self.piece = max(2, int(piece_frames))
        self.blocks: list[torch.Tensor] = []  # held samples, from global sample `start` on
        self.start = self.end = 0  # first held sample, samples seen
        self.next = 0  # next frame to emit

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self.end

    def feed(self, block: np.ndarray | torch.Tensor) -> Iterator[torch.Tensor]:
        x = torch.as_tensor(block)
        x = x[None] if x.dim() == 1 else x
        if x.shape[-1]:
            self.blocks.append(x)
            self.end += x.shape[-1]
        ready = (self.end - self.half) // self.hop + 1  # frames whose window lies inside the samples seen
        while ready - self.next >= self.piece:
            yield self._frames(self.next + self.piece, final=False)

    def finish(self) -> Iterator[torch.Tensor]:
        if self.end == 0:
            raise ValueError('LogMelStream: no samples were fed')
        total = 1 + self.end // self.hop
        while self.next < total:
            yield self._frames(min(total, self.next + self.piece), final=True)

    def _first_sample(self, frame: int) -> int:
        """Where a piece starting at `frame` begins: a hop multiple a window (and a hop) before it."""
        return max(0, ((frame * self.hop - self.half) // self.hop - 1) * self.hop)

    def _frames(self, stop: int, final: bool) -> torch.Tensor:
        a = self._first_sample(self.next)
        b = min(self.end, (stop - 1) * self.hop + self.half + self.hop)
        lms = self.frontend(self._take(a, b))  # its frame k is centred on sample a + k * hop
        k0 = self.next - a // self.hop
        out = lms[..., k0:k0 + stop - self.next]
        self.next = stop
        self._drop(self._first_sample(stop))
        return out

    def _take(self, a: int, b: int) -> torch.Tensor:
        parts, pos = [], self.start
        for x in self.blocks:
            lo, hi = max(a, pos), min(b, pos + x.shape[-1])
            if lo < hi:
                parts.append(x[..., lo - pos:hi - pos])
            pos += x.shape[-1]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _drop(self, a: int) -> None:
        """Forget the samples before `a`."""
        while self.blocks and self.start + self.blocks[0].shape[-1] <= a:
            self.start += self.blocks.pop(0).shape[-1]
        if self.blocks and a > self.start:
            self.blocks[0] = self.blocks[0][..., a - self.start:]
            self.start = a


def lms_stream(frontend, blocks: Iterable[np.ndarray | torch.Tensor],
               piece_frames: int = PIECE_FRAMES) -> Iterator[torch.Tensor]:
    """Log-mel pieces ``[B, 1, F, t]`` of a waveform given as blocks; concatenated in time they equal
    ``frontend(whole waveform)``."""
    stream = LogMelStream(frontend, piece_frames)
    for block in blocks:
        yield from stream.feed(block)
    yield from stream.finish()


def waveform_blocks(audio: torch.Tensor | np.ndarray, block_samples: int) -> Iterator[torch.Tensor]:
    """Views of an in-memory waveform ``[samples]`` or ``[B, samples]``, `block_samples` at a time."""
    x = torch.as_tensor(audio)
    for i in range(0, x.shape[-1], block_samples):
        yield x[..., i:i + block_samples]


# ----- windows over a stream ---------------------------------------------------------------------

Stream = np.ndarray | torch.Tensor


def _join(a: Stream, b: Stream) -> Stream:
    return torch.cat([a, b], dim=-1) if isinstance(a, torch.Tensor) else np.concatenate([a, b], axis=-1)


def _pad_end(x: Stream, n: int) -> Stream:
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.pad(x, (0, n))
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n)])


def sliding_windows(blocks: Iterable[Stream], window: int, hop: int,
                    pad_last: bool = True) -> Iterator[tuple[int, int, Stream]]:
    """``(start, end, x[..., start:end])`` for windows of `window` steps every `hop` steps along the last
    axis of a stream of blocks (numpy arrays, made float32, or torch tensors): waveform samples or
    log-mel frames ``[B, 1, F, t]``.

    Windows are yielded as soon as their steps have arrived; `end` is ``min(start + window, n)`` for a
    stream of n steps. The last window, reaching past the end (or a stream shorter than one window),
    is zero-padded to `window` steps, or with ``pad_last=False`` yielded as it is. Yields
    ``1 + ceil(max(0, n - window) / hop)`` windows (`m2d.evaluate.timeline.num_windows`); holds at
    most one window plus one block. Each window is a copy.
    """
    if window < 1 or hop < 1:
        raise ValueError(f'sliding_windows: window ({window}) and hop ({hop}) must be positive')
    buf: Stream | None = None
    buf_start = 0          # step index of buf[..., 0]
    start = 0              # next window's start
    total = 0
    emitted_end = 0
    for block in blocks:
        block = block if isinstance(block, torch.Tensor) else np.asarray(block, np.float32)
        if not block.shape[-1]:
            continue
        buf = block if buf is None or not buf.shape[-1] else _join(buf, block)
        total += block.shape[-1]
        while start + window <= total:
            off = start - buf_start
            yield start, start + window, buf[..., off:off + window].copy() if isinstance(buf, np.ndarray) \
                else buf[..., off:off + window].clone()
            emitted_end = start + window
            start += hop
        keep_from = min(start, total)  # steps before the next window's start are not needed any more
        if keep_from > buf_start:
            buf, buf_start = buf[..., keep_from - buf_start:], keep_from
    if total and emitted_end < total:  # the tail (or a stream shorter than one window)
        tail = buf[..., start - buf_start:]
        yield start, total, _pad_end(tail, window - (total - start)) if pad_last else tail


# ----- model windows ----------------------------------------------------------------------------

def feature_frames(runtime, lms_frames: int) -> int:
    """Time steps `RuntimeM2D.encode_lms` returns for a log-mel of `lms_frames` frames (patches with
    `flat_features`)."""
    unit, pw = runtime.cfg.input_size[1], runtime.cfg.patch_size[1]
    n_full, rest = divmod(lms_frames, unit)
    steps = n_full * runtime.cfg.grid_size[1] + math.ceil(rest / pw)
    return steps * runtime.cfg.grid_size[0] if runtime.flat_features else steps


def encode_stream(runtime, blocks: Iterable[np.ndarray | torch.Tensor], return_layers: bool = False,
                  windows_per_pass: int = STREAM_WINDOWS, skip_frames: int = 0) -> Iterator[list[torch.Tensor]]:
    """Features of a waveform given as blocks, a bounded batch of model windows at a time.

    Yields, per pass, a list over layers (one entry without `return_layers`) of ``[B, t', D']``
    float32 pieces; concatenated along time they equal ``runtime.encode(whole)`` (or
    ``runtime.encode_lms(lms[..., skip_frames:])`` with `skip_frames`). Memory: the model on
    `windows_per_pass` windows, plus one block and one log-mel piece.
    """
    step = max(1, int(windows_per_pass)) * runtime.cfg.input_size[1]
    device = runtime.norm_stats.device

    def normalized() -> Iterator[torch.Tensor]:
        to_skip = int(skip_frames)
        for lms in lms_stream(runtime.to_spec, (torch.as_tensor(b).to(device) for b in blocks)):
            if to_skip:
                cut = min(to_skip, lms.shape[-1])
                lms, to_skip = lms[..., cut:], to_skip - cut
            yield runtime.normalize_batch(lms)

    # Back-to-back windows of `step` frames (a whole number of model windows); the last one, shorter,
    # is padded by encode_lms as in memory.
    for _, _, lms in sliding_windows(normalized(), step, step, pad_last=False):
        y = runtime.encode_lms(lms, return_layers=return_layers)
        yield y if return_layers else [y]


class RunningMean:
    """The mean over time of pieces ``[..., t, D]``, kept as a float64 sum."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        s = x.double().sum(dim=-2)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[-2]

    def mean(self) -> torch.Tensor:
        if self.total is None or self.count == 0:
            raise ValueError('RunningMean: nothing was added')
        return (self.total / self.count).float()


# ----- .npy written frame by frame ----------------------------------------------------------------

def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """A version 1.0 ``.npy`` header of exactly `_HEADER_BYTES` bytes."""
    text = repr({'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
                 'shape': tuple(int(n) for n in shape)})
    room = _HEADER_BYTES - 10
    if len(text) + 1 > room:
        raise ValueError(f'shape {shape}: too many dimensions for the fixed .npy header')
    return b'\x93NUMPY\x01\x00' + room.to_bytes(2, 'little') + (text.ljust(room - 1) + '\n').encode('latin1')


class NpyStream:
    """A ``.npy`` of shape ``[L, T, D]`` (or ``[T, D]`` with ``layers=None``) written time step by time
    step: `append` takes ``[T_k, D]`` (or ``[L, T_k, D]``) pieces, `close` writes the final shape.

    Layer 0 goes straight into `path`; the others into temporary files beside it (hidden names with
    ``.tmp``, removed at close) that are appended at close. Write to a temporary name and rename
    (`m2d.fileio.atomic_path`).
    """

    def __init__(self, path: str | Path, layers: int | None = None, dtype=np.float32):
        self.path, self.layers, self.dtype = Path(path), layers, np.dtype(dtype)
        self.rows, self.width = 0, None
        self.files = [open(self.path, 'wb')]
        self.files[0].write(b'\0' * _HEADER_BYTES)
        self.extra: list[Path] = []
        for _ in range(1, layers or 1):
            fd, name = tempfile.mkstemp(prefix=f'.{self.path.name}.', suffix='.tmp.layer', dir=self.path.parent)
            self.files.append(os.fdopen(fd, 'wb'))
            self.extra.append(Path(name))

    def append(self, x: np.ndarray | torch.Tensor) -> None:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        x = x.astype(self.dtype, copy=False)
        per_layer = [x] if self.layers is None else list(x)
        if len(per_layer) != len(self.files):
            raise ValueError(f'NpyStream: expected {len(self.files)} layers, got {len(per_layer)}')
        if self.width is None:
            self.width = per_layer[0].shape[-1]
        for f, part in zip(self.files, per_layer):
            f.write(np.ascontiguousarray(part).tobytes())
        self.rows += per_layer[0].shape[0]

    def close(self) -> None:
        """Append the other layers' data and write the header with the final shape."""
        try:
            main = self.files[0]
            for f, name in zip(self.files[1:], self.extra):
                f.close()
                with open(name, 'rb') as src:
                    while chunk := src.read(16 << 20):
                        main.write(chunk)
            shape = (self.rows, self.width or 0)
            main.seek(0)
            main.write(_npy_header(shape if self.layers is None else (self.layers, *shape), self.dtype))
        finally:
            self.discard_extra()
            self.files[0].close()

    def discard_extra(self) -> None:
        for f in self.files[1:]:
            f.close()
        for name in self.extra:
            name.unlink(missing_ok=True)
        self.extra = []

    def __enter__(self) -> 'NpyStream':
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            self.discard_extra()
            self.files[0].close()


def save_time_last(path: str | Path, pieces: Iterable[np.ndarray | torch.Tensor], chunk_frames: int = 1 << 16,
                   dtype: np.dtype | str = np.float32) -> int:
    """Write pieces ``[F, t]`` (in time order) as one ``.npy`` ``[1, F, T]`` of `dtype` (float32 or
    float16: the float32 values cast) in bounded memory; returns T. Time is the last axis, so the
    pieces go to a temporary time-major file beside `path` first and are then transposed
    `chunk_frames` frames at a time."""
    path = Path(path)
    dtype = np.dtype(dtype)
    size = dtype.itemsize
    fd, raw_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp.frames', dir=path.parent)
    raw = Path(raw_name)
    try:
        rows, width = 0, None
        with os.fdopen(fd, 'wb') as f:
            for x in pieces:
                x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                width = x.shape[0]
                f.write(np.ascontiguousarray(x.T, dtype=np.float32).astype(dtype, copy=False).tobytes())
                rows += x.shape[1]
        if width is None:
            raise ValueError(f'{path}: no frames to write')
        with open(raw, 'rb') as src, open(path, 'wb') as out:
            out.write(_npy_header((1, width, rows), dtype))
            out.truncate(_HEADER_BYTES + size * width * rows)
            for t0 in range(0, rows, chunk_frames):
                n = min(chunk_frames, rows - t0)
                block = np.frombuffer(src.read(size * width * n), dtype).reshape(n, width).T
                for k in range(width):
                    out.seek(_HEADER_BYTES + size * (k * rows + t0))
                    out.write(np.ascontiguousarray(block[k]).tobytes())
        return rows
    finally:
        raw.unlink(missing_ok=True)

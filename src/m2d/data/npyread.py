"""Reading many small `.npy` files fast: a header cache and one reused buffer.

`np.load` parses each file's header with `ast` and allocates a new array per file; for training
items that are cropped, converted and dropped right away, both dominate the read. `NpyReader`
reads the header bytes with one ``pread``, looks the parsed header up by those bytes (files of the
same shape and dtype share it), and reads the data into a buffer it keeps:

    reader = NpyReader()
    arr = reader.read(path)   # a view of the reader's buffer: valid until the next read(), do not write

Anything unusual (Fortran order, object dtypes, a header longer than the first read, a short
file) is left to `np.load` by returning None, so the caller can fall back with its own errors.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np

_MAGIC = b'\x93NUMPY'
_FIRST_READ = 256  # np.save pads v1 headers to 64-byte multiples; ours are 128 bytes
_CACHE_LIMIT = 4096  # distinct headers kept (shapes x dtypes)


class NpyReader:
    """Reads C-ordered numeric `.npy` files into a reused buffer (one per process: not thread-safe)."""

    __slots__ = ('_headers', '_buffer')

    def __init__(self):
        self._headers: dict[bytes, tuple[tuple[int, ...], np.dtype, int] | None] = {}
        self._buffer = np.empty(0, dtype=np.uint8)

    def __reduce__(self):
        return NpyReader, ()  # nothing worth sending to a worker: it builds its own cache

    def _header(self, head: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
        """(shape, dtype, data offset) of a header, or None when `np.load` should read the file."""
        if len(head) < 10 or not head.startswith(_MAGIC):
            return None
        major = head[6]
        if major == 1:
            start, hlen = 10, int.from_bytes(head[8:10], 'little')
        elif major in (2, 3) and len(head) >= 12:
            start, hlen = 12, int.from_bytes(head[8:12], 'little')
        else:
            return None
        end = start + hlen
        if end > len(head):
            return None
        key = head[:end]
        if key in self._headers:
            return self._headers[key]
        parsed = None
        try:
            d = ast.literal_eval(key[start:].decode('latin1' if major < 3 else 'utf-8'))
            dtype = np.dtype(d['descr'])
            shape = tuple(int(v) for v in d['shape'])
            if not d['fortran_order'] and not dtype.hasobject and dtype.kind in 'fiub':
                parsed = (shape, dtype, end)
        except (ValueError, SyntaxError, TypeError, KeyError):
            parsed = None
        if len(self._headers) >= _CACHE_LIMIT:
            self._headers.clear()
        self._headers[key] = parsed
        return parsed

    def read(self, path: str | Path) -> np.ndarray | None:
        """The array in `path` as a view of the reused buffer (not to be written), or None when the file is
        not a plain C-ordered numeric `.npy` (or is shorter than its header says): read it with
        `np.load` then. Raises OSError when the file cannot be opened."""
        fd = os.open(path, os.O_RDONLY)
        try:
            header = self._header(os.pread(fd, _FIRST_READ, 0))
            if header is None:
                return None
            shape, dtype, offset = header
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if self._buffer.nbytes < nbytes:
                self._buffer = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(self._buffer)[:nbytes]
            got = os.preadv(fd, [view], offset) if nbytes else 0
            if got != nbytes:
                return None
        finally:
            os.close(fd)
        return self._buffer[:nbytes].view(dtype).reshape(shape)

"""Many file names held without one Python object per name.

A list of two million `str` costs ~200 MB, and every DataLoader worker forked from the process that
holds it copies those pages as it touches them (reference counts are written on every access).
`PathTable` keeps the UTF-8 bytes of all names in one numpy buffer and their end offsets in another:
two objects whatever the length, read-only in forked workers, so their pages stay shared.

    table = PathTable.from_names(['a/1.npy', 'a/2.npy'])
    table[1]                      # 'a/2.npy' (a new str made on access)
    table.take(np.array([1, 0]))  # another PathTable: a subset or a repetition, in that order
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class PathTable(Sequence):
    """Read-only sequence of strings stored as ``blob`` (uint8, the names' UTF-8 bytes back to back)
    and ``ends`` (int64, where each name's bytes end in `blob`)."""

    __slots__ = ('blob', 'ends')

    def __init__(self, blob: np.ndarray, ends: np.ndarray):
        blob, ends = np.asarray(blob, dtype=np.uint8), np.asarray(ends, dtype=np.int64)
        if blob.ndim != 1 or ends.ndim != 1:
            raise ValueError('PathTable: blob and ends must be 1-D')
        if len(ends) and (ends[-1] != len(blob) or (len(ends) > 1 and np.any(np.diff(ends) < 0)) or ends[0] < 0):
            raise ValueError('PathTable: ends must be non-decreasing and end at len(blob)')
        blob.flags.writeable = False
        ends.flags.writeable = False
        self.blob, self.ends = blob, ends

    @classmethod
    def from_names(cls, names: Iterable[str]) -> PathTable:
        """A table of `names` (any iterable of `str`, consumed once; nothing per name is kept)."""
        if isinstance(names, PathTable):
            return names
        blob, ends, total = bytearray(), array.array('q'), 0
        for name in names:
            data = str(name).encode('utf-8')
            blob += data
            total += len(data)
            ends.append(total)
        # views of the buffers just built (no copy: the peak while reading a list is the names' bytes once)
        return cls(np.frombuffer(blob, dtype=np.uint8), np.frombuffer(ends, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    def _one(self, index: int) -> str:
        n = len(self.ends)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f'PathTable index {index} out of range for {n} names')
        start = int(self.ends[index - 1]) if index else 0
        return self.blob[start:int(self.ends[index])].tobytes().decode('utf-8')

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        return self._one(int(index))

    def __iter__(self) -> Iterator[str]:
        blob, start = memoryview(self.blob), 0
        for first in range(0, len(self.ends), 4096):  # ends as Python ints, a chunk at a time
            for end in self.ends[first:first + 4096].tolist():
                yield str(blob[start:end], 'utf-8')
                start = end

    def take(self, indices: Sequence[int] | np.ndarray) -> PathTable:
        """The names at `indices` (in that order, repeats allowed) as a new table."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f'PathTable.take: indices outside 0..{len(self) - 1}')
        starts = np.concatenate([[0], self.ends[:-1]])[idx] if len(self) else idx
        lengths = self.ends[idx] - starts if len(self) else idx
        new_ends = np.cumsum(lengths, dtype=np.int64)
        # gather every selected byte: positions start..start+len for each name, vectorized
        offsets = np.repeat(starts - np.concatenate([[0], new_ends[:-1]]), lengths)
        positions = np.arange(int(new_ends[-1]) if len(new_ends) else 0, dtype=np.int64) + offsets
        return PathTable(self.blob[positions], new_ends)

    def repeat_to(self, min_size: int) -> PathTable:
        """Repeated cyclically up to `min_size` names (unchanged when already that long or empty)."""
        if not len(self) or len(self) >= min_size:
            return self
        return self.take(np.arange(min_size) % len(self))

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.ends.nbytes)

    def __repr__(self) -> str:
        return f'PathTable({len(self)} names, {self.nbytes / 1e6:.1f} MB)'

    def __eq__(self, other) -> bool:
        if isinstance(other, PathTable):
            return np.array_equal(self.ends, other.ends) and np.array_equal(self.blob, other.blob)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

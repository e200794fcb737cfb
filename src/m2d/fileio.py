"""Atomic file writing: a file appears whole under its final name or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds.

    The temporary name keeps `suffix` (default: the final suffix) so that writers that append a
    suffix (``np.save``) or check it (``soundfile``) behave. On error the temporary file is removed.
    The file gets the mode of the file it replaces, or ``0o666 & ~umask`` when it is new (as
    ``open()`` would give), not the 0o600 of ``mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=f'.tmp{suffix}', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process umask, read from /proc where it exists (setting it to read it would race with
    other threads creating files)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permission bits a file written to `path` should get."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def is_temporary(path: str | Path) -> bool:
    """True for the leftovers of `atomic_path` (hidden names containing '.tmp')."""
    name = Path(path).name
    return name.startswith('.') and '.tmp' in name

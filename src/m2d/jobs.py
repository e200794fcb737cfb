"""One engine for jobs over many audio files: **plan -> run -> summary**.

`plan` pairs each source with its output (a key, the relative path without suffix, names both),
reports duplicate outputs and missing inputs, skips outputs already present, removes the
temporaries of a killed run and locks the destination folder. One folder (or a list of paths under
it) is planned as a stream in sorted key order and held compactly (`ItemList`), so that millions of
files cost tens of MB; `Shard` takes one part of that sorted list, for jobs split across machines.
`run` reads ahead in threads, batches reads that share a key, transforms in this process and
writes each output atomically (or, with `processes`, does all three per item in worker processes
that may die without taking the run down). A failing item never stops the others: it becomes a line of `Summary.failed`. `finish`
writes ``DEST/<name>_failures.csv`` (and a file list with the writer the caller passes) and releases
the lock.

    p = jobs.plan('clips/', 'feats/', name='encode')
    s = jobs.finish(jobs.run(p, read=load, transform=encode_batch, write=save, batch_key=len), p)
    print(s)  # encode: 12 done, 0 skipped, 1 failed of 13 files in 2.1 s (6 files/s)

Users (convert, encode, teacher-features, evaluation's embedding extraction) keep only their
transform.
"""

from __future__ import annotations

import csv
import glob
import heapq
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import posixpath
import time
from array import array
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .audio import AUDIO_SUFFIXES
from .errors import M2DError
from .fileio import atomic_path, is_temporary

log = logging.getLogger(__name__)

LOCK_NAME = '.m2d-job.lock'
FILES_CSV_OF_SHARD = 'files.{tag}.csv'  # the outputs of one part of a sharded job


class JobError(M2DError):
    """A job that cannot run as asked (e.g. another job writes into its folder); names the folder."""


@dataclass(frozen=True)
class Item:
    """One unit of work."""

    src: Path  # the input file
    key: str  # relative path without suffix, POSIX ('sub/clip'); unique within a plan
    dst: Path | None  # the output file (None when results are collected in memory)


@dataclass(frozen=True)
class Shard:
    """Part `index` (1-based) of `count` of a job's sorted source list, taken round-robin: the source
    at position i (0-based) of the sorted list belongs to part ``i % count + 1``. The parts together
    are the whole list, each file in exactly one part, and their sizes differ by at most one."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 1 <= self.index <= self.count):
            raise JobError(f'--shard {self.index}/{self.count}: K/N needs 1 <= K <= N (parts are numbered from 1: '
                           '--shard 1/N ... --shard N/N)')

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``'K/N'`` -> Shard(K, N); a `JobError` naming the value otherwise."""
        parts = str(text).strip().split('/')
        try:
            k, n = (int(x) for x in parts)
        except ValueError:
            raise JobError(f'--shard {text!r}: expected K/N with whole numbers 1 <= K <= N, e.g. --shard 2/8') from None
        return cls(k, n)

    @property
    def tag(self) -> str:
        """``shard-K-of-N``: the part's name in its lock and list files."""
        return f'shard-{self.index}-of-{self.count}'

    def owns(self, position: int) -> bool:
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f'{self.index}/{self.count}'


class ItemList(Sequence[Item]):
    """Items of a plan held compactly: each source's path relative to `root`, UTF-8 bytes back to back
    in one buffer and their end offsets in an array (about 60 bytes per file instead of an `Item` with
    two `Path`s, ~1 KB). An `Item` is made when one is read; its key is the relative path without its
    suffix."""

    def __init__(self, root: Path, dest: Path | None, out_suffix: str):
        self.root, self.dest, self.out_suffix = root, dest, out_suffix
        self._blob = bytearray()
        self._ends = array('q')

    def append(self, rel: str) -> None:
        self._blob += rel.encode('utf-8', 'surrogateescape')
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def _one(self, i: int) -> Item:
        if i < 0:
            i += len(self._ends)
        if not 0 <= i < len(self._ends):
            raise IndexError(f'item {i} of {len(self._ends)}')
        rel = self._blob[self._ends[i - 1] if i else 0:self._ends[i]].decode('utf-8', 'surrogateescape')
        key = _strip_suffix(rel)
        dst = self.dest / (key + self.out_suffix) if self.dest is not None else None
        return Item(self.root / rel, key, dst)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        return self._one(i)

    def __iter__(self) -> Iterator[Item]:
        return (self._one(i) for i in range(len(self)))

    def keys(self) -> Iterator[str]:
        """The keys, without making Items."""
        start = 0
        for end in self._ends:
            yield _strip_suffix(self._blob[start:end].decode('utf-8', 'surrogateescape'))
            start = end

    def nbytes(self) -> int:
        return len(self._blob) + self._ends.itemsize * len(self._ends)


@dataclass
class Plan:
    """Source -> output pairs of one job (from `plan`)."""

    name: str  # 'convert', 'encode', 'teacher', 'embed', ... (messages, CSV names)
    todo: Sequence[Item]
    skipped: Sequence[Item]  # outputs already present (not overwrite)
    failed: list[tuple[str, str]]  # (path, reason): missing inputs, duplicate outputs, folders named like audio
    dest: Path | None
    found: int  # sources found (of this shard, with one)
    out_suffix: str = '.npy'
    existing: Collection[str] = field(default_factory=set)  # outputs under dest before the run (relative names)
    removed_temporaries: int = 0  # leftovers of a killed run removed from dest
    started: float = field(default_factory=time.perf_counter)
    lock: _DestLock | None = field(default=None, repr=False)
    shard: Shard | None = None
    total: int = 0  # sources found in all shards

    def release(self) -> None:
        """Release the lock on `dest` (also done by `finish`, and by `run` when it raises)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@dataclass
class Summary:
    """What one run did; `str()` is the one-line result."""

    name: str
    found: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    results: dict[str, Any] = field(default_factory=dict)  # key -> output, when write was None
    seconds: float = 0.0
    files_csv: Path | None = None
    failures_csv: Path | None = None
    done_keys: list[str] = field(default_factory=list)  # keys of the items done
    removed_temporaries: int = 0

    @property
    def files_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 when nothing was done and something failed, else 0."""
        return 1 if self.done == 0 and self.failed else 0

    def __str__(self) -> str:
        return (f'{self.name}: {self.done} done, {self.skipped} skipped, {len(self.failed)} failed of {self.found} '
                f'files in {self.seconds:.1f} s ({self.files_per_second:.0f} files/s)')


# ----- plan ---------------------------------------------------------------------------------------

def plan(inputs: str | Path | Iterable[str | Path] | None, dest: str | Path | None = None, *, name: str,
         out_suffix: str = '.npy', suffixes: Sequence[str] = AUDIO_SUFFIXES, overwrite: bool = False,
         items: Sequence[tuple[str | Path, str]] | None = None, names: Iterable[str] | None = None,
         shard: Shard | None = None) -> Plan:
    """Source -> output pairs.

    `inputs`: files or folders (recursive; a folder's files are keyed by their path relative to it, a
    file by its name). `names`: paths relative to the one folder `inputs` names, instead of scanning it
    (a `--files` list). `items`: explicit (source, key) pairs instead of scanning. A key two sources
    share is a failure for the second one. With `dest`: dst = dest/key+out_suffix, existing outputs
    are skipped unless `overwrite`, temporaries left by a killed run are removed, and a lock on `dest`
    is taken (released by `finish`); a second job writing into the same `dest` raises `JobError`.

    `shard`: only the sources of that part of the sorted list (`Shard`); parts of one job may run at
    once into one `dest` (each locks its part; a job without `shard` excludes them all), and each
    removes only the temporaries of its own outputs.

    One folder or a `names` list is planned as a stream in sorted key order: a folder is walked one
    directory at a time (entries sorted so that the walk yields keys in sorted order), existing
    outputs are found by walking `dest` in the same order alongside, and the plan holds its items
    compactly (`ItemList`).
    """
    started = time.perf_counter()
    suffixes = tuple(('.' + s.lstrip('.')).lower() for s in suffixes)
    dest = Path(dest) if dest is not None else None
    if names is not None or _one_folder(inputs):
        return _plan_stream(inputs, dest, name, out_suffix, suffixes, overwrite, names, shard, started)
    if shard is not None:
        raise JobError(f'{name}: --shard needs one source folder or a file list')
    if items is not None:
        pairs, failed = [(Path(src), str(key)) for src, key in items], []
    else:
        pairs, failed = _scan(inputs, suffixes)
    p = Plan(name, [], [], failed, dest, len(pairs), out_suffix, started=started, total=len(pairs))
    if p.dest is not None:
        p.dest.mkdir(parents=True, exist_ok=True)
        p.lock = _DestLock(p.dest, name)  # before touching the folder: its temporaries may be another job's
        p.existing, p.removed_temporaries = _scan_outputs(p.dest, out_suffix)
        if p.removed_temporaries:
            log.info('%s: removed %d temporary files left by an interrupted run', p.dest, p.removed_temporaries)
    owner: dict[str, Path] = {}
    for src, key in pairs:
        out = key + out_suffix
        if key in owner:
            p.failed.append((str(src), f'{src}: same output {out} as {owner[key]}; not done'))
            continue
        owner[key] = src
        item = Item(src, key, p.dest / out if p.dest is not None else None)
        (p.skipped if out in p.existing and not overwrite else p.todo).append(item)
    log.info('%s: %d files, %d to do, %d already done', name, p.found, len(p.todo), len(p.skipped))
    return p


def _one_folder(inputs) -> bool:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    elif inputs is None or not isinstance(inputs, Sequence):
        return False
    return len(inputs) == 1 and Path(inputs[0]).is_dir()


def _plan_stream(inputs, dest: Path | None, name: str, out_suffix: str, suffixes: tuple[str, ...], overwrite: bool,
                 names: Iterable[str] | None, shard: Shard | None, started: float) -> Plan:
    """`plan` of one folder (walked) or of `names` under it, in sorted key order, held compactly."""
    root = Path(inputs[0] if isinstance(inputs, Sequence) and not isinstance(inputs, str) else inputs)
    failed: list[tuple[str, str]] = []
    if names is not None:
        if not root.is_dir():
            raise JobError(f'{root}: no such folder (the paths of a file list are relative to it)')
        sources = _listed(root, names)
    else:
        sources = _walk_sources(root, suffixes, failed)
    todo, skipped = ItemList(root, dest, out_suffix), ItemList(root, dest, out_suffix)
    p = Plan(name, todo, skipped, failed, dest, 0, out_suffix, started=started, shard=shard)
    outputs = None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        p.lock = _DestLock(dest, name, shard)  # before touching the folder: its temporaries may be another job's
        outputs = _Outputs(dest, out_suffix, remove_all_temporaries=shard is None)
        p.existing = outputs.names
    prev_key, prev_src = None, None
    for position, (rel, key) in enumerate(sources):
        p.total += 1
        mine = shard is None or shard.owns(position)
        if key == prev_key:  # sorted: a shared output is next to its first owner, whatever part that is in
            if mine:
                p.found += 1
                src = root / rel
                p.failed.append((str(src), f'{src}: same output {key + out_suffix} as {root / prev_src}; not done'))
            continue
        prev_key, prev_src = key, rel
        if not mine:
            continue
        p.found += 1
        exists = outputs is not None and outputs.seek(key, remove_temporaries=True)
        (skipped if exists and not overwrite else todo).append(rel)
    if names is None and p.total == 0 and not any(f == str(root) for f, _ in failed):
        failed.append((str(root), f'{root}: no audio files ({", ".join(suffixes)}) in this folder'))
    if outputs is not None:
        outputs.drain()
        p.removed_temporaries = outputs.removed
        if p.removed_temporaries:
            log.info('%s: removed %d temporary files left by an interrupted run', dest, p.removed_temporaries)
    log.info('%s%s: %d files%s, %d to do, %d already done (plan: %.1f s, %.0f MB of items)', name,
             f' part {shard}' if shard else '', p.found, f' of {p.total}' if shard else '', len(todo), len(skipped),
             time.perf_counter() - started, (todo.nbytes() + skipped.nbytes()) / 1e6)
    return p


def _sort_key(name: str, is_dir: bool, suffix_len: int = -1) -> tuple[str, str]:
    """Order of a folder's entries that makes a depth-first walk yield keys (relative paths without
    suffix) in sorted order: a file sorts by its key part, a folder by its name + '/'."""
    if is_dir:
        return name + '/', name
    return (_strip_suffix(name) if suffix_len < 0 else name[:len(name) - suffix_len]), name


def _walk_sources(folder: Path, suffixes: tuple[str, ...], failed: list[tuple[str, str]],
                  rel: str = '') -> Iterator[tuple[str, str]]:
    """(relative path, key) of the audio files under `folder`, in sorted key order, holding one listing
    per folder level (symlinked folders are not followed, as `os.walk`); folders named like audio
    files are failures."""
    entries = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    if e.name.lower().endswith(suffixes):
                        failed.append((e.path, f'{e.path}: a folder named like an audio file'))
                    if not e.is_symlink():
                        entries.append((*_sort_key(e.name, True), True))
                elif e.name.lower().endswith(suffixes) and not (e.name[0] == '.' and is_temporary(e.name)):
                    entries.append((*_sort_key(e.name, False), False))
    except OSError as e:
        failed.append((str(folder), f'{folder}: cannot list ({e})'))
        return
    entries.sort()
    for sort_key, name, is_dir in entries:
        if is_dir:
            yield from _walk_sources(folder / name, suffixes, failed, f'{rel}{name}/')
        else:
            yield f'{rel}{name}', f'{rel}{sort_key}'


def _strip_suffix(rel: str) -> str:
    """`rel` without the suffix of its last part (as ``posixpath.splitext``, faster)."""
    dot = rel.rfind('.')
    if dot <= rel.rfind('/') + 1:  # no dot in the name, or only a leading one
        return rel
    start = rel.rfind('/') + 1
    while start < dot and rel[start] == '.':  # '..x' has no suffix either, as splitext says
        start += 1
    return rel[:dot] if start < dot else rel


def _listed(root: Path, names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(relative path, key) of a file list's paths (relative to `root`), sorted by key (then path).
    Holds the paths once (no per-path tuple or key kept: keys are made again while yielding)."""
    rels = [str(text) for text in names]
    for n, rel in enumerate(rels):
        if rel.startswith(('/', './')) or '//' in rel or '/.' in rel or rel.startswith('..'):
            text, rel = rel, posixpath.normpath(rel)  # only the unusual ones: normpath is slow for millions
            if posixpath.isabs(rel):
                try:
                    rel = Path(rel).relative_to(root).as_posix()
                except ValueError:
                    raise JobError(f'file list, entry {n + 1} ({text}): an absolute path outside {root}; '
                                   'list paths relative to the source folder') from None
            if rel == '.' or rel == '..' or rel.startswith('../'):
                raise JobError(f'file list, entry {n + 1} ({text}): not a file under {root}')
            rels[n] = rel
    rels.sort()
    if not _keys_sorted(rels):  # rare: a name like 'a-b.wav' beside 'a.wav' (path and key orders differ)
        rels.sort(key=_strip_suffix)  # stable: paths with the same key stay in path order
    for rel in rels:
        yield rel, _strip_suffix(rel)


def _keys_sorted(rels: Sequence[str]) -> bool:
    """Whether the keys of `rels` are in non-decreasing order (checked one at a time: sorting by key
    would hold a key per path, as much memory again as the paths)."""
    prev = ''
    for rel in rels:
        key = _strip_suffix(rel)
        if key < prev:
            return False
        prev = key
    return True


class _Outputs:
    """The outputs already under `dest`, walked in the sources' sorted key order so that `seek` (called
    with non-decreasing keys) tells whether one exists without holding them all in a set. Temporary
    files of killed writes are removed: all of them (a job without shard, once it holds the lock), or
    (a shard) those of the outputs `seek` is asked about, which are that shard's own."""

    def __init__(self, dest: Path, out_suffix: str, remove_all_temporaries: bool):
        self.dest, self.out_suffix, self.remove_all = dest, out_suffix, remove_all_temporaries
        self.names = _NameList()  # outputs found (relative names, sorted), for the file list
        self.removed = 0
        self._it = self._walk('', dest)
        self._head: tuple[str, str, Path | None] | None = next(self._it, None)

    def _walk(self, rel: str, folder: Path) -> Iterator[tuple[str, str, Path | None]]:
        """(key, output name, temporary file or None) in sorted key order."""
        entries = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    try:
                        is_dir = e.is_dir() and not e.is_symlink()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        entries.append((*_sort_key(e.name, True), 'dir'))
                    elif e.name[0] == '.' and is_temporary(e.name):
                        out = _temporary_output(e.name)
                        if out is not None and out.endswith(self.out_suffix):
                            entries.append((*_sort_key(out, False, len(self.out_suffix)), e.name))
                        elif self.remove_all:
                            self._remove(folder / e.name)
                    elif e.name.endswith(self.out_suffix):
                        entries.append((*_sort_key(e.name, False, len(self.out_suffix)), ''))
        except OSError as e:
            log.warning('%s: cannot list (%s)', folder, e)
            return
        entries.sort()
        for sort_key, name, kind in entries:
            if kind == 'dir':
                yield from self._walk(f'{rel}{name}/', folder / name)
            else:
                yield f'{rel}{sort_key}', f'{rel}{name}', (folder / kind if kind else None)

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
            self.removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning('cannot remove the leftover %s: %s', path, e)

    def _pop(self, remove: bool) -> None:
        key, name, tmp = self._head
        if tmp is None:
            self.names.append(name)
        elif remove:
            self._remove(tmp)
        self._head = next(self._it, None)

    def seek(self, key: str, remove_temporaries: bool = False) -> bool:
        """Whether the output of `key` exists; walks past the smaller keys (removing their temporaries
        when every temporary is ours) and removes `key`'s own temporaries."""
        while self._head is not None and self._head[0] < key:
            self._pop(self.remove_all)
        exists = False
        while self._head is not None and self._head[0] == key:
            exists |= self._head[2] is None
            self._pop(remove_temporaries or self.remove_all)
        return exists

    def drain(self) -> None:
        while self._head is not None:
            self._pop(self.remove_all)


def _temporary_output(name: str) -> str | None:
    """The output a temporary file of `fileio.atomic_path` (``.NAME.XXXXXXXX.tmpSUFFIX``) or of
    `streaming.save_time_last` (``.NAME.XXXXXXXX.tmp.frames``) was written for."""
    body = name[1:name.rfind('.tmp')]
    out, dot, _ = body.rpartition('.')
    return out if dot and out else None


class _NameList(Collection[str]):
    """Sorted names held compactly (one buffer), for the file list a job writes at the end."""

    def __init__(self):
        self._blob, self._ends = bytearray(), array('q')

    def append(self, name: str) -> None:
        self._blob += os.fsencode(name)
        self._ends.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends:
            yield os.fsdecode(bytes(self._blob[start:end]))
            start = end

    def __contains__(self, name) -> bool:
        return any(n == name for n in self)


def _scan(inputs, suffixes: tuple[str, ...]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(source, key) pairs of the audio files under `inputs`, and (path, reason) failures."""
    if inputs is None:
        inputs = []
    elif isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    pairs, failed = [], []
    for inp in map(Path, inputs):
        if inp.is_file() or (inp.is_symlink() and not inp.exists()):  # a dangling link fails when read
            pairs.append((inp, Path(inp.name).with_suffix('').as_posix()))
        elif not inp.is_dir():
            failed.append((str(inp), f'{inp}: no such file or folder'))
        else:
            found = []
            for root, dirs, names in os.walk(inp):
                dirs.sort()
                rel = Path(root).relative_to(inp)
                failed += [(str(Path(root) / d), f'{Path(root) / d}: a folder named like an audio file')
                           for d in dirs if d.lower().endswith(suffixes)]
                found += [(Path(root) / n, (rel / n).with_suffix('').as_posix()) for n in names
                          if n.lower().endswith(suffixes) and not is_temporary(n)]
            if not found:
                failed.append((str(inp), f'{inp}: no audio files ({", ".join(suffixes)}) in this folder'))
            pairs += sorted(found, key=lambda x: x[1])
    return pairs, failed


def _scan_outputs(dest: Path, out_suffix: str) -> tuple[set[str], int]:
    """Outputs under `dest` (relative names), after removing the temporaries of killed writes."""
    existing, removed = set(), 0
    for root, _, names in os.walk(dest):
        rel = Path(root).relative_to(dest)
        for name in names:
            if is_temporary(name):
                try:
                    (Path(root) / name).unlink()
                    removed += 1
                except OSError as e:
                    log.warning('cannot remove the leftover %s: %s', Path(root) / name, e)
            elif name.endswith(out_suffix):
                existing.add((rel / name).as_posix())
    return existing, removed


class _DestLock:
    """An exclusive ``flock`` on ``DEST/.m2d-job.lock`` holding the owner's pid; the file is removed on
    release. A part of a sharded job takes that lock shared instead (parts run together; a job
    without shard excludes them all, and they it) plus an exclusive lock on its own
    ``DEST/.m2d-job.shard-K-of-N.lock``. (Lock files are the files not written through
    `atomic_path`: they must stay open.)"""

    def __init__(self, folder: Path, name: str, shard: Shard | None = None):
        self.folder, self.fd, self.part, self.part_fd = folder, None, None, None
        self.path = folder / LOCK_NAME
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return
        if shard is None:
            self.fd = self._take(self.path, fcntl.LOCK_EX, name, lambda holder: (
                f'{folder}: another job is writing into this folder ({holder}); '
                'wait for it to end or choose another output folder'))
            return
        self.fd = self._take(self.path, fcntl.LOCK_SH, None, lambda holder: (
            f'{folder}: another job (not a --shard part) is writing into this folder ({holder}); '
            'wait for it to end'))
        if self.fd is None:
            return
        self.part = folder / LOCK_NAME.replace('.lock', f'.{shard.tag}.lock')
        try:
            self.part_fd = self._take(self.part, fcntl.LOCK_EX, name, lambda holder: (
                f'{folder}: part {shard} is already being done by another job ({holder}); '
                'each --shard K/N must run once at a time'))
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def _take(self, path: Path, mode: int, name: str | None, message: Callable[[str], str]) -> int | None:
        """An open descriptor of `path` locked in `mode` (the file that is there now, not one another
        holder removed meanwhile), with 'pid P, m2d NAME' written when `name` is given; None when the
        file system cannot lock."""
        import fcntl

        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'parts of a --shard job'
                os.close(fd)
                raise JobError(message(holder)) from None
            except OSError as e:  # some network file systems have no flock
                log.warning('%s: cannot lock (%s); make sure no other job writes there', self.folder, e)
                os.close(fd)
                return None
            try:  # the holder we waited for may have removed the file: lock the one that is there now
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        if name is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f'pid {os.getpid()}, m2d {name}\n'.encode())
        return fd

    def release(self) -> None:
        if self.part_fd is not None:
            self.part.unlink(missing_ok=True)  # while still locked
            os.close(self.part_fd)
            self.part_fd = None
        if self.fd is not None:
            if self.part is not None:  # shared: remove the file only when no other part holds it
                import fcntl

                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass
            else:
                self.path.unlink(missing_ok=True)  # while still locked, so no other job locks a removed file
            os.close(self.fd)
            self.fd = None


# ----- run ----------------------------------------------------------------------------------------

def run(plan: Plan, *, read: Callable[[Item], Any], transform: Callable[[list[Any]], list[Any]] | None = None,
        write: Callable[[Item, Any], None] | None = None, batch_key: Callable[[Any], Hashable] | None = None,
        batch_size: int = 1, threads: int = 2, processes: int = 0, init: Callable[..., None] | None = None,
        init_args: tuple = (), progress: bool = True, chunk_size: int | None = None,
        main_helps: bool = True) -> Summary:
    """Do the items of `plan`; returns the Summary (then call `finish`).

    `read(item)` (in `threads` reader threads, ahead of the consumer) -> x; `transform([x, ...])` on
    a batch of reads sharing `batch_key(x)` (up to `batch_size`), in this process -> one output per
    input; `write(item, y)` stores it (through `fileio.atomic_path`), or when `write` is None the
    outputs are collected in `Summary.results[key]`. `init(*init_args)` runs once before the first
    item in each process doing items (torch's thread count is restored here afterwards).

    With `processes > 0`, read+transform+write run per item in that many worker processes
    ('spawn'; the functions must be picklable top-level functions), `chunk_size` items per task
    (default: up to 16); while they start, this process does chunks too (unless not `main_helps`).
    A worker that dies is replaced and its chunk retried item by item; an item that kills a worker
    on its own fails with that reason.

    An exception from read/transform/write becomes (path, reason) in `Summary.failed`; a failing
    batch is retried item by item to isolate the culprit. KeyboardInterrupt stops the run.
    """
    from tqdm import tqdm

    if batch_size < 1:
        plan.release()
        raise JobError(f'batch_size={batch_size}: must be at least 1')
    s = Summary(plan.name, plan.found, skipped=len(plan.skipped), failed=list(plan.failed),
                removed_temporaries=plan.removed_temporaries)
    bar = tqdm(total=len(plan.todo), unit='file', desc=plan.name, disable=not progress, dynamic_ncols=True)

    def collect(item: Item, reason: str | None, result: Any = None) -> None:
        if reason is None:
            s.done += 1
            s.done_keys.append(item.key)
            if write is None:
                s.results[item.key] = result
        else:
            s.failed.append((str(item.src), reason))
            log.debug('failed: %s', reason)
            bar.set_postfix(failed=len(s.failed), refresh=False)
        bar.update(1)

    steps = _Steps(read, transform, write)
    local = _Local(init, init_args)
    try:
        if processes > 0 and plan.todo:
            _run_processes(plan.todo, steps, local, collect, processes, chunk_size, main_helps)
        elif plan.todo:
            local.start()
            _run_here(plan.todo, steps, collect, batch_key, batch_size, threads)
    except BaseException:
        plan.release()
        raise
    finally:
        bar.close()
        local.close()
    s.seconds = time.perf_counter() - plan.started
    return s


def finish(summary: Summary, plan: Plan, *, files_csv: Callable[..., Path] | None = None,
           failures_csv: bool = True) -> Summary:
    """Write ``DEST/<name>_failures.csv`` (or remove a stale one) and, with `files_csv` (a writer
    called as ``files_csv(DEST, csv=None, names=...)`` with the outputs' names relative to DEST, such as
    `m2d.data.filelist.write_filelist`), the file list it returns; release the lock; log the
    one-line result and the first failures.

    A part of a sharded job writes ``<name>_failures.shard-K-of-N.csv`` and lists the outputs of its
    own part (done, or there already) in ``files.shard-K-of-N.csv`` (`FILES_CSV_OF_SHARD`); the
    folder's ``files.csv`` is left to ``m2d filelist DEST`` once every part is done."""
    try:
        tag = f'.{plan.shard.tag}' if plan.shard is not None else ''
        if plan.dest is not None and failures_csv:
            path = plan.dest / f'{plan.name}_failures{tag}.csv'
            if summary.failed:
                with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
                    w = csv.writer(f)
                    w.writerow(['file', 'reason'])
                    w.writerows(sorted(summary.failed))
                summary.failures_csv = path
            elif path.exists():
                path.unlink()  # the report of an earlier run whose failures are done now
        if plan.dest is not None and files_csv is not None:
            suffix = plan.out_suffix
            if isinstance(plan.existing, set):
                names = plan.existing | {k + suffix for k in summary.done_keys}
            else:  # in key order (the plan's stream order): merge by key, then drop repeats (redone outputs)
                done = (k + suffix for k in sorted(summary.done_keys))
                before = (i.key + suffix for i in plan.skipped) if plan.shard is not None else plan.existing
                names = _unique(heapq.merge(before, done, key=lambda n: n[:len(n) - len(suffix)]))
            csv_path = plan.dest / FILES_CSV_OF_SHARD.format(tag=plan.shard.tag) if plan.shard is not None else None
            summary.files_csv = files_csv(plan.dest, csv=csv_path, names=names)
    finally:
        plan.release()
    summary.seconds = time.perf_counter() - plan.started
    log.info('%s', summary)
    for _, reason in summary.failed[:5]:
        log.warning('failed: %s', reason)
    if len(summary.failed) > 5:
        log.warning('... and %d more%s', len(summary.failed) - 5,
                    f' in {summary.failures_csv}' if summary.failures_csv else '')
    return summary


def _unique(names: Iterable[str]) -> Iterator[str]:
    """Sorted names without repeats."""
    prev = None
    for n in names:
        if n != prev:
            yield n
        prev = n


def _reason(item: Item, e: BaseException | str) -> str:
    """A one-line failure reason naming the file."""
    if isinstance(e, MemoryError):
        text = 'out of memory'
    elif isinstance(e, (str, M2DError)):
        text = str(e)
    else:
        text = f'{type(e).__name__}: {e}'
    return text if str(item.src) in text else f'{item.src}: {text}'


@dataclass(frozen=True)
class _Steps:
    """read / transform / write of one job (pickled once into each worker process)."""

    read: Callable[[Item], Any]
    transform: Callable[[list[Any]], list[Any]] | None
    write: Callable[[Item, Any], None] | None

    def apply(self, xs: list[Any]) -> list[Any]:
        if self.transform is None:
            return xs
        ys = list(self.transform(xs))
        if len(ys) != len(xs):
            raise RuntimeError(f'the transform gave {len(ys)} outputs for {len(xs)} inputs')
        return ys

    def one(self, item: Item) -> tuple[str | None, Any]:
        """(None, output or None when written) or (reason, None): read, transform, write one item."""
        try:
            y = self.apply([self.read(item)])[0]
            if self.write is None:
                return None, y
            self.write(item, y)
            return None, None
        except Exception as e:  # includes MemoryError; a bad input must never stop the run
            return _reason(item, e), None


class _Local:
    """Doing items in this process: `init` once on first use; torch's thread count restored at the end."""

    def __init__(self, init: Callable[..., None] | None, init_args: tuple):
        self.init, self.args, self.threads = init, init_args, None

    def start(self) -> None:
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
            if self.init is not None:
                self.init(*self.args)

    def close(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


# ----- in this process: reader threads, batcher, transform, writer --------------------------------

def _read_ahead(items: Sequence[Item], read: Callable[[Item], Any], threads: int, window: int
                ) -> Iterator[tuple[Item, Any, Exception | None]]:
    """(item, x, None) or (item, None, exception) in order, reading up to `window` items ahead."""
    def load(item: Item) -> tuple[Any, Exception | None]:
        try:
            return read(item), None
        except Exception as e:  # reported per item; the run goes on
            return None, e

    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        pending: deque[tuple[Item, Future]] = deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= window:
                done, fut = pending.popleft()
                yield done, *fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, *fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_here(items: Sequence[Item], steps: _Steps, collect: Callable, batch_key: Callable | None,
              batch_size: int, threads: int) -> None:
    def do(batch: list[tuple[Item, Any]]) -> None:
        try:
            ys = steps.apply([x for _, x in batch])
        except Exception as e:
            if len(batch) > 1:  # find the culprit (or survive an out-of-memory batch) one item at a time
                log.debug('a batch of %d failed (%s); retrying item by item', len(batch), e)
                for one in batch:
                    do([one])
            else:
                collect(batch[0][0], _reason(batch[0][0], e))
            return
        for (item, _), y in zip(batch, ys):
            if steps.write is None:
                collect(item, None, y)
                continue
            try:
                steps.write(item, y)
            except Exception as e:
                collect(item, _reason(item, e))
            else:
                collect(item, None)

    groups: dict[Hashable, list[tuple[Item, Any]]] = {}  # batch key -> reads waiting for a batch
    waiting = 0
    window = max(2 * batch_size, 8, 2 * threads)
    for item, x, error in _read_ahead(items, steps.read, threads, window):
        if error is not None:
            collect(item, _reason(item, error))
            continue
        key = batch_key(x) if batch_key is not None else None
        group = groups.setdefault(key, [])
        group.append((item, x))
        waiting += 1
        if len(group) == batch_size:
            waiting -= len(group)
            do(groups.pop(key))
        elif waiting > 4 * batch_size:  # many keys: run the largest group
            largest = max(groups, key=lambda k: len(groups[k]))
            waiting -= len(groups[largest])
            do(groups.pop(largest))
    for key in list(groups):
        do(groups.pop(key))


# ----- in worker processes ------------------------------------------------------------------------

def _worker_loop(tasks, conn, steps: _Steps, init: Callable[..., None] | None, init_args: tuple) -> None:
    """A worker process: announce readiness, then do chunks until told to stop. Messages go through
    the worker's own pipe, sent at once (not by a feeder thread), so that all a worker said before it
    died reaches the main process."""
    if init is not None:
        init(*init_args)
    pid = os.getpid()
    conn.send(('ready', pid, -1, None))
    while (task := tasks.get()) is not None:
        k, chunk = task
        conn.send(('start', pid, k, None))
        conn.send(('done', pid, k, [steps.one(item) for item in chunk]))


class _Workers:
    """A set of worker processes sharing a task queue, each with its own pipe for messages."""

    def __init__(self, n: int, steps: _Steps, init: Callable[..., None] | None, init_args: tuple):
        ctx = mp.get_context('spawn')
        self.tasks = ctx.Queue()
        self.procs: dict[int, mp.process.BaseProcess] = {}
        self.conns: dict[int, Connection] = {}
        for _ in range(n):
            receiver, sender = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_loop, args=(self.tasks, sender, steps, init, init_args), daemon=True)
            p.start()
            sender.close()  # the worker holds it: the pipe ends (EOF) when the worker does
            self.procs[p.pid], self.conns[p.pid] = p, receiver
        self.ready: set[int] = set()

    def messages(self, timeout: float) -> list[tuple]:
        """The messages the workers sent, waiting up to `timeout` seconds for the first."""
        out = []
        for conn in mp_connection.wait(list(self.conns.values()), timeout):
            try:
                while conn.poll():
                    out.append(conn.recv())
            except (EOFError, OSError):  # the worker has ended
                self.conns = {pid: c for pid, c in self.conns.items() if c is not conn}
        return out

    def dead(self) -> list[mp.process.BaseProcess]:
        return [p for p in self.procs.values() if not p.is_alive()]

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.join()
        for conn in self.conns.values():
            conn.close()
        self.tasks.cancel_join_thread()
        self.tasks.close()


def _remove_partial_outputs(items: Iterable[Item]) -> None:
    """Remove the temporary files a killed worker may have left for these outputs."""
    for item in items:
        if item.dst is not None:
            for tmp in item.dst.parent.glob(f'.{glob.escape(item.dst.name)}.*'):
                if is_temporary(tmp):
                    tmp.unlink(missing_ok=True)


class _Chunks:
    """A plan's items in chunks of index ranges, made into Items when a chunk is used (millions of
    items are never all made at once); retried items are appended as one-item lists."""

    def __init__(self, todo: Sequence[Item], size: int):
        self.todo = todo
        self.parts: list[range | list[Item]] = [range(i, min(i + size, len(todo))) for i in range(0, len(todo), size)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, k: int) -> list[Item]:
        c = self.parts[k]
        return [self.todo[i] for i in c] if isinstance(c, range) else c

    def append(self, chunk: list[Item]) -> None:
        self.parts.append(chunk)


def _run_processes(todo: Sequence[Item], steps: _Steps, local: _Local, collect: Callable, workers: int,
                   chunk_size: int | None, main_helps: bool) -> None:
    """Worker processes ('spawn') take chunks of items from a queue. While they start (importing
    torch takes seconds), this process does chunks itself, so small jobs finish without waiting.
    When a worker dies (a crash in a decoder, a kill), its queues may be left locked, so all workers
    are replaced; the chunk it held is retried item by item, and an item that kills a worker on its
    own fails with that reason. Workers are terminated at the end rather than torn down one by one.
    """
    def here(chunk: list[Item]) -> None:
        local.start()
        for item in chunk:
            collect(item, *steps.one(item))

    def receive(messages: list[tuple]) -> None:
        for kind, pid, k, payload in messages:
            if kind == 'ready':
                pool.ready.add(pid)
            elif kind == 'start':
                sent[k] = pid
            elif kind == 'done':
                sent.pop(k, None)
                for item, (reason, result) in zip(chunks[k], payload):
                    collect(item, reason, result)

    workers = min(workers, len(todo))
    size = chunk_size or max(1, min(16, len(todo) // (workers * 8)))
    chunks = _Chunks(todo, size)
    pending = list(range(len(chunks)))[::-1]  # a stack: pop() gives the next chunk
    sent: dict[int, int | None] = {}  # chunk -> pid of the worker doing it (None: queued)
    failed_starts = 0
    pool: _Workers | None = _Workers(workers, steps, local.init, local.args)
    try:
        while pending or sent:
            while pending and pool.ready and len(sent) < 2 * len(pool.ready):
                k = pending.pop()
                sent[k] = None
                pool.tasks.put((k, chunks[k]))
            wait = 0.5
            if pending and main_helps and len(pool.ready) < len(pool.procs):
                here(chunks[pending.pop()])  # the workers are still starting: work here meanwhile
                wait = 0.0
            receive(pool.messages(wait))
            dead = pool.dead()
            if not dead:
                continue
            receive(pool.messages(0))  # all the dead sent before they died
            pool.stop()
            for p in dead:
                log.warning('a worker process died (exit code %s); restarting the workers', p.exitcode)
                failed_starts += p.pid not in pool.ready
                for k in [k for k, owner in sent.items() if owner == p.pid]:
                    del sent[k]
                    _remove_partial_outputs(chunks[k])
                    if len(chunks[k]) > 1:  # find the culprit: retry its items one by one
                        for item in chunks[k][::-1]:
                            chunks.append([item])
                            pending.append(len(chunks) - 1)
                    else:
                        item = chunks[k][0]
                        collect(item, _reason(item, f'the worker process died (exit code {p.exitcode}) '
                                                    'while doing this file'))
            for k in sent:  # queued or held by a worker stopped mid-write: redo
                _remove_partial_outputs(chunks[k])
            pending.extend(sorted(sent, reverse=True))
            sent.clear()
            main_helps = False  # never risk this process on an item that may crash
            if failed_starts >= 2:
                log.warning('worker processes fail to start; working in this process')
                pool = None
                while pending:
                    here(chunks[pending.pop()])
                break
            pool = _Workers(workers, steps, local.init, local.args)
    finally:
        if pool is not None:
            pool.stop()

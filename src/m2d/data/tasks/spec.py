"""What a task module declares (`TaskSpec`), the rows its metadata rule yields (`Row`), the view of
a source its rule reads (`View`), and the shipped split lists (`package_list`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from ...errors import M2DError


class DatasetError(M2DError, ValueError):
    """A source, split list or destination that cannot be prepared; one line naming the path."""


@dataclass(frozen=True)
class Row:
    """One clip of a task: `member` (its path in the source, relative to the dataset's root),
    `file_name` (EVAR's name, relative to DEST), `group` (the split or fold) and its label per task
    (the main task and the derived ones, e.g. {'nsynth': 'bass', 'nspitch': '60'})."""

    member: str
    file_name: str
    group: str
    labels: dict[str, str]

    @property
    def out_name(self) -> str:
        """The prepared file's name relative to DEST: `file_name` with the suffix `.wav`."""
        return PurePosixPath(self.file_name).with_suffix('.wav').as_posix()


class View:
    """A dataset's files inside a source, named relative to the dataset's root folder."""

    def __init__(self, source, root: str):
        self.source, self.root = source, root
        n = len(root)
        self.names = sorted(name[n:] for name in source.names if name.startswith(root))
        self._set = set(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._set

    def text(self, name: str) -> str:
        """The text of a metadata file; `DatasetError` naming it when absent."""
        if name not in self._set:
            raise DatasetError(f'{self.describe(name)}: no such file in the source')
        return self.source.read_bytes(self.root + name).decode('utf-8-sig')

    def describe(self, name: str = '') -> str:
        return self.source.describe(self.root + name)


@dataclass(frozen=True)
class TaskSpec:
    """A task: what it is, where it comes from, and its metadata rule.

    size: EVAR's official number of rows (None when EVAR does not fix it). urls: archives that
    `m2d datasets` downloads when no --source is given (empty: the user brings the source).
    marker: a regular expression for a path relative to the dataset's root that only the dataset
    has (finds the root inside a folder or archive). rows(view, split_files) is EVAR's rule.
    """

    name: str
    title: str
    license: str
    citation: str
    size: int | None
    where: str
    layout: str
    marker: str | None
    rows: Callable[[View, list[Path]], list[Row]]
    column: str = 'split'  # or 'fold'
    urls: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    split_file: str = ''  # what --split_file gives this task ('' when it takes none)
    marker_from: Callable[[list[Path]], str] | None = field(default=None, repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.name, *self.derived)


def package_list(name: str) -> str:
    """The text of a split list shipped in `m2d/data/tasks/lists/`."""
    return resources.files(__package__).joinpath('lists', name).read_text(encoding='utf-8')


def csv_rows(text: str, where: str, columns: Iterable[str]) -> list[dict[str, str]]:
    """The rows of a CSV text as dicts; `DatasetError` naming `where` when a column is missing."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DatasetError(f'{where}: expected the columns {", ".join(missing)} (found {reader.fieldnames})')
    return list(reader)


def read_split_file(path: Path) -> str:
    try:
        return Path(path).read_text(encoding='utf-8-sig')
    except OSError as e:
        raise DatasetError(f'{path}: cannot read the split file ({e.strerror or e})') from None


def one_split_file(task: str, split_files: list[Path], default: str | None) -> tuple[str, str]:
    """(text, where) of the task's split list: --split_file when given, else the shipped `default`."""
    if len(split_files) > 1:
        raise DatasetError(f'--split_file: {task} takes one split file, got {len(split_files)}')
    if split_files:
        return read_split_file(split_files[0]), str(split_files[0])
    if default is None:
        raise DatasetError(f'{task}: give the split list with --split_file')
    return package_list(default), f'm2d/data/tasks/lists/{default}'

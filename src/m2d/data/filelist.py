"""File lists (`files.csv`, column `file_name`) of prepared log-mel `.npy` folders: reading,
writing, and finding the folder their names are relative to; the errors of missing or bad data.

Lists are read streaming into a `PathTable` (two numpy buffers, no Python object per name), so a
list of millions of files costs its bytes once and stays shared with forked loader workers.

The paths in a list are relative to the folder's parent, as the reference's lists are: a folder
`data/lms_fsdd` gives entries like `lms_fsdd/0_george_0.npy`, used with `data_path=data`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

from ..errors import M2DError
from ..fileio import atomic_path, is_temporary
from .pathtable import PathTable

log = logging.getLogger(__name__)

FILES_CSV = 'files.csv'


class DataError(M2DError, ValueError):
    """Missing, empty or malformed training data; the message names the file or list."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file, folder or list that does not exist."""


def list_npy_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the `.npy` files under `folder` (recursive, sorted), leaving out the
    temporary files of interrupted writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingDataError(f'{folder}: no such folder')
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        rel = Path(root).relative_to(folder)
        for name in names:
            if name.endswith('.npy') and not is_temporary(name):
                found.append((rel / name).as_posix())
    found.sort()
    return found


def read_file_list(csv_path: str | Path) -> PathTable:
    """The `file_name` column of a CSV file list, read row by row into a `PathTable`."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MissingDataError(f'{csv_path}: no such file list')
    with open(csv_path, newline='') as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or 'file_name' not in header:
            raise DataError(f'{csv_path}: a file list needs a `file_name` column (found {header})')
        column = header.index('file_name')

        def names():
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue  # csv.DictReader skips blank lines too
                if column >= len(row):
                    raise DataError(f'{csv_path}, line {line}: no `file_name` value ({len(row)} columns)')
                yield row[column]

        return PathTable.from_names(names())


def guess_data_root(csv_path: str | Path, names: Sequence[str]) -> Path:
    """The folder the names of a list are relative to: the CSV's folder (`data/files_x.csv` holding
    `lms_x/...`) or its parent (`data/lms_x/files.csv` written by `m2d convert`)."""
    csv_path = Path(csv_path).resolve()
    candidates = [csv_path.parent, csv_path.parent.parent]
    if names:
        for root in candidates:
            if (root / names[0]).exists():
                return root
    return candidates[0]


def resolve_list(source: str | Path, data_root: str | Path | None = None) -> tuple[PathTable, Path]:
    """The names a folder of `.npy` files or a CSV list holds (a `PathTable`), and the folder they
    are relative to (`data_root` when given, else the folder itself or the one `guess_data_root` finds)."""
    source = Path(source)
    if source.is_dir():
        return PathTable.from_names(list_npy_files(source)), Path(data_root) if data_root is not None else source
    if not source.is_file():
        raise MissingDataError(f'{source}: no such folder or file list')
    names = read_file_list(source)
    return names, Path(data_root) if data_root is not None else guess_data_root(source, names)


def write_csv_list(names: Iterable[str], path: str | Path) -> Path:
    """Write a one-column (`file_name`) CSV atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name'])
        w.writerows([n] for n in names)
    return path


def write_filelist(folder: str | Path, csv: str | Path | None = None,
                   names: Iterable[str] | None = None) -> Path:
    """Write `csv` (default `folder/files.csv`) listing the `.npy` files under `folder`, as paths
    relative to `folder`'s parent. `names` (relative to `folder`) skips the scan when already known."""
    folder = Path(folder)
    names = list_npy_files(folder) if names is None else _in_order(names)
    prefix = folder.resolve().name
    out = write_csv_list((f'{prefix}/{n}' for n in names), csv or folder / FILES_CSV)
    log.info('%s: %d files listed', out, len(names))
    return out


def _in_order(names: Iterable[str]) -> Sequence[str]:
    """`names` sorted. A job hands its outputs' names over as a stream that is sorted already (in all
    but rare cases): they are then held compactly (a `PathTable`) while their order is checked, and
    only sorted as a list of `str` when it is not."""
    if isinstance(names, Sequence):
        return names if _is_sorted(names) else sorted(names)
    if not isinstance(names, Iterator):  # a set: no order to keep
        return sorted(names)
    ordered = True

    def checked() -> Iterator[str]:
        nonlocal ordered
        prev = ''
        for name in map(str, names):
            ordered = ordered and prev <= name
            prev = name
            yield name

    table = PathTable.from_names(checked())
    return table if ordered else sorted(table)


def _is_sorted(names: Sequence[str]) -> bool:
    return all(a <= b for a, b in zip(names, islice(names, 1, None)))

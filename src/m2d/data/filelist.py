"""File lists (`files.csv`, column `file_name`) of prepared log-mel `.npy` folders.

The paths in a list are relative to the folder's parent, as the reference's lists are: a folder
`data/lms_fsdd` gives entries like `lms_fsdd/0_george_0.npy`, used with `data_path=data`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..fileio import atomic_path, is_temporary

log = logging.getLogger(__name__)

FILES_CSV = 'files.csv'


def list_npy_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the `.npy` files under `folder` (recursive, sorted), leaving out the
    temporary files of interrupted writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder}: no such folder')
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        rel = Path(root).relative_to(folder)
        for name in names:
            if name.endswith('.npy') and not is_temporary(name):
                found.append((rel / name).as_posix())
    return sorted(found)


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
    names = list_npy_files(folder) if names is None else sorted(names)
    prefix = folder.resolve().name
    out = write_csv_list([f'{prefix}/{n}' for n in names], csv or folder / FILES_CSV)
    log.info('%s: %d files listed', out, len(names))
    return out

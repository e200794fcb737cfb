"""The Free Spoken Digit Dataset (FSDD): 3,000 8-kHz recordings of spoken digits, 6 speakers.

`prepare_fsdd(dest, source)` puts the recordings in `dest/recordings/` and writes `dest/metadata.csv`
(file, digit, speaker, index, split: takes 0-4 are the official test set). The source is the public
GitHub archive of Jakobovski/free-spoken-digit-dataset (CC BY-SA 4.0) by default, or any URL
(http, https, file) of such a zip, a local zip, or a local folder of recordings (copied or linked).
Every file is written atomically; existing recordings are kept, so an interrupted run can be redone.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..fileio import atomic_path

log = logging.getLogger(__name__)

FSDD_URL = 'https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip'
NAME_RE = re.compile(r'^(\d)_([A-Za-z]+)_(\d+)\.wav$')
TEST_TAKES = 5  # takes 0-4 form the official test set


@dataclass
class FsddResult:
    recordings: Path
    metadata: Path
    files: int
    added: int


def _is_url(source: str) -> bool:
    return '://' in source


def download(url: str, path: Path, progress: bool = True) -> Path:
    """Download `url` to `path`, resumable through ``path.part`` (`m2d.hub.fetch_url`)."""
    from ..hub import DownloadError, fetch_url

    log.info('downloading %s', url)
    try:
        return fetch_url(url, path, desc='fsdd', progress=progress)
    except DownloadError as e:
        raise OSError(f'{url}: cannot download ({e})') from None


def _extract_zip(zip_path: Path, recordings: Path) -> int:
    """Extract the `recordings/*.wav` members of an FSDD archive; returns the number written."""
    added = 0
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise ValueError(f'{zip_path}: not a zip archive ({e})') from e
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()
                   and PurePosixPath(m.filename).parent.name == 'recordings'
                   and NAME_RE.match(PurePosixPath(m.filename).name)]
        if not members:
            raise ValueError(f'{zip_path}: no recordings/*.wav in the archive; is it the FSDD repository?')
        for m in members:
            out = recordings / PurePosixPath(m.filename).name
            if out.exists() and out.stat().st_size == m.file_size:
                continue
            with archive.open(m) as src, atomic_path(out) as tmp, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            added += 1
    return added


def _copy_folder(folder: Path, recordings: Path, link: bool) -> int:
    if (folder / 'recordings').is_dir():
        folder = folder / 'recordings'
    names = sorted(p.name for p in folder.iterdir() if NAME_RE.match(p.name))
    if not names:
        raise ValueError(f'{folder}: no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav) found')
    if folder.resolve() == recordings.resolve():
        return 0
    added = 0
    for name in names:
        out = recordings / name
        if out.exists() or out.is_symlink():
            continue
        src = (folder / name).resolve()
        with atomic_path(out) as tmp:
            if link:
                tmp.unlink()
                os.symlink(src, tmp)
            else:
                shutil.copyfile(src, tmp)
        added += 1
    return added


def write_metadata(recordings: Path, path: Path) -> int:
    """`file` (relative to `path`'s folder), digit, speaker, index, split; returns the row count."""
    rows = []
    for p in sorted(recordings.iterdir()):
        m = NAME_RE.match(p.name)
        if m:
            digit, speaker, index = int(m[1]), m[2], int(m[3])
            rows.append((os.path.relpath(p, path.parent).replace(os.sep, '/'), digit, speaker, index,
                         'test' if index < TEST_TAKES else 'train'))
    rows.sort(key=lambda r: (r[2], r[1], r[3]))
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'digit', 'speaker', 'index', 'split'])
        w.writerows(rows)
    return len(rows)


def prepare_fsdd(dest: str | Path, source: str | Path | None = None, link: bool = False,
                 progress: bool = True) -> FsddResult:
    """Put the FSDD recordings in `dest/recordings` and write `dest/metadata.csv`.

    source: None (the public GitHub archive), a URL of a zip of the repository, a local zip, or a
    local folder holding the wavs (or a `recordings/` folder); link: symlink local files instead of copying.
    """
    dest = Path(dest)
    recordings = dest / 'recordings'
    recordings.mkdir(parents=True, exist_ok=True)
    source = FSDD_URL if source is None else str(source)
    if _is_url(source):
        zip_path = dest / 'fsdd.zip'
        download(source, zip_path, progress=progress)
        try:
            added = _extract_zip(zip_path, recordings)
        finally:
            zip_path.unlink(missing_ok=True)
    elif Path(source).is_dir():
        added = _copy_folder(Path(source), recordings, link)
    elif Path(source).is_file():
        added = _extract_zip(Path(source), recordings)
    else:
        raise FileNotFoundError(f'{source}: no such folder or zip file (or give a URL)')
    files = write_metadata(recordings, dest / 'metadata.csv')
    log.info('%s: %d recordings (%d added), metadata in %s', recordings, files, added, dest / 'metadata.csv')
    return FsddResult(recordings, dest / 'metadata.csv', files, added)

"""Released M2D weights by name: download once into a cache, then load from there.

    >>> from m2d.hub import resolve_weights
    >>> resolve_weights('m2d_vit_base-80x608p16x16-221006-mr7')
    PosixPath('~/.cache/m2d/m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth')

Each release is a zip on GitHub holding one folder named after the model. The download goes to
``CACHE/NAME.zip.part``; an interrupted download is resumed (HTTP Range) by the next call. The zip's
CRCs are checked, it is extracted into a temporary folder in the cache and renamed to ``CACHE/NAME``
in one step, and the zip is deleted: ``CACHE/NAME`` exists only when it is complete. When the table
of releases records the SHA-256 of a zip, the download is checked against it first (as whisper does).

Environment: ``M2D_CACHE`` (cache folder, default ``~/.cache/m2d``), ``M2D_RELEASE_URL`` (base URL
of the release downloads, e.g. a mirror).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import M2DError

log = logging.getLogger(__name__)

RELEASE_URL = 'https://github.com/nttcslab/m2d/releases/download'
WEIGHT_SUFFIXES = ('.pth', '.pt', '.safetensors')
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0



class Release(NamedTuple):
    """A released model: its release tag (the zip is RELEASE_URL/TAG/NAME.zip) and the SHA-256 of the zip."""

    tag: str
    sha256: str | None = None  # hex digest; None: not recorded, only the zip's CRCs are checked


# model name -> Release. The SHA-256 digests of the published zips are not recorded yet: they could
# not be computed here (no network access). Add each as Release('v0.1.0', '<hex digest>') once
# computed from the published file; downloads of releases with a digest are then verified.
RELEASES: dict[str, Release] = {
    **dict.fromkeys([
        'm2d_vit_base-80x608p16x16-221006-mr7',
        'm2d_vit_base-80x608p16x16-221006-mr6',
        'm2d_vit_base-80x608p16x16-221006-mr7_enconly',
        'm2d_vit_base-80x608p16x16-220930-mr7_enconly',
        'm2d_vit_base-80x200p16x4-230529',
        'm2d_as_vit_base-80x608p16x16-240213',
        'm2d_clap_vit_base-80x608p16x16-240128',
        'm2d_as_vit_base-80x608p16x16p32k-240413_enconly',
    ], Release('v0.1.0')),
    **dict.fromkeys([
        'm2d_s_vit_base-80x608p80x2-230220',
        'm2d_s_vit_base-80x512p80x2-230301',
        'm2d_s_vit_base-80x400p80x2-230201',
    ], Release('v0.2.0')),
    **dict.fromkeys([
        'm2d_vit_base-80x1001p16x16-221006-mr7_as_46ab246d',
        'm2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly',
        'm2d_clap_vit_base-80x1001p16x16-240128_AS-FT_enconly',
        'm2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly',
    ], Release('v0.3.0')),
}


class DownloadError(M2DError, RuntimeError):
    """A release that could not be downloaded or unpacked; the message names the model and URL."""


class InterruptedDownload(DownloadError):
    """A transfer that stopped early; the ``.part`` file is kept and the next call resumes it."""


class UnknownModelError(M2DError, ValueError):
    """A name that is not a released model; the message lists close names."""


def is_released_name(name: str) -> bool:
    """True when `name` is a released model name (a key of RELEASES)."""
    return name in RELEASES


def _check_name(name: str) -> None:
    if name in RELEASES:
        return
    close = difflib.get_close_matches(name, list(RELEASES), n=4, cutoff=0.6)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise UnknownModelError(f'{name!r} is not a released M2D model.{hint} '
                            f'Known names: `m2d download --list` (m2d.hub.RELEASES).')


def cache_dir(cache: str | Path | None = None) -> Path:
    """The weight cache: `cache` if given, else ``$M2D_CACHE``, else ``~/.cache/m2d``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get('M2D_CACHE')
    return Path(env).expanduser() if env else Path.home() / '.cache' / 'm2d'


def release_url(name: str, base_url: str | None = None) -> str:
    """URL of the release zip of `name` (base: `base_url`, else ``$M2D_RELEASE_URL``, else RELEASE_URL)."""
    _check_name(name)
    base = base_url or os.environ.get('M2D_RELEASE_URL') or RELEASE_URL
    return f'{base.rstrip("/")}/{RELEASES[name].tag}/{name}.zip'


def _epoch(path: Path) -> int:
    m = re.search(r'(\d+)', path.stem.split('-', 1)[-1])
    return int(m.group(1)) if m else -1


def find_weight_file(folder: str | Path) -> Path | None:
    """The weight file of an unpacked release: the ``checkpoint-N.pth`` with the highest N, else the
    only ``.pth``/``.safetensors`` (several: the newest by the number in its name, with a warning)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob('*') if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                   and not p.name.startswith('.'))
    ckpts = [p for p in files if re.fullmatch(r'checkpoint-\d+\.pth', p.name)]
    if ckpts:
        return max(ckpts, key=_epoch)
    if len(files) > 1:
        best = max(files, key=lambda p: (_epoch(p), p.name))
        log.warning('%s holds %d weight files (%s); using %s', folder, len(files),
                    ', '.join(p.name for p in files), best.name)
        return best
    return files[0] if files else None


def cached_weights(name: str, cache: str | Path | None = None) -> Path | None:
    """The weight file of `name` if it is already in the cache, else None (no network)."""
    return find_weight_file(cache_dir(cache) / name)


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder itself (POSIX flock; no lock file is left behind), so that
    several processes (e.g. torchrun ranks) asking for the same model download it once."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # Windows: no lock; the atomic rename still keeps the cache consistent.
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # some network file systems have no flock
            log.debug('%s: no lock (%s)', folder, e)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fetch_once(url: str, part: Path, desc: str, progress: bool) -> None:
    """Download `url` into `part`, continuing from its current size; raises InterruptedDownload when short."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={'User-Agent': 'm2d'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the part may already be whole
            log.info('%s: the server has no bytes past %d; taking the partial file as complete', desc, offset)
            return
        raise DownloadError(f'{desc}: download failed: HTTP {e.code} {e.reason} for {url}') from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f'{desc}: cannot reach {url} ({getattr(e, "reason", e)})') from None
    with response:
        if offset and response.status == 206:
            start = re.match(r'bytes (\d+)-', response.headers.get('Content-Range', ''))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(f'{desc}: the server resumed at the wrong offset '
                                    f'({response.headers.get("Content-Range")!r}, expected {offset})')
            mode = 'ab'
        else:
            if offset:
                log.info('%s: the server ignored the Range request; downloading from the start', desc)
            offset, mode = 0, 'wb'
        length = response.headers.get('Content-Length')
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit='B', unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=not progress) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError) as e:  # includes http.client.IncompleteRead
                raise InterruptedDownload(f'{desc}: download interrupted after {received} bytes ({e!r}); '
                                          'run again to resume') from None
    if total is not None and received < total:
        raise InterruptedDownload(f'{desc}: download interrupted after {received} of {total} bytes; '
                                  'run again to resume')


def fetch_url(url: str, dest: str | Path, desc: str | None = None, progress: bool = True, retries: int = 2) -> Path:
    """Download `url` to `dest` through ``dest.part``, resuming with HTTP Range.

    An interrupted transfer is resumed up to `retries` times at once; when it still fails, the
    ``.part`` file stays and the next call resumes it. `dest` appears only when complete.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + '.part')
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, desc or dest.name, progress)
            break
        except InterruptedDownload as e:
            if attempt == retries:
                raise
            log.warning('%s; resuming (%d/%d)', e, attempt + 1, retries)
    os.replace(part, dest)
    return dest


def _check_sha256(path: Path, name: str, url: str, expected: str) -> None:
    """Raise DownloadError unless the SHA-256 of `path` is `expected` (hex)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise DownloadError(f'{name}: {path.name} downloaded from {url} has SHA-256 {digest.hexdigest()}, expected '
                            f'{expected.lower()}; it was deleted, run again to download it anew')


def _check_zip(path: Path, name: str, url: str) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DownloadError(f'{name}: the download from {url} is not a valid zip ({e}); '
                            'it was deleted, run again to download it anew') from None
    if bad is not None:
        raise DownloadError(f'{name}: the download from {url} is corrupt (bad CRC in {bad}); '
                            'it was deleted, run again to download it anew')


def _unpack(zip_path: Path, name: str, target: Path) -> Path:
    """Extract into a temporary folder beside `target`, then rename it to `target`."""
    tmp = Path(tempfile.mkdtemp(prefix=f'.{name}.', suffix='.tmp', dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as z:
            for member in z.namelist():  # zipfile already drops '..' and absolute parts; refuse them anyway
                if member.startswith(('/', '\\')) or '..' in Path(member).parts:
                    raise DownloadError(f'{name}: the zip holds an unsafe path {member!r}')
            z.extractall(tmp)
        entries = [p for p in tmp.iterdir() if p.name != '__MACOSX']
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        weights = find_weight_file(root)
        if weights is None:
            raise DownloadError(f'{name}: the release zip holds no {"/".join(WEIGHT_SUFFIXES)} file '
                                f'(members: {", ".join(p.name for p in entries)})')
        if target.exists():  # an unusable leftover (no weight file in it)
            shutil.rmtree(target)
        os.replace(root, target)
        return target / weights.relative_to(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, cache: str | Path | None = None, progress: bool = True,
             base_url: str | None = None, retries: int = 2) -> Path:
    """Download and unpack the release `name` into the cache (if not there yet); returns its weight file.

    An interrupted transfer is resumed up to `retries` times at once; when it still fails,
    ``CACHE/NAME.zip.part`` stays so that the next call resumes it. A zip whose SHA-256 differs from
    the one recorded in RELEASES, or that is corrupt, is deleted.
    """
    _check_name(name)
    root = cache_dir(cache)
    if (found := cached_weights(name, root)) is not None:
        return found
    url = release_url(name, base_url)
    root.mkdir(parents=True, exist_ok=True)
    zip_path = root / f'{name}.zip'
    with _lock(root):
        if (found := cached_weights(name, root)) is not None:  # another process finished meanwhile
            return found
        log.info('downloading %s from %s', name, url)
        try:
            fetch_url(url, zip_path, desc=name, progress=progress, retries=retries)
        except InterruptedDownload:
            raise
        except DownloadError as e:
            raise DownloadError(f'{e}. Without network access, download {url} elsewhere, unzip it and '
                                'pass the path of the .pth inside instead of the name.') from None
        try:
            if RELEASES[name].sha256:
                _check_sha256(zip_path, name, url, RELEASES[name].sha256)
            _check_zip(zip_path, name, url)
            weights = _unpack(zip_path, name, root / name)
        finally:
            zip_path.unlink(missing_ok=True)
    log.info('%s: cached at %s', name, weights)
    return weights


def resolve_weights(name: str, trust: bool = False, cache: str | Path | None = None) -> Path:
    """The weight file of a released model: from the cache, else downloaded into it.

    `trust` is accepted for symmetry with loading; downloading never unpickles anything.
    """
    del trust
    return download(name, cache=cache)



def weights_path(name_or_path: str | Path, cache: str | Path | None = None) -> Path:
    """A weight file given as a path, or a released name resolved through the cache.

    A missing argument that looks like a path (a folder part or a weight-file suffix) is reported as
    a missing file; anything else is looked up as a released name (unknown names get a hint).
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if path.suffix in WEIGHT_SUFFIXES or len(path.parts) > 1:
        raise FileNotFoundError(f'{name_or_path}: no such weight file')
    return resolve_weights(str(name_or_path), cache=cache)


def list_releases(cache: str | Path | None = None) -> list[tuple[str, str, Path | None]]:
    """(name, tag, cached weight file or None) for every released model."""
    return [(name, release.tag, cached_weights(name, cache)) for name, release in RELEASES.items()]

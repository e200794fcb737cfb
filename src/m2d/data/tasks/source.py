"""A dataset's source as its publisher ships it: folders, zip archives (read in place) and tar
archives (tar, tar.gz, tgz: unpacked member by member into a work folder, since they cannot be read
at random). Several parts form one source (NSynth comes as three archives); every file has a POSIX
name relative to the top of its part."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

from ...audio import AUDIO_SUFFIXES
from ...fileio import is_temporary
from .spec import DatasetError

log = logging.getLogger(__name__)

# Members of a tar archive worth unpacking: audio and the small metadata files rules read.
_KEEP = tuple(AUDIO_SUFFIXES) + ('.au', '.csv', '.txt', '.json', '.tsv')


def is_zip(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


class Source:
    """The union of folders and archives. `names`: every file; `src_path(name)`: a path the audio
    reader takes (a zip member is ``ZIP/member``, read by `read_member`)."""

    def __init__(self, paths: list[Path], work: Path, progress: bool = True):
        self.paths = [Path(p) for p in paths]
        self.where: dict[str, tuple[str, Path]] = {}  # name -> (kind, folder or zip)
        self.shown: dict[Path, Path] = {}  # the folder a tar archive was unpacked into -> the archive
        for path in self.paths:
            if path.is_dir():
                self._add_folder(path)
            elif is_zip(path):
                self._add_zip(path)
            elif path.is_file() and _is_tar(path):
                into = work / re.sub(r'\.(tar(\.\w+)?|tgz)$', '', path.name)
                self.shown[into] = path
                self._add_folder(self._unpack_tar(path, into, progress))
            elif path.exists():
                raise DatasetError(f'{path}: not a folder, zip or tar archive')
            else:
                raise DatasetError(f'{path}: no such folder or archive')
        self.names = sorted(self.where)
        self.zips = sorted(str(p) for kind, p in set(self.where.values()) if kind == 'zip')

    def _add_folder(self, folder: Path) -> None:
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs.sort()
            rel = Path(root).relative_to(folder).as_posix()
            prefix = '' if rel == '.' else rel + '/'
            for name in files:
                if not is_temporary(name):
                    self.where.setdefault(prefix + name, ('folder', folder))

    def _add_zip(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        self.where.setdefault(info.filename, ('zip', path))
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DatasetError(f'{path}: a corrupt zip archive ({e})') from None

    @staticmethod
    def _unpack_tar(path: Path, into: Path, progress: bool) -> Path:
        """Unpack the audio and metadata members of a tar archive into the work folder `into`;
        members already there with their size are not unpacked again (a file cut short by a kill
        has another size, so it is unpacked anew)."""
        from tqdm import tqdm

        log.info('%s: unpacking into %s', path, into)
        try:
            with tarfile.open(path) as tar, tqdm(desc=f'unpack {path.name}', unit='file', leave=False,
                                                        disable=not progress) as bar:
                for m in tar:
                    name = m.name.lstrip('./')
                    if not m.isfile() or not name.lower().endswith(_KEEP) or '..' in Path(name).parts:
                        continue
                    out = into / name
                    if out.is_file() and out.stat().st_size == m.size:
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(out, 'wb') as dst:
                        shutil.copyfileobj(src, dst)
                    bar.update(1)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(f'{path}: a corrupt or truncated tar archive ({e})') from None
        into.mkdir(parents=True, exist_ok=True)
        return into

    def describe(self, name: str) -> str:
        """A readable path of `name`: under its part, or under the only part when it is absent."""
        if name in self.where:
            top = self.where[name][1]
            return f'{self.shown.get(top, top)}/{name}'
        return f'{self.paths[0]}/{name}' if len(self.paths) == 1 else name

    def src_path(self, name: str) -> Path:
        return self.where[name][1] / name

    def read_bytes(self, name: str) -> bytes:
        kind, top = self.where[name]
        if kind == 'zip':
            with zipfile.ZipFile(top) as z:
                return z.read(name)
        return (top / name).read_bytes()

    def find_root(self, marker: str) -> str | None:
        """The shortest prefix ('' or 'a/b/') under which a name matches `marker` in full."""
        pattern = re.compile(r'^(.*/)?(?:' + marker + r')$')
        roots = {m.group(1) or '' for m in map(pattern.match, self.names) if m}
        return min(roots, key=lambda r: (r.count('/'), r)) if roots else None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


_ZIPS: dict[str, zipfile.ZipFile] = {}


def read_member(zip_path: str, member: str, sample_rate: int):
    """A zip member's audio, mono at `sample_rate` (`m2d.audio.read_audio` on a temporary copy, so
    the same checks apply)."""
    import tempfile

    from ...audio import read_audio

    z = _ZIPS.get(zip_path)
    if z is None:
        z = _ZIPS[zip_path] = zipfile.ZipFile(zip_path)
    fd, tmp = tempfile.mkstemp(suffix=Path(member).suffix)
    try:
        with os.fdopen(fd, 'wb') as f, z.open(member) as src:
            shutil.copyfileobj(src, f)
        return read_audio(tmp, sample_rate)
    except zipfile.BadZipFile as e:
        raise DatasetError(f'{zip_path}/{member}: corrupt in the archive ({e})') from None
    finally:
        os.unlink(tmp)

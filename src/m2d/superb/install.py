"""Install the M2D upstream into an s3prl checkout, or remove it (no copy of M2D's code, no symlinks).

`install` writes ``s3prl/upstream/m2d/`` (three small files importing the installed `m2d` package)
and appends one import line to ``s3prl/hub.py``; running it again changes nothing. `uninstall`
removes that line and the files it wrote. Both can report what they would do (`dry_run`). Files are
written through `fileio.atomic_path`, so hub.py keeps its permissions.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..fileio import atomic_path
from . import SuperbError

log = logging.getLogger(__name__)

HUB_LINE = 'from s3prl.upstream.m2d.hubconf import *'

FILES = {
    '__init__.py': '',
    'expert.py': 'from m2d.superb.expert import CalcNormExpert, UpstreamExpert  # noqa: F401\n',
    'hubconf.py': (
        '"""M2D upstreams, provided by the installed `m2d` package."""\n'
        'from m2d.superb.expert import CalcNormExpert, UpstreamExpert\n\n\n'
        'def m2d(ckpt, *args, **kwargs):\n'
        '    """-k CKPT,MEAN,STD: an M2D weight file (or released name) and the task statistics."""\n'
        '    return UpstreamExpert(ckpt, *args, **kwargs)\n\n\n'
        'def m2d_calcnorm(ckpt, *args, **kwargs):\n'
        '    """Compute the task statistics to pass to the m2d upstream, then exit."""\n'
        '    return CalcNormExpert(ckpt, *args, **kwargs)\n'),
}


def s3prl_package(s3prl_root: str | Path) -> Path:
    """The folder holding hub.py: `root/s3prl` (a checkout) or `root` itself."""
    root = Path(s3prl_root).expanduser()
    for pkg in (root / 's3prl', root):
        if (pkg / 'hub.py').is_file():
            return pkg
    raise SuperbError(f'{s3prl_root}: no s3prl/hub.py here; give the root of an s3prl checkout')


def _has_hub_line(text: str) -> bool:
    return any(line.strip() == HUB_LINE for line in text.splitlines())


def install(s3prl_root: str | Path, dry_run: bool = False) -> tuple[Path, list[str]]:
    """Write `s3prl/upstream/m2d/` and register it in `s3prl/hub.py`.

    Returns (the upstream folder, the changes made — or that would be made with `dry_run`).
    """
    pkg = s3prl_package(s3prl_root)
    hub, upstream = pkg / 'hub.py', pkg / 'upstream' / 'm2d'
    changes = []
    if upstream.is_symlink():
        raise SuperbError(f'{upstream} is a symbolic link (the reference\'s manual install?); remove it first')
    for name, text in FILES.items():
        path = upstream / name
        if path.is_file() and path.read_text() == text:
            continue
        changes.append(f'{"replace" if path.exists() else "write"} {path}')
        if not dry_run:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    text = hub.read_text()
    if not _has_hub_line(text):
        changes.append(f'add "{HUB_LINE}" to {hub}')
        if not dry_run:
            with atomic_path(hub) as tmp:
                tmp.write_text(text + ('' if text.endswith('\n') or not text else '\n') + HUB_LINE + '\n')
    for change in changes:
        log.info('%s%s', 'would ' if dry_run else '', change)
    return upstream, changes


def uninstall(s3prl_root: str | Path, dry_run: bool = False) -> list[str]:
    """Remove the import line from hub.py and the files `install` wrote; returns the changes.

    Files in ``upstream/m2d`` that `install` did not write (or that were edited since) are left
    alone and reported as an error before anything is changed.
    """
    pkg = s3prl_package(s3prl_root)
    hub, upstream = pkg / 'hub.py', pkg / 'upstream' / 'm2d'
    foreign = []
    if upstream.is_symlink():
        foreign.append(upstream.name)
    elif upstream.is_dir():
        for path in sorted(upstream.iterdir()):
            if path.name == '__pycache__':
                continue
            if path.name not in FILES or not path.is_file() or path.read_text() != FILES[path.name]:
                foreign.append(path.name)
    if foreign:
        raise SuperbError(f'{upstream} holds files m2d did not write ({", ".join(foreign)}); '
                          'remove them by hand, then run uninstall again')
    changes = []
    text = hub.read_text()
    if _has_hub_line(text):
        changes.append(f'remove "{HUB_LINE}" from {hub}')
        if not dry_run:
            kept = [line for line in text.splitlines(keepends=True) if line.strip() != HUB_LINE]
            with atomic_path(hub) as tmp:
                tmp.write_text(''.join(kept))
    if upstream.is_dir():
        changes.append(f'remove {upstream}')
        if not dry_run:
            shutil.rmtree(upstream)
    for change in changes:
        log.info('%s%s', 'would ' if dry_run else '', change)
    return changes

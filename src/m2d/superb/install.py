"""Install the M2D upstream into an s3prl checkout (no copy of M2D's code, no symlinks)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..fileio import atomic_path

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


def install(s3prl_root: str | Path) -> Path:
    """Write `s3prl/upstream/m2d/` and register it in `s3prl/hub.py`; returns the upstream folder."""
    root = Path(s3prl_root)
    pkg = root / 's3prl' if (root / 's3prl' / 'hub.py').exists() else root
    hub = pkg / 'hub.py'
    if not hub.is_file():
        raise FileNotFoundError(f'{s3prl_root}: no s3prl/hub.py here; give the root of an s3prl checkout')
    upstream = pkg / 'upstream' / 'm2d'
    upstream.mkdir(parents=True, exist_ok=True)
    for name, text in FILES.items():
        with atomic_path(upstream / name) as tmp:
            tmp.write_text(text)
    lines = hub.read_text()
    if HUB_LINE not in lines:
        with atomic_path(hub) as tmp:
            tmp.write_text(lines.rstrip('\n') + '\n' + HUB_LINE + '\n')
        log.info('registered the m2d upstream in %s', hub)
    return upstream

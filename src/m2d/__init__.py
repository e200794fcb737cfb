"""m2d: Masked Modeling Duo (M2D) audio representations.

    >>> import m2d
    >>> runtime = m2d.load('m2d_vit_base-80x608p16x16-221006-mr7')   # or a path to a .pth
    >>> features = runtime.encode(batch_audio)                      # [B, T', 3840]
"""

from __future__ import annotations

import logging
from pathlib import Path

from .runtime import RuntimeM2D

__version__ = '0.1.0'
__all__ = ['RuntimeM2D', 'load', '__version__']

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(name_or_path: str | Path, **kwargs) -> RuntimeM2D:
    """A RuntimeM2D from a weight file path, or from a released model name (downloaded once, cached)."""
    from .hub import weights_path

    return RuntimeM2D(weights_path(name_or_path), **kwargs)

"""m2d: Masked Modeling Duo (M2D) audio representations.

    >>> import m2d
    >>> runtime = m2d.load('m2d_vit_base-80x608p16x16-221006-mr7')   # or a path to a .pth
    >>> features = runtime.encode(batch_audio)                      # [B, T', 3840]
    >>> tagger = m2d.load('m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly')
    >>> probs = tagger.predict(batch_audio)                         # [B, 527]; names: tagger.classes
    >>> clap = m2d.load('m2d_clap_vit_base-80x608p16x16-240128')    # M2D-CLAP (pip install 'm2d[clap]')
    >>> sim = clap.similarity(clap.encode_audio(batch_audio), clap.encode_text(['dog barking can be heard']))
"""

from __future__ import annotations

import logging
from pathlib import Path

from .runtime import RuntimeM2D

__version__ = '0.1.0'
__all__ = ['RuntimeM2D', 'load', '__version__']

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(name_or_path: str | Path, **kwargs) -> RuntimeM2D:
    """A RuntimeM2D from a weight file path, or from a released model name (downloaded once, cached).

    A fine-tuned file (one with an EVAR head, e.g. ``m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly``)
    gets its head unless `num_classes` is given: ``runtime.predict(wav)`` returns class probabilities
    ``[B, C]`` and ``runtime.classes`` their names (AudioSet's 527 for EVAR's AudioSet heads).
    An M2D-CLAP file gives ``encode_audio``/``encode_text``/``similarity``; ``text_encoder=NAME_OR_DIR``
    replaces the text encoder its name says (`m2d.clap`).
    """
    from .checkpoint import load_checkpoint
    from .hub import weights_path

    ckpt = load_checkpoint(weights_path(name_or_path), trust=kwargs.pop('trust', False))
    head = ckpt.head.get('mlp.mlp.0.weight')
    if 'num_classes' not in kwargs and head is not None:
        kwargs['num_classes'] = int(head.shape[0])
    return RuntimeM2D(checkpoint=ckpt, **kwargs)

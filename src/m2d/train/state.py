"""Training checkpoints: the official container plus what an exact resume needs.

``checkpoint-{epoch}.pth`` (and ``checkpoint-last.pth``, the newest state) hold
``{'model': state_dict, 'optimizer', 'scaler', 'epoch', 'step', 'iter_in_epoch',
'iters_per_epoch', 'effective_batch_size', 'args': argparse.Namespace, 'rng'}`` -- only tensors,
numbers, strings and a Namespace, so ``torch.load(weights_only=True)`` with Namespace allow-listed
reads them, and `m2d.RuntimeM2D` loads them directly (the folder name gives the geometry).
``epoch`` counts completed epochs (as the reference); ``iter_in_epoch`` > 0 marks a mid-epoch state.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_checkpoint, torch_load

log = logging.getLogger(__name__)

LAST = 'checkpoint-last.pth'


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    out = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_version, 'state': torch.tensor(py_words, dtype=torch.int64),
                   'gauss_next': py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['cuda'] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    if 'torch' in states:
        torch.set_rng_state(states['torch'].cpu())
    if 'numpy' in states:
        n = states['numpy']
        np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                             n['cached_gaussian']))
    if 'python' in states:
        p = states['python']
        random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss_next']))
    if 'cuda' in states and torch.cuda.is_available():
        cuda = states['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def write(ckpt: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Write `ckpt` atomically as ``out_dir/name`` and make ``checkpoint-last.pth`` point at it."""
    path = save_checkpoint(ckpt, Path(out_dir) / name)
    if name != LAST:
        last = Path(out_dir) / LAST
        tmp = last.with_name(f'.{LAST}.tmp-link')
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(path, tmp)  # same bytes, no second write
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
    log.info('saved %s (epoch %s, step %d)', path, ckpt['epoch'], ckpt['step'])
    return path


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint file to resume from: a path, or 'auto' (``out_dir/checkpoint-last.pth`` if present)."""
    if not resume:
        return None
    if resume == 'auto':
        last = Path(out_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise FileNotFoundError(f'--resume {resume}: no such checkpoint file')
    return path


def load(path: Path) -> dict[str, Any]:
    """Read a training checkpoint safely (tensors + argparse.Namespace only)."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise ValueError(f'{path}: not a training checkpoint (expected a dict with "model")')
    return ckpt

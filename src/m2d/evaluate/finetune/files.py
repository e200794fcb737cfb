"""The fine-tuned file: its name, its content under EVAR's keys, and the best weights kept in memory
until they are written (once per ``--save_every`` epochs and at the end, atomically)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import Checkpoint, ModelName, save_checkpoint
from ...vit import WIDTHS
from ..tasks import Task
from .model import FinetuneModel

log = logging.getLogger(__name__)

CHECKPOINT_FILE = 'weights_best.pth'


def model_name(ckpt: Checkpoint) -> str:
    """Geometry name of the encoder, e.g. ``m2d_vit_base-80x608p16x16p16k``."""
    model = ckpt.model_name or 'm2d_vit_' + next((w for w, d in WIDTHS.items() if d[0] == ckpt.vit.embed_dim), 'custom')
    return ModelName(model, ckpt.vit.input_size, ckpt.vit.patch_size, ckpt.sample_rate).format()


def state_file(state: dict[str, torch.Tensor], classes: list[str], name: str, info: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned file's content from a `FinetuneModel` state dict: tensors under EVAR's keys
    (``module.ar.runtime.backbone.*`` in float32, ``module.head.*``), ``norm_stats`` and metadata."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k.startswith('runtime.backbone.'):
            out['module.ar.' + k] = v.detach().float().cpu()
        elif k.startswith('head.'):
            out['module.' + k] = v.detach().cpu()
    out['norm_stats'] = state['runtime.norm_stats'].detach().float().cpu()
    out['classes'] = [str(c) for c in classes]
    out['m2d_name'] = name
    out['m2d_finetune'] = json.dumps(info)
    return out


def finetuned_state(model: FinetuneModel, classes: list[str], name: str, info: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned file's content for `model` as it is now (see `state_file`)."""
    return state_file({k: v.clone() for k, v in model.state_dict().items()}, classes, name, info)


def checkpoint_path(output_dir: Path, name: str, task_name: str) -> Path:
    """``OUTPUT_DIR/<m2d_name>-<task>/weights_best.pth`` (the folder name tells the reference the geometry)."""
    slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', task_name).strip('_') or 'task'
    return output_dir / f'{name}-{slug}' / CHECKPOINT_FILE


def default_output_dir(weights: str | Path, task: Task) -> Path:
    """``eval/<weights-name>/<task>/finetune`` (the linear evaluation's folder, plus ``finetune``)."""
    from ..linear import weights_name

    return Path('eval') / weights_name(weights) / task.name / 'finetune'


class BestWeights:
    """The best-validation weights of a run, held in CPU memory and written to `path` by `flush`.

    EVAR saves a file on every improving epoch; a ViT-Base file is ~350 MB, so here `update` only
    copies the weights, and `flush` (every ``--save_every`` epochs and at the end) writes them
    atomically, and only when they changed since the last write.
    """

    def __init__(self, path: Path, classes: list[str], name: str, info: dict[str, Any]):
        self.path, self.classes, self.name, self.info = path, classes, name, info
        self.epoch, self.score = -1, float('-inf')
        self.state: dict[str, torch.Tensor] | None = None
        self.dirty, self.writes = False, 0

    def update(self, model: torch.nn.Module, epoch: int, score: float) -> None:
        """Keep a CPU copy of `model`'s weights as the best, from `epoch` with validation `score`."""
        self.state = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
        self.epoch, self.score, self.dirty = epoch, score, True

    def flush(self) -> bool:
        """Write the best weights if they changed since the last write; True when a file was written."""
        if not self.dirty or self.state is None:
            return False
        info = {**self.info, 'epoch': self.epoch, 'valid': self.score}
        save_checkpoint(state_file(self.state, self.classes, self.name, info), self.path)
        self.dirty, self.writes = False, self.writes + 1
        log.debug('wrote the best weights (epoch %d) to %s', self.epoch, self.path)
        return True

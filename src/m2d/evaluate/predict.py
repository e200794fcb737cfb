"""Top-k labels of audio files with a fine-tuned weight file (ours or EVAR's).

A file written by `m2d.evaluate.finetune` carries its class names, whether the task is
multi-label, and the unit length it was trained on; a file fine-tuned by the reference (EVAR)
carries none of these, so its classes are shown as indices (``#3``) and softmax is assumed unless
``multilabel=True`` is given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import M2DError
from ..runtime import RuntimeM2D

log = logging.getLogger(__name__)


class PredictError(M2DError, ValueError):
    """A weight file or input `predict` cannot use; the message names it."""


@dataclass
class Classifier:
    """A fine-tuned runtime with what its file says about its classes."""

    runtime: RuntimeM2D
    classes: list[str] | None        # None for a reference file: labels are class indices
    multilabel: bool
    unit_sec: float | None           # the training clips' length, if the file says
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.runtime.head.out_features

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes else f'#{index}'

    @torch.no_grad()
    def probabilities(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` at the model's rate -> probabilities ``[B, C]`` (sigmoid or softmax)."""
        logits = self.runtime(wav.to(self.runtime.norm_stats.device)).float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)


def load_classifier(path: str | Path, multilabel: bool | None = None, trust: bool = False) -> Classifier:
    """Load a fine-tuned file: EVAR's head keys are required; class names and settings are optional."""
    ckpt = load_checkpoint(path, trust=trust)
    w = ckpt.head.get('mlp.mlp.0.weight')
    if w is None:
        raise PredictError(f'{path}: not a fine-tuned file (no module.head.mlp.mlp.0.weight); fine-tune one with '
                           '`m2d finetune`')
    classes = ckpt.meta.get('classes')
    if classes is not None and (not isinstance(classes, (list, tuple)) or len(classes) != w.shape[0]):
        log.warning('%s: the class names do not match the %d head outputs; showing indices', path, w.shape[0])
        classes = None
    try:
        info = json.loads(ckpt.meta.get('m2d_finetune') or '{}')
    except (TypeError, ValueError):
        info = {}
    runtime = RuntimeM2D(checkpoint=ckpt, num_classes=int(w.shape[0]))
    ml = bool(info.get('multilabel', False)) if multilabel is None else multilabel
    unit = info.get('unit_sec')
    return Classifier(runtime, [str(c) for c in classes] if classes else None, ml,
                      float(unit) if unit else None, info)


def predict_files(clf: Classifier, files: list[str | Path], top: int = 5, unit_sec: float | None = None,
                  device: str | torch.device = 'cpu') -> list[dict[str, Any]]:
    """Top-`top` labels of each file: ``[{'file', 'top': [{'label', 'index', 'probability'}, ...]}]``.

    Each file is read at the model's rate and cropped/zero-padded to `unit_sec` (default the length the
    model was fine-tuned on; ``0`` or no stored length: the whole file).
    """
    from tqdm.auto import tqdm

    from ..audio import AudioError, load_audio

    clf.runtime.to(device).eval()
    sr = clf.runtime.sample_rate
    unit = clf.unit_sec if unit_sec is None else unit_sec
    n = int(round(unit * sr)) if unit else None
    top = max(1, min(top, clf.num_classes))
    out = []
    for f in tqdm(files, desc='predict', unit='file', disable=len(files) < 10, leave=False):
        try:
            wav = load_audio(f, sr)
        except AudioError as e:
            raise PredictError(str(e)) from None
        if n is not None:
            wav = wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))
        p = clf.probabilities(torch.from_numpy(np.ascontiguousarray(wav))[None])[0].cpu()
        values, idx = p.topk(top)
        out.append({'file': str(f), 'top': [{'label': clf.label(int(i)), 'index': int(i), 'probability': float(v)}
                                            for v, i in zip(values, idx)]})
    return out

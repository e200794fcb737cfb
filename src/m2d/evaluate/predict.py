"""Labels of audio files with a fine-tuned weight file (ours, EVAR's, or a released AS-FT model).

A file written by `m2d.evaluate.finetune` carries its class names, whether the task is
multi-label, and the unit length it was trained on. A file fine-tuned by the reference (EVAR)
carries none of these: a 527-output head is EVAR's AudioSet fine-tuning (the released
``*_AS-FT_enconly`` weights), scored multi-label with AudioSet's names (`m2d.labels`); other heads
show class indices (``#3``) and softmax unless ``multilabel=True`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import M2DError
from ..labels import head_labels
from ..runtime import RuntimeM2D

log = logging.getLogger(__name__)


class PredictError(M2DError, ValueError):
    """A weight file or input `predict` cannot use; the message names it."""


@dataclass
class Classifier:
    """A fine-tuned runtime with what its file says about its classes."""

    runtime: RuntimeM2D
    classes: list[str] | None        # None for a reference file of unknown classes: labels are indices
    multilabel: bool
    unit_sec: float | None           # the training clips' length, if the file says
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.runtime.head.out_features

    @property
    def window_samples(self) -> int:
        """Samples of one model input (e.g. 160,000 for 80x1001 frames at 16 kHz: 10 s)."""
        return (self.runtime.cfg.input_size[1] - 1) * self.runtime.to_spec.config.hop_length

    def label(self, index: int) -> str:
        return self.classes[index] if self.classes else f'#{index}'

    @torch.no_grad()
    def probabilities(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` at the model's rate -> probabilities ``[B, C]`` (sigmoid or softmax)."""
        return self.runtime.predict(wav).float()


def as_classifier(model: Classifier | RuntimeM2D) -> Classifier:
    """A Classifier, or one around a runtime with a head (e.g. from ``m2d.load`` on a fine-tuned file)."""
    if isinstance(model, Classifier):
        return model
    if not hasattr(model, 'head'):
        raise PredictError(f'{model.weight_file}: this runtime has no classification head; load a fine-tuned file')
    return Classifier(model, model.classes, model.multilabel, None)


def load_classifier(path: str | Path, multilabel: bool | None = None, trust: bool = False,
                    bf16: bool = False) -> Classifier:
    """Load a fine-tuned file (a path, or a released name such as ``..._AS-FT_enconly``, downloaded once).

    EVAR's head keys are required; class names and settings are optional (`m2d.labels.head_labels`).
    `multilabel` overrides what the file says or implies.
    """
    from ..hub import weights_path

    ckpt = load_checkpoint(weights_path(path), trust=trust)
    w = ckpt.head.get('mlp.mlp.0.weight')
    if w is None:
        raise PredictError(f'{path}: this weight file has no classification head (module.head.mlp.mlp.0.weight); '
                           'use `m2d encode` for its features, or fine-tune it with `m2d finetune`')
    runtime = RuntimeM2D(checkpoint=ckpt, num_classes=int(w.shape[0]), bf16=bf16)
    if multilabel is not None:
        runtime.multilabel = multilabel
    labels = head_labels(ckpt.meta, int(w.shape[0]), ckpt.path.name)
    if labels.source == 'audioset':
        log.info('%s: a 527-class head without names: AudioSet classes, multi-label', ckpt.path.name)
    return Classifier(runtime, runtime.classes, runtime.multilabel, labels.unit_sec, labels.info)


def crop_or_pad(wav: np.ndarray, n: int) -> np.ndarray:
    """The first `n` samples of `wav`, zero-padded on the right when shorter."""
    return wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))


def top_labels(clf: Classifier, p: torch.Tensor, top: int) -> list[dict[str, Any]]:
    """``[{'label', 'index', 'probability'}]`` of the `top` largest entries of one probability row."""
    values, idx = p.topk(max(1, min(top, clf.num_classes)))
    return [{'label': clf.label(int(i)), 'index': int(i), 'probability': float(v)} for v, i in zip(values, idx)]


def predict_files(clf: Classifier, files: list[str | Path], top: int = 5, unit_sec: float | None = None,
                  device: str | torch.device = 'cpu') -> tuple[list[dict[str, Any]], list[str]]:
    """Top-`top` labels of each file: ``([{'file', 'top': [{'label', 'index', 'probability'}]}], failures)``.

    Each file is read at the model's rate and cropped/zero-padded to `unit_sec` (default the length the
    model was fine-tuned on; ``0`` or no stored length: the whole file). A file that cannot be read is
    skipped; `failures` holds one line per such file (naming it).
    """
    from tqdm.auto import tqdm

    from ..audio import AudioError, read_audio

    clf.runtime.to(device).eval()
    sr = clf.runtime.sample_rate
    unit = clf.unit_sec if unit_sec is None else unit_sec
    n = int(round(unit * sr)) if unit else None
    out, failures = [], []
    for f in tqdm(files, desc='predict', unit='file', disable=len(files) < 10, leave=False):
        try:
            wav = read_audio(f, sr)
        except AudioError as e:
            failures.append(str(e))
            continue
        if n is not None:
            wav = crop_or_pad(wav, n)
        p = clf.probabilities(torch.from_numpy(np.ascontiguousarray(wav))[None])[0].cpu()
        out.append({'file': str(f), 'top': top_labels(clf, p, top)})
    return out, failures

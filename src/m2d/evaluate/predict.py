"""Labels of audio files with a fine-tuned weight file (ours, EVAR's, or a released AS-FT model).

A file written by `m2d.evaluate.finetune` carries its class names, whether the task is
multi-label, and the unit length it was trained on. A file fine-tuned by the reference (EVAR)
carries none of these: a 527-output head is EVAR's AudioSet fine-tuning (the released
``*_AS-FT_enconly`` weights), scored multi-label with AudioSet's names (`m2d.labels`); other heads
show class indices (``#3``) and softmax unless ``multilabel=True`` is given.

An M2D-CLAP file classifies zero-shot with any labels (`ZeroShotClassifier`): each label's caption
(``{label} can be heard``) is embedded by the CLAP text encoder, and a clip scores each label by
the cosine between the CLAP audio and text embeddings; probabilities are the softmax over the labels
of ``exp(logit_scale) * cosine``.
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


class _ModelWindow:
    """What a timeline needs of a classifier around `runtime`: the length of one model input."""

    runtime: RuntimeM2D

    @property
    def window_samples(self) -> int:
        """Samples of one model input (e.g. 160,000 for 80x1001 frames at 16 kHz: 10 s)."""
        return (self.runtime.cfg.input_size[1] - 1) * self.runtime.to_spec.config.hop_length


@dataclass
class Classifier(_ModelWindow):
    """A fine-tuned runtime with what its file says about its classes."""

    runtime: RuntimeM2D
    classes: list[str] | None        # None for a reference file of unknown classes: labels are indices
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
        return self.runtime.predict(wav).float()

    def scores(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'p': [B, C]}``: what a timeline keeps per window."""
        return {'p': self.probabilities(wav)}


@dataclass
class ZeroShotClassifier(_ModelWindow):
    """An M2D-CLAP runtime with the text embeddings of a label set: zero-shot classification."""

    runtime: RuntimeM2D
    classes: list[str]               # the labels as given
    captions: list[str]              # what the text encoder read for each label
    text_embeddings: torch.Tensor    # [C, D] CLAP text embeddings of the captions
    multilabel: bool = False
    unit_sec: float | None = None    # clips are scored whole
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, index: int) -> str:
        return self.classes[index]

    @torch.no_grad()
    def scores(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'similarity': cosines [B, C], 'p': probabilities [B, C]}`` of waveforms ``[B, samples]``."""
        audio = self.runtime.encode_audio(wav.to(self.runtime.norm_stats.device))
        sim = self.runtime.similarity(audio, self.text_embeddings.to(audio.device))
        return {'similarity': sim, 'p': self.runtime.zero_shot_probabilities(sim)}

    def probabilities(self, wav: torch.Tensor) -> torch.Tensor:
        """Softmax over the labels of ``exp(logit_scale) * cosine`` ``[B, C]``."""
        return self.scores(wav)['p']


def read_labels(labels: str | None = None, labels_file: str | Path | None = None) -> list[str]:
    """Labels from a comma-separated string and/or a file of one label a line (blank lines skipped)."""
    out = [x.strip() for x in labels.split(',')] if labels else []
    if labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise PredictError(f'--labels_file {path}: no such file')
        try:
            out += [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
        except UnicodeDecodeError:
            raise PredictError(f'--labels_file {path}: not a UTF-8 text file (one label a line)') from None
    out = [x for x in out if x]
    if not out:
        raise PredictError('--labels: no labels given (a comma-separated list, or --labels_file with one a line)')
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise PredictError(f'--labels: {dup[0]!r} is given twice')
    return out


def load_zero_shot(path: str | Path, labels: list[str], template: str | None = None,
                   text_encoder: str | Path | None = None, trust: bool = False, bf16: bool = False,
                   device: str | torch.device = 'cpu') -> ZeroShotClassifier:
    """Zero-shot classifier over `labels` from an M2D-CLAP file (a path or a released name): captions by
    `template` (default ``{label} can be heard``, ``_`` made a space, as the reference's ESC-50 notebook),
    embedded once by the text encoder the file's name says (or `text_encoder`: a type letter, a hub
    name or a local folder)."""
    from ..clap import DEFAULT_TEMPLATE, captions
    from ..hub import weights_path

    ckpt = load_checkpoint(weights_path(path), trust=trust)
    runtime = RuntimeM2D(checkpoint=ckpt, bf16=bf16, text_encoder=text_encoder)
    if not runtime.is_clap:
        raise PredictError(f'{path}: --labels needs an M2D-CLAP weight file (one with audio_proj), '
                           'e.g. m2d_clap_vit_base-80x608p16x16-240128')
    runtime.to(device).eval()
    texts = captions(labels, template or DEFAULT_TEMPLATE)
    with torch.inference_mode():
        emb = runtime.encode_text(texts)
    return ZeroShotClassifier(runtime, list(labels), texts, emb.detach().clone(),
                              info={'template': template or DEFAULT_TEMPLATE, 'clap_scale': runtime.clap_scale})


def as_classifier(model: Classifier | ZeroShotClassifier | RuntimeM2D) -> Classifier | ZeroShotClassifier:
    """A Classifier, or one around a runtime with a head (e.g. from ``m2d.load`` on a fine-tuned file)."""
    if isinstance(model, (Classifier, ZeroShotClassifier)):
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
    if w is None and any(k.startswith('audio_proj.') for k in ckpt.clap):
        raise PredictError(f'{path}: an M2D-CLAP weight file has no classification head; give labels to classify '
                           'zero-shot (--labels "dog,rain" or --labels_file)')
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


def top_labels(clf: Classifier | ZeroShotClassifier, p: torch.Tensor, top: int,
               similarity: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """``[{'label', 'index', 'probability'}]`` of the `top` largest entries of one probability row; with
    a `similarity` row (zero-shot), ordered by it and each entry with its ``'similarity'``."""
    k = max(1, min(top, clf.num_classes))
    idx = (similarity if similarity is not None else p).topk(k).indices
    rows = []
    for i in idx.tolist():
        row = {'label': clf.label(i), 'index': i}
        if similarity is not None:
            row['similarity'] = float(similarity[i])
        row['probability'] = float(p[i])
        rows.append(row)
    return rows


def predict_files(clf: Classifier | ZeroShotClassifier, files: list[str | Path], top: int = 5,
                  unit_sec: float | None = None,
                  device: str | torch.device = 'cpu') -> tuple[list[dict[str, Any]], list[str]]:
    """Top-`top` labels of each file: ``([{'file', 'top': [{'label', 'index', 'probability'}]}], failures)``
    (zero-shot: also ``'similarity'``, the entries ordered by it).

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
        scores = clf.scores(torch.from_numpy(np.ascontiguousarray(wav))[None])
        sim = scores['similarity'][0].cpu() if 'similarity' in scores else None
        out.append({'file': str(f), 'top': top_labels(clf, scores['p'][0].cpu(), top, sim)})
    return out, failures

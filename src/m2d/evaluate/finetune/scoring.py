"""EVAR's fine-tuning loss and the task metric on logits."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import metrics

def evar_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """BCE with logits (multi-label), else EVAR's ``-mean(y * log_softmax(logits))`` over ``[B, C]``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * F.log_softmax(logits, dim=-1)).mean()


def evaluate_scores(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """The task's metric from logits and ``[N, C]`` targets: mAP (multi-label) or accuracy."""
    return metrics.score(targets if multilabel else targets.argmax(1), logits, multilabel)


def class_accuracy(logits: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Per-class accuracy of a single-label task (classes that have test clips)."""
    acc = metrics.class_accuracy(targets.argmax(1), logits.argmax(1), len(classes))
    return {c: float(a) for c, a in zip(classes, acc) if not np.isnan(a)}

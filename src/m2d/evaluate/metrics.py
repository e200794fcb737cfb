"""Classification metrics of the evaluation reports: accuracy, mean average precision, per-class
results and the confusion matrix (numpy only; average precision as scikit-learn computes it)."""

from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of clips whose highest score is their class: `y_true` ``[N]`` ids, `scores` ``[N, C]``."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return float('nan')
    return float(np.mean(np.argmax(scores, axis=1) == y_true))


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision of one class: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds
    (tied scores form one threshold), as ``sklearn.metrics.average_precision_score``; NaN without positives."""
    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(y_true.sum())
    if n_pos == 0:
        return float('nan')
    order = np.argsort(-score, kind='mergesort')
    score, y_true = score[order], y_true[order]
    last_of_threshold = np.r_[np.nonzero(np.diff(score))[0], len(score) - 1]
    tps = np.cumsum(y_true)[last_of_threshold]
    fps = (last_of_threshold + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def class_average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision per class ``[C]`` (NaN for a class without positives)."""
    return np.array([average_precision(y_true[:, c], scores[:, c]) for c in range(y_true.shape[1])])


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """mAP of a multi-label task as EVAR computes it: ``average_precision_score(average=None).mean()``,
    the macro mean over all classes, where scikit-learn scores a class without positives 0 (its
    recall is set to one at every threshold). `y_true` ``[N, C]`` in {0, 1}, `scores` ``[N, C]``."""
    ap = class_average_precision(y_true, scores)
    return float(np.nan_to_num(ap, nan=0.0).mean()) if ap.size else float('nan')


def score(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    """The task's metric: mAP for multi-label tasks, else accuracy."""
    return mean_average_precision(y_true, scores) if multilabel else accuracy(y_true, scores)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class accuracy (recall) ``[C]``: correct / clips of the class; NaN for a class absent from `y_true`."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    total = cm.sum(axis=1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(total > 0, np.diag(cm) / np.maximum(total, 1), np.nan)

"""Figures of the evaluation reports (matplotlib, optional) and a small t-SNE for the embedding map.

Figures: the confusion matrix, a 2-D map of the test embeddings coloured by class (PCA to 50
dimensions, then exact t-SNE in numpy; at most 600 clips), and the accuracy against the layer
index with ``--per_layer``. Without matplotlib, `report_figures` returns no figure and leaves a note
in the report instead of failing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_path

log = logging.getLogger(__name__)

MAX_MAP_POINTS = 600


# ---------------------------------------------------------------------------------------------
# 2-D maps


def pca(x: np.ndarray, k: int) -> np.ndarray:
    """Project ``[N, D]`` onto its first `k` principal components ``[N, min(k, N, D)]``."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=0)
    n, d = x.shape
    k = min(k, n, d)
    if n <= d:  # eigenvectors of the smaller Gram matrix: X X^T = U S^2 U^T, projections U S
        w, u = np.linalg.eigh((x @ x.T).astype(np.float64))
        top = np.argsort(w)[::-1][:k]
        return u[:, top] * np.sqrt(np.maximum(w[top], 0.0))
    w, v = np.linalg.eigh((x.T @ x).astype(np.float64))
    top = np.argsort(w)[::-1][:k]
    return x @ v[:, top]


def _affinities(x: np.ndarray, perplexity: float, tol: float = 1e-5, steps: int = 64) -> np.ndarray:
    """Symmetric t-SNE input affinities P ``[N, N]``: per point, a Gaussian whose entropy matches `perplexity`."""
    n = len(x)
    sq = np.square(x).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        lo, hi, beta = 0.0, np.inf, 1.0
        di = np.delete(d[i], i)
        for _ in range(steps):
            w = np.exp(-(di - di.min()) * beta)
            sw = w.sum()
            h = np.log(sw) + beta * np.sum((di - di.min()) * w) / sw  # entropy of the row
            if abs(h - target) < tol:
                break
            if h > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = w / sw
    p = (p + p.T) / (2 * n)
    return np.maximum(p, 1e-12)


def tsne(x: np.ndarray, perplexity: float = 30.0, iterations: int = 500, seed: int = 0) -> np.ndarray:
    """Exact t-SNE of ``[N, D]`` to ``[N, 2]`` (PCA to 50-d first; early exaggeration 12 for 100
    iterations; gradient descent with momentum and per-coordinate gains, as van der Maaten's)."""
    n = len(x)
    if n < 5:
        return pca(x, 2) if n > 1 else np.zeros((n, 2))
    y0 = pca(x, 50)
    y0 = y0 / (np.abs(y0).max() + 1e-12)
    p = _affinities(y0, min(perplexity, (n - 1) / 3))
    rng = np.random.default_rng(seed)
    y = rng.normal(scale=1e-4, size=(n, 2))
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    lr = max(n / 12.0, 50.0)
    for it in range(iterations):
        exaggeration = 12.0 if it < 100 else 1.0
        momentum = 0.5 if it < 250 else 0.8
        sq = np.square(y).sum(1)
        num = 1.0 / (1.0 + np.maximum(sq[:, None] + sq[None, :] - 2 * y @ y.T, 0.0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        pq = (exaggeration * p - q) * num
        grad = 4.0 * (pq.sum(1)[:, None] * y - pq @ y)  # sum_j pq_ij (y_i - y_j)
        same = np.sign(grad) == np.sign(velocity)
        gains = np.clip(np.where(same, gains * 0.8, gains + 0.2), 0.01, None)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
        y = y - y.mean(axis=0)
    return y


# ---------------------------------------------------------------------------------------------
# figures


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches='tight')
    return path.name


def confusion_figure(cm: np.ndarray, classes: list[str], title: str):
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    C = len(classes)
    size = min(max(4.0, 0.35 * C + 2), 14)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
    if C <= 40:
        ax.set_xticks(range(C), classes, rotation=90 if max(len(c) for c in classes) > 3 else 0, fontsize=8)
        ax.set_yticks(range(C), classes, fontsize=8)
    if C <= 15:
        for i in range(C):
            for j in range(C):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if norm[i, j] > 0.5 else 'black')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title, fontsize=10)
    return fig


def map_figure(points: np.ndarray, labels: list[str], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    names = sorted(set(labels))
    colors = _colors(len(names))
    for name, color in zip(names, colors):
        sel = np.array([lab == name for lab in labels])
        ax.scatter(points[sel, 0], points[sel, 1], s=10, color=color, label=name, alpha=0.8, linewidths=0)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc='center left', bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps['tab10' if n <= 10 else 'tab20' if n <= 20 else 'turbo']
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def layer_figure(per_layer: list[dict], baselines: dict[str, dict], metric: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    layers = [r['layer'] for r in per_layer]
    ax.errorbar(layers, [100 * r['mean'] for r in per_layer], yerr=[100 * r['std'] for r in per_layer], marker='o',
                capsize=3, label='model, one layer')
    for (name, entry), style in zip(baselines.items(), ('--', ':')):
        ax.axhline(100 * entry['mean'], linestyle=style, color='gray', label=name)
    ax.set_xlabel('layer')
    ax.set_ylabel(f'test {metric} (%)')
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def report_figures(report: dict[str, Any], out: Path, task, emb) -> dict[str, str]:
    """Draw the report's figures into `out`; returns {figure: file name}. Without matplotlib: {} and
    ``report['figures_note']`` says why."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report['figures_note'] = 'figures skipped: matplotlib is not installed (pip install matplotlib)'
        log.warning('%s', report['figures_note'])
        return {}
    name = f'{report["weights_name"]} on {task.name}'
    figures = {}
    try:
        if report.get('confusion_matrix') is not None:
            figures['confusion'] = _save(confusion_figure(report['confusion_matrix'], task.classes,
                                                          f'confusion (seed {report["settings"]["seed"]}): {name}'),
                                         out / 'confusion.png')
        test = task.split('test')
        x, present = emb.features(test, report['settings']['layers'])
        labels = [c.labels[0] for c, ok in zip(test, present) if ok]
        if len(x) > MAX_MAP_POINTS:
            keep = np.sort(np.random.default_rng(0).choice(len(x), MAX_MAP_POINTS, replace=False))
            x, labels = x[keep], [labels[i] for i in keep]
        if len(x) >= 2:
            x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
            figures['map'] = _save(map_figure(tsne(x), labels, f't-SNE of the test embeddings: {name}'),
                                   out / 'embedding_map.png')
        if report.get('per_layer'):
            base = {k: report[k] for k in ('random', 'logmel') if k in report}
            base = {('random encoder' if k == 'random' else 'log-mel'): v for k, v in base.items()}
            figures['per_layer'] = _save(layer_figure(report['per_layer'], base, report['metric'], name),
                                         out / 'per_layer.png')
    except Exception as e:  # a figure must never cost the report
        report['figures_note'] = f'some figures failed: {type(e).__name__}: {e}'
        log.warning('%s', report['figures_note'])
    return figures

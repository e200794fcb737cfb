"""Figures of the demo report: training curves from a run's ``log.jsonl`` and the M2D mask of one input.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed). Every
function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..fileio import atomic_path

log = logging.getLogger(__name__)


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The 'train' (per logged step) and 'epoch' records of a run's ``log.jsonl`` (cut lines skipped)."""
    train, epochs = [], []
    for line in Path(path).read_text(encoding='utf-8').splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (train if rec.get('type') == 'train' else epochs if rec.get('type') == 'epoch' else []).append(rec)
    return train, epochs


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches='tight')
    return path


def loss_figure(train: list[dict], path: Path) -> Path:
    """Training loss against the step (the logged averages of `log.jsonl`)."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    steps = [r['step'] for r in train]
    ax.plot(steps, [r['loss'] for r in train], color='tab:blue')
    ax.set(xlabel='step', ylabel='loss', title='M2D pre-training loss')
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rank_figure(epochs: list[dict], path: Path, max_rank: int | None = None) -> Path:
    """Effective rank (RankMe) of the encoder's patch features against the epoch."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    pts = [(r['epoch'], r['effective_rank']) for r in epochs if 'effective_rank' in r]
    if pts:
        ax.plot(*zip(*pts), marker='o', color='tab:green')
    if max_rank:
        ax.axhline(max_rank, color='grey', linestyle=':', label=f'feature width {max_rank}')
        ax.legend(loc='lower right')
    ax.set(xlabel='epoch', ylabel='effective rank', title='RankMe of patch features (collapse monitor)')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def mask_figure(lms: np.ndarray, patch: tuple[int, int], mask_ratio: float, path: Path, seed: int = 0,
                title: str = '') -> Path:
    """One input with the mask M2D draws for it (`m2d.masking.random_mask`, as in pre-training).

    `lms` ``[F, T]`` (normalized or not) is cropped to whole patches. Three panels: the input with
    its patch grid, the visible patches the online encoder sees (masked ones blanked), and the
    masked patches the target encoder encodes (visible ones blanked).
    """
    import torch

    from ..masking import random_mask

    ph, pw = patch
    fp, tp = lms.shape[0] // ph, lms.shape[1] // pw
    x = lms[:fp * ph, :tp * pw]
    mask = random_mask(1, fp * tp, mask_ratio, generator=torch.Generator().manual_seed(seed))
    masked = mask.binary()[0].reshape(fp, tp).numpy().astype(bool)  # patch order is frequency-major
    pixel = np.kron(masked, np.ones((ph, pw), dtype=bool))
    vmin, vmax = np.percentile(x, 1), np.percentile(x, 99.5)
    panels = [
        (x, f'input log-mel {x.shape[0]}x{x.shape[1]} ({fp}x{tp} patches of {ph}x{pw})'),
        (np.where(pixel, np.nan, x), f'online encoder: {mask.len_keep} visible patches'),
        (np.where(pixel, x, np.nan), f'target encoder: {mask.num_masked} masked patches ({mask_ratio:.0%})'),
    ]
    fig = _figure(6.5, 7.5)
    for i, (img, name) in enumerate(panels):
        ax = fig.add_subplot(3, 1, i + 1)
        ax.set_facecolor('#d9d9d9')
        ax.imshow(img, origin='lower', aspect='auto', vmin=vmin, vmax=vmax, cmap='magma', interpolation='nearest')
        for f in range(1, fp):
            ax.axhline(f * ph - 0.5, color='white', linewidth=0.4, alpha=0.6)
        for t in range(1, tp):
            ax.axvline(t * pw - 0.5, color='white', linewidth=0.4, alpha=0.6)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel('mel bin')
    ax.set_xlabel('frame (10 ms)')
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)

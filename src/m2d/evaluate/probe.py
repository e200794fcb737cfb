"""The linear probe of EVAR's protocol: logistic regression on standardized clip embeddings.

Features are standardized with the train split's mean and std (a constant feature keeps scale 1,
as scikit-learn's StandardScaler). One ``nn.Linear`` is trained with Adam (lr 3e-5 by default,
batch 128, up to 200 epochs) on cross-entropy, or on binary cross-entropy for multi-label tasks;
after every epoch the validation metric (accuracy or mAP) is measured, and the weights of the best
epoch are kept — a tie counts as an improvement, as in EVAR, so the later epoch wins — until 20
epochs pass without one. The test split is scored with those weights. `probe` repeats this for
several seeds (initialization and batch order) and reports mean, std and each seed's result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics

log = logging.getLogger(__name__)

SMALL_PROBLEM = 1 << 20  # features x classes below which a CPU probe runs on one thread


@dataclass
class Split:
    """Features ``[N, D]`` and targets (``[N]`` class ids, or ``[N, C]`` {0,1} when multi-label)."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Fit:
    """One trained probe: test result, best epoch, curves, test scores ``[N, C]``."""

    test: float
    valid: float
    best_epoch: int          # 1-based
    epochs_run: int
    test_scores: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train_loss, valid
    seconds: float = 0.0


@dataclass
class ProbeResult:
    """Results over seeds: ``mean``/``std``/``per_seed`` of the test metric, and every fit."""

    metric: str
    per_seed: list[float]
    fits: list[Fit]
    seeds: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_seed))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else 0.0

    def summary(self) -> dict:
        """``{'mean', 'std', 'per_seed'}`` as written in report.json."""
        return {'mean': self.mean, 'std': self.std, 'per_seed': [float(v) for v in self.per_seed]}

    def __str__(self) -> str:
        return f'{100 * self.mean:.2f} ± {100 * self.std:.2f} % ({self.metric}, {len(self.per_seed)} seeds)'


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the mean and std of `train` (per feature; std 0 -> 1)."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _evaluate(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).float()


def fit_linear(train: Split, valid: Split, test: Split, *, multilabel: bool, n_classes: int, lr: float = 3e-5,
               epochs: int = 200, patience: int = 20, batch_size: int = 128, seed: int = 0,
               device: str | torch.device = 'cpu', progress: bool = False, desc: str = 'linear') -> Fit:
    """Train one logistic regression on standardized features; test with the best-validation weights."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    small = train.x.shape[1] * n_classes < SMALL_PROBLEM
    if dev.type == 'cpu' and small:  # thread hand-offs cost more than these small matmuls (10x on a busy CPU)
        torch.set_num_threads(1)
    try:
        return _fit(train, valid, test, multilabel=multilabel, n_classes=n_classes, lr=lr, epochs=epochs,
                    patience=patience, batch_size=batch_size, seed=seed, device=dev, progress=progress, desc=desc)
    finally:
        torch.set_num_threads(threads)


def _fit(train: Split, valid: Split, test: Split, *, multilabel: bool, n_classes: int, lr: float, epochs: int,
         patience: int, batch_size: int, seed: int, device: torch.device, progress: bool, desc: str) -> Fit:
    from tqdm import tqdm

    t0 = time.perf_counter()
    xtr, xva, xte = standardize(train.x, valid.x, test.x)
    dev = device
    xtr, xva, xte = (torch.from_numpy(a).to(dev) for a in (xtr, xva, xte))
    ytr = torch.from_numpy(train.y).to(dev)
    ytr = ytr.float() if multilabel else ytr.long()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(xtr.shape[1], n_classes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy

    best, best_state, best_epoch, wait, history = -np.inf, None, 0, 0, []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit='epoch', disable=not progress, leave=False, dynamic_ncols=True)
    epoch = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xtr), generator=gen).to(dev)
        total = 0.0
        for i in range(0, len(xtr), batch_size):
            idx = order[i:i + batch_size]
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val = metrics.score(valid.y, _evaluate(model, xva).cpu().numpy(), multilabel)
        history.append({'epoch': epoch, 'train_loss': total / len(xtr), 'valid': val})
        bar.set_postfix(loss=f'{total / len(xtr):.4f}', valid=f'{val:.4f}', refresh=False)
        if val >= best or best_state is None:  # ties move to the later epoch (EVAR)
            best, best_epoch, wait = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            wait += 1
            if wait >= patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    scores = _evaluate(model, xte)
    scores = (torch.sigmoid(scores) if multilabel else torch.softmax(scores, dim=1)).cpu().numpy()
    result = metrics.score(test.y, scores, multilabel)
    log.debug('%s seed %d: test %.4f, best valid %.4f at epoch %d of %d', desc, seed, result, best, best_epoch, epoch)
    return Fit(test=result, valid=float(best), best_epoch=best_epoch, epochs_run=epoch, test_scores=scores,
               history=history, seconds=time.perf_counter() - t0)


def probe(train: Split, valid: Split, test: Split, *, multilabel: bool, n_classes: int, seeds: int = 3,
          seed: int = 0, progress: bool = False, desc: str = 'linear', **options) -> ProbeResult:
    """`fit_linear` with seeds ``seed, seed+1, ...``; options as `fit_linear` (lr, epochs, patience, ...)."""
    seed_list = [seed + i for i in range(seeds)]
    fits = [fit_linear(train, valid, test, multilabel=multilabel, n_classes=n_classes, seed=s, progress=progress,
                       desc=f'{desc} seed {s}', **options) for s in seed_list]
    result = ProbeResult('mAP' if multilabel else 'accuracy', [f.test for f in fits], fits, seed_list)
    log.info('%s: %s', desc, result)
    return result

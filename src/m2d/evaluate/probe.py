"""The linear probe of EVAR's protocol: its classifier, as EVAR's lineareval.py calls it.

EVAR trains ``TorchMLPClassifier2(hidden_layer_sizes=(), max_iter=200, learning_rate_init=lr,
early_stopping=True, n_iter_no_change=20, standard_scaler=True, mixup=False)`` (daisukelab's
general-learning). `fit_linear` does the same, step for step:

- **scaler**: standardized with the mean and (population) std of the training features given to
  the classifier, as scikit-learn's StandardScaler (a feature whose std is below 10 x float64 eps
  keeps scale 1); valid and test are transformed with the same statistics.
- **validation**: the task's valid split when it has one; otherwise (fold tasks) a random 10 % of
  the (already standardized) training features, drawn again until every class of the training
  part is present in it, at most 100 draws (``train_test_sure_split``).
- **model and optimizer**: one ``nn.Linear`` (PyTorch's init), Adam with betas (0.9, 0.999), eps
  1e-8 and weight decay 1e-8, lr 3e-5; batch ``min(200, N)`` (the classifier's ``'auto'``, N =
  training features given to it), shuffled every epoch, last batch kept.
- **loss**: single-label ``-mean(onehot * log_softmax(logits))`` over all N x C entries (the
  cross-entropy divided by C, which sets the scale against eps and weight decay); multi-label
  ``binary_cross_entropy(sigmoid(logits))``.
- **early stopping**: after each epoch the validation metric (accuracy, or mAP as scikit-learn's
  macro ``average_precision_score``) is compared with the best so far (starting at 0); ``>=`` is
  an improvement, so ties move to the later epoch; training stops at the 20th epoch in a row
  without one, or after 200 epochs. The test split is scored with the best epoch's weights.

`probe` repeats this for several seeds (initialization, validation carve and batch order) and
reports mean, std and each seed's result. `--batch_size`, `--lr`, `--epochs` and `--patience`
override the defaults.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import M2DError
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
    batch_size: int = 0      # the batch used (min(200, N) unless given)
    n_valid: int = 0         # validation clips (the split's, or the carved 10 %)


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


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # the classifier's beta_1, beta_2, epsilon
VALID_DRAWS = 100  # train_test_sure_split's attempts
MAX_AUTO_BATCH = 200  # the classifier's batch_size='auto': min(200, N)


class ProbeError(M2DError):
    """A probe that cannot be trained as asked (e.g. no validation part with every class)."""


def auto_batch_size(n: int) -> int:
    """EVAR's classifier batch for `n` training features: ``min(200, n)``."""
    return max(1, min(MAX_AUTO_BATCH, n))


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the mean and population std of `train` per feature, as scikit-learn's
    StandardScaler (float64 statistics; a std below 10 x eps keeps scale 1)."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std < 10 * np.finfo(np.float64).eps] = 1.0
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def class_counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Clips per class ``[C]`` of targets `y` (ids ``[N]`` or a {0,1} matrix ``[N, C]``)."""
    if y.ndim == 2:
        return y.sum(axis=0)
    return np.bincount(y.astype(np.int64), minlength=n_classes)[:n_classes]


def carve_linear_eval_valid(y: np.ndarray, n_classes: int, seed: int, fraction: float = 0.1,
                            draws: int = VALID_DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """The linear evaluation's validation part (EVAR's protocol, for tasks whose folds have no valid
    split): train and validation indices, a random ``ceil(fraction * N)`` of the items being validation,
    drawn again (up to `draws` times) until every class present in `y` is present in it (EVAR's
    ``train_test_sure_split``). ProbeError when no draw has every class. Fine-tuning and task
    preparation use `m2d.evaluate.tasks.carve_stratified_valid` instead."""
    n = len(y)
    n_valid = int(np.ceil(fraction * n))
    if not 0 < n_valid < n:
        raise ProbeError(f'cannot carve a {100 * fraction:g} % validation part from {n} training clip(s)')
    counts = class_counts(y, n_classes)
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        order = rng.permutation(n)
        valid, train = order[:n_valid], order[n_valid:]
        if np.array_equal(class_counts(y[valid], n_classes) > 0, counts > 0):
            return np.sort(train), np.sort(valid)
    rare = int(np.argmin(np.where(counts > 0, counts, np.inf)))
    raise ProbeError(f'no random {100 * fraction:g} % validation part of the {n} training clips holds every class '
                     f'in {draws} draws (class {rare} has {int(counts[rare])} clip(s)); give the task a valid split')


class EarlyStopping:
    """EVAR's rule: a validation value ``>=`` the best so far (initially 0) is an improvement (ties move
    to the later epoch); `update` says stop at the `patience`-th epoch in a row without one."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = 0.0
        self.best_epoch = 0    # 1-based; 0 before any improvement
        self.wait = 0          # epochs since the best one

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """(improved, stop) after `epoch` (1-based) scored `value`."""
        if value >= self.best:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True, False
        self.wait += 1
        return False, self.wait >= self.patience


def _evaluate(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).float()


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """EVAR's losses: BCE on sigmoid outputs (multi-label); ``-mean(onehot * log_softmax)`` (single-label)."""
    if multilabel:
        return F.binary_cross_entropy(torch.sigmoid(logits), y)
    logp = F.log_softmax(logits, dim=-1)
    return -logp.gather(1, y[:, None]).sum() / logp.numel()


def fit_linear(train: Split, valid: Split | None, test: Split, *, multilabel: bool, n_classes: int,
               lr: float = 3e-5, epochs: int = 200, patience: int = 20, batch_size: int | None = None,
               weight_decay: float = 1e-8, valid_fraction: float = 0.1, seed: int = 0,
               device: str | torch.device = 'cpu', progress: bool = False, desc: str = 'linear') -> Fit:
    """Train one logistic regression as EVAR's classifier (module docstring); test with the best-validation
    weights. `valid` None: carve EVAR's random `valid_fraction` of `train`. `batch_size` None: min(200, N)."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    small = train.x.shape[1] * n_classes < SMALL_PROBLEM
    if dev.type == 'cpu' and small:  # thread hand-offs cost more than these small matmuls (10x on a busy CPU)
        torch.set_num_threads(1)
    try:
        return _fit(train, valid, test, multilabel=multilabel, n_classes=n_classes, lr=lr, epochs=epochs,
                    patience=patience, batch_size=batch_size, weight_decay=weight_decay,
                    valid_fraction=valid_fraction, seed=seed, device=dev, progress=progress, desc=desc)
    finally:
        torch.set_num_threads(threads)


def _fit(train: Split, valid: Split | None, test: Split, *, multilabel: bool, n_classes: int, lr: float, epochs: int,
         patience: int, batch_size: int | None, weight_decay: float, valid_fraction: float, seed: int,
         device: torch.device, progress: bool, desc: str) -> Fit:
    from tqdm import tqdm

    t0 = time.perf_counter()
    batch = batch_size or auto_batch_size(len(train.x))  # N before any carve, as EVAR
    if valid is None:  # the scaler has seen the whole training part, then the carve (EVAR's order)
        xtr, xte = standardize(train.x, test.x)
        itr, iva = carve_linear_eval_valid(train.y, n_classes, seed, valid_fraction)
        xtr, xva, ytr, yva = xtr[itr], xtr[iva], train.y[itr], train.y[iva]
    else:
        xtr, xva, xte = standardize(train.x, valid.x, test.x)
        ytr, yva = train.y, valid.y
    dev = device
    xtr, xva, xte = (torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (xtr, xva, xte))
    ytr = torch.from_numpy(np.ascontiguousarray(ytr)).to(dev)
    ytr = ytr.float() if multilabel else ytr.long()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(xtr.shape[1], n_classes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                           weight_decay=weight_decay)

    stopper, best_state, history = EarlyStopping(patience), None, []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit='epoch', disable=not progress, leave=False, dynamic_ncols=True)
    epoch = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(len(xtr), generator=gen).to(dev)
        total = 0.0
        for i in range(0, len(xtr), batch):
            idx = order[i:i + batch]
            loss = _loss(model(xtr[idx]), ytr[idx], multilabel)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val = metrics.score(yva, _evaluate(model, xva).cpu().numpy(), multilabel)
        history.append({'epoch': epoch, 'train_loss': total / len(xtr), 'valid': val})
        bar.set_postfix(loss=f'{total / len(xtr):.4f}', valid=f'{val:.4f}', refresh=False)
        improved, stop = stopper.update(epoch, val)
        if improved or best_state is None:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stop:
            break
    bar.close()
    model.load_state_dict(best_state)
    scores = _evaluate(model, xte)
    scores = (torch.sigmoid(scores) if multilabel else torch.softmax(scores, dim=1)).cpu().numpy()
    result = metrics.score(test.y, scores, multilabel)
    best_epoch = stopper.best_epoch or 1
    log.debug('%s seed %d: test %.4f, best valid %.4f at epoch %d of %d', desc, seed, result, stopper.best,
              best_epoch, epoch)
    return Fit(test=result, valid=float(stopper.best), best_epoch=best_epoch, epochs_run=epoch, test_scores=scores,
               history=history, seconds=time.perf_counter() - t0, batch_size=batch, n_valid=len(yva))


def probe(train: Split, valid: Split | None, test: Split, *, multilabel: bool, n_classes: int, seeds: int = 3,
          seed: int = 0, progress: bool = False, desc: str = 'linear', **options) -> ProbeResult:
    """`fit_linear` with seeds ``seed, seed+1, ...``; options as `fit_linear` (lr, epochs, patience, ...)."""
    seed_list = [seed + i for i in range(seeds)]
    fits = [fit_linear(train, valid, test, multilabel=multilabel, n_classes=n_classes, seed=s, progress=progress,
                       desc=f'{desc} seed {s}', **options) for s in seed_list]
    result = ProbeResult('mAP' if multilabel else 'accuracy', [f.test for f in fits], fits, seed_list)
    log.info('%s: %s', desc, result)
    return result

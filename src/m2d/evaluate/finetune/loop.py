"""The training loop of one run: epochs of mixup + SGD steps on the schedule, validation after each
epoch, the best-validation weights kept (`BestWeights`), early stopping."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..augment import mixup
from .files import BestWeights
from .model import FinetuneModel
from .optim import step_learning_rate
from .scoring import evaluate_scores, evar_loss
from .settings import FinetuneError, FinetuneSettings

log = logging.getLogger(__name__)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_logits(model: FinetuneModel, loader, device: torch.device, bf16: bool = False,
                   progress: bool = False, desc: str = 'eval') -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets ``[N, C]`` of every batch of `loader`, in eval mode."""
    from tqdm.auto import tqdm

    model.eval()
    logits, targets = [], []
    for wav, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit='batch'):
        with _autocast(device, bf16):
            logits.append(model(wav.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def train_epoch(model: FinetuneModel, loader, optimizer: torch.optim.Optimizer, s: FinetuneSettings, epoch: int,
                rng: np.random.Generator, device: torch.device, multilabel: bool) -> tuple[float, float]:
    """One epoch: per step, set the learning rate (`step_learning_rate`), mix up, forward (bf16
    autocast if asked), step. Returns the mean training loss and the last learning rate."""
    from tqdm.auto import tqdm

    model.train()
    iters, losses, lr = len(loader), [], s.lr
    for it, (wav, y) in enumerate(tqdm(loader, desc=f'epoch {epoch}', leave=False, disable=not s.progress,
                                       unit='batch')):
        lr = step_learning_rate(epoch * iters + it, iters, s)
        for group in optimizer.param_groups:
            group['lr'] = lr
        wav, y = wav.to(device), y.to(device)
        wav, y, _ = mixup(wav, y, s.mixup, rng)
        with _autocast(device, s.bf16):
            logits = model(wav)
        loss = evar_loss(logits.float(), y, multilabel)
        value = loss.item()  # the step's one host sync
        if not math.isfinite(value):
            raise FinetuneError(f'the training loss became {value} at epoch {epoch}; lower --lr ({s.lr})')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(value)
    return float(np.mean(losses)), lr


@dataclass
class Fit:
    """What `fit` returns: per-epoch curves and the best epoch's validation logits/targets."""

    curves: list[dict[str, Any]] = field(default_factory=list)
    best_logits: np.ndarray | None = None
    targets: np.ndarray | None = None


def fit(model: FinetuneModel, train_loader, valid_loader, optimizer: torch.optim.Optimizer, s: FinetuneSettings,
        best: BestWeights, rng: np.random.Generator, device: torch.device, multilabel: bool, metric: str,
        desc: str) -> Fit:
    """Train up to ``s.epochs`` epochs, validating after each; `best` keeps the best weights (strictly
    better score; ties keep the earlier epoch, as EVAR) and writes them every ``s.save_every`` epochs
    and at the end. Stops after ``s.patience`` epochs without improvement when it is > 0."""
    from tqdm.auto import tqdm

    out = Fit()
    bar = tqdm(range(s.epochs), desc=desc, disable=not s.progress, unit='epoch')
    for epoch in bar:
        t_epoch = time.perf_counter()
        loss, lr = train_epoch(model, train_loader, optimizer, s, epoch, rng, device, multilabel)
        train_seconds = time.perf_counter() - t_epoch
        v_logits, v_targets = predict_logits(model, valid_loader, device, s.bf16, s.progress, 'valid')
        valid = evaluate_scores(v_logits, v_targets, multilabel)
        valid_loss = float(evar_loss(torch.from_numpy(v_logits), torch.from_numpy(v_targets), multilabel))
        if best.state is None or valid > best.score:  # (a NaN score never improves)
            best.update(model, epoch, valid)
            out.best_logits, out.targets = v_logits, v_targets
        out.curves.append({'epoch': epoch, 'lr': lr, 'train_loss': loss, 'valid_loss': valid_loss,
                           f'valid_{metric}': valid, 'seconds': time.perf_counter() - t_epoch,
                           'train_seconds': train_seconds})
        bar.set_postfix(loss=f'{loss:.4f}', valid=f'{valid:.4f}', best=f'{best.score:.4f}@{best.epoch}')
        log.debug('epoch %d: lr %.3g loss %.5f valid %s %.5f (best %.5f @ %d)', epoch, lr, loss, metric,
                  valid, best.score, best.epoch)
        if s.save_every and (epoch + 1) % s.save_every == 0:
            best.flush()
        if s.patience and epoch - best.epoch >= s.patience:
            log.info('early stop at epoch %d: no better validation %s for %d epochs (best %.4f at epoch %d)',
                     epoch, metric, s.patience, best.score, best.epoch)
            break
    bar.close()
    best.flush()
    return out

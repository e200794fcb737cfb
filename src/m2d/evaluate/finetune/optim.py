"""Optimizers as EVAR builds them (and LARS), and the learning-rate schedule of timm's
``CosineLRScheduler`` stepped the way EVAR's ``_train`` steps it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .settings import FinetuneSettings

class LARS(torch.optim.Optimizer):
    """LARS (as in MAE's fine-tuning): for weights with ndim > 1, the update (gradient + weight decay)
    is scaled by ``trust · ‖w‖ / ‖update‖``; then momentum SGD. Biases and norms are not scaled."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group['weight_decay'])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    q = torch.where((w_norm > 0) & (d_norm > 0), group['trust_coefficient'] * w_norm / d_norm,
                                    torch.ones_like(w_norm))
                    d = d.mul(q)
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                mu.mul_(group['momentum']).add_(d)
                p.add_(mu, alpha=-group['lr'])
        return loss


def make_optimizer(params: list[nn.Parameter], s: FinetuneSettings) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), AdamW (β 0.9/0.95, eps 1e-8, amsgrad) or LARS, as EVAR builds them."""
    if s.optim == 'sgd':
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay or 0.0)
    if s.optim == 'adamw':
        wd = 1e-4 if s.weight_decay is None else s.weight_decay
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8, amsgrad=True)
    return LARS(params, lr=s.lr, weight_decay=s.weight_decay or 0.0)


def learning_rate(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 1e-7) -> float:
    """timm's ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t, warmup_lr_init=0)`` at fractional
    `epoch`: ``lr·e/W`` while ``e < W``, then ``min_lr + (lr - min_lr)·½(1 + cos(π e / E))``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))




def step_learning_rate(step: int, steps_per_epoch: int, s: FinetuneSettings) -> float:
    """The learning rate of optimizer step `step` (counted from 0 over the whole run), as in EVAR.

    EVAR's ``_train`` calls ``scheduler.step(epoch + iter / epoch_iters)`` *after* each optimizer step,
    so a step runs with the rate set after the step before it: step k uses the schedule at micro-epoch
    ``(k - 1) / steps_per_epoch``, and step 0 the rate the scheduler starts with (``warmup_lr_init`` = 0
    with a warmup, else the peak rate; both equal the schedule at 0).
    """
    t = max(step - 1, 0) / steps_per_epoch
    return learning_rate(t, s.lr, s.warmup_epochs, s.epochs, s.min_lr)

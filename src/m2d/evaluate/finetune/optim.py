"""Optimizers as EVAR builds them (SGD, AdamW, timm's LARS), and the learning-rate schedule of timm's
``CosineLRScheduler`` stepped the way EVAR's ``_train`` steps it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .settings import FinetuneSettings


class LARS(torch.optim.Optimizer):
    """timm's ``Lars`` (``timm.optim.Lars``), which EVAR's ``--optim lars`` builds with momentum 0.9 and
    weight decay 0.

    Per parameter: when ``weight_decay != 0`` or ``always_adapt``, the gradient becomes
    ``(g + wd·w) · r`` with the trust ratio ``r = trust_coeff·‖w‖ / (‖g‖ + wd·‖w‖ + eps)`` (1 when
    ``‖w‖`` or ``‖g‖`` is 0; with ``trust_clip``, ``min(r / lr, 1)``); then SGD momentum (the buffer
    starts as the first gradient; dampening, Nesterov as ``torch.optim.SGD``). Every parameter is
    treated alike (no exclusion of biases or norms). With EVAR's settings (weight decay 0, no
    ``always_adapt``) no ratio is applied: it is momentum SGD.
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
                 trust_clip: bool = False, always_adapt: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f'LARS: lr {lr}, momentum {momentum} and weight_decay {weight_decay} must be >= 0')
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError('LARS: Nesterov momentum needs a momentum and zero dampening')
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                                      always_adapt=always_adapt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group['weight_decay'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0 or group['always_adapt']:
                    w_norm, g_norm = p.norm(2.0), d.norm(2.0)
                    ratio = group['trust_coeff'] * w_norm / (g_norm + w_norm * wd + group['eps'])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    if group['trust_clip']:
                        ratio = torch.clamp(ratio / group['lr'], max=1.0)
                    d = d.add(p, alpha=wd).mul_(ratio)
                if momentum != 0:
                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        buf = state['momentum_buffer'] = d.detach().clone()
                    else:
                        buf = state['momentum_buffer']
                        buf.mul_(momentum).add_(d, alpha=1.0 - group['dampening'])
                    d = d.add(buf, alpha=momentum) if group['nesterov'] else buf
                p.add_(d, alpha=-group['lr'])
        return loss


def make_optimizer(params: list[nn.Parameter], s: FinetuneSettings) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), AdamW (β 0.9/0.95, eps 1e-8, amsgrad) or timm's LARS (momentum 0.9), as EVAR
    builds them (EVAR passes no weight decay to SGD and LARS, 1e-4 to AdamW; ``--weight_decay`` overrides)."""
    if s.optim == 'sgd':
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay or 0.0)
    if s.optim == 'adamw':
        wd = 1e-4 if s.weight_decay is None else s.weight_decay
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8, amsgrad=True)
    return LARS(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay or 0.0)


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

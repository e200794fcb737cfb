"""Per-iteration schedules of pre-training: learning rate and EMA decay.

Both follow the reference exactly (METHOD.md, "Optimization"):

- learning rate, as a function of the fractional epoch ``e = epoch + it / iters_per_epoch``:
  linear warmup ``lr * e / W`` for ``e < W``, then a half cosine from `lr` down to `min_lr` at
  ``e = E``; it is set at the first micro-step of each gradient-accumulation group;
- EMA decay of the target encoder, as a function of the micro-step counter ``step``
  (loader iterations since the start, ``total_steps = iters_per_epoch * epochs``):
  ``d0 + (d1 - d0) * step / (total_steps - 1)``.
"""

from __future__ import annotations

import math


def learning_rate(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 0.0) -> float:
    """Learning rate at fractional epoch `epoch`: linear warmup, then half-cosine decay to `min_lr`."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:
        return lr
    progress = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, total_steps: int, decay_init: float, decay_final: float) -> float:
    """EMA decay at micro-step `step`: linear from `decay_init` (step 0) to `decay_final` (step total_steps - 1)."""
    if total_steps <= 1:
        return decay_final
    return decay_init + (decay_final - decay_init) * step / (total_steps - 1)


def base_to_absolute_lr(blr: float, effective_batch_size: int) -> float:
    """The reference's linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch_size / 256

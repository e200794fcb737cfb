"""Optimizer parameter groups for pre-training."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """Weight-decay groups as timm's ``param_groups_weight_decay``.

    No decay for parameters with ndim <= 1, names ending in ``.bias`` or listed in
    `no_weight_decay`; everything else (``cls_token`` and ``mask_token`` included) decays.
    Frozen parameters (``requires_grad`` False: ``pos_embed``, ``norm_stats``, ``target_*``, ...)
    are left out. Returns ``[{no decay}, {decay}]`` for ``torch.optim.AdamW``.
    """
    skip = set(no_weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith('.bias') or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]

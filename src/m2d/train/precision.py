"""Training precision: which autocast a run uses, and the loss scaler that goes with it.

The reference trains with float16 autocast and loss scaling (``torch.cuda.amp.autocast()`` and
``NativeScalerWithGradNormCount``) unless ``--bf16``. Here, on CUDA the default is bfloat16 autocast
where the GPU supports it (no loss scaling needed) and float16 with loss scaling where it does not;
``--fp32`` opts out, ``--fp16`` asks for the reference's float16. On a CPU the default is float32
(``--bf16`` for bfloat16 autocast; float16 is refused there).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'bf16', 'fp16')
_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def choose_precision(opts: TrainConfig, device: torch.device) -> tuple[str, str]:
    """('fp32' | 'bf16' | 'fp16', the reason in words) for `opts` on `device`."""
    if device.type == 'cuda':
        bf16_ok = torch.cuda.is_bf16_supported()
        if opts.fp32:
            return 'fp32', '--fp32'
        if opts.fp16:
            return 'fp16', '--fp16'
        if opts.bf16:
            if not bf16_ok:
                raise ConfigError(f'--bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --fp16 '
                                  '(float16 with loss scaling) or --fp32')
            return 'bf16', '--bf16'
        if bf16_ok:
            return 'bf16', 'default on a GPU with bfloat16; --fp32 to opt out'
        return 'fp16', 'default on a GPU without bfloat16 (loss scaling, as the reference); --fp32 to opt out'
    if opts.fp16:
        raise ConfigError(f'--fp16 is for CUDA GPUs (float16 autocast with loss scaling); on {device.type} use --bf16 '
                          'or the default float32')
    if opts.bf16:
        return 'bf16', '--bf16'
    return 'fp32', f'default on {device.type}; --bf16 for bfloat16 autocast'


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` (a disabled one for 'fp32')."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return torch.autocast(device.type, dtype=_DTYPES.get(precision, torch.bfloat16), enabled=precision != 'fp32')


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler: enabled for 'fp16' only (its state is saved with the checkpoint either way)."""
    return torch.amp.GradScaler(device.type, enabled=precision == 'fp16')


def setup(opts: TrainConfig, device: torch.device) -> tuple[str, contextlib.AbstractContextManager,
                                                             torch.amp.GradScaler]:
    """Choose and log the precision; returns it with its autocast context and loss scaler."""
    precision, why = choose_precision(opts, device)
    words = {'fp32': 'float32', 'bf16': 'bfloat16 autocast', 'fp16': 'float16 autocast with loss scaling'}
    log.info('precision: %s (%s)', words[precision], why)
    return precision, autocast(precision, device), grad_scaler(precision, device)

"""Pre-training: options (`TrainConfig`), schedules, processes (torchrun/DDP), per-item seeding,
checkpoints and resume (`state`), monitoring (log.jsonl, curves, effective rank), evaluation of
checkpoints in separate processes (`evaluation`) and the loop (`train`)."""

from .config import ConfigError, TrainConfig, add_arguments, config_from_args
from .schedule import ema_decay, learning_rate

__all__ = ['ConfigError', 'TrainConfig', 'add_arguments', 'config_from_args', 'ema_decay', 'learning_rate', 'train',
           'NonFiniteLossError', 'TrainResult']


def __getattr__(name: str):
    if name in ('train', 'NonFiniteLossError', 'TrainResult'):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

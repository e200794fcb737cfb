"""The options of `m2d finetune`, their checks and their one error type."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ...errors import M2DError
from ...normstats import parse_mean_std

OPTIMIZERS = ('sgd', 'adamw', 'lars')


class FinetuneError(M2DError, ValueError):
    """A fine-tuning setting or input that cannot be used; the message names the option or file."""


@dataclass
class FinetuneSettings:
    """Options of `finetune`, named as EVAR's ``finetune.py`` options (defaults: EVAR's ``m2d.yaml``)."""

    lr: float = 2.0                        # ft_lr
    batch_size: int = 128                  # ft_bs
    epochs: int = 200                      # ft_epochs
    warmup_epochs: float = 5.0             # warmup_epochs
    optim: str = 'sgd'                     # finetune.py's optim='sgd'
    mixup: float = 0.5                     # mixup
    rrc: bool = True                       # ft_rrc
    freq_mask: int = 30                    # ft_freq_mask
    time_mask: int = 192                   # ft_time_mask
    training_mask: float = 0.0             # training_mask
    patience: int = 0                      # 0: no early stopping (EVAR's ft_early_stop_epochs -1)
    seed: int = 0                          # EVAR's default is 42; the seed README's command lines pass 0
    norm_stats: str | tuple[float, float] | None = None  # None: the weight file's; 'auto': train split
    min_lr: float = 1e-7                   # timm CosineLRScheduler lr_min in finetune.py
    weight_decay: float | None = None      # None: 0 for sgd/lars, 1e-4 for adamw (EVAR)
    fold: str | None = None                # one fold of a fold task; None: every fold, averaged (EVAR)
    valid_fraction: float | None = None    # None: validate on test when the task has no valid split (EVAR)
    save_every: int = 10                   # write the best weights every N epochs (if they changed); 0: at the end
    dur_frames: int | None = None          # the reference's dur_frames: input frames of the encoder (None: its own)
    freeze_embed: bool = False             # the reference's freeze_embed: the patch embedding is not trained
    weighted_sampling: int = 0             # clips per epoch drawn by weight without replacement (EVAR's 'as': 200000)
    recipe: str | None = None              # the named recipe these settings came from (`recipes`), for the report
    data_path: str | None = None           # the log-mel (.npy) folder of EVAR's 'as' task, for the reference command
    bf16: bool = False
    device: str | None = None
    workers: int = 0
    trust: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise `FinetuneError` naming the first bad option."""
        bad = [('--lr', self.lr, not self.lr > 0, 'must be positive'),
               ('--batch_size', self.batch_size, self.batch_size < 2, 'must be at least 2 (BatchNorm needs 2 clips)'),
               ('--epochs', self.epochs, self.epochs < 1, 'must be at least 1'),
               ('--warmup_epochs', self.warmup_epochs, self.warmup_epochs < 0, 'must be >= 0'),
               ('--optim', self.optim, self.optim not in OPTIMIZERS, f'must be one of {", ".join(OPTIMIZERS)}'),
               ('--mixup', self.mixup, not self.mixup >= 0, 'must be >= 0 (the Beta parameter α; 0 disables)'),
               ('--freq_mask', self.freq_mask, self.freq_mask < 0, 'must be >= 0 bins (0 disables)'),
               ('--time_mask', self.time_mask, self.time_mask < 0, 'must be >= 0 frames (0 disables)'),
               ('--training_mask', self.training_mask, not 0 <= self.training_mask < 1, 'must be in [0, 1)'),
               ('--patience', self.patience, self.patience < 0, 'must be >= 0 epochs (0: no early stopping)'),
               ('--min_lr', self.min_lr, self.min_lr < 0, 'must be >= 0'),
               ('--save_every', self.save_every, self.save_every < 0, 'must be >= 0 epochs (0: only at the end)'),
               ('--workers', self.workers, self.workers < 0, 'must be >= 0'),
               ('--weighted_sampling', self.weighted_sampling, self.weighted_sampling < 0,
                'must be >= 0 clips per epoch (0: every train clip once, shuffled)')]
        for name, value, failed, why in bad:
            if failed:
                raise FinetuneError(f'{name} {value}: {why}')
        if self.weight_decay is not None and self.weight_decay < 0:
            raise FinetuneError(f'--weight_decay {self.weight_decay}: must be >= 0')
        if self.valid_fraction is not None and not 0 < self.valid_fraction < 1:
            raise FinetuneError(f'--valid_fraction {self.valid_fraction}: must be in (0, 1), e.g. 0.1')
        if self.dur_frames is not None and self.dur_frames < 1:
            raise FinetuneError(f'--dur_frames {self.dur_frames}: must be a positive number of frames, e.g. 1001')
        parse_norm_stats(self.norm_stats)


def parse_norm_stats(spec: str | Iterable[float] | None) -> tuple[float, float] | str | None:
    """None (the weight file's), 'auto', or ``(mean, std)`` from ``'MEAN,STD'`` or a pair."""
    if spec is None or spec == 'auto':
        return spec
    return parse_mean_std(spec, '--norm_stats', FinetuneError, expected='auto or MEAN,STD')

"""The reference's fine-tuning recipes by name: nttcslab/m2d ``util/ft-*.sh``, setting for setting.

Each script runs EVAR's ``finetune.py config/m2d.yaml TASK weight_file=W,encoder_only=True[,...]
--options``; a recipe holds the options it passes and the ``config/m2d.yaml`` values it leaves as
they are (lr 2.0, batch 128, 200 epochs, warmup 5, no early stop, sgd), plus what EVAR's task
definition adds (``as``: balanced, i.e. 200,000 clips per epoch drawn by weight). ``encoder_only``
needs no setting here: our loader keeps only the encoder's weights of any file. The seed is not part
of a recipe (the scripts pass ``--seed`` = their argument + 1, + 2, ... per repetition).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .settings import FinetuneError, FinetuneSettings

AS_EPOCH_CLIPS = 200_000  # EVAR's create_as_dataloader: WeightedRandomSampler(num_samples=200000)


@dataclass(frozen=True)
class Recipe:
    """One script of the reference: its EVAR task and the settings it runs with."""

    name: str
    script: str                     # the reference's script, e.g. util/ft-as2m.sh
    task: str                       # EVAR's task name the script fine-tunes on
    settings: dict[str, Any] = field(default_factory=dict)  # FinetuneSettings fields


_COMMON = dict(warmup_epochs=5.0, epochs=200, batch_size=128, optim='sgd', patience=0)  # config/m2d.yaml

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe('as2m', 'util/ft-as2m.sh', 'as', {
        **_COMMON, 'dur_frames': 1001, 'lr': 2.0, 'freq_mask': 30, 'time_mask': 192, 'training_mask': 0.5,
        'mixup': 0.5, 'rrc': False, 'epochs': 70, 'warmup_epochs': 15.0, 'optim': 'lars', 'batch_size': 64,
        'weighted_sampling': AS_EPOCH_CLIPS}),  # the script also passes --data_path (log-mel .npy clips)
    Recipe('as20k', 'util/ft-as20k.sh', 'as20k', {
        **_COMMON, 'dur_frames': 1001, 'lr': 0.5, 'freq_mask': 30, 'time_mask': 192, 'training_mask': 0.5,
        'mixup': 0.3, 'rrc': True, 'batch_size': 64}),
    Recipe('esc50', 'util/ft-esc50.sh', 'esc50', {
        **_COMMON, 'dur_frames': 501, 'freeze_embed': True, 'lr': 0.5, 'freq_mask': 15, 'time_mask': 48,
        'training_mask': 0.5, 'mixup': 0.0, 'rrc': True}),
    Recipe('spcv2', 'util/ft-spc.sh', 'spcv2', {
        **_COMMON, 'lr': 0.5, 'freq_mask': 30, 'time_mask': 48, 'training_mask': 0.5, 'mixup': 0.3, 'rrc': True}),
    Recipe('vc1', 'util/ft-vc1.sh', 'vc1', {
        **_COMMON, 'dur_frames': 821, 'optim': 'adamw', 'lr': 0.0005, 'freq_mask': 30, 'time_mask': 48,
        'training_mask': 0.0, 'mixup': 0.0, 'rrc': False, 'epochs': 50, 'batch_size': 64}),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; `FinetuneError` listing the names otherwise."""
    if name not in RECIPES:
        raise FinetuneError(f'--recipe {name!r}: not a recipe (recipes: {", ".join(RECIPES)})')
    return RECIPES[name]


def apply_recipe(name: str | None, explicit: dict[str, Any], base: FinetuneSettings | None = None) -> FinetuneSettings:
    """Settings of recipe `name` (None: `base` or the defaults), then every option in `explicit` over it."""
    s = base or FinetuneSettings()
    if name is not None:
        s = dataclasses.replace(s, **get_recipe(name).settings, recipe=name)
    try:
        return dataclasses.replace(s, **explicit)
    except TypeError as e:
        raise FinetuneError(f'finetune settings: {e}') from None


def evar_command_line(task: str, weights: str, s: FinetuneSettings, data_path: str | None = None) -> str:
    """The reference's command line (EVAR's finetune.py, run in its folder) for settings `s`.

    Written as the ``util/ft-*.sh`` scripts write theirs; settings EVAR has no option for
    (``weight_decay``, ``patience`` as ``--early_stop_epochs``, ``valid_fraction``, ``norm_stats``)
    are left out, and a weighted sampling is implied by EVAR's task (``as``), not by an option.
    """
    weight_opts = [f'weight_file={weights}', 'encoder_only=True']
    if s.dur_frames is not None:
        weight_opts.append(f'dur_frames={s.dur_frames}')
    if s.freeze_embed:
        weight_opts.append('freeze_embed=True')
    parts = ['python finetune.py config/m2d.yaml', task, ','.join(weight_opts)]
    if s.optim != 'sgd':
        parts.append(f'--optim {s.optim}')
    parts += [f'--lr={s.lr:g}', f'--freq_mask {s.freq_mask}', f'--time_mask {s.time_mask}',
              f'--training_mask {s.training_mask:g}', f'--mixup {s.mixup:g}', f'--rrc {s.rrc}',
              f'--epochs {s.epochs}', f'--warmup_epochs {s.warmup_epochs:g}', f'--batch_size {s.batch_size}']
    if s.patience:
        parts.append(f'--early_stop_epochs {s.patience - 1}')
    if data_path is not None:
        parts.append(f'--data_path {data_path}')
    parts.append(f'--seed {s.seed}')
    return ' '.join(parts)

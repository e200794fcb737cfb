"""`m2d pretrain-speech`: `m2d pretrain` with the M2D-S presets (speech, denoising distillation).

Same options as `m2d pretrain`; only the defaults differ (those of the reference's M2D-S recipe):
model m2d_s_vit_base, input 80x208, patch 80x4, mask ratio 0.6, 1000 epochs, warmup 60, noise
ratio 0.2, loss_m2d 1.0, loss_off 1.0, speech list data/files_ls960_hybrid.csv (from
`m2d teacher-features`) and background noise data/files_audioset.csv (from `m2d convert`).
The reference script's own --loss_off default is 0.0, but its documented 80x208 recipe passes 1.0.
M2D-X (further pre-training of a released M2D with any M2D teacher) is `m2d pretrain --model
m2d_x_vit_base`, as the reference trains it with train_audio.py: these speech presets (80x208, 80x4
patches) cannot hold an 80x608p16x16 checkpoint.
"""

from __future__ import annotations

import argparse
import re

from . import pretrain

SPEECH_DEFAULTS = dict(model='m2d_s_vit_base', input_size='80x208', patch_size='80x4', mask_ratio=0.6, epochs=1000,
                       warmup_epochs=60, noise_ratio=0.2, loss_m2d=1.0, loss_off=1.0,
                       csv_main='data/files_ls960_hybrid.csv', csv_bg_noise='data/files_audioset.csv')

EPILOG = """\
examples:
  m2d teacher-features LibriSpeech/ data/ls960_hubert_L9 --device cuda
  m2d convert AudioSet/ data/audioset_lms --min-seconds 6.1
  m2d pretrain-speech --csv_main data/ls960_hubert_L9/files.csv --csv_bg_noise data/audioset_lms/files.csv \\
      --data_path data --batch_size 128 --accum_iter 16
M2D-X from a released M2D checkpoint: see `m2d pretrain --help`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pretrain.add_arguments(parser)
    parser.set_defaults(**SPEECH_DEFAULTS)
    for action in parser._actions:  # show the speech defaults in --help
        if action.dest in SPEECH_DEFAULTS and action.help and '%(default)s' not in action.help:
            text, n = re.subn(r'\(default[^)]*\)', f'(default {SPEECH_DEFAULTS[action.dest]})', action.help)
            action.help = text if n else f'{text} (default {SPEECH_DEFAULTS[action.dest]})'
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    return pretrain.run(args)

"""`m2d pretrain`: pre-train MSM-MAE / M2D / M2D-S / M2D-X on log-mel files (one CPU, one GPU, or
many with ``torchrun --nproc_per_node N -m m2d pretrain ...``)."""

from __future__ import annotations

import argparse
import logging

from ..train.config import add_arguments as _add_arguments

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..train.config import IGNORED_OPTIONS, config_from_args
    from ..train.loop import NonFiniteLossError, train

    given = [n for n in IGNORED_OPTIONS if getattr(args, n.replace('-', '_'), None) is not None]
    if given:
        log.warning('ignored reference options (no effect here): %s', ', '.join(f'--{n}' for n in given))
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        log.error('%s', e)
        return 2
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        log.error('%s', e)
        return 3
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad data lists, options or weight files
        log.error('%s', e)
        return 2
    if result.is_main:
        print(result.checkpoint or result.output_dir)
    return 0

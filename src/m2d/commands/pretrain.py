"""`m2d pretrain`: pre-train MSM-MAE / M2D / M2D-S / M2D-X on log-mel files (one CPU, one GPU, or
many with ``torchrun --nproc_per_node N -m m2d pretrain ...``)."""

from __future__ import annotations

import argparse
import sys

from ..train.config import add_arguments as _add_arguments

EPILOG = """\
examples:
  m2d convert AudioSet/ data/audioset_lms --min-seconds 6.1
  m2d pretrain --csv_main data/audioset_lms/files.csv --data_path data --batch_size 512
  m2d pretrain --model msm_mae_vit_base --csv_main data/audioset_lms/files.csv
  m2d pretrain --model m2d_x_vit_base --init m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth \\
      --teacher m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth --csv_main data/my_lms/files.csv \\
      --csv_bg_noise data/noise_lms/files.csv --noise_ratio 0.01 --loss_off 1. --epochs 600 --warmup_epochs 24
  m2d pretrain --model m2d_vit_tiny --input_size 80x208 --csv_main data/fsdd_lms/files.csv --epochs 20 \\
      --eval fsdd-digits --eval_data_dir data/fsdd --eval_every 5
  torchrun --nproc_per_node 4 -m m2d pretrain --csv_main data/audioset_lms/files.csv --resume auto \\
      --output_dir runs/m2d_vit_base-80x608p16x16-240101-mr7

The run folder (default runs/MODEL-FxTpPHxPWpSRk-SETTINGS-mrN, SETTINGS a hash of the options that
change the weights, so the same command always names the same folder) is created once the data and
the model are built; it receives checkpoint-EPOCH.pth, checkpoint-last.pth, log.jsonl, train.log,
training_curves.png and, with --eval, eval/epoch-N/ and eval_summary.md.
Precision: bfloat16 autocast on GPUs that support it, float16 with loss scaling on those that do not
(--fp32 to opt out), float32 on a CPU (--bf16 to ask for bfloat16); the choice is logged.
Preemption: SIGTERM or SIGUSR1 (sbatch --signal=USR1@120) to any process makes every rank stop at the
same optimizer step; rank 0 writes checkpoint-last.pth and every process exits with status 75. The same
command with --resume auto continues the run exactly. checkpoint-last.pth is also written every
--save_every_minutes (30). torchrun passes SIGUSR1 on only with --signals_to_handle
SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1, and itself exits with 1 whenever a worker exits non-zero;
--slurm_requeue requeues the job after SIGUSR1. See README "Pre-train at scale" for an sbatch script.
exit status: 0 done, 2 bad options or data, 3 non-finite loss (the last good checkpoint is named),
75 stopped by SIGTERM/SIGUSR1 with checkpoint-last.pth written (run again with --resume auto).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG


def run(args: argparse.Namespace) -> int:
    from ..train.config import config_from_args
    from ..train.loop import train

    from ..train.preemption import EXIT_STOPPED

    result = train(config_from_args(args))
    if result.is_main:
        print(result.checkpoint or result.output_dir)
    if result.stopped_by:
        print(f'm2d pretrain: stopped by {result.stopped_by} at step {result.step}; continue with --resume auto '
              f'(exit status {EXIT_STOPPED})', file=sys.stderr)
        return EXIT_STOPPED
    return 0

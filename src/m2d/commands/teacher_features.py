"""`m2d teacher-features SRC DEST --teacher NAME_OR_PATH`: LMS + HuBERT features (.npz) for M2D-S."""

from __future__ import annotations

import argparse

EPILOG = """\
Writes DEST/<relative path>.npz per audio file under SRC: arr_0 the log-mel spectrogram [1, 80, T]
(16 kHz, clip zero-padded to --min_seconds), arr_1 the teacher's hidden states [1, T2, D] at 50 Hz
(several --layers are concatenated along D), arr_2 the number of valid teacher frames. Also writes
DEST/files.csv (paths relative to DEST's parent) for `m2d pretrain-speech --csv_main`.
Existing outputs are skipped (restartable); failures go to DEST/teacher_failures.csv.

examples:
  m2d teacher-features LibriSpeech/ data/ls960_hubert_L9 --device cuda
  m2d teacher-features clips/ data/clips_hubert --teacher ./my_hubert --layers 9 12 --dtype float16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.teacher_features import DEFAULT_TEACHER

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('src', metavar='SRC', help='audio file or folder (searched recursively)')
    parser.add_argument('dest', metavar='DEST', help='output folder')
    parser.add_argument('--teacher', default=DEFAULT_TEACHER, metavar='NAME_OR_PATH',
                        help='HuggingFace HubertModel name or local folder (default: %(default)s)')
    parser.add_argument('--layers', type=int, nargs='+', default=[9],
                        help='hidden_states indices (0 = CNN output); several are concatenated (default: 9)')
    parser.add_argument('--min_seconds', '--min-seconds', dest='min_seconds', type=float, default=7.0,
                        help='pad shorter clips to this duration (default: 7)')
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=8,
                        help='clips of equal padded length run together (default: 8)')
    parser.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')
    parser.add_argument('--dtype', choices=['float32', 'float16'], default='float32',
                        help='storage type of the teacher features (default: float32)')
    parser.add_argument('--overwrite', action='store_true', help='recompute files that already exist')
    parser.add_argument('--workers', type=int, default=2, help='threads reading audio (default 2)')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.teacher_features import extract_teacher_features

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    s = extract_teacher_features(args.src, args.dest, args.teacher, min_seconds=args.min_seconds,
                                 layers=tuple(args.layers), batch_size=args.batch_size, overwrite=args.overwrite,
                                 progress=not args.quiet, device=device, dtype=args.dtype, workers=args.workers)
    print(f'{s}; file list: {s.files_csv}' + (f'; failures: {s.failures_csv}' if s.failed else ''))
    return s.exit_code

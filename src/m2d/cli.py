"""The `m2d` command. Each subcommand lives in `m2d.commands.<name>` and is imported only when used,
so `m2d --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import M2DError

# subcommand -> (module under m2d.commands, one-line help)
COMMANDS = {
    'encode': ('encode', 'encode audio files or folders into M2D features (.npy per file or one .npz)'),
    'export': ('export', 'export the encoder of a weight file to safetensors'),
    'download': ('download', 'download released weights into the cache'),
    'convert': ('convert', 'convert audio files to log-mel .npy files for pre-training'),
    'filelist': ('filelist', 'write files.csv listing the .npy files of a folder'),
    'stats': ('stats', 'normalization statistics (mean, std) of log-mel files'),
    'datasets': ('datasets', "prepare EVAR's downstream tasks (esc50, us8k, ...) and fsdd"),
    'pretrain': ('pretrain', 'pre-train MSM-MAE / M2D / M2D-S / M2D-X (torchrun for many GPUs)'),
    'pretrain-speech': ('pretrain_speech', 'pre-train M2D-S with the speech presets'),
    'teacher-features': ('teacher_features', 'compute LMS + teacher (HuBERT) features for M2D-S'),
    'superb': ('superb', 'SUPERB (s3prl): install the upstream, task statistics, task runs, reports'),
    'linear-eval': ('linear_eval', 'linear evaluation of a representation on a labeled audio task or suite'),
    'finetune': ('finetune', 'fine-tune an encoder with a classification head on a labeled audio task'),
    'predict': ('predict', 'top-k labels of audio files (a fine-tuned file, or M2D-CLAP zero-shot with --labels)'),
    'zeroshot': ('zeroshot', 'zero-shot classification of a labeled audio task or suite with M2D-CLAP (EVAR)'),
    'retrieval': ('retrieval', 'text-audio retrieval recall@K with M2D-CLAP on a caption CSV'),
    'demo': ('demo', 'the whole method on a small built-in task: synthesize, pre-train, evaluate, report'),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f'm2d.commands.{module}')


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog='m2d', description='Masked Modeling Duo (M2D) toolkit.',
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog='commands:\n' + '\n'.join(f'  {k:<18} {h}' for k, (_, h) in COMMANDS.items())
                                  + '\n\nRun `m2d COMMAND --help` for the options of one command.')
    top.add_argument('--version', action='version', version=f'm2d {__version__}')
    top.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    top.add_argument('command', nargs='?', choices=list(COMMANDS), metavar='COMMAND')
    head = []
    while argv and argv[0].startswith('-') and argv[0] not in ('-h', '--help'):
        head.append(argv.pop(0))
    if not argv or argv[0] in ('-h', '--help'):
        top.parse_args(head + argv[:1])
        top.print_help()
        return 0
    ns = top.parse_args(head + argv[:1])
    command = _load(ns.command)
    parser = argparse.ArgumentParser(prog=f'm2d {ns.command}', description=COMMANDS[ns.command][1])
    command.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    try:
        return int(command.run(args) or 0)
    except (M2DError, OSError, ValueError, ImportError) as e:  # user errors (M2DError, missing files, bad
        # values, missing optional packages): one line, not a traceback
        if ns.verbose:
            raise
        print(f'm2d {ns.command}: error: {e}', file=sys.stderr)
        return getattr(e, 'exit_code', 2)
    except KeyboardInterrupt:
        print(f'm2d {ns.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())

"""The five SUPERB tasks of the M2D-S paper as s3prl runs: names, learning rates, published statistics,
experiment names and the exact `run_downstream.py` command lines of the reference's task scripts.

    >>> steps = task_commands(get_task('KS'), '/w/m2d_s_vit_base-80x608p80x2-230220/checkpoint-1000.pth', seed=7)
    >>> steps[0].name
    'm2d_s_vit_base-80x608p80x2-230220-checkpoint-1000-KS-lr1e-4-s7'
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..normstats import parse_mean_std
from . import SuperbError


@dataclass(frozen=True)
class Task:
    """One SUPERB task as the reference's scripts (er.sh, ic.sh, ks.sh, pr.sh, sid.sh) run it."""

    name: str  # 'KS'
    downstream: str  # s3prl's -d
    lr: str  # the scripts' learning rate, spelled as there (it is part of the experiment name)
    stats: tuple[str, str]  # the scripts' statistics (mean, std), spelled as there
    title: str
    config: str | None = None  # s3prl's -c, relative to the s3prl folder (None: downstream/<d>/config.yaml)
    evaluate_names: bool = False  # the evaluate step also gets -n EXP -d DOWNSTREAM (pr.sh, sid.sh)
    folds: tuple[str, ...] = ()  # ER: one run per test fold
    metric: str = 'acc'  # 'acc' (higher is better) or 'per' (phone error rate, lower is better)
    aliases: tuple[str, ...] = ()

    @property
    def config_path(self) -> str:
        """The downstream config s3prl reads, relative to the s3prl folder."""
        return self.config or f'downstream/{self.downstream}/config.yaml'


# In the column order of the M2D-S paper's SUPERB table.
TASKS: dict[str, Task] = {t.name: t for t in [
    Task('PR', 'ctc', '1e-3', ('-10.43253231048584', '4.241369724273682'), 'phoneme recognition (LibriSpeech)',
         config='downstream/ctc/libriphone.yaml', evaluate_names=True, metric='per', aliases=('libriphone',)),
    Task('KS', 'speech_commands', '1e-4', ('-11.506255149841309', '4.314857482910156'),
         'keyword spotting (Speech Commands v1)'),
    Task('IC', 'fluent_commands', '1e-3', ('-13.017439842224121', '4.417759895324707'),
         'intent classification (Fluent Speech Commands)'),
    Task('SID', 'voxceleb1', '1e-3', ('-10.571271', '4.3681135'), 'speaker identification (VoxCeleb1)',
         evaluate_names=True),
    Task('ER', 'emotion', '1e-5', ('-13.037399291992188', '3.619741439819336'), 'emotion recognition (IEMOCAP)',
         config='downstream/emotion/config.yaml', folds=('fold1', 'fold2', 'fold3', 'fold4', 'fold5'),
         aliases=('iemocap',)),
]}


def get_task(name: str) -> Task:
    """A task by its short name (KS), s3prl downstream name (speech_commands) or alias, any case."""
    key = name.strip().lower()
    for task in TASKS.values():
        if key in (task.name.lower(), task.downstream.lower(), *task.aliases):
            return task
    known = ', '.join(f'{t.name} ({t.downstream})' for t in TASKS.values())
    raise SuperbError(f'{name!r} is not one of the SUPERB tasks m2d runs: {known}')


def preset_stats(name: str) -> tuple[str, str]:
    """The statistics (mean, std) the reference's scripts pass for a task, as strings."""
    return get_task(name).stats


def check_stats(mean: str, std: str, what: str) -> tuple[float, float]:
    """MEAN and STD as given -> floats; a SuperbError naming `what` unless both are finite and STD > 0."""
    return parse_mean_std((mean, std), what, SuperbError)


def parse_stats(text: str, what: str = '--stats') -> tuple[str, str]:
    """'MEAN,STD' -> (mean, std) as given (checked to be numbers, std > 0)."""
    parts = [p.strip() for p in str(text).split(',')]
    parse_mean_std(parts if len(parts) == 2 else str(text), what, SuperbError)  # checked; kept as spelled
    return parts[0], parts[1]


def parse_lr(text: str) -> str:
    """A learning rate, kept as spelled (it is part of the experiment name)."""
    try:
        value = float(text)
    except ValueError:
        raise SuperbError(f'--lr {text!r}: not a number') from None
    if not (math.isfinite(value) and value > 0):
        raise SuperbError(f'--lr {text!r}: must be positive')
    return str(text).strip()


def experiment_base(ckpt: str) -> str:
    """`PARENT-STEM` of a weight file, as the scripts name experiments; a released name stays as is."""
    path = Path(ckpt).expanduser()
    if path.suffix or len(path.parts) > 1 or path.exists():
        return f'{path.resolve().parent.name}-{path.stem}'
    return str(ckpt)


def ckpt_argument(ckpt: str) -> str:
    """The weight file as s3prl must see it: an absolute path (s3prl runs in its own folder), or a name."""
    path = Path(ckpt).expanduser()
    if path.suffix or len(path.parts) > 1 or path.exists():
        if ',' in str(path.resolve()):
            raise SuperbError(f'--ckpt {ckpt}: s3prl splits -k at commas; move the file to a path without one')
        return str(path.resolve())
    return str(ckpt)


# s3prl 0.4.18 reads its own checkpoints (dev-best.ckpt: weights, an argparse.Namespace, its config)
# with a bare torch.load. torch >= 2.6 defaults that to weights_only=True, which refuses the Namespace.
# This variable turns the default back to weights_only=False only where the caller did not choose:
# the m2d upstream passes weights_only=True explicitly, so M2D weight files are still loaded safely.
CHECKPOINT_ENV = {'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD': '1'}

DEVICE_RE = re.compile(r'cpu|cuda(:\d+)?')

# s3prl -o keys that `m2d superb run` sets from its own options (the experiment name depends on them).
OWNED_KEYS = {'config.optimizer.lr': '--lr', 'config.downstream_expert.datarc.test_fold': '--folds',
              'args.device': '--device', 'args.seed': '--seed', 'args.expname': '--ckpt/--lr/--seed',
              'args.expdir': '--ckpt/--lr/--seed', 'args.upstream_ckpt': '--ckpt/--stats'}


def check_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' as given; a SuperbError otherwise."""
    device = str(device).strip()
    if not DEVICE_RE.fullmatch(device):
        raise SuperbError(f'--device {device!r}: expected cpu, cuda or cuda:N')
    return device


def parse_overrides(texts: list[str] | None) -> list[str]:
    """-o values ("KEY=VALUE,,KEY=VALUE", s3prl's syntax) -> the options, each checked as s3prl parses it.

    s3prl splits each option at '=' exactly once and accepts keys `config.A.B...` or `args.NAME`.
    """
    options = []
    for text in texts or []:
        for option in str(text).split(',,'):
            option = option.strip()
            key = option.split('=', 1)[0].strip()
            fields = key.split('.')
            if option.count('=') != 1 or not all(fields) or fields[0] not in ('config', 'args') \
                    or len(fields) < 2 or (fields[0] == 'args' and len(fields) != 2):
                raise SuperbError(f'-o {option!r}: expected config.SECTION.KEY=VALUE or args.NAME=VALUE, '
                                  'options joined by ",," (s3prl\'s syntax; a value may not contain "=")')
            if key in OWNED_KEYS:
                raise SuperbError(f'-o {option!r}: use {OWNED_KEYS[key]} for {key} (m2d superb run sets it)')
            options.append(option)
    return options


@dataclass(frozen=True)
class Step:
    """One s3prl experiment: its name, the train command and the evaluate command (argv lists)."""

    task: Task
    name: str
    train: list[str]
    evaluate: list[str]
    fold: str | None = None

    @property
    def expdir(self) -> str:
        """The experiment folder, relative to the s3prl folder."""
        return f'result/downstream/{self.name}'

    @property
    def evaluate_env(self) -> dict[str, str]:
        """Environment of the evaluate command: s3prl reads back its own checkpoint (see CHECKPOINT_ENV)."""
        return dict(CHECKPOINT_ENV)


def task_commands(task: Task, ckpt: str, stats: tuple[str, str] | None = None, seed: int = 7,
                  lr: str | None = None, upstream: str = 'm2d', python: str = 'python',
                  folds: list[str] | None = None, device: str | None = None,
                  overrides: list[str] | None = None) -> list[Step]:
    """The commands of the reference's task script for `task` (one Step per ER fold).

    stats: (mean, std) strings; default the scripts' published statistics of the task. lr: default the
    script's. The -k argument is the absolute path of `ckpt` (or a released name). device: s3prl's
    --device, added to both commands (None: s3prl's default, cuda). overrides: s3prl -o options
    (`parse_overrides`), appended to the training command's own -o; evaluation reads the config saved
    in the checkpoint, so it sees them too.
    """
    stats = stats or task.stats
    lr = lr or task.lr
    k = f'{ckpt_argument(ckpt)},{stats[0]},{stats[1]}'
    base = f'{experiment_base(ckpt)}-{task.name}-lr{lr}-s{seed}'
    if folds and not task.folds:
        raise SuperbError(f'--folds: {task.name} has no folds (only ER has)')
    bad = [f for f in folds or [] if f not in task.folds]
    if bad:
        raise SuperbError(f'--folds {",".join(bad)}: {task.name} folds are {", ".join(task.folds)}')
    steps = []
    for fold in (folds or task.folds or [None]):
        name = f'{base}-{fold}' if fold else base
        override = f'config.optimizer.lr={lr}'
        if fold:
            override += f",, config.downstream_expert.datarc.test_fold='{fold}'"
        if overrides:
            override += ',,' + ',,'.join(overrides)
        train = [python, 'run_downstream.py', '-m', 'train', '-n', name, '-u', upstream, '-d', task.downstream]
        if task.config:
            train += ['-c', task.config]
        train += ['-o', override, '-k', k, '--seed', str(seed)]
        evaluate = [python, 'run_downstream.py', '-m', 'evaluate']
        if task.evaluate_names:
            evaluate += ['-n', name, '-d', task.downstream]
        evaluate += ['-e', f'result/downstream/{name}/dev-best.ckpt']
        if device:
            train += ['--device', device]
            evaluate += ['--device', device]
        steps.append(Step(task, name, train, evaluate, fold))
    return steps


def find_s3prl_dir(root: str | Path, required: bool = True) -> Path:
    """The folder holding `run_downstream.py`: `root/s3prl` (a checkout) or `root` itself."""
    root = Path(root).expanduser()
    for cand in (root / 's3prl', root):
        if (cand / 'run_downstream.py').is_file():
            return cand.resolve()
    if required:
        raise SuperbError(f'--s3prl_root {root}: no run_downstream.py in {root}/s3prl or {root}; '
                          'give the root of an s3prl checkout (git clone https://github.com/s3prl/s3prl)')
    return (root / 's3prl').resolve()


def shell_join(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A command line to paste into a shell, `env` assignments in front; quoted arguments use double
    quotes where that is safe (as the reference's scripts write the -o overrides)."""
    out = [f'{k}={shlex.quote(v)}' for k, v in (env or {}).items()]
    for arg in argv:
        if re.fullmatch(r'[\w@%+=:,./-]+', arg):
            out.append(arg)
        elif not re.search(r'["$`\\!]', arg):
            out.append(f'"{arg}"')
        else:
            out.append(shlex.quote(arg))
    return ' '.join(out)

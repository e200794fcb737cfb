"""Pre-training options: one dataclass, and the argparse options that fill it.

Option names follow the reference ``train_audio.py`` so existing command lines keep working;
defaults are the reference's M2D defaults (``train_audio.py``: input 80x608, patch 16x16, mask 0.7,
300 epochs, warmup 20, batch 512 per process, blr 3e-4, weight decay 0.05, clip 3.0, EMA 0.99995 ->
0.99999, decoder 8 blocks of 512-d with 16 heads), and for ``msm_mae_*`` models those of the
reference's MSM-MAE recipe (``mae_train_audio.py`` + ``models_mae.msm_mae_vit_base``, `RECIPES`).
Every option also has a ``--kebab-case`` spelling. Bad values raise `ConfigError` naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import ModelName
from ..errors import M2DError
from ..normstats import parse_mean_std
from ..vit import WIDTHS

# model-name prefix -> model kind of m2d.models.create_model
FAMILIES = {'m2d': 'm2d', 'msm_mae': 'msm_mae', 'm2d_s': 'm2d_s', 'm2d_x': 'm2d_s'}
_MODEL_RE = re.compile(r'^(?P<family>m2d_s|m2d_x|msm_mae|m2d)_vit_(?P<width>tiny|small|base|large)$')
MODELS = tuple(f'{f}_vit_{w}' for f in FAMILIES for w in WIDTHS)
EVAL_TASKS = ('fsdd-digits', 'fsdd-speakers')  # built-in tasks of `m2d linear-eval --task`
SUITE_SUFFIXES = ('.toml', '.yaml', '.yml')


class ConfigError(M2DError, ValueError):
    """An inconsistent or malformed pre-training option; the message names it."""


@dataclass
class TrainConfig:
    """Everything a pre-training run needs; field names are the command-line option names."""

    # model
    model: str = 'm2d_vit_base'
    input_size: str | None = None
    patch_size: str = '16x16'
    sr: str = '16k'
    depth: int | None = None
    decoder_depth: int | None = None
    decoder_embed_dim: int | None = None
    decoder_num_heads: int | None = None
    mask_ratio: float | None = None
    mask_type: str = 'unstructured'
    cont_mask: int = 0
    norm_pix_loss: bool | None = None
    target_layers: str = ''
    loss_fn: str = 'norm_mse'
    loss_m2d: float = 1.0
    loss_off: float = 0.0
    off_emb_dim: int | None = None
    teacher: str = ''
    noisy_branch: str = ''
    teacher_renorm: bool = False
    # optimization
    epochs: int | None = None
    batch_size: int = 512
    accum_iter: int = 1
    lr: float | None = None
    blr: float = 3e-4
    min_lr: float = 0.0
    warmup_epochs: float = 20
    weight_decay: float = 0.05
    clip_grad: float = 3.0
    ema_decay_init: float = 0.99995
    ema_decay: float = 0.99999
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    compile: str = ''
    keep_freed_memory: bool = True
    optim: str = 'adamw'
    max_steps: int = 0
    stop_at: int = 0
    # data
    data_path: str = ''
    csv_main: str = 'data/files_audioset.csv'
    csv_bg_noise: str = ''
    noise_ratio: float = 0.0
    min_ds_size: int | None = None
    norm_stats: str | None = None
    norm_stats_samples: int = 10000
    num_workers: int = 8
    pin_mem: bool | None = None
    # run
    output_dir: str = ''
    output_root: str = 'runs'
    log_dir: str = ''
    resume: str = ''
    init: str = ''
    save_freq: int | None = None
    save_freq_steps: int = 0
    checkpoint_writes: str = 'sync'
    save_every_minutes: float = 30.0
    slurm_requeue: bool = False
    feature_eval_freq: int = 10
    feature_eval_samples: int = 1000
    log_every: int = 20
    seed: int = 0
    device: str = field(default_factory=lambda: 'cuda' if torch.cuda.is_available() else 'cpu')
    # evaluation of checkpoints (m2d linear-eval in a separate process)
    eval: str = ''
    eval_data_dir: str = ''
    eval_every: int = 0
    eval_device: str = 'auto'

    def __post_init__(self) -> None:
        """Options left at None take the value of the model family's recipe (`RECIPES`)."""
        m = _MODEL_RE.match(self.model or '')
        recipe = RECIPES['msm_mae' if m and m['family'] == 'msm_mae' else 'm2d']
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    # ----- derived ---------------------------------------------------------------------------

    @property
    def input_hw(self) -> tuple[int, int]:
        return parse_size(self.input_size, '--input_size')

    @property
    def patch_hw(self) -> tuple[int, int]:
        return parse_size(self.patch_size, '--patch_size')

    @property
    def sample_rate(self) -> int:
        m = re.fullmatch(r'(\d+)k?', self.sr)
        if not m:
            raise ConfigError(f'--sr must look like 16k or 32k, got {self.sr!r}')
        return int(m[1]) * (1000 if self.sr.endswith('k') else 1)

    @property
    def family(self) -> str:
        return _parse_model(self.model)[0]

    @property
    def kind(self) -> str:
        """The `m2d.models.create_model` kind: 'm2d', 'msm_mae' or 'm2d_s' (M2D-S and M2D-X)."""
        return FAMILIES[self.family]

    @property
    def is_speech(self) -> bool:
        """M2D-S / M2D-X: the dataset comes from `m2d.data.speech.build_speech_dataset`."""
        return self.family in ('m2d_s', 'm2d_x')

    @property
    def grid_size(self) -> tuple[int, int]:
        (f, t), (ph, pw) = self.input_hw, self.patch_hw
        return f // ph, t // pw

    def parsed_norm_stats(self) -> tuple[float, float] | None:
        """``--norm_stats`` as (mean, std); accepts ``-7.1,4.2`` and the reference's ``[-7.1, 4.2]``."""
        if self.norm_stats in (None, '', 'None'):
            return None
        return parse_mean_std(str(self.norm_stats), '--norm_stats', ConfigError)

    def parsed_target_layers(self) -> tuple[int, ...] | None:
        """``--target_layers`` as block indices (``[6,7,8]``, ``6,7,8`` or ``6 7 8``); None when not given."""
        text = str(self.target_layers or '').strip('[]() ')
        if not text:
            return None
        try:
            layers = tuple(int(p) for p in re.split(r'[\s,]+', text) if p)
        except ValueError:
            raise ConfigError(f'--target_layers must list block indices such as 6,7,8, got {self.target_layers!r}') from None
        depth = self.depth or WIDTHS[_parse_model(self.model)[1]][1]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f'--target_layers {self.target_layers}: {bad} outside the {depth} blocks (0..{depth - 1})')
        return layers

    @property
    def noisy(self) -> str:
        """Which branch sees the noise mixture (M2D-S/X): 'online' or 'teacher' (see `check`)."""
        return self.noisy_branch or ('teacher' if self.family == 'm2d_x' else 'online')

    def model_config(self) -> dict:
        """Keyword arguments of `m2d.models.create_model` (without norm_stats and off_emb_dim)."""
        _, width = _parse_model(self.model)
        embed_dim, depth, heads = WIDTHS[width]
        kw = dict(img_size=list(self.input_hw), patch_size=list(self.patch_hw), in_chans=1, embed_dim=embed_dim,
                   depth=self.depth or depth, num_heads=heads, decoder_embed_dim=self.decoder_embed_dim,
                   decoder_depth=self.decoder_depth, decoder_num_heads=self.decoder_num_heads, mlp_ratio=4.0,
                   norm_pix_loss=self.norm_pix_loss, layer_norm_eps=1e-6, mask_ratio=self.mask_ratio,
                   mask_type=self.mask_type, cont_mask=self.cont_mask)
        if self.kind != 'msm_mae':
            kw.update(loss_type=self.loss_fn, target_layers=self.parsed_target_layers())
        if self.kind == 'm2d_s':
            # the reference initializes M2D-X's offline predictor as MAE (xavier), M2D-S's as PyTorch does
            kw.update(loss_m2d=self.loss_m2d, loss_off=self.loss_off,
                      offline_init='xavier' if self.family == 'm2d_x' else 'torch')
        return kw

    def effective_batch_size(self, world_size: int) -> int:
        return self.batch_size * self.accum_iter * world_size

    def settings_id(self) -> str:
        """8 hex digits that identify what this run trains: a hash of the options that are not at their
        default, leaving out those that do not change the weights (`OPERATIONAL`). The same command,
        on any day and whatever its --resume, --num_workers or logging options, gives the same id."""
        default = TrainConfig(model=self.model)
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in OPERATIONAL and getattr(self, f.name) != getattr(default, f.name)}
        text = json.dumps(given, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def default_run_name(self) -> str:
        """``MODEL-FxTpPHxPWpSRk-SETTINGS-mrN`` (SETTINGS: `settings_id`): a name
        `m2d.checkpoint.parse_model_name` reads back, the same every time the same command starts."""
        name = ModelName(self.model, self.input_hw, self.patch_hw, self.sample_rate).format()
        ratio = f'{self.mask_ratio:g}'.replace('0.', '', 1).replace('.', '')
        return f'{name}-{self.settings_id()}-mr{ratio}'

    def resolve_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.output_root) / self.default_run_name()

    def eval_task_args(self) -> list[str]:
        """The task options of ``m2d linear-eval`` that ``--eval`` and ``--eval_data_dir`` name
        (empty without ``--eval``): a built-in task, a suite file, a CSV task or a folder task."""
        if not self.eval:
            return []
        data_dir = Path(self.eval_data_dir) if self.eval_data_dir else None
        if data_dir is not None and not data_dir.is_dir():
            raise ConfigError(f'--eval_data_dir {self.eval_data_dir}: no such folder')
        path = Path(self.eval)
        if self.eval in EVAL_TASKS:
            if data_dir is None:
                raise ConfigError(f'--eval {self.eval} needs --eval_data_dir DIR, the local copy of its data')
            return ['--task', self.eval, '--data_dir', str(data_dir)]
        if path.suffix.lower() in SUITE_SUFFIXES:
            if not path.is_file():
                raise ConfigError(f'--eval {self.eval}: no such suite file')
            return ['--suite', str(path)]
        if path.suffix.lower() == '.csv':
            if not path.is_file():
                raise ConfigError(f'--eval {self.eval}: no such task CSV')
            if data_dir is None:
                raise ConfigError(f'--eval {self.eval} needs --eval_data_dir DIR, the folder of its audio files')
            return ['--csv', str(path), '--data_dir', str(data_dir)]
        if path.is_dir():
            return ['--data_dir', str(path)]
        raise ConfigError(f'--eval {self.eval}: not a built-in task ({", ".join(EVAL_TASKS)}), a suite file '
                          f'({", ".join(SUITE_SUFFIXES)}), a task CSV or a folder of class folders')

    def check(self) -> 'TrainConfig':
        """Raise `ConfigError` naming the option for inconsistent settings."""
        _parse_model(self.model)
        (f, t), (ph, pw) = self.input_hw, self.patch_hw
        if f % ph or t % pw:
            raise ConfigError(f'--input_size {self.input_size} is not a multiple of --patch_size {self.patch_size}')
        self.parsed_norm_stats()
        _ = self.sample_rate
        for name in ('epochs', 'batch_size', 'accum_iter', 'log_every'):
            if getattr(self, name) < 1:
                raise ConfigError(f'--{name} must be >= 1, got {getattr(self, name)}')
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f'--mask_ratio must be in [0, 1), got {self.mask_ratio}')
        if not 0 <= self.noise_ratio <= 1:
            raise ConfigError(f'--noise_ratio must be in [0, 1], got {self.noise_ratio}')
        if self.cont_mask and self.mask_type == 'unstructured':
            self.mask_type = 'time_continuous'
        if self.loss_off and not self.is_speech:
            raise ConfigError(f'--loss_off {self.loss_off} needs an M2D-S/M2D-X model (m2d_s_vit_*, m2d_x_vit_*), '
                             f'got --model {self.model}')
        if self.family == 'm2d_x' and self.loss_off and not self.teacher:
            raise ConfigError('--model m2d_x_* with --loss_off > 0 needs --teacher WEIGHTS')
        if self.noisy_branch and self.noisy_branch not in NOISY_BRANCHES:
            raise ConfigError(f'--noisy_branch must be one of {", ".join(NOISY_BRANCHES)}, got {self.noisy_branch!r}')
        if self.noisy_branch and not self.is_speech:
            raise ConfigError(f'--noisy_branch is for M2D-S/M2D-X models (m2d_s_vit_*, m2d_x_vit_*), got --model '
                              f'{self.model}')
        if self.noisy_branch == 'teacher' and self.family == 'm2d_s':
            raise ConfigError("--noisy_branch teacher is for M2D-X: M2D-S's teacher features are precomputed from "
                              'clean speech (m2d teacher-features); its online branch sees the mixture')
        if self.teacher_renorm and not self.teacher:
            raise ConfigError('--teacher_renorm needs --teacher WEIGHTS (an M2D-X teacher)')
        if sum((self.bf16, self.fp16, self.fp32)) > 1:
            raise ConfigError('--bf16, --fp16 and --fp32 exclude each other; give one')
        self.parsed_target_layers()
        if self.target_layers and self.kind == 'msm_mae':
            raise ConfigError('--target_layers needs a model with a target encoder (m2d, m2d_s, m2d_x); '
                              f'--model {self.model} reconstructs pixels')
        if self.compile and self.compile not in COMPILE_MODES:
            raise ConfigError(f'--compile must be one of {", ".join(COMPILE_MODES)}, got {self.compile!r}')
        if self.checkpoint_writes not in CHECKPOINT_WRITES:
            raise ConfigError(f'--checkpoint_writes must be one of {", ".join(CHECKPOINT_WRITES)}, '
                              f'got {self.checkpoint_writes!r}')
        if self.optim not in ('adamw', 'sgd'):
            raise ConfigError(f'--optim must be adamw or sgd, got {self.optim!r}')
        if self.save_freq < 1 or min(self.feature_eval_freq, self.save_freq_steps, self.max_steps, self.eval_every) < 0:
            raise ConfigError('--save_freq must be >= 1; --feature_eval_freq, --save_freq_steps, --max_steps, '
                              '--eval_every >= 0')
        if self.eval_every and not self.eval:
            raise ConfigError('--eval_every needs --eval TASK_OR_SUITE_FILE')
        if self.save_every_minutes < 0:
            raise ConfigError(f'--save_every_minutes must be >= 0 (0: off), got {self.save_every_minutes}')
        if self.eval_device != 'auto':
            try:
                torch.device(self.eval_device)
            except (RuntimeError, ValueError):
                raise ConfigError(f'--eval_device must be auto, cpu, cuda or cuda:N, '
                                  f'got {self.eval_device!r}') from None
        self.eval_task_args()
        return self

    def saves_epoch(self, epoch_done: int) -> bool:
        """Whether ``checkpoint-EPOCH.pth`` is written after epoch `epoch_done` (1-based)."""
        return (epoch_done % self.save_freq == 0 or epoch_done == self.epochs
                or bool(self.evaluates_epoch(epoch_done)))

    def evaluates_epoch(self, epoch_done: int) -> bool:
        """Whether the checkpoint of epoch `epoch_done` is evaluated (``--eval``, ``--eval_every``)."""
        if not self.eval:
            return False
        if self.eval_every:
            return epoch_done % self.eval_every == 0
        return epoch_done % self.save_freq == 0

    def to_namespace(self, **extra) -> argparse.Namespace:
        """The ``args`` entry of a checkpoint: plain values only (loads with ``weights_only=True``)."""
        d = dataclasses.asdict(self)
        d['input_size'] = list(self.input_hw)  # as the reference stores them
        d['patch_size'] = list(self.patch_hw)
        ns = self.parsed_norm_stats()
        d['norm_stats'] = list(ns) if ns else None
        d.update(extra)
        return argparse.Namespace(**d)


def parse_size(text: str | tuple | list, option: str) -> tuple[int, int]:
    """``'80x608'`` -> (80, 608)."""
    if isinstance(text, (tuple, list)):
        return int(text[0]), int(text[1])
    m = re.fullmatch(r'\s*(\d+)\s*x\s*(\d+)\s*', str(text))
    if not m:
        raise ConfigError(f'{option} must look like 80x608, got {text!r}')
    return int(m[1]), int(m[2])


def _parse_model(name: str) -> tuple[str, str]:
    m = _MODEL_RE.match(name)
    if not m:
        raise ConfigError(f'--model {name!r} is not one of {", ".join(MODELS)}')
    return m['family'], m['width']


def _flags(name: str) -> list[str]:
    """``--snake_case`` and its ``--kebab-case`` alias."""
    return list(dict.fromkeys([f'--{name}', f'--{name.replace("_", "-")}']))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `m2d pretrain` options (reference names, each also as ``--kebab-case``), defaults from `TrainConfig`."""
    d = TrainConfig()

    def opt(group, name: str, help: str, show_default: bool = True, aliases: tuple[str, ...] = (), **kw) -> None:
        kw.setdefault('default', getattr(d, name))
        if 'type' not in kw and 'action' not in kw and isinstance(kw['default'], (int, float)):
            kw['type'] = type(kw['default'])
        group.add_argument(*_flags(name), *aliases, dest=name,
                           help=help + (' (default %(default)s)' if show_default else ''), **kw)

    g = parser.add_argument_group('model')
    opt(g, 'model', '(m2d|msm_mae|m2d_s|m2d_x)_vit_(tiny|small|base|large)', metavar='MODEL')
    opt(g, 'input_size', 'input LMS FxT (default 80x608; msm_mae: 80x208)', False, default=None)
    opt(g, 'patch_size', 'patch PHxPW')
    opt(g, 'sr', 'sample rate of the LMS, recorded in the run name')
    opt(g, 'depth', "encoder depth override (default: the width's 12)", False, type=int)
    opt(g, 'decoder_depth', 'decoder blocks (default 8; msm_mae: 4)', False, default=None, type=int)
    opt(g, 'decoder_embed_dim', 'decoder width (default 512; msm_mae: 384)', False, default=None, type=int)
    opt(g, 'decoder_num_heads', 'decoder heads (default 16; msm_mae: 6)', False, default=None, type=int)
    opt(g, 'mask_ratio', 'masked fraction of patches (default 0.7; msm_mae: 0.75)', False, default=None, type=float)
    opt(g, 'mask_type', 'mask kind', choices=('unstructured', 'structured', 'time_continuous'))
    opt(g, 'cont_mask', 'time-continuous masks of N-time-patch spans (0: off; implies --mask_type time_continuous)')
    g.add_argument(*_flags('norm_pix_loss'), action='store_const', const=True, dest='norm_pix_loss', default=None,
                   help='standardize the targets per patch / token (default for m2d, m2d_s, m2d_x)')
    g.add_argument(*_flags('no_norm_pix_loss'), action='store_const', const=False, dest='norm_pix_loss',
                   help='do not standardize the targets (default for msm_mae: raw-pixel targets)')
    opt(g, 'target_layers', 'average the outputs of these target-encoder blocks (0-based, e.g. 6,7,8) before '
        'target_norm, as the reference (default: the last block only)', False)
    opt(g, 'loss_fn', 'M2D loss', choices=('norm_mse', 'mse'))
    opt(g, 'loss_m2d', 'M2D-S/X: weight of the M2D loss')
    opt(g, 'loss_off', 'M2D-S/X: weight of the offline-target loss')
    opt(g, 'off_emb_dim', 'M2D-S/X: offline target width (default: from the data or teacher)', False, type=int)
    opt(g, 'teacher', 'M2D-X: weight file of the teacher model', False)
    opt(g, 'noisy_branch', 'M2D-S/X with --noise_ratio > 0: the branch that gets the noise mixture; the other gets '
        'clean input. M2D-X default teacher (clean to online + EMA target, mixture to the teacher, as the '
        "reference's code); online gives the mixture to the online branch (the reference's comment). M2D-S: "
        'online only', False, choices=NOISY_BRANCHES)
    g.add_argument(*_flags('teacher_renorm'), action='store_true', dest='teacher_renorm',
                   help="M2D-X: re-normalize the teacher's input to the teacher's own norm_stats (default: the "
                        "student-normalized LMS as is, as the reference)")

    g = parser.add_argument_group('optimization')
    opt(g, 'epochs', 'epochs (default 300; msm_mae: 200)', False, default=None, type=int)
    opt(g, 'batch_size', 'batch per process; effective batch = batch_size x accum_iter x processes')
    opt(g, 'accum_iter', 'gradient accumulation steps')
    opt(g, 'lr', 'absolute learning rate (default: blr x effective batch / 256)', False, type=float)
    opt(g, 'blr', 'base learning rate')
    opt(g, 'min_lr', 'final learning rate of the cosine')
    opt(g, 'warmup_epochs', 'linear warmup epochs', type=float)
    opt(g, 'weight_decay', 'AdamW weight decay (none on biases, norms and 1-D parameters)')
    opt(g, 'clip_grad', 'gradient norm clip, 0 = off')
    opt(g, 'ema_decay_init', 'EMA decay at step 0')
    opt(g, 'ema_decay', 'EMA decay at the last step')
    x = g.add_mutually_exclusive_group()
    x.add_argument('--bf16', action='store_true', help='bfloat16 autocast (the default on GPUs that support it; '
                   'on a CPU only with this option)')
    x.add_argument('--fp16', action='store_true', help='CUDA: float16 autocast with loss scaling (the reference\'s '
                   'default; the default on GPUs without bfloat16)')
    x.add_argument('--fp32', action='store_true', help='float32 throughout (the default on a CPU)')
    g.add_argument('--compile', nargs='?', const='default', default='', choices=COMPILE_MODES, metavar='MODE',
                   help='torch.compile every transformer block (meant for GPUs; 4 %% faster on a CPU, after the first '
                        'steps compile). MODE: '
                        f'{", ".join(COMPILE_MODES)} (default when given without a value: default; eager only '
                        'captures the graphs, to check that they compile)')
    g.add_argument(*_flags('no_keep_freed_memory'), dest='keep_freed_memory', action='store_false',
                   help='on CPU, let malloc return freed memory to the system at once (by default it is kept '
                        'for reuse: fewer page faults per step, see m2d.malloc)')
    opt(g, 'optim', "adamw (betas 0.9, 0.95) or sgd (momentum 0.9); both with the weight-decay groups, as the "
        'reference', choices=('adamw', 'sgd'))
    opt(g, 'max_steps', 'stop after this many loader iterations (0: run all epochs)')
    opt(g, 'stop_at', 'stop after this epoch, keeping the schedule of --epochs (0: off)')

    g = parser.add_argument_group('data')
    opt(g, 'data_path', 'folder the CSV paths are relative to (default: guessed from the CSV location)', False)
    opt(g, 'csv_main', 'CSV (column file_name) or folder of the LMS .npy files (--dataset: the reference '
        "README's name)", aliases=('--dataset',))
    opt(g, 'csv_bg_noise', 'M2D-S: CSV of background-noise LMS files', False)
    opt(g, 'noise_ratio', 'M2D-S: noise mixing ratio')
    opt(g, 'min_ds_size', 'repeat smaller file lists up to this size (default 10000; msm_mae: 0)', False,
        default=None, type=int)
    opt(g, 'norm_stats', 'MEAN,STD of the LMS (default: computed from random crops)', False)
    opt(g, 'norm_stats_samples', 'random crops used to compute the normalization statistics')
    opt(g, 'num_workers', 'data loader workers per process')
    g.add_argument(*_flags('pin_mem'), dest='pin_mem', action='store_const', const=True, default=None,
                   help='pin host memory in the data loader (default: on with CUDA)')
    g.add_argument(*_flags('no_pin_mem'), dest='pin_mem', action='store_const', const=False,
                   help='do not pin host memory')

    g = parser.add_argument_group('run')
    opt(g, 'output_dir', 'run folder (default: OUTPUT_ROOT/MODEL-FxTpPHxPWpSRk-SETTINGS-mrN, SETTINGS 8 hex '
        'digits of a hash of the options that change the weights: the same command gives the same folder on any '
        'day, so --resume auto continues it)', False)
    opt(g, 'output_root', 'parent of the default run folder')
    opt(g, 'log_dir', 'TensorBoard folder (default: the run folder)', False)
    opt(g, 'resume', 'continue a run: a checkpoint file of this model\'s run, or "auto" for '
        'OUTPUT_DIR/checkpoint-last.pth if present. Any other checkpoint (a released M2D one) is loaded as the '
        'reference does: weights only, non-strictly, from epoch 0 with a new optimizer (as --init)', False)
    opt(g, 'init', 'start from the weights of a full checkpoint (e.g. a released M2D one), loading what matches '
        'and naming what starts fresh; new optimizer and schedule, the file\'s norm_stats unless --norm_stats', False)
    opt(g, 'save_freq', 'write checkpoint-EPOCH.pth every N epochs (and at the end) (default 100; msm_mae: 50)',
        False, default=None, type=int)
    opt(g, 'save_freq_steps', 'also write checkpoint-last.pth mid-epoch every N loader iterations (at an '
        'optimizer step; use a multiple of --accum_iter; 0: off)')
    opt(g, 'checkpoint_writes', 'sync: the step waits while a checkpoint is written; background: the step waits '
        'only for a copy of the state in host memory while a thread writes the file (meant for GPUs; on a CPU '
        'the writer competes with the step)', choices=CHECKPOINT_WRITES)
    opt(g, 'save_every_minutes', 'also write checkpoint-last.pth (at an optimizer step) when this many minutes '
        'have passed since the last checkpoint; 0: off', type=float)
    g.add_argument(*_flags('slurm_requeue'), action='store_true', dest='slurm_requeue',
                   help='after a stop by SIGUSR1 (sbatch --signal=USR1@SECONDS), rank 0 runs scontrol requeue '
                        '$SLURM_JOB_ID once the checkpoint is written (as PyTorch Lightning does)')
    opt(g, 'feature_eval_freq', 'effective rank (RankMe) of encoder features every N epochs, 0 = off')
    opt(g, 'feature_eval_samples', 'samples of the fixed effective-rank sample')
    opt(g, 'log_every', 'console and log.jsonl every N steps')
    opt(g, 'seed', 'random seed')
    opt(g, 'device', 'cpu or cuda; torchrun picks cuda:LOCAL_RANK')

    g = parser.add_argument_group('evaluation of checkpoints (m2d linear-eval in a separate process, rank 0)')
    opt(g, 'eval', 'evaluate checkpoints on this task: a built-in task (fsdd-digits, fsdd-speakers; with '
        '--eval_data_dir), a suite file (.toml/.yaml), a task CSV (with --eval_data_dir) or a folder of class '
        'folders. Quick runs (1 seed, no baselines) while training; the final checkpoint gets the whole task '
        'with baselines, summarized in RUN/eval_summary.md', False, metavar='TASK_OR_SUITE_FILE')
    opt(g, 'eval_data_dir', 'the data folder of a built-in or CSV --eval task', False, metavar='DIR')
    opt(g, 'eval_every', 'evaluate every N epochs (writing checkpoint-EPOCH.pth then too); 0: each '
        '--save_freq checkpoint', metavar='N')
    opt(g, 'eval_device', "where m2d linear-eval runs: auto (a GPU of this node that the run does not train on, if "
        "any, else the CPU: never memory of a training GPU), cpu, cuda:N (cuda:0 shares rank 0's GPU)",
        metavar='DEVICE')

    g = parser.add_argument_group('reference options refused with a message')
    for name in REFUSED_OPTIONS:
        g.add_argument(*_flags(name), dest=name, default=None, nargs='?', const=True, metavar='X',
                       help=argparse.SUPPRESS)


CHECKPOINT_WRITES = ('sync', 'background')
# options that do not change what a run trains: left out of the default run folder's name (`settings_id`)
OPERATIONAL = frozenset({
    'output_dir', 'output_root', 'log_dir', 'resume', 'num_workers', 'pin_mem', 'device', 'compile',
    'keep_freed_memory', 'max_steps', 'stop_at', 'save_freq', 'save_freq_steps', 'checkpoint_writes',
    'save_every_minutes', 'slurm_requeue', 'feature_eval_freq', 'feature_eval_samples', 'log_every', 'eval',
    'eval_data_dir', 'eval_every', 'eval_device'})
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs', 'eager')


def compile_options(mode: str) -> dict:
    """Keywords of ``torch.compile`` for a ``--compile`` MODE ('eager': the eager backend, no code generation)."""
    return {'backend': 'eager'} if mode == 'eager' else {'mode': mode}


NOISY_BRANCHES = ('teacher', 'online')

# The values of the model families' recipes for the options whose default is None.
RECIPES = {
    # train_audio.py (M2D, and M2D-S / M2D-X when trained with it)
    'm2d': dict(input_size='80x608', decoder_depth=8, decoder_embed_dim=512, decoder_num_heads=16, mask_ratio=0.7,
                norm_pix_loss=True, epochs=300, min_ds_size=10000, save_freq=100),
    # mae_train_audio.py + models_mae.msm_mae_vit_base: 384-d, 4-block, 6-head decoder, raw-pixel targets
    # (MAE's --norm_pix_loss off), mask 0.75, 80x208, 200 epochs, save every 50, no list inflation
    'msm_mae': dict(input_size='80x208', decoder_depth=4, decoder_embed_dim=384, decoder_num_heads=6, mask_ratio=0.75,
                    norm_pix_loss=False, epochs=200, min_ds_size=0, save_freq=50),
}

# Options of the reference scripts that m2d does not have; given, they stop the run with the reason.
_TORCHRUN = 'processes come from torchrun (torchrun --nproc_per_node N -m m2d pretrain ...)'
_EPOCH = ('a run continues from its checkpoint\'s epoch with --resume; --init or a released checkpoint starts at '
          'epoch 0')
REFUSED_OPTIONS = {
    'eval_after': 'evaluation runs with --eval TASK and --eval_every N',
    'start_epoch': _EPOCH, 'force_start_epoch': _EPOCH,
    'world_size': _TORCHRUN, 'local_rank': _TORCHRUN, 'dist_on_itp': _TORCHRUN, 'dist_url': _TORCHRUN,
    'csv_val': 'no validation loss here; follow the run with --eval or the effective rank (--feature_eval_freq)',
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A checked `TrainConfig` from parsed options (unknown attributes are ignored); a refused
    reference option raises `ConfigError` with the reason."""
    for name, reason in REFUSED_OPTIONS.items():
        if getattr(args, name, None) is not None:
            raise ConfigError(f'--{name} is not an option of m2d pretrain: {reason}')
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}).check()

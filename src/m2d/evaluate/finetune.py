"""Fine-tuning an M2D encoder with EVAR's classification head on a labeled audio task.

The protocol of EVAR's ``finetune.py`` (METHOD.md, "Downstream protocol"):

- model: waveform -> log-mel -> normalized with the weight file's statistics (or ``norm_stats='auto'``,
  computed on the train split as EVAR does) -> [train: SpecAugment, random resize crop] -> encoder
  (train: with a structured patch mask when ``training_mask > 0``) -> mean over time -> head
  ``BatchNorm1d(D, affine=False)`` -> ``Linear(D, C)`` (init N(0, 0.01), bias 0). Features are flat
  (``D`` per patch) when ``training_mask > 0`` and stacked (``Fp*D`` per time step) otherwise, as in
  the reference; at evaluation the encoder is exactly `RuntimeM2D.encode`.
- data: train clips randomly cropped to the unit (zero-padded when short), valid/test clips cropped
  from the start; mixup on waveforms and one-hot targets (λ ~ Beta(α, α) per sample, partner = the
  reversed batch).
- loss: EVAR's ``-mean(y * log_softmax(logits))`` (soft-target cross-entropy divided by the number
  of classes, so EVAR's learning rates carry over), or BCE with logits for multi-label tasks.
- optimizer: SGD (momentum 0.9, no weight decay), AdamW (β 0.9/0.95, weight decay 1e-4, amsgrad)
  or LARS; learning rate per iteration as timm's ``CosineLRScheduler`` in EVAR: linear warmup from 0
  over ``warmup_epochs``, then ``min_lr + (lr - min_lr)·½(1 + cos(π e / E))`` (the cosine counts from
  epoch 0, not from the end of the warmup: timm's default).
- selection: the validation metric (accuracy, or mAP for multi-label) after every epoch; the best
  epoch is saved and tested. ``patience`` > 0 stops after that many epochs without improvement
  (EVAR's default is no early stopping).

Differences from the reference, on purpose: SpecAugment bands are drawn per sample; clips are not
padded to the model's full input length (608 frames) before encoding, so the encoder and the
fine-tuned file compute exactly what `RuntimeM2D` computes; valid clips are not randomly cropped.

The best checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: EVAR's keys
``module.ar.runtime.backbone.*``, ``module.head.norm.running_mean/var``,
``module.head.mlp.mlp.0.weight/bias``, plus ``norm_stats`` (tensor [2], read by the reference's
portable runtime too), ``classes`` (list of str), ``m2d_name`` (geometry and sample rate, e.g.
``m2d_vit_base-80x608p16x16p16k``) and ``m2d_finetune`` (a JSON string: task, metric, multilabel,
epoch, unit_sec). It loads in ``RuntimeM2D(path, num_classes=C)``; its folder is named
``<m2d_name>-<task>`` so the reference's loaders, which parse the folder name, load it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import Checkpoint, ModelName, load_checkpoint, save_checkpoint
from ..errors import M2DError
from ..fileio import atomic_path
from ..masking import gather_tokens, structured_mask
from ..normstats import parse_mean_std
from ..runtime import RuntimeM2D, resolve_device
from ..vit import WIDTHS
from . import metrics
from .augment import mixup, random_resize_crop, spec_mask
from .tasks import Clip, Task, load_clip

log = logging.getLogger(__name__)

OPTIMIZERS = ('sgd', 'adamw', 'lars')
CHECKPOINT_FILE = 'weights_best.pth'
REPORT_JSON, REPORT_MD = 'report.json', 'report.md'
CURVES_PNG, CONFUSION_PNG = 'learning_curves.png', 'confusion_matrix.png'
CACHE_BYTES = 4 << 30  # train/valid/test waveforms kept in memory up to this size; read per batch beyond


class FinetuneError(M2DError, ValueError):
    """A fine-tuning setting or input that cannot be used; the message names the option or file."""


@dataclass
class FinetuneSettings:
    """Options of `finetune`, named as EVAR's ``finetune.py`` options (defaults: EVAR's ``m2d.yaml``)."""

    lr: float = 2.0
    batch_size: int = 128
    epochs: int = 200
    warmup_epochs: float = 5.0
    optim: str = 'sgd'
    mixup: float = 0.5
    rrc: bool = True
    freq_mask: int = 30
    time_mask: int = 192
    training_mask: float = 0.0
    patience: int = 0                      # 0: no early stopping (EVAR's ft_early_stop_epochs -1)
    seed: int = 0
    norm_stats: str | tuple[float, float] | None = None  # None: the weight file's; 'auto': train split
    min_lr: float = 1e-7
    weight_decay: float | None = None      # None: 0 for sgd/lars, 1e-4 for adamw (EVAR)
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
               ('--workers', self.workers, self.workers < 0, 'must be >= 0')]
        for name, value, failed, why in bad:
            if failed:
                raise FinetuneError(f'{name} {value}: {why}')
        if self.weight_decay is not None and self.weight_decay < 0:
            raise FinetuneError(f'--weight_decay {self.weight_decay}: must be >= 0')
        parse_norm_stats(self.norm_stats)


def parse_norm_stats(spec: str | Iterable[float] | None) -> tuple[float, float] | str | None:
    """None (the weight file's), 'auto', or ``(mean, std)`` from ``'MEAN,STD'`` or a pair."""
    if spec is None or spec == 'auto':
        return spec
    return parse_mean_std(spec, '--norm_stats', FinetuneError, expected='auto or MEAN,STD')


# ---------------------------------------------------------------------------------------------
# model


class EvarHead(nn.Module):
    """EVAR's ``TaskHead``: ``BatchNorm1d(D, affine=False)`` then ``Linear(D, C)``, same key names
    (``norm.*``, ``mlp.mlp.0.*``); the Linear starts at N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        linear = nn.Linear(dim, num_classes)
        nn.init.normal_(linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(linear.bias)
        self.mlp = nn.ModuleDict({'mlp': nn.Sequential(linear)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip features ``[B, D]`` -> logits ``[B, C]``."""
        return self.mlp['mlp'](self.norm(x))


class FinetuneModel(nn.Module):
    """`RuntimeM2D` (front-end + encoder) and an `EvarHead`, with the training-time extras.

    Args:
        checkpoint: the encoder's weights (any file `load_checkpoint` reads).
        num_classes: head outputs.
        training_mask: ratio of the structured patch mask applied while training (flat features).
        norm_stats: (mean, std) used to normalize the log-mel input; default the checkpoint's.
    """

    def __init__(self, checkpoint: Checkpoint, num_classes: int, training_mask: float = 0.0,
                 norm_stats: tuple[float, float] | None = None):
        super().__init__()
        self.runtime = RuntimeM2D(checkpoint=checkpoint, flat_features=training_mask > 0)
        if norm_stats is not None:
            self.runtime.norm_stats.copy_(torch.tensor(norm_stats, dtype=torch.float32))
        self.training_mask = float(training_mask)
        self.head = EvarHead(self.runtime.feature_d, num_classes)
        # Augmentations of the normalized LMS while training; set by `finetune`.
        self.freq_mask, self.time_mask, self.rrc = 0, 0, False
        self.generator: torch.Generator | None = None

    def augment(self, lms: torch.Tensor) -> torch.Tensor:
        """SpecAugment then random resize crop (EVAR's order), as configured."""
        if self.freq_mask or self.time_mask:
            lms = spec_mask(lms, self.freq_mask, self.time_mask, self.generator)
        if self.rrc:
            lms = random_resize_crop(lms, self.generator)
        return lms

    def _encode_masked(self, lms: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, 1, F, T]`` dropping a structured mask of patches per model-length chunk;
        returns the visible patch features ``[B, N_visible, D]`` of all chunks."""
        backbone, cfg = self.runtime.backbone, self.runtime.cfg
        unit, pw = cfg.input_size[1], cfg.patch_size[1]
        used = cfg.grid_size[1] * pw
        chunks = [lms[..., s:s + unit][..., :used] for s in range(0, lms.shape[-1] - lms.shape[-1] % unit, unit)]
        rest = lms.shape[-1] % unit
        if rest:
            chunks.append(F.pad(lms[..., lms.shape[-1] - rest:], (0, (pw - rest % pw) % pw)))
        B, outs = lms.shape[0], []
        for chunk in chunks:
            x = backbone.embed(chunk)                                   # [B, Fp*Tp', D]
            grid = (cfg.grid_size[0], x.shape[1] // cfg.grid_size[0])
            mask = structured_mask(B, grid, self.training_mask, device=x.device, generator=self.generator)
            x = gather_tokens(x, mask.ids_keep)
            x = backbone.run_blocks(torch.cat([backbone.cls_with_pos(B), x], dim=1))
            outs.append(x[:, 1:])
        return torch.cat(outs, dim=1)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` -> clip features ``[B, feature_d]`` (augmented and masked in train mode)."""
        lms = self.runtime.normalize_batch(self.runtime.to_feature(wav))
        if self.training:
            lms = self.augment(lms)
            if self.training_mask > 0:
                return self._encode_masked(lms).mean(1)
        return self.runtime.encode_lms(lms).mean(1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` -> logits ``[B, C]`` (the head runs in float32)."""
        return self.head(self.features(wav).float())


# ---------------------------------------------------------------------------------------------
# the fine-tuned file


def model_name(ckpt: Checkpoint) -> str:
    """Geometry name of the encoder, e.g. ``m2d_vit_base-80x608p16x16p16k``."""
    model = ckpt.model_name or 'm2d_vit_' + next((w for w, d in WIDTHS.items() if d[0] == ckpt.vit.embed_dim), 'custom')
    return ModelName(model, ckpt.vit.input_size, ckpt.vit.patch_size, ckpt.sample_rate).format()


def finetuned_state(model: FinetuneModel, classes: list[str], name: str, info: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned file's content (see the module docstring): tensors under EVAR's keys + metadata."""
    out: dict[str, Any] = {}
    for k, v in model.runtime.backbone.state_dict().items():
        out['module.ar.runtime.backbone.' + k] = v.detach().float().cpu().clone()
    for k, v in model.head.state_dict().items():
        out['module.head.' + k] = v.detach().cpu().clone()
    out['norm_stats'] = model.runtime.norm_stats.detach().cpu().clone()
    out['classes'] = [str(c) for c in classes]
    out['m2d_name'] = name
    out['m2d_finetune'] = json.dumps(info)
    return out


def checkpoint_path(output_dir: Path, name: str, task_name: str) -> Path:
    """``OUTPUT_DIR/<m2d_name>-<task>/weights_best.pth`` (the folder name tells the reference the geometry)."""
    slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', task_name).strip('_') or 'task'
    return output_dir / f'{name}-{slug}' / CHECKPOINT_FILE


def default_output_dir(weights: str | Path, task: Task) -> Path:
    """``eval/<weights-name>/<task>/finetune`` (the linear evaluation's folder, plus ``finetune``)."""
    from .linear import weights_name

    return Path('eval') / weights_name(weights) / task.name / 'finetune'


# ---------------------------------------------------------------------------------------------
# data


class ClipData(torch.utils.data.Dataset):
    """Waveforms ``[unit_samples]`` and float targets ``[C]`` of a split.

    Train clips (``random_crop``) are read whole and cropped at a random place each time (short
    ones zero-padded); others are cropped from the start (`load_clip`). With ``cache``, the audio
    read once is kept in memory.
    """

    def __init__(self, clips: list[Clip], targets: np.ndarray, sample_rate: int, unit_samples: int,
                 random_crop: bool, cache: bool):
        self.clips, self.targets = clips, torch.from_numpy(targets.astype(np.float32))
        self.sample_rate, self.unit_samples, self.random_crop = sample_rate, unit_samples, random_crop
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.clips)

    def _read(self, i: int) -> np.ndarray:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        from ..audio import load_audio

        path = self.clips[i].path
        wav = load_audio(path, self.sample_rate) if self.random_crop else load_clip(path, self.sample_rate,
                                                                                     self.unit_samples)
        if self.cache is not None:
            self.cache[i] = wav
        return wav

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        wav = self._read(i)
        n = self.unit_samples
        if len(wav) > n:
            # torch's RNG: seeded by the run, and differently in each DataLoader worker
            start = int(torch.randint(0, len(wav) - n + 1, ())) if self.random_crop else 0
            wav = wav[start:start + n]
        elif len(wav) < n:
            wav = np.pad(wav, (0, n - len(wav)))
        return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), self.targets[i]


def one_hot_targets(task: Task, clips: list[Clip]) -> np.ndarray:
    """``[N, C]`` float32 targets: one-hot, or multi-hot for a multi-label task."""
    y = task.targets(clips)
    if task.multilabel:
        return y.astype(np.float32)
    return np.eye(len(task.classes), dtype=np.float32)[y]


# ---------------------------------------------------------------------------------------------
# metrics and losses


def evar_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """BCE with logits (multi-label), else EVAR's ``-mean(y * log_softmax(logits))`` over ``[B, C]``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return -(targets * F.log_softmax(logits, dim=-1)).mean()


def evaluate_scores(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """The task's metric from logits and ``[N, C]`` targets: mAP (multi-label) or accuracy."""
    return metrics.score(targets if multilabel else targets.argmax(1), logits, multilabel)


def class_accuracy(logits: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Per-class accuracy of a single-label task (classes that have test clips)."""
    acc = metrics.class_accuracy(targets.argmax(1), logits.argmax(1), len(classes))
    return {c: float(a) for c, a in zip(classes, acc) if not np.isnan(a)}


# ---------------------------------------------------------------------------------------------
# optimization


class LARS(torch.optim.Optimizer):
    """LARS (as in MAE's fine-tuning): for weights with ndim > 1, the update (gradient + weight decay)
    is scaled by ``trust · ‖w‖ / ‖update‖``; then momentum SGD. Biases and norms are not scaled."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group['weight_decay'])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    q = torch.where((w_norm > 0) & (d_norm > 0), group['trust_coefficient'] * w_norm / d_norm,
                                    torch.ones_like(w_norm))
                    d = d.mul(q)
                mu = self.state[p].setdefault('mu', torch.zeros_like(p))
                mu.mul_(group['momentum']).add_(d)
                p.add_(mu, alpha=-group['lr'])
        return loss


def make_optimizer(params: list[nn.Parameter], s: FinetuneSettings) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), AdamW (β 0.9/0.95, eps 1e-8, amsgrad) or LARS, as EVAR builds them."""
    if s.optim == 'sgd':
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay or 0.0)
    if s.optim == 'adamw':
        wd = 1e-4 if s.weight_decay is None else s.weight_decay
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8, amsgrad=True)
    return LARS(params, lr=s.lr, weight_decay=s.weight_decay or 0.0)


def learning_rate(epoch: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = 1e-7) -> float:
    """timm's ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t, warmup_lr_init=0)`` at fractional
    `epoch`: ``lr·e/W`` while ``e < W``, then ``min_lr + (lr - min_lr)·½(1 + cos(π e / E))``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# ---------------------------------------------------------------------------------------------
# the run


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_logits(model: FinetuneModel, loader, device: torch.device, bf16: bool = False,
                   progress: bool = False, desc: str = 'eval') -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets ``[N, C]`` of every batch of `loader`, in eval mode."""
    from tqdm.auto import tqdm

    model.eval()
    logits, targets = [], []
    for wav, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit='batch'):
        with _autocast(device, bf16):
            logits.append(model(wav.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def train_epoch(model: FinetuneModel, loader, optimizer: torch.optim.Optimizer, s: FinetuneSettings, epoch: int,
                rng: np.random.Generator, device: torch.device, multilabel: bool) -> tuple[float, float]:
    """One epoch: per step, set the learning rate, mix up, forward (bf16 autocast if asked), step.
    Returns the mean training loss and the last learning rate."""
    from tqdm.auto import tqdm

    model.train()
    iters, losses, lr = len(loader), [], s.lr
    for it, (wav, y) in enumerate(tqdm(loader, desc=f'epoch {epoch}', leave=False, disable=not s.progress,
                                       unit='batch')):
        lr = learning_rate(epoch + it / iters, s.lr, s.warmup_epochs, s.epochs, s.min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        wav, y = wav.to(device), y.to(device)
        wav, y, _ = mixup(wav, y, s.mixup, rng)
        with _autocast(device, s.bf16):
            logits = model(wav)
        loss = evar_loss(logits.float(), y, multilabel)
        if not torch.isfinite(loss):
            raise FinetuneError(f'the training loss became {loss.item()} at epoch {epoch}; lower --lr ({s.lr})')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)), lr


def _loader(data: ClipData, batch_size: int, shuffle: bool, seed: int, workers: int):
    gen = torch.Generator().manual_seed(seed)
    # In train mode BatchNorm cannot take a batch of one clip: drop a last batch of one.
    drop_last = shuffle and len(data) > batch_size and len(data) % batch_size == 1
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=workers, drop_last=drop_last)


def _preload(data: ClipData, name: str, progress: bool, threads: int = 4) -> list[tuple[str, str]]:
    """Read every clip of `data` once into its cache (a few reader threads); unreadable clips are
    dropped from `data` with a warning and returned as (path, reason)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from ..audio import AudioError

    def read(i: int) -> str | None:
        try:
            data._read(i)
            return None
        except AudioError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = list(tqdm(pool.map(read, range(len(data))), total=len(data), desc=f'reading {name}', leave=False,
                           disable=not progress, unit='clip'))
    failed = [(str(data.clips[i].path), e) for i, e in enumerate(errors) if e is not None]
    if failed:
        keep = [i for i, e in enumerate(errors) if e is None]
        log.warning('%s: skipped %d unreadable clip(s) of %d (first: %s)', name, len(failed), len(data), failed[0][1])
        if not keep:
            raise FinetuneError(f'the {name} split: none of its {len(failed)} clips could be read ({failed[0][1]})')
        data.cache = {n: data.cache[i] for n, i in enumerate(keep)}
        data.clips = [data.clips[i] for i in keep]
        data.targets = data.targets[keep]
    return failed


def finetune(weights: str | Path, task: Task, output_dir: str | Path | None = None,
             settings: FinetuneSettings | None = None, **options: Any) -> dict[str, Any]:
    """Fine-tune the encoder of `weights` with EVAR's head on `task`; returns the report dict.

    Writes ``OUTPUT_DIR/report.json``, ``report.md``, ``learning_curves.png`` (with matplotlib) and
    the best-validation checkpoint ``OUTPUT_DIR/<m2d_name>-<task>/weights_best.pth``. `options`
    override fields of `settings` (see `FinetuneSettings`).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    try:
        s = dataclasses.replace(settings or FinetuneSettings(), **options)
    except TypeError as e:
        raise FinetuneError(f'finetune(): {e}') from None
    s.check()
    device = resolve_device(s.device)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(weights, task)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator().manual_seed(s.seed)

    ckpt = load_checkpoint(weights, trust=s.trust)
    name = model_name(ckpt)
    sr = ckpt.sample_rate
    unit_samples = int(round(task.unit_sec * sr))
    splits = {k: task.split(k) for k in ('train', 'valid', 'test')}
    per_split_bytes = {k: len(v) * unit_samples * 4 for k, v in splits.items()}
    cache = s.workers == 0 and sum(per_split_bytes.values()) <= CACHE_BYTES
    data = {k: ClipData(v, one_hot_targets(task, v), sr, unit_samples, random_crop=(k == 'train'), cache=cache)
            for k, v in splits.items()}
    skipped: dict[str, list[tuple[str, str]]] = {}
    t0 = time.perf_counter()
    if cache:
        for k, d in data.items():
            skipped[k] = _preload(d, k, s.progress)
    t_read = time.perf_counter() - t0

    norm = parse_norm_stats(s.norm_stats)
    norm_source = 'weights' if norm is None else 'auto (train split)' if norm == 'auto' else 'given'
    model = FinetuneModel(ckpt, len(task.classes), s.training_mask)
    if norm == 'auto':
        from .embed import auto_norm_stats

        norm = auto_norm_stats(model.runtime, task, seed=s.seed, progress=s.progress)
    if norm is not None:
        model.runtime.norm_stats.copy_(torch.tensor(norm, dtype=torch.float32))
    model.freq_mask, model.time_mask, model.rrc, model.generator = s.freq_mask, s.time_mask, s.rrc, gen
    model.to(device)
    norm_used = tuple(float(v) for v in model.runtime.norm_stats.cpu())

    if len(data['train']) < 2:
        raise FinetuneError(f'{task.source}: fine-tuning needs at least 2 train clips, got {len(data["train"])}')
    train_loader = _loader(data['train'], s.batch_size, True, s.seed, s.workers)
    valid_loader = _loader(data['valid'], s.batch_size, False, s.seed, s.workers)
    test_loader = _loader(data['test'], s.batch_size, False, s.seed, s.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, s)
    metric = 'mAP' if task.multilabel else 'accuracy'
    log.info('fine-tuning %s on %s: %d train / %d valid / %d test clips, %s, lr %g, batch %d, %d epochs, on %s',
             name, task.name, len(data['train']), len(data['valid']), len(data['test']), s.optim, s.lr,
             s.batch_size, s.epochs, device)

    ckpt_path = checkpoint_path(output_dir, name, task.name)
    info = {'task': task.name, 'multilabel': task.multilabel, 'metric': metric, 'unit_sec': task.unit_sec,
            'sample_rate': sr, 'source_weights': str(weights)}
    curves: list[dict[str, Any]] = []
    best = {'epoch': -1, 'valid': -math.inf, 'state': None}
    t_train = time.perf_counter()
    bar = tqdm(range(s.epochs), desc=f'fine-tune {task.name}', disable=not s.progress, unit='epoch')
    for epoch in bar:
        t_epoch = time.perf_counter()
        loss, lr = train_epoch(model, train_loader, optimizer, s, epoch, rng, device, task.multilabel)
        train_seconds = time.perf_counter() - t_epoch
        v_logits, v_targets = predict_logits(model, valid_loader, device, s.bf16, s.progress, 'valid')
        valid = evaluate_scores(v_logits, v_targets, task.multilabel)
        valid_loss = float(evar_loss(torch.from_numpy(v_logits), torch.from_numpy(v_targets), task.multilabel))
        improved = best['state'] is None or valid > best['valid']  # (a NaN score never improves)
        if improved:
            best.update(epoch=epoch, valid=valid,
                        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            save_checkpoint(finetuned_state(model, task.classes, name, {**info, 'epoch': epoch, 'valid': valid}),
                            ckpt_path)
        curves.append({'epoch': epoch, 'lr': lr, 'train_loss': loss, 'valid_loss': valid_loss,
                       f'valid_{metric}': valid, 'seconds': time.perf_counter() - t_epoch,
                       'train_seconds': train_seconds})
        bar.set_postfix(loss=f'{loss:.4f}', valid=f'{valid:.4f}', best=f'{best["valid"]:.4f}@{best["epoch"]}')
        log.debug('epoch %d: lr %.3g loss %.5f valid %s %.5f (best %.5f @ %d)', epoch, lr, loss, metric,
                  valid, best['valid'], best['epoch'])
        if s.patience and epoch - best['epoch'] >= s.patience:
            log.info('early stop at epoch %d: no better validation %s for %d epochs (best %.4f at epoch %d)',
                     epoch, metric, s.patience, best['valid'], best['epoch'])
            break
    bar.close()
    t_train = time.perf_counter() - t_train

    model.load_state_dict(best['state'])
    t0 = time.perf_counter()
    t_logits, t_targets = predict_logits(model, test_loader, device, s.bf16, s.progress, 'test')
    test = evaluate_scores(t_logits, t_targets, task.multilabel)
    t_test = time.perf_counter() - t0
    n_train_seen = len(curves) * len(train_loader) * s.batch_size
    report = {
        'task': {'name': task.name, 'source': task.source, 'classes': task.classes, 'multilabel': task.multilabel,
                 'unit_sec': task.unit_sec, 'counts': {k: len(d) for k, d in data.items()}, 'notes': task.notes},
        'weights': str(weights),
        'model_name': name,
        'settings': {**{k: v for k, v in asdict(s).items() if k not in ('progress', 'trust')},
                     'norm_stats': list(norm_used), 'norm_stats_source': norm_source, 'device': str(device),
                     'flat_features': s.training_mask > 0},
        'metric': metric,
        'test': test,
        'model': {'mean': test, 'std': 0.0, 'per_seed': [test]},
        'best_epoch': best['epoch'],
        'valid_best': best['valid'],
        'epochs_run': len(curves),
        'early_stopped': len(curves) < s.epochs,
        'checkpoint': str(ckpt_path),
        'output_dir': str(output_dir),
        'curves': curves,
        'class_accuracy': {} if task.multilabel else class_accuracy(t_logits, t_targets, task.classes),
        'skipped': {k: [{'path': p, 'reason': r} for p, r in v] for k, v in skipped.items() if v},
        'timings': {'read_s': t_read, 'train_s': t_train, 'per_epoch_s': t_train / max(len(curves), 1),
                    'test_s': t_test, 'total_s': time.perf_counter() - t_start,
                    'train_clips_per_s': n_train_seen / max(sum(c['train_seconds'] for c in curves), 1e-9)},
    }
    cm = None if task.multilabel else metrics.confusion_matrix(t_targets.argmax(1), t_logits.argmax(1), len(task.classes))
    write_report(report, output_dir, cm)
    log.info('%s on %s: test %s %.4f (best valid %.4f at epoch %d); checkpoint %s', name, task.name, metric, test,
             best['valid'], best['epoch'], ckpt_path)
    return report


# ---------------------------------------------------------------------------------------------
# reports


def plot_curves(report: dict[str, Any], path: Path) -> Path | None:
    """Training and validation loss, validation metric per epoch; None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    curves, metric = report['curves'], report['metric']
    ep = [c['epoch'] for c in curves]
    fig = Figure(figsize=(10, 3.5))
    ax_loss, ax_metric = fig.subplots(1, 2)
    ax_loss.plot(ep, [c['train_loss'] for c in curves], label='train')
    ax_loss.plot(ep, [c['valid_loss'] for c in curves], label='valid')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_loss.legend()
    ax_metric.plot(ep, [c[f'valid_{metric}'] for c in curves], marker='o', ms=3, label=f'valid {metric}')
    ax_metric.axvline(report['best_epoch'], color='gray', ls='--', lw=1, label=f'best epoch {report["best_epoch"]}')
    ax_metric.axhline(report['test'], color='C2', ls=':', lw=1, label=f'test {report["test"]:.3f}')
    ax_metric.set(xlabel='epoch', ylabel=metric, title=f'validation {metric}')
    ax_metric.legend(loc='lower right')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format='png')
    return path


def plot_confusion(report: dict[str, Any], cm: np.ndarray, path: Path) -> Path | None:
    """The test confusion matrix of the best checkpoint; None when matplotlib is missing."""
    try:
        from .plots import confusion_figure

        fig = confusion_figure(cm, report['task']['classes'], f'{report["task"]["name"]}: test, fine-tuned '
                               f'(epoch {report["best_epoch"]})')
    except ImportError:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches='tight', format='png')
    return path


def write_report(report: dict[str, Any], output_dir: str | Path, confusion: np.ndarray | None = None) -> None:
    """``report.json``, ``report.md`` and, with matplotlib, ``learning_curves.png`` and
    ``confusion_matrix.png`` (single-label tasks, given the test `confusion` counts) in `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    figure = plot_curves(report, output_dir / CURVES_PNG)
    cm_figure = plot_confusion(report, confusion, output_dir / CONFUSION_PNG) if confusion is not None else None
    t, st, tm = report['task'], report['settings'], report['timings']
    lines = [f'# Fine-tuning {report["model_name"]} on {t["name"]}', '',
             f'- weights: `{report["weights"]}`',
             f'- task: {t["name"]} ({len(t["classes"])} classes, {"multi-label" if t["multilabel"] else "single-label"}, '
             f'{t["counts"]["train"]} train / {t["counts"]["valid"]} valid / {t["counts"]["test"]} test clips, '
             f'unit {t["unit_sec"]:g} s)',
             f'- **test {report["metric"]}: {report["test"]:.4f}** with the best-validation checkpoint '
             f'(epoch {report["best_epoch"]}, valid {report["valid_best"]:.4f}; {report["epochs_run"]} epochs run'
             f'{", early stop" if report["early_stopped"] else ""})',
             f'- checkpoint: `{report["checkpoint"]}`',
             f'- time: {tm["total_s"]:.1f} s in all, {tm["per_epoch_s"]:.2f} s per epoch, '
             f'{tm["train_clips_per_s"]:.1f} training clips/s, on {st["device"]}', '',
             '| setting | value |', '|---|---|']
    keys = ('optim', 'lr', 'batch_size', 'epochs', 'warmup_epochs', 'mixup', 'rrc', 'freq_mask', 'time_mask',
            'training_mask', 'patience', 'seed', 'norm_stats', 'bf16')
    lines += [f'| {k} | {st[k]} |' for k in keys]
    lines.append('')
    if figure is not None:
        lines += [f'![learning curves]({CURVES_PNG})', '']
    else:
        lines += ['(learning-curve figure not drawn: matplotlib is not installed; the curves are in report.json)', '']
    if cm_figure is not None:
        lines += [f'![confusion matrix]({CONFUSION_PNG})', '']
    if report['skipped']:
        lines += ['Skipped unreadable clips: ' + ', '.join(f'{k} {len(v)}' for k, v in report['skipped'].items()), '']
    with atomic_path(output_dir / REPORT_MD) as tmp:
        tmp.write_text('\n'.join(lines))

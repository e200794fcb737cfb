"""The pre-training loop of MSM-MAE, M2D, M2D-S and M2D-X: one function, `train(cfg)`.

In the spirit of nanoGPT's ``train.py``: set up (processes, data, model, optimizer, resume),
then one loop over micro-steps with gradient accumulation, bf16 autocast, clipping, AdamW,
the EMA target update, logging and checkpoints. Exact resume: every crop and mask is a function
of (seed, epoch, sample index) (`m2d.train.seeding`), the sampler restarts mid-epoch, and
model, optimizer, step and RNG states come back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import normalize_keys, read_state_dict
from ..masking import make_mask
from ..models import create_model
from ..optim import param_groups
from . import distributed, seeding, state
from .config import TrainConfig
from .monitor import Monitor, encoder_effective_rank
from .schedule import base_to_absolute_lr, ema_decay, learning_rate

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped at a non-finite loss or gradient; the message names the step."""


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None
    step: int
    epoch: float
    loss: float | None
    is_main: bool = True


# ----- setup helpers -------------------------------------------------------------------------


def _data_root(cfg: TrainConfig) -> str | None:
    return cfg.data_path or None


def compute_stats(cfg: TrainConfig) -> tuple[float, float]:
    """Normalization statistics of the main set: ~10,000 random crops (`compute_norm_stats`)."""
    from ..data.datasets import LMSDataset, compute_norm_stats

    raw = LMSDataset(cfg.csv_main, data_root=_data_root(cfg), crop_frames=cfg.input_hw[1], norm_stats=None)
    return compute_norm_stats(raw, n_samples=cfg.norm_stats_samples, seed=cfg.seed, progress=True)


def build_dataset(cfg: TrainConfig, norm_stats: tuple[float, float] | None) -> Dataset:
    """The training set: `LMSDataset` for audio, `m2d.data.speech.build_speech_dataset` for M2D-S/X.

    Audio sets need `norm_stats`; speech sets compute theirs when it is None (``dataset.norm_stats``).
    """
    if cfg.is_speech:
        from ..data.speech import build_speech_dataset

        ns = cfg.to_namespace(norm_stats=list(norm_stats) if norm_stats else None, data_path=_data_root(cfg),
                              crop_frames=cfg.input_hw[1])
        return build_speech_dataset(ns)
    from ..data.datasets import LMSDataset

    return LMSDataset(cfg.csv_main, data_root=_data_root(cfg), crop_frames=cfg.input_hw[1], norm_stats=norm_stats,
                      random_crop=True, min_ds_size=cfg.min_ds_size)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.95) over the trainable parameters (no decay on biases, norms, 1-D), fused where supported.

    ``--optim sgd``: SGD with momentum 0.9 and no weight decay, as the reference's option.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optim == 'sgd':
        return torch.optim.SGD([p for g in groups for p in g['params']], lr=lr, momentum=0.9, weight_decay=0.0,
                               foreach=True)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError) as e:  # fused needs a supported device and dtype
        log.debug('fused AdamW unavailable on %s (%s); using foreach', device, e)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=True)


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 clip_grad: float, decay: float) -> float:
    """After the backward passes of a group: clip (foreach), AdamW step, zero grads, EMA of the target.

    Returns the gradient norm before clipping; when it is not finite, nothing is updated.
    """
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float('inf'), foreach=True))
    if math.isfinite(norm):
        optimizer.step()
        model.update_target(decay)
    optimizer.zero_grad(set_to_none=True)
    return norm


def load_init(model: torch.nn.Module, path: str) -> None:
    """``--init``: the weights of a full checkpoint, loaded strictly (norm_stats stay the data's)."""
    sd, _ = read_state_dict(path)
    sd = normalize_keys(sd)
    own = model.state_dict()
    sd['norm_stats'] = own['norm_stats']
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    unexpected = sorted(set(sd) - set(own))
    if result.missing_keys or unexpected:
        raise ValueError(f'--init {path}: not a full checkpoint of this model: missing {result.missing_keys[:8]}'
                         f'{"..." if len(result.missing_keys) > 8 else ""}, unexpected {unexpected[:8]}'
                         f'{"..." if len(unexpected) > 8 else ""}')
    log.info('initialized all %d tensors from %s', len(own), path)


def _infer_off_emb_dim(cfg: TrainConfig, dataset: Dataset, teacher) -> int:
    if cfg.off_emb_dim:
        return cfg.off_emb_dim
    if teacher is not None:
        return int(teacher.feature_d)
    item = dataset[0]
    if isinstance(item, dict) and 'target_offline' in item:
        return int(item['target_offline'].shape[-1])
    return 768


def _setup_file_log(out_dir: Path) -> tuple[logging.Handler, int]:
    """Copy the run's INFO records into ``out_dir/train.log``; returns the handler and the old level."""
    handler = logging.FileHandler(out_dir / 'train.log')
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%Y-%m-%d %H:%M:%S'))
    logger = logging.getLogger('m2d')
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler, old_level


# ----- the run -------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    """Pre-train as `cfg` says; returns where the run and its last checkpoint are."""
    cfg.check()
    env = distributed.setup(cfg.device)
    logger = logging.getLogger('m2d')
    handler, old_level = None, logger.level
    try:
        out_dir = Path(distributed.broadcast_object(str(cfg.resolve_output_dir()), env))
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            handler, old_level = _setup_file_log(out_dir)
        else:
            logger.setLevel(logging.WARNING)  # one console is enough
        return _train(cfg, env, out_dir)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)
        distributed.cleanup()


def _train(cfg: TrainConfig, env: distributed.DistEnv, out_dir: Path) -> TrainResult:
    device = env.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest patch-embedding conv
    resume_path = state.resolve_resume(cfg.resume, out_dir)
    ckpt = state.load(resume_path) if resume_path else None
    if cfg.resume == 'auto' and ckpt is None:
        log.info('--resume auto: no %s in %s; starting a new run', state.LAST, out_dir)
    if cfg.init and ckpt is not None:
        log.info('--init %s ignored: resuming from %s', cfg.init, resume_path)

    # ----- data ------------------------------------------------------------------------------
    if ckpt is not None:
        norm_stats = tuple(float(v) for v in ckpt['model']['norm_stats'].flatten()[:2])
    else:
        norm_stats = cfg.parsed_norm_stats()
        if norm_stats is None and not cfg.is_speech:
            norm_stats = distributed.broadcast_object(compute_stats(cfg) if env.is_main else None, env)
    dataset = build_dataset(cfg, norm_stats)
    norm_stats = tuple(getattr(dataset, 'norm_stats', None) or norm_stats)
    log.info('training set: %r; norm_stats %.6f, %.6f', dataset, *norm_stats)

    per_sample_masks = cfg.mask_type != 'structured'  # structured masks draw NF/NT once per batch
    grid = cfg.grid_size
    mask_fn = (lambda g: make_mask(cfg.mask_type, 1, grid, cfg.mask_ratio, cfg.cont_mask, generator=g)) \
        if per_sample_masks else None
    items = seeding.SeededItems(dataset, cfg.seed, mask_fn)
    sampler = distributed.ResumableSampler(items, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                           seed=cfg.seed)
    iters_per_epoch = sampler.num_samples // cfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(f'{cfg.csv_main}: {len(dataset)} items give {sampler.num_samples} per process, fewer than '
                         f'--batch_size {cfg.batch_size}; use a smaller batch or a larger --min_ds_size')
    loader = DataLoader(items, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == 'cuda', drop_last=True, persistent_workers=cfg.num_workers > 0)
    total_steps = iters_per_epoch * cfg.epochs
    eff_batch = cfg.effective_batch_size(env.world_size)
    lr = cfg.lr if cfg.lr is not None else base_to_absolute_lr(cfg.blr, eff_batch)

    # ----- model, teacher, optimizer -----------------------------------------------------------
    teacher = None
    if cfg.family == 'm2d_x' and cfg.teacher:
        from ..teacher import runtime_teacher

        teacher = runtime_teacher(cfg.teacher, device, input_norm_stats=norm_stats)
    model_cfg = cfg.model_config()
    if cfg.kind == 'm2d_s':
        model_cfg['off_emb_dim'] = _infer_off_emb_dim(cfg, dataset, teacher)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = create_model(cfg.kind, **model_cfg, norm_stats=norm_stats)
    if cfg.init and ckpt is None:
        load_init(model, cfg.init)
    model.to(device)
    optimizer = make_optimizer(model, cfg, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for the container

    start_epoch, start_iter = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'], strict=True)
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        start_epoch, start_iter = int(ckpt['epoch']), int(ckpt.get('iter_in_epoch', 0))
        if start_iter and (ckpt.get('iters_per_epoch') != iters_per_epoch
                           or ckpt.get('effective_batch_size') != eff_batch):
            raise ValueError(f'--resume {resume_path}: a mid-epoch checkpoint of a run with '
                             f'{ckpt.get("iters_per_epoch")} steps/epoch and batch {ckpt.get("effective_batch_size")}; '
                             f'this run has {iters_per_epoch} and {eff_batch}. Resume with the same --batch_size, '
                             '--accum_iter and process count, or from an epoch checkpoint (checkpoint-N.pth).')
        if 'rng' in ckpt:
            state.set_rng_states(ckpt['rng'])
        log.info('resumed from %s: epoch %d, iteration %d', resume_path, start_epoch, start_iter)
    step = start_epoch * iters_per_epoch + start_iter

    raw_model = model
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=cfg.kind == 'm2d_s')
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    n_params = sum(p.numel() for p in trainable)
    log.info('model %s (%s): %.2fM trainable parameters; %d processes x batch %d x accum %d = %d; lr %.3e; '
             '%d steps/epoch, %d epochs; output %s', cfg.model, cfg.kind, n_params / 1e6, env.world_size,
             cfg.batch_size, cfg.accum_iter, eff_batch, lr, iters_per_epoch, cfg.epochs, out_dir)

    monitor = Monitor(out_dir, enabled=env.is_main, log_every=cfg.log_every, total_steps=total_steps,
                      samples_per_step=cfg.batch_size * env.world_size, tensorboard_dir=cfg.log_dir or None)
    if ckpt is not None:
        monitor.truncate_after(step)
    del ckpt

    def checkpoint(epoch_done: int, iter_in_epoch: int) -> dict[str, Any]:
        args = cfg.to_namespace(norm_stats=list(norm_stats), lr=lr, eff_batch_size=eff_batch,
                                world_size=env.world_size, kind=cfg.kind, off_emb_dim=model_cfg.get('off_emb_dim'))
        return {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'epoch': epoch_done, 'step': step, 'iter_in_epoch': iter_in_epoch,
                'iters_per_epoch': iters_per_epoch, 'effective_batch_size': eff_batch, 'args': args,
                'rng': state.rng_states()}

    last_saved: Path | None = resume_path
    def save(epoch_done: int, iter_in_epoch: int, name: str) -> None:
        nonlocal last_saved
        if env.is_main:
            last_saved = state.write(checkpoint(epoch_done, iter_in_epoch), out_dir, name)

    feature_batches = _feature_sample(items, cfg, env)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    loss_value = None
    epoch_pos = float(start_epoch)
    stop = bool((cfg.max_steps and step >= cfg.max_steps) or (cfg.stop_at and start_epoch >= cfg.stop_at))
    lr_now, decay = lr, cfg.ema_decay_init

    # ----- the loop ----------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        if stop:
            break
        first = start_iter if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first * cfg.batch_size)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        monitor.reset_clock()
        it = first - 1
        for it, batch in enumerate(loader, start=first):
            if it % cfg.accum_iter == 0:  # the reference sets lr at the first micro-step of a group
                lr_now = learning_rate(epoch + it / iters_per_epoch, lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr)
                for group in optimizer.param_groups:
                    group['lr'] = lr_now
            x = batch['x'].to(device, non_blocking=True)
            if per_sample_masks:
                mask = (batch['ids_restore'].to(device, non_blocking=True), int(batch['len_keep'][0]))
            else:
                mask = raw_model.draw_mask(x.shape[0], grid, device=device,
                                           generator=seeding.step_generator(cfg.seed, env.rank, step))
            target_offline = batch.get('target_offline')
            with autocast:
                if teacher is not None:
                    target_offline = teacher(batch.get('clean', batch['x']).to(device), frames=grid[1])
                elif target_offline is not None:
                    target_offline = target_offline.to(device, non_blocking=True)
                sync = (it + 1) % cfg.accum_iter == 0
                with model.no_sync() if env.distributed and not sync else contextlib.nullcontext():
                    loss, _, extras = model(x, mask=mask, target_offline=target_offline)
            loss_value = distributed.mean_over_ranks(loss.detach().float(), env).item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f'non-finite loss ({loss_value}) at step {step + 1} (epoch {epoch}, iteration {it}); stopped '
                    f'before updating the weights. Last good checkpoint: {last_saved or "none written yet"}. '
                    'Check the data (NaN/inf in the LMS files, --norm_stats) or lower the learning rate.')
            with model.no_sync() if env.distributed and not sync else contextlib.nullcontext():
                (loss / cfg.accum_iter).backward()
            grad_norm = None
            if sync:
                decay = ema_decay(step, total_steps, cfg.ema_decay_init, cfg.ema_decay)
                grad_norm = apply_update(raw_model, optimizer, trainable, cfg.clip_grad, decay)
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f'non-finite gradient norm ({grad_norm}) at step {step + 1} (epoch {epoch}, iteration {it}); '
                        'stopped before updating the weights. '
                        f'Last good checkpoint: {last_saved or "none written yet"}.')
            step += 1
            epoch_pos = epoch + (it + 1) / iters_per_epoch
            extra = {k: float(v) for k, v in extras.items() if k.startswith('loss_')}
            monitor.step(step, epoch_pos, loss_value, lr_now, decay, grad_norm, **extra)
            if sync:
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = True
                if it + 1 < iters_per_epoch and ((cfg.save_freq_steps and step % cfg.save_freq_steps == 0) or stop):
                    save(epoch, it + 1, state.LAST)
            if cfg.crash_at_step and step == cfg.crash_at_step:
                log.warning('--crash_at_step %d: killing this process (SIGKILL), as a crash would', step)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop or it + 1 >= iters_per_epoch:
                break
        if it + 1 < iters_per_epoch:
            break  # stopped mid-epoch (max_steps); saved above
        epoch_done = epoch + 1
        values = {}
        if cfg.feature_eval_freq and epoch_done % cfg.feature_eval_freq == 0 and env.is_main:
            t0 = time.perf_counter()
            values['effective_rank'] = encoder_effective_rank(raw_model, feature_batches, device, cfg.bf16)
            log.info('effective rank of patch features: %.2f (%.1f s)', values['effective_rank'],
                     time.perf_counter() - t0)
        monitor.epoch(epoch_done, step, lr=lr_now, ema_decay=decay, **values)
        if cfg.stop_at and epoch_done >= cfg.stop_at:
            log.info('--stop_at %d: stopping after epoch %d', cfg.stop_at, epoch_done)
            stop = True
        if epoch_done % cfg.save_freq == 0 or epoch_done == cfg.epochs or stop:
            save(epoch_done, 0, f'checkpoint-{epoch_done}.pth')

    monitor.close()
    log.info('done: %d steps, epoch %.2f, last loss %s; checkpoint %s', step, epoch_pos,
             f'{loss_value:.4f}' if loss_value is not None else '-', last_saved)
    return TrainResult(output_dir=out_dir, checkpoint=last_saved, step=step, epoch=epoch_pos, loss=loss_value,
                       is_main=env.is_main)


class _FeatureBatches:
    """The fixed feature-evaluation sample, loaded on demand (same crops every time)."""

    def __init__(self, items: seeding.SeededItems, indices: list[int], batch_size: int, num_workers: int):
        self.loader = DataLoader(torch.utils.data.Subset(items, indices), batch_size=batch_size,
                                 num_workers=min(num_workers, 4), shuffle=False)

    def __iter__(self):
        return iter(self.loader)


def _feature_sample(items: seeding.SeededItems, cfg: TrainConfig, env: distributed.DistEnv) -> _FeatureBatches | None:
    if not (cfg.feature_eval_freq and env.is_main):
        return None
    g = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.feature_eval_samples, len(items))
    indices = torch.randperm(len(items), generator=g)[:n].tolist()
    return _FeatureBatches(items, indices, min(cfg.batch_size, 64), cfg.num_workers)

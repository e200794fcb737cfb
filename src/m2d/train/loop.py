"""The pre-training loop of MSM-MAE, M2D, M2D-S and M2D-X: one function, `train(opts)`.

In the spirit of nanoGPT's ``train.py``: set up (processes, data, model, optimizer, resume),
then one loop over micro-steps with gradient accumulation, autocast (`m2d.train.precision`), clipping, AdamW,
the EMA target update, logging, checkpoints and their evaluation. Exact resume: every crop and
mask is a function of (seed, epoch, sample index) (`m2d.train.seeding`), the sampler restarts
mid-epoch, and model, optimizer, step and RNG states come back from the checkpoint
(`m2d.train.state`). The run folder is created only once the data and the model are built, so a
run that fails to start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import infer_vit_config, name_from_path, normalize_keys, read_state_dict
from ..data.datasets import LMSDataset, compute_norm_stats
from ..data.filelist import DataError
from ..data.speech import build_speech_dataset
from ..errors import M2DError
from ..malloc import keep_freed_memory
from ..masking import make_mask
from ..models import create_model
from ..optim import param_groups
from . import distributed, precision, preemption, seeding, state
from .config import ConfigError, TrainConfig, compile_options
from .evaluation import LINEAR_EVAL, CheckpointEvaluator
from .monitor import Monitor, RunLog, encoder_effective_rank
from .schedule import base_to_absolute_lr, ema_decay, learning_rate

log = logging.getLogger(__name__)


class NonFiniteLossError(M2DError):
    """Training stopped at a non-finite loss or gradient; the message names the step (exit status 3)."""

    exit_code = 3


@dataclass
class TrainResult:
    """Where a run ended: its folder, last checkpoint (None on ranks > 0), step, epoch and last loss;
    `stopped_by`: the signal that stopped it before the end (then exit with `preemption.EXIT_STOPPED`)."""

    output_dir: Path
    checkpoint: Path | None
    step: int
    epoch: float
    loss: float | None
    is_main: bool = True
    stopped_by: str | None = None


# ----- setup helpers -------------------------------------------------------------------------


def _data_root(opts: TrainConfig) -> str | None:
    return opts.data_path or None


# The main set built for the statistics, kept for `build_dataset` so that the list is read once.
_STATS_SET: dict[tuple, LMSDataset] = {}


def _main_set_key(opts: TrainConfig) -> tuple:
    path = Path(opts.csv_main)
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None
    return str(path.resolve()), stamp, _data_root(opts), opts.input_hw[1]


def compute_stats(opts: TrainConfig) -> tuple[float, float]:
    """Normalization statistics of the main set: ~10,000 random crops (`compute_norm_stats`).
    The set is kept for `build_dataset`, which would otherwise read the list a second time."""
    _STATS_SET.clear()
    raw = LMSDataset(opts.csv_main, data_root=_data_root(opts), crop_frames=opts.input_hw[1], norm_stats=None)
    stats = compute_norm_stats(raw, n_samples=opts.norm_stats_samples, seed=opts.seed, progress=True)
    _STATS_SET[_main_set_key(opts)] = raw
    return stats


def build_dataset(opts: TrainConfig, norm_stats: tuple[float, float] | None) -> Dataset:
    """The training set: `LMSDataset` for audio, `m2d.data.speech.build_speech_dataset` for M2D-S/X.

    Audio sets need `norm_stats`; speech sets compute theirs when it is None (``dataset.norm_stats``).
    An audio set takes over the names `compute_stats` read (same list file, unchanged since).
    """
    raw = _STATS_SET.pop(_main_set_key(opts), None)
    _STATS_SET.clear()
    if opts.is_speech:
        ns = opts.to_namespace(norm_stats=list(norm_stats) if norm_stats else None, data_path=_data_root(opts),
                               crop_frames=opts.input_hw[1])
        return build_speech_dataset(ns)
    files, data_root = (raw.files, raw.data_root) if raw is not None else (opts.csv_main, _data_root(opts))
    return LMSDataset(files, data_root=data_root, crop_frames=opts.input_hw[1], norm_stats=norm_stats,
                      random_crop=True, min_ds_size=opts.min_ds_size)


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: ignore the scheduler's stop signals (the main process
    handles them) and keep inherited objects out of the garbage collector's reach (shared pages)."""
    preemption.ignore_in_worker(worker_id)
    seeding.freeze_inherited_objects(worker_id)


def make_loader(opts: TrainConfig, env: distributed.DistEnv,
                dataset: Dataset) -> tuple[seeding.SeededItems, distributed.ResumableSampler, DataLoader]:
    """Seeded items (crops and per-sample masks drawn from (seed, epoch, index)), this process's
    resumable sampler, and the loader of full batches."""
    mask_fn = None
    if opts.mask_type != 'structured':  # structured masks draw NF/NT once per batch, in the loop
        grid = opts.grid_size
        mask_fn = lambda g: make_mask(opts.mask_type, 1, grid, opts.mask_ratio, opts.cont_mask, generator=g)  # noqa
    items = seeding.SeededItems(dataset, opts.seed, mask_fn)
    sampler = distributed.ResumableSampler(items, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                           seed=opts.seed)
    if sampler.num_samples < opts.batch_size:
        raise DataError(f'{opts.csv_main}: {len(dataset)} items give {sampler.num_samples} per process, fewer than '
                        f'--batch_size {opts.batch_size}; use a smaller batch or a larger --min_ds_size')
    pin = opts.pin_mem if opts.pin_mem is not None else env.device.type == 'cuda'
    loader = DataLoader(items, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.num_workers,
                        pin_memory=pin, drop_last=True, collate_fn=seeding.collate,
                        worker_init_fn=loader_worker_init, persistent_workers=opts.num_workers > 0)
    return items, sampler, loader


def make_optimizer(model: torch.nn.Module, opts: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.95) over the trainable parameters (no decay on biases, norms, 1-D), fused where supported.

    ``--optim sgd``: SGD with momentum 0.9 over the same groups; as in the reference, the groups'
    own weight decay (``--weight_decay`` on weights, 0 on the rest) overrides SGD's default of 0.
    """
    groups = param_groups(model, opts.weight_decay)
    if opts.optim == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, foreach=True)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError) as e:  # fused needs a supported device and dtype
        log.debug('fused AdamW unavailable on %s (%s); using foreach', device, e)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=True)


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 clip_grad: float, decay: float, scaler: torch.amp.GradScaler | None = None) -> float:
    """After the backward passes of a group: clip (foreach), AdamW step, zero grads, EMA of the target.

    Returns the gradient norm before clipping; when it is not finite, nothing is updated.
    The gradients are scaled only when the norm exceeds `clip_grad` (``clip_grad_norm_`` also
    multiplies by 1.0 otherwise: a full pass over the gradients that changes nothing).
    With an enabled `scaler` (float16), the gradients are unscaled first and a non-finite norm is an
    overflow: the step is skipped and the scale lowered, as the reference's loss scaler does.
    """
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    norm = float(total)
    if math.isfinite(norm):
        if clip_grad > 0 and clip_grad / (norm + 1e-6) < 1.0:  # the coefficient clip_grad_norm_ uses
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, total, foreach=True)
        if scaling:
            scaler.step(optimizer)
        else:
            optimizer.step()
        model.update_target(decay)
    if scaling:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def read_init(path: str, option: str = '--init') -> dict[str, torch.Tensor]:
    """The state dict of an ``--init`` file (official key names)."""
    sd, _ = read_state_dict(path)
    if not sd:
        raise ConfigError(f'{option} {path}: no weights in the file')
    return normalize_keys(sd)


def file_norm_stats(sd: dict[str, torch.Tensor]) -> tuple[float, float] | None:
    """The (mean, std) a checkpoint's state dict stores, if it does."""
    ns = sd.get('norm_stats')
    return None if ns is None or ns.numel() < 2 else tuple(float(v) for v in ns.flatten()[:2])


def _geometry(input_hw: Sequence[int], patch_hw: Sequence[int]) -> str:
    return f'{input_hw[0]}x{input_hw[1]}p{patch_hw[0]}x{patch_hw[1]}'


def check_geometry(sd: dict[str, torch.Tensor], model: torch.nn.Module, source: str, option: str) -> None:
    """A `ConfigError` naming both geometries and the options to change when the checkpoint's
    patches or positions cannot hold the model's."""
    if 'patch_embed.proj.weight' not in sd:
        raise ConfigError(f'{option} {source}: no patch_embed.proj.weight; not an M2D checkpoint')
    cfg = model.config
    try:
        theirs = infer_vit_config(sd, name_from_path(source), source)
    except M2DError as e:
        raise ConfigError(f'{option} {source}: {e}') from None
    t_in, t_patch = tuple(theirs.input_size), tuple(theirs.patch_size)
    same_positions = (sd['pos_embed'].shape[1] == model.pos_embed.shape[1] if 'pos_embed' in sd
                      else t_in == tuple(cfg.input_size))
    if t_patch == tuple(cfg.patch_size) and same_positions:
        return
    fixes = []
    if tuple(t_in) != tuple(cfg.input_size):
        fixes.append(f'--input_size {t_in[0]}x{t_in[1]}')
    if tuple(t_patch) != tuple(cfg.patch_size):
        fixes.append(f'--patch_size {t_patch[0]}x{t_patch[1]}')
    raise ConfigError(f'{option} {source}: the checkpoint is {_geometry(t_in, t_patch)} but the model is '
                      f'{_geometry(cfg.input_size, cfg.patch_size)}; set {" ".join(fixes) or "--input_size"} '
                      'to match the checkpoint')


def load_init(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, option: str = '--init') -> list[str]:
    """Load the tensors of `sd` that this model has, non-strictly (the reference's ``strict=False``);
    the model's ``norm_stats`` stay as built. Returns the names that keep their fresh initialization.

    Errors (`ConfigError`, naming the option): another geometry, tensors of another shape, or no
    online encoder in the file.
    """
    check_geometry(sd, model, source, option)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k != 'norm_stats'}
    shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    encoder = [k for k in own if k.startswith(('patch_embed.', 'blocks.', 'norm.', 'cls_token'))]
    no_encoder = [k for k in encoder if k not in sd]
    if shapes or no_encoder:
        raise ConfigError(f'{option} {source}: not a full checkpoint of this model: other shapes {_few(shapes)}, '
                          f'missing encoder tensors {_few(no_encoder)}')
    fresh = sorted(k for k in own if k not in sd and k != 'norm_stats')
    unused = sorted(k for k in sd if k not in own)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    log.info('%s %s: loaded %d of %d tensors; initialized fresh: %s%s', option, source,
             len(own) - len(fresh) - 1, len(own) - 1, ', '.join(fresh) or 'none',
             f'; not used: {", ".join(unused)}' if unused else '')
    return fresh


def _few(names: list[str], n: int = 4) -> str:
    return '[' + ', '.join(names[:n]) + (', ...' if len(names) > n else '') + ']'


def build_model(opts: TrainConfig, dataset: Dataset, norm_stats: tuple[float, float], device: torch.device,
                init: dict[str, torch.Tensor] | None = None, init_source: str = '',
                init_option: str = '--init') -> tuple[torch.nn.Module, torch.nn.Module | None, dict]:
    """The model on `device` (the same initial weights on every process, then what it shares with the
    state dict `init`), the M2D-X runtime teacher (None otherwise), and the model's `create_model` keywords."""
    teacher = None
    if opts.family == 'm2d_x' and opts.teacher:
        from ..teacher import runtime_teacher  # the teacher's code only when there is one

        # the reference feeds the teacher the student-normalized LMS as is (--teacher_renorm: its own stats)
        teacher = runtime_teacher(opts.teacher, device, input_norm_stats=norm_stats if opts.teacher_renorm else None)
    model_kw = opts.model_config()
    if opts.kind == 'm2d_s':
        model_kw['off_emb_dim'] = _infer_off_emb_dim(opts, dataset, teacher)
    torch.manual_seed(opts.seed)
    model = create_model(opts.kind, **model_kw, norm_stats=norm_stats)
    if init is not None:
        load_init(model, init, init_source, init_option)
    return model.to(device), teacher, model_kw


def _infer_off_emb_dim(opts: TrainConfig, dataset: Dataset, teacher) -> int:
    if opts.off_emb_dim:
        return opts.off_emb_dim
    if teacher is not None:
        return int(teacher.feature_d)
    if opts.family == 'm2d_x':
        return 3840  # the reference's M2D-X without a teacher (an M2D base teacher's width)
    item = dataset[0]
    if isinstance(item, dict) and 'target_offline' in item:
        return int(item['target_offline'].shape[-1])
    return 768


def _norm_stats(opts: TrainConfig, env: distributed.DistEnv) -> tuple[float, float] | None:
    """``--norm_stats``, or (audio sets) the statistics rank 0 computes; None: the speech set computes its own."""
    norm_stats = opts.parsed_norm_stats()
    if norm_stats is None and not opts.is_speech:
        norm_stats = distributed.broadcast_object(compute_stats(opts) if env.is_main else None, env)
    return norm_stats


def _inputs(batch: dict, model: torch.nn.Module, teacher, opts: TrainConfig, env: distributed.DistEnv, step: int,
            autocast) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
    """Model input ``[B, 1, F, T]``, mask (ids_restore, len_keep) and offline target of a batch.

    Speech batches hold 'x' (the noise mixture) and 'clean'. ``opts.noisy`` == 'teacher' (M2D-X's
    default, as the reference's loop): clean input to the online and EMA-target branches, the mixture
    to the runtime teacher; 'online': the mixture to the online branch, clean input to the teacher.
    """
    device = env.device
    online_key, teacher_key = 'x', 'clean'
    if 'clean' in batch and opts.noisy == 'teacher':
        online_key, teacher_key = 'clean', 'x'
    x = batch[online_key].to(device, non_blocking=True)
    if 'ids_restore' in batch:  # drawn per sample by the loader
        mask = (batch['ids_restore'].to(device, non_blocking=True), int(batch['len_keep'][0]))
    else:
        mask = model.draw_mask(x.shape[0], opts.grid_size, device=device,
                               generator=seeding.step_generator(opts.seed, env.rank, step))
    target = batch.get('target_offline')
    if teacher is not None:
        with autocast:
            target = teacher(batch.get(teacher_key, batch['x']).to(device), frames=opts.grid_size[1])
    elif target is not None:
        target = target.to(device, non_blocking=True)
    return x, mask, target


def _check_finite(what: str, value: float, step: int, epoch: int, it: int, last: Path | None) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f'non-finite {what} ({value}) at step {step + 1} (epoch {epoch}, iteration {it}); stopped before updating '
            f'the weights. Last good checkpoint: {last or "none written yet"}. Check the data (NaN/inf in the LMS '
            'files, --norm_stats) or lower the learning rate.')


def _effective_rank(model: torch.nn.Module, batches: _FeatureBatches, device: torch.device, bf16: bool) -> float:
    t0 = time.perf_counter()
    rank = encoder_effective_rank(model, batches, device, bf16)
    log.info('effective rank of patch features: %.2f (%.1f s)', rank, time.perf_counter() - t0)
    return rank


def _no_sync(model: torch.nn.Module, sync: bool):
    """DDP's gradient all-reduce only at the last micro-step of an accumulation group."""
    return model.no_sync() if isinstance(model, DDP) and not sync else contextlib.nullcontext()


# ----- the run -------------------------------------------------------------------------------


def train(opts: TrainConfig, eval_command: Sequence[str] | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Pre-train as `opts` says; returns where the run and its last checkpoint are.

    eval_command: what runs ``m2d linear-eval`` for ``--eval`` (tests give a stand-in).
    on_step: called with the step count after every micro-step (tests, tools).
    """
    opts.check()
    signals = preemption.StopSignals().install()
    try:
        env = distributed.setup(opts.device)
        run_log = RunLog(env.is_main)
        try:
            return _train(opts, env, run_log, eval_command or LINEAR_EVAL, on_step, signals)
        finally:
            run_log.close()
            distributed.cleanup()
    finally:
        signals.restore()


def _train(opts: TrainConfig, env: distributed.DistEnv, run_log: RunLog, eval_command: Sequence[str],
           on_step: Callable[[int], None] | None, signals: preemption.StopSignals) -> TrainResult:
    device = env.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest patch-embedding conv
    elif opts.keep_freed_memory and keep_freed_memory():
        log.debug('malloc keeps freed memory for reuse (--no_keep_freed_memory to turn off)')
    out_dir = Path(distributed.broadcast_object(str(opts.resolve_output_dir()), env))
    resume_path, ckpt = state.open_resume_everywhere(opts.resume, out_dir, env)  # rank 0 decides
    init_sd, init_source, init_option = None, opts.init, '--init'
    if ckpt is not None and not state.is_run_state(ckpt, opts):
        log.info('--resume %s: not a run state of %s %s; loading its weights as the reference does (non-strict, '
                 'epoch 0, new optimizer and warmup, the file\'s norm_stats)', resume_path, opts.model,
                 _geometry(opts.input_hw, opts.patch_hw))
        init_sd, init_source, init_option = normalize_keys(ckpt['model']), str(resume_path), '--resume'
        resume_path, ckpt = None, None
    elif opts.init and ckpt is not None:
        log.info('--init %s ignored: resuming from %s', opts.init, resume_path)
        init_source = ''
    elif opts.init:
        init_sd = read_init(opts.init)

    # ----- data --------------------------------------------------------------------------------
    given_stats = opts.parsed_norm_stats()
    if ckpt is not None:
        norm_stats = state.norm_stats_of(ckpt)
    elif init_sd is not None and given_stats is None and file_norm_stats(init_sd) is not None:
        norm_stats = file_norm_stats(init_sd)
        log.info('norm_stats %.4f, %.4f from %s (--norm_stats to override)', *norm_stats, init_source)
    else:
        norm_stats = _norm_stats(opts, env)
    dataset = build_dataset(opts, norm_stats)
    dataset[0]  # unreadable data fails now, before the run folder exists
    norm_stats = tuple(getattr(dataset, 'norm_stats', None) or norm_stats)
    log.info('training set: %r; norm_stats %.6f, %.6f', dataset, *norm_stats)
    items, sampler, loader = make_loader(opts, env, dataset)
    iters_per_epoch = sampler.num_samples // opts.batch_size
    total_steps = iters_per_epoch * opts.epochs
    eff_batch = opts.effective_batch_size(env.world_size)
    lr = opts.lr if opts.lr is not None else base_to_absolute_lr(opts.blr, eff_batch)

    # ----- model, teacher, optimizer, resume -------------------------------------------------------
    raw_model, teacher, model_kw = build_model(opts, dataset, norm_stats, device, init_sd, init_source, init_option)
    del init_sd
    optimizer = make_optimizer(raw_model, opts, lr, device)
    precision_name, autocast, scaler = precision.setup(opts, device)
    start_epoch, start_iter = 0, 0
    if ckpt is not None:
        start_epoch, start_iter = state.restore(ckpt, resume_path, raw_model, optimizer, scaler, iters_per_epoch,
                                                eff_batch)
    del ckpt
    step = start_epoch * iters_per_epoch + start_iter
    if opts.compile:
        raw_model.compile_blocks(**compile_options(opts.compile))
        log.info('--compile %s: the transformer blocks compile on their first call', opts.compile)
    model = raw_model
    if env.distributed:
        model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=opts.kind == 'm2d_s')
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    # ----- the run folder, from here on ----------------------------------------------------------
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        state.remove_stale_temporaries(out_dir)
        run_log.open(out_dir)
    log.info('model %s (%s): %.2fM trainable parameters; %d processes x batch %d x accum %d = %d; lr %.3e; '
             '%d steps/epoch, %d epochs; output %s', opts.model, opts.kind, sum(p.numel() for p in trainable) / 1e6,
             env.world_size, opts.batch_size, opts.accum_iter, eff_batch, lr, iters_per_epoch, opts.epochs, out_dir)
    args = opts.to_namespace(norm_stats=list(norm_stats), lr=lr, eff_batch_size=eff_batch, world_size=env.world_size,
                             kind=opts.kind, off_emb_dim=model_kw.get('off_emb_dim'))
    checkpoints = state.Checkpointer(out_dir, raw_model, optimizer, scaler, args, iters_per_epoch, eff_batch,
                                     enabled=env.is_main, last=resume_path,
                                     background=opts.checkpoint_writes == 'background',
                                     every_minutes=opts.save_every_minutes)
    monitor = Monitor(out_dir, enabled=env.is_main, log_every=opts.log_every, total_steps=total_steps,
                      samples_per_step=opts.batch_size * env.world_size, tensorboard_dir=opts.log_dir or None)
    if resume_path is not None:
        monitor.truncate_after(step)
    evaluator = CheckpointEvaluator(out_dir, opts.eval_task_args(), device=eval_device(opts.eval_device, env),
                                    command=eval_command, enabled=env.is_main)
    feature_batches = _feature_sample(items, opts, env)

    # ----- the loop ----------------------------------------------------------------------------
    loss_value, epoch_pos, lr_now, decay = None, float(start_epoch), lr, opts.ema_decay_init
    stop = bool((opts.max_steps and step >= opts.max_steps) or (opts.stop_at and start_epoch >= opts.stop_at))
    signalled = False  # a rank got SIGTERM/SIGUSR1: every rank stops at the same optimizer step
    try:
        for epoch in range(start_epoch, opts.epochs):
            if stop:
                break
            first = start_iter if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first * opts.batch_size)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            monitor.reset_clock()
            it = first - 1
            for it, batch in enumerate(loader, start=first):
                if it % opts.accum_iter == 0:  # the reference sets lr at the first micro-step of a group
                    lr_now = learning_rate(epoch + it / iters_per_epoch, lr, opts.warmup_epochs, opts.epochs,
                                           opts.min_lr)
                    for group in optimizer.param_groups:
                        group['lr'] = lr_now
                sync = (it + 1) % opts.accum_iter == 0
                x, mask, target = _inputs(batch, raw_model, teacher, opts, env, step, autocast)
                with _no_sync(model, sync), autocast:
                    loss, _, extras = model(x, mask=mask, target_offline=target)
                loss_value, any_signal = distributed.mean_and_any(loss.detach().float(), signals.requested, env)
                if any_signal and not signalled:
                    signalled = True
                    log.info('stop requested (%s) at step %d: saving at the next optimizer step, then exiting',
                             preemption.received_name(), step + 1)
                _check_finite('loss', loss_value, step, epoch, it, checkpoints.last)
                with _no_sync(model, sync):
                    scaler.scale(loss / opts.accum_iter).backward()
                grad_norm = None
                if sync:
                    decay = ema_decay(step, total_steps, opts.ema_decay_init, opts.ema_decay)
                    grad_norm = apply_update(raw_model, optimizer, trainable, opts.clip_grad, decay, scaler)
                    if scaler.is_enabled() and not math.isfinite(grad_norm):
                        log.info('float16 overflow at step %d: update skipped, loss scale now %g', step + 1,
                                 scaler.get_scale())
                    else:
                        _check_finite('gradient norm', grad_norm, step, epoch, it, checkpoints.last)
                step += 1
                epoch_pos = epoch + (it + 1) / iters_per_epoch
                monitor.step(step, epoch_pos, loss_value, lr_now, decay, grad_norm,
                             **{k: float(v) for k, v in extras.items() if k.startswith('loss_')})
                if sync:
                    stop = bool(signalled or (opts.max_steps and step >= opts.max_steps))
                    if it + 1 < iters_per_epoch and (stop or checkpoints.due() or (
                            opts.save_freq_steps and step % opts.save_freq_steps == 0)):
                        checkpoints.save(epoch, it + 1, step)
                if step % opts.log_every == 0:
                    monitor.write_all(r.record() for r in evaluator.poll())
                if on_step is not None:
                    on_step(step)
                if stop:
                    break
            if it + 1 < iters_per_epoch:
                break  # stopped mid-epoch (--max_steps, a signal); saved above
            stop = stop or signalled

            epoch_done = epoch + 1
            values = {}
            if feature_batches is not None and epoch_done % opts.feature_eval_freq == 0:
                values['effective_rank'] = _effective_rank(raw_model, feature_batches, device,
                                                           precision_name == 'bf16')
            monitor.epoch(epoch_done, step, lr=lr_now, ema_decay=decay, **values)
            if opts.stop_at and epoch_done >= opts.stop_at:
                log.info('--stop_at %d: stopping after epoch %d', opts.stop_at, epoch_done)
                stop = True
            if opts.saves_epoch(epoch_done) or (stop and not signalled):
                path = checkpoints.save_epoch(epoch_done, step)
                if opts.evaluates_epoch(epoch_done) and not stop and epoch_done < opts.epochs:
                    checkpoints.wait()  # the file is complete before linear-eval reads it
                    evaluator.submit(path, epoch_done, step)  # the last checkpoint: the final evaluation below
            elif signalled or checkpoints.due():
                checkpoints.save(epoch_done, 0, step)
            monitor.write_all(r.record() for r in evaluator.poll())

        checkpoints.wait()
        # every checkpoint is on disk: the other ranks may leave (and free their GPUs) while rank 0 runs
        # the final evaluation, which can take longer than the process group's timeout
        distributed.barrier(env)
        if not signalled:  # (only rank 0 evaluates: the stop below needs no agreement)
            monitor.write_all(r.record() for r in evaluator.finish(checkpoints.last, math.ceil(epoch_pos), step,
                                                                   stop=lambda: signals.requested))
            signalled = evaluator.interrupted
    finally:
        try:
            checkpoints.close()  # a background write finishes (or its error is raised) before the run ends
        finally:
            evaluator.close()
            monitor.close()
    stopped_by = None
    if signalled:
        stopped_by = preemption.received_name()
        log.info('stopped by %s at step %d (epoch %.2f): %s written; run the same command with --resume auto to '
                 'continue (exit status %d)', stopped_by, step, epoch_pos, checkpoints.last or state.LAST,
                 preemption.EXIT_STOPPED)
        if opts.slurm_requeue and env.is_main and preemption.received() == signal.SIGUSR1:
            preemption.requeue()
    else:
        log.info('done: %d steps, epoch %.2f, last loss %s; checkpoint %s', step, epoch_pos,
                 f'{loss_value:.4f}' if loss_value is not None else '-', checkpoints.last)
    return TrainResult(output_dir=out_dir, checkpoint=checkpoints.last, step=step, epoch=epoch_pos, loss=loss_value,
                       is_main=env.is_main, stopped_by=stopped_by)


def eval_device(choice: str, env: distributed.DistEnv) -> str:
    """The device of ``--eval`` processes: ``auto`` is a GPU of this node that no training process uses
    (torchrun's LOCAL_WORLD_SIZE processes take cuda:0..N-1), else the CPU; anything else as given."""
    if choice != 'auto':
        return choice
    if env.device.type != 'cuda':
        return 'cpu'
    used = set(range(int(os.environ.get('LOCAL_WORLD_SIZE', '1')))) if env.distributed else {env.device.index or 0}
    free = [i for i in range(torch.cuda.device_count()) if i not in used]
    return f'cuda:{free[0]}' if free else 'cpu'


class _FeatureBatches:
    """The fixed feature-evaluation sample, loaded on demand (same crops every time)."""

    def __init__(self, items: seeding.SeededItems, indices: list[int], batch_size: int, num_workers: int):
        self.loader = DataLoader(torch.utils.data.Subset(items, indices), batch_size=batch_size,
                                 num_workers=min(num_workers, 4), shuffle=False,
                                 worker_init_fn=preemption.ignore_in_worker)

    def __iter__(self):
        return iter(self.loader)


def _feature_sample(items: seeding.SeededItems, opts: TrainConfig,
                    env: distributed.DistEnv) -> _FeatureBatches | None:
    if not (opts.feature_eval_freq and env.is_main):
        return None
    g = torch.Generator().manual_seed(opts.seed)
    n = min(opts.feature_eval_samples, len(items))
    indices = torch.randperm(len(items), generator=g)[:n].tolist()
    return _FeatureBatches(items, indices, min(opts.batch_size, 64), opts.num_workers)

"""Training checkpoints: the official container plus what an exact resume needs.

``checkpoint-{epoch}.pth`` (and ``checkpoint-last.pth``, the newest state) hold
``{'model': state_dict, 'optimizer', 'scaler', 'epoch', 'step', 'iter_in_epoch',
'iters_per_epoch', 'effective_batch_size', 'args': argparse.Namespace, 'rng'}`` -- only tensors,
numbers, strings and a Namespace, so ``torch.load(weights_only=True)`` with Namespace allow-listed
reads them, and `m2d.RuntimeM2D` loads them directly (the folder name gives the geometry).
``epoch`` counts completed epochs (as the reference); ``iter_in_epoch`` > 0 marks a mid-epoch state.

`Checkpointer` writes them (rank 0), optionally in a background thread from a snapshot in host
memory, so that the step goes on while the file is written; `open_resume` and `restore` bring a run
back from one.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import save_checkpoint, torch_load
from ..fileio import is_temporary
from . import distributed
from .config import ConfigError

log = logging.getLogger(__name__)

LAST = 'checkpoint-last.pth'
SHARED_FILESYSTEM = 'the run folder must be on a filesystem every node sees'
# the temporary names of interrupted writes of a run folder's own files (`m2d.fileio.atomic_path`:
# '.NAME.XXXXXXXX.tmpSUFFIX'; `write`: '.checkpoint-last.pth.tmp-link')
_RUN_TEMPORARY = re.compile(r'^\.(checkpoint-(\d+|last)\.pth|log\.jsonl|training_curves\.png|eval_summary\.(json|md))'
                            r'\.(\w{8}\.tmp\.\w+|tmp-link)$')


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    out = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': py_version, 'state': torch.tensor(py_words, dtype=torch.int64),
                   'gauss_next': py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['cuda'] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    if 'torch' in states:
        torch.set_rng_state(states['torch'].cpu())
    if 'numpy' in states:
        n = states['numpy']
        np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                             n['cached_gaussian']))
    if 'python' in states:
        p = states['python']
        random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss_next']))
    if 'cuda' in states and torch.cuda.is_available():
        cuda = states['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def write(ckpt: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Write `ckpt` atomically as ``out_dir/name`` and make ``checkpoint-last.pth`` point at it."""
    path = save_checkpoint(ckpt, Path(out_dir) / name)
    if name != LAST:
        last = Path(out_dir) / LAST
        tmp = last.with_name(f'.{LAST}.tmp-link')
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(path, tmp)  # same bytes, no second write
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, last)
    log.info('saved %s (epoch %s, step %d)', path, ckpt['epoch'], ckpt['step'])
    return path


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint file to resume from: a path, or 'auto' (``out_dir/checkpoint-last.pth`` if present)."""
    if not resume:
        return None
    if resume == 'auto':
        last = Path(out_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise ConfigError(f'--resume {resume}: no such checkpoint file')
    return path


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporary files that killed writes left in the run folder (checkpoints, log,
    curves, evaluation summary), recognized by name; nothing else. Returns what was removed."""
    removed = []
    if not Path(out_dir).is_dir():
        return removed
    for path in sorted(Path(out_dir).iterdir()):
        if is_temporary(path.name) and _RUN_TEMPORARY.match(path.name) and path.is_file():
            size = path.stat().st_size
            path.unlink()
            removed.append(path)
            log.info('removed %s (%.1f MB), left by an interrupted write', path, size / 2**20)
    return removed


def load(path: Path) -> dict[str, Any]:
    """Read a training checkpoint safely (tensors + argparse.Namespace only)."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise ConfigError(f'--resume {path}: not a training checkpoint (expected a dict with "model")')
    return ckpt


def open_resume(resume: str, out_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """``--resume``: the checkpoint to continue from and its contents; (None, None) for a new run."""
    path = resolve_resume(resume, out_dir)
    if resume == 'auto' and path is None:
        log.info('--resume auto: no %s in %s; starting a new run', LAST, out_dir)
    return path, (load(path) if path is not None else None)


def open_resume_everywhere(resume: str, out_dir: Path,
                           env: distributed.DistEnv) -> tuple[Path | None, dict[str, Any] | None]:
    """`open_resume` as rank 0 decides it, on every rank: rank 0 picks the file (and reads its step),
    tells every rank, and every rank reads that file. If rank 0 fails, or any rank cannot read the file
    or reads another step (a copy of its own), every rank raises the same `ConfigError`."""
    if not env.distributed:
        return open_resume(resume, out_dir)
    decision, ckpt = {'path': None, 'step': None, 'error': None}, None
    if env.is_main:
        try:
            path, ckpt = open_resume(resume, out_dir)
            decision.update(path=str(path) if path else None, step=None if ckpt is None else ckpt.get('step'))
        except Exception as e:  # noqa: BLE001  any failure must reach the broadcast, or the others wait in it
            decision['error'] = str(e) or type(e).__name__
    decision = distributed.broadcast_object(decision, env)
    if decision['error']:
        raise ConfigError(decision['error'])
    if decision['path'] is None:
        return None, None
    path, error = Path(decision['path']), None
    if not env.is_main:
        try:
            ckpt = load(path)
            if ckpt.get('step') != decision['step']:
                error = f'step {ckpt.get("step")} in its copy, not rank 0\'s {decision["step"]}'
        except FileNotFoundError:
            error = 'no such file'
        except Exception as e:  # noqa: BLE001  any failure must reach the agreement below
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
    failed = distributed.gather_errors(error, env)
    if failed:
        ranks = ', '.join(f'rank {r}' for r, _ in failed)
        raise ConfigError(f'--resume {resume}: {ranks} cannot read {path} that rank 0 resumes from '
                          f'({failed[0][1]}); {SHARED_FILESYSTEM}')
    return path, ckpt


def is_run_state(ckpt: dict[str, Any], opts: Any) -> bool:
    """Whether `ckpt` is a state this run can continue exactly: written by m2d's trainer (it has
    'optimizer' and 'step') for the same model and geometry. Anything else (a released checkpoint,
    another model's run) is loaded as weights only, as the reference's ``--resume`` does."""
    args = ckpt.get('args')
    if 'optimizer' not in ckpt or 'step' not in ckpt or args is None:
        return False
    same = (getattr(args, 'model', None) == opts.model and
            [int(v) for v in getattr(args, 'input_size', ())] == list(opts.input_hw) and
            [int(v) for v in getattr(args, 'patch_size', ())] == list(opts.patch_hw))
    return bool(same)


def norm_stats_of(ckpt: dict[str, Any]) -> tuple[float, float]:
    """The (mean, std) a checkpoint's model was trained with."""
    return tuple(float(v) for v in ckpt['model']['norm_stats'].flatten()[:2])


def restore(ckpt: dict[str, Any], path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, iters_per_epoch: int, eff_batch: int) -> tuple[int, int]:
    """Load model, optimizer, scaler and RNG states; return the (epoch, iteration) to continue from.

    A mid-epoch state only continues a run with the same steps per epoch and effective batch.
    """
    epoch, iteration = int(ckpt['epoch']), int(ckpt.get('iter_in_epoch', 0))
    if iteration and (ckpt.get('iters_per_epoch'), ckpt.get('effective_batch_size')) != (iters_per_epoch, eff_batch):
        raise ConfigError(f'--resume {path}: a mid-epoch checkpoint of a run with {ckpt.get("iters_per_epoch")} '
                          f'steps/epoch and batch {ckpt.get("effective_batch_size")}; this run has '
                          f'{iters_per_epoch} and {eff_batch}. Resume with the same --batch_size, --accum_iter and '
                          'process count, or from an epoch checkpoint (checkpoint-N.pth).')
    model.load_state_dict(ckpt['model'], strict=True)
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if 'rng' in ckpt:
        set_rng_states(ckpt['rng'])
    log.info('resumed from %s: epoch %d, iteration %d', path, epoch, iteration)
    return epoch, iteration


def snapshot(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples of tensors and plain values) whose tensors are new host
    tensors: later in-place updates of the originals (optimizer steps) do not reach it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Checkpointer:
    """Writes the checkpoints of a run (only when `enabled`: rank 0) and remembers the newest one.

    args: the checkpoint's ``args`` (`TrainConfig.to_namespace` plus what the run derived).
    last: the checkpoint the run resumed from, if any.
    background: write each checkpoint in a thread from a host-memory snapshot (one write at a
        time; the next save, `last` and `close` wait for it). The step stalls only for the copy.
    every_minutes: `due` says when this much wall-clock time has passed since the start or the last
        save (0: never).
    """

    def __init__(self, out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, args: argparse.Namespace, iters_per_epoch: int, eff_batch: int,
                 enabled: bool = True, last: Path | None = None, background: bool = False,
                 every_minutes: float = 0.0):
        self.out_dir, self.model, self.optimizer, self.scaler = Path(out_dir), model, optimizer, scaler
        self.args, self.iters_per_epoch, self.eff_batch = args, iters_per_epoch, eff_batch
        self.enabled = enabled
        self.every_s = 60.0 * every_minutes
        self._saved_at = time.monotonic()
        self._last = last
        self._writer = ThreadPoolExecutor(1, thread_name_prefix='m2d-checkpoint') if background and enabled else None
        self._pending: Future | None = None

    @property
    def last(self) -> Path | None:
        """The newest checkpoint on disk (waits for a background write in progress)."""
        self.wait()
        return self._last

    def state(self, epoch_done: int, iter_in_epoch: int, step: int) -> dict[str, Any]:
        """The checkpoint dictionary (see the module docstring)."""
        return {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict(), 'epoch': epoch_done, 'step': step, 'iter_in_epoch': iter_in_epoch,
                'iters_per_epoch': self.iters_per_epoch, 'effective_batch_size': self.eff_batch, 'args': self.args,
                'rng': rng_states()}

    def save(self, epoch_done: int, iter_in_epoch: int, step: int, name: str = LAST) -> Path | None:
        """Write ``out_dir/name`` (and ``checkpoint-last.pth``); returns its path on rank 0 (in the
        background mode the file is complete once `last` or `wait` returns)."""
        if not self.enabled:
            return None
        self._saved_at = time.monotonic()
        if self._writer is None:
            self._last = write(self.state(epoch_done, iter_in_epoch, step), self.out_dir, name)
            return self._last
        self.wait()
        ckpt = snapshot(self.state(epoch_done, iter_in_epoch, step))
        self._pending = self._writer.submit(write, ckpt, self.out_dir, name)
        return self.out_dir / name

    def due(self) -> bool:
        """Whether the wall-clock cadence (``--save_every_minutes``) asks for a checkpoint now (rank 0)."""
        return self.enabled and self.every_s > 0 and time.monotonic() - self._saved_at >= self.every_s

    def save_epoch(self, epoch_done: int, step: int) -> Path | None:
        """``checkpoint-EPOCH.pth`` after epoch `epoch_done`."""
        return self.save(epoch_done, 0, step, f'checkpoint-{epoch_done}.pth')

    def wait(self) -> None:
        """Block until a background write is on disk; raises its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._last = pending.result()

    def close(self) -> None:
        """Finish the write in progress and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)

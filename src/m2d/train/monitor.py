"""What a pre-training run tells its user: console lines, ``log.jsonl``, TensorBoard (when
installed), ``training_curves.png`` (when matplotlib is installed), and the effective rank
(RankMe) of the encoder's patch features -- the reference's representation-collapse monitor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_path

log = logging.getLogger(__name__)

LOG_FILE = 'log.jsonl'
PLOT_FILE = 'training_curves.png'


def effective_rank(features: torch.Tensor) -> float:
    """RankMe of an ``[N, D]`` feature matrix: ``exp(-sum p log p)``, ``p = sigma / sum(sigma) + 1e-7``."""
    return rank_from_gram(gram(features))


def gram(features: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 (sums over batches give the Gram matrix of all rows)."""
    x = features.reshape(-1, features.shape[-1]).double()
    return x.T @ x


def rank_from_gram(g: torch.Tensor) -> float:
    """RankMe from a Gram matrix: the singular values of X are the square roots of its eigenvalues."""
    sigma = torch.linalg.eigvalsh(g.double().cpu()).clamp_min(0).sqrt()
    p = sigma / sigma.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


class Monitor:
    """Records of a run. Only the process with ``enabled=True`` (rank 0) writes anything.

    `step(...)` is called every micro-step; every `log_every` steps it writes one ``log.jsonl``
    line (loss averaged over the interval) and one console line. `epoch(...)` records an
    epoch summary (and the effective rank when measured).
    """

    def __init__(self, out_dir: Path, enabled: bool = True, log_every: int = 20, total_steps: int = 0,
                 samples_per_step: int = 1, tensorboard: bool = True, plot_interval_s: float = 60.0,
                 tensorboard_dir: str | Path | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.plot_interval_s = plot_interval_s
        self._losses: list[float] = []
        self._epoch_losses: list[float] = []
        self._t_last = time.perf_counter()
        self._steps_since = 0
        self._last_plot = 0.0
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(tensorboard_dir or self.out_dir))
            except Exception:  # tensorboard is optional
                log.debug('tensorboard is not installed; logging to log.jsonl only')

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records a killed run wrote after its last checkpoint (step > `step`)."""
        if not (self.enabled and self.log_path.exists()):
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get('step', 0) <= step:
                kept.append(line)
        with atomic_path(self.log_path) as tmp:
            tmp.write_text(''.join(k + '\n' for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.log_path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        if self._tb is not None:
            x = record.get('step', 0)
            for k, v in record.items():
                if k not in ('type', 'step') and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, x)

    def reset_clock(self) -> None:
        self._t_last = time.perf_counter()
        self._steps_since = 0

    def step(self, step: int, epoch: float, loss: float, lr: float, ema_decay: float,
             grad_norm: float | None = None, **extra: float) -> None:
        """Record micro-step `step` (1-based: the number of steps done)."""
        self._losses.append(loss)
        self._epoch_losses.append(loss)
        self._steps_since += 1
        if step % self.log_every and step != self.total_steps:
            return
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        rate = self._steps_since * self.samples_per_step / dt
        rec = {'type': 'train', 'step': step, 'epoch': round(epoch, 4), 'loss': sum(self._losses) / len(self._losses),
               'lr': lr, 'ema_decay': ema_decay, 'samples_per_s': rate, 'time': time.time()}
        if grad_norm is not None:
            rec['grad_norm'] = grad_norm
        rec.update(extra)
        self.write(rec)
        if self.enabled:
            total = f'/{self.total_steps}' if self.total_steps else ''
            gn = f' | grad {grad_norm:.3f}' if grad_norm is not None else ''
            log.info('step %d%s | epoch %.2f | loss %.4f | lr %.3e | ema %.6f%s | %.1f samples/s',
                     step, total, epoch, rec['loss'], lr, ema_decay, gn, rate)
        self._losses.clear()
        self._t_last, self._steps_since = now, 0

    def epoch(self, epoch: int, step: int, **values: float) -> dict[str, Any]:
        """Record the end of epoch `epoch` (1-based: epochs done)."""
        rec = {'type': 'epoch', 'epoch': epoch, 'step': step}
        if self._epoch_losses:
            rec['train_loss'] = sum(self._epoch_losses) / len(self._epoch_losses)
        rec.update(values)
        self._epoch_losses.clear()
        self.write(rec)
        if self.enabled:
            log.info('epoch %d done: %s', epoch,
                     ', '.join(f'{k} {v:.6g}' for k, v in rec.items() if k not in ('type', 'epoch', 'step')))
            if time.perf_counter() - self._last_plot >= self.plot_interval_s:
                self.plot()
        return rec

    def plot(self) -> Path | None:
        """Draw ``training_curves.png`` from ``log.jsonl`` (loss, lr, effective rank); None without matplotlib."""
        if not (self.enabled and self.log_path.exists()):
            return None
        try:
            import matplotlib

            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            log.debug('matplotlib is not installed; no %s', PLOT_FILE)
            return None
        self._last_plot = time.perf_counter()
        train, ranks = {}, {}
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get('type') == 'train':
                train[rec['step']] = rec
            elif rec.get('type') == 'epoch' and 'effective_rank' in rec:
                ranks[rec['epoch']] = rec['effective_rank']
        steps = sorted(train)
        fig, axes = plt.subplots(1, 3 if ranks else 2, figsize=(15 if ranks else 10, 3.5))
        axes[0].plot(steps, [train[s]['loss'] for s in steps])
        axes[0].set(xlabel='step', ylabel='loss', title='training loss')
        axes[1].plot(steps, [train[s]['lr'] for s in steps])
        axes[1].set(xlabel='step', ylabel='learning rate', title='learning rate')
        if ranks:
            ep = sorted(ranks)
            axes[2].plot(ep, [ranks[e] for e in ep], marker='o')
            axes[2].set(xlabel='epoch', ylabel='effective rank', title='RankMe of patch features')
        fig.tight_layout()
        path = self.out_dir / PLOT_FILE
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.plot()
        if self._tb is not None:
            self._tb.close()


@torch.no_grad()
def encoder_effective_rank(model: torch.nn.Module, batches, device: torch.device, bf16: bool = False) -> float:
    """RankMe of the online encoder's patch features (cls dropped, one row per patch) over `batches`.

    `model` has ``encode(x) -> [B, 1 + L, D]`` (the unmasked online encoder); `batches` yields
    dicts with 'x' (as the training loader does).
    """
    was_training = model.training
    model.eval()
    g = None
    try:
        for batch in batches:
            x = batch['x'].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z = model.encode(x)[:, 1:]
            part = gram(z.float())
            g = part if g is None else g + part
    finally:
        model.train(was_training)
    if g is None:
        raise ValueError('effective rank: the feature sample is empty')
    return rank_from_gram(g)

"""What a pre-training run tells its user: console lines, ``log.jsonl``, TensorBoard (when
installed), ``training_curves.png`` (when matplotlib is installed), the effective rank
(RankMe) of the encoder's patch features -- the reference's representation-collapse monitor --
and the scores of checkpoint evaluations (``type`` 'eval' records, `m2d.train.evaluation`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_path

log = logging.getLogger(__name__)

LOG_FILE = 'log.jsonl'
PLOT_FILE = 'training_curves.png'
TRAIN_LOG = 'train.log'


class RunLog:
    """The run's INFO records of the ``m2d`` loggers, copied into ``RUN/train.log``.

    Records are kept in memory until `open` (the run folder exists only once the data and model
    are built), then written out. Processes other than rank 0 (``main=False``) log warnings only.
    """

    def __init__(self, main: bool = True):
        self.logger = logging.getLogger('m2d')
        self.old_level = self.logger.level
        self.buffer: list[logging.LogRecord] = []
        self.handler: logging.Handler | None = None
        if not main:
            self.logger.setLevel(logging.WARNING)  # one console is enough
            return
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.handler = _Buffer(self.buffer)
        self.handler.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)

    def open(self, out_dir: Path) -> None:
        """Write the records so far, and those to come, to ``out_dir/train.log``."""
        file = logging.FileHandler(Path(out_dir) / TRAIN_LOG)
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%Y-%m-%d %H:%M:%S'))
        for record in self.buffer:
            file.handle(record)
        self.buffer.clear()
        self._remove()
        self.handler = file
        self.logger.addHandler(file)

    def close(self) -> None:
        self._remove()
        self.logger.setLevel(self.old_level)

    def _remove(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


class _Buffer(logging.Handler):
    def __init__(self, records: list[logging.LogRecord], capacity: int = 10_000):
        super().__init__()
        self.records, self.capacity = records, capacity

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:
            self.records.append(record)


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
                if k not in ('type', 'step') and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, x)

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.write(record)

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
        """Draw ``training_curves.png`` from ``log.jsonl`` (loss, lr, effective rank, evaluation scores);
        None without matplotlib."""
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
        train, ranks, scores, metric = {}, {}, {}, 'score'
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get('type') == 'train':
                train[rec['step']] = rec
            elif rec.get('type') == 'epoch' and 'effective_rank' in rec:
                ranks[rec['epoch']] = rec['effective_rank']
            elif rec.get('type') == 'eval':
                scores[rec['epoch']] = rec['score']
                metric = rec.get('metric') or metric
        steps = sorted(train)
        panels = [(steps, [train[s]['loss'] for s in steps], 'step', 'loss', 'training loss'),
                  (steps, [train[s]['lr'] for s in steps], 'step', 'learning rate', 'learning rate')]
        if ranks:
            panels.append((sorted(ranks), [ranks[e] for e in sorted(ranks)], 'epoch', 'effective rank',
                           'RankMe of patch features'))
        if scores:
            panels.append((sorted(scores), [scores[e] for e in sorted(scores)], 'epoch', metric,
                           'linear evaluation (test)'))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
        for ax, (x, y, xlabel, ylabel, title) in zip(axes, panels):
            ax.plot(x, y, marker='o' if xlabel == 'epoch' else None)
            ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
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

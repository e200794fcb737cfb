"""Evaluation of checkpoints during pre-training: ``m2d linear-eval`` in a separate process.

An evaluation never blocks or stops the training. The trainer `submit`s each checkpoint to be
evaluated and `poll`s at its log steps; a finished evaluation gives an `EvalResult` (the test
score of ``report.json``), a failed one a warning with the tail of its log. Quick evaluations
(1 seed, no baselines, no embedding cache) run one at a time; while one runs, a newer checkpoint replaces the one
waiting. At the end, `finish` starts the one waiting, evaluates the final checkpoint on the whole
task or suite with baselines, waits for every evaluation, and copies its summary into the run folder
(``eval_summary.json`` and ``eval_summary.md``).

Layout: ``RUN/eval/epoch-N/`` (``report.json``, ``report.md``, ``linear_eval.log``) and
``RUN/eval/final/`` for the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..fileio import atomic_path

log = logging.getLogger(__name__)

LINEAR_EVAL = (sys.executable, '-m', 'm2d', 'linear-eval')
QUICK_OPTIONS = ('--seeds', '1', '--no_baselines', '--no_cache')  # embeddings of one checkpoint: no reuse
LOG_NAME = 'linear_eval.log'
# torchrun's variables: an evaluation is a process of its own, not a member of the training's group
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'GROUP_WORLD_SIZE', 'ROLE_RANK',
                'ROLE_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID')
SUMMARY = 'eval_summary'
TAIL_LINES = 12


@dataclass
class EvalResult:
    """The outcome of one evaluation: the model's test score per task (metric in [0, 1])."""

    epoch: int
    step: int
    final: bool
    output_dir: Path
    scores: dict[str, float] = field(default_factory=dict)
    metric: str = ''
    baselines: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The mean score over the tasks."""
        return sum(self.scores.values()) / len(self.scores)

    def record(self) -> dict:
        """The ``log.jsonl`` record (``type`` 'eval')."""
        rec = {'type': 'eval', 'epoch': self.epoch, 'step': self.step, 'score': self.score, 'metric': self.metric,
               'final': self.final}
        if len(self.scores) > 1:
            rec.update({f'score_{task}': v for task, v in self.scores.items()})
        rec.update({f'{name}_score': v for name, v in self.baselines.items()})
        return rec


@dataclass
class _Job:
    checkpoint: Path
    epoch: int
    step: int
    final: bool
    output_dir: Path
    proc: subprocess.Popen | None = None
    log_file: IO | None = None
    started: float = 0.0


def read_results(output_dir: Path) -> tuple[dict[str, float], str, dict[str, float]]:
    """Scores in the ``report.json`` files under `output_dir` (one per task): the model's test mean
    per task, the metric, and the mean of each baseline over the tasks."""
    scores, metric, baselines = {}, '', {}
    for path in sorted(Path(output_dir).rglob('report.json')):
        report = json.loads(path.read_text())
        task = report.get('task')
        name = task.get('name') if isinstance(task, dict) else task
        rel = path.parent.relative_to(output_dir)
        scores[str(name or rel.as_posix() or 'task')] = float(report['model']['mean'])
        metric = report.get('metric', metric)
        for base in ('logmel', 'random'):
            if isinstance(report.get(base), dict):
                baselines.setdefault(base, []).append(float(report[base]['mean']))
    if not scores:
        raise ValueError(f'{output_dir}: no report.json written')
    return scores, metric, {k: sum(v) / len(v) for k, v in baselines.items()}


class CheckpointEvaluator:
    """Evaluates checkpoints of the run in `run_dir` with ``m2d linear-eval`` processes.

    task_args: the task options of ``m2d linear-eval`` (`TrainConfig.eval_task_args`).
    command: the evaluation command before its options (tests give a stand-in).
    enabled: False on every process but rank 0 (then nothing is ever started).
    """

    def __init__(self, run_dir: Path, task_args: Sequence[str], device: str = 'cpu',
                 command: Sequence[str] = LINEAR_EVAL, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.task_args = list(task_args)
        self.device = device
        self.command = list(command)
        self.enabled = enabled and bool(self.task_args)
        self.running: list[_Job] = []
        self.waiting: _Job | None = None
        self.interrupted = False  # `finish` stopped waiting on `stop`

    def submit(self, checkpoint: Path, epoch: int, step: int) -> None:
        """Queue a quick evaluation of `checkpoint` (written after epoch `epoch`, step `step`)."""
        if not self.enabled:
            return
        job = _Job(Path(checkpoint), epoch, step, False, self.run_dir / 'eval' / f'epoch-{epoch}')
        if self.waiting is not None:
            log.info('evaluation of epoch %d skipped: epoch %d is newer', self.waiting.epoch, epoch)
        self.waiting = job
        self._start_waiting()

    def poll(self) -> list[EvalResult]:
        """The evaluations finished since the last call (failures are logged, not returned)."""
        results = []
        for job in [j for j in self.running if j.proc.poll() is not None]:
            self.running.remove(job)
            result = self._collect(job)
            if result is not None:
                results.append(result)
        self._start_waiting()
        return results

    def finish(self, checkpoint: Path | None, epoch: int, step: int,
               stop: Callable[[], bool] | None = None) -> list[EvalResult]:
        """Evaluate the final `checkpoint` on the whole task with baselines, wait for every evaluation,
        and copy the final summary into the run folder. Returns the results not yet polled.

        stop: asked while waiting; when it says True (a stop signal), the evaluations still running are
        stopped and `interrupted` is set (the same command with --resume auto evaluates again)."""
        if not self.enabled:
            return []
        if self.waiting is not None:
            self._start(self.waiting)
            self.waiting = None
        if checkpoint is not None:
            self._start(_Job(Path(checkpoint), epoch, step, True, self.run_dir / 'eval' / 'final'))
        if self.running:
            log.info('waiting for %d evaluation(s) to finish (final checkpoint %s; logs in %s)', len(self.running),
                     checkpoint, self.run_dir / 'eval')
        results = []
        while self.running:
            if stop is not None and stop():
                log.info('stop requested while %d evaluation(s) ran: stopped; --resume auto evaluates the final '
                         'checkpoint again', len(self.running))
                self.close()
                self.interrupted = True
                break
            time.sleep(0.2)
            results += self.poll()
        for r in results:
            if r.final:
                self._copy_summary(r)
        return results

    def close(self) -> None:
        """Stop evaluations still running (the training ended with an error)."""
        for job in self.running:
            if job.proc.poll() is None:
                log.info('stopping the evaluation of epoch %d', job.epoch)
                job.proc.terminate()
                job.proc.wait()
            job.log_file.close()
        self.running.clear()

    # ----- internals -------------------------------------------------------------------------

    def _start_waiting(self) -> None:
        if self.waiting is not None and not any(not j.final for j in self.running):
            job, self.waiting = self.waiting, None
            self._start(job)

    def _start(self, job: _Job) -> None:
        args = [*self.command, '--weights', str(job.checkpoint), *self.task_args, '--output_dir', str(job.output_dir),
                '--device', self.device, '--quiet', *(() if job.final else QUICK_OPTIONS)]
        job.output_dir.mkdir(parents=True, exist_ok=True)
        job.log_file = open(job.output_dir / LOG_NAME, 'w')
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
        try:
            job.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=job.log_file, stderr=subprocess.STDOUT,
                                        env=dict(env, PYTHONUNBUFFERED='1'))
        except OSError as e:
            job.log_file.close()
            log.warning('evaluation of epoch %d could not start (%s): %s', job.epoch, ' '.join(args[:4]), e)
            return
        job.started = time.perf_counter()
        self.running.append(job)
        log.info('evaluating %s%s in a separate process (pid %d, log %s)', job.checkpoint.name,
                 ' on the whole task with baselines' if job.final else '', job.proc.pid, job.output_dir / LOG_NAME)

    def _collect(self, job: _Job) -> EvalResult | None:
        job.log_file.close()
        seconds = time.perf_counter() - job.started
        code = job.proc.returncode
        try:
            if code != 0:
                raise ValueError(f'exit status {code}')
            scores, metric, baselines = read_results(job.output_dir)
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning('evaluation of epoch %d%s failed (%s) after %.0f s; training goes on. Last lines of %s:\n%s',
                        job.epoch, ' (final)' if job.final else '', e, seconds, job.output_dir / LOG_NAME,
                        _tail(job.output_dir / LOG_NAME))
            return None
        result = EvalResult(job.epoch, job.step, job.final, job.output_dir, scores, metric, baselines)
        log.info('evaluation of epoch %d%s: %s %.4f (%s; %.0f s)', job.epoch, ' (final)' if job.final else '',
                 metric or 'score', result.score, ', '.join(f'{k} {v:.4f}' for k, v in {**scores, **baselines}.items()),
                 seconds)
        return result

    def _copy_summary(self, result: EvalResult) -> None:
        """``eval_summary.json``/``.md`` in the run folder: the suite summary, or the task's report."""
        out = result.output_dir
        for suffix in ('.json', '.md'):
            src = out / f'summary{suffix}'
            src = src if src.is_file() else out / f'report{suffix}'
            if src.is_file():
                with atomic_path(self.run_dir / f'{SUMMARY}{suffix}') as tmp:
                    shutil.copyfile(src, tmp)
        if out.joinpath('report.md').is_file() and not out.joinpath('summary.md').is_file():
            _relink_markdown(self.run_dir / f'{SUMMARY}.md', out.relative_to(self.run_dir))
        log.info('final evaluation summary: %s', self.run_dir / f'{SUMMARY}.md')


def _relink_markdown(path: Path, prefix: Path) -> None:
    """Point the relative links of a copied report (figures) into the folder it came from."""
    text = path.read_text()
    fixed = re.sub(r'(!?\[[^\]]*\]\()(?![a-z]+:|/|#)([^)]+\))', lambda m: f'{m[1]}{prefix.as_posix()}/{m[2]}', text)
    with atomic_path(path) as tmp:
        tmp.write_text(fixed)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors='replace').rstrip().splitlines()
    except OSError:
        return '  (no log)'
    return '\n'.join(f'  | {line}' for line in text[-lines:]) or '  (empty log)'

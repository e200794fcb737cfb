"""Stopping a run on a scheduler's signal: every rank at the same step, one checkpoint, a known exit status.

SIGTERM (a preemption, ``scancel``, torchrun passing its own SIGTERM on) and SIGUSR1 (SLURM's
``--signal=USR1@SECONDS`` warning before the time limit) only set a flag (`StopSignals`). The loop
shares the flag in the all-reduce of the loss that every micro-step does anyway
(`m2d.train.distributed.mean_and_any`), so every rank sees a request at the same micro-step, whichever
rank got the signal and when: they finish that optimizer step, rank 0 writes ``checkpoint-last.pth``,
and every process exits with `EXIT_STOPPED`. No rank waits in a collective for one that has left.

`requeue` asks SLURM to queue the job again (``scontrol requeue``), as PyTorch Lightning's SLURM
environment does on SIGUSR1; ``m2d pretrain --slurm_requeue`` turns it on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: stopped on a signal with its state saved; run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: signal.Signals | None = None  # the first stop signal this process received


def received() -> signal.Signals | None:
    """The first stop signal this process received while `StopSignals` was installed, or None."""
    return _received


def received_name() -> str:
    """The name of `received` (``SIGTERM``), or what stopped this rank when it got none itself."""
    return _received.name if _received is not None else 'a signal to another rank'


class StopSignals:
    """Installs flag-setting handlers for SIGTERM and SIGUSR1 (main thread only); `restore` puts the
    previous handlers back. Data-loader workers ignore both (`ignore_in_worker`)."""

    def __init__(self):
        self._previous: dict[int, object] = {}

    def install(self) -> 'StopSignals':
        global _received
        _received = None
        if threading.current_thread() is not threading.main_thread():
            log.debug('not the main thread: SIGTERM/SIGUSR1 keep their handlers')
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, _handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process got a stop signal."""
        return _received is not None

    def __enter__(self) -> 'StopSignals':
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def ignore_in_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: a worker ignores SIGTERM and SIGUSR1 (SLURM signals every
    process of the job; torch's workers would die of SIGTERM and take the run down before it saves).
    The main process stops the run and its workers; a worker whose parent dies exits by itself."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _handle(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum)


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else SLURM_JOB_ID."""
    env = os.environ if environ is None else environ
    if env.get('SLURM_ARRAY_JOB_ID') and env.get('SLURM_ARRAY_TASK_ID'):
        return f'{env["SLURM_ARRAY_JOB_ID"]}_{env["SLURM_ARRAY_TASK_ID"]}'
    return env.get('SLURM_JOB_ID')


def requeue(environ: dict[str, str] | None = None) -> bool:
    """``scontrol requeue JOB``; logs and returns whether it worked (a failure does not stop the exit)."""
    job = slurm_job_id(environ)
    if not job:
        log.warning('--slurm_requeue: no SLURM_JOB_ID in the environment; not requeued')
        return False
    try:
        out = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning('--slurm_requeue: scontrol requeue %s failed: %s', job, e)
        return False
    if out.returncode != 0:
        log.warning('--slurm_requeue: scontrol requeue %s exited with %d: %s', job, out.returncode,
                    (out.stderr or out.stdout).strip())
        return False
    log.info('requeued SLURM job %s', job)
    return True

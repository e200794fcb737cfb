"""The `m2d demo` pipeline: data -> `m2d convert` -> `m2d pretrain` -> `m2d linear-eval` -> report.

Each stage after the data runs the same command a user types (through `m2d.cli.main`, in this
process), and the report lists those command lines, so every step can be repeated by hand on other
data. Pre-training sees only the train split's audio; the evaluation scores held-out test clips.

Layout (defaults): ``demo_report/`` holds the report, ``demo_report/work/`` the audio
(``synth_sounds/CLASS/*.wav``), the pre-training links and log-mel files, the run folder with its
checkpoint, and the embedding cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import M2DError
from . import synth

log = logging.getLogger(__name__)

MODEL = 'm2d_vit_tiny'
INPUT_SIZE = (80, 96)
PATCH_SIZE = (16, 16)
HOP = 160  # samples per frame at 16 kHz
# Clips as long as the model's input: 1 + samples // HOP = 96 frames (0.95 s), one encoder chunk, no padding.
CLIP_SECONDS = (INPUT_SIZE[1] - 1) * HOP / synth.SAMPLE_RATE
SYNTH_FOLDER = 'synth_sounds'  # under the work folder; also the task's name in the reports
MIN_MARGIN = 0.05  # a "clear" win: at least 5 points and 2 standard deviations over the random encoder


class DemoError(M2DError):
    """A demo stage failed; the message names the stage and the command that ran."""


@dataclass
class DemoConfig:
    """Settings of one demo run (the options of `m2d demo`)."""

    output_dir: Path = Path('demo_report')
    work_dir: Path | None = None         # default: OUTPUT_DIR/work
    data_dir: Path | None = None         # own audio: class sub-folders, a CSV's folder, or FSDD
    csv: Path | None = None              # with data_dir: file_name,label[,split]
    task: str | None = None              # a built-in task with data_dir (fsdd-digits, fsdd-speakers)
    clips_per_class: int = 400           # synthesized clips per class (70 % train, 10 % valid, 20 % test)
    epochs: int = 60                     # 35 steps per epoch on the 2,240 train clips: 2,100 steps
    batch_size: int = 64
    depth: int = 2
    decoder_depth: int = 1
    decoder_embed_dim: int = 128
    mask_ratio: float = 0.7
    blr: float = 2e-3
    warmup_epochs: float = 2
    ema_decay_init: float = 0.99995      # the reference's slow EMA: a fast one (0.99 -> 0.999) made the
    ema_decay: float = 0.99999           # target easy to predict and the features worse than random
    rank_every: int = 5                  # epochs between effective-rank measurements
    seeds: int = 3                       # linear-probe seeds
    probe_epochs: int = 200
    probe_lr: float = 1e-3               # linear-eval's 3e-5 under-trains a probe on a few thousand clips
    probe_layers: str | None = None      # linear-eval --layers (None: the last), model and random encoder alike
    seed: int = 0                        # data, split and pre-training seed
    device: str | None = None
    bf16: bool | None = None             # None: when the device supports it natively
    progress: bool = True
    quick: bool = False                  # a smoke run: its verdict says so

    @classmethod
    def quick_run(cls, **overrides: Any) -> DemoConfig:
        """A tiny run for tests and a first look (seconds): few clips, one epoch, one seed."""
        cfg = cls(clips_per_class=8, epochs=1, batch_size=16, seeds=1, probe_epochs=20, warmup_epochs=0,
                  rank_every=1, quick=True)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir) / 'work'


@dataclass
class DemoResult:
    """What a demo run produced: the report paths, the three results and the verdict."""

    report_md: Path
    report_json: Path
    verdict: str
    clear_win: bool
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# ----- helpers --------------------------------------------------------------------------------

def bf16_supported(device: str) -> bool:
    """True when `device` runs bfloat16 matmuls natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX)."""
    import torch

    if device.startswith('cuda'):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return ' avx512_bf16' in flags or ' amx_bf16' in flags


def _run_command(argv: list[str], stage: str) -> None:
    """`m2d ARGV...` in this process; a non-zero exit status is a `DemoError`."""
    from ..cli import main

    rc = main(argv)
    if rc != 0:
        raise DemoError(f'{stage}: `{command_line(argv)}` failed with exit status {rc} (see the messages above)')


def command_line(argv: list[str]) -> str:
    """The shell form of ``m2d ARGV...``."""
    return 'm2d ' + ' '.join(shlex.quote(str(a)) for a in argv)


class _Stopwatch:
    """Wall-clock and CPU seconds (all threads of this process) per stage; the CPU time tells what a
    stage costs when other work shares the machine."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Stage:
            def __enter__(self):
                self.t0, self.c0 = time.perf_counter(), time.process_time()
                log.info('== %s', name)

            def __exit__(self, *exc):
                watch.timings[name] = time.perf_counter() - self.t0
                watch.cpu[name] = time.process_time() - self.c0

        return _Stage()


class _TrainProgress:
    """A progress bar for `m2d pretrain` that follows the run's ``log.jsonl`` (step, loss, effective
    rank) while the trainer's per-step console lines are held back (they still go to train.log)."""

    def __init__(self, log_path: Path, total_steps: int, enabled: bool):
        self.log_path, self.total, self.enabled = log_path, total_steps, enabled
        self._stop = threading.Event()
        self._filter = _DropTrainerInfo()

    def __enter__(self):
        if not self.enabled:
            return self
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit='step', desc='pre-train', dynamic_ncols=True)
        for h in logging.getLogger().handlers:
            h.addFilter(self._filter)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self) -> None:
        pos, rank, loss = 0, None, None
        while True:
            stopping = self._stop.wait(0.5)
            if self.log_path.exists():
                for line in self.log_path.read_text(encoding='utf-8').splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get('type') == 'train':
                        pos, loss = max(pos, int(rec.get('step', 0))), rec.get('loss', loss)
                    elif 'effective_rank' in rec:
                        rank = rec['effective_rank']
                self.bar.n = min(pos, self.total)
                post = {}
                if loss is not None:
                    post['loss'] = f'{loss:.3f}'
                if rank is not None:
                    post['eff.rank'] = f'{rank:.1f}'
                self.bar.set_postfix(post, refresh=False)
                self.bar.refresh()
            if stopping:
                return

    def __exit__(self, *exc):
        if not self.enabled:
            return
        self._stop.set()
        self.thread.join()
        self.bar.close()
        for h in logging.getLogger().handlers:
            h.removeFilter(self._filter)


class _DropTrainerInfo(logging.Filter):
    """Holds back the trainer's per-step and per-epoch INFO lines on the console (the bar shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == 'm2d.train.monitor' and record.levelno <= logging.INFO
                    and record.getMessage().startswith(('step ', 'epoch ')))


# ----- stages ---------------------------------------------------------------------------------

def _load_task(cfg: DemoConfig):
    from ..evaluate import load_task

    if cfg.data_dir is None:
        audio = cfg.work / SYNTH_FOLDER
        synth.make_collection(audio, cfg.clips_per_class, seconds=CLIP_SECONDS, seed=cfg.seed)
        return load_task(data_dir=audio, seed=cfg.seed), {'data_dir': str(audio)}
    if not Path(cfg.data_dir).is_dir():
        raise DemoError(f'--data_dir {cfg.data_dir}: no such folder')
    src = {'data_dir': str(cfg.data_dir)}
    if cfg.csv:
        src['csv'] = str(cfg.csv)
    if cfg.task:
        src['task'] = cfg.task
    return load_task(cfg.task, csv=cfg.csv, data_dir=cfg.data_dir, seed=cfg.seed), src


def _link_train_audio(task, dest: Path) -> int:
    """``dest/KEY.SUFFIX`` for every train clip (a symbolic link, or a copy where links fail); stale
    entries of an earlier run are removed. Returns the number of clips."""
    wanted = {Path(c.key + c.path.suffix.lower()): c.path.resolve() for c in task.split('train')}
    if dest.exists():
        for p in sorted(dest.rglob('*'), reverse=True):
            rel = p.relative_to(dest)
            if p.is_symlink() or p.is_file():
                if rel not in wanted or (p.is_symlink() and p.resolve() != wanted[rel]):
                    p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for rel, src in wanted.items():
        link = dest / rel
        if link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(src)
        except OSError:
            shutil.copyfile(src, link)
    return len(wanted)


def _remove_stale_lms(lms_dir: Path, audio_dir: Path) -> None:
    """Remove ``.npy`` files whose audio is no longer in the pre-training set (the file list is rebuilt)."""
    if not lms_dir.is_dir():
        return
    keep = {p.relative_to(audio_dir).with_suffix('.npy') for p in audio_dir.rglob('*') if p.is_file()}
    for p in lms_dir.rglob('*.npy'):
        if p.relative_to(lms_dir) not in keep:
            p.unlink()


def _pretrain_argv(cfg: DemoConfig, lms_csv: Path, run_dir: Path, device: str, bf16: bool, steps_per_epoch: int) -> list[str]:
    argv = ['pretrain', '--model', MODEL, '--depth', cfg.depth, '--decoder_depth', cfg.decoder_depth,
            '--decoder_embed_dim', cfg.decoder_embed_dim, '--decoder_num_heads', max(1, cfg.decoder_embed_dim // 32),
            '--input_size', f'{INPUT_SIZE[0]}x{INPUT_SIZE[1]}', '--patch_size', f'{PATCH_SIZE[0]}x{PATCH_SIZE[1]}',
            '--csv_main', lms_csv, '--data_path', lms_csv.parent.parent, '--min_ds_size', 0,
            '--batch_size', cfg.batch_size, '--epochs', cfg.epochs, '--warmup_epochs', f'{cfg.warmup_epochs:g}',
            '--blr', f'{cfg.blr:g}', '--mask_ratio', f'{cfg.mask_ratio:g}',
            '--ema_decay_init', f'{cfg.ema_decay_init:g}', '--ema_decay', f'{cfg.ema_decay:g}',
            '--feature_eval_freq', min(cfg.rank_every, cfg.epochs), '--feature_eval_samples', 256,
            '--save_freq', cfg.epochs, '--log_every', max(1, min(10, steps_per_epoch)), '--num_workers', 0,
            '--seed', cfg.seed, '--device', device, '--output_dir', run_dir]
    if bf16:
        argv.append('--bf16')
    return [str(a) for a in argv]


def _linear_eval_argv(cfg: DemoConfig, source: dict[str, str], checkpoint: Path, out: Path, device: str) -> list[str]:
    argv = ['linear-eval', '--weights', checkpoint]
    for k in ('task', 'csv', 'data_dir'):
        if k in source:
            argv += [f'--{k}', source[k]]
    argv += ['--seeds', cfg.seeds, '--seed', cfg.seed, '--epochs', cfg.probe_epochs, '--lr', f'{cfg.probe_lr:g}',
             '--output_dir', out, '--cache_dir', cfg.work / 'embeddings', '--device', device]
    if cfg.probe_layers:
        argv += ['--layers', cfg.probe_layers]
    if not cfg.progress:
        argv.append('--quiet')
    return [str(a) for a in argv]


def verdict(report: dict[str, Any]) -> tuple[str, bool]:
    """The one-line verdict and whether the pre-trained encoder beats the random one clearly:
    by at least `MIN_MARGIN` and by more than twice the combined std of the two over seeds."""
    m, r, lm = report['model'], report['random'], report.get('logmel')
    margin = m['mean'] - r['mean']
    spread = math.hypot(m['std'], r['std'])
    clear = margin >= MIN_MARGIN and margin > 2 * spread
    n = len(m['per_seed'])
    nums = (f'pre-trained {100 * m["mean"]:.1f} ± {100 * m["std"]:.1f} %, random encoder {100 * r["mean"]:.1f} ± '
            f'{100 * r["std"]:.1f} %' + (f', raw log-mel {100 * lm["mean"]:.1f} ± {100 * lm["std"]:.1f} %' if lm else '')
            + f' ({report["metric"]} on held-out test clips, {n} probe seed{"s" if n != 1 else ""})')
    if clear:
        return f'M2D pre-training works here: +{100 * margin:.1f} points over the random encoder of the same shape; {nums}', True
    return (f'NOT a clear win: the pre-trained encoder is {100 * margin:+.1f} points from the random encoder of the same '
            f'shape (a clear win needs >= {100 * MIN_MARGIN:.0f} points and > 2 std); {nums}'), False


# ----- the run --------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run every stage and write ``OUTPUT_DIR/report.md`` and ``report.json``."""
    import torch

    from ..data.convert import convert
    from .report import write_report

    t_start, c_start = time.perf_counter(), time.process_time()
    out, work = Path(cfg.output_dir), cfg.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    bf16 = bf16_supported(device) if cfg.bf16 is None else cfg.bf16
    watch = _Stopwatch()
    commands: list[dict[str, str]] = []

    with watch('data'):
        task, source = _load_task(cfg)
    with watch('convert'):
        pre_audio, lms_dir = work / 'pretrain_audio', work / 'lms'
        n_train = _link_train_audio(task, pre_audio)
        _remove_stale_lms(lms_dir, pre_audio)
        if n_train < cfg.batch_size:
            raise DemoError(f'{task.source}: {n_train} train clips, fewer than one batch ({cfg.batch_size}); '
                            'use more clips or a smaller batch')
        min_seconds = round(CLIP_SECONDS + 0.005, 3)
        summary = convert(pre_audio, lms_dir, sr=synth.SAMPLE_RATE, min_seconds=min_seconds, workers=0,
                          progress=cfg.progress)
        if summary.exit_code or summary.failed:
            raise DemoError(f'convert: {len(summary.failed)} of {summary.found} files failed; see {summary.failures_csv}')
        commands.append({'stage': 'convert (train split only)', 'command': command_line(
            ['convert', pre_audio, lms_dir, '--sr', synth.SAMPLE_RATE, '--min-seconds', min_seconds, '--workers', 0])})

    with watch('pretrain'):
        run_dir = work / f'{MODEL}-{INPUT_SIZE[0]}x{INPUT_SIZE[1]}p{PATCH_SIZE[0]}x{PATCH_SIZE[1]}p16k-demo'
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run each time (the folder is the demo's own)
        steps_per_epoch = n_train // cfg.batch_size
        argv = _pretrain_argv(cfg, summary.files_csv, run_dir, device, bf16, steps_per_epoch)
        commands.append({'stage': 'pretrain', 'command': command_line(argv)})
        with _TrainProgress(run_dir / 'log.jsonl', steps_per_epoch * cfg.epochs, cfg.progress):
            _run_command(argv, 'pretrain')
        checkpoint = run_dir / f'checkpoint-{cfg.epochs}.pth'
        if not checkpoint.is_file():
            raise DemoError(f'pretrain: {checkpoint} was not written')

    with watch('linear-eval'):
        eval_dir = out / 'linear_eval'
        argv = _linear_eval_argv(cfg, source, checkpoint, eval_dir, device)
        commands.append({'stage': 'linear-eval', 'command': command_line(argv)})
        _run_command(argv, 'linear-eval')
        eval_report = json.loads((eval_dir / 'report.json').read_text(encoding='utf-8'))

    with watch('report'):
        line, clear = verdict(eval_report)
        if cfg.quick:
            line = f'--quick smoke run (too small to measure anything): {line}'
        watch.timings['total'] = time.perf_counter() - t_start
        watch.cpu['total'] = time.process_time() - c_start
        info = {'cpu_s': watch.cpu, 'config': {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                'device': device, 'bf16': bf16, 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
                'task': str(task), 'n_pretrain_clips': n_train, 'run_dir': str(run_dir), 'checkpoint': str(checkpoint),
                'linear_eval_dir': str(eval_dir), 'commands': commands, 'source': source}
        md, js = write_report(out, eval_report, info, watch.timings, line, clear, lms_dir, run_dir, task)
    watch.timings['total'] = time.perf_counter() - t_start
    results = {k: eval_report[k] for k in ('model', 'random', 'logmel') if k in eval_report}
    return DemoResult(md, js, line, clear, results, dict(watch.timings))

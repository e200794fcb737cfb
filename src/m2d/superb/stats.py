"""Normalization statistics of a SUPERB task, computed from its audio (`m2d superb stats`).

Which statistic: the one the reference's ``m2d_calcnorm`` upstream measured, i.e. the mean and std
of every log-mel value of the **padded batches s3prl feeds the upstream**: a batch's waveforms are
zero-padded to its longest, the log-mel of the padded batch is taken, and all its values count,
including the frames of padding (log(eps) ≈ -15.9). Not the statistic of each unpadded waveform.
Why: these are the values the `m2d` upstream normalizes with the statistics during training and
evaluation (it pads the same way), and the seed's published statistics were measured this way,
so statistics computed here stay comparable with them. The two differ wherever lengths in a batch
differ (IC, ER, SID): with the reference's batch sizes the padding lowers the mean.

Here the task's training split is read as s3prl's downstream loads it (the config's data root and
list, its training crop and gain, KS's class-balanced draws with 1-s crops of background noise),
shuffled with a seed and grouped in batches of the config's training batch size. Two differences
from the reference, both deliberate: all values of all batches weigh the same (pooled float64
moments; the reference averaged per-batch means and variances, weighting short batches more), and
the whole split is read once (the reference stopped after 10,000 batches). PR's bucketed batches
(utterances of similar length) are treated as unpadded. `CalcNormExpert` accumulates exactly the
same quantity over the batches s3prl gives it (`padded_lms` + `Moments`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..data.stats import merge_moments
from . import SuperbError
from .tasks import Task, get_task

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CSV_COLUMNS = ('file_name', 'path', 'wav_path', 'filename', 'file')

# speech_commands: the 12 classes s3prl trains on; other words are _unknown_, noise crops _silence_.
KS_WORDS = ('yes', 'no', 'up', 'down', 'left', 'right', 'on', 'off', 'stop', 'go')


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of many values (float64, Chan's parallel merge)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: torch.Tensor | np.ndarray) -> 'Moments':
        x = torch.as_tensor(values).detach().reshape(-1).to(torch.float64)  # reduced where it is
        if x.numel() == 0:
            return cls()
        mean = float(x.mean())
        return cls(x.numel(), mean, float((x - mean).square().sum()))

    def merge(self, other: 'Moments') -> 'Moments':
        """Add `other` into self (returns self)."""
        if other.count:
            self.count, self.mean, self.m2 = merge_moments((self.count, self.mean, self.m2),
                                                           (other.count, other.mean, other.m2))
        return self

    @property
    def std(self) -> float:
        """Population standard deviation (as the reference: the mean of squared deviations, then sqrt)."""
        return math.sqrt(self.m2 / self.count) if self.count else float('nan')


def padded_lms(wavs: Sequence[torch.Tensor], to_feature) -> torch.Tensor:
    """Waveforms of any lengths -> log-mel ``[B, 1, 80, T]`` of the batch zero-padded to the longest."""
    return to_feature(pad_sequence([torch.as_tensor(w).reshape(-1) for w in wavs], batch_first=True))


# ----- the training split of each task, as s3prl's downstream reads it ------------------------------------

@dataclass(frozen=True)
class Draw:
    """One waveform of the training loader: a file, optionally a random crop and a gain."""

    path: Path
    crop: int | None = None  # samples; a random crop of this length when the file is longer
    gain_db: float = 0.0


@dataclass
class TrainSplit:
    """What a task's training loader gives the upstream: the draws in order and the batch size."""

    name: str
    draws: list[Draw]
    batch_size: int
    resampled: bool = False  # s3prl resamples this task's audio to 16 kHz itself
    notes: list[str] = field(default_factory=list)


def read_config(s3prl_dir: Path, task: Task) -> dict:
    """The task's downstream config (YAML) in the s3prl folder."""
    try:
        import yaml
    except ImportError:
        raise SuperbError('reading s3prl configs needs PyYAML (pip install pyyaml; s3prl installs it)') from None
    path = s3prl_dir / task.config_path
    if not path.is_file():
        raise SuperbError(f'{path}: no such downstream config in the s3prl folder')
    with open(path) as f:
        return yaml.safe_load(f)


def _datarc(config: dict, task: Task, key: str = 'datarc') -> dict:
    try:
        return config['downstream_expert'][key]
    except (KeyError, TypeError):
        raise SuperbError(f'{task.config_path}: no downstream_expert.{key} section') from None


def _data_root(value, task: Task, key: str) -> Path:
    root = Path(str(value)).expanduser()
    if not root.exists():
        raise SuperbError(f'{task.config_path}: {key} = {root} does not exist; set it to your copy of the '
                          f'{task.title} data (edit the config, as s3prl needs it too)')
    return root


def _in_s3prl(s3prl_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else s3prl_dir / path


def _speech_commands(s3prl_dir: Path, task: Task, config: dict, rng: random.Random, n: int | None) -> TrainSplit:
    datarc = _datarc(config, task)
    root = _data_root(datarc.get('speech_commands_root'), task, 'speech_commands_root')
    data: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name == '_background_noise_':
            continue
        label = entry.name if entry.name in KS_WORDS else '_unknown_'
        for wav in sorted(entry.glob('*.wav')):  # s3prl's hash split: 10 % dev, 10 % test, the rest train
            speaker = re.sub(r'_nohash_.*$', '', wav.name)
            pct = (int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % 2 ** 27) * (100.0 / (2 ** 27 - 1))
            if pct >= 20:
                data.append((label, wav))
    data += [('_silence_', p) for p in sorted((root / '_background_noise_').glob('*.wav'))]
    if not data:
        raise SuperbError(f'{root}: no speech_commands training clips (class folders of .wav files)')
    counts: dict[str, int] = {}
    for label, _ in data:
        counts[label] = counts.get(label, 0) + 1
    weights = [len(data) / counts[label] for label, _ in data]  # s3prl's class-balanced sampler
    picks = rng.choices(data, weights=weights, k=n or len(data))
    draws = [Draw(p, SAMPLE_RATE if label == '_silence_' else None, -3.0) for label, p in picks]
    return TrainSplit(task.name, draws, int(datarc.get('batch_size', 32)), resampled=True,
                      notes=['class-balanced draws with replacement, 1-s crops of background noise, gain -3 dB'])


def _fluent_commands(s3prl_dir: Path, task: Task, config: dict, rng: random.Random, n: int | None) -> TrainSplit:
    datarc = _datarc(config, task)
    root = _data_root(datarc.get('file_path'), task, 'file_path')
    paths = [root / row['path'] for row in _read_csv(root / 'data' / 'train_data.csv', ('path',))]
    return TrainSplit(task.name, [Draw(p) for p in paths], int(datarc.get('train_batch_size', 32)))


def _emotion(s3prl_dir: Path, task: Task, config: dict, rng: random.Random, n: int | None) -> TrainSplit:
    datarc = _datarc(config, task)
    root = _data_root(datarc.get('root'), task, 'root')
    fold = datarc.get('test_fold') or 'fold1'
    meta = _in_s3prl(s3prl_dir, datarc.get('meta_data', './downstream/emotion/meta_data'))
    meta = meta / fold.replace('fold', 'Session') / 'train_meta_data.json'
    if not meta.is_file():
        raise SuperbError(f'{meta}: no IEMOCAP meta data for {fold} (run s3prl\'s IEMOCAP_preprocess.py)')
    items = json.loads(meta.read_text())['meta_data']
    return TrainSplit(task.name, [Draw(root / it['path']) for it in items], int(datarc.get('train_batch_size', 4)),
                      resampled=True, notes=[f'training list of test fold {fold} (dev part included)'])


def _voxceleb1(s3prl_dir: Path, task: Task, config: dict, rng: random.Random, n: int | None) -> TrainSplit:
    datarc = _datarc(config, task)
    root = _data_root(datarc.get('file_path'), task, 'file_path')
    meta = _in_s3prl(s3prl_dir, datarc.get('meta_data', './downstream/voxceleb1/veri_test_class.txt'))
    if not meta.is_file():
        raise SuperbError(f'{meta}: no VoxCeleb1 split list (meta_data in {task.config_path})')
    parts = sorted(d / 'wav' for d in root.iterdir() if (d / 'wav').is_dir())  # s3prl: root/*/wav/ID/VIDEO/N.wav
    paths, missing = [], 0
    for line in meta.read_text().splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != '1':
            continue
        found = next((d / fields[1] for d in parts if (d / fields[1]).is_file()), None)
        if found is None:
            missing += 1
        else:
            paths.append(found)
    if missing:
        log.warning('%s: %d training files of %s are missing; using the %d found', root, missing, meta.name, len(paths))
    crop = datarc.get('max_timestep')
    return TrainSplit(task.name, [Draw(p, int(crop) if crop else None) for p in paths],
                      int(datarc.get('train_batch_size', 8)),
                      notes=[f'random crops of {crop} samples'] if crop else [])


def _libriphone(s3prl_dir: Path, task: Task, config: dict, rng: random.Random, n: int | None) -> TrainSplit:
    corpus = _datarc(config, task, 'corpus')
    train = corpus.get('train')
    if 'csv_dir' in corpus:  # newer configs: data/superb_pr/train.csv with a wav_path column
        table = _in_s3prl(s3prl_dir, corpus['csv_dir']) / str(train)
        paths = [_in_s3prl(s3prl_dir, row['wav_path']) for row in _read_csv(table, ('wav_path',))]
    else:  # older configs: LibriSpeech root + split names
        root = _data_root(corpus.get('path'), task, 'corpus.path')
        splits = train if isinstance(train, list) else [train]
        paths = [p for s in splits for p in sorted((root / s).rglob('*.flac'))]
    if not paths:
        raise SuperbError(f'{task.config_path}: the training split lists no audio files')
    return TrainSplit(task.name, [Draw(p) for p in paths], 1,
                      notes=['bucketed batches (similar lengths) counted as unpadded'])


SPLITS = {'speech_commands': _speech_commands, 'fluent_commands': _fluent_commands, 'emotion': _emotion,
          'voxceleb1': _voxceleb1, 'ctc': _libriphone}


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict]:
    if not path.is_file():
        raise SuperbError(f'{path}: no such file list')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if rows and not any(c in rows[0] for c in columns):
        raise SuperbError(f'{path}: no column {" or ".join(columns)} (columns: {", ".join(rows[0])})')
    return rows


def task_split(task: str | Task, s3prl_root: str | Path, seed: int = 0, max_files: int | None = None) -> TrainSplit:
    """The training draws of a SUPERB task in the order used for the statistics (shuffled with `seed`)."""
    from .tasks import find_s3prl_dir

    task = get_task(task) if isinstance(task, str) else task
    s3prl_dir = find_s3prl_dir(s3prl_root)
    rng = random.Random(seed)
    split = SPLITS[task.downstream](s3prl_dir, task, read_config(s3prl_dir, task), rng, max_files)
    if task.downstream != 'speech_commands':  # KS draws are already a random sample
        rng.shuffle(split.draws)
    if max_files:
        split.draws = split.draws[:max_files]
    return split


def folder_split(source: str | Path, batch_size: int = 1, seed: int = 0, max_files: int | None = None) -> TrainSplit:
    """Any folder of audio files or CSV list (column file_name/path/wav_path, relative to the CSV's folder)."""
    from ..audio import find_audio_files

    source = Path(source)
    if source.is_dir():
        paths = find_audio_files(source)
    elif source.suffix.lower() == '.csv':
        rows = _read_csv(source, CSV_COLUMNS)
        column = next((c for c in CSV_COLUMNS if rows and c in rows[0]), None)
        paths = [_in_s3prl(source.parent, row[column]) for row in rows] if column else []
    else:
        raise SuperbError(f'{source}: not a SUPERB task, a folder or a .csv list')
    if not paths:
        raise SuperbError(f'{source}: no audio files')
    draws = [Draw(p) for p in paths]
    random.Random(seed).shuffle(draws)
    return TrainSplit(str(source), draws[:max_files] if max_files else draws, batch_size)


# ----- the statistics ---------------------------------------------------------------------------------

def split_stats(split: TrainSplit, seed: int = 0, progress: bool = True) -> dict:
    """Mean and std of the log-mel values of `split` in padded batches (see the module docstring).

    Files are read ahead in threads by the `m2d.jobs` engine; one batch of waveforms is in memory at a
    time and the moments are accumulated in float64. Unreadable files are skipped and counted.
    Returns a JSON-ready dict (mean, std, files, values, failed, batch_size, ...).
    """
    from .. import jobs
    from ..audio import LogMelSpectrogram, load_audio, preset

    import soundfile as sf

    front_end = LogMelSpectrogram(preset(SAMPLE_RATE))
    total = Moments()
    not_16k: list[tuple[Path, int]] = []
    lock = threading.Lock()
    draws = {f'{i:08d}': d for i, d in enumerate(split.draws)}

    def read(item: 'jobs.Item') -> torch.Tensor:
        draw = draws[item.key]
        rate = sf.info(str(draw.path)).samplerate
        if rate != SAMPLE_RATE:
            with lock:
                not_16k.append((draw.path, rate))
        wav = load_audio(draw.path, SAMPLE_RATE)
        if draw.crop and len(wav) > draw.crop:
            start = random.Random(f'{seed}:{item.key}').randint(0, len(wav) - draw.crop)
            wav = wav[start:start + draw.crop]
        if draw.gain_db:
            wav = wav * np.float32(10 ** (draw.gain_db / 20))
        return torch.from_numpy(np.ascontiguousarray(wav))

    def transform(wavs: list[torch.Tensor]) -> list[None]:
        with torch.no_grad():
            total.merge(Moments.of(padded_lms(wavs, front_end)))
        return [None] * len(wavs)

    plan = jobs.plan(None, name='superb-stats', items=[(d.path, key) for key, d in draws.items()])
    summary = jobs.run(plan, read=read, transform=transform, batch_size=split.batch_size, progress=progress)
    plan.release()
    for path, reason in summary.failed[:5]:
        log.warning('skipped %s', reason if str(path) in reason else f'{path}: {reason}')
    if len(summary.failed) > 5:
        log.warning('... and %d more unreadable files', len(summary.failed) - 5)
    if not_16k:
        path, rate = not_16k[0]
        if split.resampled:
            log.info('%d files are not 16 kHz (e.g. %s at %d Hz); s3prl resamples this task, and so did this',
                     len(not_16k), path, rate)
        else:
            log.warning('%d files are not 16 kHz (e.g. %s at %d Hz): they were resampled to 16 kHz here, but '
                        's3prl feeds them to the upstream as they are; resample the data to 16 kHz first',
                        len(not_16k), path, rate)
    if total.count == 0:
        raise SuperbError(f'{split.name}: none of the {len(split.draws)} files could be read')
    return {'task': split.name, 'mean': total.mean, 'std': total.std, 'files': summary.done,
            'failed': len(summary.failed), 'values': total.count, 'batch_size': split.batch_size,
            'seed': seed, 'notes': split.notes}

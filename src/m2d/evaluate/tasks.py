"""Labeled audio tasks for downstream evaluation: CSV, folder and built-in FSDD tasks, and clip loading.

A task is a list of clips, each with its labels and its split (train/valid/test), plus the sorted
class names and the unit length every clip is cropped or padded to. Three sources:

- **CSV** (`csv=FILE, data_dir=DIR`): columns ``file_name,label`` and optional ``split`` (EVAR's
  metadata files as they are; other columns are ignored). Several labels in one cell (``a;b``, or
  EVAR's ``a,b``) make a multi-label task. Without ``split``: a ``fold`` column makes a fold task
  (every clip keeps its fold; `Task.folds` lists them and `Task.for_fold(K)` is the task with fold
  K as test and all others as train, as EVAR runs each fold); the task as loaded holds out the
  first fold, with a validation part carved from the rest by the seed. Otherwise a stratified
  train/valid/test split (default 70/10/20) from the seed.
- **Folder** (`data_dir=DIR`): each sub-folder is a class; its audio files (recursive) are the clips.
- **Built-in** (`'fsdd-digits'`, `'fsdd-speakers'`): the Free Spoken Digit Dataset with its official
  split (takes 0-4 are test); a validation part is carved from the rest by the seed.
- **EVAR's tasks by name** (`'esc50'`, `'us8k'`, ... see `evar.EVAR_TASKS`): ``DATA_DIR/<task>.csv``
  (as `m2d datasets` writes it) or EVAR's own metadata (`csv=evar/metadata/<task>.csv`,
  `data_dir=work/16k/<task>`), with EVAR's unit length. ``PREPARED.json`` beside the data (written
  by `m2d datasets`) gives the task its license and citation (`Task.prepared`).

Every problem with the input is a `TaskError` naming the file or argument.
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..audio import AUDIO_SUFFIXES, find_audio_files, load_audio
from ..errors import M2DError
from .evar import EVAR_TASKS

log = logging.getLogger(__name__)

SPLITS = ('train', 'valid', 'test')
SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'valid': 'valid', 'val': 'valid',
                 'validation': 'valid', 'dev': 'valid', 'test': 'test', 'eval': 'test', 'evaluation': 'test'}
BUILTIN_TASKS = ('fsdd-digits', 'fsdd-speakers')
MAX_DEFAULT_UNIT_SEC = 10.0
FSDD_NAME_RE = re.compile(r'^(\d)_([A-Za-z]+)_(\d+)$')
FSDD_TEST_TAKES = 5  # takes 0-4 form the official test set


class TaskError(M2DError):
    """A task that cannot be evaluated as given; the message names the file or argument."""


@dataclass(frozen=True)
class Clip:
    """One labeled audio file of a task."""

    path: Path
    key: str                 # unique id within the task (relative path without suffix)
    labels: tuple[str, ...]  # one label, or several for multi-label tasks
    split: str               # 'train' | 'valid' | 'test'
    fold: str | None = None  # the CSV's fold value; None when the task has no folds


@dataclass
class Task:
    """A labeled audio task: clips with splits, sorted class names, unit length."""

    name: str                # 'fsdd-digits', or the CSV/folder stem
    clips: list[Clip]
    classes: list[str]       # sorted class names; index = class id
    multilabel: bool
    unit_sec: float          # clips are cropped/padded to this length
    source: str = ''         # where the task came from (CSV path, folder), for reports
    notes: list[str] = field(default_factory=list)  # how the split was made, etc.
    prepared: dict = field(default_factory=dict)    # PREPARED.json of the data (license, citation, ...)

    @property
    def folds(self) -> list[str]:
        """The fold ids of a fold task, sorted (numerically when they are integers); empty without folds."""
        return sorted({c.fold for c in self.clips if c.fold is not None}, key=fold_sort_key)

    def for_fold(self, fold: str | int) -> Task:
        """A copy where the clips of `fold` are the test split and all others train (no valid split: each
        consumer makes its own validation part, as EVAR does)."""
        fold = str(fold)
        if fold not in self.folds:
            known = ', '.join(self.folds) or 'none: the task has no fold column'
            raise TaskError(f'{self.source}: fold {fold!r} is not a fold of {self.name} (folds: {known})')
        clips = [dataclasses.replace(c, split='test' if c.fold == fold else 'train') for c in self.clips]
        notes = [n for n in self.notes if not n.startswith('fold ')]
        return dataclasses.replace(self, clips=clips, notes=[f'fold {fold} is the test split, the other folds train',
                                                             *notes])

    def split(self, name: str) -> list[Clip]:
        """The clips of one split ('train', 'valid' or 'test'), in task order."""
        if name not in SPLITS:
            raise ValueError(f'unknown split {name!r}; expected one of {SPLITS}')
        return [c for c in self.clips if c.split == name]

    def targets(self, clips: Sequence[Clip] | None = None) -> np.ndarray:
        """Class ids ``[N]`` (int64), or a {0,1} matrix ``[N, C]`` (float32) for a multi-label task."""
        clips = self.clips if clips is None else clips
        index = {c: i for i, c in enumerate(self.classes)}
        if self.multilabel:
            y = np.zeros((len(clips), len(self.classes)), dtype=np.float32)
            for n, clip in enumerate(clips):
                y[n, [index[label] for label in clip.labels]] = 1.0
            return y
        return np.array([index[clip.labels[0]] for clip in clips], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Number of clips per split."""
        c = Counter(clip.split for clip in self.clips)
        return {s: c.get(s, 0) for s in SPLITS}

    def fingerprint(self) -> str:
        """A short hash of the clip list (keys, files, labels, splits): changes when the task does."""
        h = hashlib.sha256()
        for clip in self.clips:
            h.update(f'{clip.key}\t{clip.path}\t{";".join(clip.labels)}\t{clip.split}\n'.encode())
        return h.hexdigest()[:16]

    def __str__(self) -> str:
        n = self.counts()
        kind = 'multi-label' if self.multilabel else 'single-label'
        return (f'{self.name}: {len(self.classes)} classes ({kind}), {n["train"]} train / {n["valid"]} valid / '
                f'{n["test"]} test clips, unit {self.unit_sec:g} s')


# ---------------------------------------------------------------------------------------------
# clips


def load_clip(path: Path, sample_rate: int, unit_samples: int) -> np.ndarray:
    """Read a clip at `sample_rate` (soundfile + soxr) and crop it from the start or zero-pad it on the
    right to `unit_samples`, as EVAR does for evaluation; returns float32 ``[unit_samples]``."""
    wav = load_audio(path, sample_rate)
    if len(wav) >= unit_samples:
        return np.ascontiguousarray(wav[:unit_samples])
    out = np.zeros(unit_samples, dtype=np.float32)
    out[:len(wav)] = wav
    return out


def clip_seconds(path: Path) -> float | None:
    """Duration of an audio file from its header; None when the header cannot be read."""
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # unreadable files are reported when they are loaded
        return None


def default_unit_sec(clips: Sequence[Clip], cap: float = MAX_DEFAULT_UNIT_SEC) -> float:
    """The longest clip's duration (from file headers), capped at `cap` seconds."""
    longest = max((d for d in (clip_seconds(c.path) for c in clips) if d is not None), default=cap)
    return float(min(round(longest, 3), cap))


# ---------------------------------------------------------------------------------------------
# splitting


def fold_sort_key(fold: str) -> tuple:
    """Integers in numeric order (1, 2, ..., 10), before any other fold names in text order."""
    return (0, int(fold), '') if fold.lstrip('-').isdigit() else (1, 0, fold)


def stratified_split(labels: Sequence[tuple[str, ...]], seed: int,
                     ratio: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> list[str]:
    """A split name per item: within each stratum (the item's rarest label) the items are shuffled by
    `seed` and cut into train/valid/test by `ratio` (rounded; every stratum keeps at least one train
    item, and gives one to valid/test before train gets a second when the stratum is small)."""
    if len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise TaskError(f'split ratio {ratio}: expected three non-negative numbers (train, valid, test)')
    r = np.asarray(ratio, dtype=np.float64) / sum(ratio)
    freq = Counter(label for ls in labels for label in ls)
    strata: dict[str, list[int]] = defaultdict(list)
    for i, ls in enumerate(labels):
        strata[min(ls, key=lambda label: (freq[label], label))].append(i)
    rng = np.random.default_rng(seed)
    out = [''] * len(labels)
    for stratum in sorted(strata):
        idx = strata[stratum]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n = len(idx)
        n_test = int(round(n * r[2]))
        n_valid = int(round(n * r[1]))
        if n >= 3:  # a small stratum still puts one item in each non-zero split
            n_test = max(n_test, 1 if r[2] > 0 else 0)
            n_valid = max(n_valid, 1 if r[1] > 0 else 0)
        while n_test + n_valid > n - 1 and (n_test or n_valid):  # keep one for train
            if n_valid >= n_test and n_valid:
                n_valid -= 1
            else:
                n_test -= 1
        for k, i in enumerate(idx):
            out[i] = 'test' if k < n_test else 'valid' if k < n_test + n_valid else 'train'
    return out


def carve_stratified_valid(clips: list[Clip], seed: int, fraction: float) -> list[Clip]:
    """Move a stratified `fraction` of the train clips to valid (seeded; `stratified_split`); other splits
    are kept. Serves task preparation (CSV/FSDD tasks without a valid split) and fine-tuning's
    ``--valid_fraction``; the linear evaluation draws its own (`m2d.evaluate.probe.carve_linear_eval_valid`)."""
    train = [i for i, c in enumerate(clips) if c.split == 'train']
    split = stratified_split([clips[i].labels for i in train], seed, (1.0 - fraction, fraction, 0.0))
    out = list(clips)
    for i, s in zip(train, split):
        if s == 'valid':
            out[i] = dataclasses.replace(clips[i], split='valid')
    return out


# ---------------------------------------------------------------------------------------------
# sources


def _parse_labels(cell: str, sep: str | None) -> tuple[str, ...]:
    parts = [p.strip() for p in cell.split(sep)] if sep else [cell.strip()]
    return tuple(sorted(dict.fromkeys(p for p in parts if p)))


def read_csv_rows(csv: Path, data_dir: Path, option: str = '--csv',
                  error: type[Exception] = TaskError) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and rows (every cell stripped) of a CSV whose file names are relative to
    `data_dir`; `error` naming `option` (or ``--data_dir``) when the file or the folder is not there."""
    if not csv.is_file():
        raise error(f'{option} {csv}: no such file')
    if not data_dir.is_dir():
        raise error(f'--data_dir {data_dir}: no such folder (the audio files of {csv.name} are read from there)')
    with open(csv, newline='', encoding='utf-8-sig') as f:
        reader = csv_module.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or '').strip(): (v or '').strip() for k, v in row.items()} for row in reader]
    return columns, rows


def _read_csv_task(csv: Path, data_dir: Path, seed: int, ratio,
                   file_suffix: str | None = None) -> tuple[list[Clip], list[str]]:
    columns, rows = read_csv_rows(csv, data_dir)
    missing = [c for c in ('file_name', 'label') if c not in columns]
    if missing:
        raise TaskError(f'{csv}: no column {" or ".join(repr(c) for c in missing)} (columns: {", ".join(columns) or "none"}; '
                        'expected file_name,label[,split])')
    if not rows:
        raise TaskError(f'{csv}: no rows')
    cells = [row['label'] for row in rows]
    sep = ';' if any(';' in c for c in cells) else ',' if any(',' in c for c in cells) else None
    notes = []
    clips, seen, absent = [], {}, []
    for line, row in enumerate(rows, start=2):
        name, labels = row['file_name'], _parse_labels(row['label'], sep)
        if not name:
            raise TaskError(f'{csv}:{line}: empty file_name')
        if not labels:
            raise TaskError(f'{csv}:{line}: no label for {name}')
        if file_suffix is not None:  # EVAR's 'as' task reads <name>.npy log-mel clips from --data_path
            name = str(Path(name).with_suffix(file_suffix))
        path = data_dir / name
        if not path.is_file():
            absent.append(name)
            continue
        key = Path(name).with_suffix('').as_posix()
        if key in seen:
            raise TaskError(f'{csv}:{line}: {name} is listed twice (first on line {seen[key]})')
        seen[key] = line
        split, fold = '', None
        if 'split' not in columns and 'fold' in columns:
            fold = row['fold']
            if not fold:
                raise TaskError(f'{csv}:{line}: empty fold for {name}')
        if 'split' in columns:
            split = SPLIT_ALIASES.get(row['split'].lower(), '')
            if not split:
                raise TaskError(f'{csv}:{line}: split {row["split"]!r} is not one of train, valid, test')
        clips.append(Clip(path, key, labels, split, fold))
    if absent:
        raise TaskError(f'{csv}: {len(absent)} of {len(rows)} listed file(s) are not in {data_dir} '
                        f'(first: {absent[0]})')
    if 'split' not in columns:
        if 'fold' in columns:
            test_fold = min({c.fold for c in clips}, key=fold_sort_key)
            clips = [dataclasses.replace(c, split='test' if c.fold == test_fold else 'train') for c in clips]
            clips = carve_stratified_valid(clips, seed, ratio[1] / max(ratio[0] + ratio[1], 1e-9))
            notes.append(f'fold {test_fold} is the test split (the first fold); valid carved from the other '
                         f'folds with seed {seed}')
        else:
            split = stratified_split([c.labels for c in clips], seed, ratio)
            clips = [Clip(c.path, c.key, c.labels, s) for c, s in zip(clips, split)]
            r = [round(100 * x / sum(ratio)) for x in ratio]
            notes.append(f'no split column: stratified {r[0]}/{r[1]}/{r[2]} split with seed {seed}')
    return clips, notes


def _folder_task(data_dir: Path, seed: int, ratio) -> tuple[list[Clip], list[str]]:
    if not data_dir.is_dir():
        raise TaskError(f'--data_dir {data_dir}: no such folder')
    clips = []
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith('.')):
        for path in find_audio_files(sub, AUDIO_SUFFIXES):
            key = path.relative_to(data_dir).with_suffix('').as_posix()
            clips.append(Clip(path, key, (sub.name,), ''))
    if not clips:
        raise TaskError(f'--data_dir {data_dir}: no audio files in sub-folders (a folder task needs one '
                        'sub-folder of audio files per class)')
    split = stratified_split([c.labels for c in clips], seed, ratio)
    clips = [Clip(c.path, c.key, c.labels, s) for c, s in zip(clips, split)]
    r = [round(100 * x / sum(ratio)) for x in ratio]
    return clips, [f'sub-folders are the classes; stratified {r[0]}/{r[1]}/{r[2]} split with seed {seed}']


def fsdd_recordings(data_dir: str | Path | None) -> Path:
    """The FSDD recordings folder: `data_dir` itself or its `recordings/` sub-folder."""
    if data_dir is None:
        raise TaskError('--data_dir: the FSDD tasks read a local copy; give the folder holding recordings/ '
                        '(make one with `m2d datasets fsdd DEST`)')
    data_dir = Path(data_dir)
    if (data_dir / 'recordings').is_dir():
        data_dir = data_dir / 'recordings'
    if not data_dir.is_dir():
        raise TaskError(f'--data_dir {data_dir}: no such folder')
    return data_dir


def _fsdd_task(task: str, data_dir: Path, seed: int, ratio) -> tuple[list[Clip], list[str]]:
    recordings = fsdd_recordings(data_dir)
    clips = []
    for path in sorted(recordings.glob('*.wav')):
        m = FSDD_NAME_RE.match(path.stem)
        if not m:
            continue
        digit, speaker, take = m[1], m[2], int(m[3])
        label = digit if task == 'fsdd-digits' else speaker
        clips.append(Clip(path, path.stem, (label,), 'test' if take < FSDD_TEST_TAKES else 'train'))
    if not clips:
        raise TaskError(f'--data_dir {recordings}: no FSDD recordings (DIGIT_SPEAKER_TAKE.wav) in this folder')
    clips = carve_stratified_valid(clips, seed, ratio[1] / max(ratio[0] + ratio[1], 1e-9))
    return clips, [f'official split: takes 0-{FSDD_TEST_TAKES - 1} are test; valid carved from the rest with '
                   f'seed {seed}']


def _check(task: Task, require_valid: bool = True) -> None:
    """One class only, empty splits, test labels unseen in train: errors naming the source."""
    src = task.source
    if len(task.classes) < 2:
        raise TaskError(f'{src}: only one class ({task.classes[0] if task.classes else "none"}); '
                        'a classification task needs at least two')
    counts = task.counts()
    for s in SPLITS:
        if counts[s] == 0 and (require_valid or s != 'valid'):
            raise TaskError(f'{src}: the {s} split is empty ({counts["train"]} train / {counts["valid"]} valid / '
                            f'{counts["test"]} test clips)')
    train_labels = {label for c in task.split('train') for label in c.labels}
    unseen = Counter(label for c in task.split('test') for label in c.labels if label not in train_labels)
    if unseen:
        label, n = unseen.most_common(1)[0]
        raise TaskError(f'{src}: {len(unseen)} label(s) in the test split never occur in train '
                        f'(e.g. {label!r} on {n} test clip(s)); a linear classifier cannot learn them')
    unseen_valid = {label for c in task.split('valid') for label in c.labels if label not in train_labels}
    if unseen_valid:
        log.warning('%s: %d label(s) in the valid split never occur in train (e.g. %r)', src, len(unseen_valid),
                    sorted(unseen_valid)[0])


def load_task(task: str | None = None, *, csv: str | Path | None = None, data_dir: str | Path | None = None,
              unit_sec: float | None = None, seed: int = 0,
              split_ratio: tuple[float, float, float] = (0.7, 0.1, 0.2), require_valid: bool = True,
              file_suffix: str | None = None, check: bool = True) -> Task:
    """A built-in task by name (`task`), a CSV task (`csv` + `data_dir`), or a folder task (`data_dir`).

    `unit_sec` defaults to the longest clip, capped at 10 s. `seed` drives every split that is made
    here (stratified splits, the validation part of the official FSDD split). ``require_valid=False``
    accepts a CSV whose split column has no valid clips (EVAR's as20k, as: fine-tuning validates on
    test then). `file_suffix` replaces the suffix of the CSV's file names (``'.npy'``: EVAR's ``as``
    task reading log-mel clips from ``--data_path``). `check=False` skips the checks a trained
    classifier needs (non-empty splits, test labels seen in train), for uses that train nothing
    (zero-shot classification).
    """
    ratio = tuple(float(x) for x in split_ratio)
    prepared: dict = {}
    if task in EVAR_TASKS:
        return _evar_task(EVAR_TASKS[task], csv, data_dir, unit_sec, seed, split_ratio, require_valid, file_suffix,
                          check)
    if task is not None:
        if task not in BUILTIN_TASKS:
            raise TaskError(f'--task {task!r}: not a built-in task (built-in: {", ".join(BUILTIN_TASKS)}; EVAR\'s: '
                            f'{", ".join(EVAR_TASKS)}; use --csv FILE --data_dir DIR or --data_dir DIR for others)')
        if csv is not None:
            raise TaskError(f'--task {task} and --csv {csv}: give one of them')
        recordings = fsdd_recordings(data_dir)
        clips, notes = _fsdd_task(task, recordings, seed, ratio)
        name, source = task, str(recordings)
    elif csv is not None:
        if data_dir is None:
            raise TaskError(f'--csv {csv}: needs --data_dir, the folder the file names are relative to')
        csv = Path(csv)
        clips, notes = _read_csv_task(csv, Path(data_dir), seed, ratio, file_suffix)
        name, source = csv.stem, str(csv)
        prepared = read_prepared(Path(data_dir))
    elif data_dir is not None:
        data_dir = Path(data_dir)
        clips, notes = _folder_task(data_dir, seed, ratio)
        name, source = data_dir.resolve().name, str(data_dir)
    else:
        raise TaskError('no task: give --task NAME, --csv FILE --data_dir DIR, or --data_dir DIR')
    classes = sorted({label for c in clips for label in c.labels})
    multilabel = any(len(c.labels) > 1 for c in clips)
    if unit_sec is None:
        unit_sec = default_unit_sec(clips)
    elif not unit_sec > 0:
        raise TaskError(f'--unit_sec {unit_sec}: must be positive')
    result = Task(name=name, clips=clips, classes=classes, multilabel=multilabel, unit_sec=float(unit_sec),
                  source=source, notes=notes, prepared=prepared)
    if check:
        _check(result, require_valid)
    log.info('%s', result)
    return result


def read_prepared(data_dir: Path) -> dict:
    """``DATA_DIR/PREPARED.json`` (written by `m2d datasets`: source, license, citation, ...), or {}."""
    path = data_dir / 'PREPARED.json'
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        log.warning('%s: not readable (%s); the report carries no license/citation', path, e)
        return {}
    return info if isinstance(info, dict) else {}


def _evar_task(evar, csv: str | Path | None, data_dir: str | Path | None, unit_sec: float | None, seed: int,
               split_ratio, require_valid: bool = True, file_suffix: str | None = None, check: bool = True) -> Task:
    """EVAR's task `evar` from ``DATA_DIR/<name>.csv`` (or `csv`), with EVAR's unit length by default."""
    if data_dir is None:
        raise TaskError(f'--task {evar.name}: needs --data_dir, the folder holding {evar.name}.csv and the audio '
                        f'(make one with `m2d datasets {evar.name} DIR`)')
    data_dir = Path(data_dir)
    if csv is None:
        csv = data_dir / f'{evar.name}.csv'
        if not csv.is_file():
            raise TaskError(f'--data_dir {data_dir}: no {evar.name}.csv (prepare the task with `m2d datasets '
                            f'{evar.name} {data_dir}`, or give EVAR\'s metadata with --csv evar/metadata/'
                            f'{evar.name}.csv)')
    task = load_task(csv=csv, data_dir=data_dir, unit_sec=evar.unit_sec if unit_sec is None else unit_sec,
                     seed=seed, split_ratio=split_ratio, require_valid=require_valid, file_suffix=file_suffix,
                     check=check)
    task.name = evar.name
    n_folds = len(task.folds) or 1
    task.notes.append(f"EVAR's {evar.name}: unit {evar.unit_sec:g} s, {evar.folds} fold(s), {evar.metric}")
    if n_folds != evar.folds:
        log.warning('%s: %d fold(s) in %s; EVAR\'s %s has %d', evar.name, n_folds, csv, evar.name, evar.folds)
    if (evar.metric == 'mAP') != task.multilabel:
        log.warning('%s: the CSV makes a %s task; EVAR scores %s', evar.name,
                    'multi-label' if task.multilabel else 'single-label', evar.metric)
    return task

"""The machinery every task shares: find the source (or download it), apply the task's metadata
rule, convert the audio on the jobs engine (mono, `sample_rate`, 16-bit WAV, atomic, resumable,
failures in ``DEST/datasets_failures.csv``), then write ``DEST/<task>.csv`` (and the derived tasks'
CSVs) for the clips that are there and ``DEST/PREPARED.json``."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ... import jobs
from ...fileio import atomic_path
from . import get_spec
from .source import Source, read_member
from .spec import DatasetError, Row, TaskSpec, View

log = logging.getLogger(__name__)

PREPARED = 'PREPARED.json'
STARTED = '.m2d-datasets.json'  # what an unfinished run is preparing (task, sample rate)
WORK = '.m2d-work'  # downloads and unpacked tar archives, removed when the task is prepared
JOB_NAME = 'datasets'


@dataclass
class Prepared:
    """What `prepare_task` did."""

    task: str
    dest: Path
    csvs: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    summary: jobs.Summary | None = None
    already: bool = False  # DEST was already prepared: nothing done
    official: int | None = None
    rows: int = 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version('m2d')
    except Exception:
        return 'unknown'


def _check_dest(spec: TaskSpec, dest: Path, sample_rate: int) -> dict | None:
    """The PREPARED.json of a finished DEST of this task (None when there is work to do);
    `DatasetError` when DEST holds another task or another rate."""
    for name in (PREPARED, STARTED):
        path = dest / name
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f'{path}: unreadable ({e}); remove it or choose another DEST') from None
        if info.get('task') != spec.name:
            raise DatasetError(f'{dest}: holds the task {info.get("task")!r}, not {spec.name!r}; '
                               'choose another DEST (one task per folder)')
        if int(info.get('sample_rate', 0)) != sample_rate:
            raise DatasetError(f'{dest}: holds {spec.name} at {info.get("sample_rate")} Hz, not {sample_rate} Hz; '
                               'choose another DEST')
        if name == PREPARED and not info.get('failed'):
            return info  # finished without failures (a run with failures is retried)
    return None


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + '\n')


def _started(dest: Path, spec: TaskSpec, sample_rate: int) -> None:
    """Mark DEST as being prepared for this task and rate (what `_check_dest` reads)."""
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / STARTED, {'task': spec.name, 'sample_rate': sample_rate})


def _group_order(group: str) -> tuple:
    """train, valid, test, then folds in numeric order."""
    return {'train': 0, 'valid': 1, 'test': 2}.get(group, 3), int(group) if group.isdigit() else 0, group


def no_source_message(spec: TaskSpec) -> str:
    return (f'{spec.name}: give --source (no download: {spec.where}). --source expects {spec.layout}'
            + (f'; --split_file: {spec.split_file}' if spec.split_file else ''))


def resolve_sources(spec: TaskSpec, sources: list[str], work: Path, progress: bool) -> list[Path]:
    """Local paths of the source parts: the given paths, URLs downloaded into `work`, or the
    task's own URLs when none is given."""
    from ...hub import DownloadError, fetch_url

    if not sources:
        if not spec.urls:
            raise DatasetError(no_source_message(spec))
        sources = list(spec.urls)
        log.info('%s: downloading %d archive(s) from the publisher (no SHA-256 is published; sizes are checked)',
                 spec.name, len(sources))
    paths = []
    for s in sources:
        if '://' in s:
            out = work / 'downloads' / s.rstrip('/').rsplit('/', 1)[-1]
            if not out.is_file():
                try:
                    fetch_url(s, out, desc=f'{spec.name} {out.name}', progress=progress)
                except DownloadError as e:
                    raise DatasetError(f'{e}; or download it yourself and give --source') from None
            paths.append(out)
        else:
            paths.append(Path(s).expanduser())
    return paths


# ----- the audio job (top-level functions: worker processes pickle them) ----------------------------

_STATE: dict = {}


def _init(sample_rate: int, zips: list[str]) -> None:
    _STATE.update(sr=sample_rate, zips=zips)


def _read(item: jobs.Item):
    from ...audio import read_audio

    src = str(item.src)
    for z in _STATE['zips']:
        if src.startswith(z + '/'):
            return read_member(z, src[len(z) + 1:], _STATE['sr'])
    return read_audio(item.src, _STATE['sr'])


def _write(item: jobs.Item, wav) -> None:
    """16-bit WAV (as EVAR's prepare_wav.py), encoded in memory: libsndfile syncs files it writes
    to disk on close, which costs more than the conversion itself."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, _STATE['sr'], subtype='PCM_16', format='WAV')
    with atomic_path(item.dst) as tmp:
        tmp.write_bytes(buf.getbuffer())


# ----- the task ----------------------------------------------------------------------------------

def _write_csv(path: Path, column: str, rows: list[tuple[str, str, str]]) -> Path:
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name', 'label', column])
        w.writerows(rows)
    return path


def _rows_of(spec: TaskSpec, source: Source, split_files: list[Path]) -> tuple[list[Row], str]:
    marker = spec.marker if spec.marker is not None else spec.marker_from(split_files)
    root = source.find_root(marker)
    if root is None:
        where = ', '.join(map(str, source.paths))
        raise DatasetError(f'{where}: not the {spec.title} (nothing matches {marker!r}); '
                           f'--source expects {spec.layout}')
    rows = spec.rows(View(source, root), split_files)
    names = [r.out_name for r in rows]
    if len(set(names)) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise DatasetError(f'{spec.name}: two rows give the same file {dup}; check --source and --split_file')
    return rows, root


def prepare_task(task: str, dest: str | Path, sources: list[str] | None = None, sample_rate: int = 16000,
                 workers: int = 2, split_files: list[str | Path] | None = None, progress: bool = True) -> Prepared:
    """Prepare `task` into `dest` (see `m2d datasets --help`). Raises `DatasetError` on bad input
    before anything is written."""
    from ...audio import preset

    spec = get_spec(task)
    try:
        preset(sample_rate)
    except ValueError:
        raise DatasetError(f'--sample_rate {sample_rate}: the models use 16000 or 32000 Hz') from None
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f'{dest}: exists and is not a folder')
    split_files = [Path(p) for p in split_files or []]
    for p in split_files:
        if not p.is_file():
            raise DatasetError(f'{p}: no such split file')
    if not spec.split_file and split_files:
        raise DatasetError(f'--split_file: {task} takes none (its splits come from its own metadata)')
    done = _check_dest(spec, dest, sample_rate)
    if done is not None:
        log.info('%s: %s is already prepared (%s); nothing to do', dest, task, dest / PREPARED)
        return Prepared(task, dest, [dest / f'{t}.csv' for t in spec.tasks], done.get('counts', {}), already=True,
                        official=spec.size, rows=int(done.get('files', 0)))
    work = dest / WORK
    if not sources and spec.urls or any('://' in str(s) for s in sources or []):
        _started(dest, spec, sample_rate)  # a download into DEST: mark it as this task's first
    paths = resolve_sources(spec, list(sources or []), work, progress)
    source = Source(paths, work / 'unpacked', progress)
    rows, root = _rows_of(spec, source, split_files)
    present = [r for r in rows if root + r.member in source.where]
    if not present:
        raise DatasetError(f'{source.describe(root)}: none of the {len(rows)} clips of {task} is there; '
                           f'--source expects {spec.layout}')
    _started(dest, spec, sample_rate)

    missing = [(source.describe(root + r.member), f'{source.describe(root + r.member)}: not in the source')
               for r in rows if root + r.member not in source.where]
    official = spec.size
    if official is not None and len(present) < official:
        log.warning('%s: the source holds %d of the official %d files; preparing a partial task',
                    task, len(present), official)
    items = [(source.src_path(root + r.member), r.out_name[:-len('.wav')]) for r in present]
    plan = jobs.plan(None, dest, name=JOB_NAME, out_suffix='.wav', items=items)
    plan.failed.extend(missing)
    summary = jobs.run(plan, read=_read, write=_write, processes=max(0, int(workers)), init=_init,
                       init_args=(sample_rate, source.zips), progress=progress)
    summary = jobs.finish(summary, plan)

    ready = {i.key + '.wav' for i in plan.skipped} | {k + '.wav' for k in summary.done_keys}
    kept = [r for r in rows if r.out_name in ready]
    result = Prepared(task, dest, summary=summary, official=official, rows=len(kept))
    for t in spec.tasks:
        result.csvs.append(_write_csv(dest / f'{t}.csv', spec.column,
                                      [(r.out_name, r.labels[t], r.group) for r in kept if t in r.labels]))
    result.counts = dict(sorted(Counter(r.group for r in kept).items(), key=lambda kv: _group_order(kv[0])))
    _write_json(dest / PREPARED, {
        'task': spec.name, 'tasks': list(spec.tasks), 'source': [str(p) for p in (sources or spec.urls)],
        'sample_rate': sample_rate, 'counts': result.counts, 'files': len(kept), 'official_files': official,
        'failed': len(summary.failed), 'm2d_version': _version(), 'license': spec.license,
        'citation': spec.citation, 'title': spec.title,
        'split_file': [str(p) for p in split_files]})
    (dest / STARTED).unlink(missing_ok=True)
    if not summary.failed:
        shutil.rmtree(work, ignore_errors=True)
    elif work.exists():
        log.info('%s kept (downloads, unpacked archives) for a rerun after fixing the failures', work)
    return result

"""The jobs engine (`m2d.jobs`) with synthetic transforms: isolation, skipping, keys, locks, dying workers."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m2d import jobs
from m2d.data.filelist import write_filelist
from m2d.errors import M2DError
from m2d.fileio import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def numbers(folder: Path, values: dict[str, int], suffix: str = '.txt') -> Path:
    """One text file per key holding its number."""
    for key, v in values.items():
        path = folder / f'{key}{suffix}'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(v))
    return folder


def read_number(item: jobs.Item) -> int:
    return int(item.src.read_text())


def square_unless_13(xs: list[int]) -> list[int]:
    if 13 in xs:
        raise ValueError('13 is unlucky')
    return [x * x for x in xs]


def write_npy(item: jobs.Item, y) -> None:
    with atomic_path(item.dst) as tmp:
        np.save(tmp, np.array(y))


def test_failing_item_is_isolated_and_results_in_memory(tmp_path):
    src = numbers(tmp_path / 'src', {f'sub/{i:02d}': i for i in range(10, 20)} | {'bad': 0})
    (src / 'bad.txt').write_text('not a number')
    calls = []

    def transform(xs):
        calls.append(len(xs))
        return square_unless_13(xs)

    p = jobs.plan(src, name='square', suffixes=('.txt',))
    assert p.dest is None and p.found == 11 and not p.failed and all(i.dst is None for i in p.todo)
    s = jobs.run(p, read=read_number, transform=transform, batch_key=lambda x: x % 2, batch_size=4,
                 progress=False)
    assert s.results == {f'sub/{i:02d}': i * i for i in range(10, 20) if i != 13}
    failed = dict(s.failed)
    assert set(failed) == {str(src / 'bad.txt'), str(src / 'sub/13.txt')}
    assert 'unlucky' in failed[str(src / 'sub/13.txt')] and 'ValueError' in failed[str(src / 'bad.txt')]
    assert all(path in reason for path, reason in s.failed)  # every reason names its file
    # odd numbers 11 13 15 17 fail as a batch, then go one by one; the even ones batch 4 + 1
    assert max(calls) == 4 and calls.count(1) >= 4 and sum(calls) == 10 + 4
    assert (s.done, s.skipped, s.exit_code) == (9, 0, 0)
    assert str(s).startswith('square: 9 done, 0 skipped, 2 failed of 11 files in')


def test_skip_existing_overwrite_temporaries_and_files_csv(tmp_path):
    src = numbers(tmp_path / 'src', {'a': 1, 'b': 2, 'c/d': 3})
    dest = tmp_path / 'out'
    p = jobs.plan(src, dest, name='square', suffixes=['TXT'])
    s = jobs.finish(jobs.run(p, read=read_number, transform=square_unless_13, write=write_npy, progress=False), p,
                    files_csv=write_filelist)
    assert s.done == 3 and int(np.load(dest / 'c/d.npy')) == 9
    assert [r['file_name'] for r in csv.DictReader(open(s.files_csv))] == ['out/a.npy', 'out/b.npy', 'out/c/d.npy']
    assert s.failures_csv is None and not (dest / jobs.LOCK_NAME).exists()

    (dest / 'b.npy').unlink()
    leftover = dest / '.a.npy.x1y2.tmp.npy'  # what a killed write leaves
    leftover.write_bytes(b'half')
    (src / 'a.txt').write_text('13')  # would fail, but its output exists
    p = jobs.plan(src, dest, name='square', suffixes=['.txt'])
    assert [i.key for i in p.todo] == ['b'] and [i.key for i in p.skipped] == ['a', 'c/d']
    assert p.removed_temporaries == 1 and not leftover.exists()
    s = jobs.finish(jobs.run(p, read=read_number, transform=square_unless_13, write=write_npy, progress=False), p,
                    files_csv=write_filelist)
    assert (s.done, s.skipped, s.failed) == (1, 2, []) and len(list(csv.DictReader(open(s.files_csv)))) == 3

    p = jobs.plan(src, dest, name='square', suffixes=['.txt'], overwrite=True)
    assert len(p.todo) == 3 and not p.skipped
    s = jobs.finish(jobs.run(p, read=read_number, transform=square_unless_13, write=write_npy, progress=False), p,
                    files_csv=write_filelist)
    assert s.done == 2 and s.failures_csv == dest / 'square_failures.csv'
    assert 'unlucky' in s.failures_csv.read_text()
    (src / 'a.txt').write_text('1')
    p = jobs.plan(src, dest, name='square', suffixes=['.txt'], overwrite=True)
    s = jobs.finish(jobs.run(p, read=read_number, transform=square_unless_13, write=write_npy, progress=False), p,
                    files_csv=write_filelist)
    assert not s.failed and not (dest / 'square_failures.csv').exists()  # the stale report is gone


def test_duplicate_keys_missing_inputs_and_items(tmp_path):
    src = numbers(tmp_path / 'src', {'x': 1, 'y': 2})
    (src / 'x.wav').write_text('3')  # same key as x.txt
    (src / 'folder.txt').mkdir()
    p = jobs.plan([src, tmp_path / 'nowhere', tmp_path / 'src' / 'y.txt'], name='dup', suffixes=('.txt', '.wav'))
    reasons = [r for _, r in p.failed]
    assert [i.key for i in p.todo] == ['x', 'y']
    assert sum('same output x.npy' in r for r in reasons) == 1 and sum('same output y.npy' in r for r in reasons) == 1
    assert any('nowhere: no such file' in r for r in reasons) and any('named like an audio' in r for r in reasons)

    p = jobs.plan(None, name='embed', items=[(src / 'x.txt', 'k1'), (src / 'y.txt', 'k2'), (src / 'x.wav', 'k1')])
    s = jobs.run(p, read=read_number, batch_size=2, progress=False)
    assert s.results == {'k1': 1, 'k2': 2} and len(s.failed) == 1 and 'same output' in s.failed[0][1]


def test_a_names_list_is_planned_in_key_order_whether_or_not_path_order_is_key_order(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    # path order == key order: the list is taken as sorted; 'a-b.wav' < 'a.wav' by path but 'a' < 'a-b' by key
    p = jobs.plan(src, name='keys', suffixes=('.wav',), names=['b/x.wav', 'a.wav', 'c.wav'])
    assert [i.key for i in p.todo] == ['a', 'b/x', 'c']
    p = jobs.plan(src, name='keys', suffixes=('.wav',), names=['a-b.wav', 'c.wav', 'a.wav', 'a.flac'])
    assert [i.src.name for i in p.todo] == ['a.flac', 'a-b.wav', 'c.wav']  # a.wav: same key as a.flac, failed
    assert [i.key for i in p.todo] == ['a', 'a-b', 'c'] and 'same output a.npy' in p.failed[0][1]


def test_a_destination_locked_by_another_process_is_a_job_error(tmp_path):
    dest = tmp_path / 'out'
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from m2d import jobs; jobs.plan(None, sys.argv[1], name="convert"); '
         'print("locked", flush=True); time.sleep(60)', str(dest)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / 'src')))
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(jobs.JobError, match=f'pid {holder.pid}') as e:
            jobs.plan(None, dest, name='encode')
        assert isinstance(e.value, M2DError) and str(dest) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    p = jobs.plan(None, dest, name='encode')  # a killed holder leaves the file but no lock
    p.release()
    assert not (dest / jobs.LOCK_NAME).exists()


def write_or_die(item: jobs.Item, y) -> None:
    """Kills its worker for 'always', and for 'once' the first time (a marker file remembers)."""
    marker = item.dst.parent / 'died_once'
    if item.key == 'always' or (item.key == 'once' and not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    write_npy(item, y)


def test_a_killed_worker_is_replaced_and_its_items_retried(tmp_path, caplog):
    values = {f'f{i:02d}': i for i in range(12)} | {'once': 20, 'always': 30}
    src = numbers(tmp_path / 'src', values)
    dest = tmp_path / 'out'
    p = jobs.plan(src, dest, name='square', suffixes=['.txt'])
    s = jobs.run(p, read=read_number, transform=square_unless_13, write=write_or_die, processes=2, chunk_size=3,
                 main_helps=False, progress=False)
    jobs.finish(s, p)
    assert 'worker process died' in caplog.text
    assert s.done == 13 and [Path(f).name for f, _ in s.failed] == ['always.txt']
    assert 'worker process died' in s.failed[0][1]
    assert {q.stem for q in dest.glob('*.npy')} == set(values) - {'always'}
    assert int(np.load(dest / 'once.npy')) == 400
    assert not [q for q in dest.iterdir() if q.name.startswith('.')]  # no temporaries, no lock file

    p = jobs.plan(src, name='square', suffixes=['.txt'])  # results come back from the workers
    s = jobs.run(p, read=read_number, transform=square_unless_13, processes=1, progress=False)
    assert s.results == {k: v * v for k, v in values.items()}


def test_an_interrupt_releases_the_lock(tmp_path):
    src = numbers(tmp_path / 'src', {'a': 1, 'b': 2})
    dest = tmp_path / 'out'

    def interrupt(item, y):
        raise KeyboardInterrupt

    p = jobs.plan(src, dest, name='square', suffixes=['.txt'])
    with pytest.raises(KeyboardInterrupt):
        jobs.run(p, read=read_number, write=interrupt, progress=False)
    assert not (dest / jobs.LOCK_NAME).exists()
    jobs.plan(src, dest, name='square', suffixes=['.txt']).release()  # free again
    with pytest.raises(jobs.JobError, match='batch_size'):
        jobs.run(jobs.plan(src, dest, name='x', suffixes=['.txt']), read=read_number, batch_size=0)
    assert not (dest / jobs.LOCK_NAME).exists()

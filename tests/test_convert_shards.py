"""`m2d convert` across machines: --shard parts, --files lists, float16 outputs, and the stream plan."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from m2d import jobs
from m2d.cli import main
from m2d.data.convert import convert, plan_convert
from m2d.data.stats import lms_stats
from test_convert import link_fsdd, read_csv


def _tree(fsdd_dir: Path, src: Path, n: int = 23) -> list[str]:
    """`n` FSDD files spread over nested folders, with names that sort differently as paths and as
    keys ('a.wav' / 'a/' / 'a-1.wav'), so that the sorted order is exercised."""
    names = sorted(os.listdir(fsdd_dir))[:n]
    layout = ['a.wav', 'a/x.wav', 'a/b/y.wav', 'a-1.wav', 'a0.wav', 'b/c/d.wav', 'b.wav', 'Z.wav']
    layout += [f'sub{i % 3}/{name}' for i, name in enumerate(names[len(layout):])]
    for rel, name in zip(layout, names):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).symlink_to(fsdd_dir / name)
    return layout


def _outputs(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob('*.npy')}


def test_shards_together_equal_one_run_byte_for_byte(fsdd_dir, tmp_path):
    src = tmp_path / 'src'
    layout = _tree(fsdd_dir, src)
    whole = convert(src, tmp_path / 'one', workers=0, progress=False)
    assert whole.converted == len(layout)
    expected = _outputs(tmp_path / 'one')
    shared = tmp_path / 'shared'
    sizes = []
    for k in (3, 1, 2):  # any order, one DEST
        s = convert(src, shared, workers=0, progress=False, shard=f'{k}/3')
        assert not s.failed and s.found == s.converted
        sizes.append(s.converted)
        own = [r['file_name'] for r in read_csv(shared / f'files.shard-{k}-of-3.csv')]
        assert own == sorted(own) and len(own) == s.converted
    assert sum(sizes) == len(layout) and max(sizes) - min(sizes) <= 1
    assert _outputs(shared) == expected  # the same files, every byte equal
    # which file each part took: round-robin over the sorted keys
    keys = sorted(str(Path(r).with_suffix('')) for r in layout)
    for k in (1, 2, 3):
        own = [r['file_name'][len('shared/'):-len('.npy')] for r in read_csv(shared / f'files.shard-{k}-of-3.csv')]
        assert own == keys[k - 1::3]
    assert not (shared / 'files.csv').exists() and not list(shared.glob('.m2d-job*'))
    assert main(['filelist', str(shared)]) == 0
    assert read_csv(shared / 'files.csv') == [{'file_name': r['file_name'].replace('one/', 'shared/', 1)}
                                              for r in read_csv(tmp_path / 'one' / 'files.csv')]
    # redone with --overwrite (names whose key order differs from their name order: 'a.npy', 'a-1.npy'):
    # the list names every output once
    rows = read_csv(tmp_path / 'one' / 'files.csv')
    assert convert(src, tmp_path / 'one', workers=0, progress=False, overwrite=True).converted == len(layout)
    assert read_csv(tmp_path / 'one' / 'files.csv') == rows and len(rows) == len(layout)
    # a part again: everything of it skipped, nothing of the others touched
    again = convert(src, shared, workers=0, progress=False, shard='2/3')
    assert again.converted == 0 and again.skipped == sizes[2]


def test_a_part_runs_beside_other_parts_but_not_twice_nor_beside_a_whole_run(fsdd_dir, tmp_path):
    src = tmp_path / 'src'
    link_fsdd(fsdd_dir, src, 6)
    dest = tmp_path / 'out'
    one = plan_convert(src, dest, shard='1/2')
    try:
        two = plan_convert(src, dest, shard='2/2')  # another part at the same time: fine
        two.release()
        with pytest.raises(jobs.JobError, match=r'part 1/2 is already being done .*pid'):
            plan_convert(src, dest, shard='1/2')
        with pytest.raises(jobs.JobError, match='another job is writing into this folder'):
            plan_convert(src, dest)
    finally:
        one.release()
    whole = plan_convert(src, dest)
    try:
        with pytest.raises(jobs.JobError, match=r'not a --shard part'):
            plan_convert(src, dest, shard='2/2')
    finally:
        whole.release()
    assert not list(dest.glob('.m2d-job*'))


def test_a_part_removes_only_its_own_temporaries(fsdd_dir, tmp_path):
    src = tmp_path / 'src'
    files = link_fsdd(fsdd_dir, src, 4)  # sorted: part 1/2 owns files 0 and 2
    dest = tmp_path / 'out'
    dest.mkdir()
    leftovers = [dest / f'.{f.stem}.npy.ab12cd34.tmp.npy' for f in files]
    for t in leftovers:
        t.write_bytes(b'partial')
    s = convert(src, dest, workers=0, progress=False, shard='1/2')
    assert s.converted == 2 and s.removed_temporaries == 2
    assert [t.exists() for t in leftovers] == [False, True, False, True]


@pytest.mark.parametrize('bad', ['0/4', '5/4', '-1/4', '1/0', '1', '1/2/3', 'a/b', '', '1.5/4'])
def test_bad_shard_values_are_rejected(bad, tmp_path, capsys):
    (tmp_path / 'src').mkdir()
    assert main(['convert', str(tmp_path / 'src'), str(tmp_path / 'out'), f'--shard={bad}', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert f'--shard {bad}' in err or f"--shard '{bad}'" in err
    assert not (tmp_path / 'out').exists()


def test_files_list_text_and_csv(fsdd_dir, tmp_path):
    src = tmp_path / 'src'
    layout = _tree(fsdd_dir, src, 12)
    chosen = [layout[i] for i in (5, 0, 9, 2)]
    text = tmp_path / 'list.txt'
    text.write_text('\n'.join(chosen + ['']) + '\n')
    s = convert(src, tmp_path / 'from_text', workers=0, progress=False, files=text)
    assert s.found == 4 and s.converted == 4
    names = sorted(str(Path(r).with_suffix('.npy')) for r in chosen)
    assert sorted(_outputs(tmp_path / 'from_text')) == names
    table = tmp_path / 'list.csv'
    with open(table, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name', 'label'])
        w.writerows([[r, 'x'] for r in chosen] + [[layout[5], 'twice']])  # a repeat: one output, one failure
    s = convert(src, tmp_path / 'from_csv', workers=0, progress=False, files=table, shard='1/1')
    assert s.converted == 4 and len(s.failed) == 1 and 'same output' in s.failed[0][1]
    assert _outputs(tmp_path / 'from_csv') == _outputs(tmp_path / 'from_text')
    rows = read_csv(tmp_path / 'from_csv' / 'convert_failures.shard-1-of-1.csv')
    assert len(rows) == 1 and rows[0]['file'].endswith(layout[5])
    # a listed file that is missing fails by name; paths outside SRC are refused
    text.write_text(f'{chosen[0]}\nnot/there.wav\n')
    s = convert(src, tmp_path / 'missing', workers=0, progress=False, files=text)
    assert s.converted == 1 and len(s.failed) == 1 and 'not/there.wav' in s.failed[0][1]
    text.write_text('../elsewhere.wav\n')
    with pytest.raises(jobs.JobError, match='not a file under'):
        convert(src, tmp_path / 'bad', workers=0, progress=False, files=text)
    text.write_text('\n\n')
    with pytest.raises(ValueError, match='names no files'):
        convert(src, tmp_path / 'bad', workers=0, progress=False, files=text)


def test_float16_round_trip_and_stats(fsdd_dir, tmp_path, monkeypatch):
    from m2d.data import convert as convert_mod

    src = tmp_path / 'src'
    files = link_fsdd(fsdd_dir, src, 5)
    long = src / 'long.wav'
    import soundfile as sf
    sf.write(str(long), (0.1 * np.random.default_rng(0).standard_normal(16000 * 4)).astype(np.float32), 16000)
    monkeypatch.setattr(convert_mod, '_MAX_FRAMES', 150)  # 'long.wav' (401 frames) streams block by block
    monkeypatch.setattr(convert_mod, '_CHECK_BYTES', 1000)
    assert convert(src, tmp_path / 'f32', workers=0, progress=False).converted == 6
    assert main(['convert', str(src), str(tmp_path / 'f16'), '--workers', '0', '--dtype', 'float16',
                 '--no-progress']) == 0
    worst = 0.0
    for f in [*files, long]:
        a = np.load(tmp_path / 'f32' / f'{f.stem}.npy')
        b = np.load(tmp_path / 'f16' / f'{f.stem}.npy')
        assert a.dtype == np.float32 and b.dtype == np.float16 and b.shape == a.shape
        assert np.array_equal(b, a.astype(np.float16))  # the float32 result, cast
        worst = max(worst, float(np.abs(b.astype(np.float32) - a).max()))
    assert 0 < worst <= 2 ** -8  # float16 rounding of values below 16 in magnitude
    assert (tmp_path / 'f16' / f'{files[0].stem}.npy').stat().st_size < 0.52 * (
        tmp_path / 'f32' / f'{files[0].stem}.npy').stat().st_size
    s32 = lms_stats(tmp_path / 'f32', max_files=None, progress=False)
    s16 = lms_stats(tmp_path / 'f16', max_files=None, progress=False)
    assert s16['values'] == s32['values']
    assert s16['mean'] == pytest.approx(s32['mean'], abs=2e-3) and s16['std'] == pytest.approx(s32['std'], abs=2e-3)
    cast = np.concatenate([np.load(p).ravel() for p in sorted((tmp_path / 'f16').glob('*.npy'))]).astype(np.float64)
    assert s16['mean'] == pytest.approx(cast.mean(), rel=1e-10)  # the float16 values, exactly
    with pytest.raises(ValueError, match='--dtype'):
        convert(src, tmp_path / 'bad', workers=0, progress=False, dtype='bfloat16')


def test_the_plan_of_many_files_is_compact_and_streams(tmp_path):
    """A --files list of 20,000 names (no audio needed to plan): sorted, split, held in a buffer."""
    src = tmp_path / 'src'
    src.mkdir()
    names = [f'd{i % 7}/clip{i:06d}.wav' for i in range(20000)][::-1]
    p = plan_convert(src, tmp_path / 'out', files=names, shard='2/5')
    try:
        assert isinstance(p.todo, jobs.ItemList) and len(p.todo) == 4000 and p.total == 20000
        assert p.todo.nbytes() < 40 * len(p.todo)
        keys = list(p.todo.keys())
        assert keys == sorted(n[:-4] for n in names)[1::5]
        item = p.todo[3]
        assert item.src == src / (keys[3] + '.wav') and item.dst == tmp_path / 'out' / (keys[3] + '.npy')
    finally:
        p.release()


def test_parts_running_at_once_into_one_folder(fsdd_dir, tmp_path):
    import subprocess
    import sys
    import time

    n = 120
    src = tmp_path / 'src'
    link_fsdd(fsdd_dir, src, n)
    dest = tmp_path / 'shared'
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / 'src'))
    other = subprocess.Popen([sys.executable, '-m', 'm2d', 'convert', str(src), str(dest), '--shard', '1/2',
                              '--workers', '1', '--min-seconds', '6.1', '--no-progress'], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(dest.glob('*.npy')) and other.poll() is None:
            time.sleep(0.02)
        assert other.poll() is None, 'part 1 ended before part 2 started'
        here = convert(src, dest, workers=0, progress=False, shard='2/2', min_seconds=6.1)
        out, _ = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, out
    assert here.converted == n // 2 and not here.failed
    whole = convert(src, tmp_path / 'one', workers=0, progress=False, min_seconds=6.1)
    assert whole.converted == n
    assert _outputs(dest) == _outputs(tmp_path / 'one')
    assert not [p for p in dest.iterdir() if p.name.startswith('.')]  # no temporaries, no lock files

"""`m2d stats`: streaming mean / std of log-mel values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2d.cli import main
from m2d.data.filelist import write_filelist
from m2d.data.stats import RunningStats, lms_stats


def test_running_stats_matches_numpy_on_chunks():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(-1e4, 3.0, size=n) for n in (1, 7, 1000, 0, 33, 5000)]
    acc = RunningStats()
    for c in chunks:
        acc.update(c)
    allv = np.concatenate(chunks)
    assert acc.count == allv.size
    assert acc.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert acc.std(ddof=1) == pytest.approx(allv.std(ddof=1), rel=1e-9)
    assert acc.std(ddof=0) == pytest.approx(allv.std(), rel=1e-9)
    assert np.isnan(RunningStats().std())
    big = rng.normal(5.0, 2.0, size=(1, 80, 60000)).astype(np.float32)  # larger than one float64 block
    acc = RunningStats()
    acc.update(big)
    assert acc.count == big.size and acc.mean == pytest.approx(big.astype(np.float64).mean(), rel=1e-12)
    assert acc.std() == pytest.approx(big.astype(np.float64).std(ddof=1), rel=1e-9)


def _make(folder, lengths, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i, t in enumerate(lengths):
        a = (-10 + 4 * rng.standard_normal((1, 80, t))).astype(np.float32)
        np.save(folder / f'{i:02d}.npy', a)
        arrays.append(a)
    return arrays


def test_folder_csv_sampling_and_crops(tmp_path):
    data = tmp_path / 'data'
    arrays = _make(data / 'lms', [50, 80, 120, 30, 200])
    allv = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    s = lms_stats(data / 'lms', progress=False)
    assert s['files'] == 5 and s['values'] == allv.size
    assert s['mean'] == pytest.approx(allv.mean(), rel=1e-10) and s['std'] == pytest.approx(allv.std(ddof=1), rel=1e-9)
    csv_path = write_filelist(data / 'lms')
    assert lms_stats(csv_path, progress=False)['mean'] == pytest.approx(s['mean'], rel=1e-12)
    # sampling: seeded, the requested number of files
    a = lms_stats(data / 'lms', max_files=2, seed=3, progress=False)
    assert a == lms_stats(data / 'lms', max_files=2, seed=3, progress=False) and a['files'] == 2
    assert a['values'] in {80 * (x + y) for i, x in enumerate([50, 80, 120, 30, 200])
                           for j, y in enumerate([50, 80, 120, 30, 200]) if i < j}
    # crops: every file contributes crop_frames columns (zero padding included)
    c = lms_stats(data / 'lms', crop_frames=60, progress=False)
    assert c['values'] == 5 * 80 * 60
    (data / 'lms' / 'broken.npy').write_bytes(b'not numpy')
    b = lms_stats(data / 'lms', progress=False)
    assert b['unreadable'] == 1 and b['files'] == 5 and b['mean'] == pytest.approx(s['mean'], rel=1e-12)
    with pytest.raises(FileNotFoundError, match='nothing'):
        lms_stats(tmp_path / 'nothing', progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no .npy'):
        lms_stats(tmp_path / 'empty', progress=False)


def test_cli_prints_and_writes_json(tmp_path, capsys):
    arrays = _make(tmp_path / 'lms', [40, 60])
    out = tmp_path / 'stats.json'
    assert main(['stats', str(tmp_path / 'lms'), '--json', str(out), '--no-progress']) == 0
    written = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert written == printed
    allv = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    assert written['mean'] == pytest.approx(allv.mean(), rel=1e-10)
    assert written['std'] == pytest.approx(allv.std(ddof=1), rel=1e-9)


def test_filelist_command_skips_temporaries(tmp_path, capsys):
    _make(tmp_path / 'lms_a' / 'sub', [10, 12])
    np.save(tmp_path / 'lms_a' / 'top.npy', np.zeros((1, 80, 3), np.float32))
    (tmp_path / 'lms_a' / '.top2.npy.x1y2.tmp.npy').write_bytes(b'partial')  # an interrupted write
    (tmp_path / 'lms_a' / 'notes.txt').write_text('not listed')
    assert main(['filelist', str(tmp_path / 'lms_a')]) == 0
    lines = (tmp_path / 'lms_a' / 'files.csv').read_text().splitlines()
    assert lines == ['file_name', 'lms_a/sub/00.npy', 'lms_a/sub/01.npy', 'lms_a/top.npy']
    assert main(['filelist', str(tmp_path / 'lms_a'), '--csv', str(tmp_path / 'list.csv')]) == 0
    assert (tmp_path / 'list.csv').read_text().splitlines() == lines
    assert '3 files' in capsys.readouterr().out

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


def _varied(folder, n_files=120, seed=0):
    """Files that differ as real ones do: per-file loudness offsets and lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n_files):
        t = int(rng.integers(5, 60))
        a = (-10 + rng.normal(0, 1.5) + rng.uniform(2, 5) * rng.standard_normal((1, 80, t))).astype(np.float32)
        np.save(folder / f'{i:03d}.npy', a)
        arrays.append(a)
    return np.concatenate([a.ravel() for a in arrays]).astype(np.float64)


def test_sampled_stats_are_within_their_standard_errors_of_all(tmp_path):
    allv = _varied(tmp_path / 'lms')
    full = lms_stats(tmp_path / 'lms', max_files=None, progress=False)  # --all: the exact values, as before
    assert full['files'] == full['files_total'] == 120 and full['sample'] == 'all 120 files'
    assert full['mean'] == pytest.approx(allv.mean(), rel=1e-10)
    assert full['std'] == pytest.approx(allv.std(ddof=1), rel=1e-9)
    assert 'mean_se' not in full
    within3, errors = 0, []
    for seed in range(40):
        s = lms_stats(tmp_path / 'lms', max_files=30, seed=seed, progress=False)
        assert s['files'] == 30 and s['files_total'] == 120
        assert s['sample'] == f'random sample of 30 of 120 files (seed {seed}); --all reads every file'
        dm, ds = abs(s['mean'] - full['mean']), abs(s['std'] - full['std'])
        assert 0 < s['mean_se'] < 1 and 0 < s['std_se'] < 1
        assert dm <= 4.5 * s['mean_se'] and ds <= 4.5 * s['std_se']  # never far outside the stated error
        within3 += dm <= 3 * s['mean_se'] and ds <= 3 * s['std_se']
        errors.append(dm)
    assert within3 >= 36  # measured: 98-99 % of seeds within 3 standard errors (benchmarks/stats_sample.py)
    assert max(errors) > 0.01  # the samples differ: the check above is not vacuous
    # the default sample: seeded, the same files (and values) for the same seed
    assert lms_stats(tmp_path / 'lms', max_files=30, seed=7, progress=False) == \
        lms_stats(tmp_path / 'lms', max_files=30, seed=7, progress=False)


def test_cli_samples_by_default_and_all_reads_every_file(tmp_path, capsys, monkeypatch):
    import m2d.data.stats as stats_mod

    allv = _varied(tmp_path / 'lms', n_files=50)
    monkeypatch.setattr(stats_mod, 'SAMPLE_FILES', 20)  # the default the command uses (10,000 in use)
    assert main(['stats', str(tmp_path / 'lms'), '--no-progress']) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled['files'] == 20 and sampled['files_total'] == 50 and sampled['max_files'] == 20
    assert sampled['sample'].startswith('random sample of 20 of 50 files (seed 0)')
    assert main(['stats', str(tmp_path / 'lms'), '--all', '--no-progress']) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact['files'] == 50 and exact['sample'] == 'all 50 files' and exact['max_files'] is None
    assert exact['mean'] == pytest.approx(allv.mean(), rel=1e-10)
    assert exact['std'] == pytest.approx(allv.std(ddof=1), rel=1e-9)
    assert main(['stats', str(tmp_path / 'lms'), '--max_files', '0', '--no-progress']) == 2
    with pytest.raises(SystemExit):
        main(['stats', str(tmp_path / 'lms'), '--all', '--max_files', '5'])

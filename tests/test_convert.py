"""`m2d convert`: parity with the front-end, bad inputs, restart after a kill, file lists, padding."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d import audio
from m2d.audio import LOG_EPS, LogMelSpectrogram, load_audio, preset
from m2d.data import convert as convert_mod
from m2d.data.convert import convert, wav_to_lms
from m2d.fileio import is_temporary

ROOT = Path(__file__).resolve().parents[1]


def reference_lms(path: Path, sr: int = 16000, min_samples: int = 0) -> np.ndarray:
    """What `RuntimeM2D.to_feature` computes for the file: front-end of the soxr-resampled waveform."""
    wav = load_audio(path, sr)
    if len(wav) < min_samples:
        wav = np.pad(wav, (0, min_samples - len(wav)))
    with torch.inference_mode():
        return LogMelSpectrogram(preset(sr))(torch.from_numpy(wav))[0].numpy()


def link_fsdd(fsdd_dir: Path, dest: Path, n: int, start: int = 0) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(fsdd_dir))[start:start + n]
    for name in names:
        (dest / name).symlink_to(fsdd_dir / name)
    return [dest / n for n in names]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_fsdd_parity_files_csv_and_rerun(fsdd_dir, tmp_path):
    src = tmp_path / 'audio'
    files = link_fsdd(fsdd_dir, src / 'sub', 40)
    dest = tmp_path / 'lms_fsdd'
    s = convert(src, dest, sr=16000, workers=2, progress=False, main_helps=False)  # all in the workers
    assert (s.converted, s.skipped, s.failed, s.found) == (40, 0, [], 40)
    worst = 0.0
    for f in files:
        out = np.load(dest / 'sub' / (f.stem + '.npy'))
        ref = reference_lms(f)
        assert out.dtype == np.float32 and out.shape == ref.shape and out.shape[:2] == (1, 80)
        worst = max(worst, float(np.abs(out - ref).max()))
    assert worst <= 1e-3
    rows = read_csv(dest / 'files.csv')
    assert [r['file_name'] for r in rows] == sorted(f'lms_fsdd/sub/{f.stem}.npy' for f in files)
    assert not (dest / 'convert_failures.csv').exists()
    # rerun: everything skipped, the list unchanged
    s2 = convert(src, dest, workers=0, progress=False)
    assert (s2.converted, s2.skipped, s2.exit_code) == (0, 40, 0)
    assert read_csv(dest / 'files.csv') == rows


def _write(path: Path, data: np.ndarray, sr: int, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


def test_bad_inputs_never_stop_the_run(fsdd_dir, tmp_path):
    src, dest = tmp_path / 'src', tmp_path / 'out'
    rng = np.random.default_rng(0)
    good = link_fsdd(fsdd_dir, src, 2)
    (src / 'empty.wav').write_bytes(b'')
    (src / 'text.wav').write_text('this is not audio\n' * 20)
    raw = (fsdd_dir / sorted(os.listdir(fsdd_dir))[0]).read_bytes()
    (src / 'header_only.wav').write_bytes(raw[:44])
    (src / 'truncated.wav').write_bytes(raw[:len(raw) // 2 + 1])  # header promises more data
    nan = rng.uniform(-0.5, 0.5, 8000).astype(np.float32)
    nan[100] = np.nan
    _write(src / 'nan.wav', nan, 16000, 'FLOAT')
    inf = rng.uniform(-0.5, 0.5, 8000).astype(np.float32)
    inf[5] = np.inf
    _write(src / 'inf.wav', inf, 16000, 'FLOAT')
    _write(src / 'one.wav', np.array([0.25], np.float32), 8000)
    (src / 'folder.wav').mkdir()
    inner = _write(src / 'folder.wav' / 'inner.wav', rng.uniform(-0.5, 0.5, 4000).astype(np.float32), 16000)
    (src / 'dangling.wav').symlink_to(tmp_path / 'nowhere.wav')
    stereo = _write(src / 'stereo44k.WAV', rng.uniform(-0.5, 0.5, (44100, 2)).astype(np.float32), 44100)
    odd = _write(src / 'odd_rate.flac', rng.uniform(-0.5, 0.5, 11025 // 2).astype(np.float32), 11025)
    long = _write(src / 'long.wav', (0.1 * rng.standard_normal(8000 * 60 * 6)).astype(np.float32), 8000, 'PCM_16')
    (src / 'notes.txt').write_text('ignored: not an audio suffix')

    s = convert(src, dest, workers=2, progress=False, chunk_size=3, main_helps=False)
    failed = {Path(f).name: reason for f, reason in s.failed}
    assert set(failed) == {'empty.wav', 'text.wav', 'header_only.wav', 'truncated.wav', 'nan.wav', 'inf.wav',
                           'folder.wav', 'dangling.wav'}, failed
    assert 'NaN or infinite' in failed['nan.wav'] and 'NaN or infinite' in failed['inf.wav']
    assert 'truncated' in failed['truncated.wav']  # libsndfile alone would read it as a shorter clip
    assert 'folder' in failed['folder.wav'] and 'no such file' in failed['dangling.wav']
    assert all(name in reason for name, reason in failed.items())  # every reason names its file
    converted = {'one', 'stereo44k', 'odd_rate', 'long', 'inner'} | {g.stem for g in good}
    assert s.converted == len(converted) and s.exit_code == 0
    outs = {p.stem: p for p in dest.rglob('*.npy')}
    assert set(outs) == converted
    assert np.load(outs['one']).shape == (1, 80, 1)
    for f in (stereo, odd, inner, *good):
        np.testing.assert_allclose(np.load(outs[f.stem]), reference_lms(f), atol=1e-3)
    long_lms = np.load(outs['long'])  # 6 minutes: transformed in pieces, equal to the whole transform
    assert long_lms.shape == (1, 80, 1 + 6 * 60 * 16000 // 160)
    whole = wav_to_lms(LogMelSpectrogram(preset(16000)), load_audio(long, 16000), max_frames=10 ** 9)
    assert np.abs(long_lms - whole).max() <= 1e-3
    rows = read_csv(dest / 'convert_failures.csv')
    assert sorted(Path(r['file']).name for r in rows) == sorted(failed)
    listed = {r['file_name'] for r in read_csv(dest / 'files.csv')}
    assert listed == {f'out/{p.relative_to(dest).as_posix()}' for p in outs.values()}


def test_streaming_read_and_pieces_match_whole(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    wav = (0.2 * rng.standard_normal(44100 * 20)).astype(np.float32)
    path = _write(tmp_path / 'src' / 'a.wav', np.stack([wav, -0.5 * wav], 1), 44100, 'FLOAT')
    monkeypatch.setattr(audio, '_STREAM_BYTES', 1 << 16)
    monkeypatch.setattr(audio, '_STREAM_BLOCK', 100000)
    monkeypatch.setattr(convert_mod, '_MAX_FRAMES', 333)
    streamed = audio.read_audio(path, 16000)
    whole = load_audio(path, 16000)
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < 1e-4
    s = convert(tmp_path / 'src', tmp_path / 'out', workers=0, progress=False)
    assert s.converted == 1
    np.testing.assert_allclose(np.load(tmp_path / 'out' / 'a.npy'), reference_lms(path), atol=1e-3)


def test_nothing_converted_is_an_error_and_failures_csv(tmp_path):
    from m2d.cli import main

    src = tmp_path / 'src'
    src.mkdir()
    (src / 'bad.wav').write_text('not audio')
    (src / 'worse.mp3').write_bytes(b'')
    assert main(['convert', str(src), str(tmp_path / 'out'), '--workers', '0', '--no-progress']) == 1
    rows = read_csv(tmp_path / 'out' / 'convert_failures.csv')
    assert {Path(r['file']).name for r in rows} == {'bad.wav', 'worse.mp3'}
    assert all(r['reason'] for r in rows)
    assert read_csv(tmp_path / 'out' / 'files.csv') == []
    # nothing to do is not an error; a stale failure report goes away once the files are fixed
    (src / 'bad.wav').unlink()
    (src / 'worse.mp3').unlink()
    _write(src / 'ok.wav', np.zeros(1600, np.float32), 16000)
    assert main(['convert', str(src), str(tmp_path / 'out'), '--workers', '0', '--no-progress']) == 0
    assert not (tmp_path / 'out' / 'convert_failures.csv').exists()
    assert main(['convert', str(src), str(tmp_path / 'out'), '--workers', '0', '--no-progress']) == 0


def test_min_seconds_pads_with_zeros_at_the_end(fsdd_dir, tmp_path):
    files = link_fsdd(fsdd_dir, tmp_path / 'src', 3)
    short = tmp_path / 'src' / 'long.wav'
    _write(short, np.full(16000 * 7, 0.1, np.float32), 16000)
    s = convert(tmp_path / 'src', tmp_path / 'out', workers=0, min_seconds=6.1, progress=False)
    assert s.converted == 4
    for f in files:
        out = np.load(tmp_path / 'out' / (f.stem + '.npy'))
        assert out.shape == (1, 80, 1 + int(16000 * 6.1) // 160)
        ref = reference_lms(f, min_samples=int(16000 * 6.1))
        assert np.abs(out - ref).max() <= 1e-3
        n = len(load_audio(f, 16000))
        assert np.allclose(out[..., n // 160 + 3:], np.log(LOG_EPS))  # silence after the clip
    assert np.load(tmp_path / 'out' / 'long.npy').shape == (1, 80, 1 + 16000 * 7 // 160)  # not cut
    # default: no padding
    s = convert(tmp_path / 'src', tmp_path / 'out0', workers=0, progress=False)
    assert np.load(tmp_path / 'out0' / (files[0].stem + '.npy')).shape == reference_lms(files[0]).shape


def test_overwrite_suffix_collision_and_previous_outputs_listed(fsdd_dir, tmp_path):
    src = tmp_path / 'src'
    files = link_fsdd(fsdd_dir, src, 3)
    dest = tmp_path / 'out'
    convert(src, dest, workers=0, progress=False)
    first = dest / (files[0].stem + '.npy')
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert convert(src, dest, workers=0, overwrite=True, progress=False).converted == 3
    assert first.stat().st_mtime_ns != mtime
    # another source into the same folder: the list keeps the earlier outputs
    other = tmp_path / 'other'
    _write(other / 'x.flac', np.zeros(1600, np.float32), 16000)
    _write(other / 'x.wav', np.zeros(1600, np.float32), 16000)  # same output name: one fails
    _write(other / 'y.ogg', np.zeros(1600, np.float32), 16000)
    s = convert(other, dest, workers=0, progress=False)
    assert s.converted == 2 and len(s.failed) == 1 and 'same output' in s.failed[0][1]
    names = [r['file_name'] for r in read_csv(dest / 'files.csv')]
    assert names == sorted(['out/x.npy', 'out/y.npy'] + [f'out/{f.stem}.npy' for f in files])
    # --suffix restricts
    s = convert(other, tmp_path / 'only_ogg', workers=0, suffixes=['OGG'], progress=False)
    assert s.found == 1 and s.converted == 1
    with pytest.raises(ValueError, match='sample_rate'):
        convert(other, tmp_path / 'bad', sr=22050, progress=False)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        convert(tmp_path / 'nowhere', tmp_path / 'bad', progress=False)


def _all_valid(dest: Path) -> list[Path]:
    """The outputs (temporary files aside), each checked to be a whole LMS."""
    outs = [p for p in dest.rglob('*') if p.is_file() and p.suffix == '.npy' and not is_temporary(p)]
    for p in outs:
        a = np.load(p)
        assert a.dtype == np.float32 and a.shape[:2] == (1, 80) and np.isfinite(a).all()
    return outs


def _start_convert(fsdd_dir: Path, tmp_path: Path, n: int, outputs: int) -> tuple[subprocess.Popen, Path]:
    """`m2d convert` of `n` FSDD files (one worker, padded to 6.1 s: a few seconds) in another process
    (its own session), returned once it has written `outputs` files."""
    link_fsdd(fsdd_dir, tmp_path / 'src', n)
    dest = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'm2d', 'convert', str(tmp_path / 'src'), str(dest), '--workers', '1',
           '--min-seconds', '6.1', '--no-progress']
    env = dict(os.environ, PYTHONPATH=str(ROOT / 'src'))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(dest.glob('*.npy'))) < outputs and proc.poll() is None:
        time.sleep(0.05)
    return proc, dest


def test_killed_run_resumes_without_partial_files(fsdd_dir, tmp_path):
    n = 120
    proc, dest = _start_convert(fsdd_dir, tmp_path, n, outputs=10)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker, mid-way
    proc.wait()
    partial = _all_valid(dest)
    assert 0 < len(partial) < n
    leftover = dest / '.0_george_x.npy.abc123.tmp.npy'  # what a kill during a write leaves
    leftover.write_bytes(b'\x93NUMPY partial')
    s = convert(tmp_path / 'src', dest, workers=0, min_seconds=6.1, progress=False)
    assert s.removed_temporaries >= 1 and not leftover.exists()
    assert s.skipped == len(partial) and s.converted == n - len(partial) and not s.failed
    outs = _all_valid(dest)
    assert len(outs) == n and not [p for p in dest.iterdir() if is_temporary(p)]
    assert len(read_csv(dest / 'files.csv')) == n


def _spawned_workers() -> list[int]:
    """Pids of this process's multiprocessing workers (not the resource tracker)."""
    pids = []
    for d in Path('/proc').iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / 'status').read_text()
            cmdline = (d / 'cmdline').read_bytes().decode(errors='replace')
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith('PPid:')), -1)
        if ppid == os.getpid() and 'spawn_main' in cmdline:
            pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='needs /proc to find the worker processes')
def test_a_dying_worker_is_replaced_and_its_chunk_retried(fsdd_dir, tmp_path, caplog):
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger='m2d.data.convert')
    n = 300  # about a second of work for two workers: the kill lands mid-run
    link_fsdd(fsdd_dir, tmp_path / 'src', n)
    dest = tmp_path / 'out'
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault('s', convert(
        tmp_path / 'src', dest, workers=2, min_seconds=6.1, chunk_size=2, progress=False, main_helps=False)))
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(list(dest.glob('*.npy'))) < 6:
        time.sleep(0.02)
    victims = _spawned_workers()
    assert victims, 'no worker process found'
    os.kill(victims[0], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    s = box['s']
    assert 'worker process died' in caplog.text  # the kill was noticed mid-run ...
    assert s.converted == n and not s.failed  # ... and the files of the lost chunk were converted again
    assert len(_all_valid(dest)) == n and not [p for p in dest.iterdir() if is_temporary(p)]


def test_32k_preset(fsdd_dir, tmp_path):
    files = link_fsdd(fsdd_dir, tmp_path / 'src', 2)
    s = convert(tmp_path / 'src', tmp_path / 'out', sr=32000, workers=0, progress=False)
    assert s.converted == 2
    for f in files:
        out = np.load(tmp_path / 'out' / (f.stem + '.npy'))
        ref = reference_lms(f, sr=32000)
        assert out.shape == ref.shape and out.shape[-1] == 1 + len(load_audio(f, 32000)) // 320
        assert np.abs(out - ref).max() <= 1e-3


def test_a_second_conversion_into_the_same_folder_stops_with_a_clear_message(fsdd_dir, tmp_path, capsys):
    from m2d.cli import main

    n = 120
    first, dest = _start_convert(fsdd_dir, tmp_path, n, outputs=1)
    try:
        assert first.poll() is None, 'the first conversion ended before the second started'
        assert main(['convert', str(tmp_path / 'src'), str(dest), '--workers', '0', '--no-progress',
                     '--overwrite']) == 2
        err = capsys.readouterr().err
        assert f'm2d convert: error: {dest}: another job is writing into this folder (pid {first.pid}' in err
        assert first.wait(120) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert len(_all_valid(dest)) == n and not [p for p in dest.iterdir() if p.name.startswith('.')]
    assert len(read_csv(dest / 'files.csv')) == n

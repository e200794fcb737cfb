"""One error path: each command's typical bad inputs end as `m2d CMD: error: MESSAGE` on stderr and
exit status 2 (from `m2d.cli.main`, the only place that prints errors), never a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from m2d import jobs
from m2d.cli import main

NAME = 'm2d_vit_base-80x608p16x16-221006-mr7'


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the command; it must exit with status 2 and print one error line holding `expected`."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'm2d {argv[0]}: error: '), captured.err
    assert 'Traceback' not in captured.err and captured.out == ''
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / 'clips' / 'a.wav'
    path.parent.mkdir()
    sf.write(path, np.zeros(1600, np.float32), 16000)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('M2D_RELEASE_URL', 'http://127.0.0.1:9/unreachable')


def test_convert(capsys, tmp_path, wav):
    fails(capsys, ['convert', str(tmp_path / 'missing'), str(tmp_path / 'out')], 'missing: no such file or folder')
    fails(capsys, ['convert', str(wav.parent), str(tmp_path / 'out'), '--min_seconds', '-1'], 'min_seconds=-1.0')
    busy = jobs.plan(None, tmp_path / 'busy', name='convert')  # another job holds the folder
    try:
        fails(capsys, ['convert', str(wav.parent), str(tmp_path / 'busy'), '--workers', '0'],
              f'{tmp_path / "busy"}: another job is writing into this folder', 'pid ')
    finally:
        busy.release()


def test_encode(capsys, tmp_path, wav, small_ckpt, offline):
    out = ['--output', str(tmp_path / 'feats')]
    fails(capsys, ['encode', str(wav), '-w', str(tmp_path / 'w' / 'checkpoint-1.pth'), *out], 'no such weight file')
    fails(capsys, ['encode', str(wav), '-w', NAME[:-1] + '8', *out], 'not a released M2D model', 'Did you mean')
    fails(capsys, ['encode', str(wav), '-w', NAME, *out], 'cannot reach', '127.0.0.1:9')  # download error
    fails(capsys, ['encode', str(wav), '-w', str(small_ckpt), '--layers', 'first', *out], '--layers', 'expected "all"')
    fails(capsys, ['encode', str(wav), '-w', str(small_ckpt), '--layers', '5', *out], 'out of range')
    fails(capsys, ['encode', str(wav), '-w', str(small_ckpt), '--batch_size', '0', *out], '--batch_size 0')
    fails(capsys, ['encode', str(wav), '-w', str(small_ckpt), '--device', 'gpu0', *out], "--device 'gpu0'")
    bad = tmp_path / 'bad.pth'
    bad.write_text('not a checkpoint')
    fails(capsys, ['encode', str(wav), '-w', str(bad), *out], str(bad))
    assert not (tmp_path / 'feats').exists()


def test_teacher_features(capsys, tmp_path, wav):
    pytest.importorskip('transformers')
    fails(capsys, ['teacher-features', str(tmp_path / 'missing'), str(tmp_path / 'out')], 'no such file or folder')
    (tmp_path / 'not_hubert').mkdir()
    fails(capsys, ['teacher-features', str(wav.parent), str(tmp_path / 'out'), '--device', 'cpu',
                   '--teacher', str(tmp_path / 'not_hubert')], 'cannot load the HuBERT teacher', 'not_hubert')
    assert not list((tmp_path / 'out').iterdir())  # the lock was released, nothing written


def test_download(capsys, tmp_path, offline):
    fails(capsys, ['download'], 'give model names')
    fails(capsys, ['download', 'no-such-model'], "'no-such-model' is not a released M2D model")
    fails(capsys, ['download', NAME, '--quiet'], f'{NAME}: cannot reach')
    fails(capsys, ['download', NAME, NAME[:-3] + 'mr6', '--quiet'], '2 of 2 downloads failed', 'cannot reach')


def test_export(capsys, tmp_path, small_ckpt, offline):
    fails(capsys, ['export', str(small_ckpt), str(tmp_path / 'x.pth')], 'must end with .safetensors')
    fails(capsys, ['export', str(tmp_path / 'w' / 'checkpoint-1.pth'), str(tmp_path / 'x.safetensors')],
          'no such weight file')
    fails(capsys, ['export', 'm2d_vit_base', str(tmp_path / 'x.safetensors')], 'not a released M2D model')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'\x00' * 64)
    fails(capsys, ['export', str(bad), str(tmp_path / 'x.safetensors')], str(bad))
    assert not (tmp_path / 'x.safetensors').exists()


def test_filelist_stats_datasets(capsys, tmp_path):
    fails(capsys, ['filelist', str(tmp_path / 'missing')], 'missing: no such folder')
    fails(capsys, ['stats', str(tmp_path / 'missing.csv')], 'missing.csv')
    (tmp_path / 'empty').mkdir()
    fails(capsys, ['stats', str(tmp_path / 'empty')], 'empty')
    fails(capsys, ['datasets', 'fsdd', str(tmp_path / 'data'), '--source', str(tmp_path / 'nowhere'),
                   '--no_progress'], 'nowhere: no such folder or zip file')
    (tmp_path / 'not_fsdd').mkdir()
    fails(capsys, ['datasets', 'fsdd', str(tmp_path / 'data'), '--source', str(tmp_path / 'not_fsdd')],
          'no FSDD recordings')

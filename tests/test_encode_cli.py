"""`m2d encode` / `m2d export` end to end on small files with a small checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d.audio import load_audio
from m2d.cli import main
from m2d.encode_files import encode_files, parse_layers
from m2d.runtime import RuntimeM2D
from m2d.vit import ViTConfig, ViTEncoder

NAME = 'm2d_vit_base-80x608p16x16-221006-mr7'
GOOD = ['a', 'sub/b', 'sub/c', 'sub/deeper/d']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Path:
    """A small M2D checkpoint (D=64, 2 blocks) in the official layout and folder name."""
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(input_size=(80, 608), embed_dim=64, depth=2, num_heads=1))
    for p in enc.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    sd = dict(enc.state_dict(), norm_stats=torch.tensor([-7.0, 4.0]), mask_token=torch.zeros(1, 1, 64))
    path = tmp_path_factory.mktemp('w') / NAME / 'checkpoint-5.pth'
    path.parent.mkdir()
    torch.save({'model': sd, 'epoch': 5, 'args': argparse.Namespace(model='m2d_vit_base')}, path)
    return path


@pytest.fixture(scope='module')
def runtime(ckpt) -> RuntimeM2D:
    return RuntimeM2D(ckpt)


@pytest.fixture(scope='module')
def audio_dir(tmp_path_factory) -> Path:
    """a.wav, sub/b.wav (1 s, 16 kHz), sub/c.flac (0.7 s), sub/deeper/d.wav (1 s at 8 kHz), bad.wav (text)."""
    root = tmp_path_factory.mktemp('audio')
    rng = np.random.default_rng(0)
    for rel, sr, seconds in [('a.wav', 16000, 1.0), ('sub/b.wav', 16000, 1.0), ('sub/c.flac', 16000, 0.7),
                             ('sub/deeper/d.wav', 8000, 1.0)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, rng.uniform(-0.3, 0.3, int(sr * seconds)).astype(np.float32), sr)
    (root / 'bad.wav').write_text('this is not audio')
    (root / 'notes.txt').write_text('ignored: not an audio suffix')
    return root


def expected(runtime: RuntimeM2D, path: Path, **kw) -> np.ndarray:
    wav = torch.from_numpy(load_audio(path, runtime.sample_rate))[None]
    with torch.inference_mode():
        return runtime.encode(wav, **kw)


def test_encode_tree(ckpt, runtime, audio_dir, tmp_path, capsys):
    out = tmp_path / 'feats'
    rc = main(['encode', str(audio_dir), '--weights', str(ckpt), '--output', str(out), '--device', 'cpu',
               '--batch-size', '4', '--quiet'])
    assert rc == 0
    written = sorted(p.relative_to(out).with_suffix('').as_posix() for p in out.rglob('*') if p.is_file())
    assert written == GOOD  # mirrors the tree; nothing for bad.wav or notes.txt; no temp files
    for key in GOOD:
        src = next(audio_dir.glob(f'{key}.*'))
        got = np.load(out / f'{key}.npy')
        want = expected(runtime, src)[0].numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.load(out / 'a.npy').shape == (7, 5 * 64)  # 1 s = 101 frames -> 7 patches of 16; 5 freq patches x 64
    assert np.load(out / 'sub/c.npy').shape[0] == 5
    summary = capsys.readouterr().out
    assert 'encoded 4 file(s), 1 failed' in summary
    assert 'FAILED' in summary and 'bad.wav' in summary and 'cannot read audio' in summary


def test_pool_layers_flat(ckpt, runtime, audio_dir, tmp_path):
    a = audio_dir / 'a.wav'
    assert main(['encode', str(a), '-w', str(ckpt), '-o', str(tmp_path / 'm'), '--pool', 'mean', '-q']) == 0
    np.testing.assert_allclose(np.load(tmp_path / 'm' / 'a.npy'), expected(runtime, a)[0].mean(0).numpy(), atol=1e-5)

    assert main(['encode', str(a), '-w', str(ckpt), '-o', str(tmp_path / 'l'), '--layers', '0,-1', '-q']) == 0
    layers = np.load(tmp_path / 'l' / 'a.npy')
    want = expected(runtime, a, return_layers=True)
    assert layers.shape == (2, 7, 320)
    np.testing.assert_allclose(layers[0], want[0][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(layers[1], want[1][0].numpy(), atol=1e-5)
    assert not np.allclose(layers[0], layers[1])

    assert main(['encode', str(a), '-w', str(ckpt), '-o', str(tmp_path / 'f'), '--flat', '--layers', 'all',
                 '--pool', 'mean', '-q']) == 0
    assert np.load(tmp_path / 'f' / 'a.npy').shape == (2, 64)


def test_npz_and_failures(ckpt, runtime, audio_dir, tmp_path, capsys):
    npz = tmp_path / 'all.npz'
    rc = main(['encode', str(audio_dir), str(audio_dir / 'missing.wav'), '-w', str(ckpt), '--npz', str(npz),
               '--batch-size', '3', '-q'])
    assert rc == 0
    with np.load(npz) as z:
        assert sorted(z.files) == GOOD
        np.testing.assert_allclose(z['sub/deeper/d'], expected(runtime, audio_dir / 'sub/deeper/d.wav')[0].numpy(),
                                   atol=1e-5)
    out = capsys.readouterr().out
    assert 'encoded 4 file(s) into' in out and '2 failed' in out and 'missing.wav' in out

    rc = main(['encode', str(audio_dir / 'bad.wav'), '-w', str(ckpt), '-o', str(tmp_path / 'none'), '-q'])
    assert rc == 1  # nothing encoded
    assert not (tmp_path / 'none').exists() or not any((tmp_path / 'none').iterdir())


def test_library_batches_equal_lengths(runtime, audio_dir, tmp_path, monkeypatch):
    """a, b and d (resampled to 16000 samples) go through the encoder together; c alone."""
    sizes = []
    original = runtime.encode

    def spy(x, **kw):
        sizes.append(x.shape[0])
        return original(x, **kw)

    monkeypatch.setattr(runtime, 'encode', spy)
    result = encode_files(runtime, [audio_dir], output_dir=tmp_path / 'o', batch_size=8, progress=False)
    assert sorted(sizes) == [1, 3]
    assert sorted(result.encoded) == GOOD and [p.name for p, _ in result.failed] == ['bad.wav']

    result = encode_files(runtime, [audio_dir], output_dir=tmp_path / 'o', skip_existing=True, progress=False)
    assert not result.encoded and len(result.skipped) == 4


def test_parse_layers():
    assert parse_layers(None, 12) is None
    assert parse_layers('all', 3) == [0, 1, 2]
    assert parse_layers('0,6,-1', 12) == [0, 6, 11]
    with pytest.raises(ValueError, match='out of range'):
        parse_layers('12', 12)
    with pytest.raises(ValueError, match='expected "all"'):
        parse_layers('first', 12)


def test_weights_by_name_from_cache(ckpt, runtime, audio_dir, tmp_path, monkeypatch):
    cached = tmp_path / 'cache' / NAME / 'checkpoint-5.pth'
    cached.parent.mkdir(parents=True)
    cached.write_bytes(ckpt.read_bytes())
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('M2D_RELEASE_URL', 'http://127.0.0.1:9/unreachable')
    assert main(['encode', str(audio_dir / 'a.wav'), '-w', NAME, '-o', str(tmp_path / 'n'), '-q']) == 0
    np.testing.assert_allclose(np.load(tmp_path / 'n' / 'a.npy'), expected(runtime, audio_dir / 'a.wav')[0].numpy(),
                               atol=1e-5)


def test_bad_weights_is_usage_error(audio_dir, tmp_path, capsys):
    rc = main(['encode', str(audio_dir), '-w', 'm2d_vit_base-80x608p16x16-221006-mr8', '-o', str(tmp_path / 'x')])
    assert rc == 2
    assert 'Did you mean' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_export_round_trip(ckpt, runtime, audio_dir, tmp_path, capsys):
    st = tmp_path / 'plain_name.safetensors'
    assert main(['export', str(ckpt), str(st)]) == 0
    assert str(st) in capsys.readouterr().out
    exported = RuntimeM2D(st)
    wav = torch.from_numpy(load_audio(audio_dir / 'sub/c.flac', 16000))[None]
    with torch.inference_mode():
        assert torch.equal(exported.encode(wav), runtime.encode(wav))
    assert torch.equal(exported.norm_stats, runtime.norm_stats)
    assert main(['export', str(ckpt), str(tmp_path / 'x.pth')]) == 2


def test_encode_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(['encode', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert '--weights' in out and '--layers' in out and '--npz' in out


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    """Missing inputs and weight files end with `m2d CMD: error: ...` and status 2, not a traceback."""
    assert main(['convert', str(tmp_path / 'missing'), str(tmp_path / 'out')]) == 2
    assert 'm2d convert: error:' in capsys.readouterr().err
    assert main(['encode', str(tmp_path), '--weights', str(tmp_path / 'w' / 'checkpoint-1.pth'),
                 '--output', str(tmp_path / 'feats')]) == 2
    assert 'no such weight file' in capsys.readouterr().err

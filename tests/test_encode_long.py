"""Long recordings in bounded memory: the streamed path equals the in-memory one (features, the last
partial window, timestamps, pooling, every layer) and ``--npz`` refuses what it cannot hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import m2d.encode_files as ef
import m2d.hear as hear
from m2d.audio import load_audio, stream_audio
from m2d.cli import main
from m2d.runtime import RuntimeM2D
from m2d.streaming import NpyStream, feature_frames, lms_stream, waveform_blocks
from conftest import write_small_checkpoint

ATOL = 2e-5  # float32 round-off of a 2-block encoder


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Path:
    """80x208p16x16 (2.08-s windows), 64-d, 2 blocks: the bounded path starts past 16 windows (33 s)."""
    return write_small_checkpoint(tmp_path_factory.mktemp('w'))


@pytest.fixture(scope='module')
def rt(ckpt) -> RuntimeM2D:
    return RuntimeM2D(ckpt)


@pytest.fixture(scope='module')
def recordings(tmp_path_factory) -> Path:
    """long.wav: 40.3 s at 16 kHz (19 windows + a 79-frame partial one); sub/resampled.flac: 35.2 s at
    22.05 kHz (streamed through soxr's resampler); short.wav: 1 s."""
    root = tmp_path_factory.mktemp('rec')
    rng = np.random.default_rng(1)
    for rel, sr, seconds in [('long.wav', 16000, 40.3), ('sub/resampled.flac', 22050, 35.2), ('short.wav', 16000, 1.0)]:
        t = np.arange(int(sr * seconds)) / sr
        wav = 0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t)) * t) + 0.05 * rng.standard_normal(t.size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, wav.astype(np.float32), sr)
    return root


def in_memory(rt: RuntimeM2D, path: Path, return_layers: bool = False):
    """The whole-file path: the full waveform, the full log-mel, `encode_lms` on all of it."""
    wav = torch.from_numpy(load_audio(path, rt.sample_rate))[None]
    with torch.inference_mode():
        return rt.encode_lms(rt.normalize_batch(rt.to_feature(wav)), return_layers=return_layers)


def test_log_mel_pieces_equal_the_whole_transform(rt):
    torch.manual_seed(0)
    for n in (150, 200, 201, 361, 3001, 48037):  # around n_fft/2 = 200, where padding switches to zeros
        x = torch.rand(2, n) * 2 - 1
        whole = rt.to_spec(x)
        for block, piece in ((1, 2), (7, 3), (160, 50), (999, 7), (n, 2048)):
            if n > 400 and block < 160:
                continue
            got = torch.cat(list(lms_stream(rt.to_spec, waveform_blocks(x, block), piece)), dim=-1)
            assert got.shape == whole.shape
            torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)


def test_encode_streams_long_files_with_the_in_memory_features(ckpt, rt, recordings, tmp_path):
    out = tmp_path / 'feats'
    assert main(['encode', str(recordings), '--weights', str(ckpt), '--output', str(out), '--device', 'cpu',
                 '--quiet']) == 0
    for key, src in [('long', 'long.wav'), ('sub/resampled', 'sub/resampled.flac'), ('short', 'short.wav')]:
        want = in_memory(rt, recordings / src)[0].numpy()
        got = np.load(out / f'{key}.npy')
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    frames = 1 + len(load_audio(recordings / 'long.wav')) // 160
    assert frames % 208 == 79  # a partial last window, padded to 5 patches
    assert np.load(out / 'long.npy').shape == (19 * 13 + 5, 5 * 64) == (feature_frames(rt, frames), rt.feature_d)
    assert sorted(p.name for p in out.rglob('*') if p.name.startswith('.')) == []  # no temporaries left


def test_streamed_files_are_streamed(rt, recordings, tmp_path, monkeypatch):
    """The long files never go through load_audio (the whole waveform); the short one does."""
    loaded = []
    monkeypatch.setattr(ef, 'load_audio', lambda p, sr: loaded.append(Path(p).name) or load_audio(p, sr))
    result = ef.encode_files(rt, [recordings], output_dir=tmp_path / 'o', progress=False)
    assert len(result.encoded) == 3 and loaded == ['short.wav']


def test_layers_all_and_pool_mean(rt, recordings, tmp_path):
    src = recordings / 'long.wav'
    layers = in_memory(rt, src, return_layers=True)
    want = torch.stack([y[0] for y in layers]).numpy()  # [L, T', D]
    ef.encode_files(rt, [src], output_dir=tmp_path / 'all', layers=[0, 1], progress=False)
    got = np.load(tmp_path / 'all' / 'long.npy')
    assert got.shape == want.shape == (2, 252, 320)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    got = np.load(tmp_path / 'all' / 'long.npy', mmap_mode='r')  # the header written at the end is a real one
    np.testing.assert_allclose(got[1, -3:], want[1, -3:], atol=ATOL, rtol=0)

    ef.encode_files(rt, [src], output_dir=tmp_path / 'mean', layers=[1], pool='mean', progress=False)
    got = np.load(tmp_path / 'mean' / 'long.npy')
    assert got.shape == (1, 320)
    np.testing.assert_allclose(got, want[1:].mean(axis=1), atol=ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.rglob('.*')) == []


def test_npz_holds_pooled_and_refuses_what_is_too_large(rt, recordings, tmp_path, monkeypatch):
    src = recordings / 'long.wav'
    want = in_memory(rt, src)[0].numpy()
    r = ef.encode_files(rt, [src, recordings / 'short.wav'], npz=tmp_path / 'a.npz', progress=False)
    with np.load(tmp_path / 'a.npz') as z:
        np.testing.assert_allclose(z['long'], want, atol=ATOL, rtol=0)
    assert not r.failed
    monkeypatch.setattr(ef, 'NPZ_MAX_MB', 0.25)  # long.wav's features are 0.31 MB
    r = ef.encode_files(rt, [src, recordings / 'short.wav'], npz=tmp_path / 'b.npz', progress=False)
    assert list(r.encoded) == ['short'] and len(r.failed) == 1
    assert 'long.wav' in r.failed[0][1] and '--output DIR' in r.failed[0][1]
    r = ef.encode_files(rt, [src], npz=tmp_path / 'c.npz', pool='mean', progress=False)  # pooled: always fits
    with np.load(tmp_path / 'c.npz') as z:
        np.testing.assert_allclose(z['long'], want.mean(0), atol=ATOL, rtol=0)


def test_runtime_iter_encode_encode_and_timestamps(rt, recordings):
    src = recordings / 'sub/resampled.flac'
    want = in_memory(rt, src)
    with torch.inference_mode():
        pieces = list(rt.iter_encode(stream_audio(src, rt.sample_rate, block_samples=30011), windows_per_pass=3))
        assert len(pieces) > 3 and all(p.shape[1] <= 3 * 13 for p in pieces)
        torch.testing.assert_close(torch.cat(pieces, dim=1), want, atol=ATOL, rtol=0)
        wav = torch.from_numpy(load_audio(src, rt.sample_rate))[None]
        torch.testing.assert_close(rt.encode(wav), want, atol=ATOL, rtol=0)  # long input: the bounded path
        emb, ts = rt.get_timestamp_embeddings(wav)
    torch.testing.assert_close(emb, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(ts[0], (torch.arange(want.shape[1]) + 0.5) * 160.0)


def test_hear_fine_timestamps_of_a_long_recording(ckpt, recordings):
    """40-ms timestamps: every output equals the in-memory encoding of the shifted log-mel."""
    model = hear.load_model(str(ckpt), timestamp_hop_ms=40)
    wav = torch.from_numpy(load_audio(recordings / 'long.wav', 16000))[None]
    emb, ts = hear.get_timestamp_embeddings(wav, model)
    with torch.inference_mode():
        lms = model.normalize_batch(model.to_feature(wav))
        T = lms.shape[-1]
        assert emb.shape[1] == ts.shape[1] == -(-T // 4)
        for o in range(4):  # output n = 4k + o/4 ... takes window k of the input shifted by 4 * (n % 4) frames
            shifted = model.encode_lms(lms[..., 4 * o:])
            n = torch.arange(o, emb.shape[1], 4)
            torch.testing.assert_close(emb[:, n], shifted[:, (4 * n - 4 * o) // 16], atol=ATOL, rtol=0)
    torch.testing.assert_close(ts[0], (torch.arange(emb.shape[1]) * 4 + 8) * 10.0)


def test_npy_stream_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / 'x.npy'
    with pytest.raises(RuntimeError), NpyStream(path, layers=3) as out:
        out.append(np.ones((3, 2, 4), np.float32))
        raise RuntimeError('interrupted')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.npy']  # the caller's atomic_path removes it
    with NpyStream(path, layers=None) as out:
        for k in range(3):
            out.append(np.full((k + 1, 4), k, np.float32))
    np.testing.assert_array_equal(np.load(path), np.repeat(np.arange(3), [1, 2, 3])[:, None] * np.ones(4))


def test_convert_streams_long_files_with_the_whole_file_log_mel(recordings, tmp_path, monkeypatch):
    """`m2d convert` on recordings longer than its piece limit: decoded and written block by block."""
    import m2d.data.convert as conv
    from m2d.audio import LogMelSpectrogram, preset

    monkeypatch.setattr(conv, '_MAX_FRAMES', 500)  # 5 s instead of 5 min, so that these files count as long
    monkeypatch.setattr(conv, '_CHECK_BYTES', 0)
    streamed = []
    original = conv._stream_long
    monkeypatch.setattr(conv, '_stream_long', lambda f: streamed.append(f.item.key) or original(f))
    s = conv.convert(recordings, tmp_path / 'lms', workers=0, progress=False)
    assert s.converted == 3 and not s.failed and sorted(streamed) == ['long', 'sub/resampled']
    frontend = LogMelSpectrogram(preset(16000))
    for key, src in [('long', 'long.wav'), ('sub/resampled', 'sub/resampled.flac'), ('short', 'short.wav')]:
        with torch.inference_mode():
            want = frontend(torch.from_numpy(load_audio(recordings / src, 16000)))[0].numpy()
        got = np.load(tmp_path / 'lms' / f'{key}.npy')
        assert got.shape == want.shape and got.shape[:2] == (1, 80)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert sorted(p.name for p in (tmp_path / 'lms').rglob('.*')) == []

"""The log-mel front-end against an independent numpy computation, and load_audio on real files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d.audio import (PRESETS, AudioError, LogMelSpectrogram, audio_duration, load_audio, mel_filterbank, num_frames,
                       preset, stream_audio)

# ---------------------------------------------------------------------------------------------
# an independent front-end: numpy framing + rFFT + a loop-built Slaney filterbank


def slaney_mel(hz: float) -> float:
    """Slaney's Auditory Toolbox scale: linear to 1 kHz (3 bins per 200 Hz), then log (27 steps per ln 6.4)."""
    return hz / (200 / 3) if hz < 1000 else 15.0 + math.log(hz / 1000) * 27 / math.log(6.4)


def slaney_hz(mel: float) -> float:
    return mel * (200 / 3) if mel < 15.0 else 1000 * math.exp((mel - 15.0) * math.log(6.4) / 27)


def np_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    lo, hi = slaney_mel(fmin), slaney_mel(fmax)
    edges = [slaney_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        rise = (freqs - left) / (centre - left)
        fall = (right - freqs) / (right - centre)
        fb[m] = np.clip(np.minimum(rise, fall), 0, None) * 2.0 / (right - left)  # Slaney area normalization
    return fb


def np_log_mel(wav: np.ndarray, sr: int) -> np.ndarray:
    """``[samples]`` -> ``[80, 1 + samples // hop]`` in float64."""
    c = PRESETS[sr]
    pad = c.n_fft // 2
    x = np.pad(wav.astype(np.float64), pad, mode='reflect' if len(wav) > pad else 'constant')
    n = 1 + (len(x) - c.n_fft) // c.hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(c.win_length) / c.win_length)  # periodic Hann
    frames = np.stack([x[i * c.hop_length:i * c.hop_length + c.n_fft] * window for i in range(n)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = np_filterbank(sr, c.n_fft, c.n_mels, c.f_min, c.f_max) @ power.T
    return np.log(mel + 1.1920929e-07)


def test_presets_match_the_design():
    assert PRESETS[16000] == preset(16000)
    c16, c32 = preset(16000), preset(32000)
    assert (c16.n_fft, c16.win_length, c16.hop_length, c16.n_mels, c16.f_min, c16.f_max) == (400, 400, 160, 80, 50, 8000)
    assert (c32.n_fft, c32.win_length, c32.hop_length, c32.n_mels, c32.f_min, c32.f_max) == (800, 800, 320, 80, 50, 16000)
    with pytest.raises(ValueError, match='22050'):
        preset(22050)


def test_slaney_scale_fixed_points():
    assert slaney_mel(1000) == pytest.approx(15.0) and slaney_mel(50) == pytest.approx(0.75)
    assert slaney_hz(slaney_mel(4321.0)) == pytest.approx(4321.0)


@pytest.mark.parametrize('sr', [16000, 32000])
def test_mel_filterbank_matches_independent(sr):
    c = preset(sr)
    fb = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
    ref = np_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
    assert fb.shape == (80, c.n_fft // 2 + 1) and fb.dtype == np.float32
    assert np.abs(fb - ref).max() < 1e-6 * np.abs(ref).max() + 1e-9
    assert (fb.max(axis=1) > 0).all()  # no empty filter


@pytest.mark.parametrize('sr', [16000, 32000])
def test_log_mel_matches_independent(sr):
    rng = np.random.default_rng(0)
    t = np.arange(sr + 123) / sr
    wav = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    wav[: sr // 10] = 0.0  # a silent start: log(eps) region
    lms = LogMelSpectrogram(preset(sr))(torch.from_numpy(np.stack([wav, wav[::-1].copy()])))
    assert lms.shape == (2, 1, 80, num_frames(len(wav), preset(sr).hop_length))
    for b, w in enumerate([wav, wav[::-1]]):
        ref = np_log_mel(w, sr)
        assert np.abs(lms[b, 0].numpy() - ref).max() < 1e-3


@pytest.mark.parametrize('samples', [0, 1, 57, 159, 160, 199, 200, 201, 399, 400, 401, 1000, 16000, 16159])
def test_frame_count_and_values_for_many_lengths(samples):
    m = LogMelSpectrogram()
    wav = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
    lms = m(torch.from_numpy(wav)[None])
    assert lms.shape == (1, 1, 80, 1 + samples // 160) == (1, 1, 80, num_frames(samples, 160))
    assert torch.isfinite(lms).all()
    assert np.abs(lms[0, 0].numpy() - np_log_mel(wav, 16000)).max() < 1e-3


def test_one_dim_input_and_bad_shape():
    m = LogMelSpectrogram()
    assert m(torch.zeros(1600)).shape == (1, 1, 80, 11)
    with pytest.raises(ValueError, match='batch, samples'):
        m(torch.zeros(1, 1, 1600))


# ---------------------------------------------------------------------------------------------
# load_audio


def _sine(sr: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(sr * seconds)) / sr)


@pytest.mark.parametrize('suffix,subtype,tol', [('.wav', 'PCM_16', 1e-3), ('.flac', 'PCM_24', 1e-3), ('.ogg', 'VORBIS', 0.05)])
def test_load_audio_formats_stereo_resampled(tmp_path, suffix, subtype, tol):
    sr_in = 44100
    left = _sine(sr_in, 1.0)
    stereo = np.stack([left, -0.5 * left], axis=1)  # mono mix = 0.25 * left
    path = tmp_path / f'clip{suffix}'
    sf.write(path, stereo, sr_in, subtype=subtype)
    wav = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 16000) <= 1
    expect = 0.25 * _sine(16000, 1.0)
    mid = slice(800, 15200)  # away from the resampler's edges
    n = min(len(wav), len(expect))
    assert np.abs(wav[:n][mid] - expect[:n][mid]).max() < tol


def test_load_audio_same_rate_is_untouched(tmp_path):
    x = np.random.default_rng(1).uniform(-0.9, 0.9, 8000).astype(np.float32)
    sf.write(tmp_path / 'a.wav', x, 16000, subtype='FLOAT')
    assert np.array_equal(load_audio(tmp_path / 'a.wav', 16000), x)
    assert len(load_audio(tmp_path / 'a.wav', 32000)) == 16000


def _expect_error(path: Path, match: str):
    with pytest.raises(AudioError, match=match) as e:
        load_audio(path, 16000)
    assert str(path) in str(e.value)


def test_load_audio_errors_name_the_file(tmp_path):
    _expect_error(tmp_path / 'missing.wav', 'no such file')
    (tmp_path / 'empty.wav').write_bytes(b'')
    _expect_error(tmp_path / 'empty.wav', 'cannot read')
    (tmp_path / 'text.wav').write_text('this is not audio\n' * 20)
    _expect_error(tmp_path / 'text.wav', 'cannot read')
    (tmp_path / 'folder.wav').mkdir()
    _expect_error(tmp_path / 'folder.wav', 'not a file')
    sf.write(tmp_path / 'zero.wav', np.zeros((0, 1), dtype=np.float32), 16000)
    _expect_error(tmp_path / 'zero.wav', 'no audio samples')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_load_audio_non_finite_samples(tmp_path, bad):
    x = np.zeros(1600, dtype=np.float32)
    x[100] = bad
    sf.write(tmp_path / 'nan.wav', x, 16000, subtype='FLOAT')
    _expect_error(tmp_path / 'nan.wav', 'NaN or infinite')


@pytest.mark.parametrize('fmt,suffix', [('WAV', '.wav'), ('WAVEX', '.wav'), ('AIFF', '.aiff')])
def test_a_file_cut_short_is_an_error_not_a_shorter_clip(tmp_path, monkeypatch, fmt, suffix):
    from m2d import audio
    from m2d.audio import read_audio

    monkeypatch.setattr(audio, '_STREAM_BYTES', 1000)  # read_audio streams these small files

    whole = tmp_path / f'whole{suffix}'
    sf.write(whole, np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32), 16000, format=fmt,
             subtype='PCM_16')
    raw = whole.read_bytes()
    cut = tmp_path / f'cut{suffix}'
    cut.write_bytes(raw[:len(raw) // 2 + 1])
    assert 0 < sf.info(str(cut)).frames < 16000  # libsndfile itself reads it as a shorter clip
    for reader in (load_audio, read_audio):
        with pytest.raises(AudioError, match=f'{cut}: the file is truncated'):
            reader(cut, 16000)
    assert len(load_audio(whole, 16000)) == 16000
    (tmp_path / 'longer.wav').write_bytes(raw + b'\0' * 7)  # trailing bytes are not a truncation
    assert len(load_audio(tmp_path / 'longer.wav', 16000)) == 16000


def test_unknown_length_headers_pass(tmp_path):
    """A WAV written to a pipe declares 0xFFFFFFFF data bytes; libsndfile reads what is there."""
    path = tmp_path / 'piped.wav'
    sf.write(path, np.zeros(800, np.float32), 8000, subtype='PCM_16')
    raw = bytearray(path.read_bytes())
    at = raw.index(b'data') + 4
    raw[at:at + 4] = b'\xff\xff\xff\xff'
    path.write_bytes(bytes(raw))
    assert len(load_audio(path, 8000)) == 800


@pytest.mark.parametrize('sr_file, block', [(44100, 10_000), (16000, 777), (8000, 1 << 20)])
def test_stream_audio_equals_load_audio(tmp_path, sr_file, block):
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((sr_file * 3 + 123, 2))).astype(np.float32)
    path = tmp_path / 'long.wav'
    sf.write(path, stereo, sr_file, subtype='FLOAT')
    blocks = list(stream_audio(path, 16000, block_samples=block))
    whole = load_audio(path, 16000)
    streamed = np.concatenate(blocks)
    assert len(blocks) >= 2 or block >= stereo.shape[0]
    assert streamed.dtype == np.float32 and streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    assert audio_duration(path) == pytest.approx(stereo.shape[0] / sr_file)


def test_stream_audio_errors_name_the_file(tmp_path):
    empty = tmp_path / 'empty.wav'
    sf.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match='empty.wav: the file holds no audio'):
        list(stream_audio(empty))
    with pytest.raises(AudioError, match='missing.wav: no such file'):
        list(stream_audio(tmp_path / 'missing.wav'))
    junk = tmp_path / 'junk.wav'
    junk.write_bytes(b'not audio at all')
    with pytest.raises(AudioError, match='junk.wav: cannot read audio'):
        list(stream_audio(junk))

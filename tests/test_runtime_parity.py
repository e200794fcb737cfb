"""Parity with the reference implementation's goldens (../shared/fixtures/reference/*.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REFERENCE, need
from m2d import RuntimeM2D
from m2d.checkpoint import load_checkpoint

LMS_TOL, FEAT_TOL, BF16_COS = 1e-3, 2e-3, 0.9998  # bf16: measured min cosine 0.99993 (packed weights)


def max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    a = a.detach().float().numpy()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def cosine_per_step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope='module')
def base(m2d_base_ckpt):
    """(golden, float32 runtime, bfloat16 runtime) of the M2D ViT-Base fixture; the file is read once."""
    golden = np.load(need(REFERENCE / 'm2d_vit_base_16k.npz'))
    ckpt = load_checkpoint(m2d_base_ckpt)
    return golden, RuntimeM2D(checkpoint=ckpt), RuntimeM2D(checkpoint=ckpt, bf16=True)


@pytest.fixture(scope='module')
def speech(m2d_s_ckpt):
    golden = np.load(need(REFERENCE / 'm2d_s_vit_base_16k.npz'))
    ckpt = load_checkpoint(m2d_s_ckpt)
    return golden, RuntimeM2D(checkpoint=ckpt), RuntimeM2D(checkpoint=ckpt, bf16=True)


@pytest.fixture(scope='module')
def base_features(base):
    golden, rt, _ = base
    return rt.encode(torch.from_numpy(golden['wav']))


# ----- M2D ViT-Base 80x608p16x16 ------------------------------------------------------------


def test_base_geometry_and_norm_stats(base):
    _, rt, _ = base
    assert rt.cfg.input_size == (80, 608) and rt.cfg.patch_size == (16, 16) and rt.cfg.depth == 12
    assert rt.norm_stats.tolist() == pytest.approx([-7.8, 4.6])


def test_base_log_mel(base):
    g, rt, _ = base
    assert max_diff(rt.to_feature(torch.from_numpy(g['wav'])), g['lms']) <= LMS_TOL
    assert max_diff(rt.to_feature(torch.zeros(1, 16000)), g['lms_silence']) <= LMS_TOL


def test_base_features_and_scene(base, base_features):
    g, rt, _ = base
    assert max_diff(base_features, g['features']) <= FEAT_TOL
    assert max_diff(base_features.mean(1), g['scene']) <= FEAT_TOL


def test_base_short_input(base):
    g, rt, _ = base
    x = rt.encode(torch.from_numpy(g['wav_short'])[None])
    assert max_diff(x, g['features_short']) <= FEAT_TOL


def test_base_per_layer(base):
    g, rt, _ = base
    layers = rt.encode_lms(torch.from_numpy(g['lms_900']), return_layers=True)
    assert len(layers) == 12
    for i in (0, 6, 11):
        assert max_diff(layers[i][0], g[f'layer{i}']) <= FEAT_TOL, f'layer {i}'


def test_base_bf16_close_to_float32(base, base_features):
    g, _, rt16 = base
    x16 = rt16.encode(torch.from_numpy(g['wav'][:1]))  # one clip keeps the test short
    assert x16.dtype == torch.float32 and x16.shape == base_features[:1].shape
    assert cosine_per_step(x16, base_features[:1]).min() >= BF16_COS


def test_base_timestamps(base):
    g, rt, _ = base
    wav = torch.from_numpy(g['wav'][:, :32000])  # 2 s: 201 frames -> 13 steps of 160 ms
    emb, ts = rt.get_timestamp_embeddings(wav)
    assert emb.shape == (2, 13, 3840) and ts.shape == (2, 13)
    assert torch.allclose(emb, rt.encode(wav))
    steps = ts[0, 1:] - ts[0, :-1]
    assert (steps > 0).all() and torch.allclose(steps, torch.full_like(steps, 160.0))  # 16 frames of 10 ms
    assert 0 <= ts[0, 0] < 160 and ts[0, -1] < 2_000 + 160
    assert torch.equal(ts[0], ts[1])


# ----- M2D-S ViT-Base 80x608p80x2 -----------------------------------------------------------


@pytest.fixture(scope='module')
def speech_layers(speech):
    g, rt, _ = speech
    return rt.encode(torch.from_numpy(g['wav']), return_layers=True)


def test_speech_features_and_layer5(speech, speech_layers):
    g, rt, _ = speech
    assert rt.cfg.patch_size == (80, 2) and rt.feature_d == 768 and rt.frame_rate == 50
    assert len(speech_layers) == int(g['n_layers']) == 12
    assert max_diff(speech_layers[-1], g['features']) <= FEAT_TOL
    assert max_diff(speech_layers[5][0], g['layer5']) <= FEAT_TOL


def test_speech_bf16_and_timestamps(speech, speech_layers):
    g, rt, rt16 = speech
    wav = torch.from_numpy(g['wav'])
    assert cosine_per_step(rt16.encode(wav[:1]), speech_layers[-1][:1]).min() >= BF16_COS
    emb, ts = rt.get_timestamp_embeddings(wav[:1, :48000])
    assert emb.shape == (1, 151, 768) and ts.shape == (1, 151)
    assert torch.allclose(ts[0, 1:] - ts[0, :-1], torch.full((150,), 20.0))  # 50 Hz

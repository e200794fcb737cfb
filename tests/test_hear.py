"""The HEAR API: the default model by name, embeddings, and the finer timestamp grid."""

import math

import pytest
import torch

import m2d.hear as hear
from m2d import hub
from m2d.errors import M2DError
from conftest import write_small_checkpoint


def test_hear_api(small_ckpt):
    model = hear.load_model(str(small_ckpt))
    assert model.sample_rate == 16000 and model.scene_embedding_size == 320
    assert model.timestamp_hop_ms == pytest.approx(160.0)
    audio = torch.rand(3, 24000) * 2 - 1
    scene = hear.get_scene_embeddings(audio, model)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (3, 320) and emb.shape[:2] == ts.shape and emb.shape[0] == 3
    torch.testing.assert_close(scene, emb.mean(1))
    step = 16 * 160 / 16000 * 1000
    torch.testing.assert_close(ts[0], (torch.arange(emb.shape[1]) + 0.5) * step)


def test_load_model_without_a_path_loads_the_default_release(tmp_path, monkeypatch):
    """HEAR calls load_model() with no argument: the default released model, here a stand-in in the cache."""
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(hub, 'fetch_url', lambda *a, **k: pytest.fail('no network in tests'))
    weights = write_small_checkpoint(tmp_path / 'cache', name=hear.DEFAULT_MODEL, embed_dim=64, depth=1)
    assert hub.is_released_name(hear.DEFAULT_MODEL)
    for model in (hear.load_model(), hear.load_model('')):
        assert model.weight_file == str(weights)
        assert model.scene_embedding_size == 64 * 5 and model.cfg.input_size == (80, 608)


def _counting_encode(model, monkeypatch) -> list[int]:
    calls = []
    original = model.encode_lms

    def encode_lms(lms, *args, **kwargs):
        calls.append(lms.shape[-1])
        return original(lms, *args, **kwargs)

    monkeypatch.setattr(model, 'encode_lms', encode_lms)
    return calls


def test_fine_timestamps_interleave_encoder_outputs_on_shifted_inputs(small_ckpt, monkeypatch):
    torch.manual_seed(0)
    audio = torch.rand(2, 20800) * 2 - 1  # 131 log-mel frames
    model = hear.load_model(str(small_ckpt), timestamp_hop_ms=40)
    coarse, coarse_ts = hear.get_timestamp_embeddings(audio, hear.load_model(str(small_ckpt)))
    calls = _counting_encode(model, monkeypatch)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert len(calls) == 4  # 160 ms patches / 40 ms: four shifted passes (the cost in the docstring)
    n_frames, d, pw = 1 + 20800 // 160, 4, 16
    assert emb.shape == (2, math.ceil(n_frames / d), 320) and ts.shape == emb.shape[:2]
    torch.testing.assert_close(ts[0].diff(), torch.full((emb.shape[1] - 1,), 40.0))
    assert ts[0, 0].item() == pytest.approx(80.0)  # centre of the first 160-ms window
    # Each output n: the encoder's output for the window starting at frame n*d, on the input shifted to it.
    lms = model.normalize_batch(model.to_feature(audio))
    with torch.no_grad():
        shifted = {o: hear.RuntimeM2D.encode_lms(model, lms[..., o:]) for o in range(0, pw, d)}  # not counted
    for n in range(emb.shape[1]):
        start = n * d
        torch.testing.assert_close(emb[:, n], shifted[start % pw][:, start // pw], atol=1e-6, rtol=1e-6)
    # Every 4th output is the plain one (no shift), with the same timestamp: nothing is interpolated.
    torch.testing.assert_close(emb[:, ::4], coarse)
    torch.testing.assert_close(ts[:, ::4], coarse_ts)
    assert not torch.allclose(emb[:, 1], (emb[:, 0] + emb[:, 4]) / 2, atol=1e-3)


def test_hop_costs_and_errors(small_ckpt, monkeypatch):
    audio = torch.rand(1, 16000) * 2 - 1
    model = hear.load_model(str(small_ckpt), timestamp_hop_ms=50)
    calls = _counting_encode(model, monkeypatch)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert len(calls) == 16  # 5 frames is prime to 16: every shift is needed
    torch.testing.assert_close(ts[0].diff(), torch.full((emb.shape[1] - 1,), 50.0))
    coarse = hear.load_model(str(small_ckpt), timestamp_hop_ms=320)  # coarser than a patch: one pass, subsampled
    emb2, ts2 = hear.get_timestamp_embeddings(audio, coarse)
    emb1, _ = hear.get_timestamp_embeddings(audio, hear.load_model(str(small_ckpt)))
    torch.testing.assert_close(emb2, emb1[:, ::2])
    for bad in (45, 0, -40):
        with pytest.raises(M2DError, match='timestamp_hop_ms'):
            hear.load_model(str(small_ckpt), timestamp_hop_ms=bad)


def test_hear_validator_accepts_the_module(small_ckpt, monkeypatch):
    """With hearvalidator installed: the module passes the validator, at 40 ms without its 50-ms warning."""
    validate = pytest.importorskip('hearvalidator.validate')
    import warnings

    validate.ValidateModel('m2d.hear', str(small_ckpt), device='cpu')()
    monkeypatch.setenv(hear.HOP_ENV, '40')
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='We suggest a interval')
        validate.ValidateModel('m2d.hear', str(small_ckpt), device='cpu')()


def test_hop_from_the_environment(small_ckpt, monkeypatch):
    monkeypatch.setenv(hear.HOP_ENV, '80')
    assert hear.load_model(str(small_ckpt)).timestamp_hop_ms == 80.0
    assert hear.load_model(str(small_ckpt), timestamp_hop_ms=40).timestamp_hop_ms == 40.0

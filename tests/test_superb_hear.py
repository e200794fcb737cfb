"""SUPERB upstream, its installer, and the HEAR API wrappers."""

import json

import pytest
import torch

import m2d
import m2d.hear as hear
from m2d.superb import CalcNormExpert, UpstreamExpert, parse_ckpt_arg
from m2d.superb.install import HUB_LINE, install


def test_parse_ckpt_arg():
    assert parse_ckpt_arg('a/b.pth') == ('a/b.pth', None)
    assert parse_ckpt_arg('a/b.pth,-10.5,4.25') == ('a/b.pth', (-10.5, 4.25))
    with pytest.raises(ValueError, match='MEAN and STD'):
        parse_ckpt_arg('a.pth,x,1')
    with pytest.raises(ValueError, match='PATH,MEAN,STD'):
        parse_ckpt_arg('a.pth,1')


def test_upstream_layers_and_task_stats(small_ckpt):
    torch.manual_seed(0)
    wavs = [torch.rand(16000) * 2 - 1, torch.rand(12000) * 2 - 1]
    up = UpstreamExpert(f'{small_ckpt},-10.0,5.0')
    assert up.get_downsample_rates('hidden_states') == 160 * 16
    with torch.no_grad():
        out = up(wavs)
    assert len(out['hidden_states']) == 2 and torch.equal(out['hidden_states'][-1], out['last_hidden_state'])
    # Same as padding by hand, normalizing with the task statistics and encoding.
    rt = m2d.RuntimeM2D(small_ckpt)
    padded = torch.stack([wavs[0], torch.nn.functional.pad(wavs[1], (0, 4000))])
    with torch.no_grad():
        expected = rt.encode_lms((rt.to_feature(padded) + 10.0) / 5.0)
    assert out['last_hidden_state'].shape == (2, 101 // 16 + 1, 5 * 64)
    torch.testing.assert_close(out['last_hidden_state'], expected, atol=1e-5, rtol=1e-5)


def test_calcnorm_stops_with_stats(small_ckpt, tmp_path):
    wav = torch.rand(8000) * 2 - 1
    stats_file = tmp_path / 'stats.json'
    up = CalcNormExpert(str(small_ckpt), max_updates=2, stats_file=str(stats_file))
    with torch.no_grad():
        up([wav])
        with pytest.raises(SystemExit):
            up([wav])
    lms = m2d.RuntimeM2D(small_ckpt).to_feature(wav[None]).double()
    stats = json.loads(stats_file.read_text())
    assert stats['mean'] == pytest.approx(lms.mean().item(), rel=1e-6)
    assert stats['std'] == pytest.approx(lms.std(unbiased=False).item(), rel=1e-4)


def test_installer_writes_upstream_once(tmp_path):
    hub = tmp_path / 's3prl' / 'hub.py'
    hub.parent.mkdir()
    hub.write_text('from s3prl.upstream.wav2vec2.hubconf import *\n')
    up = install(tmp_path)
    install(tmp_path)  # idempotent
    assert (up / 'hubconf.py').read_text().count('def m2d(') == 1
    assert hub.read_text().count(HUB_LINE) == 1
    with pytest.raises(FileNotFoundError, match='hub.py'):
        install(tmp_path / 'nowhere')


def test_hear_api(small_ckpt):
    model = hear.load_model(str(small_ckpt))
    assert model.sample_rate == 16000 and model.scene_embedding_size == 320
    audio = torch.rand(3, 24000) * 2 - 1
    scene = hear.get_scene_embeddings(audio, model)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert scene.shape == (3, 320) and emb.shape[:2] == ts.shape and emb.shape[0] == 3
    torch.testing.assert_close(scene, emb.mean(1))
    step = 16 * 160 / 16000 * 1000
    torch.testing.assert_close(ts[0], (torch.arange(emb.shape[1]) + 0.5) * step)
    with pytest.raises(ValueError, match='model_file_path'):
        hear.load_model('')


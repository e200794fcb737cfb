"""SUPERB upstream experts: outputs, task statistics, the calcnorm statistic and the one-line messages."""

import json
import logging

import pytest
import torch

import m2d
from m2d.errors import M2DError
from m2d.superb import CalcNormExpert, SuperbError, UpstreamExpert, parse_ckpt_arg
from m2d.superb.stats import Moments, padded_lms


def test_parse_ckpt_arg():
    assert parse_ckpt_arg('a/b.pth') == ('a/b.pth', None)
    assert parse_ckpt_arg('a/b.pth,-10.5,4.25') == ('a/b.pth', (-10.5, 4.25))
    assert parse_ckpt_arg('a/b.pth, -10.5 , 4.25') == ('a/b.pth', (-10.5, 4.25))
    with pytest.raises(SuperbError, match='CKPT,MEAN,STD.*expected MEAN,STD'):
        parse_ckpt_arg('a.pth,x,1')
    with pytest.raises(SuperbError, match=r'CKPT,MEAN,STD.*got 2 comma-separated parts'):
        parse_ckpt_arg('a.pth,1')
    with pytest.raises(SuperbError, match='STD > 0'):
        parse_ckpt_arg('a.pth,4.3,-11.5')  # swapped
    with pytest.raises(M2DError):  # the CLI prints it in one line
        parse_ckpt_arg(',1,2')
    with pytest.raises(SuperbError, match='no M2D weight file given'):
        parse_ckpt_arg(None)  # s3prl passes ckpt=None when -k is missing


def test_upstream_layers_and_task_stats(small_ckpt, caplog):
    torch.manual_seed(0)
    wavs = [torch.rand(16000) * 2 - 1, torch.rand(12000) * 2 - 1]
    with caplog.at_level(logging.INFO, logger='m2d.superb'):
        up = UpstreamExpert(f'{small_ckpt},-10.0,5.0')
    in_use = [r.getMessage() for r in caplog.records if 'from -k' in r.getMessage()]
    assert len(in_use) == 1 and 'mean=-10.0 std=5.0' in in_use[0]  # the statistics applied, not the checkpoint's
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


def test_upstream_says_each_problem_once(small_ckpt, caplog):
    import soxr

    up = UpstreamExpert(f'{small_ckpt},-10.0,5.0')
    torch.manual_seed(0)
    speech_like = torch.randn(8000) * 0.1
    band_limited = torch.from_numpy(soxr.resample(speech_like.numpy(), 8000, 16000))  # 8 kHz audio upsampled
    with caplog.at_level(logging.INFO, logger='m2d.superb'), torch.no_grad():
        up([torch.randn(16000) * 0.1, torch.randn(16000) * 0.1])  # equal lengths, full band: nothing
        assert not [r for r in caplog.records if 'padded' in r.getMessage() or '4 kHz' in r.getMessage()]
        for _ in range(3):
            up([band_limited, band_limited[:9000]])
    padded = [r for r in caplog.records if 'zero-padded' in r.getMessage()]
    band = [r for r in caplog.records if 'no energy above 4 kHz' in r.getMessage()]
    assert len(padded) == 1 and '9000 to 16000 samples' in padded[0].getMessage()
    assert len(band) == 1 and band[0].levelno == logging.WARNING


def test_upstream_rejects_a_32k_model(tmp_path):
    from conftest import write_small_checkpoint

    ckpt = write_small_checkpoint(tmp_path, name='m2d_as_vit_tiny-80x208p16x16p32k-240101')
    with pytest.raises(SuperbError, match='32000 Hz'):
        UpstreamExpert(f'{ckpt},-10,5')


def test_calcnorm_is_the_padded_batch_statistic(small_ckpt, tmp_path):
    """m2d_calcnorm pools every value of each zero-padded batch (the statistic of m2d superb stats)."""
    torch.manual_seed(1)
    batches = [[torch.rand(8000) * 2 - 1, torch.rand(5000) * 0.2 - 0.1], [torch.rand(3000) - 0.5]]
    stats_file = tmp_path / 'stats.json'
    up = CalcNormExpert(str(small_ckpt), max_updates=2, stats_file=str(stats_file))
    with torch.no_grad():
        up(batches[0])
        with pytest.raises(SystemExit):
            up(batches[1])
    rt = m2d.RuntimeM2D(small_ckpt)
    values = torch.cat([padded_lms(b, rt.to_feature).reshape(-1) for b in batches]).double().numpy()
    assert values.size == 80 * (1 + 8000 // 160) * 2 + 80 * (1 + 3000 // 160)
    stats = json.loads(stats_file.read_text())
    assert stats['mean'] == pytest.approx(values.mean(), rel=1e-12)
    assert stats['std'] == pytest.approx(values.std(), rel=1e-10)
    # The padding counts: the statistic of the unpadded waveforms differs.
    unpadded = torch.cat([rt.to_feature(w[None]).reshape(-1) for b in batches for w in b]).double()
    assert abs(unpadded.mean().item() - stats['mean']) > 0.1


def test_moments_merge_matches_numpy():
    rng = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=rng) * 3 - 11 for n in (5, 1, 1000, 37)]
    m = Moments()
    for p in parts:
        m.merge(Moments.of(p))
    allv = torch.cat(parts).double().numpy()
    assert m.count == allv.size
    assert m.mean == pytest.approx(allv.mean(), rel=1e-13) and m.std == pytest.approx(allv.std(), rel=1e-12)

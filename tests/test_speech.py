"""Speech + teacher datasets (crop alignment, per-patch averaging, noise mixing), the speech
training-set builder, and end-to-end M2D-S / M2D-X training on FSDD (tiny models, CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FSDD, need

from m2d.audio import PRESETS, LogMelSpectrogram, load_audio
from m2d.data.datasets import LMSDataset, NoiseMixDataset, log_mix_exp
from m2d.data.filelist import write_filelist
from m2d.data.speech import SpeechTeacherDataset, build_speech_dataset

D = 6


def write_synthetic(folder: Path, n_files: int = 3, lms_frames: int = 701, teacher_frames: int = 349,
                    valid: int = 300) -> Path:
    """.npz files whose LMS frame t holds the value t and teacher frame k holds k (+ file offset)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lms = np.broadcast_to(np.arange(lms_frames, dtype=np.float32), (1, 80, lms_frames)) + 1000 * i
        emb = np.broadcast_to(np.arange(teacher_frames, dtype=np.float32)[:, None], (1, teacher_frames, D)) + 1000 * i
        np.savez(folder / f'f{i}.npz', lms, emb, np.int64(valid))
    return write_filelist(folder, names=[f'f{i}.npz' for i in range(n_files)])


@pytest.mark.parametrize('patch_width', [2, 4, 8])
def test_crop_alignment_synthetic(tmp_path, patch_width):
    csv_path = write_synthetic(tmp_path / 'syn')
    ds = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=patch_width, norm_stats=(0.0, 1.0))
    assert len(ds) == 3
    starts = set()
    for _ in range(40):
        item = ds[1]
        x, y = item['x'], item['target_offline']
        assert x.shape == (1, 80, 208) and y.shape == (208 // patch_width, D)
        assert torch.equal(item['clean'], x)  # no noise
        first = int(x[0, 0, 0]) - 1000
        assert first % 2 == 0  # crops start at even LMS frames
        k = first // 2  # teacher frame of the crop start
        starts.add(k)
        assert 0 <= k <= 300 - 104  # within the valid teacher frames
        assert torch.equal(x[0, 0], torch.arange(208.0) + 2 * k + 1000)
        # each patch target = mean of the teacher frames under its LMS frames (2 LMS frames each)
        per = patch_width // 2
        expect = (torch.arange(104.0) + k + 1000).reshape(-1, per).mean(1)
        assert torch.allclose(y[:, 0], expect)
        lms_patch_mean = x[0, 0].reshape(-1, patch_width).mean(1)
        assert torch.allclose(y[:, 0], (lms_patch_mean - 1000 - 0.5) / 2 + 1000)
    assert len(starts) > 5


def test_crop_short_valid_and_not_random(tmp_path):
    # valid shorter than a crop: the crop uses the first 104 teacher frames (as the reference)
    csv_path = write_synthetic(tmp_path / 'syn', valid=40)
    ds = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=4, norm_stats=(0.0, 1.0))
    assert all(int(ds[0]['x'][0, 0, 0]) == 0 for _ in range(10))
    csv_path = write_synthetic(tmp_path / 'syn2', valid=300)
    ds = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=4, norm_stats=(0.0, 1.0), random_crop=False)
    assert all(int(ds[2]['x'][0, 0, 0]) == 2000 for _ in range(5))
    # a file shorter than the crop: LMS zero-padded, last teacher frame repeated
    csv_path = write_synthetic(tmp_path / 'syn3', n_files=1, lms_frames=100, teacher_frames=49, valid=49)
    item = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=4, norm_stats=(0.0, 1.0))[0]
    assert torch.equal(item['x'][0, 0, 100:], torch.zeros(108))
    assert torch.equal(item['target_offline'][-1], torch.full((D,), 48.0))


def test_bad_arguments(tmp_path):
    csv_path = write_synthetic(tmp_path / 'syn', n_files=1)
    with pytest.raises(ValueError, match='patch_width=3'):
        SpeechTeacherDataset(csv_path, patch_width=3, norm_stats=(0, 1))
    with pytest.raises(ValueError, match='crop_frames=210'):
        SpeechTeacherDataset(csv_path, crop_frames=210, patch_width=4, norm_stats=(0, 1))
    bad = tmp_path / 'bad.npz'
    bad.write_text('nope')
    with pytest.raises(OSError, match='bad.npz'):
        SpeechTeacherDataset([bad], norm_stats=(0, 1))[0]
    ns = argparse.Namespace(csv_main=str(csv_path), data_path=None, input_size='80x208', patch_size='80x4',
                            norm_stats=None, csv_bg_noise='', noise_ratio=0.2, min_ds_size=0, teacher='')
    with pytest.raises(ValueError, match='csv_bg_noise'):
        build_speech_dataset(ns)
    ns.noise_ratio, ns.teacher, ns.model = 0.0, 'w.pth', 'm2d_s_vit_base'
    with pytest.raises(ValueError, match='m2d_x'):
        build_speech_dataset(ns)


def test_norm_stats_and_min_ds_size(tmp_path):
    csv_path = write_synthetic(tmp_path / 'syn', n_files=2)
    ds = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=4, min_ds_size=50, n_norm_samples=200)
    assert len(ds) == 50 and ds.original_size == 2
    # values are frame indices (+0 or +1000): the mean lies between the two files' crop means
    assert 100 < ds.norm_stats[0] < 1400 and ds.norm_stats[1] > 400
    again = SpeechTeacherDataset(csv_path, crop_frames=208, patch_width=4, min_ds_size=50, n_norm_samples=200)
    assert again.norm_stats == ds.norm_stats  # seeded
    item = ds[0]
    mean, std = ds.norm_stats
    raw = item['x'] * std + mean
    assert torch.allclose(raw[0, 0] - raw[0, 0, 0], torch.arange(208.0), atol=1e-3)


# ----- with real files: FSDD speech, a tiny random HuBERT teacher, FSDD noise ---------------------

@pytest.fixture(scope='module')
def fsdd_speech(tmp_path_factory) -> dict:
    """Teacher .npz for 60 FSDD files (speakers george, jackson...) and LMS .npy of 30 other files as noise."""
    from test_teacher import tiny_hubert

    from m2d.data.teacher_features import extract_teacher_features

    need(FSDD)
    root = tmp_path_factory.mktemp('speech_data')
    wavs = sorted(FSDD.glob('*.wav'))
    speech, noise = wavs[::40][:60], wavs[7::97][:30]
    src = root / 'src'
    src.mkdir()
    for f in speech:
        (src / f.name).write_bytes(f.read_bytes())
    s = extract_teacher_features(src, root / 'fsdd_hubert', tiny_hubert(), layers=(2,), min_seconds=2.2,
                                 batch_size=16, progress=False)
    assert s.written == 60 and not s.failed
    to_lms = LogMelSpectrogram(PRESETS[16000])
    (root / 'noise_lms').mkdir()
    for f in noise:
        np.save(root / 'noise_lms' / f.with_suffix('.npy').name, to_lms(torch.from_numpy(load_audio(f)))[0].numpy())
    (root / 'speech_lms').mkdir()  # plain LMS of the speech files, for M2D-X
    for f in speech:
        np.save(root / 'speech_lms' / f.with_suffix('.npy').name, to_lms(torch.from_numpy(load_audio(f)))[0].numpy())
    return {'root': root, 'speech_csv': s.files_csv, 'noise_csv': write_filelist(root / 'noise_lms'),
            'lms_csv': write_filelist(root / 'speech_lms')}


def test_fsdd_crop_matches_manual_slicing(fsdd_speech):
    ds = SpeechTeacherDataset(fsdd_speech['speech_csv'], crop_frames=208, patch_width=4, norm_stats=(-10.0, 4.0))
    assert ds.data_root == fsdd_speech['root']  # guessed from DEST/files.csv
    for i in (0, 17, 59):
        lms, emb, valid = ds.load(i)
        z = np.load(ds.path(i))
        assert lms.shape == (1, 80, 1 + 35200 // 160) and emb.shape == (109, 32) and valid == int(z['arr_2'])
        for k in (0, 3):
            x, y = ds.crop(lms, emb, valid, start=k)
            assert torch.equal(x, torch.from_numpy(z['arr_0'][..., 2 * k:2 * k + 208]))
            manual = torch.from_numpy(z['arr_1'][0, k:k + 104]).reshape(52, 2, 32).mean(1)
            assert torch.allclose(y, manual)
        item = ds[i]
        assert item['target_offline'].shape == (52, 32)
        assert torch.allclose(item['clean'] * 4.0 - 10.0, torch.from_numpy(z['arr_0'][..., :208]), atol=1e-4) or \
            valid > 104  # a random crop can start later only when the valid part is longer than a crop


def test_fsdd_noise_mixing(fsdd_speech):
    noise = LMSDataset(fsdd_speech['noise_csv'], crop_frames=208, random_crop=False, repeat_short=True)
    ds = SpeechTeacherDataset(fsdd_speech['speech_csv'], crop_frames=208, patch_width=4, norm_stats=(-10.0, 4.0),
                              random_crop=False, noise=noise, noise_ratio=0.2, noise_norm_stats=(-12.0, 3.0))
    torch.manual_seed(3)
    item = ds[5]
    torch.manual_seed(3)
    j = int(torch.randint(0, len(noise), (1,)))
    n = noise.raw_item(j)
    clean_raw = torch.from_numpy(np.load(ds.path(5))['arr_0'][..., :208])
    expect = log_mix_exp(n + 12.0, clean_raw + 10.0, 0.2) / 4.0
    assert torch.allclose(item['x'], expect, atol=1e-5)
    assert torch.allclose(item['clean'], (clean_raw + 10.0) / 4.0, atol=1e-5)
    assert not torch.allclose(item['x'], item['clean'], atol=0.1)
    # the mixture is at least the louder of the two, scaled, in the power domain
    assert (item['x'] * 4.0 >= torch.log(0.8 * torch.exp(clean_raw + 10.0)) - 1e-4).all()
    # per-item noise draws: the same RNG state gives the same item
    torch.manual_seed(3)
    assert torch.equal(ds[5]['x'], item['x'])


def test_build_speech_dataset(fsdd_speech):
    from torch.utils.data import DataLoader

    root = fsdd_speech['root']
    ns = argparse.Namespace(csv_main=str(fsdd_speech['speech_csv']), data_path=str(root), input_size=[80, 208],
                            patch_size='80x4', norm_stats=None, csv_bg_noise=str(fsdd_speech['noise_csv']),
                            noise_ratio=0.2, min_ds_size=100, teacher='', norm_stats_samples=200,
                            model='m2d_s_vit_base')
    ds = build_speech_dataset(ns)
    assert isinstance(ds, SpeechTeacherDataset) and len(ds) == 100
    assert ds.noise is not None and -16 < ds.norm_stats[0] < 0 and ds.noise_norm_stats is not None
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch['x'].shape == (4, 1, 80, 208) and batch['target_offline'].shape == (4, 52, 32)
    # M2D-X: plain LMS files, items {'x', 'clean'} for the runtime teacher
    ns.csv_main, ns.teacher, ns.model, ns.norm_stats = str(fsdd_speech['lms_csv']), 'teacher.pth', 'm2d_x_vit_base', '-9,4'
    dx = build_speech_dataset(ns)
    assert isinstance(dx, NoiseMixDataset) and dx.norm_stats == (-9.0, 4.0) and len(dx) == 100
    item = dx[0]
    assert set(item) == {'x', 'clean'} and item['x'].shape == (1, 80, 208)


# ----- end to end ---------------------------------------------------------------------------------

TINY = ['--model', 'm2d_s_vit_tiny', '--depth', '2', '--decoder_depth', '1', '--decoder_embed_dim', '64',
        '--decoder_num_heads', '2', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
        '--log_every', '1', '--feature_eval_freq', '0', '--min_ds_size', '0', '--norm_stats_samples', '500']


def read_log(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / 'log.jsonl').read_text().splitlines()) if r.get('type') == 'train']


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is ~4x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_e2e_m2d_s_then_m2d_x(fsdd_speech, tmp_path, one_thread):
    pytest.importorskip('m2d.train.loop')
    from test_teacher import write_small_m2d

    from m2d.checkpoint import read_state_dict
    from m2d.cli import main
    from m2d.runtime import RuntimeM2D

    root = fsdd_speech['root']
    run = tmp_path / 'runs' / 'm2d_s_vit_tiny-80x208p80x4-test'
    rc = main(['pretrain-speech', *TINY, '--csv_main', str(fsdd_speech['speech_csv']), '--data_path', str(root),
               '--csv_bg_noise', str(fsdd_speech['noise_csv']), '--epochs', '30', '--max_steps', '200',
               '--lr', '1e-3', '--warmup_epochs', '1', '--output_dir', str(run), '--save_freq', '100'])
    assert rc == 0
    log = read_log(run)
    assert len(log) == 200 and all(np.isfinite(r['loss_offline']) for r in log)
    first = np.mean([r['loss_offline'] for r in log[:20]])
    last = np.mean([r['loss_offline'] for r in log[-20:]])
    # measured 1.59 -> 1.33 (seeds 0 and 1, lr 1e-3 and 3e-3: ratios 0.84-0.88); the random teacher's
    # features are only partly predictable from the LMS, so the loss plateaus there
    assert last < 0.93 * first, (first, last)
    ckpt = sorted(run.glob('checkpoint-*.pth'))[-1]
    sd, _ = read_state_dict(ckpt)
    assert sd['offline_predictor.weight'].shape == (32, 192)
    rt = RuntimeM2D(ckpt)
    assert rt.cfg.patch_size == (80, 4) and rt.norm_stats[0] < 0
    wav = torch.from_numpy(load_audio(sorted(FSDD.glob('*.wav'))[3]))[None]
    feats = rt.encode(wav)
    assert feats.shape == (1, (1 + wav.shape[1] // 160 + 3) // 4, 192) and torch.isfinite(feats).all()

    # M2D-X: a small M2D teacher (80x2 patches, 32-d: as wide as the HuBERT features above) and
    # --init from the full M2D-S checkpoint just written (all keys load strictly)
    teacher = write_small_m2d(tmp_path / 'teacher', patch=(80, 2), dim=32)
    run_x = tmp_path / 'runs' / 'm2d_x'
    rc = main(['pretrain-speech', *TINY, '--model', 'm2d_x_vit_tiny', '--teacher', str(teacher), '--init', str(ckpt),
               '--csv_main', str(fsdd_speech['lms_csv']), '--data_path', str(root),
               '--csv_bg_noise', str(fsdd_speech['noise_csv']), '--epochs', '1', '--max_steps', '5',
               '--lr', '1e-4', '--output_dir', str(run_x)])
    assert rc == 0
    log_x = read_log(run_x)
    assert len(log_x) == 5 and all(np.isfinite(r['loss_offline']) for r in log_x)
    ckpt_x = sorted(run_x.glob('checkpoint-*.pth'))[-1]
    sd_x, _ = read_state_dict(ckpt_x)
    assert set(sd_x) == set(sd)
    # started from the M2D-S weights: 5 small steps move them little (a fresh init differs by ~0.1)
    for k in ('patch_embed.proj.weight', 'decoder_pred.weight', 'offline_predictor.weight'):
        assert (sd_x[k] - sd[k]).abs().max() < 0.02, k
    assert not torch.equal(sd_x['offline_predictor.weight'], sd['offline_predictor.weight'])
    assert RuntimeM2D(ckpt_x).encode(wav).shape == feats.shape

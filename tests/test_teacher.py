"""Teacher features for M2D-S (tiny random HuBERT, no downloads) and the M2D-X runtime teacher."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from conftest import FSDD, need

transformers = pytest.importorskip('transformers')

from m2d.audio import PRESETS, LogMelSpectrogram, load_audio  # noqa: E402
from m2d.data.teacher_features import (extract_teacher_features, load_hubert, normalize_wav,  # noqa: E402
                                       teacher_features)
from m2d.teacher import match_frames, runtime_teacher  # noqa: E402

SR = 16000
MIN_SAMPLES = 7 * SR
HUBERT_FRAMES_7S = 349  # HuBERT's conv stack (total stride 320, receptive field 400) on 112000 samples


def tiny_hubert(hidden: int = 32, layers: int = 3, seed: int = 0):
    """A randomly initialized HubertModel with HuBERT-base's conv geometry (50 Hz) and tiny widths."""
    torch.manual_seed(seed)
    cfg = transformers.HubertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=2 * hidden, conv_dim=(16,) * 7,
                                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return transformers.HubertModel(cfg).eval()


@pytest.fixture(scope='module')
def hubert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('hubert')
    tiny_hubert().save_pretrained(d)
    return d


@pytest.fixture(scope='module')
def speech_src(tmp_path_factory) -> Path:
    """10 FSDD files in two sub-folders, plus one 8-s clip (longer than min_seconds)."""
    need(FSDD)
    src = tmp_path_factory.mktemp('speech_src')
    files = sorted(FSDD.glob('*.wav'))[:10]
    for i, f in enumerate(files):
        sub = src / ('a' if i < 5 else 'b')
        sub.mkdir(exist_ok=True)
        (sub / f.name).write_bytes(f.read_bytes())
    long = np.concatenate([load_audio(f, SR) for f in sorted(FSDD.glob('*.wav'))[:40]])[:8 * SR]
    assert len(long) == 8 * SR
    sf.write(src / 'long.wav', long, SR)
    return src


def reference_features(model, wav: np.ndarray, layer: int) -> tuple[np.ndarray, int]:
    """One file alone, done by hand: pad to 7 s, zero-mean unit-variance, hidden_states[layer]."""
    x = torch.from_numpy(wav)
    x = F.pad(x, (0, max(0, MIN_SAMPLES - len(x))))
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        h = model(x[None], output_hidden_states=True).hidden_states[layer][0].numpy()
    return h, h.shape[0] * len(wav) // len(x)


def test_load_hubert_from_folder(hubert_dir):
    m = load_hubert(hubert_dir)
    assert not m.training
    assert all(not p.requires_grad for p in m.parameters())
    ref = tiny_hubert()
    x = torch.randn(1, SR)
    with torch.no_grad():
        assert torch.allclose(m(x).last_hidden_state, ref(x).last_hidden_state, atol=1e-6)


def test_load_hubert_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)
    with pytest.raises(ImportError, match=r'm2d\[speech\]'):
        load_hubert('facebook/hubert-base-ls960')


def test_load_hubert_bad_path(tmp_path):
    with pytest.raises(OSError, match='empty_folder'):
        load_hubert(tmp_path / 'empty_folder')


def test_teacher_features_shapes_and_lengths():
    model = tiny_hubert()
    wavs = [np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 20000, 130000)]
    feats, valid = teacher_features(model, wavs, layers=(1, 3), min_samples=MIN_SAMPLES)
    assert feats.shape == (3, 406, 64)  # padded to the longest (130000 samples -> 406 frames), 2 layers x 32
    assert valid.tolist() == [HUBERT_FRAMES_7S * 8000 // MIN_SAMPLES, HUBERT_FRAMES_7S * 20000 // MIN_SAMPLES, 406]
    # layer choice: index 0 is the CNN output (projected), 3 the last block
    f0, _ = teacher_features(model, wavs[:1], layers=(0,), min_samples=MIN_SAMPLES)
    f3, _ = teacher_features(model, wavs[:1], layers=(3,), min_samples=MIN_SAMPLES)
    ref, n = reference_features(model, wavs[0], 3)
    assert torch.allclose(f3[0], torch.from_numpy(ref), atol=1e-5)
    assert not torch.allclose(f0, f3)
    with pytest.raises(ValueError, match='layer 4'):
        teacher_features(model, wavs[:1], layers=(4,))


def test_normalize_wav():
    x = torch.randn(2, 1000) * 3 + 1
    y = normalize_wav(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y.std(-1, unbiased=False), torch.ones(2), atol=1e-4)


def test_extract_fsdd(speech_src, hubert_dir, tmp_path):
    dest = tmp_path / 'out' / 'fsdd_hubert'
    s = extract_teacher_features(speech_src, dest, hubert_dir, layers=(2,), batch_size=4, progress=False)
    assert (s.written, s.skipped, len(s.failed)) == (11, 0, 0)
    outs = sorted(dest.rglob('*.npz'))
    assert len(outs) == 11 and (dest / 'a').is_dir() and (dest / 'long.npz').is_file()
    model = tiny_hubert()
    to_lms = LogMelSpectrogram(PRESETS[SR])
    for src_file in sorted(speech_src.rglob('*.wav')):
        z = np.load(dest / src_file.relative_to(speech_src).with_suffix('.npz'))
        wav = load_audio(src_file, SR)
        padded = np.pad(wav, (0, max(0, MIN_SAMPLES - len(wav))))
        T = 1 + len(padded) // 160
        ref, n = reference_features(model, wav, 2)
        assert z['arr_0'].shape == (1, 80, T) and z['arr_0'].dtype == np.float32
        assert z['arr_1'].shape == (1, ref.shape[0], 32)
        assert int(z['arr_2']) == n
        # batched extraction gives each file exactly its own features
        np.testing.assert_allclose(z['arr_1'][0], ref, atol=1e-4)
        np.testing.assert_allclose(z['arr_0'], to_lms(torch.from_numpy(padded))[0].numpy(), atol=1e-4)
        if src_file.name == 'long.wav':
            assert z['arr_1'].shape[1] == 399 and int(z['arr_2']) == 399  # 8 s, no padding: all valid
        else:
            assert z['arr_1'].shape[1] == HUBERT_FRAMES_7S and int(z['arr_2']) < HUBERT_FRAMES_7S
            # the teacher covers the LMS: 2 LMS frames per teacher frame
            assert 2 * int(z['arr_2']) <= 1 + len(wav) // 160 + 1
    rows = list(csv.DictReader(open(dest / 'files.csv')))
    assert [r['file_name'] for r in rows] == sorted(f'fsdd_hubert/{p.relative_to(dest).as_posix()}' for p in outs)


def test_extract_resume_failures_float16(speech_src, hubert_dir, tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    for f in sorted((speech_src / 'a').glob('*.wav'))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    (src / 'text.wav').write_text('not audio')
    dest = tmp_path / 'dest'
    model = tiny_hubert()
    s = extract_teacher_features(src, dest, model, layers=(1, 2), batch_size=2, progress=False, dtype='float16')
    assert (s.written, s.skipped) == (3, 0)
    assert [Path(f).name for f, _ in s.failed] == ['text.wav']
    assert 'text.wav' in (dest / 'teacher_failures.csv').read_text()
    z = np.load(next(dest.glob('*.npz')))
    assert z['arr_1'].dtype == np.float16 and z['arr_1'].shape[-1] == 64
    # second run: all done, nothing written; a removed output is redone
    victim = sorted(dest.glob('*.npz'))[0]
    victim.unlink()
    s2 = extract_teacher_features(src, dest, model, layers=(1, 2), progress=False)
    assert (s2.written, s2.skipped) == (1, 2) and victim.is_file() and len(s2.failed) == 1
    (src / 'text.wav').unlink()
    s3 = extract_teacher_features(src, dest, model, layers=(1, 2), progress=False)
    assert (s3.written, s3.skipped, s3.failed) == (0, 3, []) and not (dest / 'teacher_failures.csv').exists()
    assert not [p for p in dest.iterdir() if p.name.startswith('.')]  # no temporary leftovers
    s4 = extract_teacher_features(src, dest, model, layers=(1, 2), progress=False, overwrite=True)
    assert (s4.written, s4.skipped) == (3, 0)
    assert len(list(csv.DictReader(open(dest / 'files.csv')))) == 3


def test_cli(speech_src, hubert_dir, tmp_path):
    from m2d.cli import main

    dest = tmp_path / 'cli_out'
    rc = main(['teacher-features', str(speech_src / 'a'), str(dest), '--teacher', str(hubert_dir),
               '--layers', '1', '3', '--min_seconds', '2', '--batch-size', '3', '--device', 'cpu', '--quiet'])
    assert rc == 0
    z = np.load(sorted(dest.glob('*.npz'))[0])
    assert z['arr_0'].shape[-1] == 1 + 2 * SR // 160 and z['arr_1'].shape[1:] == (99, 64)
    assert main(['teacher-features', str(tmp_path / 'nothing'), str(dest), '--teacher', str(hubert_dir)]) != 0
    (tmp_path / 'empty').mkdir()
    assert main(['teacher-features', str(tmp_path / 'empty'), str(dest), '--teacher', str(hubert_dir)]) != 0
    # a layer the model lacks stops the run before any file (not one failure per file)
    assert main(['teacher-features', str(speech_src / 'a'), str(tmp_path / 'o2'), '--teacher', str(hubert_dir),
                 '--layers', '7']) != 0
    assert not (tmp_path / 'o2').exists() or not list((tmp_path / 'o2').rglob('*.npz'))


# ----- M2D-X runtime teacher ----------------------------------------------------------------------

def write_small_m2d(folder: Path, patch=(80, 2), input_t=208, dim=64, norm_stats=(-8.0, 4.0)) -> Path:
    """A small random M2D training checkpoint that RuntimeM2D loads (folder name encodes the geometry)."""
    from m2d.models import create_model

    torch.manual_seed(1)
    model = create_model('m2d', img_size=(80, input_t), patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_stats=norm_stats)
    d = folder / f'm2d_vit_small-80x{input_t}p{patch[0]}x{patch[1]}-test'
    d.mkdir(parents=True)
    torch.save({'model': model.state_dict(), 'epoch': 1}, d / 'checkpoint-1.pth')
    return d / 'checkpoint-1.pth'


def test_runtime_teacher(tmp_path):
    from m2d.runtime import RuntimeM2D

    weights = write_small_m2d(tmp_path)
    teacher = runtime_teacher(weights, 'cpu')
    lms = torch.randn(3, 1, 80, 208)
    y = teacher(lms)
    assert y.shape == (3, 104, 64) and not y.requires_grad
    rt = RuntimeM2D(weights)
    assert torch.allclose(y, rt.encode_lms(lms), atol=1e-5)
    teacher.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    # the student's patch width 4 -> 52 steps, each the mean of two teacher steps
    y52 = teacher(lms, frames=52)
    assert torch.allclose(y52, y.reshape(3, 52, 2, 64).mean(2), atol=1e-5)
    # re-normalization from the student's statistics to the teacher's
    t2 = runtime_teacher(weights, 'cpu', input_norm_stats=(-10.0, 2.0))
    raw = lms * 2.0 - 10.0
    assert torch.allclose(t2(lms), rt.encode_lms((raw + 8.0) / 4.0), atol=1e-5)


def test_match_frames():
    y = torch.arange(12.0).reshape(1, 6, 2)
    assert torch.equal(match_frames(y, 3), y.reshape(1, 3, 2, 2).mean(2))
    assert torch.equal(match_frames(y, 12), y.repeat_interleave(2, dim=1))


def test_extract_interrupted_then_resumed(speech_src, tmp_path, monkeypatch):
    import m2d.data.teacher_features as teacher_mod

    src = speech_src / 'b'
    dest = tmp_path / 'dest'
    model = tiny_hubert()
    real_savez, calls = np.savez, []

    def savez_then_interrupt(path, *arrays):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b'half a file')  # a partial write, then Ctrl-C
            raise KeyboardInterrupt
        real_savez(path, *arrays)

    monkeypatch.setattr(teacher_mod.np, 'savez', savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract_teacher_features(src, dest, model, layers=(1,), batch_size=2, progress=False)
    assert len(list(dest.rglob('*.npz'))) == 2  # whole files only; the partial one was removed
    assert not [p for p in dest.iterdir() if p.name.startswith('.')]
    monkeypatch.setattr(teacher_mod.np, 'savez', real_savez)
    s = extract_teacher_features(src, dest, model, layers=(1,), batch_size=2, progress=False)
    assert (s.written, s.skipped, s.failed) == (3, 2, [])
    assert all(np.load(p)['arr_1'].shape == (1, HUBERT_FRAMES_7S, 32) for p in dest.glob('*.npz'))

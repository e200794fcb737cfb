"""`m2d demo`: the sound synthesizer (deterministic, class-dependent) and a --quick run end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from m2d.demo import synth

SR = synth.SAMPLE_RATE


def _frames(wav: np.ndarray, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    """Magnitude spectrogram ``[frames, bins]``."""
    idx = np.arange(0, len(wav) - n_fft, hop)[:, None] + np.arange(n_fft)
    return np.abs(np.fft.rfft(wav[idx] * np.hanning(n_fft), axis=1))


def _band_energy(wav: np.ndarray, lo: float, hi: float) -> float:
    """Mean power of the magnitude spectrogram between `lo` and `hi` Hz."""
    spec = _frames(wav) ** 2
    f = np.arange(spec.shape[1]) * SR / 1024
    return float(spec[:, (f >= lo) & (f < hi)].mean())


def _harmonic_energy(wav: np.ndarray, f0: float, orders: range) -> float:
    """Power of the mean spectrum within 3 % of the harmonics `orders` of `f0`."""
    spec = (_frames(wav, 4096, 1024) ** 2).mean(0)
    f = np.arange(spec.size) * SR / 4096
    return float(sum(spec[np.abs(f - k * f0) < 0.03 * k * f0].sum() for k in orders))


def _clip(label: str, i: int, seed: int = 0) -> tuple[np.ndarray, synth.Voice]:
    """A clip of `label` and its nuisance draws (the first draws of the clip's generator)."""
    ci = list(synth.CLASSES).index(label)
    return synth.synthesize(label, synth.clip_rng(seed, ci, i)), synth._voice(synth.clip_rng(seed, ci, i), 1.0)


def test_clips_are_deterministic_per_seed():
    a = synth.synthesize('reed', synth.clip_rng(3, 5, 11))
    b = synth.synthesize('reed', synth.clip_rng(3, 5, 11))
    c = synth.synthesize('reed', synth.clip_rng(4, 5, 11))
    d = synth.synthesize('reed', synth.clip_rng(3, 5, 12))
    assert a.dtype == np.float32 and a.shape == (SR,)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    assert 0 < np.abs(a).max() <= 1.0


def test_vowels_have_their_formants():
    """/i/ has its second formant near 2.3 kHz and its first low; /u/ and /a/ have no energy there."""
    def ratio(label):
        return np.median([_band_energy(w, 2000, 3200) / _band_energy(w, 500, 1200)
                          for w, _ in (_clip(label, i) for i in range(10))])

    assert ratio('vowel_i') > 5 * ratio('vowel_u') and ratio('vowel_i') > 5 * ratio('vowel_a')


def test_reed_has_odd_harmonics_only():
    """A reed clip's even harmonics are far weaker than its odd ones; a brass clip has both."""
    def odd_over_even(label):
        vals = []
        for i in range(12):
            w, v = _clip(label, i)
            if v.modulation != 'vibrato':  # a steady pitch: sharp harmonic lines
                vals.append(_harmonic_energy(w, v.f0, range(1, 8, 2)) / _harmonic_energy(w, v.f0, range(2, 9, 2)))
        return np.median(vals)

    assert odd_over_even('reed') > 30 and odd_over_even('brass') < 10


def test_nuisance_varies_within_a_class():
    """Pitch, loudness and modulation are drawn per clip: the same class gives very different clips."""
    clips = [_clip('brass', i) for i in range(12)]
    peaks = [_frames(w).mean(0).argmax() for w, _ in clips]
    levels = [np.abs(w).max() for w, _ in clips]
    assert len(set(peaks)) >= 6
    assert max(levels) / min(levels) > 2
    assert len({v.modulation for _, v in clips}) == 3


def test_unknown_class_is_a_user_error():
    from m2d.errors import M2DError

    with pytest.raises(M2DError, match='unknown sound class'):
        synth.synthesize('whistle', synth.clip_rng(0, 0, 0))


def test_collection_layout_and_task(tmp_path):
    from m2d.evaluate import load_task

    dest = synth.make_collection(tmp_path / 'sounds', clips_per_class=5, seconds=0.5, seed=1)
    rows = list(csv.DictReader(open(dest / synth.LABELS_CSV)))
    assert len(rows) == 5 * len(synth.CLASSES)
    assert {r['label'] for r in rows} == set(synth.CLASSES)
    first = dest / rows[0]['file_name']
    before = first.stat().st_mtime_ns
    synth.make_collection(dest, clips_per_class=5, seconds=0.5, seed=1)  # a rerun keeps what exists
    assert first.stat().st_mtime_ns == before
    task = load_task(data_dir=dest)
    assert task.classes == sorted(synth.CLASSES)
    assert len(task.clips) == 5 * len(synth.CLASSES)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from m2d.cli import main

    out = tmp_path / 'report'
    assert main(['demo', '--quick', '--quiet', '--output_dir', str(out)]) == 0
    report = json.loads((out / 'report.json').read_text())
    for key in ('model', 'random', 'logmel'):
        r = report['results'][key]
        assert len(r['per_seed']) == 1
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in [r['mean'], r['std'], *r['per_seed']])
    assert math.isfinite(report['margin_vs_random'])
    assert report['verdict'].startswith('--quick smoke run')
    assert report['curves']['loss'] and all(math.isfinite(v) for _, v in report['curves']['loss'])
    assert report['curves']['effective_rank'] and all(0 < v <= 192 for _, v in report['curves']['effective_rank'])
    assert {'pretrain', 'linear-eval', 'total'} <= set(report['timings_s'])
    assert [c['stage'].split()[0] for c in report['commands']] == ['convert', 'pretrain', 'linear-eval']
    for name in ('report.md', 'training_loss.png', 'effective_rank.png', 'masking.png',
                 'linear_eval/report.json', 'linear_eval/embedding_map.png'):
        assert (out / name).is_file(), name
    md = (out / 'report.md').read_text()
    assert 'random encoder' in md and '](masking.png)' in md and 'm2d pretrain --model m2d_vit_tiny' in md
    assert (out / 'work' / 'm2d_vit_tiny-80x96p16x16p16k-demo' / 'checkpoint-1.pth').is_file()
    # pre-training saw the train split only
    n_train = sum(1 for _ in (out / 'work' / 'lms').rglob('*.npy'))
    assert n_train == report['n_pretrain_clips'] == 5 * len(synth.CLASSES)


def test_default_and_quick_settings():
    from m2d.demo import DemoConfig

    default, quick = DemoConfig(), DemoConfig.quick_run(epochs=2)
    assert not default.quick and quick.quick
    assert quick.epochs == 2 and quick.seeds == 1 and default.seeds == 3
    assert default.work == default.output_dir / 'work'

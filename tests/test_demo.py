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


def _pitch_shift(wav: np.ndarray) -> float:
    """Octaves the spectrum moves from the first to the last third of the loud part (cross-correlation
    of the mean spectra on a log-frequency axis, so every harmonic moves by the same shift)."""
    spec = _frames(wav)
    energy = spec.sum(1)
    loud = np.nonzero(energy > 0.3 * energy.max())[0]
    thirds = np.array_split(loud, 3)
    grid = 2 ** np.linspace(np.log2(80), np.log2(7000), 480)  # 80 bins per octave
    freqs = np.arange(spec.shape[1]) * SR / 1024
    a, b = (np.log(np.interp(grid, freqs, spec[idx].mean(0)) + 1e-6) for idx in (thirds[0], thirds[-1]))
    a, b = a - a.mean(), b - b.mean()
    lags = np.arange(-160, 161)
    corr = [np.dot(a[max(0, -k):len(a) - max(0, k)], b[max(0, k):len(b) - max(0, -k)]) for k in lags]
    return float(lags[int(np.argmax(corr))] / 80)


def _modulation(wav: np.ndarray) -> float:
    """RMS of the 3-16 Hz part of the log-energy envelope over the sounding span (nepers): small for a
    steady sound, large for a tremolo or repeated plucks."""
    e = np.log(_frames(wav, 256, 128).sum(1) + 1e-9)  # 125 frames per second
    on = np.nonzero(e > e.max() - 3)[0]
    span = e[on[0] + 25:on[-1] - 24]  # without the attack and the release (up to 0.2 s)
    spec = np.fft.rfft(span - span.mean())
    f = np.fft.rfftfreq(len(span), 1 / 125)
    spec[(f < 3) | (f > 16)] = 0
    return float(np.sqrt(np.mean(np.fft.irfft(spec, len(span)) ** 2)))


def test_clips_are_deterministic_per_seed():
    a = synth.synthesize('trill', synth.clip_rng(3, 6, 11))
    b = synth.synthesize('trill', synth.clip_rng(3, 6, 11))
    c = synth.synthesize('trill', synth.clip_rng(4, 6, 11))
    d = synth.synthesize('trill', synth.clip_rng(3, 6, 12))
    assert a.dtype == np.float32 and a.shape == (2 * SR,)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    assert 0 < np.abs(a).max() <= 1.0


def test_glides_go_their_way():
    rise = [_pitch_shift(synth.synthesize('rise', synth.clip_rng(0, 2, i))) for i in range(12)]
    fall = [_pitch_shift(synth.synthesize('fall', synth.clip_rng(0, 3, i))) for i in range(12)]
    tone = [_pitch_shift(synth.synthesize('tone', synth.clip_rng(0, 0, i))) for i in range(12)]
    assert np.median(rise) > 0.25 and np.median(fall) < -0.25
    assert abs(np.median(tone)) < 0.05
    assert sum(r > 0 for r in rise) >= 11 and sum(f < 0 for f in fall) >= 11


def test_amplitude_patterns_differ_from_a_steady_tone():
    mod = {label: np.median([_modulation(synth.synthesize(label, synth.clip_rng(0, ci, i))) for i in range(10)])
           for ci, label in enumerate(synth.CLASSES) if label in ('tone', 'tremolo', 'plucks')}
    assert mod['tremolo'] > 2 * mod['tone'] and mod['plucks'] > 2 * mod['tone']


def test_nuisance_varies_within_a_class():
    """Pitch and loudness are drawn per clip: the same class gives very different clips."""
    clips = [synth.synthesize('tone', synth.clip_rng(0, 0, i)) for i in range(10)]
    peaks = [_frames(w).mean(0).argmax() for w in clips]
    levels = [np.abs(w).max() for w in clips]
    assert len(set(peaks)) >= 6
    assert max(levels) / min(levels) > 2


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
    assert (out / 'work' / 'm2d_vit_tiny-80x208p16x16p16k-demo' / 'checkpoint-1.pth').is_file()
    # pre-training saw the train split only
    n_train = sum(1 for _ in (out / 'work' / 'lms').rglob('*.npy'))
    assert n_train == report['n_pretrain_clips'] == 5 * len(synth.CLASSES)


def test_default_and_quick_settings():
    from m2d.demo import DemoConfig

    default, quick = DemoConfig(), DemoConfig.quick_run(epochs=2)
    assert not default.quick and quick.quick
    assert quick.epochs == 2 and quick.seeds == 1 and default.seeds == 3
    assert default.work == default.output_dir / 'work'

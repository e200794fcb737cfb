"""AudioSet tagging: class names, multi-label scoring of AS-FT files, `m2d predict --timeline`."""

from __future__ import annotations

import csv
import json
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

import m2d
from conftest import ROOT, write_as_ft_standin
from m2d.audio import load_audio
from m2d.cli import main
from m2d.evaluate.predict import load_classifier
from m2d.evaluate.timeline import (Timeline, TimelineError, events, num_windows, sliding_windows, timeline,
                                   timeline_file)
from m2d.labels import audioset_classes, audioset_head_classes
from m2d.runtime import RuntimeM2D

SR = 16000
WINDOW = 207 * 160  # samples of 208 frames, the stand-in's input


def _tone_file(path, seconds, sr=SR, seed=0):
    """A test recording: a chirp plus noise, written block by block (never whole in memory)."""
    rng = np.random.default_rng(seed)
    block = 30 * sr
    with sf.SoundFile(str(path), 'w', sr, 1, subtype='PCM_16') as f:
        for s in range(0, int(seconds * sr), block):
            t = np.arange(s, min(s + block, int(seconds * sr))) / sr
            f.write((0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return path


# ----- class names ---------------------------------------------------------------------------------

def test_audioset_names_in_index_order():
    rows = audioset_classes()
    assert len(rows) == 527 and [r.index for r in rows] == list(range(527))
    assert [r.name for r in rows[:3]] == ['Speech', 'Male speech, man speaking', 'Female speech, woman speaking']
    assert rows[137].name == 'Music' and rows[526].name == 'Field recording'
    assert len({r.mid for r in rows}) == 527 and all(r.mid.startswith(('/m/', '/t/', '/g/')) for r in rows)
    # EVAR's heads sort the label strings (MultiLabelBinarizer): the reference's notebooks show these first.
    head = audioset_head_classes()
    assert head[:3] == ['Firecracker', 'Timpani', 'Wild animals']
    assert head == [r.name for r in sorted(rows, key=lambda r: r.mid)] and sorted(head) == sorted(r.name for r in rows)
    pyproject = (ROOT / 'pyproject.toml').read_text()
    assert 'resources/*.csv' in pyproject  # shipped as package data
    assert 'CC BY-SA 4.0' in (ROOT / 'src/m2d/resources/README.md').read_text()


# ----- scoring -------------------------------------------------------------------------------------

def test_as_ft_file_is_multilabel_with_audioset_names(as_ft_standin):
    clf = load_classifier(as_ft_standin)
    assert clf.multilabel and clf.classes == audioset_head_classes() and clf.num_classes == 527
    rt = m2d.load(as_ft_standin)   # the head comes with the file
    assert rt.classes == audioset_head_classes() and rt.multilabel
    torch.manual_seed(0)
    x = 0.1 * torch.randn(3, WINDOW)
    p = rt.predict(x)
    assert p.shape == (3, 527)
    # predict is the sigmoid of the runtime's logits (EVAR head: BatchNorm of the time-mean, then Linear)
    ref = RuntimeM2D(as_ft_standin, num_classes=527)
    with torch.no_grad():
        logits = ref.head(ref.head_norm(ref.encode(x).mean(1)))
        assert torch.allclose(logits, ref(x), atol=1e-6)
    assert torch.allclose(p, torch.sigmoid(logits), atol=1e-6)
    assert not torch.allclose(p, torch.softmax(logits, -1), atol=1e-3)
    assert (p.sum(-1) - 1).abs().min() > 0.5   # independent per-class probabilities, not a distribution
    assert torch.allclose(clf.probabilities(x), p, atol=1e-6)
    # --multilabel is not needed, and a file's own settings still win over the 527-class guess
    assert load_classifier(as_ft_standin, multilabel=False).multilabel is False


def test_runtime_without_head_has_no_predict(small_ckpt):
    rt = m2d.load(small_ckpt)
    assert rt.classes is None and not hasattr(rt, 'head')
    with pytest.raises(ValueError, match='no classification head'):
        rt.predict(torch.zeros(1, SR))


def test_clip_mode_prints_names(tmp_path, as_ft_standin, capsys):
    wav = _tone_file(tmp_path / 'tone.wav', 1.5)
    assert main(['predict', str(wav), '--weights', str(as_ft_standin), '--top', '3', '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    p = m2d.load(as_ft_standin).predict(torch.from_numpy(load_audio(wav, SR))[None])[0]  # whole file
    order = p.argsort(descending=True)[:3]
    assert [t['label'] for t in top] == [audioset_head_classes()[int(i)] for i in order]
    assert [t['probability'] for t in top] == pytest.approx(p[order].tolist(), abs=1e-5)
    assert main(['predict', str(wav), '--weights', str(as_ft_standin), '--top', '2']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(wav) + '\t' + top[0]['label'] + ' ')


def test_released_name_from_cache(tmp_path, monkeypatch, capsys):
    """`--weights NAME` resolves through the cache as `m2d encode` does (no network: already cached)."""
    name = 'm2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly'
    write_as_ft_standin(tmp_path / 'cache', name=name, depth=1)
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr('m2d.hub.fetch_url', lambda *a, **k: pytest.fail('no download expected'))
    wav = _tone_file(tmp_path / 'clip.wav', 3.0)
    assert main(['predict', str(wav), '--weights', name, '--top', '1', '--json']) == 0
    assert json.loads(capsys.readouterr().out)[0]['top'][0]['label'] in audioset_head_classes()
    assert m2d.load(name).cfg.input_size == (80, 1001)


# ----- windows -------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [1, 100, 999, 1000, 1001, 1250, 1500, 1501, 4321])
def test_windows_and_hop_at_the_end(n):
    window, hop = 1000, 250
    x = np.arange(1, n + 1, dtype=np.float32)
    rng = np.random.default_rng(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(5, n - 1), replace=False)) if n > 1 else []
    blocks = np.split(x, cuts)                                   # uneven blocks, as a stream gives
    got = list(sliding_windows(blocks, window, hop))
    assert len(got) == num_windows(n, window, hop) == 1 + int(np.ceil(max(0, n - window) / hop))
    for k, (start, end, w) in enumerate(got):
        assert start == k * hop and end == min(start + window, n) and len(w) == window
        assert np.array_equal(w[:end - start], x[start:end]) and not w[end - start:].any()  # zero-padded tail
    assert got[-1][1] == n                                       # the last window reaches the end
    assert len(got) == 1 or got[-2][1] < n                       # and is needed


def test_timeline_seconds_at_the_end(as_ft_standin):
    clf = load_classifier(as_ft_standin)
    wav = 0.1 * np.random.default_rng(0).standard_normal(int(7.5 * SR)).astype(np.float32)
    track = timeline(clf, wav, hop_sec=1.0, batch_size=3)
    n = num_windows(len(wav), WINDOW, SR)
    assert len(track.starts) == n == 7 and track.probs.shape == (n, 527)
    assert track.starts.tolist() == [0, 1, 2, 3, 4, 5, 6] and track.ends[-1] == 7.5 and track.duration == 7.5
    assert track.ends[:-1] == pytest.approx(track.starts[:-1] + WINDOW / SR)
    # each row is the prediction of that window alone (batching changes nothing)
    last = np.pad(wav[6 * SR:], (0, WINDOW - (len(wav) - 6 * SR)))
    p = clf.probabilities(torch.from_numpy(np.stack([wav[:WINDOW], last])))
    assert np.allclose(track.probs[[0, -1]], p.numpy(), atol=1e-5)
    assert track.classes == clf.classes
    again = timeline(m2d.load(as_ft_standin), wav, hop_sec=1.0)   # a runtime from m2d.load works too
    assert np.allclose(again.probs, track.probs, atol=1e-5) and again.classes == track.classes
    with pytest.raises(TimelineError, match='--hop'):
        timeline(clf, wav, hop_sec=3.0)  # longer than the 2.07-s window


def test_events_merge_consecutive_windows():
    starts = np.arange(6.0)
    probs = np.array([[0.9, 0.1, 0.0],    # A on at 0-1, off at 2-3, on at 4; B on at 2-5, peak at 3
                      [0.6, 0.5, 0.0],
                      [0.2, 0.7, 0.0],
                      [0.5, 0.95, 0.1],
                      [0.8, 0.6, 0.2],
                      [0.1, 0.51, 0.3]], np.float32)
    track = Timeline(starts, starts + 2.0, probs, ['A', 'B', 'C'], 7.0)
    assert events(track, 0.5) == [(0.0, 3.0, 'A', 0.9), (2.0, 7.0, 'B', 0.95), (4.0, 6.0, 'A', 0.8)]
    # lower: A is on at 0-1 and 3-4, B from window 1 on, C in the last window only
    assert events(track, 0.25) == [(0.0, 3.0, 'A', 0.9), (1.0, 7.0, 'B', 0.95), (3.0, 6.0, 'A', 0.8),
                                   (5.0, 7.0, 'C', 0.3)]
    assert events(track, 0.96) == []
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(TimelineError, match='--threshold'):
            events(track, bad)


# ----- long recordings -----------------------------------------------------------------------------

def test_long_file_is_streamed_in_bounded_memory(tmp_path, as_ft_standin, monkeypatch):
    """The peak of Python/numpy memory (tracemalloc) does not grow with the recording's length and stays
    far below the decoded audio; the whole-file readers are never called."""
    def refuse(*a, **k):
        raise AssertionError('the timeline must not read the whole file')
    monkeypatch.setattr('m2d.audio.load_audio', refuse)
    monkeypatch.setattr('m2d.audio.read_audio', refuse)
    clf = load_classifier(as_ft_standin)
    peaks = {}
    for seconds in (100, 600):                          # 600 s: 38 MB of float32 samples
        path = _tone_file(tmp_path / f'long{seconds}.wav', seconds)
        tracemalloc.start()
        try:
            track = timeline_file(clf, path, hop_sec=WINDOW / SR, batch_size=16, block_sec=10)
            peaks[seconds] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(track.starts) == num_windows(seconds * SR, WINDOW, WINDOW) and track.duration == seconds
    whole = 600 * SR * 4
    assert peaks[600] < 1.2 * peaks[100] + 500_000, peaks      # constant, not proportional to the length
    assert peaks[600] < whole / 4, f'peak {peaks[600] / 1e6:.1f} MB while the audio is {whole / 1e6:.0f} MB'


# ----- the command ---------------------------------------------------------------------------------

def test_timeline_command_writes_windows_events_and_plot(tmp_path, as_ft_standin, capsys):
    wav = _tone_file(tmp_path / 'rec.wav', 6.0)
    out = tmp_path / 'out'
    argv = ['predict', str(wav), '--weights', str(as_ft_standin), '--timeline', '--hop', '1.5', '--top', '2',
            '--threshold', '0.6', '--out', str(out), '--plot']
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert 'windows of 2.07 s every 1.5 s' in text
    rows = list(csv.DictReader(open(out / 'rec.windows.csv')))
    track = timeline(load_classifier(as_ft_standin), load_audio(wav, SR), hop_sec=1.5)
    n = num_windows(6 * SR, WINDOW, int(1.5 * SR))
    assert len(rows) == 2 * n and len(track.starts) == n
    assert [(float(r['start']), float(r['end']), r['label'], float(r['p'])) for r in rows] == \
        [(w['start'], w['end'], w['label'], w['p']) for w in track.top(2)]
    assert float(rows[-1]['end']) == 6.0
    ev = list(csv.DictReader(open(out / 'rec.events.csv')))
    assert [(float(e['start']), float(e['end']), e['label'], float(e['peak_p'])) for e in ev] == \
        [tuple(e) for e in events(track, 0.6)]
    assert (out / 'rec.timeline.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert main(argv[:-1] + ['--json']) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result['num_windows'] == n and result['events'] == [e._asdict() for e in events(track, 0.6)]


def test_plot_without_matplotlib_is_one_line(tmp_path, as_ft_standin, monkeypatch, capsys):
    wav = _tone_file(tmp_path / 'rec.wav', 1.0)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert main(['predict', str(wav), '--weights', str(as_ft_standin), '--timeline', '--plot',
                 '--out', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'm2d predict: error: --plot: needs matplotlib, which is not installed (pip install matplotlib)'


def test_bad_input_is_one_line_and_other_files_are_scored(tmp_path, as_ft_standin, small_ckpt, capsys):
    good = _tone_file(tmp_path / 'good.wav', 2.5)
    garbage = tmp_path / 'garbage.wav'
    garbage.write_bytes(b'not audio at all' * 10)
    empty = tmp_path / 'empty.wav'
    sf.write(str(empty), np.zeros(0, np.float32), SR)
    w = str(as_ft_standin)
    cases = [(['predict', str(good), '--weights', str(small_ckpt)], 'no classification head'),
             (['predict', str(good), '--weights', w, '--timeline', '--hop', '0'], '--hop 0: must be positive'),
             (['predict', str(good), '--weights', w, '--timeline', '--hop', '2.5'], '--hop 2.5: must be at most'),
             (['predict', str(good), '--weights', w, '--timeline', '--threshold', '1'], '--threshold 1:'),
             (['predict', str(good), '--weights', w, '--timeline', '--threshold', '0'], '--threshold 0:'),
             (['predict', str(empty), '--weights', w, '--timeline'], 'empty.wav: the file holds no audio samples'),
             (['predict', str(garbage), '--weights', w], 'garbage.wav: cannot read audio')]
    for argv, message in cases:
        assert main(argv + ['--out', str(tmp_path / 'o')]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith('m2d predict: error:'), err
    assert main(['predict', str(good), '--weights', str(small_ckpt)]) == 2
    assert 'use `m2d encode` for its features, or fine-tune it' in capsys.readouterr().err
    for mode in ([], ['--timeline', '--out', str(tmp_path / 'o')]):
        argv = ['predict', str(garbage), str(good), str(empty), str(tmp_path / 'missing.wav'), '--weights', w, '--json']
        assert main(argv + mode) == 1
        captured = capsys.readouterr()
        assert [r['file'] for r in json.loads(captured.out)] == [str(good)]
        lines = captured.err.strip().splitlines()
        assert lines[0] == 'm2d predict: 3 of 4 files failed:'
        assert [ln.split(':')[0].strip() for ln in lines[1:]] == [str(garbage), str(empty), str(tmp_path / 'missing.wav')]


def test_bf16_scores_close_to_fp32(as_ft_standin):
    x = 0.1 * torch.randn(2, WINDOW, generator=torch.Generator().manual_seed(1))
    p32 = load_classifier(as_ft_standin).probabilities(x)
    p16 = load_classifier(as_ft_standin, bf16=True).probabilities(x)
    assert p16.dtype == torch.float32 and p16.shape == (2, 527)
    assert (p16 - p32).abs().max() < 0.02


def test_streamed_file_equals_waveform_timeline(tmp_path, as_ft_standin):
    """A 44.1-kHz file, resampled block by block while streaming, scores as the whole resampled waveform."""
    path = _tone_file(tmp_path / 'cd.wav', 7.3, sr=44100)
    clf = load_classifier(as_ft_standin)
    streamed = timeline_file(clf, path, hop_sec=0.8, block_sec=0.5)   # many uneven blocks
    whole = timeline(clf, load_audio(path, SR), hop_sec=0.8)
    assert streamed.starts.tolist() == whole.starts.tolist() and streamed.ends.tolist() == whole.ends.tolist()
    assert streamed.ends[-1] == pytest.approx(7.3, abs=1e-3)
    assert np.allclose(streamed.probs, whole.probs, atol=1e-4)

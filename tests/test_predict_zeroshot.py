"""`m2d predict --labels`: zero-shot classification with an M2D-CLAP stand-in and a tiny text encoder."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip('transformers', reason="the M2D-CLAP text side needs transformers (pip install 'm2d[clap]')")

from clap_standin import (clap_parts, cosine, reference_clap_audio, reference_text_vectors, write_clap_standin,
                          write_text_encoder)
from m2d.audio import load_audio
from m2d.cli import main
from m2d.evaluate.predict import load_zero_shot
from m2d.evaluate.timeline import num_windows, timeline, timeline_file

SR = 16000
LABELS = ['dog_barking', 'rain', 'siren', 'car horn', 'music']
SCALE = 25.0


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    hub = pytest.importorskip('huggingface_hub.constants')
    monkeypatch.setattr(hub, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))


@pytest.fixture(scope='module')
def clap(tmp_path_factory):
    """(CLAP stand-in with a linear text_proj, its tiny GTE-shaped text encoder folder)."""
    root = tmp_path_factory.mktemp('clap')
    folder = write_text_encoder(root / 'gte', 'gte', seed=5)
    path = write_clap_standin(root, text_proj='linear', logit_scale=math.log(SCALE), seed=2)
    return path, folder


def _noise_file(path, seconds, seed=0):
    rng = np.random.default_rng(seed)
    block = 30 * SR
    with sf.SoundFile(str(path), 'w', SR, 1, subtype='PCM_16') as f:
        for s in range(0, int(seconds * SR), block):
            n = min(block, int(seconds * SR) - s)
            t = np.arange(s, s + n) / SR
            f.write((0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return path


def _expected(path, folder, wav, captions):
    """Cosines and probabilities by the reference's path, independently of m2d's CLAP code."""
    a = reference_clap_audio(path, wav)
    t = reference_text_vectors(folder, captions, 'gte', clap_parts(path)['text_proj'])
    sim = cosine(a, t)
    return sim, torch.softmax(SCALE * sim, -1)


def test_clip_mode_lists_every_label_by_similarity(tmp_path, clap, capsys):
    path, folder = clap
    wav_path = _noise_file(tmp_path / 'clip.wav', 1.5)
    argv = ['predict', str(wav_path), '--weights', str(path), '--labels', ','.join(LABELS),
            '--text_encoder', str(folder)]
    assert main(argv + ['--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    wav = torch.from_numpy(load_audio(wav_path, SR))[None]
    captions = ['dog barking can be heard', 'rain can be heard', 'siren can be heard', 'car horn can be heard',
                'music can be heard']
    sim, p = _expected(path, folder, wav, captions)
    order = sim[0].argsort(descending=True).tolist()
    assert [t['label'] for t in top] == [LABELS[i] for i in order]          # all labels, most similar first
    assert [t['index'] for t in top] == order
    assert [t['similarity'] for t in top] == pytest.approx(sim[0, order].tolist(), abs=1e-5)
    assert [t['probability'] for t in top] == pytest.approx(p[0, order].tolist(), abs=1e-5)
    assert sum(t['probability'] for t in top) == pytest.approx(1.0, abs=1e-5)
    assert main(argv + ['--top', '2']) == 0
    line = capsys.readouterr().out.strip()
    first = top[0]
    assert line == (f'{wav_path}\t{first["label"]} {first["probability"]:.3f} (cos {first["similarity"]:.3f})  '
                    f'{top[1]["label"]} {top[1]["probability"]:.3f} (cos {top[1]["similarity"]:.3f})')


def test_labels_file_and_template(tmp_path, clap, capsys):
    path, folder = clap
    wav_path = _noise_file(tmp_path / 'clip.wav', 1.0, seed=1)
    labels_file = tmp_path / 'labels.txt'
    labels_file.write_text('dog_barking\n\nrain\nsiren\n')
    assert main(['predict', str(wav_path), '--weights', str(path), '--labels_file', str(labels_file),
                 '--template', 'the sound of {label}.', '--text_encoder', str(folder), '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    wav = torch.from_numpy(load_audio(wav_path, SR))[None]
    sim, p = _expected(path, folder, wav, ['the sound of dog barking.', 'the sound of rain.', 'the sound of siren.'])
    got = {t['label']: (t['similarity'], t['probability']) for t in top}
    for i, label in enumerate(['dog_barking', 'rain', 'siren']):
        assert got[label] == pytest.approx((float(sim[0, i]), float(p[0, i])), abs=1e-5)


def test_timeline_rows_are_each_window_alone(tmp_path, clap, capsys):
    path, folder = clap
    wav_path = _noise_file(tmp_path / 'rec.wav', 5.0, seed=2)
    out = tmp_path / 'out'
    assert main(['predict', str(wav_path), '--weights', str(path), '--labels', ','.join(LABELS), '--text_encoder',
                 str(folder), '--timeline', '--hop', '1.0', '--top', '3', '--threshold', '0.3', '--out', str(out),
                 '--json'] + (['--plot'] if importlib.util.find_spec('matplotlib') else [])) == 0
    result = json.loads(capsys.readouterr().out)[0]
    window = 207 * 160
    n = num_windows(5 * SR, window, SR)
    assert result['num_windows'] == n and len(result['windows']) == 3 * n
    rows = list(csv.DictReader(open(out / 'rec.windows.csv')))
    assert list(rows[0]) == ['start', 'end', 'label', 'similarity', 'p'] and len(rows) == 3 * n
    wav = load_audio(wav_path, SR)
    last = np.pad(wav[(n - 1) * SR:], (0, window - (len(wav) - (n - 1) * SR)))
    x = torch.from_numpy(np.stack([wav[:window], last]))
    captions = [f'{c} can be heard' for c in ['dog barking', 'rain', 'siren', 'car horn', 'music']]
    sim, p = _expected(path, folder, x, captions)
    for k, w in ((0, 0), (1, n - 1)):
        got = rows[3 * w:3 * w + 3]
        order = sim[k].argsort(descending=True)[:3].tolist()
        assert [r['label'] for r in got] == [LABELS[i] for i in order]
        assert [float(r['similarity']) for r in got] == pytest.approx(sim[k, order].tolist(), abs=1e-4)
        assert [float(r['p']) for r in got] == pytest.approx(p[k, order].tolist(), abs=1e-4)
    assert float(rows[-1]['end']) == 5.0
    if importlib.util.find_spec('matplotlib'):
        assert (out / 'rec.timeline.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    events = list(csv.DictReader(open(out / 'rec.events.csv')))
    assert [e['label'] for e in events] == [e['label'] for e in result['events']]


def test_long_file_is_streamed_in_bounded_memory(tmp_path, clap, monkeypatch):
    """Zero-shot over a long recording: the whole-file readers are never called, and the peak of
    Python/numpy memory (tracemalloc) does not grow with the length."""
    path, folder = clap
    clf = load_zero_shot(path, LABELS, text_encoder=folder)

    def refuse(*a, **k):
        raise AssertionError('the timeline must not read the whole file')
    window = clf.window_samples
    peaks, tracks = {}, {}
    for seconds in (100, 600):                         # 600 s: 38 MB of float32 samples
        wav_path = _noise_file(tmp_path / f'long{seconds}.wav', seconds)
        with monkeypatch.context() as m:
            m.setattr('m2d.audio.load_audio', refuse)
            m.setattr('m2d.audio.read_audio', refuse)
            tracemalloc.start()
            try:
                tracks[seconds] = timeline_file(clf, wav_path, hop_sec=window / SR, batch_size=16, block_sec=10)
                peaks[seconds] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        track = tracks[seconds]
        assert len(track.starts) == num_windows(seconds * SR, window, window) and track.duration == seconds
        assert track.similarity.shape == track.probs.shape == (len(track.starts), len(LABELS))
    whole = 600 * SR * 4
    assert peaks[600] < 1.2 * peaks[100] + 500_000, peaks
    assert peaks[600] < whole / 4, f'peak {peaks[600] / 1e6:.1f} MB while the audio is {whole / 1e6:.0f} MB'
    # the start of the long recording scores as the same waveform given in memory
    head = timeline(clf, load_audio(tmp_path / 'long100.wav', SR)[:3 * window], hop_sec=window / SR)
    assert np.allclose(head.similarity, tracks[100].similarity[:3], atol=1e-4)


def test_bad_zero_shot_input_is_one_line(tmp_path, clap, small_ckpt, capsys):
    path, folder = clap
    wav = str(_noise_file(tmp_path / 'clip.wav', 1.0))
    w, enc = str(path), ['--text_encoder', str(folder)]
    cases = [(['--weights', str(small_ckpt), '--labels', 'dog'] + enc, 'needs an M2D-CLAP weight file'),
             (['--weights', w, '--labels', ' , '] + enc, '--labels: no labels given'),
             (['--weights', w, '--labels', 'dog,rain,dog'] + enc, "'dog' is given twice"),
             (['--weights', w, '--labels_file', str(tmp_path / 'none.txt')] + enc, 'none.txt: no such file'),
             (['--weights', w, '--labels', 'dog', '--template', 'no slot'] + enc, '--template'),
             (['--weights', w, '--template', '{label}!'], '--template: needs --labels'),
             (['--weights', w, '--labels', 'dog', '--multilabel'] + enc, '--multilabel: not for zero-shot'),
             (['--weights', w], 'give labels to classify zero-shot')]
    for args, message in cases:
        assert main(['predict', wav] + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('m2d predict: error:') and message in err[0], err


# ---------------------------------------------------------------------------------------------
# `m2d zeroshot` and `m2d retrieval` end to end on the real text side (the stand-in and tiny GTE)


def _tone_file(path, hz, seconds=1.5):
    t = np.arange(int(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), SR)
    return path


def _independent_sim(path, folder, wavs, captions):
    a = torch.cat([reference_clap_audio(path, torch.from_numpy(load_audio(w, SR))[None]) for w in wavs])
    t = reference_text_vectors(folder, captions, 'gte', clap_parts(path)['text_proj'])
    return cosine(a, t)


def test_zeroshot_and_retrieval_commands_with_the_text_side(tmp_path, clap):
    path, folder = clap
    data = tmp_path / 'data'
    freqs = [220, 440, 880, 1760, 3520, 5000]
    labels = ['dog_barking', 'rain', 'siren', 'dog_barking', 'rain', 'siren']
    wavs = [_tone_file(data / f'{i}.wav', hz) for i, hz in enumerate(freqs)]
    (data / 'task.csv').write_text('file_name,label,split\n' +
                                   ''.join(f'{i}.wav,{lab},test\n' for i, lab in enumerate(labels)))
    out = tmp_path / 'zs'
    assert main(['zeroshot', '--weights', str(path), '--csv', str(data / 'task.csv'), '--data_dir', str(data),
                 '--text_encoder', str(folder), '--output_dir', str(out), '--no_cache', '-q']) == 0
    report = json.loads((out / 'report.json').read_text())
    classes = sorted(set(labels))                                   # EVAR's class order: sorted names
    captions = [c.replace('_', ' ') + ' can be heard' for c in classes]
    sim = _independent_sim(path, folder, wavs, captions)
    expected = float(np.mean([classes[int(j)] == lab for j, lab in zip(sim.argmax(1), labels)]))
    assert report['model']['mean'] == pytest.approx(expected)
    assert report['captions'] == dict(zip(classes, captions))

    caps = ['a dog barking', 'rain drops', 'a loud siren', 'the dog is barking', 'quiet rain', 'a car horn']
    (data / 'captions.csv').write_text('file_name,caption_1,caption_2\n' +
                                      ''.join(f'{i}.wav,{caps[i]},{caps[(i + 1) % 6]} and music\n' for i in range(6)))
    out = tmp_path / 'retr'
    assert main(['retrieval', '--weights', str(path), '--captions', str(data / 'captions.csv'), '--data_dir', str(data),
                 '--text_encoder', str(folder), '--output_dir', str(out), '--no_cache', '-q']) == 0
    report = json.loads((out / 'report.json').read_text())
    texts = [c for i in range(6) for c in (caps[i], f'{caps[(i + 1) % 6]} and music')]
    owner = np.repeat(np.arange(6), 2)
    sim = _independent_sim(path, folder, wavs, texts).numpy()      # [6 clips, 12 captions]
    t2a_rank = np.array([(sim[:, q] > sim[owner[q], q]).sum() for q in range(12)])
    a2t_rank = np.array([min((sim[c] > sim[c, q]).sum() for q in np.flatnonzero(owner == c)) for c in range(6)])
    for k in (1, 5):
        assert report['results']['text_to_audio'][f'R@{k}'] == pytest.approx(100 * np.mean(t2a_rank < k))
        assert report['results']['audio_to_text'][f'R@{k}'] == pytest.approx(100 * np.mean(a2t_rank < k))

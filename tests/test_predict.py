"""`m2d predict`: top-k labels from our fine-tuned files (class names) and EVAR's (indices)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FSDD, need
from m2d.checkpoint import load_checkpoint
from m2d.cli import main
from m2d.evaluate import finetune as ft
from m2d.evaluate.predict import load_classifier
from m2d.evaluate.tasks import load_clip
from m2d.runtime import RuntimeM2D

CLASSES = ['zero', 'one', 'two', 'three']


def _finetuned(tmp_path, small_ckpt, multilabel=False, unit_sec=0.5):
    """A fine-tuned file as `m2d finetune` writes it (random head, no training)."""
    ckpt = load_checkpoint(small_ckpt)
    torch.manual_seed(0)
    model = ft.FinetuneModel(ckpt, len(CLASSES), training_mask=0.5)
    with torch.no_grad():
        model.head.mlp['mlp'][0].weight.normal_(std=2.0)
    model.eval()
    name = ft.model_name(ckpt)
    path = ft.checkpoint_path(tmp_path, name, 'digits')
    info = {'task': 'digits', 'multilabel': multilabel, 'unit_sec': unit_sec}
    return ft.save_checkpoint(ft.finetuned_state(model, CLASSES, name, info), path)


def _reference_file(tmp_path, ours):
    """The same weights as EVAR saves them: tensors only, in a folder named after the model."""
    sd = torch.load(ours, weights_only=True)
    keep = {k: v for k, v in sd.items() if k.startswith(('module.ar.', 'module.head.'))}
    path = tmp_path / 'm2d_vit_tiny-80x208p16x16-240101_digits' / 'weights_ep3it0-0.50000_loss0.1.pth'
    path.parent.mkdir()
    torch.save(keep, path)
    return path


@pytest.fixture
def wavs():
    need(FSDD)
    return [FSDD / '1_theo_0.wav', FSDD / '3_jackson_2.wav']


def test_predict_names_and_probabilities(tmp_path, small_ckpt, wavs, capsys):
    path = _finetuned(tmp_path, small_ckpt)
    assert main(['predict', *map(str, wavs), '--weights', str(path), '--top', '2', '--json']) == 0
    results = json.loads(capsys.readouterr().out)
    rt = RuntimeM2D(path, num_classes=4)
    for wav, r in zip(wavs, results):
        assert r['file'] == str(wav) and len(r['top']) == 2
        x = torch.from_numpy(load_clip(wav, 16000, 8000))[None]  # the stored unit, 0.5 s
        with torch.no_grad():
            p = torch.softmax(rt(x), -1)[0]
        order = p.argsort(descending=True)
        assert [t['label'] for t in r['top']] == [CLASSES[int(i)] for i in order[:2]]
        assert [t['probability'] for t in r['top']] == pytest.approx(p[order[:2]].tolist(), abs=1e-5)
    assert main(['predict', str(wavs[0]), '--weights', str(path), '--top', '10']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(wavs[0]) + '\t') and all(c in line for c in CLASSES)  # --top capped at 4 classes
    probs = [float(x) for x in line.split('\t')[1].split()[1::2]]
    assert sum(probs) == pytest.approx(1.0, abs=2e-3) and probs == sorted(probs, reverse=True)


def test_reference_file_prints_indices(tmp_path, small_ckpt, wavs, capsys):
    ours = _finetuned(tmp_path, small_ckpt)
    ref = _reference_file(tmp_path, ours)
    clf = load_classifier(ref)
    assert clf.classes is None and not clf.multilabel and clf.unit_sec is None
    assert main(['predict', str(wavs[0]), '--weights', str(ref), '--top', '3', '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    assert all(t['label'] == f'#{t["index"]}' for t in top)
    # Same weights, but no norm_stats in the file (EVAR saves none) and the whole file is used:
    # the prediction is the RuntimeM2D one with the 2022 default statistics.
    rt = RuntimeM2D(ref, num_classes=4)
    assert rt.norm_stats.tolist() == pytest.approx([-7.1, 4.2])
    from m2d.audio import load_audio
    with torch.no_grad():
        p = torch.softmax(rt(torch.from_numpy(load_audio(wavs[0], 16000))[None]), -1)[0]
    assert top[0]['index'] == int(p.argmax()) and top[0]['probability'] == pytest.approx(float(p.max()), abs=1e-5)


def test_multilabel_uses_sigmoid(tmp_path, small_ckpt, wavs):
    path = _finetuned(tmp_path, small_ckpt, multilabel=True)
    clf = load_classifier(path)
    assert clf.multilabel and clf.classes == CLASSES
    x = torch.from_numpy(np.stack([load_clip(w, 16000, 8000) for w in wavs]))
    with torch.no_grad():
        assert torch.allclose(clf.probabilities(x), torch.sigmoid(clf.runtime(x)))
    assert load_classifier(_reference_file(tmp_path, path), multilabel=True).multilabel


def test_predict_errors_are_one_line(tmp_path, small_ckpt, wavs, capsys):
    ours = _finetuned(tmp_path, small_ckpt)
    cases = [(['predict', str(wavs[0]), '--weights', str(small_ckpt)], 'no classification head'),
             (['predict', str(tmp_path / 'missing.wav'), '--weights', str(ours)], 'no such file'),
             (['predict', str(wavs[0]), '--weights', str(ours), '--top', '0'], '--top 0'),
             (['predict', str(wavs[0]), '--weights', str(tmp_path / 'nope.pth')], 'no such weight file')]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith('m2d predict: error:'), err

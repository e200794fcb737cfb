"""The linear probe and its metrics: hand-made metric cases, synthetic embeddings with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from m2d.evaluate import metrics
from m2d.evaluate.probe import Split, fit_linear, probe, standardize


def test_accuracy_and_confusion_by_hand():
    y = np.array([0, 0, 1, 2, 2, 2])
    scores = np.array([[.9, .1, 0], [.2, .7, .1], [.1, .8, .1], [0, .3, .7], [.6, .2, .2], [0, 0, 1]])
    assert metrics.accuracy(y, scores) == pytest.approx(4 / 6)
    pred = scores.argmax(1)
    cm = metrics.confusion_matrix(y, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    np.testing.assert_allclose(metrics.class_accuracy(y, pred, 4)[:3], [0.5, 1.0, 2 / 3])
    assert np.isnan(metrics.class_accuracy(y, pred, 4)[3])  # a class without clips


def test_average_precision_by_hand():
    # ranking: + - + -  -> precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.average_precision([0, 1], [0.9, 0.1]) == pytest.approx(0.5)
    assert metrics.average_precision([1, 1, 0], [0.3, 0.2, 0.1]) == pytest.approx(1.0)
    # ties form one threshold (scikit-learn): all scores equal -> precision = prevalence
    assert metrics.average_precision([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.25)
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.4, 0.3, 0.2]])
    # class 0: ranks + (0.9), + (0.4), - (0.2) -> 1; class 1: + (0.8), + (0.3), - (0.1) -> 1; class 2: no positive
    assert metrics.mean_average_precision(y, s) == pytest.approx(1.0)
    s[2, 0] = 0.1  # class 0 ranking: + (0.9), - (0.2), + (0.1) -> (1 + 2/3) / 2
    assert metrics.mean_average_precision(y, s) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_standardize_uses_train_statistics():
    train = np.array([[0.0, 5.0], [2.0, 5.0]])
    test = np.array([[4.0, 6.0]])
    a, b = standardize(train, test)
    np.testing.assert_allclose(a, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(b, [[3, 1]])  # (4-1)/1 ; constant feature keeps scale 1


def _blobs(n_per_class: int, n_classes: int, dim: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + rng.normal(size=(len(y), dim))
    return x.astype(np.float32) + 10.0, y  # an offset the standardization must remove


def _splits(x, y, seed=0):
    idx = np.random.default_rng(seed).permutation(len(y))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return [Split(x[i], y[i]) for i in (idx[:a], idx[a:b], idx[b:])]


def test_separable_classes_reach_100_percent():
    x, y = _blobs(60, 4, 32, sep=3.0, seed=0)
    tr, va, te = _splits(x, y)
    r = probe(tr, va, te, multilabel=False, n_classes=4, seeds=2, lr=1e-3, epochs=100, patience=20)
    assert r.metric == 'accuracy' and r.per_seed == [1.0, 1.0] and r.std == 0.0
    assert r.fits[0].test_scores.shape == (len(te.y), 4)
    np.testing.assert_allclose(r.fits[0].test_scores.sum(1), 1.0, rtol=1e-5)


def test_shuffled_labels_give_chance():
    x, y = _blobs(100, 5, 32, sep=3.0, seed=1)
    y = np.random.default_rng(0).permutation(y)  # labels no longer related to the features
    tr, va, te = _splits(x, y)
    r = probe(tr, va, te, multilabel=False, n_classes=5, seeds=3, lr=1e-3, epochs=60, patience=10)
    assert abs(r.mean - 0.2) < 0.1, r.per_seed  # chance = 1/5 (100 test clips)


def test_default_lr_learns_and_early_stopping_restores_best():
    x, y = _blobs(300, 3, 512, sep=0.3, seed=2)  # ~4 steps per epoch: enough for lr 3e-5 on 512-d inputs
    tr, va, te = _splits(x, y)
    fit = fit_linear(tr, va, te, multilabel=False, n_classes=3, seed=0, epochs=200, patience=20)  # lr 3e-5
    assert fit.test > 0.9
    vals = [h['valid'] for h in fit.history]
    assert fit.valid == max(vals)
    assert fit.best_epoch == max(i + 1 for i, v in enumerate(vals) if v == max(vals))  # ties -> later epoch
    assert fit.epochs_run == len(vals) and (fit.epochs_run == 200 or fit.epochs_run - fit.best_epoch == 20)
    again = fit_linear(tr, va, te, multilabel=False, n_classes=3, seed=0, epochs=200, patience=20)
    np.testing.assert_array_equal(again.test_scores, fit.test_scores)  # seeded


def test_multilabel_map():
    rng = np.random.default_rng(3)
    n, dim, c = 300, 24, 4
    y = (rng.random((n, c)) < 0.3).astype(np.float32)
    w = rng.normal(size=(c, dim)) * 3
    x = (y @ w + rng.normal(size=(n, dim))).astype(np.float32)
    tr, va, te = _splits(x, y)
    r = probe(tr, va, te, multilabel=True, n_classes=c, seeds=1, lr=1e-3, epochs=100)
    assert r.metric == 'mAP' and r.mean > 0.95
    shuffled = Split(tr.x, tr.y[rng.permutation(len(tr.y))])
    r0 = probe(shuffled, va, te, multilabel=True, n_classes=c, seeds=1, lr=1e-3, epochs=30)
    assert r0.mean < 0.6  # prevalence ~0.3


def test_embeddings_select_layers_and_skip_failed_clips():
    from pathlib import Path

    from m2d.evaluate import Clip
    from m2d.evaluate.embed import Embeddings, parse_layers
    from m2d.errors import M2DError

    x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)  # 3 clips, layers [3, 11], 4-d
    emb = Embeddings('model', ['a', 'b', 'd'], x, layers=[3, 11], failed=[('c.wav', 'unreadable')])
    clips = [Clip(Path(f'{k}.wav'), k, ('x',), 'test') for k in 'abcd']
    feats, present = emb.features(clips)
    assert present.tolist() == [True, True, False, True] and feats.shape == (3, 8)
    np.testing.assert_array_equal(feats[2], x[2].reshape(-1))  # d: both layers concatenated
    last, _ = emb.features(clips, [11])
    np.testing.assert_array_equal(last, x[:, 1])
    assert parse_layers(None, 12) is None and parse_layers('all', 4) == [0, 1, 2, 3]
    assert parse_layers('0,-1,11', 12) == [0, 11]
    with pytest.raises(M2DError, match='out of range'):
        parse_layers('12', 12)
    with pytest.raises(M2DError, match='--layers'):
        parse_layers('last2', 12)


def test_convergence_note_flags_an_under_trained_probe():
    from m2d.evaluate.linear import LinearOptions, convergence_note

    opts = LinearOptions(epochs=200, lr=3e-5)
    note = convergence_note('model', {'best_epoch': [200, 199, 195], 'epochs_run': [200, 200, 200]}, opts)
    assert 'still improving at epoch 200' in note and '--lr' in note
    assert convergence_note('model', {'best_epoch': [60, 200, 195], 'epochs_run': [80, 200, 200]}, opts) is None

"""The linear probe and its metrics: hand-made metric cases, synthetic embeddings with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from m2d.evaluate import metrics
from m2d.evaluate.probe import (EarlyStopping, ProbeError, Split, _loss, auto_batch_size, carve_linear_eval_valid,
                                fit_linear, probe, standardize)


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
    # class 0: ranks + (0.9), + (0.4), - (0.2) -> 1; class 1: + (0.8), + (0.3), - (0.1) -> 1; class 2: no
    # positive -> scikit-learn's average_precision_score gives 0 and the macro mean (EVAR's mAP) keeps it
    assert metrics.mean_average_precision(y, s) == pytest.approx(2 / 3)
    s[2, 0] = 0.1  # class 0 ranking: + (0.9), - (0.2), + (0.1) -> (1 + 2/3) / 2
    assert metrics.mean_average_precision(y, s) == pytest.approx(((1 + 2 / 3) / 2 + 1 + 0) / 3)
    assert metrics.mean_average_precision(y[:, :2], s[:, :2]) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_standardize_uses_train_statistics():
    train = np.array([[0.0, 5.0], [2.0, 5.0]])
    test = np.array([[4.0, 6.0]])
    a, b = standardize(train, test)
    np.testing.assert_allclose(a, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(b, [[3, 1]])  # (4-1)/1 ; constant feature keeps scale 1
    # StandardScaler: a std below 10 x float64 eps is treated as constant (scale 1), population std
    tiny = np.array([[1.0, 0.0], [1.0 + 1e-15, 3.0], [1.0, 6.0]])
    a, = standardize(tiny)
    np.testing.assert_allclose(a[:, 0], tiny[:, 0] - tiny[:, 0].mean(), atol=1e-12)
    np.testing.assert_allclose(a[:, 1], [-1.2247449, 0.0, 1.2247449], rtol=1e-6)  # std sqrt(6), not sqrt(9)


def test_evar_batch_is_min_200_n():
    assert [auto_batch_size(n) for n in (1, 150, 200, 201, 5000)] == [1, 150, 200, 200, 200]
    x, y = _blobs(50, 3, 8, sep=3.0, seed=4)  # 150 clips
    tr, va, te = _splits(x, y)  # 90 train
    kw = dict(multilabel=False, n_classes=3, lr=1e-3, epochs=3, patience=20)
    assert fit_linear(tr, va, te, **kw).batch_size == 90
    big = Split(np.tile(tr.x, (3, 1)), np.tile(tr.y, 3))  # 270 train
    assert fit_linear(big, va, te, **kw).batch_size == 200
    assert fit_linear(big, None, te, **kw).batch_size == 200  # N before the 10 % carve
    assert fit_linear(big, va, te, batch_size=32, **kw).batch_size == 32  # --batch_size overrides


def test_evar_early_stopping_rule():
    es = EarlyStopping(patience=3)
    # 0 counts as an improvement over the initial best of 0; ties move to the later epoch
    steps = [es.update(e, v) for e, v in enumerate([0.0, 0.5, 0.4, 0.5], start=1)]
    assert steps == [(True, False), (True, False), (False, False), (True, False)]  # epoch 4 ties epoch 2
    assert es.best_epoch == 4 and es.best == 0.5
    steps = [es.update(e, v) for e, v in enumerate([0.3, 0.2, 0.4], start=5)]
    assert steps == [(False, False), (False, False), (False, True)]  # stop at the 3rd epoch without one
    assert es.best_epoch == 4
    es = EarlyStopping(patience=20)
    out = [es.update(e, 0.1 if e == 1 else 0.05)[1] for e in range(1, 30)]
    assert out.index(True) + 1 == 21  # epochs 2..21 are the 20 without improvement


def test_evar_loss_is_cross_entropy_over_n_times_c():
    import torch
    import torch.nn.functional as F

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 2])
    assert _loss(logits, y, False).item() == pytest.approx(F.cross_entropy(logits, y).item() / 3, rel=1e-6)
    yb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert _loss(logits, yb, True).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, yb).item(), rel=1e-5)


def test_evar_validation_carve_has_every_class():
    y = np.array([0] * 40 + [1] * 40 + [2] * 3)  # 83 clips: ceil(8.3) = 9 valid, class 2 is rare
    for seed in range(20):
        tr, va = carve_linear_eval_valid(y, 3, seed)
        assert len(va) == 9 and len(tr) == 74 and set(y[va]) == {0, 1, 2}
        assert sorted(np.r_[tr, va].tolist()) == list(range(83))  # a partition
    a, b = carve_linear_eval_valid(y, 3, 5), carve_linear_eval_valid(y, 3, 5)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], carve_linear_eval_valid(y, 3, 6)[1])  # seeded
    ym = np.zeros((30, 3), dtype=np.float32)  # multi-label: every column present in the valid part
    ym[:, 0] = 1
    ym[::5, 1] = 1
    ym[7, 2] = ym[8, 2] = 1
    _, va = carve_linear_eval_valid(ym, 3, 0)
    assert len(va) == 3 and (ym[va].sum(0) > 0).all()
    with pytest.raises(ProbeError, match='class 2 has 5 clip'):  # 4 classes, 3 valid clips: impossible
        carve_linear_eval_valid(np.array([0] * 10 + [1] * 10 + [2] * 5 + [3] * 5), 4, 0)


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
    assert fit.n_valid == len(va.y) and fit.batch_size == 200  # 540 train clips
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

    from m2d.encode_files import parse_layers
    from m2d.evaluate import Clip
    from m2d.evaluate.embed import Embeddings
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

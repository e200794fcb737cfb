"""LMS datasets: crop / pad / normalize, list inflation, normalization statistics, noise mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m2d.data.datasets import EPS, LMSDataset, NoiseMixDataset, compute_norm_stats, inflate_files, log_mix_exp
from m2d.data.filelist import read_file_list, write_filelist


def make_lms(folder: Path, lengths: list[int], seed: int = 0, offset: float = -8.0) -> list[Path]:
    """Random float32 LMS files ``[1, 80, T]`` named 000.npy, 001.npy, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, t in enumerate(lengths):
        p = folder / f'{i:03d}.npy'
        np.save(p, (offset + 3 * rng.standard_normal((1, 80, t))).astype(np.float32))
        paths.append(p)
    return paths


def test_crop_from_start_random_crop_and_zero_pad(tmp_path):
    (long, short) = make_lms(tmp_path, [100, 30])
    x_long, x_short = (torch.from_numpy(np.load(p)) for p in (long, short))
    ds = LMSDataset([long, short], crop_frames=50, random_crop=False)
    assert len(ds) == 2
    a = ds[0]
    assert a.shape == (1, 80, 50) and a.dtype == torch.float32
    assert torch.equal(a, x_long[..., :50])
    b = ds[1]
    assert torch.equal(b[..., :30], x_short) and torch.all(b[..., 30:] == 0)
    ds.random_crop = True
    torch.manual_seed(0)
    starts = set()
    for _ in range(200):
        c = ds[0]
        s = ds.last_crop_start
        starts.add(s)
        assert torch.equal(c, x_long[..., s:s + 50])
    assert min(starts) == 0 and max(starts) == 50 and len(starts) > 30  # every start can occur
    # normalization applies to the padding too
    ds = LMSDataset([short], crop_frames=50, norm_stats=(-8.0, 2.0), random_crop=False)
    n = ds[0]
    assert torch.allclose(n[..., :30], (x_short + 8.0) / 2.0)
    assert torch.allclose(n[..., 30:], torch.full((1, 80, 20), 4.0))


def test_repeat_short_and_two_dimensional_files(tmp_path):
    p = tmp_path / 'a.npy'
    x = np.arange(80 * 30, dtype=np.float32).reshape(80, 30)  # [F, T] files are accepted too
    np.save(p, x)
    ds = LMSDataset([p], crop_frames=70, random_crop=False, repeat_short=True)
    y = ds[0]
    assert y.shape == (1, 80, 70)
    expected = np.concatenate([x, x, x], axis=-1)[:, :70]
    np.testing.assert_array_equal(y[0].numpy(), expected)
    bad = tmp_path / 'bad.npy'
    np.save(bad, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match='bad.npy'):
        LMSDataset([bad], crop_frames=4)[0]
    with pytest.raises(OSError, match='missing.npy'):
        LMSDataset([tmp_path / 'missing.npy'], crop_frames=4)[0]


def test_csv_lists_folders_and_min_ds_size(tmp_path):
    data = tmp_path / 'data'
    paths = make_lms(data / 'lms_x', [40, 50, 60])
    # `m2d convert` layout: data/lms_x/files.csv with entries lms_x/NNN.npy (relative to data/)
    csv_path = write_filelist(data / 'lms_x')
    assert read_file_list(csv_path) == ['lms_x/000.npy', 'lms_x/001.npy', 'lms_x/002.npy']
    ds = LMSDataset(csv_path, crop_frames=40, random_crop=False)
    assert ds.data_root == data.resolve() and torch.equal(ds[2], torch.from_numpy(np.load(paths[2]))[..., :40])
    # reference layout: data/files_x.csv next to lms_x/
    write_filelist(data / 'lms_x', data / 'files_x.csv')
    assert LMSDataset(data / 'files_x.csv', crop_frames=40).data_root == data.resolve()
    assert len(LMSDataset(data / 'lms_x', crop_frames=40)) == 3  # a folder
    # inflation by repeating the list, as the reference's --min_ds_size
    big = LMSDataset(csv_path, crop_frames=40, min_ds_size=10)
    assert len(big) == 10 and big.original_size == 3
    assert big.files == ['lms_x/000.npy', 'lms_x/001.npy', 'lms_x/002.npy'] * 3 + ['lms_x/000.npy']
    assert len(LMSDataset(csv_path, crop_frames=40, min_ds_size=2)) == 3
    assert inflate_files([], 5) == [] and inflate_files([1, 2], 5) == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match='file_name'):
        (tmp_path / 'wrong.csv').write_text('path\na.npy\n')
        LMSDataset(tmp_path / 'wrong.csv')


def test_compute_norm_stats_matches_numpy_and_is_seeded(tmp_path):
    crop = 40
    paths = make_lms(tmp_path, [crop, crop, 25, crop, 10], seed=3)
    n = 37
    mean, std = compute_norm_stats(paths, n_samples=n, crop_frames=crop, seed=5)
    idx = np.random.default_rng(5).integers(0, len(paths), size=n)
    arrays = []
    for i in idx:
        a = np.load(paths[i])
        arrays.append(np.pad(a, [(0, 0), (0, 0), (0, crop - a.shape[-1])]))  # zero padding counts (quirk)
    ref = np.stack(arrays).astype(np.float64)
    assert mean == pytest.approx(ref.mean(), rel=1e-9, abs=1e-9)
    assert std == pytest.approx(ref.std(ddof=1) + EPS, rel=1e-9)
    assert (mean, std) == compute_norm_stats(paths, n_samples=n, crop_frames=crop, seed=5)
    assert (mean, std) != compute_norm_stats(paths, n_samples=n, crop_frames=crop, seed=6)
    # random crops of long files: deterministic with the seed, and the dataset's own norm_stats is ignored
    long = make_lms(tmp_path / 'long', [200, 300], seed=4)
    ds = LMSDataset(long, crop_frames=crop, norm_stats=(100.0, 1.0))
    s1 = compute_norm_stats(ds, n_samples=20, seed=1)
    assert s1 == compute_norm_stats(ds, n_samples=20, seed=1)
    assert -9 < s1[0] < -7 and 2.5 < s1[1] < 3.5


def test_random_crops_are_reproducible_with_torch_seed(tmp_path):
    paths = make_lms(tmp_path, [300, 400])
    ds = LMSDataset(paths, crop_frames=64)
    torch.manual_seed(123)
    a = [ds[i % 2] for i in range(6)]
    torch.manual_seed(123)
    b = [ds[i % 2] for i in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[2])


def test_log_mix_exp_formula_and_floor():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 3, (1, 80, 16)).astype(np.float32)
    noise = rng.normal(0, 3, (1, 80, 16)).astype(np.float32)
    clean[0, 0, :4] = -200.0  # exp underflows to 0 in float32: floored at eps
    noise[0, 0, :4] = -200.0
    got = log_mix_exp(torch.from_numpy(noise), torch.from_numpy(clean), 0.2).numpy()
    ref = np.log(np.maximum(0.2 * np.exp(noise) + 0.8 * np.exp(clean), np.finfo(np.float32).eps))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.allclose(got[0, 0, :4], np.log(np.finfo(np.float32).eps))


def test_noise_mix_dataset_against_numpy(tmp_path):
    crop = 32
    clean_paths = make_lms(tmp_path / 'clean', [crop, crop], seed=1, offset=-9.0)
    noise_path = make_lms(tmp_path / 'noise', [20], seed=2, offset=-12.0)[0]  # short: repeated
    mc, sc, mn = -9.5, 3.25, -11.0
    clean = LMSDataset(clean_paths, crop_frames=crop, norm_stats=(mc, sc), random_crop=False)
    noise = LMSDataset([noise_path], crop_frames=crop, norm_stats=(mn, 7.0), random_crop=False, repeat_short=True)
    ds = NoiseMixDataset(clean, noise, noise_ratio=0.2)
    assert ds.norm_stats == (mc, sc) and len(ds) == 2
    item = ds[1]
    assert set(item) == {'clean', 'x'} and item['x'].shape == (1, 80, crop)
    c = np.load(clean_paths[1]).astype(np.float64) - mc
    n = np.load(noise_path).astype(np.float64)
    n = np.concatenate([n, n], axis=-1)[..., :crop] - mn  # repeat-padded, mean-subtracted, std left at 1
    mixed = np.log(np.maximum(0.2 * np.exp(n) + 0.8 * np.exp(c), np.finfo(np.float32).eps))
    np.testing.assert_allclose(item['clean'].numpy(), c / sc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(item['x'].numpy(), mixed / sc, rtol=1e-5, atol=1e-5)
    # ratio 0: the input is the clean LMS; ratio 1: the noise
    only_clean = NoiseMixDataset(LMSDataset(clean_paths, crop_frames=crop, norm_stats=(mc, sc)), noise, 0.0)[0]
    assert torch.equal(only_clean['x'], only_clean['clean'])
    only_noise = NoiseMixDataset(LMSDataset(clean_paths, crop_frames=crop, norm_stats=(mc, sc), random_crop=False),
                                 LMSDataset([noise_path], crop_frames=crop, norm_stats=(mn, 1.0), repeat_short=True,
                                            random_crop=False), 1.0)[0]
    np.testing.assert_allclose(only_noise['x'].numpy(), n / sc, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='noise_ratio'):
        NoiseMixDataset(clean, noise, 1.5)


def test_noise_mix_computes_statistics_and_draws_noise_per_item(tmp_path):
    clean_paths = make_lms(tmp_path / 'clean', [64] * 4, seed=1)
    noise_paths = make_lms(tmp_path / 'noise', [64] * 3, seed=2, offset=-12.0)
    ds = NoiseMixDataset(clean_paths, noise_paths, noise_ratio=0.2, n_norm_samples=30, seed=7, crop_frames=64)
    expected = compute_norm_stats(clean_paths, n_samples=30, crop_frames=64, seed=7)
    assert ds.norm_stats == pytest.approx(expected)
    assert ds.noise.norm_stats[0] == pytest.approx(compute_norm_stats(noise_paths, 30, crop_frames=64, seed=8)[0])
    # The noise index is a function of the global RNG state alone (what the trainer seeds per item).
    torch.manual_seed(0)
    used = [ds.next_noise_index() for _ in range(60)]
    torch.manual_seed(0)
    assert [ds.next_noise_index() for _ in range(60)] == used
    assert set(used) == {0, 1, 2}
    item = ds[0]
    assert abs(float(item['clean'].mean())) < 0.5 and 0.5 < float(item['clean'].std()) < 1.5

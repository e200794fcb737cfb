"""Training data at AudioSet scale: names in a `PathTable`, the list read once, samples bit-identical
to the per-item computation of before (crops, values, masks), float16 files, the sampler's keys."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from m2d.data.datasets import LMSDataset
from m2d.data.filelist import DataError, read_file_list, write_csv_list
from m2d.data.pathtable import PathTable
from m2d.masking import make_mask
from m2d.train import seeding
from m2d.train.distributed import ResumableSampler


def _write(folder: Path, lengths: list[int], dtype=np.float32, seed: int = 0,
           two_d: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(lengths):
        x = (-6 + 3 * rng.standard_normal((1, 80, t))).astype(dtype)
        p = folder / f'{i:03d}.npy'
        np.save(p, x[0] if i in two_d else x)
        out.append(p)
    return out


# ----- the computation of before, transcribed (main at 6e33ba4: LMSDataset.load/crop/normalize,
# SeededItems.__getitem__ with a new mask generator per item, default_collate) --------------------

def _old_item(paths, index, crop, norm_stats, random_crop=True, repeat_short=False):
    lms = np.load(paths[index])
    if lms.ndim == 2:
        lms = lms[None]
    lms = torch.from_numpy(np.ascontiguousarray(lms, dtype=np.float32))
    n, length = crop, lms.shape[-1]
    if repeat_short and 0 < length < n:
        lms = lms.repeat(*([1] * (lms.dim() - 1)), math.ceil(n / length))
        length = lms.shape[-1]
    start = 0
    if length > n and random_crop:
        start = int(torch.randint(0, length - n + 1, (1,), generator=None))
    lms = lms[..., start:start + n]
    if lms.shape[-1] < n:
        lms = torch.nn.functional.pad(lms, (0, n - lms.shape[-1]))
    lms = lms.contiguous()
    if norm_stats is None:
        return lms
    mean, std = norm_stats
    return (lms - mean) / std


def _old_seeded(paths, key, seed, crop, norm_stats, mask_fn, **kw):
    epoch, index = key
    s = seeding.item_seed(seed, epoch, index)
    torch.default_generator.manual_seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)
    item = {'x': _old_item(paths, index, crop, norm_stats, **kw), 'index': index}
    mask = mask_fn(torch.Generator().manual_seed(seeding.item_seed(seed, epoch, index, stream=1)))
    item['ids_restore'] = mask.ids_restore[0]
    item['len_keep'] = mask.len_keep
    return item


def _old_keys(n, epoch, world=1, rank=0, seed=0, start=0):
    s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    s.set_epoch(epoch)
    return [(epoch, i) for i in list(s)[start:]]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))



@pytest.mark.parametrize('workers', [0, 1])
def test_batches_are_bit_identical_to_the_per_item_computation_of_before(tmp_path, workers):
    # long float32 files (the fast path), a short one (zero padding), a [F, T] file, float16 files
    paths = _write(tmp_path / 'a', [240, 301, 150, 208, 260, 209], two_d=(3,))
    paths += _write(tmp_path / 'b', [250, 230], dtype=np.float16, seed=1)
    crop, stats, seed = 208, (-5.5, 2.75), 11
    mask_fn = lambda g: make_mask('unstructured', 1, (5, 13), 0.7, generator=g)  # noqa: E731
    ds = LMSDataset(paths, crop_frames=crop, norm_stats=stats)
    items = seeding.SeededItems(ds, seed, mask_fn)
    sampler = ResumableSampler(items, shuffle=True, seed=seed)
    loader = DataLoader(items, batch_size=4, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=seeding.collate)
    for epoch, start in [(0, 0), (3, 1)]:
        sampler.set_epoch(epoch, start)
        keys = _old_keys(len(paths), epoch, seed=seed, start=start)
        assert list(sampler) == keys
        batches = list(loader)
        assert len(batches) == len(keys) // 4
        for b, batch in enumerate(batches):
            old = default_collate([_old_seeded(paths, k, seed, crop, stats, mask_fn) for k in keys[4 * b:4 * b + 4]])
            assert sorted(batch) == sorted(old)
            assert _bits_equal(batch['x'], old['x'])
            for k in ('index', 'ids_restore', 'len_keep'):
                assert torch.equal(batch[k], old[k]) and batch[k].dtype == old[k].dtype
    # one item at a time (the feature sample, NoiseMix and speech sets) gives the same too
    for key in [(5, 0), (5, 2), (5, 3), (5, 7)]:
        new, old = items[key], _old_seeded(paths, key, seed, crop, stats, mask_fn)
        assert _bits_equal(new['x'], old['x']) and torch.equal(new['ids_restore'], old['ids_restore'])


def test_raw_items_and_repeat_short_unchanged(tmp_path):
    paths = _write(tmp_path, [100, 30, 64])
    for kw in ({'random_crop': True}, {'random_crop': False}, {'repeat_short': True}):
        ds = LMSDataset(paths, crop_frames=64, norm_stats=None, **kw)
        for i in range(3):
            old = []
            for get in (ds.__getitem__, ds.raw_item, lambda i: _old_item(paths, i, 64, None, **kw)):
                torch.manual_seed(i)
                old.append(get(i))
            assert _bits_equal(old[0], old[2]) and _bits_equal(old[1], old[2])
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)  # compute_norm_stats' way
        assert _bits_equal(ds.raw_item(0, g1), ds.crop(ds.load(0), g2))


def test_collate_copies_nothing_for_a_batch_and_falls_back_otherwise():
    batch = torch.arange(24, dtype=torch.float32).reshape(3, 1, 2, 4)
    items = [{'x': batch[i], 'index': i} for i in range(3)]
    out = seeding.collate(items)
    assert out['x'].data_ptr() == batch.data_ptr() and torch.equal(out['x'], batch)
    assert torch.equal(out['index'], torch.tensor([0, 1, 2]))
    shuffled = [items[1], items[0], items[2]]  # not in slot order: a copy, in the items' order
    assert torch.equal(seeding.collate(shuffled)['x'], torch.stack([batch[1], batch[0], batch[2]]))
    loose = [{'x': torch.ones(1, 2, 4), 'index': 0}, {'x': torch.zeros(1, 2, 4), 'index': 1}]
    assert torch.equal(seeding.collate(loose)['x'], default_collate(loose)['x'])


def test_float16_files_read_as_their_float32_values(tmp_path):
    (p16,) = _write(tmp_path / 'h', [300], dtype=np.float16)
    x16 = np.load(p16)
    ds = LMSDataset([p16], crop_frames=208, norm_stats=None, random_crop=False)
    y = ds[0]
    assert y.dtype == torch.float32 and np.array_equal(y.numpy(), x16[..., :208].astype(np.float32))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0], y)  # as a spawned worker gets it
    full = ds.load(0)
    assert full.dtype == torch.float32 and np.array_equal(full.numpy(), x16.astype(np.float32))
    # normalized: as the float32 file holding the same values
    p32 = tmp_path / 'f32.npy'
    np.save(p32, x16.astype(np.float32))
    a = LMSDataset([p16], crop_frames=208, norm_stats=(-6.0, 3.0))
    b = LMSDataset([p32], crop_frames=208, norm_stats=(-6.0, 3.0))
    torch.manual_seed(3)
    ya = a[0]
    torch.manual_seed(3)
    assert _bits_equal(ya, b[0])


def test_tiny_pretrain_on_float16_files_equals_float32_files(tmp_path):
    """A float16 list trains to the same weights as a float32 list of the same values."""
    from m2d.cli import main

    lists = {}
    for kind, dtype in (('f16', np.float16), ('f32', np.float32)):
        folder = tmp_path / kind / 'lms'
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            x = (-6 + 3 * rng.standard_normal((1, 80, 230))).astype(np.float16)
            np.save(folder / f'{i}.npy', x.astype(dtype))
        lists[kind] = write_csv_list([f'lms/{i}.npy' for i in range(8)], tmp_path / kind / 'files.csv')
    weights = {}
    for kind, csv in lists.items():
        out = tmp_path / f'run_{kind}'
        rc = main(['pretrain', '--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1',
                   '--decoder_embed_dim', '64', '--decoder_num_heads', '2', '--input_size', '80x208',
                   '--min_ds_size', '0', '--feature_eval_freq', '0', '--csv_main', str(csv), '--batch_size', '4',
                   '--epochs', '1', '--num_workers', '1', '--norm_stats_samples', '50', '--fp32', '--device', 'cpu',
                   '--output_dir', str(out)])
        assert rc == 0
        ckpt = torch.load(next(out.glob('checkpoint-*.pth')), map_location='cpu', weights_only=False)
        weights[kind] = ckpt['model']
    assert weights['f16'].keys() == weights['f32'].keys()
    for k in weights['f16']:
        assert torch.equal(weights['f16'][k], weights['f32'][k]), k


def test_datasets_hold_names_in_one_table_and_pickle_small(tmp_path):
    from m2d.data.speech import SpeechTeacherDataset

    names = [f'lms/unbalanced_train_segments/Y{i:011d}_30000_40000.npy' for i in range(20000)]
    csv = write_csv_list(names, tmp_path / 'files.csv')
    ds = LMSDataset(csv, data_root=tmp_path, crop_frames=608, min_ds_size=30000)
    assert isinstance(ds.files, PathTable) and len(ds) == 30000 and ds.original_size == 20000
    assert ds.files[20000] == names[0] and ds.path(29999) == tmp_path / names[9999]
    size = len(pickle.dumps(ds))
    assert size < ds.files.nbytes + 4096  # the two buffers and a few attributes, nothing per name
    back = pickle.loads(pickle.dumps(ds))
    assert back.files == ds.files and back.path(123) == ds.path(123)
    sp = SpeechTeacherDataset(csv, tmp_path, crop_frames=208, norm_stats=(0.0, 1.0), min_ds_size=25000)
    assert isinstance(sp.files, PathTable) and len(sp) == 25000
    assert len(pickle.dumps(sp)) < sp.files.nbytes + 4096


def test_read_file_list_streams_columns_quotes_and_errors(tmp_path):
    p = tmp_path / 'l.csv'
    p.write_text('label,file_name,other\n1,"a,b.npy",x\n\n2,c/d.npy,y\n')
    assert list(read_file_list(p)) == ['a,b.npy', 'c/d.npy'] and isinstance(read_file_list(p), PathTable)
    (tmp_path / 'short.csv').write_text('label,file_name\n1\n')
    with pytest.raises(DataError, match='short.csv, line 2'):
        read_file_list(tmp_path / 'short.csv')
    (tmp_path / 'empty.csv').write_text('')
    with pytest.raises(DataError, match='file_name'):
        read_file_list(tmp_path / 'empty.csv')


def test_rank0_reads_the_list_once(tmp_path, monkeypatch):
    from m2d.data import filelist
    from m2d.train import loop
    from m2d.train.config import TrainConfig

    paths = _write(tmp_path / 'lms', [230] * 6)
    csv = write_csv_list([f'lms/{p.name}' for p in paths], tmp_path / 'files.csv')
    reads = []
    real = filelist.read_file_list
    monkeypatch.setattr(filelist, 'read_file_list', lambda path: reads.append(path) or real(path))
    opts = TrainConfig(csv_main=str(csv), input_size='80x208', norm_stats_samples=20, min_ds_size=10)
    stats = loop.compute_stats(opts)
    ds = loop.build_dataset(opts, stats)
    assert len(reads) == 1 and len(ds) == 10 and ds.norm_stats == stats and ds.data_root == tmp_path.resolve()
    assert loop.build_dataset(opts, stats).files == ds.files and len(reads) == 2  # nothing kept: read again


@pytest.mark.parametrize('n,world', [(10, 1), (10, 3), (7, 4), (3, 8)])
def test_sampler_keys_equal_distributed_sampler(n, world):
    for rank in range(world):
        for epoch, start in [(0, 0), (2, 1)]:
            s = ResumableSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            s.set_epoch(epoch, start)
            keys = list(s)
            assert keys == _old_keys(n, epoch, world, rank, seed=5, start=start) and len(keys) == len(s)
            assert all(type(i) is int for _, i in keys)


def test_npy_reader_reads_plain_files_and_leaves_the_rest_to_np_load(tmp_path):
    from m2d.data.npyread import NpyReader

    r = NpyReader()
    rng = np.random.default_rng(0)
    plain = {}
    for name, arr in {'f32': rng.standard_normal((1, 80, 50)).astype(np.float32),
                      'f16': rng.standard_normal((80, 33)).astype(np.float16),
                      'be': rng.standard_normal((2, 3)).astype('>f4'),
                      'empty': np.zeros((1, 80, 0), np.float32)}.items():
        np.save(tmp_path / f'{name}.npy', arr)
        plain[name] = arr
    for name, arr in plain.items():
        got = r.read(tmp_path / f'{name}.npy')
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    np.lib.format.write_array(open(tmp_path / 'v2.npy', 'wb'), plain['f32'], version=(2, 0))
    assert np.array_equal(r.read(tmp_path / 'v2.npy'), plain['f32'])
    np.save(tmp_path / 'fortran.npy', np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32)))
    np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    (tmp_path / 'short.npy').write_bytes((tmp_path / 'f32.npy').read_bytes()[:-8])
    (tmp_path / 'text.npy').write_text('not an array')
    for name in ('fortran', 'objects', 'short', 'text'):
        assert r.read(tmp_path / f'{name}.npy') is None, name  # np.load's business (and its errors)
    with pytest.raises(OSError):
        r.read(tmp_path / 'missing.npy')
    # LMSDataset falls back for them: same values as np.load, or np.load's error naming the file
    ds = LMSDataset([tmp_path / 'fortran.npy', tmp_path / 'short.npy'], crop_frames=5, random_crop=False)
    assert np.array_equal(ds[0].numpy()[0], np.load(tmp_path / 'fortran.npy'))
    with pytest.raises(OSError, match='short.npy'):
        ds[1]

"""Data-parallel pre-training: the resumable sampler, per-item seeding, and torchrun with 2 CPU
processes (gloo) giving the same weights as one process on the same global batch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import FSDD, need

TINY = ['--model', 'm2d_vit_tiny', '--depth', '2', '--decoder_depth', '1', '--decoder_embed_dim', '128',
        '--decoder_num_heads', '4', '--input_size', '80x208', '--min_ds_size', '0', '--feature_eval_freq', '0']


def fsdd_lms(tmp_path: Path) -> Path:
    """8 FSDD recordings converted to LMS under tmp_path/lms (with files.csv); returns that folder."""
    need(FSDD)
    from m2d.data.convert import convert

    wav = tmp_path / 'wav'
    wav.mkdir()
    for f in sorted(FSDD.glob('*.wav'))[::300][:8]:
        (wav / f.name).symlink_to(f)
    convert(wav, tmp_path / 'lms', workers=0, progress=False)
    return tmp_path / 'lms'


def load_model(path: Path) -> dict[str, torch.Tensor]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)['model']


def test_resumable_sampler_partitions_and_skips():
    from m2d.train.distributed import ResumableSampler

    data = list(range(10))
    per_rank = []
    for rank in range(2):
        s = ResumableSampler(data, num_replicas=2, rank=rank, seed=3)
        s.set_epoch(4)
        keys = list(s)
        assert all(e == 4 for e, _ in keys) and len(keys) == len(s) == 5
        per_rank.append([i for _, i in keys])
        s.set_epoch(4, start=3)  # mid-epoch: the same order, minus what was done
        assert [i for _, i in s] == per_rank[-1][3:] and len(s) == 2
    assert sorted(per_rank[0] + per_rank[1]) == data
    s.set_epoch(5)
    assert [i for _, i in s] != per_rank[1]  # a new order each epoch


def test_seeded_items_do_not_depend_on_call_order():
    from m2d.masking import make_mask
    from m2d.train.seeding import SeededItems

    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.rand(3) + float(np.random.rand())

    items = SeededItems(Noise(), seed=1, mask_fn=lambda g: make_mask('unstructured', 1, (5, 13), 0.7, generator=g))
    first = [items[(2, i)] for i in range(6)]
    again = [items[(2, i)] for i in reversed(range(6))][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a['x'], b['x']) and torch.equal(a['ids_restore'], b['ids_restore'])
        assert a['len_keep'] == int(65 * 0.3)
    assert not torch.equal(items[(3, 0)]['x'], first[0]['x'])  # another epoch, another draw
    assert not torch.equal(first[0]['ids_restore'], first[1]['ids_restore'])


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_torchrun_two_processes_match_one_process(tmp_path):
    fsdd_lms(tmp_path)
    # 8 samples = one global batch per epoch; lr large enough that a wrong split would show
    common = [*TINY, '--csv_main', str(tmp_path / 'lms' / 'files.csv'), '--epochs', '2', '--warmup_epochs', '0',
              '--lr', '1e-4', '--norm_stats=-2.2,4.7', '--save_freq', '1', '--num_workers', '0', '--log_every', '1',
              '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                '--master_port', str(29500 + os.getpid() % 1000)]
    ddp = subprocess.run([*torchrun, '-m', 'm2d', 'pretrain', *common, '--batch_size', '4', '--output_dir', 'ddp'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, '-m', 'm2d', 'pretrain', *common, '--batch_size', '8', '--max_steps', '1',
                          '--output_dir', 'one'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert ddp.stderr.count('step 1/2 |') == 1  # only rank 0 logs progress
    assert (tmp_path / 'ddp' / 'checkpoint-2.pth').exists()  # trained 2 steps

    d1, d2 = load_model(tmp_path / 'ddp' / 'checkpoint-1.pth'), load_model(tmp_path / 'ddp' / 'checkpoint-2.pth')
    s1 = load_model(tmp_path / 'one' / 'checkpoint-1.pth')
    diff = max((d1[k] - s1[k]).abs().max().item() for k in d1)
    moved = max((d2[k] - d1[k]).abs().max().item() for k in d1)
    assert diff <= 1e-5, f'2 processes vs 1: max |delta| {diff:.3g}'
    assert moved > 5e-5  # Adam moves weights by ~lr per step: far more than the tolerance


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 4 (accum_iter 2) update the online weights as one batch of 8 does."""
    from m2d.train import train
    from m2d.train.config import TrainConfig

    fsdd_lms(tmp_path)
    kw = dict(model='m2d_vit_tiny', depth=2, decoder_depth=1, decoder_embed_dim=128, decoder_num_heads=4,
              input_size='80x208', min_ds_size=0, feature_eval_freq=0, csv_main=str(tmp_path / 'lms' / 'files.csv'),
              epochs=1, warmup_epochs=0, lr=1e-4, norm_stats='-2.2,4.7', num_workers=0, device='cpu')
    big = load_model(train(TrainConfig(**kw, batch_size=8, output_dir=str(tmp_path / 'big'))).checkpoint)
    acc = load_model(train(TrainConfig(**kw, batch_size=4, accum_iter=2, output_dir=str(tmp_path / 'acc'))).checkpoint)
    online = [k for k in big if not k.startswith('target_')]
    diff = max((big[k] - acc[k]).abs().max().item() for k in online)
    assert diff <= 1e-5, f'accumulated vs one batch: max |delta| {diff:.3g}'

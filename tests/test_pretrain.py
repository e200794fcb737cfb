"""`m2d pretrain` end to end on a tiny M2D over LMS converted from FSDD: trains, logs, loads in
RuntimeM2D, resumes after SIGKILL to bit-identical weights, stops on a non-finite loss (exit status 3),
and leaves no run folder when it fails to start."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FSDD, fsdd_lms_csv

N_FILES = 50
TINY = ['--model', 'm2d_vit_tiny', '--depth', '2', '--decoder_depth', '1', '--decoder_embed_dim', '128',
        '--decoder_num_heads', '4', '--input_size', '80x208', '--min_ds_size', '0', '--feature_eval_freq', '0']


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')

# `m2d pretrain` whose process announces step STOP_AT (a file named 'at-step-STOP_AT') and then waits to be killed
PAUSING_PRETRAIN = """
import argparse, pathlib, sys, time
from m2d.commands import pretrain
from m2d.train.config import config_from_args
from m2d.train.loop import train

stop_at = int(sys.argv[1])
def pause(step):
    if step == stop_at:
        pathlib.Path(f'at-step-{step}').touch()
        time.sleep(600)

parser = argparse.ArgumentParser()
pretrain.add_arguments(parser)
train(config_from_args(parser.parse_args(sys.argv[2:])), on_step=pause)
"""


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'm2d', 'pretrain', *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def kill_at_step(step: int, args: list[str], cwd: Path) -> int:
    """Run pretrain until it has done `step` micro-steps, then SIGKILL it, as a crash would; returns its status."""
    proc = subprocess.Popen([sys.executable, '-c', PAUSING_PRETRAIN, str(step), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (cwd / f'at-step-{step}').exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, 'the run never reached the step'
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


@pytest.fixture(scope='module')
def lms_csv(tmp_path_factory) -> Path:
    """~50 FSDD recordings converted to LMS .npy files (+ files.csv)."""
    return fsdd_lms_csv(tmp_path_factory.mktemp('fsdd'), 60, N_FILES)


@pytest.fixture(scope='module')
def trained(lms_csv, tmp_path_factory) -> Path:
    """A 2-epoch run with computed norm_stats and the effective-rank monitor; returns the run folder."""
    from m2d.cli import main

    out = tmp_path_factory.mktemp('runs')
    rc = main(['pretrain', *TINY, '--csv_main', str(lms_csv), '--batch_size', '8', '--epochs', '2',
               '--warmup_epochs', '1', '--num_workers', '0', '--log_every', '2', '--feature_eval_freq', '1',
               '--feature_eval_samples', '16', '--norm_stats_samples', '200', '--output_root', str(out),
               '--device', 'cpu'])
    assert rc == 0
    (run,) = out.iterdir()
    return run


def test_tiny_m2d_trains_and_logs(trained):
    from m2d.checkpoint import parse_model_name

    name = parse_model_name(trained.name)
    assert name is not None and name.model == 'm2d_vit_tiny' and name.input_size == (80, 208)
    assert trained.name.endswith('-mr7')
    records = [json.loads(line) for line in (trained / 'log.jsonl').read_text().splitlines()]
    steps = [r for r in records if r['type'] == 'train']
    epochs = [r for r in records if r['type'] == 'epoch']
    assert [r['step'] for r in steps] == [2, 4, 6, 8, 10, 12]  # 50 files // 8 = 6 steps per epoch
    for r in steps:
        assert math.isfinite(r['loss']) and 0 < r['loss'] < 4  # norm_mse lies in [0, 4]
        assert r['samples_per_s'] > 0 and 0.99995 <= r['ema_decay'] <= 0.99999 and r['grad_norm'] > 0
    assert steps[0]['lr'] < steps[2]['lr']  # warmup, then
    assert steps[-1]['lr'] < steps[2]['lr']  # cosine decay
    assert [r['epoch'] for r in epochs] == [1, 2]
    assert all(1.0 < r['effective_rank'] <= 192 for r in epochs)
    assert (trained / 'train.log').read_text().count('step ') >= 6
    if importlib.util.find_spec('matplotlib') is not None:
        png = trained / 'training_curves.png'
        assert png.exists() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_checkpoint_container_and_runtime(trained, lms_csv):
    from m2d import RuntimeM2D
    from m2d.audio import load_audio

    ckpt = load_ckpt(trained / 'checkpoint-2.pth')
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 2 and ckpt['step'] == 12 and isinstance(ckpt['args'], argparse.Namespace)
    assert ckpt['args'].input_size == [80, 208] and ckpt['args'].model == 'm2d_vit_tiny'
    assert isinstance(ckpt['rng']['torch'], torch.Tensor)
    sd = ckpt['model']
    assert {'target_blocks.0.attn.qkv.weight', 'decoder_pred.weight', 'mask_token'} <= set(sd)
    mean, std = sd['norm_stats'].tolist()
    assert mean < -1 and 1 < std < 10  # computed from the data (log-mel), not the (0, 1) default
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())

    rt = RuntimeM2D(trained / 'checkpoint-2.pth')
    assert rt.norm_stats.tolist() == pytest.approx([mean, std])
    torch.testing.assert_close(rt.backbone.blocks[1].mlp.fc2.weight, sd['blocks.1.mlp.fc2.weight'])
    wav = torch.from_numpy(load_audio(sorted(FSDD.glob('*.wav'))[0], 16000))[None]
    feats = rt.encode(wav)
    assert feats.shape[0] == 1 and feats.shape[2] == 5 * 192 and torch.isfinite(feats).all()


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(lms_csv, tmp_path):
    common = [*TINY, '--csv_main', str(lms_csv), '--batch_size', '8', '--epochs', '2', '--warmup_epochs', '1',
              '--log_every', '1', '--norm_stats=-2.2,4.7', '--save_freq', '1', '--save_freq_steps', '2',
              '--device', 'cpu']
    a = run_cli([*common, '--num_workers', '0', '--output_dir', 'a'], tmp_path)
    assert a.returncode == 0, a.stderr[-2000:]
    assert kill_at_step(9, [*common, '--num_workers', '0', '--output_dir', 'b'], tmp_path) == -signal.SIGKILL
    assert not (tmp_path / 'b' / 'checkpoint-2.pth').exists()
    assert load_ckpt(tmp_path / 'b' / 'checkpoint-last.pth')['step'] == 8  # mid-epoch 2, iteration 2
    # resume with loader workers this time: items do not depend on who loads them
    r = run_cli([*common, '--num_workers', '2', '--output_dir', 'b', '--resume', 'auto'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'resumed from' in r.stderr

    ca, cb = load_ckpt(tmp_path / 'a' / 'checkpoint-2.pth'), load_ckpt(tmp_path / 'b' / 'checkpoint-2.pth')
    assert ca['step'] == cb['step'] == 12
    assert ca['model'].keys() == cb['model'].keys()
    differ = [k for k in ca['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not differ, f'weights differ after resume: {differ[:5]}'
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    steps = [json.loads(x)['step'] for x in (tmp_path / 'b' / 'log.jsonl').read_text().splitlines()
             if json.loads(x)['type'] == 'train']
    assert steps == list(range(1, 13))  # the killed run's step 9 record was dropped on resume


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(lms_csv, tmp_path, capsys):
    from m2d.cli import main
    from m2d.train import NonFiniteLossError, train
    from m2d.train.config import TrainConfig

    data = tmp_path / 'lms'
    data.mkdir()
    for i, f in enumerate(sorted(lms_csv.parent.glob('*.npy'))[:8]):
        np.save(data / f'{i}.npy', np.load(f))
    kw = dict(model='m2d_vit_tiny', depth=2, decoder_depth=1, decoder_embed_dim=128, decoder_num_heads=4,
              input_size='80x208', min_ds_size=0, feature_eval_freq=0, csv_main=str(data), batch_size=2,
              epochs=2, norm_stats='-2.2,4.7', num_workers=0, output_dir=str(tmp_path / 'run'), device='cpu')
    train(TrainConfig(**kw, max_steps=2))
    last = tmp_path / 'run' / 'checkpoint-last.pth'
    assert load_ckpt(last)['step'] == 2
    for f in data.glob('*.npy'):  # the data goes bad
        np.save(f, np.full_like(np.load(f), np.nan))
    with pytest.raises(NonFiniteLossError, match=r'non-finite loss \(nan\) at step 3 .*checkpoint-last.pth'):
        train(TrainConfig(**kw, resume='auto'))
    # the command line: one line and exit status 3
    argv = [f'--{k}={v}' for k, v in kw.items()]
    assert main(['pretrain', *argv, '--resume', 'auto']) == 3
    err = capsys.readouterr().err
    assert 'm2d pretrain: error: non-finite loss (nan) at step 3' in err and 'Traceback' not in err
    good = load_ckpt(last)
    assert good['step'] == 2
    assert all(torch.isfinite(v).all() for v in good['model'].values() if v.is_floating_point())


def test_init_msm_mae_and_structured_masks(trained, lms_csv, tmp_path):
    from m2d.train import train
    from m2d.train.config import TrainConfig

    kw = dict(depth=2, decoder_depth=1, decoder_embed_dim=128, decoder_num_heads=4, input_size='80x208',
              min_ds_size=0, feature_eval_freq=0, csv_main=str(lms_csv), batch_size=8, epochs=1, max_steps=1,
              norm_stats='-2.2,4.7', num_workers=0, device='cpu', log_every=1)
    # --init: all weights from a full checkpoint, fresh optimizer; with lr 0 the online weights stay
    src = load_ckpt(trained / 'checkpoint-2.pth')['model']
    res = train(TrainConfig(model='m2d_vit_tiny', init=str(trained / 'checkpoint-2.pth'), lr=0.0,
                            output_dir=str(tmp_path / 'init'), **kw))
    ck = load_ckpt(res.checkpoint)
    assert ck['step'] == 1 and all(int(s['step']) == 1 for s in ck['optimizer']['state'].values())
    for k in ('blocks.0.attn.qkv.weight', 'decoder_pred.weight', 'patch_embed.proj.weight'):
        assert torch.equal(ck['model'][k], src[k])
    assert ck['model']['norm_stats'].tolist() == pytest.approx([-2.2, 4.7])  # the data's statistics
    # MSM-MAE and the structured mask train too
    for model, extra in (('msm_mae_vit_tiny', {}), ('m2d_vit_tiny', {'mask_type': 'structured'})):
        res = train(TrainConfig(model=model, output_dir=str(tmp_path / model / extra.get('mask_type', 'u')),
                                **kw, **extra))
        assert res.step == 1 and math.isfinite(res.loss)


def test_compile_option_trains_the_same_weights(lms_csv, tmp_path):
    """``--compile eager`` captures every block with torch.compile (no code generation, so it runs in
    seconds on a CPU) and trains to the weights of the uncompiled run."""
    from m2d.train import train
    from m2d.train.config import TrainConfig

    kw = dict(model='m2d_vit_tiny', depth=2, decoder_depth=1, decoder_embed_dim=128, decoder_num_heads=4,
              input_size='80x208', min_ds_size=0, feature_eval_freq=0, csv_main=str(lms_csv), batch_size=4,
              epochs=1, max_steps=2, norm_stats='-2.2,4.7', num_workers=0, device='cpu')
    plain = load_ckpt(train(TrainConfig(**kw, output_dir=str(tmp_path / 'plain'))).checkpoint)['model']
    compiled = load_ckpt(train(TrainConfig(**kw, compile='eager', output_dir=str(tmp_path / 'compiled'))).checkpoint)
    assert compiled['step'] == 2 and compiled['args'].compile == 'eager'
    assert set(compiled['model']) == set(plain)  # compiling renames no state-dict key
    for k, v in plain.items():
        torch.testing.assert_close(compiled['model'][k], v, rtol=1e-4, atol=1e-6, msg=k)
    one = load_ckpt(train(TrainConfig(**{**kw, 'max_steps': 1}, output_dir=str(tmp_path / 'one'))).checkpoint)
    assert not torch.equal(one['model']['blocks.0.mlp.fc1.weight'], plain['blocks.0.mlp.fc1.weight'])  # step 2 moved


def test_background_checkpoint_writes_equal_sync_ones(lms_csv, tmp_path, monkeypatch):
    """``--checkpoint_writes background`` writes from a snapshot taken at the same point of the run:
    every file holds the same weights, optimizer state and step as with synchronous writes."""
    from m2d.train import state, train
    from m2d.train.config import TrainConfig

    kw = dict(model='m2d_vit_tiny', depth=2, decoder_depth=1, decoder_embed_dim=128, decoder_num_heads=4,
              input_size='80x208', min_ds_size=0, feature_eval_freq=0, csv_main=str(lms_csv), batch_size=8,
              epochs=2, save_freq=1, save_freq_steps=2, norm_stats='-2.2,4.7', num_workers=0, device='cpu')
    runs = {}
    for mode in ('sync', 'background'):
        res = train(TrainConfig(**kw, checkpoint_writes=mode, output_dir=str(tmp_path / mode)))
        assert res.checkpoint == tmp_path / mode / 'checkpoint-2.pth' and res.step == 12
        runs[mode] = {p.name: load_ckpt(p) for p in sorted((tmp_path / mode).glob('checkpoint-*.pth'))}
    assert list(runs['sync']) == list(runs['background']) == ['checkpoint-1.pth', 'checkpoint-2.pth',
                                                              'checkpoint-last.pth']
    for name, a in runs['sync'].items():
        b = runs['background'][name]
        assert (a['step'], a['epoch'], a['iter_in_epoch']) == (b['step'], b['epoch'], b['iter_in_epoch'])
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), name
        sa, sb = a['optimizer']['state'], b['optimizer']['state']
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), name

    # a write that fails in the thread stops the run with its error
    def failing_write(ckpt, out_dir, name):
        raise OSError(f'{out_dir / name}: No space left on device')

    monkeypatch.setattr(state, 'write', failing_write)
    with pytest.raises(OSError, match='No space left on device'):
        train(TrainConfig(**kw, checkpoint_writes='background', output_dir=str(tmp_path / 'full')))


def test_compile_and_malloc_options_parse():
    from m2d.commands import pretrain
    from m2d.malloc import keep_freed_memory
    from m2d.train.config import ConfigError, TrainConfig, compile_options, config_from_args

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    cfg = config_from_args(parser.parse_args(['--compile']))
    assert cfg.compile == 'default' and cfg.keep_freed_memory and cfg.checkpoint_writes == 'sync'
    cfg = config_from_args(parser.parse_args(['--compile', 'reduce-overhead', '--no-keep-freed-memory']))
    assert cfg.compile == 'reduce-overhead' and not cfg.keep_freed_memory
    assert compile_options('eager') == {'backend': 'eager'} and compile_options('max-autotune') == {'mode': 'max-autotune'}
    with pytest.raises(SystemExit):
        parser.parse_args(['--compile', 'fastest'])
    with pytest.raises(ConfigError, match='--compile must be one of'):
        TrainConfig(compile='fastest').check()
    if os.path.exists('/lib/x86_64-linux-gnu/libc.so.6') or os.path.exists('/lib64/libc.so.6'):
        assert keep_freed_memory()  # glibc accepts the mallopt settings


@pytest.mark.parametrize('bad, message', [
    (['--csv_main', 'missing.csv'], 'missing.csv: no such'),
    (['--model', 'm2d_vit_huge'], "--model 'm2d_vit_huge'"),
    (['--init', 'nothing.pth'], 'nothing.pth'),
    (['--init', 'ENCODER_ONLY'], 'not a full checkpoint of this model'),
    (['--csv_main', 'MISSING_FILES'], 'gone.npy: cannot load'),
    (['--batch_size', '64'], 'fewer than --batch_size 64'),
    (['--eval', 'fsdd-digits'], '--eval fsdd-digits needs --eval_data_dir'),
    (['--eval', 'suite.toml'], 'no such suite file'),
])
def test_failed_start_leaves_no_run_folder(lms_csv, tmp_path, monkeypatch, capsys, bad, message):
    from conftest import write_small_checkpoint
    from m2d.cli import main

    inputs = tmp_path / 'in'
    data = inputs / 'lms'  # 8 files
    data.mkdir(parents=True)
    for f in sorted(lms_csv.parent.glob('*.npy'))[:8]:
        (data / f.name).symlink_to(f)
    (inputs / 'list.csv').write_text('file_name\nlms/gone.npy\n')
    special = {'ENCODER_ONLY': str(write_small_checkpoint(inputs)), 'MISSING_FILES': str(inputs / 'list.csv')}
    bad = [special.get(a, a) for a in bad]
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, '--csv_main', str(data), '--batch-size', '4', '--epochs', '1', '--norm_stats=-2.2,4.7',
            '--num_workers', '0', '--device', 'cpu']
    assert main(['pretrain', *argv, *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in']  # no runs/ folder, no run folder
    # the same options without the bad one: the run folder appears under runs/ (the default root)
    assert main(['pretrain', *argv, '--max_steps', '1']) == 0
    (run,) = (tmp_path / 'runs').iterdir()
    assert (run / 'checkpoint-last.pth').is_file()
    assert 'training set' in (run / 'train.log').read_text()  # logged before the folder existed

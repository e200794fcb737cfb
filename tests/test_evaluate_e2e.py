"""`m2d linear-eval` end to end on small FSDD tasks: reports, cache, baselines, per-layer, suites,
unreadable clips, the ViT-Base stand-in and a checkpoint made by `m2d pretrain`."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FSDD, need, write_small_checkpoint
from m2d.cli import main

FAST = ['--seeds', '2', '--epochs', '30', '--patience', '10', '--lr', '1e-3', '--unit_sec', '1.0', '--quiet']


def fsdd_csv(path: Path, takes: dict[str, range], digits=range(10), speakers=('george', 'jackson')) -> Path:
    """A CSV task over FSDD recordings: the split of a recording is given by its take number."""
    need(FSDD)
    rows = []
    for d in digits:
        for spk in speakers:
            for split, rng in takes.items():
                rows += [(f'{d}_{spk}_{t}.wav', str(d), split) for t in rng]
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name', 'label', 'split'])
        w.writerows(rows)
    return path


@pytest.fixture(scope='module')
def small_task(tmp_path_factory) -> Path:
    """10 digits x 2 speakers: 4 train, 1 valid, 1 test take each (120 clips)."""
    return fsdd_csv(tmp_path_factory.mktemp('task') / 'digits.csv',
                    {'train': range(10, 14), 'valid': range(5, 6), 'test': range(0, 1)})


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp('ckpt'))


def run(args: list[str], cache: Path) -> int:
    return main(['linear-eval', *args, '--cache_dir', str(cache)])


def test_report_baselines_and_cache(tmp_path, small_task, ckpt, capsys):
    out = tmp_path / 'out'
    args = ['--weights', str(ckpt), '--csv', str(small_task), '--data_dir', str(FSDD), '--output_dir', str(out), *FAST]
    assert run(args, tmp_path / 'cache') == 0
    line = capsys.readouterr().out
    assert 'linear-eval:' in line and 'random' in line and str(out) in line
    r = json.loads((out / 'report.json').read_text())
    for key in ('task', 'weights', 'settings', 'metric', 'model', 'logmel', 'random', 'class_accuracy', 'timings'):
        assert key in r, key
    assert r['metric'] == 'accuracy' and r['task']['clips'] == {'train': 80, 'valid': 20, 'test': 20}
    for key in ('model', 'logmel', 'random'):
        e = r[key]
        assert len(e['per_seed']) == 2 and all(0 <= v <= 1 for v in e['per_seed'])
        assert e['mean'] == pytest.approx(np.mean(e['per_seed']))
        # 20 test clips: every result is a multiple of 1/20
        assert all(abs(v * 20 - round(v * 20)) < 1e-6 for v in e['per_seed'])
    assert r['model']['dim'] == 5 * 64 and r['random']['dim'] == 5 * 64 and r['logmel']['dim'] == 160
    assert sorted(r['class_accuracy']) == [str(d) for d in range(10)]
    cm = np.array(r['confusion_matrix'])
    assert cm.shape == (10, 10) and cm.sum() == 20 and (cm.sum(1) == 2).all()
    assert r['settings']['norm_stats'] == [-8.0, 4.0] and r['settings']['norm_stats_source'] == 'weights'
    assert r['skipped']['count'] == 0 and r['timings']['embed_model_cached'] is False
    md = (out / 'report.md').read_text()
    assert 'random encoder, same shape' in md and 'log-mel' in md and '## Timings' in md
    pytest.importorskip('matplotlib')
    assert (out / 'confusion.png').stat().st_size > 1000 and (out / 'embedding_map.png').stat().st_size > 1000
    assert '![confusion](confusion.png)' in md

    # second run: embeddings from the cache, same numbers
    assert run(args + ['--no_figures'], tmp_path / 'cache') == 0
    r2 = json.loads((out / 'report.json').read_text())
    assert r2['timings']['embed_model_cached'] is True and r2['timings']['embed_random_cached'] is True
    assert r2['model']['per_seed'] == r['model']['per_seed'] and r2['random']['per_seed'] == r['random']['per_seed']


def test_random_baseline_has_the_shape_and_is_seeded(ckpt):
    import torch

    from m2d.checkpoint import load_checkpoint
    from m2d.evaluate.baselines import random_encoder_state, random_runtime
    from m2d.runtime import RuntimeM2D
    from m2d.vit import sincos_pos_embed_2d

    c = load_checkpoint(ckpt)
    a, b = random_encoder_state(c, seed=0), random_encoder_state(c, seed=0)
    assert set(a) == set(c.encoder) and all(a[k].shape == c.encoder[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['blocks.0.attn.qkv.weight'], random_encoder_state(c, seed=1)['blocks.0.attn.qkv.weight'])
    assert not torch.equal(a['blocks.0.attn.qkv.weight'], c.encoder['blocks.0.attn.qkv.weight'])
    table = torch.from_numpy(sincos_pos_embed_2d(c.vit.embed_dim, c.vit.grid_size))[None].float()
    torch.testing.assert_close(a['pos_embed'], table)  # the fixed sin-cos table, as before pre-training
    rt = RuntimeM2D(checkpoint=c)
    rt.norm_stats.copy_(torch.tensor([-5.0, 3.0]))
    rand = random_runtime(rt, c)
    assert rand.cfg == rt.cfg and rand.norm_stats.tolist() == [-5.0, 3.0]


def test_per_layer_norm_stats_auto_and_several_weights(tmp_path, small_task, ckpt):
    other = write_small_checkpoint(tmp_path / 'b', name='m2d_vit_tiny-80x208p16x16-240202', seed=5)
    out = tmp_path / 'cmp'
    args = ['--weights', str(ckpt), str(other), '--csv', str(small_task), '--data_dir', str(FSDD), '--per_layer',
            '--norm_stats', 'auto', '--output_dir', str(out), *FAST, '--seeds', '1', '--no_figures']
    assert run(args, tmp_path / 'cache') == 0
    for name in ('m2d_vit_tiny-80x208p16x16-240101_checkpoint-1', 'm2d_vit_tiny-80x208p16x16-240202_checkpoint-1'):
        r = json.loads((out / name / 'report.json').read_text())
        assert [e['layer'] for e in r['per_layer']] == [0, 1]
        assert r['settings']['layers'] == [1] and r['model']['dim'] == 5 * 64  # the main result: the last layer
        assert r['settings']['norm_stats_source'].startswith('auto')
        assert r['settings']['norm_stats'][0] < -8 and r['settings']['norm_stats'][1] > 1
    s = json.loads((out / 'summary.json').read_text())
    names = [row['name'] for row in s['rows']]
    assert names[:2] == ['m2d_vit_tiny-80x208p16x16-240101_checkpoint-1', 'm2d_vit_tiny-80x208p16x16-240202_checkpoint-1']
    assert any('log-mel' in n for n in names) and any('random encoder' in n for n in names)
    assert len(names) == 4  # one random row: both files have the same shape
    assert s['tasks'] == ['digits'] and '| weight | digits |' in (out / 'summary.md').read_text()


def test_suite_summary_table(tmp_path, ckpt):
    need(FSDD)
    folder = tmp_path / 'speakers'  # a folder task: sub-folders are the classes
    for spk in ('george', 'jackson', 'theo'):
        (folder / spk).mkdir(parents=True)
        for t in range(8):
            (folder / spk / f'{spk}_{t}.wav').symlink_to(FSDD / f'{t % 10}_{spk}_{t}.wav')
    fsdd_csv(tmp_path / 'digits.csv', {'train': range(10, 13), 'valid': range(5, 6), 'test': range(0, 1)},
             digits=range(4))
    suite = tmp_path / 'suite.toml'
    suite.write_text(f'[[task]]\nname = "digits4"\ncsv = "digits.csv"\ndata_dir = "{FSDD}"\nunit_sec = 1.0\n\n'
                     f'[[task]]\nname = "speakers"\ndata_dir = "speakers"\n')
    out = tmp_path / 'suite_out'
    assert run(['--weights', str(ckpt), '--suite', str(suite), '--output_dir', str(out), *FAST[:-3], '--quiet',
                '--no_figures'], tmp_path / 'cache') == 0
    s = json.loads((out / 'summary.json').read_text())
    assert s['tasks'] == ['digits4', 'speakers'] and not s['errors']
    assert [row['kind'] for row in s['rows']] == ['weights', 'baseline', 'baseline']
    for row in s['rows']:
        assert set(row['results']) == {'digits4', 'speakers'}
    md = (out / 'summary.md').read_text()
    assert '| weight | digits4 | speakers |' in md
    line = [ln for ln in md.splitlines() if ln.startswith('| m2d_vit_tiny')][0]
    assert line.count('%') == 2  # one cell per task, as in M2D's README table
    name = 'm2d_vit_tiny-80x208p16x16-240101_checkpoint-1'
    assert (out / name / 'digits4' / 'report.json').is_file() and (out / name / 'speakers' / 'report.md').is_file()


def test_suite_yaml_and_bad_entries(tmp_path):
    from m2d.evaluate.suite import SuiteError, read_suite

    y = tmp_path / 's.yaml'
    y.write_text('- name: a\n  csv: x.csv\n  data_dir: d\n- task: fsdd-digits\n  data_dir: /abs\n')
    pytest.importorskip('yaml')
    entries = read_suite(y)
    assert entries[0]['csv'] == str(tmp_path / 'x.csv') and entries[1]['name'] == 'fsdd-digits'
    assert entries[1]['data_dir'] == '/abs'
    bad = tmp_path / 'bad.toml'
    bad.write_text('[[task]]\nname = "a"\ncvs = "x.csv"\n')
    with pytest.raises(SuiteError, match='unknown key'):
        read_suite(bad)
    bad.write_text('[[task]]\nname = "a"\ntask = "fsdd-digits"\n[[task]]\nname = "a"\ntask = "fsdd-speakers"\n')
    with pytest.raises(SuiteError, match='two tasks are named'):
        read_suite(bad)


def test_unreadable_clips_are_counted_or_refused(tmp_path, small_task, ckpt, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    for p in FSDD.glob('*_george_*.wav'):
        (data / p.name).symlink_to(p)
    for p in FSDD.glob('*_jackson_*.wav'):
        (data / p.name).symlink_to(p)
    (data / '3_george_0.wav').unlink()
    (data / '3_george_0.wav').write_bytes(b'not audio at all')  # a test clip that cannot be read
    out = tmp_path / 'out'
    args = ['--weights', str(ckpt), '--csv', str(small_task), '--data_dir', str(data), '--output_dir', str(out),
            '--no_baselines', '--no_figures', *FAST]
    assert run(args + ['--max_failed', '0.05'], tmp_path / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['skipped']['count'] == 1 and r['skipped']['by_split'] == {'train': 0, 'valid': 0, 'test': 1}
    assert '3_george_0.wav' in r['skipped']['files'][0][0] and 'logmel' not in r and 'random' not in r
    assert 'the test set is smaller' in (out / 'report.md').read_text()
    assert np.array(r['confusion_matrix']).sum() == 19
    # more than --max_failed of the task: a one-line error, exit status 2
    capsys.readouterr()
    assert run(args + ['--max_failed', '0.005'], tmp_path / 'cache2') == 2  # 1 of 120 is more than 0.5 %
    err = capsys.readouterr().err
    assert 'could not be read' in err and len(err.strip().splitlines()) == 1


def test_missing_matplotlib_degrades_to_json(tmp_path, small_task, ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib -> ImportError
    out = tmp_path / 'out'
    assert run(['--weights', str(ckpt), '--csv', str(small_task), '--data_dir', str(FSDD), '--output_dir', str(out),
                '--no_baselines', *FAST], tmp_path / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['figures'] == {} and 'matplotlib is not installed' in r['figures_note']
    assert 'matplotlib is not installed' in (out / 'report.md').read_text()
    assert not list(out.glob('*.png'))


@pytest.mark.parametrize('args, match', [
    (['--task', 'fsdd-digits'], '--data_dir'),
    (['--csv', 'nope.csv', '--data_dir', '.'], 'no such file'),
    (['--task', 'fsdd-digits', '--data_dir', 'X', '--suite', 's.toml'], 'do not combine'),
    (['--data_dir', 'X', '--norm_stats', 'abc'], None),
])
def test_command_errors_are_one_line(tmp_path, ckpt, capsys, args, match):
    if args[-1] == 'abc':  # a valid folder task, a bad --norm_stats
        for c in ('a', 'b'):
            (tmp_path / 'X' / c).mkdir(parents=True)
            for t in range(5):
                (tmp_path / 'X' / c / f'{t}.wav').symlink_to(need(FSDD) / f'{t}_george_{t}.wav')
        args = ['--data_dir', str(tmp_path / 'X'), '--norm_stats', 'abc']
        match = '--norm_stats'
    assert run(['--weights', str(ckpt), *args, '--quiet'], tmp_path / 'cache') == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_vit_base_stand_in(tmp_path_factory, m2d_base_ckpt):
    """The ViT-Base-shaped stand-in of a released checkpoint (3840-d embeddings) on 5 digits x 4 clips."""
    tmp = tmp_path_factory.mktemp('base')
    task = fsdd_csv(tmp / 'd5.csv', {'train': range(10, 12), 'valid': range(5, 6), 'test': range(0, 1)},
                    digits=range(5), speakers=('george',))
    out = tmp / 'out'
    assert run(['--weights', str(m2d_base_ckpt), '--csv', str(task), '--data_dir', str(FSDD), '--output_dir', str(out),
                '--seeds', '1', '--epochs', '10', '--unit_sec', '0.5', '--embed_batch_size', '4', '--no_figures',
                '--quiet'], tmp / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['model']['dim'] == 3840 and r['random']['dim'] == 3840 and r['logmel']['dim'] == 160
    assert r['settings']['norm_stats'] == pytest.approx([-7.8, 4.6])
    assert r['settings']['geometry']['input_size'] == [80, 608] and r['settings']['geometry']['depth'] == 12
    assert r['weights_name'] == 'm2d_vit_base-80x608p16x16-221006-mr7_checkpoint-300'


@pytest.mark.slow
def test_checkpoint_of_m2d_pretrain(tmp_path, small_task):
    """A tiny M2D trained by `m2d pretrain` (one short epoch on 40 FSDD LMS files) evaluates as any weight file."""
    from m2d.data.convert import convert

    wav = tmp_path / 'wav'
    wav.mkdir()
    for f in sorted(need(FSDD).glob('*.wav'))[::75]:
        (wav / f.name).symlink_to(f)
    assert convert(wav, tmp_path / 'lms', workers=0, progress=False).exit_code == 0
    runs = tmp_path / 'runs'
    assert main(['pretrain', '--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1',
                 '--decoder_embed_dim', '64', '--decoder_num_heads', '2', '--input_size', '80x208',
                 '--csv_main', str(tmp_path / 'lms' / 'files.csv'), '--batch_size', '8', '--epochs', '1',
                 '--warmup_epochs', '1', '--min_ds_size', '0', '--num_workers', '0', '--feature_eval_freq', '0',
                 '--norm_stats_samples', '100', '--output_root', str(runs), '--device', 'cpu']) == 0
    (run_dir,) = runs.iterdir()
    ckpt = run_dir / 'checkpoint-1.pth'
    out = tmp_path / 'out'
    assert run(['--weights', str(ckpt), '--csv', str(small_task), '--data_dir', str(FSDD), '--output_dir', str(out),
                '--no_figures', *FAST], tmp_path / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['model']['dim'] == 5 * 192 and r['settings']['geometry']['depth'] == 1
    from m2d.checkpoint import load_checkpoint

    assert r['settings']['norm_stats_source'] == 'weights'
    assert r['settings']['norm_stats'] == pytest.approx(list(load_checkpoint(ckpt).norm_stats))  # pre-training's

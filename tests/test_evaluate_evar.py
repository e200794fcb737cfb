"""EVAR's protocol end to end on small EVAR-shaped folders made from FSDD audio: the fold loop and its
averaging, --fold, EVAR's tasks by name (DATA_DIR/<task>.csv, PREPARED.json), and --suite evar."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FSDD, need, write_small_checkpoint
from m2d.cli import main

FAST = ['--seeds', '2', '--epochs', '15', '--patience', '5', '--lr', '1e-3', '--quiet', '--no_figures']
DIGITS, SPEAKERS, TAKES = range(4), ('george', 'jackson'), range(10)


def write_esc50_like(folder: Path, name: str = 'esc50') -> Path:
    """``folder/<name>.csv`` shaped like EVAR's esc50.csv (filename,fold,...,label columns) over 80 FSDD
    recordings linked into `folder/audio`: 4 digits x 2 speakers x 10 takes, take % 5 + 1 = fold."""
    need(FSDD)
    (folder / 'audio').mkdir(parents=True, exist_ok=True)
    rows = []
    for d in DIGITS:
        for spk in SPEAKERS:
            for t in TAKES:
                wav = f'{d}_{spk}_{t}.wav'
                link = folder / 'audio' / wav
                if not link.exists():
                    link.symlink_to(FSDD / wav)
                rows.append((f'audio/{wav}', t % 5 + 1, f'digit{d}', 'A'))
    path = folder / f'{name}.csv'
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file_name', 'fold', 'label', 'esc10'])
        w.writerows(rows)
    return path


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Path:
    return write_small_checkpoint(tmp_path_factory.mktemp('ckpt'))


def run(args: list[str], cache: Path) -> int:
    return main(['linear-eval', *args, '--cache_dir', str(cache)])


def test_fold_task_runs_every_fold_and_averages(tmp_path, ckpt, monkeypatch):
    import m2d.evaluate.linear as linear

    data = tmp_path / 'esc50'
    write_esc50_like(data)
    (data / 'PREPARED.json').write_text(json.dumps({'task': 'esc50', 'license': 'CC BY-NC 3.0',
                                                    'citation': 'Piczak, ESC (2015)'}))
    calls = []
    real = linear.model_embeddings
    monkeypatch.setattr(linear, 'model_embeddings', lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / 'all'
    assert run(['--weights', str(ckpt), '--task', 'esc50', '--data_dir', str(data), '--output_dir', str(out),
                *FAST], tmp_path / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['task']['name'] == 'esc50' and r['task']['unit_sec'] == 5.0  # EVAR's unit for esc50
    assert r['task']['folds'] == ['1', '2', '3', '4', '5'] and r['task']['clips'] == {str(k): 16 for k in range(1, 6)}
    assert r['task']['license'] == 'CC BY-NC 3.0' and r['task']['citation'].startswith('Piczak')
    for kind in ('model', 'logmel', 'random'):
        e = r[kind]
        assert len(e['per_fold']) == 5 and len(e['per_seed']) == 2
        assert e['mean'] == pytest.approx(np.mean(e['per_fold']))  # the task score: the mean over folds
        assert e['mean'] == pytest.approx(np.mean(e['per_seed']))  # ... and over seeds
        assert len(e['best_epoch']) == 10  # 5 folds x 2 seeds
        assert e['n_valid'] == [7] * 10 and e['batch_size'] == [64]  # EVAR: ceil(10 % of 64); min(200, 64)
    assert len(calls) == 2  # model and random embeddings: once each for the 5 folds
    assert r['protocol']['name'] == 'EVAR protocol (changed: epochs, lr, patience)'
    md = (out / 'report.md').read_text()
    assert 'EVAR protocol' in md and 'fold 5' in md and 'CC BY-NC 3.0' in md

    one = tmp_path / 'fold2'  # --fold 2: only fold 2, the same result as fold 2 of the full run
    assert run(['--weights', str(ckpt), '--task', 'esc50', '--data_dir', str(data), '--output_dir', str(one),
                '--fold', '2', *FAST], tmp_path / 'cache') == 0
    r2 = json.loads((one / 'report.json').read_text())
    assert r2['task']['folds'] == ['2'] and len(r2['model']['per_fold']) == 1
    assert r2['model']['per_fold'][0] == pytest.approx(r['model']['per_fold'][1])
    assert run(['--weights', str(ckpt), '--task', 'esc50', '--data_dir', str(data), '--fold', '9', *FAST],
               tmp_path / 'cache') == 2


def test_evar_metadata_csv_and_missing_task_csv(tmp_path, ckpt, capsys):
    data = tmp_path / 'work'
    meta = write_esc50_like(data, name='elsewhere')  # EVAR's own layout: --csv metadata --data_dir work/16k/esc50
    out = tmp_path / 'o'
    assert run(['--weights', str(ckpt), '--task', 'esc50', '--csv', str(meta), '--data_dir', str(data), '--fold', '1',
                '--unit_sec', '1.0', '--no_baselines', '--output_dir', str(out), *FAST], tmp_path / 'cache') == 0
    r = json.loads((out / 'report.json').read_text())
    assert r['task']['name'] == 'esc50' and r['task']['unit_sec'] == 1.0 and 'license' not in r['task']
    capsys.readouterr()
    assert run(['--weights', str(ckpt), '--task', 'us8k', '--data_dir', str(data), *FAST], tmp_path / 'cache') == 2
    err = capsys.readouterr().err
    assert 'no us8k.csv' in err and 'm2d datasets us8k' in err


def test_suite_evar_prints_the_seed_table_with_published_rows(tmp_path, ckpt, capsys):
    root = tmp_path / 'evar'
    write_esc50_like(root / 'esc50')
    cremad = root / 'cremad'  # a split task: train/valid/test column
    (cremad / 'audio').mkdir(parents=True)
    rows = []
    for d in DIGITS:
        for spk in SPEAKERS:
            for t in TAKES:
                (cremad / 'audio' / f'{d}_{spk}_{t}.wav').symlink_to(FSDD / f'{d}_{spk}_{t}.wav')
                rows.append(f'audio/{d}_{spk}_{t}.wav,{"ANG" if d < 2 else "SAD"},'
                            f'{"test" if t < 2 else "valid" if t < 4 else "train"}')
    (cremad / 'cremad.csv').write_text('file_name,label,split\n' + '\n'.join(rows) + '\n')
    out = tmp_path / 'table'
    assert run(['--weights', str(ckpt), '--suite', 'evar', '--data_dir', str(root), '--output_dir', str(out),
                '--fold', '1', '--unit_sec', '1.0', *FAST], tmp_path / 'cache') == 0
    printed = capsys.readouterr().out
    md = (out / 'summary.md').read_text()
    assert md in printed and '7 missing' in printed
    header = '| weight | esc50 | us8k | spcv2 | vc1 | voxforge | cremad | gtzan | nsynth | surge |'
    assert header in md  # the seed README's table: its shape and order
    lines = md.splitlines()
    ours = next(ln for ln in lines if ln.startswith('| m2d_vit_tiny'))
    cells = [c.strip() for c in ours.strip('|').split('|')][1:]
    assert cells[0].endswith('%') and cells[5].endswith('%') and cells[1] == 'missing' and cells.count('missing') == 7
    pub = next(ln for ln in lines if ln.startswith('| m2d_vit_base-80x608p16x16-221006-mr6 (published)'))
    assert '| 89.7% | 87.6% | 95.4% | 73.1% | 97.9% | 71.7% | 83.3% | 75.3% | 41.0% |' in pub
    assert lines.index(pub) > lines.index(ours)  # beside (below) the evaluated rows, same columns
    s = json.loads((out / 'summary.json').read_text())
    assert set(s['gaps']) == {'us8k', 'spcv2', 'vc1', 'voxforge', 'gtzan', 'nsynth', 'surge'}
    assert 'm2d datasets us8k' in s['gaps']['us8k'] and '## Gaps' in md
    assert len(s['published']) == 3


def test_norm_stats_default_is_evars(tmp_path):
    """EVAR with config/m2d.yaml: the weight file's norm_stats, else the yaml's -7.1, 4.2."""
    import torch

    from m2d.evaluate.linear import LinearOptions, choose_norm_stats, load_weights

    with_stats = write_small_checkpoint(tmp_path / 'a', norm_stats=(-9.5, 3.5))
    bare = write_small_checkpoint(tmp_path / 'b')
    ckpt = torch.load(bare, weights_only=False)
    del ckpt['model']['norm_stats']  # as the 2022 releases
    torch.save(ckpt, bare)
    opts = LinearOptions()
    stats, source, note = choose_norm_stats(opts, load_weights(with_stats, opts), None)
    assert stats == pytest.approx((-9.5, 3.5)) and source == 'weights' and 'checkpoint-1.pth' in note
    stats, source, note = choose_norm_stats(opts, load_weights(bare, opts), None)
    assert stats == (-7.1, 4.2) and source == 'default' and 'm2d.yaml' in note
    given = LinearOptions(norm_stats='-5,2')
    assert choose_norm_stats(given, load_weights(bare, given), None)[:2] == ((-5.0, 2.0), 'given')


def test_one_mean_std_parser_for_every_option():
    from m2d.errors import M2DError
    from m2d.normstats import parse_mean_std
    from m2d.superb import SuperbError
    from m2d.superb.tasks import parse_stats
    from m2d.train.config import ConfigError

    for text in ('-7.1,4.2', '-7.1, 4.2', '[-7.1, 4.2]', '-7.1 4.2', (-7.1, 4.2)):
        assert parse_mean_std(text) == (-7.1, 4.2)
    for bad in ('-7.1', '1,2,3', 'a,b', '-7.1,0', '-7.1,-1', 'nan,1', ''):
        with pytest.raises(M2DError, match='--norm_stats .*MEAN,STD'):
            parse_mean_std(bad)
    with pytest.raises(SuperbError, match='--stats'):
        parse_stats('1,0')
    assert parse_stats('-11.506255,4.314857') == ('-11.506255', '4.314857')  # kept as spelled
    with pytest.raises(ConfigError):
        parse_mean_std('x', '--norm_stats', ConfigError)

"""`m2d pretrain --eval`: checkpoints evaluated by `m2d linear-eval` in separate processes that never
block or stop the training; scores in log.jsonl; the final checkpoint's summary in the run folder.

Most tests use a stand-in evaluation command (FAKE_EVAL) so they stay fast; one runs the real
`m2d linear-eval` on a few FSDD recordings."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FSDD, need
from m2d.train.config import ConfigError, TrainConfig
from m2d.train.evaluation import CheckpointEvaluator, read_results

# Stands in for `m2d linear-eval`: writes report.json (score 0.1 x the checkpoint's epoch) and report.md,
# and keeps its arguments in argv.json. Mode 'fail' exits with status 1 after a message on stderr.
FAKE_EVAL = """
import json, pathlib, re, sys
mode, argv = sys.argv[1], sys.argv[2:]
out = pathlib.Path(argv[argv.index('--output_dir') + 1])
out.mkdir(parents=True, exist_ok=True)
(out / 'argv.json').write_text(json.dumps(argv))
if mode == 'fail':
    print('fake linear-eval: the task data is broken', file=sys.stderr)
    sys.exit(1)
epoch = int(re.search(r'checkpoint-(\\d+)', argv[argv.index('--weights') + 1])[1])
report = {'task': 'fake-task', 'metric': 'accuracy', 'model': {'mean': 0.1 * epoch, 'std': 0.0, 'per_seed': []}}
if '--no_baselines' not in argv:
    report['logmel'] = {'mean': 0.05, 'std': 0.0, 'per_seed': []}
    report['random'] = {'mean': 0.02, 'std': 0.0, 'per_seed': []}
(out / 'report.json').write_text(json.dumps(report))
(out / 'report.md').write_text('# fake\\n\\n![confusion](confusion.png)\\n')
"""

TINY = dict(model='m2d_vit_tiny', depth=1, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2,
            input_size='80x208', min_ds_size=0, feature_eval_freq=0, batch_size=4, norm_stats='-2.0,4.0',
            num_workers=0, device='cpu', warmup_epochs=1, log_every=1)


def fake_eval(tmp_path: Path, mode: str = 'ok') -> list[str]:
    script = tmp_path / 'fake_eval.py'
    script.write_text(FAKE_EVAL)
    return [sys.executable, str(script), mode]


@pytest.fixture
def lms_dir(tmp_path) -> Path:
    """8 random log-mel files [1, 80, 250]."""
    folder = tmp_path / 'lms'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        np.save(folder / f'{i}.npy', (rng.standard_normal((1, 80, 250)) * 4 - 2).astype(np.float32))
    return folder


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / 'log.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['type'] == kind]


def test_eval_options_name_the_task(tmp_path):
    (tmp_path / 'suite.toml').write_text('[[task]]\nname = "x"\n')
    (tmp_path / 'task.csv').write_text('file_name,label\n')
    ok = {
        ('fsdd-digits', str(tmp_path)): ['--task', 'fsdd-digits', '--data_dir', str(tmp_path)],
        (str(tmp_path / 'suite.toml'), ''): ['--suite', str(tmp_path / 'suite.toml')],
        (str(tmp_path / 'task.csv'), str(tmp_path)): ['--csv', str(tmp_path / 'task.csv'), '--data_dir', str(tmp_path)],
        (str(tmp_path), ''): ['--data_dir', str(tmp_path)],
        ('', ''): [],
    }
    for (task, data_dir), args in ok.items():
        assert TrainConfig(eval=task, eval_data_dir=data_dir).check().eval_task_args() == args
    bad = {
        ('fsdd-digits', ''): '--eval fsdd-digits needs --eval_data_dir',
        ('fsdd-digits', str(tmp_path / 'nowhere')): '--eval_data_dir .*nowhere: no such folder',
        (str(tmp_path / 'missing.yaml'), ''): 'missing.yaml: no such suite file',
        (str(tmp_path / 'task.csv'), ''): 'task.csv needs --eval_data_dir',
        ('fsdd-digitz', ''): 'fsdd-digitz: not a built-in task',
    }
    for (task, data_dir), match in bad.items():
        with pytest.raises(ConfigError, match=match):
            TrainConfig(eval=task, eval_data_dir=data_dir).check()
    with pytest.raises(ConfigError, match='--eval_every needs --eval'):
        TrainConfig(eval_every=2).check()
    opts = TrainConfig(eval='fsdd-digits', eval_data_dir=str(tmp_path), eval_every=2, save_freq=100, epochs=5)
    assert [e for e in range(1, 6) if opts.evaluates_epoch(e)] == [2, 4]
    assert [e for e in range(1, 6) if opts.saves_epoch(e)] == [2, 4, 5]


def test_evaluator_runs_quick_and_final_evaluations(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    ev = CheckpointEvaluator(run, ['--data_dir', 'd'], command=fake_eval(tmp_path))
    ev.submit(run / 'checkpoint-1.pth', epoch=1, step=10)
    ev.submit(run / 'checkpoint-2.pth', epoch=2, step=20)  # waits for epoch 1 (one quick evaluation at a time)
    assert [j.epoch for j in ev.running] == [1] and ev.waiting.epoch == 2
    results = ev.finish(run / 'checkpoint-3.pth', epoch=3, step=30)
    assert sorted((r.epoch, r.final, round(r.score, 6)) for r in results) == [(1, False, 0.1), (2, False, 0.2),
                                                                              (3, True, 0.3)]
    final = next(r for r in results if r.final)
    assert final.baselines == {'logmel': 0.05, 'random': 0.02} and final.output_dir == run / 'eval' / 'final'
    assert final.record() == {'type': 'eval', 'epoch': 3, 'step': 30, 'score': pytest.approx(0.3),
                              'metric': 'accuracy', 'final': True, 'logmel_score': 0.05, 'random_score': 0.02}
    quick = json.loads((run / 'eval' / 'epoch-1' / 'argv.json').read_text())
    assert quick[:4] == ['--weights', str(run / 'checkpoint-1.pth'), '--data_dir', 'd']
    assert {'--seeds', '1', '--no_baselines', '--no_cache', '--quiet'} <= set(quick)
    assert '--no_baselines' not in json.loads((run / 'eval' / 'final' / 'argv.json').read_text())
    assert json.loads((run / 'eval_summary.json').read_text())['random']['mean'] == 0.02
    assert '](eval/final/confusion.png)' in (run / 'eval_summary.md').read_text()  # figure links still resolve
    # other ranks never start anything
    idle = CheckpointEvaluator(run, ['--data_dir', 'd'], command=fake_eval(tmp_path), enabled=False)
    idle.submit(run / 'checkpoint-1.pth', 1, 10)
    assert not idle.running and idle.finish(run / 'checkpoint-1.pth', 1, 10) == []


def test_read_results_of_a_suite(tmp_path):
    for task, score in (('a', 0.5), ('b', 0.7)):
        (tmp_path / task).mkdir()
        (tmp_path / task / 'report.json').write_text(json.dumps({'task': task, 'metric': 'accuracy',
                                                                 'model': {'mean': score}}))
    scores, metric, baselines = read_results(tmp_path)
    assert scores == {'a': 0.5, 'b': 0.7} and metric == 'accuracy' and baselines == {}
    with pytest.raises(ValueError, match='no report.json'):
        read_results(tmp_path / 'a' / 'nothing')


def test_pretrain_logs_one_score_per_epoch(lms_dir, tmp_path):
    from m2d.train import train

    res = train(TrainConfig(**TINY, csv_main=str(lms_dir), epochs=3, eval=str(lms_dir), eval_every=1,
                            output_dir=str(tmp_path / 'run')), eval_command=fake_eval(tmp_path))
    run = res.output_dir
    evals = sorted(records(run, 'eval'), key=lambda r: r['epoch'])
    assert [(r['epoch'], r['step'], r['final']) for r in evals] == [(1, 2, False), (2, 4, False), (3, 6, True)]
    assert [r['score'] for r in evals] == pytest.approx([0.1, 0.2, 0.3])
    assert evals[-1]['random_score'] == 0.02
    assert {p.name for p in (run / 'eval').iterdir()} == {'epoch-1', 'epoch-2', 'final'}
    assert (run / 'eval_summary.md').is_file() and (run / 'eval_summary.json').is_file()
    assert 'waiting for' in (run / 'train.log').read_text()
    if importlib.util.find_spec('matplotlib') is not None:
        assert (run / 'training_curves.png').is_file()


def test_failing_evaluation_leaves_the_training_running(lms_dir, tmp_path):
    from m2d.train import train

    res = train(TrainConfig(**TINY, csv_main=str(lms_dir), epochs=2, eval=str(lms_dir), eval_every=1,
                            output_dir=str(tmp_path / 'run')), eval_command=fake_eval(tmp_path, 'fail'))
    assert res.step == 4 and res.checkpoint == tmp_path / 'run' / 'checkpoint-2.pth'
    assert records(res.output_dir, 'eval') == []
    text = (res.output_dir / 'train.log').read_text()
    assert 'evaluation of epoch 1 failed (exit status 1)' in text and 'the task data is broken' in text
    assert [r['epoch'] for r in records(res.output_dir, 'epoch')] == [1, 2]
    # a command that cannot even start is reported the same way
    res = train(TrainConfig(**TINY, csv_main=str(lms_dir), epochs=1, eval=str(lms_dir),
                            output_dir=str(tmp_path / 'run2')), eval_command=[str(tmp_path / 'no-such-program')])
    assert res.step == 2 and 'could not start' in (res.output_dir / 'train.log').read_text()


@pytest.mark.slow
def test_real_linear_eval_on_fsdd(tmp_path):
    """A tiny pretrain on a few converted FSDD files with `--eval fsdd-digits`: one score per epoch."""
    need(FSDD)
    if importlib.util.find_spec('m2d.commands.linear_eval') is None:
        pytest.skip('m2d linear-eval is not available')
    from m2d.cli import main
    from m2d.data.convert import convert

    fsdd = tmp_path / 'fsdd' / 'recordings'  # a small copy: 3 speakers x 10 digits x 2 takes (test: index 0-4)
    fsdd.mkdir(parents=True)
    for f in sorted(FSDD.glob('*.wav')):
        digit, speaker, index = f.stem.split('_')
        if speaker in ('george', 'jackson', 'lucas') and index in ('0', '5'):
            (fsdd / f.name).symlink_to(f)
    assert convert(fsdd, tmp_path / 'lms', workers=0, progress=False).exit_code == 0
    t0 = time.perf_counter()
    rc = main(['pretrain', '--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--decoder_embed_dim',
               '64', '--decoder_num_heads', '2', '--input_size', '80x208', '--min_ds_size', '0', '--feature_eval_freq',
               '0', '--csv_main', str(tmp_path / 'lms' / 'files.csv'), '--batch_size', '16', '--epochs', '2',
               '--norm_stats=-6,4', '--num_workers', '0', '--device', 'cpu', '--output_dir', str(tmp_path / 'run'),
               '--eval', 'fsdd-digits', '--eval_data_dir', str(tmp_path / 'fsdd'), '--eval_every', '1'])
    assert rc == 0
    evals = sorted(records(tmp_path / 'run', 'eval'), key=lambda r: r['epoch'])
    assert [r['epoch'] for r in evals] == [1, 2], (tmp_path / 'run' / 'train.log').read_text()[-3000:]
    assert all(0 <= r['score'] <= 1 and r['metric'] == 'accuracy' for r in evals)
    assert 'random_score' in evals[-1] and (tmp_path / 'run' / 'eval_summary.md').is_file()
    print(f'pretrain + 2 evaluations: {time.perf_counter() - t0:.1f} s')


def test_scores_reach_tensorboard_and_the_curves(tmp_path):
    from m2d.train.evaluation import EvalResult
    from m2d.train.monitor import Monitor

    class Writer:  # records what a TensorBoard SummaryWriter would get
        scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    monitor = Monitor(tmp_path, tensorboard=False)
    monitor._tb = Writer()
    monitor.step(1, 0.5, 2.0, 1e-4, 0.9999)
    monitor.write(EvalResult(1, 10, True, tmp_path, {'a': 0.25, 'b': 0.75}, 'accuracy', {'random': 0.1}).record())
    assert ('eval/score', 0.5, 10) in Writer.scalars and ('eval/score_a', 0.25, 10) in Writer.scalars
    assert ('eval/random_score', 0.1, 10) in Writer.scalars and not any(t == 'eval/final' for t, _, _ in Writer.scalars)
    if importlib.util.find_spec('matplotlib') is not None:
        assert monitor.plot() == tmp_path / 'training_curves.png'

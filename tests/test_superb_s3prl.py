"""`m2d superb run` against a stand-in s3prl checkout that behaves as s3prl 0.4.18 does under torch >= 2.6:
device choice, s3prl's own checkpoints, -o overrides and the preflight."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch

from conftest import ROOT
from m2d.cli import main
from m2d.superb.tasks import get_task, parse_overrides, task_commands

CKPT = '/w/m2d_s_vit_base-80x608p80x2-230220/checkpoint-1000.pth'
EXP = 'm2d_s_vit_base-80x608p80x2-230220-checkpoint-1000-KS-lr1e-4-s7'

# s3prl 0.4.18's run_downstream.py in what matters here: --device defaults to cuda and the model is moved
# there; -o is applied with `,,` between options; training saves dev-best.ckpt (its args as an
# argparse.Namespace, its config) at a dev evaluation; evaluation reads it with a bare torch.load.
RUN_DOWNSTREAM = '''
import argparse, json, os, sys
import torch, yaml
from s3prl import hub

p = argparse.ArgumentParser()
for flag, name in (('-m', 'mode'), ('-n', 'expname'), ('-u', 'upstream'), ('-d', 'downstream'), ('-c', 'config'),
                   ('-o', 'override'), ('-k', 'upstream_ckpt'), ('-e', 'past_exp')):
    p.add_argument(flag, dest=name)
p.add_argument('--seed', type=int, default=1337)
p.add_argument('--device', default='cuda')
args = p.parse_args()
with open('calls.txt', 'a') as f:
    f.write(json.dumps({'argv': sys.argv[1:], 'env': os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')}) + '\\n')
if args.past_exp:
    ckpt = torch.load(args.past_exp, map_location='cpu')
    expdir, config = ckpt['Args'].expdir, ckpt['Config']
else:
    expdir = args.expdir = 'result/downstream/' + args.expname
    with open(args.config or f'downstream/{args.downstream}/config.yaml') as f:
        config = yaml.safe_load(f)
    for option in args.override.split(',,'):
        key, value = option.strip().split('=')
        *path, last = key.strip().split('.')[1:]
        node = config
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
model = torch.nn.Linear(2, 2).to(args.device)
os.makedirs(expdir, exist_ok=True)
if args.mode == 'train':
    runner = config['runner']
    if runner['total_steps'] >= runner['eval_step']:
        torch.save({'Args': args, 'Config': config, 'Step': runner['total_steps'], 'Downstream': model.state_dict()},
                   expdir + '/dev-best.ckpt')
else:
    with open(expdir + '/log.log', 'a') as f:
        f.write('test at step 0: 0.875\\n')  # evaluate mode logs step 0
'''

CONFIG = '''runner:
  total_steps: 200000
  eval_step: 5000
  eval_dataloaders: [dev, test]
downstream_expert:
  datarc:
    speech_commands_root: {train}
    speech_commands_test_root: {test}
    batch_size: 32
'''


def fake_s3prl(tmp_path, monkeypatch, expert: str = 'import json\n', data: bool = True):
    """An s3prl checkout (ROOT/s3prl holds run_downstream.py and the package) installed on PYTHONPATH."""
    root = tmp_path / 's3prl_root'
    pkg = root / 's3prl'
    (pkg / 'downstream' / 'speech_commands').mkdir(parents=True)
    for init in ('__init__.py', 'downstream/__init__.py', 'downstream/speech_commands/__init__.py'):
        (pkg / init).write_text('')
    (pkg / 'hub.py').write_text('def m2d(ckpt, *args, **kwargs):\n    pass\n')
    (pkg / 'run_downstream.py').write_text(RUN_DOWNSTREAM)
    (pkg / 'downstream' / 'speech_commands' / 'expert.py').write_text(expert)
    train, test = tmp_path / 'speech_commands_v0.01', tmp_path / 'speech_commands_test_set_v0.01'
    if data:
        train.mkdir()
        test.mkdir()
    (pkg / 'downstream' / 'speech_commands' / 'config.yaml').write_text(CONFIG.format(train=train, test=test))
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(root), str(ROOT / 'src'), os.environ.get('PYTHONPATH', '')]))
    return root


def calls(root) -> list[dict]:
    return [json.loads(line) for line in (root / 's3prl' / 'calls.txt').read_text().splitlines()]


SMOKE = ['-o', 'config.runner.total_steps=6,,config.runner.eval_step=3']


def test_cpu_smoke_run_end_to_end(tmp_path, capsys, monkeypatch):
    """Default device on a machine without CUDA: cpu, passed to both commands; the evaluate step gets
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD and reads s3prl's own checkpoint; the report follows."""
    root = fake_s3prl(tmp_path, monkeypatch)
    if torch.cuda.is_available():
        pytest.skip('the default device here would be cuda')
    assert main(['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', sys.executable,
                 *SMOKE]) == 0
    train, evaluate = calls(root)
    assert train['argv'][train['argv'].index('--device') + 1] == 'cpu'
    assert evaluate['argv'][evaluate['argv'].index('--device') + 1] == 'cpu'
    assert train['argv'][train['argv'].index('-o') + 1] == \
        'config.optimizer.lr=1e-4,,config.runner.total_steps=6,,config.runner.eval_step=3'
    assert (train['env'], evaluate['env']) == (None, '1')  # only the process reading s3prl's own checkpoint
    out = capsys.readouterr().out
    assert f'{EXP}: acc (%) 87.50' in out
    header, row = out.splitlines()[-2:]
    assert header.split()[3] == 'KS' and row.split()[1:] == ['-', '87.50', '-', '-', '-']  # PR KS IC SID ER
    # Again without the preflight, with a training that never reaches a dev evaluation: the dev-best.ckpt
    # of the first run is not taken for this one's.
    time.sleep(1.5)
    assert main(['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', sys.executable,
                 '--no-preflight', '-o', 'config.runner.total_steps=2']) == 2
    assert 'wrote no new dev-best.ckpt' in capsys.readouterr().err
    assert [c['argv'][1] for c in calls(root)] == ['train', 'evaluate', 'train']


def test_the_stand_in_is_s3prl_under_torch_2_6(tmp_path, monkeypatch):
    """Without the variable the stand-in's evaluation fails as s3prl's does; with cuda it fails without CUDA."""
    if tuple(int(x) for x in torch.__version__.split('.')[:2]) < (2, 6):
        pytest.skip('torch < 2.6 loads pickles by default')
    root = fake_s3prl(tmp_path, monkeypatch)
    step = task_commands(get_task('KS'), CKPT, python=sys.executable, device='cpu',
                         overrides=parse_overrides(SMOKE[1:]))[0]
    env = {k: v for k, v in os.environ.items() if k != 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'}
    run = lambda argv, **extra: subprocess.run(argv, cwd=root / 's3prl', env=dict(env, **extra),  # noqa: E731
                                               capture_output=True, text=True)
    assert run(step.train).returncode == 0
    refused = run(step.evaluate)
    assert refused.returncode != 0 and 'Weights only load failed' in refused.stderr
    assert run(step.evaluate, **step.evaluate_env).returncode == 0
    if not torch.cuda.is_available():
        on_cuda = run([a if a != 'cpu' else 'cuda' for a in step.train])
        assert on_cuda.returncode != 0 and 'CUDA' in on_cuda.stderr


def test_the_m2d_upstream_still_loads_weights_safely(tmp_path, monkeypatch):
    """The variable set for s3prl does not reach m2d's loader, which asks for weights_only=True itself."""
    from m2d.checkpoint import UnsafeCheckpointError, torch_load

    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    path = tmp_path / 'w.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'code': Fraction(1, 3)}, path)
    with pytest.raises(UnsafeCheckpointError, match='refused'):
        torch_load(path)


def test_cuda_without_cuda_stops_in_the_preflight(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    root = fake_s3prl(tmp_path, monkeypatch)
    assert main(['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', sys.executable,
                 '--device', 'cuda', *SMOKE]) == 2
    err = capsys.readouterr().err.strip()
    assert '--device cuda' in err and 'sees no CUDA device; use --device cpu' in err and '\n' not in err
    assert not (root / 's3prl' / 'calls.txt').exists()  # s3prl never started


def test_dry_run_places_overrides_and_device(tmp_path, capsys, monkeypatch):
    root = fake_s3prl(tmp_path, monkeypatch)
    assert main(['superb', 'run', 'ER', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', 'python',
                 '--folds', 'fold2', '--device', 'cuda:1', '--gpu', '0,1', '--no-preflight', '--dry-run',
                 '-o', 'config.runner.total_steps=100,,config.downstream_expert.datarc.train_batch_size=8',
                 '--override', "args.verbose=True"]) == 0
    lines = capsys.readouterr().out.splitlines()
    train, evaluate = (shlex.split(line) for line in lines[1:3])
    assert train[train.index('-o') + 1] == ("config.optimizer.lr=1e-5,, config.downstream_expert.datarc.test_fold="
                                            "'fold2',,config.runner.total_steps=100,,"
                                            "config.downstream_expert.datarc.train_batch_size=8,,args.verbose=True")
    assert train[-2:] == evaluate[-2:] == ['--device', 'cuda:1']
    assert train[0] == evaluate[0] == 'CUDA_VISIBLE_DEVICES=0,1'
    assert evaluate[1] == 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1' and '-o' not in evaluate
    assert len(lines) == 3  # no preflight asked for, none printed


@pytest.mark.parametrize('override, message', [
    ('config.runner.total_steps', 'expected config.SECTION.KEY=VALUE'),
    ('runner.total_steps=6', 'expected config.SECTION.KEY=VALUE'),
    ("config.a=b=c", 'may not contain'),
    ('config.optimizer.lr=1', 'use --lr'),
    ('args.device=cpu', 'use --device'),
])
def test_bad_overrides_are_one_line(override, message, capsys):
    assert main(['superb', 'run', 'KS', '--ckpt', CKPT, '--dry-run', '-o', override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and '\n' not in err


def test_preflight_names_missing_modules_and_data_roots(tmp_path, capsys, monkeypatch):
    """One pass finds every missing import of the downstream and every missing data root; --dry-run prints them,
    a run stops on them before s3prl starts, in one message."""
    if importlib.util.find_spec('catalyst'):
        pytest.skip('catalyst is installed here')
    expert = ('from catalyst.data.sampler import DistributedSamplerWrapper\nimport m2d_test_absent_module\n'
              'from json.m2d_test_gone import thing  # as torchaudio.sox_effects, gone from newer torchaudio\n')
    root = fake_s3prl(tmp_path, monkeypatch, expert=expert, data=False)
    args = ['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', sys.executable,
            '--device', 'cpu']
    assert main([*args, '--dry-run']) == 0
    findings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('# preflight: ')]
    text = '\n'.join(findings)
    assert 'cannot import catalyst (imported by s3prl.downstream.speech_commands.expert)' in text
    assert 'pip install catalyst' in text
    assert 'cannot import m2d_test_absent_module' in text
    assert ('json.m2d_test_gone (imported by s3prl.downstream.speech_commands.expert) is not in the json '
            'installed') in text
    for key, folder in (('speech_commands_root', 'speech_commands_v0.01'),
                        ('speech_commands_test_root', 'speech_commands_test_set_v0.01')):
        assert f'downstream_expert.datarc.{key} = {tmp_path / folder} does not exist' in text
    assert 'config.runner.total_steps=200000' not in text  # the config's own steps are fine
    assert findings[-1] == f'# preflight: all missing modules at once: {sys.executable} -m pip install catalyst ' \
                           'm2d_test_absent_module'
    assert len(findings) == 6
    assert main([*args, '-o', 'config.runner.total_steps=6']) == 2
    err = capsys.readouterr().err.strip()
    assert 'not ready to run s3prl (6 to fix)' in err and '\n' not in err and 'at once' in err
    assert 'config.runner.eval_step=6' in err  # a run that would write no dev-best.ckpt
    assert not (root / 's3prl' / 'calls.txt').exists()
    # -o can point the data roots elsewhere; the preflight follows it.
    data = tmp_path / 'elsewhere'
    data.mkdir()
    (root / 's3prl' / 'downstream' / 'speech_commands' / 'expert.py').write_text('import json\n')
    assert main([*args, '--dry-run', '-o', f'config.downstream_expert.datarc.speech_commands_root={data},,'
                 f'config.downstream_expert.datarc.speech_commands_test_root={data}']) == 0
    findings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('# preflight: ')]
    assert len(findings) == 1 and 'ready' in findings[0] and 'device cpu' in findings[0]


def test_preflight_without_s3prl_or_upstream(tmp_path, capsys, monkeypatch):
    root = fake_s3prl(tmp_path, monkeypatch)
    monkeypatch.setenv('PYTHONPATH', str(ROOT / 'src'))  # s3prl not installed in that Python
    args = ['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(root), '--python', sys.executable,
            '--device', 'cpu', '--dry-run']
    assert main(args) == 0
    findings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('# preflight: ')]
    assert findings == [f'# preflight: {sys.executable} cannot import s3prl: install the checkout there '
                        f'({sys.executable} -m pip install -e {root})']
    (root / 's3prl' / 'hub.py').write_text('')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(root), str(ROOT / 'src')]))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"# preflight: s3prl.hub has no upstream 'm2d': m2d superb install {root}" in out

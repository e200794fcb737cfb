"""`m2d superb run --dry-run` prints the commands of the reference's five task scripts; `m2d superb stats --preset`."""

import re
import shlex
import shutil
import subprocess

import pytest

from conftest import SHARED, need
from m2d.cli import main
from m2d.superb import SuperbError
from m2d.superb.tasks import TASKS, get_task, task_commands

SEED_NOTES = SHARED / 'seeds' / 'm2d_superb_upstream.md'
CKPT = '/w/m2d_s_vit_base-80x608p80x2-230220/checkpoint-1000.pth'
SCRIPTS = {'ER': 'er.sh', 'IC': 'ic.sh', 'KS': 'ks.sh', 'PR': 'pr.sh', 'SID': 'sid.sh'}


def seed_script_commands(task: str, seed: int = 7) -> list[list[str]]:
    """Run the seed's task script in bash with `python` stubbed: the argv of each s3prl call, with the GPU."""
    if shutil.which('bash') is None:
        pytest.skip('no bash')
    text = need(SEED_NOTES).read_text()
    m = re.search(rf'### {task} \({SCRIPTS[task]}\)\s*```sh\n(.*?)```', text, re.S)
    assert m, f'{SCRIPTS[task]} not found in {SEED_NOTES}'
    stub = 'python() { printf "%s\\x1f" "CUDA=$CUDA_VISIBLE_DEVICES" "$@"; printf "\\n"; }\n'
    out = subprocess.run(['bash', '-c', stub + m.group(1), 'script', '0', 'm2d', CKPT, str(seed)],
                         capture_output=True, text=True, check=True).stdout
    return [line.split('\x1f')[:-1] for line in out.splitlines() if line.startswith('CUDA=')]


def dry_run(capsys, tmp_path, *args) -> list[list[str]]:
    """The printed commands as the seed scripts write them: s3prl's default device (cuda) and, on the
    evaluate commands, the variable that lets s3prl read its own checkpoint (tests/test_superb_s3prl.py)."""
    (tmp_path / 's3prl').mkdir(exist_ok=True)
    (tmp_path / 's3prl' / 'run_downstream.py').touch()
    assert main(['superb', 'run', *args, '--dry-run', '--python', 'python', '--s3prl_root', str(tmp_path),
                 '--device', 'cuda', '--no-preflight']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'cd {tmp_path / "s3prl"}'
    commands = []
    for line in lines[1:]:
        argv = shlex.split(line)
        assert argv[-2:] == ['--device', 'cuda']
        if 'evaluate' in argv:
            argv.remove('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1')
        commands.append(argv[:-2])
    return commands


@pytest.mark.parametrize('task', list(SCRIPTS))
def test_dry_run_matches_the_seed_scripts(task, capsys, tmp_path):
    expected = seed_script_commands(task, seed=7)
    assert len(expected) == (10 if task == 'ER' else 2)
    ours = dry_run(capsys, tmp_path, task, '--ckpt', CKPT, '--seed', '7', '--gpu', '0')
    assert [['CUDA=0', *e[1:]] for e in expected] == expected  # the scripts' GPU argument
    assert [c[1:] for c in ours] == [["python", *e[1:]] for e in expected]
    assert all(c[0] == 'CUDA_VISIBLE_DEVICES=0' for c in ours)


def test_dry_run_ks_as_in_the_seed_readme(capsys, tmp_path):
    """The two commands the seed's README shows for `./ks.sh 0 m2d .../checkpoint-1000.pth 7` (written out)."""
    ours = dry_run(capsys, tmp_path, 'speech_commands', '--ckpt', CKPT)
    exp = 'm2d_s_vit_base-80x608p80x2-230220-checkpoint-1000-KS-lr1e-4-s7'
    assert ours == [
        ['python', 'run_downstream.py', '-m', 'train', '-n', exp, '-u', 'm2d', '-d', 'speech_commands', '-o',
         'config.optimizer.lr=1e-4', '-k', f'{CKPT},-11.506255149841309,4.314857482910156', '--seed', '7'],
        ['python', 'run_downstream.py', '-m', 'evaluate', '-e', f'result/downstream/{exp}/dev-best.ckpt']]


def test_run_options(capsys, tmp_path):
    cmds = dry_run(capsys, tmp_path, 'sid', '--ckpt', CKPT, '--stats=-10.5,4.25', '--lr', '5e-4', '--seed', '3')
    assert cmds[0][cmds[0].index('-k') + 1] == f'{CKPT},-10.5,4.25'
    two = dry_run(capsys, tmp_path, 'sid', '--ckpt', CKPT, '--stats', '-10.5', '4.25', '--lr', '5e-4', '--seed', '3')
    assert two == cmds
    saved = tmp_path / 'st.json'
    saved.write_text('{"mean": -10.5, "std": 4.25, "files": 3}')  # as `m2d superb stats --json` writes
    assert dry_run(capsys, tmp_path, 'sid', '--ckpt', CKPT, '--stats', str(saved), '--lr', '5e-4', '--seed', '3') == cmds
    assert cmds[0][cmds[0].index('-n') + 1].endswith('-SID-lr5e-4-s3')
    assert cmds[0][cmds[0].index('-o') + 1] == 'config.optimizer.lr=5e-4'
    er = dry_run(capsys, tmp_path, 'ER', '--ckpt', CKPT, '--folds', 'fold2,fold5')
    assert [c[c.index('-n') + 1][-5:] for c in er[::2]] == ['fold2', 'fold5']
    # A relative weight file becomes absolute: s3prl runs in its own folder.
    rel = tmp_path / 'exp1' / 'checkpoint-5.pth'
    rel.parent.mkdir()
    rel.touch()
    step = task_commands(get_task('IC'), str(rel), seed=1)[0]
    assert step.train[step.train.index('-k') + 1].startswith(str(rel.resolve()) + ',')
    assert step.name == 'exp1-checkpoint-5-IC-lr1e-3-s1'


@pytest.mark.parametrize('args, message', [
    (['XX', '--ckpt', CKPT], 'not one of the SUPERB tasks'),
    (['KS', '--ckpt', CKPT, '--stats', '1'], 'expected MEAN,STD'),
    (['KS', '--ckpt', CKPT, '--stats=-11,0'], 'STD > 0'),
    (['KS', '--ckpt', CKPT, '--lr', 'fast'], 'not a number'),
    (['KS', '--ckpt', CKPT, '--folds', 'fold1'], 'only ER'),
    (['ER', '--ckpt', CKPT, '--folds', 'fold9'], 'fold9'),
])
def test_run_errors_are_one_line(args, message, capsys):
    assert main(['superb', 'run', *args, '--dry-run']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('m2d superb: error:') and message in err and '\n' not in err


def test_run_needs_an_s3prl_checkout(tmp_path):
    with pytest.raises(SuperbError, match='run_downstream.py'):
        from m2d.superb.tasks import find_s3prl_dir
        find_s3prl_dir(tmp_path)


def test_presets_are_the_seed_statistics(capsys):
    """Each task's preset appears in its seed script's -k argument, and `stats --preset` prints it."""
    text = need(SEED_NOTES).read_text()
    for task in TASKS.values():
        script = re.search(rf'### {task.name} \({SCRIPTS[task.name]}\)\s*```sh\n(.*?)```', text, re.S).group(1)
        assert f'$ckpt,{task.stats[0]},{task.stats[1]} ' in script
        assert f'lr={task.lr}\n' in script
    assert main(['superb', 'stats', '--preset', 'voxceleb1', '--ckpt', CKPT]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f'-k {CKPT},-10.571271,4.3681135'


FAKE_S3PRL = '''
import os, sys
args = sys.argv[1:]
mode = args[args.index('-m') + 1]
with open('calls.txt', 'a') as f:
    f.write(' '.join(args) + '\\n')
if mode == 'train':
    exp = 'result/downstream/' + args[args.index('-n') + 1]
    os.makedirs(exp, exist_ok=True)
    open(exp + '/dev-best.ckpt', 'w').close()
    sys.exit(int(os.environ.get('FAIL_TRAIN', '0')))
exp = os.path.dirname(args[args.index('-e') + 1])
with open(exp + '/log.log', 'a') as f:
    f.write('test at step 0: 0.875\\n')
'''


def test_run_calls_train_then_evaluate_and_reports(tmp_path, capsys, monkeypatch):
    """`m2d superb run` with a stand-in run_downstream.py: train, evaluate, where the result is, the table."""
    import sys

    pkg = tmp_path / 's3prl'
    pkg.mkdir()
    (pkg / 'run_downstream.py').write_text(FAKE_S3PRL)
    assert main(['superb', 'run', 'ER', '--ckpt', CKPT, '--s3prl_root', str(tmp_path), '--folds', 'fold1,fold3',
                 '--python', sys.executable, '--device', 'cpu', '--no-preflight']) == 0
    calls = (pkg / 'calls.txt').read_text().splitlines()
    assert [c.split()[1] for c in calls] == ['train', 'evaluate', 'train', 'evaluate']
    out = capsys.readouterr().out
    exp = pkg / 'result' / 'downstream' / 'm2d_s_vit_base-80x608p80x2-230220-checkpoint-1000-ER-lr1e-5-s7-fold3'
    assert f'acc (%) 87.50 (in {exp}/log.log)' in out
    assert out.splitlines()[-1].split()[-1] == '87.50'  # ER column of the summary
    monkeypatch.setenv('FAIL_TRAIN', '3')
    assert main(['superb', 'run', 'KS', '--ckpt', CKPT, '--s3prl_root', str(tmp_path), '--python', sys.executable,
                 '--no-preflight']) == 2
    err = capsys.readouterr().err
    assert 's3prl train of' in err and 'failed (exit status 3)' in err
    assert (pkg / 'calls.txt').read_text().splitlines()[-1].split()[1] == 'train'  # no evaluate after a failure
